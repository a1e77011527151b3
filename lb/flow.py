"""`xdplb flow`: ask the live program what it would do with one packet.

A dry-run copy of the same object is loaded with `dry_run = 1` and the live
maps; it runs the packet through BPF test-run, creates no conntrack or NAT
state, counts nothing, and writes its decision into its private `probe` map.
"""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from loader.testrun import test_run

from .dataplane import Dataplane
from .endpoint import host_port, parse_address
from .reconcile import forwarding_name

XDP_ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


def craft(src: str, sport: int, dst: str, dport: int, proto: str, dmac: str = "02:00:00:00:00:02") -> bytes:
    """A client's first packet from src:sport to dst:dport, IPv4 or IPv6
    (both addresses of one family, else ValueError), in a frame to `dmac`."""
    s, d = parse_address(src), parse_address(dst)
    if s.version != d.version:
        raise ValueError(f"source {src} and destination {dst} are not of one address family")
    l3 = IP(src=str(s), dst=str(d), ttl=64) if s.version == 4 else IPv6(src=str(s), dst=str(d), hlim=64)
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "tcp" else UDP(sport=sport, dport=dport)
    return bytes(Ether(src="02:00:00:00:00:01", dst=dmac) / l3 / l4)


def probe(dry: Dataplane, rec, src: str, sport: int, dst: str, dport: int, proto: str,
          ingress_ifindex: int = 0) -> dict[str, Any]:
    c = dry.consts
    # Addressed to the ingress interface, as a client's frame is (the
    # program passes frames for another MAC: bpf/xdp/dmac.h).
    own = dry.maps["if_macs"].lookup(ingress_ifindex)
    packet = craft(src, sport, dst, dport, proto, *([bytes(own.addr).hex(":")] if own else []))
    pm = dry.maps["probe"]
    pm.update(0, pm.value_type())
    res = test_run(dry.prog.fd, packet, ingress_ifindex=ingress_ifindex)
    p = pm.lookup(0)
    out = Ether(res.data_out)
    action = XDP_ACTIONS.get(res.retval, str(res.retval))
    ids = {v: k for k, v in rec.identity_ids().items()}
    ids[c.IDENTITY_WORLD] = "world"
    by_id = {s.svc_id: s for s in rec.services.values()}
    svc = by_id.get(p.svc_id)
    backend = None
    if svc:
        backend = next((host_port(b.address, b.port) for b in svc.backends.values() if b.id == p.backend_id),
                       None)
    reason = c.names("drop_reason").get(int(p.reason), "?").removeprefix("DROP_").lower()
    verdict = {"DROP": "DROPPED", "PASS": "PASSED", "TX": "FORWARDED", "REDIRECT": "FORWARDED"}.get(action, action)
    if action == "PASS" and p.svc_id and not p.reason:
        verdict = "FORWARDED"          # kernel finishes it (neighbour not resolved yet)
    result = {
        "action": action, "verdict": verdict,
        "reason": reason if action == "DROP" else None,
        "identity": ids.get(p.identity, str(p.identity)) if p.identity else None,
        "service": svc.name if svc else None,
        "backend": backend, "conntrack_hit": bool(p.ct_hit),
    }
    forwarding = forwarding_name(svc.flags, c) if svc else "nat"
    # The outermost IP header: a 4in6 tunnel also holds an IPv4 one inside.
    outer = next((layer for layer in out.iterpayloads() if isinstance(layer, (IP, IPv6))), None)
    if outer is not None and action != "DROP" and forwarding != "nat":
        # DSR: the packet is not rewritten but sent in a tunnel (the outer header's addresses).
        result["encapsulated"] = {"forwarding": forwarding, "src": outer.src, "dst": outer.dst}
    elif outer is not None and action != "DROP":
        l4 = out[TCP] if TCP in out else out[UDP] if UDP in out else None
        result["rewritten"] = {"src": host_port(outer.src, l4.sport if l4 else ""),
                               "dst": host_port(outer.dst, l4.dport if l4 else "")}
    return result
