"""IPv6 beside IPv4: the program's time per packet, in one lab and one program.

    python -m bench.family [--rounds 5] [--calls 2000] [--v4-only]

A Lab(ipv6=True) with 3 backends; one TCP service per family (10.96.0.10
and fd00:96::10, gateway mode). Per round and family, BPF test-run, one
packet per call, the kernel's own duration: new flows (a new source port
each call: conntrack miss, Maglev, conntrack insert) and established ones
(the same flow). Families alternate every round, so a busy neighbour moves
both. Prints the medians and the IPv6 / IPv4 ratios. --v4-only measures
IPv4 alone, for an object without IPv6 (XDPLB_OBJECT=old.o): the IPv4 cost
before and after, side by side, is two runs of this alternated.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.config import config_from_dict
from lb.dataplane import Dataplane
from lb.lab import Lab, build_lb_lab
from lb.reconcile import Reconciler
from loader.testrun import test_run

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"


def _config(topo, bpffs: str, v6: bool) -> dict:
    services = [{"name": "web", "vip": VIP4, "port": 80, "protocol": "tcp",
                 "backends": [f"{b.ip}:{topo.backend_port}" for b in topo.backends]}]
    if v6:
        services.append({"name": "web6", "vip": VIP6, "port": 80, "protocol": "tcp",
                         "backends": [f"[{b.ip6}]:{topo.backend_port}" for b in topo.backends]})
    return {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": bpffs,
            "api_socket": f"/run/xdplb/family-{os.getpid()}.sock", "metrics_address": False,
            "flood_guard": {"new_flows_per_second": 0}, "services": services}


def _hello(lab: Lab, ns: str, to: str, family: int) -> None:
    """A real datagram to the LB: the LB learns the sender (ARP/ND)."""
    with lab.inside(ns), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (to, 9))


def _packet(v6: bool, sport: int) -> bytes:
    ip = IPv6(src="fd00:1::10", dst=VIP6) if v6 else IP(src="10.1.0.10", dst=VIP4)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip /
                 TCP(sport=sport, dport=80, flags="S"))


def _median_ns(fd: int, ifindex: int, packets) -> float:
    return statistics.median(test_run(fd, p, ingress_ifindex=ifindex).duration_ns for p in packets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--v4-only", action="store_true")
    a = ap.parse_args()
    families = [False] if a.v4_only else [False, True]
    bpffs = f"/sys/fs/bpf/xdplb-family-{os.getpid()}"
    res: dict[tuple[bool, str], list[float]] = {(f, k): [] for f in families for k in ("new", "est")}
    with Lab(ipv6=True) as lab:
        topo = build_lb_lab(lab, 3)
        cfg = config_from_dict(_config(topo, bpffs, not a.v4_only))
        dp = Dataplane.open(cfg)
        try:
            Reconciler(dp).apply(cfg)
            with lab.inside(topo.lb_ns):
                for i in topo.lb_ifaces:
                    dp.maps["tx_ports"].update(i.ifindex, i.ifindex)
            _hello(lab, topo.client_ns, "10.1.0.1", socket.AF_INET)
            _hello(lab, topo.client_ns, "fd00:1::1", socket.AF_INET6)
            for b in topo.backends:
                _hello(lab, b.ns, b.gateway, socket.AF_INET)
                _hello(lab, b.ns, b.gateway6, socket.AF_INET6)
            time.sleep(0.3)
            fd, l0 = dp.prog.fd, topo.lb_client.ifindex
            sport = 1024
            with lab.inside(topo.lb_ns):
                for v6 in families:      # measured only if forwarded (XDP_REDIRECT)
                    rc = test_run(fd, _packet(v6, 1), ingress_ifindex=l0).retval
                    if rc != 4:
                        raise SystemExit(f"{'IPv6' if v6 else 'IPv4'} packet not forwarded: verdict {rc}")
                for _ in range(a.rounds):
                    for v6 in families:
                        new = [_packet(v6, sport + k) for k in range(a.calls)]
                        sport += a.calls
                        res[(v6, "new")].append(_median_ns(fd, l0, new))
                        res[(v6, "est")].append(_median_ns(fd, l0, [new[0]] * a.calls))
        finally:
            dp.close()
            Dataplane.detach(__import__("pathlib").Path(bpffs), purge=True)
    for v6 in families:
        name = "IPv6" if v6 else "IPv4"
        print(f"{name}: new-flow {statistics.median(res[(v6, 'new')]):.0f} ns/pkt, "
              f"established {statistics.median(res[(v6, 'est')]):.0f} ns/pkt "
              f"(rounds: new {[round(x) for x in res[(v6, 'new')]]}, est {[round(x) for x in res[(v6, 'est')]]})")
    if not a.v4_only:
        for k in ("new", "est"):
            r = [b / a_ for a_, b in zip(res[(False, k)], res[(True, k)])]
            print(f"IPv6/IPv4 {k}: median ratio {statistics.median(r):.2f} (per round {[round(x, 2) for x in r]})")


if __name__ == "__main__":
    main()
