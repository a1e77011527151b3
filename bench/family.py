"""IPv6 beside IPv4: the program's time per packet, in one lab and one program.

    python -m bench.family [--rounds 5] [--calls 2000] [--v4-only] [--dsr]

A Lab(ipv6=True) with 3 backends; one TCP service per family (10.96.0.10
and fd00:96::10, gateway mode), and with --dsr one per family and DSR mode
too (ipip and gue: 6in6 and 4in4). Per round and row, BPF test-run, one
packet per call, the kernel's own duration: new flows (a new source port
each call: conntrack miss, Maglev, conntrack insert) and established ones
(the same flow). Rows alternate every round, so a busy neighbour moves
them all. Prints the medians, the IPv6 / IPv4 ratios per mode and the DSR /
NAT ratios per family. --v4-only measures
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
# (mode, IPv6?) -> VIP; DSR services serve the backends' port (8080).
VIPS = {("nat", False): VIP4, ("nat", True): VIP6,
        ("ipip", False): "10.96.0.20", ("ipip", True): "fd00:96::20",
        ("gue", False): "10.96.0.21", ("gue", True): "fd00:96::21"}


def _config(topo, bpffs: str, rows) -> dict:
    services = []
    for mode, v6 in rows:
        backends = [f"[{b.ip6}]:{topo.backend_port}" if v6 else f"{b.ip}:{topo.backend_port}"
                    for b in topo.backends]
        services.append({"name": f"{mode}{6 if v6 else 4}", "vip": VIPS[(mode, v6)],
                         "port": 80 if mode == "nat" else topo.backend_port, "protocol": "tcp",
                         "backends": backends, "forwarding": mode})
    return {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": bpffs,
            "api_socket": f"/run/xdplb/family-{os.getpid()}.sock", "metrics_address": False,
            "encap_source": ["10.255.0.1", "fd00:255::1"],
            "flood_guard": {"new_flows_per_second": 0}, "services": services}


def _hello(lab: Lab, ns: str, to: str, family: int) -> None:
    """A real datagram to the LB: the LB learns the sender (ARP/ND)."""
    with lab.inside(ns), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (to, 9))


def _packet(row: tuple[str, bool], sport: int, port: int) -> bytes:
    mode, v6 = row
    vip = VIPS[row]
    ip = IPv6(src="fd00:1::10", dst=vip) if v6 else IP(src="10.1.0.10", dst=vip)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip /
                 TCP(sport=sport, dport=80 if mode == "nat" else port, flags="S"))


def _name(row: tuple[str, bool]) -> str:
    return f"{'IPv6' if row[1] else 'IPv4'}{'' if row[0] == 'nat' else ' ' + row[0]}"


def _median_ns(fd: int, ifindex: int, packets) -> float:
    return statistics.median(test_run(fd, p, ingress_ifindex=ifindex).duration_ns for p in packets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--v4-only", action="store_true")
    ap.add_argument("--dsr", action="store_true", help="DSR rows too (ipip, gue), each family")
    a = ap.parse_args()
    families = [False] if a.v4_only else [False, True]
    rows = [(m, f) for m in (("nat", "ipip", "gue") if a.dsr else ("nat",)) for f in families]
    bpffs = f"/sys/fs/bpf/xdplb-family-{os.getpid()}"
    res: dict[tuple[tuple[str, bool], str], list[float]] = {(r, k): [] for r in rows for k in ("new", "est")}
    with Lab(ipv6=True) as lab:
        topo = build_lb_lab(lab, 3)
        port = topo.backend_port
        cfg = config_from_dict(_config(topo, bpffs, rows))
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
                for row in rows:         # measured only if forwarded (XDP_REDIRECT)
                    rc = test_run(fd, _packet(row, 1, port), ingress_ifindex=l0).retval
                    if rc != 4:
                        raise SystemExit(f"{_name(row)} packet not forwarded: verdict {rc}")
                for _ in range(a.rounds):
                    for row in rows:
                        new = [_packet(row, sport + k, port) for k in range(a.calls)]
                        sport += a.calls
                        res[(row, "new")].append(_median_ns(fd, l0, new))
                        res[(row, "est")].append(_median_ns(fd, l0, [new[0]] * a.calls))
        finally:
            dp.close()
            Dataplane.detach(__import__("pathlib").Path(bpffs), purge=True)
    for row in rows:
        print(f"{_name(row)}: new-flow {statistics.median(res[(row, 'new')]):.0f} ns/pkt, "
              f"established {statistics.median(res[(row, 'est')]):.0f} ns/pkt "
              f"(rounds: new {[round(x) for x in res[(row, 'new')]]}, est {[round(x) for x in res[(row, 'est')]]})")

    def ratios(label: str, num, den) -> None:
        for k in ("new", "est"):
            r = [b / a_ for a_, b in zip(res[(den, k)], res[(num, k)])]
            print(f"{label} {k}: median ratio {statistics.median(r):.2f} (per round {[round(x, 2) for x in r]})")
    for mode in dict.fromkeys(m for m, _ in rows):
        if not a.v4_only:
            ratios(f"IPv6/IPv4{'' if mode == 'nat' else ' ' + mode}", (mode, True), (mode, False))
        if mode != "nat":
            for v6 in families:
                ratios(f"{mode}/NAT {'IPv6' if v6 else 'IPv4'}", (mode, v6), ("nat", v6))


if __name__ == "__main__":
    main()
