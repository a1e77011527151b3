"""Kubernetes semantics, translation level: manifests -> xdplb services.

One test per row of README "Kubernetes mode" semantics table (pure
functions, no root, no I/O beyond reading the manifests)."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from k8s_apiserver import load_manifests
from lb.config import Service
from lb.endpoint import host_port
from lb.sources import k8s_model as m
from lb.sources.kubernetes import to_service

MANIFESTS = Path(__file__).resolve().parent / "k8s_manifests"


class World:
    """Parsed manifests, as the watcher's state would hold them."""

    def __init__(self, *files: str, node_name: str | None = "node-a", extra: list[dict] = ()):
        objs = [o for f in files for o in load_manifests(MANIFESTS / f)] + list(extra)
        self.raw = objs
        self.by = {k: {} for k in m.KINDS}
        for o in objs:
            self.by[o["kind"]][m.key_of(o["kind"], o)] = m.parse(o["kind"], o)
        self.node_name = node_name
        nodes = self.by["Node"]
        self.node = next((n for n in nodes.values() if n.name == node_name), None)
        self.view = m.PolicyView(self.by["Pod"], {k[1]: v for k, v in self.by["Namespace"].items()},
                                 self.by["NetworkPolicy"])
        ranges = [r for s in self.by["Service"].values() for r in s.lb_source_ranges]
        self.identities = self.view.identities(ranges)

    def tr(self, name: str, ns: str = "shop") -> m.Translation:
        svc = self.by["Service"][(ns, name)]
        slices = [s for s in self.by["EndpointSlice"].values() if s.service_key == (ns, name)]
        return m.translate(svc, slices, self.node, self.node_name, self.view)

    def entry_at(self, name: str, vip: str, proto: str = "tcp") -> m.Entry:
        found = [e for e in self.tr(name).entries if str(e.vip) == vip and e.protocol == proto]
        assert len(found) == 1, [e.name for e in self.tr(name).entries]
        return found[0]

    def entry(self, name: str, kind: str, proto: str = "tcp", version: int = 4) -> m.Entry:
        found = [e for e in self.tr(name).entries
                 if f".{kind}." in e.name and e.protocol == proto and e.vip.version == version]
        assert len(found) == 1, [e.name for e in self.tr(name).entries]
        return found[0]


def active(e: m.Entry) -> set[str]:
    return {host_port(a, p) for a, p, s in e.backends if s == "active"}


def draining(e: m.Entry) -> set[str]:
    return {host_port(a, p) for a, p, s in e.backends if s == "draining"}


@pytest.fixture(scope="module")
def w() -> World:
    return World("semantics.yaml")


def test_clusterip_serves_ready_endpoints_on_target_port(w):
    e = w.entry("dns", "cluster")
    assert e.vip == IPv4Address("10.96.0.10") and e.port == 53
    assert active(e) == {"10.244.1.10:5353", "10.244.2.10:5353"}
    assert isinstance(to_service(e), Service)            # a valid config.Service


def test_dual_stack_serves_both_families_with_their_own_slices(w):
    """A PreferDualStack Service: one xdplb service per clusterIP, each with
    the endpoints of its family's EndpointSlice (addressType)."""
    tr = w.tr("dns")
    assert {str(e.vip) for e in tr.entries} == {"10.96.0.10", "fd00:10:96::a"}
    v6 = w.entry_at("dns", "fd00:10:96::a", "tcp")
    assert v6.name == "shop.dns.dns-tcp.tcp.cluster.fd00-10-96--a"   # an xdplb name: no colons
    assert active(v6) == {"[fd00:244::10]:5353"}
    assert w.entry_at("dns", "fd00:10:96::a", "udp").backends == ()   # the IPv6 slice lists no dns-udp
    assert all(a.version == 4 for e in tr.entries if e.vip.version == 4 for a, _, _ in e.backends)
    assert tr.other_family == 0


def _service(name: str, cluster_ips: list[str], **spec) -> dict:
    return {"kind": "Service", "apiVersion": "v1", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                     "ipFamilies": [("IPv6" if ":" in ip else "IPv4") for ip in cluster_ips],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                                "nodePort": 30090}], **spec}}


def _slice(name: str, service: str, family: str, *addresses: tuple[str, bool, str]) -> dict:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": "shop", "labels": {m.SERVICE_NAME_LABEL: service}},
            "addressType": family, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}, "nodeName": node}
                          for a, ready, node in addresses]}


DUAL = [
    _service("dual", ["10.96.9.1", "fd00:10:96::91"], type="LoadBalancer", ipFamilyPolicy="RequireDualStack",
             externalIPs=["10.96.9.2", "2001:db8:9::2"], externalTrafficPolicy="Local"),
    _slice("dual-v4", "dual", "IPv4", ("10.244.1.91", True, "node-a"), ("10.244.2.91", True, "node-b")),
    _slice("dual-v6", "dual", "IPv6", ("fd00:244:1::91", True, "node-a"), ("fd00:244:2::91", True, "node-b"),
           ("fd00:244:1::92", False, "node-a")),
    _service("only4", ["10.96.9.4"], externalIPs=["2001:db8:9::4", "10.96.9.5"]),
    _slice("only4-v6", "only4", "IPv6", ("fd00:244:1::94", True, "node-a")),
    _service("only6", ["fd00:10:96::96"], type="NodePort"),
    _slice("only6-v6", "only6", "IPv6", ("fd00:244:1::96", True, "node-a")),
]


def test_dual_stack_nodeport_external_ips_and_traffic_policy_per_family():
    """RequireDualStack LoadBalancer with externalTrafficPolicy: Local: the
    NodePort on this node's address of each family, external IPs of both
    families, node-local endpoints of the VIP's family only; a not-ready
    IPv6 endpoint drains."""
    w = World("semantics.yaml", extra=DUAL)
    tr = w.tr("dual")
    by_vip = {(str(e.vip), e.port): e for e in tr.entries}
    assert set(by_vip) == {("10.96.9.1", 80), ("fd00:10:96::91", 80), ("10.96.200.1", 30090),
                           ("10.96.200.2", 30090), ("fd00::a", 30090), ("10.96.9.2", 80), ("2001:db8:9::2", 80)}
    assert active(by_vip[("fd00:10:96::91", 80)]) == {"[fd00:244:1::91]:8080", "[fd00:244:2::91]:8080"}
    assert draining(by_vip[("fd00:10:96::91", 80)]) == {"[fd00:244:1::92]:8080"}
    for vip in (("fd00::a", 30090), ("2001:db8:9::2", 80)):         # Local: node-a's endpoints
        assert active(by_vip[vip]) == {"[fd00:244:1::91]:8080"}
    assert active(by_vip[("10.96.9.2", 80)]) == {"10.244.1.91:8080"}
    assert by_vip[("fd00::a", 30090)].name == "shop.dual.http.tcp.node.fd00--a"
    assert tr.skipped == [] and tr.other_family == 0


def test_single_stack_serves_only_its_family():
    """kube-proxy serves a family only for a Service with a clusterIP of it:
    an IPv6 externalIP of an IPv4-only Service is not served (logged and
    counted), its stray IPv6 slice is ignored; an IPv6-only NodePort
    Service listens on this node's IPv6 address only."""
    w = World("semantics.yaml", extra=DUAL)
    tr = w.tr("only4")
    assert {str(e.vip) for e in tr.entries} == {"10.96.9.4", "10.96.9.5"}
    assert tr.other_family == 1
    assert any("2001:db8:9::4" in r and "no clusterIP of this address family" in r for r in tr.skipped)
    assert all(a.version == 4 for e in tr.entries for a, _, _ in e.backends)
    tr6 = w.tr("only6")
    assert {(str(e.vip), e.port) for e in tr6.entries} == {("fd00:10:96::96", 80), ("fd00::a", 30090)}
    assert all(active(e) == {"[fd00:244:1::96]:8080"} for e in tr6.entries)


def test_dual_stack_pods_and_ipv6_blocks_are_identities():
    """A dual-stack pod's identity holds its /32 and its /128; an IPv6
    ipBlock is an identity of its own; an IPv4 block never admits the
    dual-stack pod (its identity cannot be split by family)."""
    pod = {"kind": "Pod", "apiVersion": "v1",
           "metadata": {"name": "client6", "namespace": "shop", "labels": {"app": "client6"}},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.99"}, {"ip": "fd00:244:1::99"}]}}
    pol = {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
           "metadata": {"name": "v6", "namespace": "shop"},
           "spec": {"podSelector": {"matchLabels": {"app": "dual"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8:77::/48",
                                                       "except": ["2001:db8:77:1::/64"]}},
                                          {"ipBlock": {"cidr": "10.244.0.0/16"}},
                                          {"podSelector": {"matchLabels": {"app": "client6"}}}]}]}}
    dual_pods = [{"kind": "Pod", "apiVersion": "v1",
                  "metadata": {"name": f"dual-{i}", "namespace": "shop", "labels": {"app": "dual"}},
                  "status": {"phase": "Running", "podIPs": [{"ip": v4}, {"ip": v6}]}}
                 for i, (v4, v6) in enumerate([("10.244.1.91", "fd00:244:1::91"),
                                               ("10.244.2.91", "fd00:244:2::91")])]
    w = World("semantics.yaml", extra=DUAL + [pod, pol] + dual_pods)
    name = m.pod_identity("shop", (("app", "client6"),))
    assert [str(n) for n in w.identities[name]] == ["10.244.1.99/32", "fd00:244:1::99/128"]
    assert str(w.identities["cidr.2001-db8-77---48"][0]) == "2001:db8:77::/48"
    assert "cidr.2001-db8-77-1---64" in w.identities
    allow = set(w.entry_at("dual", "fd00:10:96::91", "tcp").allow)
    assert {"cidr.2001-db8-77---48", name} <= allow
    assert "cidr.2001-db8-77-1---64" not in allow
    # The IPv4 /16 admits its CIDR identity, not the dual-stack pods inside it.
    assert "cidr.10.244.0.0-16" in allow and m.pod_identity("shop", (("app", "dual"),)) not in allow


def test_tcp_and_udp_ports_are_separate_services(w):
    tcp, udp = w.entry("dns", "cluster", "tcp"), w.entry("dns", "cluster", "udp")
    assert (tcp.protocol, udp.protocol) == ("tcp", "udp")
    assert tcp.key != udp.key and tcp.name != udp.name


def test_sctp_is_reported_unsupported_and_counted(w):
    tr = w.tr("dns")
    assert tr.sctp == 1
    assert any("SCTP is not supported" in r and "sig" in r for r in tr.skipped)
    assert all(e.port != 2905 for e in tr.entries)


def test_session_affinity_client_ip_timeout(w):
    assert w.entry("dns", "cluster").client_affinity_s == 600
    assert to_service(w.entry("dns", "cluster")).client_affinity_s == 600
    assert w.entry("api", "cluster").client_affinity_s is None
    raw = copy.deepcopy(next(o for o in w.raw if o["metadata"]["name"] == "api" and o["kind"] == "Service"))
    raw["spec"]["sessionAffinity"] = "ClientIP"             # no timeout given: kube's default
    assert m.parse("Service", raw).affinity_s == 10800


def test_nodeport_on_this_nodes_ipv4_addresses(w):
    tr = w.tr("web")
    nodes = sorted((str(e.vip), e.port) for e in tr.entries if ".node." in e.name)
    assert nodes == [("10.96.200.1", 30080), ("10.96.200.2", 30080)]   # InternalIP, ExternalIP; not fd00::a
    no_node = World("semantics.yaml", node_name=None).tr("web")
    assert not [e for e in no_node.entries if ".node." in e.name]
    assert any("nodePort 30080" in r for r in no_node.skipped)


def test_loadbalancer_ingress_ip(w):
    e = w.entry("web", "lb")
    assert (str(e.vip), e.port) == ("10.96.150.1", 80)     # the hostname ingress is not an address


def test_external_ips(w):
    e = w.entry("web", "ext")
    assert (str(e.vip), e.port) == ("10.96.100.1", 80)


def test_external_traffic_policy_local_keeps_node_local_endpoints(w):
    for kind in ("node", "lb", "ext"):
        for e in [x for x in w.tr("web").entries if f".{kind}." in x.name]:
            assert active(e) == {"10.244.1.20:8080"}, e.name   # node-a only
    assert active(w.entry("web", "cluster")) == {"10.244.1.20:8080", "10.244.2.20:8080"}


def test_internal_traffic_policy_local_keeps_node_local_endpoints(w):
    assert active(w.entry("cache", "cluster")) == {"10.244.1.30:6379"}


def test_endpoint_conditions_ready_then_serving_terminating_fallback(w):
    e = w.entry("api", "cluster")
    assert active(e) == {"10.244.1.40:8080"}
    assert draining(e) == {"10.244.1.41:8080", "10.244.1.42:8080"}
    # No ready endpoint left: serving+terminating ones take new flows.
    raw = copy.deepcopy(next(o for o in w.raw if o["metadata"]["name"] == "api-1"))
    raw["endpoints"][0]["conditions"] = {"ready": False, "serving": False, "terminating": True}
    svc = w.by["Service"][("shop", "api")]
    e2 = m.translate(svc, [m.parse("EndpointSlice", raw)], w.node, "node-a").entries[0]
    assert active(e2) == {"10.244.1.41:8080"}
    assert draining(e2) == {"10.244.1.40:8080", "10.244.1.42:8080"}


def test_terminating_endpoint_drains_then_removed_endpoint_goes(w):
    raw = copy.deepcopy(next(o for o in w.raw if o["metadata"]["name"] == "api-1"))
    svc = w.by["Service"][("shop", "api")]
    raw["endpoints"][0]["conditions"] = {"ready": True}
    raw["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    e = m.translate(svc, [m.parse("EndpointSlice", raw)], None, None).entries[0]
    assert "10.244.1.41:8080" in draining(e)                  # still in the slice: drains
    del raw["endpoints"][1]
    e = m.translate(svc, [m.parse("EndpointSlice", raw)], None, None).entries[0]
    assert "10.244.1.41:8080" not in active(e) | draining(e)  # gone from the slice: removed


def test_service_without_endpoints_is_kept_with_no_backends(w):
    e = w.entry("empty", "cluster")
    assert e.backends == ()
    assert to_service(e).active_backends == ()


def test_service_selection_headless_and_proxy_name(w):
    s = w.by["Service"]
    assert m.serves(s[("shop", "db")], None) == "headless (clusterIP: None)"
    assert "headless" in m.serves(s[("shop", "labelled-headless")], None)
    assert "other-proxy" in m.serves(s[("shop", "mesh")], None)
    assert "other-proxy" in m.serves(s[("shop", "mesh")], "xdplb")
    assert m.serves(s[("shop", "ours")], None) is not None
    assert m.serves(s[("shop", "ours")], "xdplb") is None
    assert "ExternalName" in m.serves(s[("shop", "ext")], None)
    assert m.serves(s[("shop", "web")], None) is None


def test_load_balancer_source_ranges_allow_list_on_lb_entries_only(w):
    lb = w.entry("web", "lb")
    assert set(lb.allow) == {"cidr.10.1.0.0-24", "cidr.198.51.100.0-24"}
    assert w.identities["cidr.10.1.0.0-24"] == (IPv4Network("10.1.0.0/24"),)
    for kind in ("cluster", "node", "ext"):
        assert all(e.allow is None for e in w.tr("web").entries if f".{kind}." in e.name)


# ---- NetworkPolicy ------------------------------------------------------------


@pytest.fixture(scope="module")
def wp() -> World:
    return World("semantics.yaml", "policies.yaml")


def _pod_ident(wp: World, name: str) -> str:
    pod = next(p for p in wp.by["Pod"].values() if p.name == name)
    return m.pod_identity(pod.namespace, pod.labels)


def test_pod_identity_from_namespace_and_labels(wp):
    a, b = _pod_ident(wp, "client-1"), _pod_ident(wp, "client-2")
    assert a == b                                        # same namespace + labels
    assert a != _pod_ident(wp, "intruder") != _pod_ident(wp, "prom-0")
    assert set(wp.identities[a]) == {IPv4Network("10.244.1.50/32"), IPv4Network("10.244.2.50/32")}
    assert m.pod_identity("shop", (("app", "client"),)) == a     # stable: a hash, no state


def test_networkpolicy_pod_selector(wp):
    allow = set(wp.entry("web", "cluster").allow)
    assert _pod_ident(wp, "client-1") in allow
    assert _pod_ident(wp, "intruder") not in allow       # its rule is for port 9999 only
    assert "world" not in allow                          # unknown sources: denied


def test_networkpolicy_namespace_selector_and_named_port(wp):
    # `from: namespaceSelector team=ops` on port "http" (the service's targetPort name).
    assert _pod_ident(wp, "prom-0") in set(wp.entry("web", "cluster").allow)


def test_networkpolicy_ipblock_with_except(wp):
    allow = set(wp.entry("web", "cluster").allow)
    assert "cidr.10.1.0.0-16" in allow
    assert "cidr.10.1.0.128-25" not in allow             # the except: a more specific prefix, not allowed
    assert wp.identities["cidr.10.1.0.128-25"] == (IPv4Network("10.1.0.128/25"),)
    # The LB source range 10.1.0.0/24 lies inside the block, not in the except: allowed too.
    assert "cidr.10.1.0.0-24" in allow


def test_networkpolicy_ports_restrict_rules(wp):
    # The `app: other` rule admits port 9999 only; the service targets 8080.
    assert _pod_ident(wp, "intruder") not in set(wp.entry("web", "cluster").allow)
    pol = next(iter(wp.by["NetworkPolicy"].values()))
    assert wp.view.allowed(["10.244.1.20"], "TCP", 9999, None) >= {_pod_ident(wp, "intruder")}
    assert pol.ingress[0].ports[0] == m.PolicyPort("TCP", 8080, None)


def test_networkpolicy_and_source_ranges_intersect_on_lb(wp):
    lb = set(wp.entry("web", "lb").allow)
    # ranges (10.1.0.0/24, 198.51.100.0/24) ∩ policy (clients, ops, 10.1.0.0/16 - except)
    assert lb == {"cidr.10.1.0.0-24"}


def test_networkpolicy_unselected_backends_are_unrestricted(wp):
    assert wp.entry("dns", "cluster").allow is None       # no policy selects dns pods
    assert wp.entry("api", "cluster").allow is None


def test_networkpolicy_backends_under_different_policies_intersect():
    extra = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-c", "namespace": "shop",
         "labels": {"app": "canary", "tier": "canary"}}, "status": {"phase": "Running", "podIP": "10.244.1.21"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "canary-only-ops", "namespace": "shop"},
         "spec": {"podSelector": {"matchLabels": {"tier": "canary"}},
                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}},
    ]
    w = World("semantics.yaml", "policies.yaml", extra=extra)
    both = w.view.allowed(["10.244.1.20", "10.244.1.21"], "TCP", 8080, "http")
    assert both == {_pod_ident(w, "prom-0")}               # the only source both pods admit
    front = w.view.allowed(["10.244.1.20"], "TCP", 8080, "http")
    assert _pod_ident(w, "client-1") in front


def test_malformed_objects_raise_bad_object_naming_them():
    with pytest.raises(m.BadObject, match=r"Service shop/bad: spec.ports\[0\].port"):
        m.parse("Service", {"metadata": {"name": "bad", "namespace": "shop"},
                            "spec": {"ports": [{"port": 70000}]}})
    with pytest.raises(m.BadObject, match=r"EndpointSlice shop/s: endpoints\[0\].addresses"):
        m.parse("EndpointSlice", {"metadata": {"name": "s", "namespace": "shop"},
                                  "endpoints": [{"addresses": []}]})
    with pytest.raises(m.BadObject, match=r"NetworkPolicy shop/p: .*operator"):
        m.parse("NetworkPolicy", {"metadata": {"name": "p", "namespace": "shop"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}})
    with pytest.raises(m.BadObject, match="metadata"):
        m.parse("Service", ["not", "a", "mapping"])


def test_long_names_are_shortened_uniquely():
    port = m.SvcPort("a-very-long-port-name", "TCP", 80, None, None)
    a = m.entry_name("namespace-" + "x" * 50, "service-" + "y" * 50, port, "cluster", "10.96.0.1")
    b = m.entry_name("namespace-" + "x" * 50, "service-" + "y" * 50, port, "cluster", "10.96.0.2")
    assert len(a) <= 63 and len(b) <= 63 and a != b


# ---- the `kubernetes:` config block -------------------------------------------------


def test_config_kubernetes_block_validated():
    from lb.config import ConfigError, config_from_dict

    cfg = config_from_dict({"interfaces": ["eth0"], "kubernetes": {
        "kubeconfig": "/etc/xdplb/kubeconfig", "node_name": "node-a", "proxy_name": "xdplb"}})
    assert cfg.kubernetes.node_name == "node-a" and cfg.kubernetes.network_policy is True
    with pytest.raises(ConfigError, match="services: must be empty with kubernetes"):
        config_from_dict({"interfaces": ["eth0"], "kubernetes": {},
                          "services": [{"name": "a", "vip": "10.96.0.1", "port": 80, "protocol": "tcp"}]})
    with pytest.raises(ConfigError, match="kubernetes: unknown key 'nodename'"):
        config_from_dict({"interfaces": ["eth0"], "kubernetes": {"nodename": "x"}})
    with pytest.raises(ConfigError, match="kubeconfig must be an absolute path"):
        config_from_dict({"interfaces": ["eth0"], "kubernetes": {"kubeconfig": "kc"}})


def test_service_client_affinity_range():
    from lb.config import ConfigError, config_from_dict

    svc = {"name": "a", "vip": "10.96.0.1", "port": 80, "protocol": "tcp"}
    assert config_from_dict({"interfaces": ["e"], "services": [{**svc, "client_affinity_s": 86400}]})
    with pytest.raises(ConfigError, match="client_affinity_s must be in 1..86400"):
        config_from_dict({"interfaces": ["e"], "services": [{**svc, "client_affinity_s": 0}]})
