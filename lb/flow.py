"""`xdplb flow`: ask the live program what it would do with one packet.

A dry-run copy of the same object is loaded with `dry_run = 1` and the live
maps; it runs the packet through BPF test-run, creates no conntrack or NAT
state, counts nothing, and writes its decision into its private `probe` map.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from loader.testrun import test_run

from .dataplane import Dataplane
from .reconcile import forwarding_name

XDP_ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


def parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT")
    try:
        addr = ipaddress.IPv4Address(host)
        p = int(port)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if not 0 < p < 65536:
        raise ValueError(f"{text!r}: port must be in 1..65535")
    return addr, p


def craft(src: str, sport: int, dst: str, dport: int, proto: str) -> bytes:
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "tcp" else UDP(sport=sport, dport=dport)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst, ttl=64) / l4)


def probe(dry: Dataplane, rec, src: str, sport: int, dst: str, dport: int, proto: str,
          ingress_ifindex: int = 0) -> dict[str, Any]:
    c = dry.consts
    pm = dry.maps["probe"]
    pm.update(0, pm.value_type())
    res = test_run(dry.prog.fd, craft(src, sport, dst, dport, proto), ingress_ifindex=ingress_ifindex)
    p = pm.lookup(0)
    out = Ether(res.data_out)
    action = XDP_ACTIONS.get(res.retval, str(res.retval))
    ids = {v: k for k, v in rec.identity_ids().items()}
    ids[c.IDENTITY_WORLD] = "world"
    by_id = {s.svc_id: s for s in rec.services.values()}
    svc = by_id.get(p.svc_id)
    backend = None
    if svc:
        backend = next((f"{b.address}:{b.port}" for b in svc.backends.values() if b.id == p.backend_id), None)
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
    if IP in out and action != "DROP" and forwarding != "nat":
        # DSR: the packet is not rewritten but sent in a tunnel.
        result["encapsulated"] = {"forwarding": forwarding, "src": out[IP].src, "dst": out[IP].dst}
    elif IP in out and action != "DROP":
        l4 = out[TCP] if TCP in out else out[UDP] if UDP in out else None
        result["rewritten"] = {"src": f"{out[IP].src}:{l4.sport if l4 else ''}",
                               "dst": f"{out[IP].dst}:{l4.dport if l4 else ''}"}
    return result
