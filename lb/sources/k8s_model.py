"""Kubernetes objects -> xdplb services and identities. Pure: no I/O.

Two steps, both pure:

1. `parse(kind, obj)` keeps only the fields xdplb needs of a Service,
   EndpointSlice, Node, Pod, Namespace or NetworkPolicy (a small frozen
   dataclass), or raises `BadObject` naming the object. The watcher stores
   these, never the raw JSON.
2. `translate(...)` turns one Service with its EndpointSlices (and this
   node, and the NetworkPolicy view) into `Entry`s, one per (VIP, port,
   protocol) xdplb serves, plus the reasons for anything it skipped.

The semantics follow kube-proxy; README "Kubernetes mode" has the table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

HEADLESS_LABEL = "service.kubernetes.io/headless"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Per-Service options of xdplb (Service metadata.annotations): config.Service's
# `forwarding` and `maglev_table_size`. A bad value is reported and the
# Service is served with the default (Translation.bad_annotations).
FORWARDING_ANNOTATION = "xdplb.io/forwarding"
TABLE_SIZE_ANNOTATION = "xdplb.io/maglev-table-size"
FORWARDINGS = ("nat", "ipip", "gue")
DEFAULT_AFFINITY_S = 10800          # sessionAffinityConfig.clientIP.timeoutSeconds default
KINDS = ("Service", "EndpointSlice", "Node", "Pod", "Namespace", "NetworkPolicy")
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}   # ip_address().version -> ipFamilies / addressType

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class BadObject(ValueError):
    """A malformed object: the message names it (kind namespace/name)."""


# ---- slim objects ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SvcPort:
    name: str
    protocol: str                   # TCP | UDP | SCTP
    port: int
    node_port: int | None
    target_port: int | str | None


@dataclass(frozen=True, slots=True)
class KService:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]    # one per family (dual-stack: two), as the apiserver allocated them
    ports: tuple[SvcPort, ...]
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    lb_source_ranges: tuple[str, ...] = ()
    affinity_s: int | None = None
    etp_local: bool = False
    itp_local: bool = False
    proxy_name: str | None = None
    headless: bool = False
    forwarding: str | None = None           # FORWARDING_ANNOTATION, as written
    table_size: str | None = None           # TABLE_SIZE_ANNOTATION, as written

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool
    serving: bool
    terminating: bool
    node: str | None = None
    pod: str | None = None          # targetRef name when it is a Pod


@dataclass(frozen=True, slots=True)
class KSlice:
    namespace: str
    name: str
    service: str | None
    address_type: str
    ports: tuple[tuple[str, str, int], ...]      # (name, protocol, port)
    endpoints: tuple[Endpoint, ...]

    @property
    def service_key(self) -> tuple[str, str] | None:
        return (self.namespace, self.service) if self.service else None


@dataclass(frozen=True, slots=True)
class KNode:
    name: str
    addresses: tuple[str, ...]      # InternalIP then ExternalIP, as listed


@dataclass(frozen=True, slots=True)
class KPod:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    ips: tuple[str, ...]
    host_network: bool = False


@dataclass(frozen=True, slots=True)
class KNamespace:
    name: str
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Selector:
    """A LabelSelector. Empty matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    exprs: tuple[tuple[str, str, frozenset[str]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        for key, op, values in self.exprs:
            has = key in labels
            if op == "In" and not (has and labels[key] in values):
                return False
            if op == "NotIn" and has and labels[key] in values:
                return False
            if op == "Exists" and not has:
                return False
            if op == "DoesNotExist" and has:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Peer:
    pod_selector: Selector | None = None
    ns_selector: Selector | None = None
    cidr: str | None = None
    excepts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyPort:
    protocol: str
    port: int | str | None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] | None        # None: from everywhere
    ports: tuple[PolicyPort, ...] | None  # None: every port


@dataclass(frozen=True, slots=True)
class KPolicy:
    namespace: str
    name: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] | None      # None: the policy does not cover ingress


# ---- parsing ---------------------------------------------------------------


def object_name(kind: str, obj: Any) -> str:
    md = obj.get("metadata") if isinstance(obj, dict) else None
    md = md if isinstance(md, Mapping) else {}
    ns, name = md.get("namespace"), md.get("name", "?")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return default
        d = d.get(p)
    return default if d is None else d


def _list(v: Any, what: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a list")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{what} must be a non-empty string")
    return v


def _port(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
        raise ValueError(f"{what} must be a port number 1..65535, not {v!r}")
    return v


def _labels(v: Any) -> tuple[tuple[str, str], ...]:
    if not v:
        return ()
    if not isinstance(v, dict):
        raise ValueError("metadata.labels must be a mapping")
    return tuple(sorted(v.items()))


def _selector(v: Any, what: str) -> Selector:
    if v is None:
        return Selector()
    if not isinstance(v, dict):
        raise ValueError(f"{what} must be a mapping")
    exprs = []
    for i, e in enumerate(_list(v.get("matchExpressions"), f"{what}.matchExpressions")):
        op = _get(e, "operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"{what}.matchExpressions[{i}].operator {op!r} is not In/NotIn/Exists/DoesNotExist")
        exprs.append((_str(_get(e, "key"), f"{what}.matchExpressions[{i}].key"), op,
                      frozenset(map(str, _list(_get(e, "values"), "values")))))
    return Selector(_labels(v.get("matchLabels")), tuple(exprs))


def _svc(obj: Mapping, ns: str, name: str) -> KService:
    spec = _get(obj, "spec", default={})
    labels = dict(_labels(_get(obj, "metadata", "labels")))
    ports = []
    for i, p in enumerate(_list(spec.get("ports"), "spec.ports")):
        if not isinstance(p, dict):
            raise ValueError(f"spec.ports[{i}] must be a mapping")
        np_ = p.get("nodePort")
        tp = p.get("targetPort")
        ports.append(SvcPort(str(p.get("name") or ""), str(p.get("protocol") or "TCP").upper(),
                             _port(p.get("port"), f"spec.ports[{i}].port"),
                             _port(np_, f"spec.ports[{i}].nodePort") if np_ is not None else None,
                             tp if isinstance(tp, (int, str)) else None))
    cips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or (
        [spec["clusterIP"]] if spec.get("clusterIP") else [])
    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        t = _get(spec, "sessionAffinityConfig", "clientIP", "timeoutSeconds", default=DEFAULT_AFFINITY_S)
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 86400:
            raise ValueError(f"sessionAffinityConfig.clientIP.timeoutSeconds must be 1..86400, not {t!r}")
        affinity = t
    annotations = _get(obj, "metadata", "annotations", default=None) or {}
    if not isinstance(annotations, dict):
        raise ValueError("metadata.annotations must be a mapping")
    lb_ips = tuple(str(i["ip"]) for i in _list(_get(obj, "status", "loadBalancer", "ingress"),
                                                "status.loadBalancer.ingress")
                   if isinstance(i, dict) and i.get("ip"))
    return KService(
        ns, name, str(spec.get("type") or "ClusterIP"), tuple(map(str, cips)), tuple(ports),
        tuple(map(str, _list(spec.get("externalIPs"), "spec.externalIPs"))), lb_ips,
        tuple(map(str, _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges"))),
        affinity, spec.get("externalTrafficPolicy") == "Local", spec.get("internalTrafficPolicy") == "Local",
        labels.get(PROXY_NAME_LABEL), HEADLESS_LABEL in labels,
        *(None if (a := annotations.get(k)) is None else str(a)
          for k in (FORWARDING_ANNOTATION, TABLE_SIZE_ANNOTATION)))


def _cond(c: Mapping, key: str, default: bool) -> bool:
    v = c.get(key)
    return default if v is None else bool(v)


def _slice(obj: Mapping, ns: str, name: str) -> KSlice:
    labels = dict(_labels(_get(obj, "metadata", "labels")))
    ports = []
    for i, p in enumerate(_list(obj.get("ports"), "ports")):
        if not isinstance(p, dict):
            raise ValueError(f"ports[{i}] must be a mapping")
        if p.get("port") is None:
            continue                         # "all ports": nothing to map a service port to
        ports.append((str(p.get("name") or ""), str(p.get("protocol") or "TCP").upper(),
                      _port(p.get("port"), f"ports[{i}].port")))
    eps = []
    for i, e in enumerate(_list(obj.get("endpoints"), "endpoints")):
        if not isinstance(e, dict):
            raise ValueError(f"endpoints[{i}] must be a mapping")
        addrs = _list(e.get("addresses"), f"endpoints[{i}].addresses")
        if not addrs:
            raise ValueError(f"endpoints[{i}].addresses must not be empty")
        c = e.get("conditions") or {}
        ready = _cond(c, "ready", True)
        ref = e.get("targetRef") or {}
        eps.append(Endpoint(_str(addrs[0], f"endpoints[{i}].addresses[0]"), ready,
                            _cond(c, "serving", ready), _cond(c, "terminating", False),
                            e.get("nodeName"), ref.get("name") if ref.get("kind") == "Pod" else None))
    return KSlice(ns, name, labels.get(SERVICE_NAME_LABEL), str(obj.get("addressType") or "IPv4"),
                  tuple(ports), tuple(eps))


def _node(obj: Mapping, ns: str, name: str) -> KNode:
    addrs = _list(_get(obj, "status", "addresses"), "status.addresses")
    order = {"InternalIP": 0, "ExternalIP": 1}
    picked = sorted((order[a["type"]], i, str(a.get("address")))
                    for i, a in enumerate(addrs) if isinstance(a, dict) and a.get("type") in order)
    return KNode(name, tuple(dict.fromkeys(a for _, _, a in picked)))


def _pod(obj: Mapping, ns: str, name: str) -> KPod:
    st = _get(obj, "status", default={})
    ips = [str(p.get("ip")) for p in _list(st.get("podIPs"), "status.podIPs") if isinstance(p, dict)]
    if not ips and st.get("podIP"):
        ips = [str(st["podIP"])]
    if st.get("phase") in ("Succeeded", "Failed"):
        ips = []                             # its IP may already belong to another pod
    return KPod(ns, name, _labels(_get(obj, "metadata", "labels")), tuple(ips),
                bool(_get(obj, "spec", "hostNetwork", default=False)))


def _namespace(obj: Mapping, ns: str, name: str) -> KNamespace:
    return KNamespace(name, _labels(_get(obj, "metadata", "labels")))


def _policy(obj: Mapping, ns: str, name: str) -> KPolicy:
    spec = _get(obj, "spec", default={})
    types = spec.get("policyTypes")
    covers_ingress = types is None or "Ingress" in types
    rules = []
    for i, r in enumerate(_list(spec.get("ingress"), "spec.ingress")):
        r = r or {}
        peers = None
        if r.get("from") is not None and r.get("from") != []:
            peers = []
            for j, f in enumerate(_list(r.get("from"), f"spec.ingress[{i}].from")):
                w = f"spec.ingress[{i}].from[{j}]"
                if not isinstance(f, dict):
                    raise ValueError(f"{w} must be a mapping")
                blk = f.get("ipBlock")
                if blk is not None:
                    cidr = _str(_get(blk, "cidr"), f"{w}.ipBlock.cidr")
                    ip_network(cidr, strict=False)
                    exc = tuple(map(str, _list(blk.get("except"), f"{w}.ipBlock.except")))
                    for e in exc:
                        ip_network(e, strict=False)
                    peers.append(Peer(cidr=cidr, excepts=exc))
                else:
                    ps, nss = f.get("podSelector"), f.get("namespaceSelector")
                    if ps is None and nss is None:
                        raise ValueError(f"{w} needs podSelector, namespaceSelector or ipBlock")
                    peers.append(Peer(_selector(ps, f"{w}.podSelector") if ps is not None else None,
                                      _selector(nss, f"{w}.namespaceSelector") if nss is not None else None))
            peers = tuple(peers)
        ports = None
        if r.get("ports"):
            ports = []
            for j, p in enumerate(_list(r.get("ports"), f"spec.ingress[{i}].ports")):
                p = p or {}
                port = p.get("port")
                end = p.get("endPort")
                ports.append(PolicyPort(str(p.get("protocol") or "TCP").upper(),
                                        port if isinstance(port, (int, str)) else None,
                                        end if isinstance(end, int) else None))
            ports = tuple(ports)
        rules.append(Rule(peers, ports))
    return KPolicy(ns, name, _selector(spec.get("podSelector"), "spec.podSelector"),
                   tuple(rules) if covers_ingress else None)


_PARSERS = {"Service": _svc, "EndpointSlice": _slice, "Node": _node, "Pod": _pod,
            "Namespace": _namespace, "NetworkPolicy": _policy}


def parse(kind: str, obj: Any):
    """The slim form of one object, or BadObject naming it."""
    what = object_name(kind, obj)
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise BadObject(f"{what}: not an object with metadata")
    md = obj["metadata"]
    name = md.get("name")
    if not isinstance(name, str) or not name:
        raise BadObject(f"{what}: metadata.name is missing")
    ns = md.get("namespace") or ""
    try:
        return _PARSERS[kind](obj, ns, name)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadObject(f"{what}: {e}") from None


def key_of(kind: str, obj: Mapping) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return (md.get("namespace") or "", md.get("name") or "")


# ---- identities --------------------------------------------------------------


def _h(*parts: Any, n: int = 10) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()[:n]


def pod_identity(namespace: str, labels: tuple[tuple[str, str], ...]) -> str:
    """Same namespace and labels -> same name (a stable hash of both)."""
    return f"pod.{namespace}.{_h(namespace, labels)}"[:200]


def name_part(addr: Any) -> str:
    """An address inside an xdplb name ([A-Za-z0-9._-]): IPv6's colons become dashes."""
    return str(addr).replace(":", "-")


def cidr_identity(cidr: Network) -> str:
    return f"cidr.{name_part(cidr.network_address)}-{cidr.prefixlen}"


def _net(s: str) -> Network | None:
    try:
        return ip_network(s, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1 << 17)
def _addr(s: str) -> Address | None:
    """An address of either family. Cached: endpoint addresses repeat in
    every update of their slice. inet_pton: strict, ~5x faster than
    ipaddress's parser."""
    try:
        return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, s), "big"))
    except (OSError, TypeError, ValueError):
        pass
    try:
        return IPv6Address(socket.inet_pton(socket.AF_INET6, s))
    except (OSError, TypeError, ValueError):
        return None


def _net_order(n: Network) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)


@dataclass
class PolicyView:
    """What NetworkPolicy evaluation reads: pods, namespaces, policies."""

    pods: Mapping[tuple[str, str], KPod]
    namespaces: Mapping[str, KNamespace]
    policies: Mapping[tuple[str, str], KPolicy]
    # Filled by identities(): identity -> (namespace, labels dict, its /32s and /128s)
    groups: dict[str, tuple[str, dict[str, str], set[Network]]] = field(default_factory=dict)
    cidr_nets: set[Network] = field(default_factory=set)
    pod_by_ip: dict[str, KPod] = field(default_factory=dict)     # str(address) -> pod

    def identities(self, extra_cidrs: Iterable[str] = ()) -> dict[str, tuple[Network, ...]]:
        """name -> CIDRs: one identity per (namespace, labels) of running
        pods, with every address of theirs, IPv4 and IPv6 (host-network
        pods share the node's address and get none), and one per CIDR that
        a policy or a loadBalancerSourceRanges names (so that LPM can tell
        them apart)."""
        groups: dict[str, tuple[str, dict[str, str], set[Network]]] = {}
        owner: dict[Network, str] = {}
        self.pod_by_ip = {}
        for pod in self.pods.values():
            if pod.host_network:
                continue
            for ip in pod.ips:
                a = _addr(ip)
                if a is None:
                    continue
                net = ip_network((a, a.max_prefixlen))
                if net in owner:                 # an IP reused before the old pod went: keep one
                    continue
                name = pod_identity(pod.namespace, pod.labels)
                g = groups.setdefault(name, (pod.namespace, dict(pod.labels), set()))
                g[2].add(net)
                owner[net] = name
                self.pod_by_ip[str(a)] = pod
        cidrs: set[Network] = set()
        for pol in self.policies.values():
            for rule in pol.ingress or ():
                for peer in rule.peers or ():
                    if peer.cidr:
                        cidrs.update(n for n in map(_net, (peer.cidr, *peer.excepts)) if n)
        cidrs.update(n for n in map(_net, extra_cidrs) if n)
        cidrs -= set(owner)                       # a /32 (/128) that is a pod's IP is the pod's
        self.groups, self.cidr_nets = groups, cidrs
        out = {name: tuple(sorted(g[2], key=_net_order)) for name, g in groups.items()}
        out.update({cidr_identity(n): (n,) for n in cidrs})
        return out

    # -- evaluation ----------------------------------------------------------

    def _block_names(self, cidr: str, excepts: tuple[str, ...]) -> set[str]:
        """Identities whose every address is inside `cidr` and outside the
        excepts: with LPM, these are the sources the block admits."""
        c = _net(cidr)
        if c is None:
            return set()
        exc = [e for e in map(_net, excepts) if e and e.version == c.version]

        # An identity is admitted only if all its addresses are inside: so no
        # one block admits a dual-stack pod (its identity cannot be split by
        # family; admitting it would let its other address in too).
        def inside(n: Network) -> bool:
            return n.version == c.version and n.subnet_of(c) and not any(n.subnet_of(e) for e in exc)

        names = {cidr_identity(n) for n in self.cidr_nets if inside(n)}
        names |= {name for name, (_, _, nets) in self.groups.items() if all(inside(n) for n in nets)}
        return names

    def ranges(self, cidrs: Iterable[str]) -> frozenset[str]:
        """The identities a list of CIDRs (loadBalancerSourceRanges) admits."""
        out: set[str] = set()
        for c in cidrs:
            out |= self._block_names(c, ())
        return frozenset(out)

    def _peer_names(self, pol: KPolicy, peer: Peer) -> set[str]:
        if peer.cidr:
            return self._block_names(peer.cidr, peer.excepts)
        out = set()
        for name, (ns, labels, _) in self.groups.items():
            if peer.ns_selector is None:
                if ns != pol.namespace:
                    continue
            else:
                nso = self.namespaces.get(ns)
                if not peer.ns_selector.matches(dict(nso.labels) if nso else {}):
                    continue
            if peer.pod_selector is None or peer.pod_selector.matches(labels):
                out.add(name)
        return out

    def allowed(self, backend_ips: Iterable[str], protocol: str, port: int,
                port_name: str | None) -> frozenset[str] | None:
        """The identities NetworkPolicy admits to these backends on this
        target port, or None for no restriction. A per-service answer for
        per-pod rules: the intersection over the backends (a source is
        admitted only if every backend pod admits it; unisolated pods admit
        all), so the approximation can only deny more, never allow more."""
        result: set[str] | None = None
        for ip in backend_ips:
            pod = self.pod_by_ip.get(ip)
            if pod is None:
                continue                          # not a known pod: no policy selects it
            labels = dict(pod.labels)
            isolated, names, everyone = False, set(), False
            for pol in self.policies.values():
                if pol.namespace != pod.namespace or pol.ingress is None or \
                        not pol.pod_selector.matches(labels):
                    continue
                isolated = True
                for rule in pol.ingress:
                    if rule.ports is not None and not any(
                            _port_matches(pp, protocol, port, port_name) for pp in rule.ports):
                        continue
                    if rule.peers is None:
                        everyone = True
                        continue
                    for peer in rule.peers:
                        names |= self._peer_names(pol, peer)
            if not isolated or everyone:
                continue
            result = names if result is None else result & names
        return None if result is None else frozenset(result)


def _port_matches(pp: PolicyPort, protocol: str, port: int, port_name: str | None) -> bool:
    if pp.protocol != protocol:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, str):
        return pp.port == port_name
    return pp.port <= port <= (pp.end_port or pp.port)


# ---- translation -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One xdplb service: what config.Service gets, already checked. The
    VIP and its backends are of one family."""

    name: str
    vip: Address
    port: int
    protocol: str                         # tcp | udp
    backends: tuple[tuple[Address, int, str], ...]   # (address, port, active|draining)
    allow: tuple[str, ...] | None = None
    client_affinity_s: int | None = None
    forwarding: str = "nat"
    maglev_table_size: int | None = None

    @property
    def key(self) -> tuple[Address, int, str]:
        return (self.vip, self.port, self.protocol)


@dataclass
class Translation:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # one reason per thing not served
    sctp: int = 0
    other_family: int = 0     # addresses of a family the Service has no clusterIP of
    bad_annotations: list[str] = field(default_factory=list)   # each ignored: the default serves


def service_options(svc: KService) -> tuple[str, int | None, list[str]]:
    """The Service's forwarding and Maglev table size from its annotations,
    and a reason for each value that is not one (then the default)."""
    where = f"Service {svc.namespace}/{svc.name}"
    bad = []
    forwarding, size = "nat", None
    if svc.forwarding is not None:
        if svc.forwarding.strip().lower() in FORWARDINGS:
            forwarding = svc.forwarding.strip().lower()
        else:
            bad.append(f"{where}: annotation {FORWARDING_ANNOTATION}={svc.forwarding!r} is not one of "
                       f"{', '.join(FORWARDINGS)}; forwarding nat")
    if svc.table_size is not None:
        if svc.table_size.strip().isdigit():
            size = int(svc.table_size)
        else:
            bad.append(f"{where}: annotation {TABLE_SIZE_ANNOTATION}={svc.table_size!r} is not a "
                       f"number; the table size follows the backend count")
    return forwarding, size, bad


def serves(svc: KService, proxy_name: str | None) -> str | None:
    """None if xdplb serves this Service, else why not (kube-proxy's rules)."""
    if svc.headless:
        return f"label {HEADLESS_LABEL}"
    if svc.proxy_name is not None and svc.proxy_name != proxy_name:
        return f"label {PROXY_NAME_LABEL}={svc.proxy_name}"
    if svc.type == "ExternalName":
        return "type ExternalName (DNS only)"
    if not svc.cluster_ips or svc.cluster_ips[0] == "None":
        return "headless (clusterIP: None)"
    return None


def entry_name(ns: str, name: str, port: SvcPort, kind: str, vip: str) -> str:
    """xdplb's service name ([A-Za-z0-9._-]{1,63}): readable, unique."""
    full = f"{ns}.{name}.{port.name or port.port}.{port.protocol.lower()}.{kind}.{name_part(vip)}"
    if len(full) <= 63:
        return full
    return f"{full[:50]}-{_h(full, n=12)}"


def _backends(svc: KService, sp: SvcPort, slices: Iterable[KSlice], local: bool,
              node_name: str | None, version: int) -> tuple[tuple[Address, int, str], ...]:
    """The endpoints of one family (the slices of its addressType). Ready
    endpoints are active; with none ready, serving+terminating ones are
    (kube-proxy's fallback). Every other endpoint still in a slice is
    draining: its flows finish, it gets no new ones."""
    family = FAMILY_NAMES[version]
    cands: dict[tuple[Address, int], Endpoint] = {}
    for sl in slices:
        if sl.address_type != family:
            continue
        port = next((p for n, proto, p in sl.ports if n == sp.name and proto == sp.protocol), None)
        if port is None:
            continue
        for ep in sl.endpoints:
            if local and ep.node != node_name:
                continue
            a = _addr(ep.address)
            if a is None or a.version != version:
                continue
            k = (a, port)
            old = cands.get(k)
            # The same endpoint in two slices (while it moves): the better state wins.
            if old is None or (ep.ready, ep.serving) > (old.ready, old.serving):
                cands[k] = ep
    ready = {k for k, e in cands.items() if e.ready}
    active = ready or {k for k, e in cands.items() if e.serving and e.terminating}
    return tuple((a, p, "active" if (a, p) in active else "draining") for a, p in sorted(cands))


def translate(svc: KService, slices: Iterable[KSlice], node: KNode | None, node_name: str | None,
              policy: PolicyView | None = None) -> Translation:
    """Dual-stack as kube-proxy: each family is served only if the Service
    has a clusterIP of it (ipFamilies and ipFamilyPolicy act through the
    clusterIPs the apiserver allocates), with the endpoints of that
    family's EndpointSlices, on this node's addresses of that family."""
    out = Translation()
    slices = list(slices)
    where = f"Service {svc.namespace}/{svc.name}"
    forwarding, table_size, out.bad_annotations = service_options(svc)
    versions = {a.version for a in map(_addr, svc.cluster_ips) if a is not None}
    node_addrs = [a for a in (node.addresses if node else ()) if (v := _addr(a)) and v.version in versions]
    seen: set[tuple[Address, int, str]] = set()
    for sp in svc.ports:
        if sp.protocol not in ("TCP", "UDP"):
            out.skipped.append(f"{where} port {sp.name or sp.port}/{sp.protocol}: "
                               f"{sp.protocol} is not supported (TCP and UDP only)")
            out.sctp += sp.protocol == "SCTP"
            continue
        proto = sp.protocol.lower()
        # version -> (internal, external) backends
        by_family: dict[int, tuple[tuple, tuple]] = {}
        for v in sorted(versions):
            internal = _backends(svc, sp, slices, svc.itp_local, node_name, v)
            external = internal if svc.etp_local == svc.itp_local else \
                _backends(svc, sp, slices, svc.etp_local, node_name, v)
            by_family[v] = (internal, external)
        allow_pol = None
        if policy is not None and policy.pod_by_ip:      # no pod known: no policy can select
            every = [b for pair in by_family.values() for bs in pair for b in bs]
            allow_pol = policy.allowed({str(a) for a, _, _ in every}, sp.protocol,
                                       _target_port(tuple(every)), _tp_name(sp))
        vips: list[tuple[str, str, int, bool, tuple[str, ...] | None]] = []   # (kind, ip, port, external?, allow)
        for ip in svc.cluster_ips:
            vips.append(("cluster", ip, sp.port, False, allow_pol))
        if sp.node_port and svc.type in ("NodePort", "LoadBalancer"):
            if not node_addrs:
                out.skipped.append(f"{where} nodePort {sp.node_port}: this node's addresses of the "
                                   f"Service's families are unknown (kubernetes.node_name, Node "
                                   f"status.addresses)")
            for ip in node_addrs:
                vips.append(("node", ip, sp.node_port, True, allow_pol))
        if svc.type == "LoadBalancer":
            ranges = None
            if svc.lb_source_ranges:
                if policy is None:     # identities() must have seen the ranges
                    policy = PolicyView({}, {}, {})
                    policy.identities(svc.lb_source_ranges)
                ranges = policy.ranges(svc.lb_source_ranges)
            for ip in svc.lb_ips:
                vips.append(("lb", ip, sp.port, True, _intersect(allow_pol, ranges)))
        for ip in svc.external_ips:
            vips.append(("ext", ip, sp.port, True, allow_pol))
        for kind, ip, port, external, allow in vips:
            a = _addr(ip)
            if a is None or a.version not in versions:
                out.other_family += 1
                out.skipped.append(f"{where} {kind} {ip} port {port}/{sp.protocol}: not served: "
                                   f"the Service has no clusterIP of this address family")
                continue
            if (a, port, proto) in seen:
                # e.g. an externalIP equal to the clusterIP: one service per address
                out.skipped.append(f"{where} {kind} {ip} port {port}/{sp.protocol}: "
                                   f"already served by this Service")
                continue
            seen.add((a, port, proto))
            out.entries.append(Entry(
                entry_name(svc.namespace, svc.name, sp, kind, str(a)), a, port, proto,
                by_family[a.version][external], tuple(sorted(allow)) if allow is not None else None,
                svc.affinity_s, forwarding, table_size))
    return out


def _intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _target_port(backends: tuple) -> int:
    return backends[0][1] if backends else 0


def _tp_name(sp: SvcPort) -> str | None:
    return sp.target_port if isinstance(sp.target_port, str) else None
