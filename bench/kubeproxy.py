"""kube-proxy's rule layouts, written from its documented behaviour
(kubernetes/kubernetes pkg/proxy/iptables and pkg/proxy/nftables; see
shared REFERENCE.md), for the same services the xdplb engine gets.

iptables (nat table, `iptables-restore` input):

    PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per service port
        -d VIP/32 -p udp --dport P -j KUBE-SVC-<hash>
    KUBE-SVC-<hash>: ! -s clusterCIDR -j KUBE-MARK-MASQ, then endpoint i of
        N by `-m statistic --mode random --probability 1/(N-i)` (%0.10f),
        the last one unconditional
    KUBE-SEP-<hash>: -s EP -j KUBE-MARK-MASQ; -j DNAT --to-destination EP:PORT

nftables (`table ip kube-proxy`): one dispatch rule
`ip daddr . meta l4proto . th dport vmap @service-ips`, a chain per service
choosing an endpoint with `numgen random mod N vmap {...}`, and a chain per
endpoint doing the DNAT.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

CHAIN_NAME_MAX = 256     # nftables' NFT_NAME_MAXLEN


@dataclass(frozen=True)
class KService:
    namespace: str
    name: str
    port_name: str
    protocol: str           # "tcp" | "udp"
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]

    @property
    def port_id(self) -> str:
        """kube-proxy's ServicePortName string: "ns/name:portName"."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base


def _b32_sha256(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def port_proto_hash(port_id: str, protocol: str) -> str:
    """base32(sha256("ns/name:portName" + proto))[:16]: KUBE-SVC-<this>."""
    return _b32_sha256(port_id + protocol.lower())[:16]


def svc_chain(s: KService) -> str:
    return "KUBE-SVC-" + port_proto_hash(s.port_id, s.protocol)


def sep_chain(s: KService, ep: tuple[str, int]) -> str:
    return "KUBE-SEP-" + _b32_sha256(s.port_id + s.protocol.lower() + f"{ep[0]}:{ep[1]}")[:16]


# --------------------------------------------------------------------------
# iptables


MARK_MASQ = "0x4000"


def _svc_comment(s: KService) -> str:
    return f'-m comment --comment "{s.port_id} cluster IP"'


def iptables_service_lines(s: KService, cluster_cidr: str) -> tuple[list[str], list[str]]:
    """(chain declarations, rules) of one service's KUBE-SVC and KUBE-SEP chains."""
    proto = s.protocol.lower()
    svc = svc_chain(s)
    chains = [f":{svc} - [0:0]"]
    rules = [f"-A {svc} {_svc_comment(s)} -m {proto} -p {proto} -d {s.vip}/32 --dport {s.port} "
             f"! -s {cluster_cidr} -j KUBE-MARK-MASQ"]
    n = len(s.endpoints)
    for i, ep in enumerate(s.endpoints):
        sep = sep_chain(s, ep)
        chains.append(f":{sep} - [0:0]")
        comment = f'-m comment --comment "{s.port_id} -> {ep[0]}:{ep[1]}"'
        if i < n - 1:
            rules.append(f"-A {svc} {comment} -m statistic --mode random "
                         f"--probability {1.0 / (n - i):0.10f} -j {sep}")
        else:
            rules.append(f"-A {svc} {comment} -j {sep}")
    for ep in s.endpoints:
        sep = sep_chain(s, ep)
        rules.append(f'-A {sep} -m comment --comment "{s.port_id}" -s {ep[0]}/32 -j KUBE-MARK-MASQ')
        rules.append(f'-A {sep} -m comment --comment "{s.port_id}" -m {proto} -p {proto} '
                     f"-j DNAT --to-destination {ep[0]}:{ep[1]}")
    return chains, rules


def _kube_services_rules(services: list[KService]) -> list[str]:
    proto = lambda s: s.protocol.lower()  # noqa: E731
    rules = [f"-A KUBE-SERVICES {_svc_comment(s)} -m {proto(s)} -p {proto(s)} -d {s.vip}/32 "
             f"--dport {s.port} -j {svc_chain(s)}" for s in services]
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
                 'must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    return rules


def iptables_full(services: list[KService], cluster_cidr: str) -> str:
    """The whole nat table, as kube-proxy's full sync writes it."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
              ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-POSTROUTING -m mark ! --mark {MARK_MASQ}/{MARK_MASQ} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MARK_MASQ}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MARK_MASQ}",
    ]
    for s in services:
        c, r = iptables_service_lines(s, cluster_cidr)
        chains += c
        rules += r
    rules += _kube_services_rules(services)
    return "\n".join(["*nat", *chains, *rules, "COMMIT", ""])


def iptables_update(services: list[KService], changed: list[KService], stale_chains: list[str],
                    cluster_cidr: str) -> str:
    """`iptables-restore --noflush` input of one sync, as kube-proxy (>= 1.28)
    writes it: the changed services' chains are rewritten, chains nothing
    uses any more are flushed and deleted, and KUBE-SERVICES (the whole
    dispatch list) is rewritten every time. `services` is the new full list."""
    chains = [":KUBE-SERVICES - [0:0]"]
    rules: list[str] = []
    for s in changed:
        c, r = iptables_service_lines(s, cluster_cidr)
        chains += c           # ":CHAIN - [0:0]" on an existing chain flushes it
        rules += r
    chains += [f":{c} - [0:0]" for c in stale_chains]
    rules += _kube_services_rules(services)
    return "\n".join(["*nat", *chains, *rules, *(f"-X {c}" for c in stale_chains), "COMMIT", ""])


def iptables_chains(s: KService) -> list[str]:
    """Every chain that belongs to one service."""
    return [svc_chain(s)] + [sep_chain(s, ep) for ep in s.endpoints]


# --------------------------------------------------------------------------
# nftables


NFT_TABLE = "kube-proxy"


def _hash_truncate(name: str) -> str:
    """kube-proxy's nftables chain naming: base32 hash prefix, then the name,
    cut to the maximum chain name length."""
    out = _b32_sha256(name)[:8] + "-" + name
    if len(out) > CHAIN_NAME_MAX - 16:
        out = out[:CHAIN_NAME_MAX - 16 - 3] + "..."
    return out


def nft_svc_base(s: KService) -> str:
    return _hash_truncate(f"{s.namespace}/{s.name}/{s.protocol.lower()}/{s.port_name}")


def nft_service_chain(s: KService) -> str:
    return "service-" + nft_svc_base(s)


def nft_endpoint_chain(s: KService, ep: tuple[str, int]) -> str:
    base = f"{s.namespace}/{s.name}/{s.protocol.lower()}/{s.port_name}__{ep[0]}/{ep[1]}"
    return "endpoint-" + _hash_truncate(base)


def _q(name: str) -> str:
    """Chain names go unquoted: nft's identifiers allow `/` and `.`, and nft
    1.0.6 does not take quoted chain names."""
    return name


def nft_service_objects(s: KService, cluster_cidr: str) -> list[str]:
    """`add`/`flush` commands creating or rewriting one service's chains
    (the caller adds its service-ips element)."""
    t = f"ip {NFT_TABLE}"
    proto = s.protocol.lower()
    sc = nft_service_chain(s)
    out: list[str] = []
    for ep in s.endpoints:
        ec = nft_endpoint_chain(s, ep)
        out += [f"add chain {t} {_q(ec)}", f"flush chain {t} {_q(ec)}",
                f"add rule {t} {_q(ec)} ip saddr {ep[0]} jump mark-for-masquerade",
                f"add rule {t} {_q(ec)} meta l4proto {proto} dnat to {ep[0]}:{ep[1]}"]
    out += [f"add chain {t} {_q(sc)}", f"flush chain {t} {_q(sc)}",
            f"add rule {t} {_q(sc)} ip daddr {s.vip} {proto} dport {s.port} "
            f"ip saddr != {cluster_cidr} jump mark-for-masquerade"]
    if s.endpoints:
        arms = ", ".join(f"{i} : goto {_q(nft_endpoint_chain(s, ep))}"
                         for i, ep in enumerate(s.endpoints))
        out.append(f"add rule {t} {_q(sc)} numgen random mod {len(s.endpoints)} vmap {{ {arms} }}")
    return out


def _element(s: KService) -> str:
    return f"{s.vip} . {s.protocol.lower()} . {s.port} : goto {_q(nft_service_chain(s))}"


def nft_full(services: list[KService], cluster_cidr: str) -> str:
    """The whole table, as one `nft -f` transaction (the table is created or
    flushed first)."""
    t = f"ip {NFT_TABLE}"
    out = [
        f"add table {t} {{ comment \"rules for kube-proxy\" ; }}",
        f"flush table {t}",
        f"add chain {t} mark-for-masquerade",
        f"add rule {t} mark-for-masquerade mark set mark or {MARK_MASQ}",
        f"add chain {t} masquerading",
        f"add rule {t} masquerading mark and {MARK_MASQ} == 0 return",
        f"add rule {t} masquerading mark set mark xor {MARK_MASQ}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        f"comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}",
        f"add chain {t} services",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add rule {t} nat-prerouting jump services",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add rule {t} nat-output jump services",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add rule {t} nat-postrouting jump masquerading",
    ]
    for s in services:
        out += nft_service_objects(s, cluster_cidr)
    # Elements in chunks: one huge line is slow for nft's parser.
    for i in range(0, len(services), 1000):
        chunk = services[i:i + 1000]
        out.append(f"add element {t} service-ips {{ {', '.join(_element(s) for s in chunk)} }}")
    return "\n".join(out) + "\n"


def nft_update(changed: list[KService], removed: list[KService], old: dict[str, KService],
               cluster_cidr: str) -> str:
    """One `nft -f` transaction with only the changed objects. `old` maps a
    changed service's port_id to its previous version (absent for new ones)."""
    t = f"ip {NFT_TABLE}"
    out: list[str] = []
    for s in changed:
        out += nft_service_objects(s, cluster_cidr)
        prev = old.get(s.port_id)
        if prev is None:
            out.append(f"add element {t} service-ips {{ {_element(s)} }}")
        else:
            for ep in set(prev.endpoints) - set(s.endpoints):
                ec = nft_endpoint_chain(prev, ep)
                out += [f"flush chain {t} {_q(ec)}", f"delete chain {t} {_q(ec)}"]
    for s in removed:
        out.append(f"delete element {t} service-ips {{ {s.vip} . {s.protocol.lower()} . {s.port} }}")
        sc = nft_service_chain(s)
        out += [f"flush chain {t} {_q(sc)}", f"delete chain {t} {_q(sc)}"]
        for ep in s.endpoints:
            ec = nft_endpoint_chain(s, ep)
            out += [f"flush chain {t} {_q(ec)}", f"delete chain {t} {_q(ec)}"]
    return "\n".join(out) + "\n"
