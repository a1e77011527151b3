"""Core figures of the data and control plane, measured on the netns lab.

    python -m bench.core [--services 1 20000] [--backends 3] [--json out.json]

- program ns/packet through BPF test-run, one packet per call (so every
  call starts from the original packet: no self-rewritten input), median of
  many calls: new flows (a new source port each call: conntrack miss,
  Maglev, conntrack and NAT inserts) and established flows (the same flow);
- full apply time of N services;
- single-service update latency (change one service's backends), p50/p99,
  in the reconciler and end to end through the Unix-socket API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from lb.config import config_from_dict
from lb.dataplane import Dataplane
from lb.demo import filler_vip
from lb.lab import Lab, build_lb_lab, warm_neighbours
from lb.reconcile import Reconciler
from loader.testrun import test_run


def services_config(topo, n: int, backends_per_service: int, bpffs: str) -> dict:
    bk = [f"10.244.{1 + i % len(topo.backends)}.{2 + i // len(topo.backends)}:8080"
          for i in range(backends_per_service)]
    return {
        "interfaces": [i.name for i in topo.lb_ifaces], "bpffs": bpffs,
        "limits": {"maglev_slots": max(1 << 22, n * 1100 * max(1, backends_per_service) // 3)},
        "services": [{"name": f"s{i}", "vip": filler_vip(i), "port": 80, "protocol": "tcp",
                      "backends": bk} for i in range(n)],
    }


def packet(src_port: int, vip: str) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                 IP(src="10.1.0.10", dst=vip) / TCP(sport=src_port, dport=80, flags="S"))


def ns_per_packet(lab, topo, prog_fd: int, vip: str, calls: int = 20000) -> dict:
    ifindex = topo.lb_client.ifindex
    base = packet(1, vip)
    fixed = packet(55555, vip)
    new, est = [], []
    with lab.inside(topo.lb_ns):
        test_run(prog_fd, fixed, ingress_ifindex=ifindex)          # create the flow
        for i in range(calls):
            sport = 1024 + i % 60000
            pkt = base[:34] + sport.to_bytes(2, "big") + base[36:]   # a new flow each call
            new.append(test_run(prog_fd, pkt, ingress_ifindex=ifindex).duration_ns)
            est.append(test_run(prog_fd, fixed, ingress_ifindex=ifindex).duration_ns)
    return {"new_flow_ns": statistics.median(new), "established_ns": statistics.median(est),
            "calls": calls}


def measure(n: int, backends: int, updates: int = 1000) -> dict:
    bpffs = f"/sys/fs/bpf/xdplb-bench-{os.getpid()}-{n}"
    with Lab() as lab:
        topo = build_lb_lab(lab, 3)
        warm_neighbours(topo)
        cfg = config_from_dict(services_config(topo, n, backends, bpffs))
        dp = Dataplane.open(cfg)
        try:
            rec = Reconciler(dp)
            t0 = time.perf_counter()
            res = rec.apply(cfg)
            full = time.perf_counter() - t0
            with lab.inside(topo.lb_ns):
                dp.attach(cfg.interfaces)
            vip = filler_vip(n - 1)                   # the last service
            nspp = ns_per_packet(lab, topo, dp.prog.fd, vip)
            lat = []
            rnd = random.Random(1)
            services = list(cfg.services)
            for k in range(updates):
                i = rnd.randrange(n)
                svc = services[i]
                bk = list(svc.backends)
                bk[0] = bk[0].model_copy(update={"port": 8000 + k % 1000})
                new = svc.model_copy(update={"backends": tuple(bk)})
                services[i] = new
                t0 = time.perf_counter()
                rec.upsert_service(cfg, new)
                lat.append(time.perf_counter() - t0)
            lat.sort()
            return {"services": n, "backends_per_service": backends, "full_apply_s": full,
                    "apply_result": res.as_dict(), **nspp,
                    "update_p50_ms": 1e3 * lat[len(lat) // 2],
                    "update_p99_ms": 1e3 * lat[int(len(lat) * 0.99)], "updates": updates,
                    "map_memlock_bytes": sum(m.memlock() for m in dp.maps.values())}
        finally:
            dp.close()
            Dataplane.detach(Path(bpffs), purge=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, nargs="+", default=[1, 20000])
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--json")
    a = p.parse_args(argv)
    rows = [measure(n, a.backends, a.updates) for n in a.services]
    out = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "results": rows}
    print("| services | backends | full apply s | new-flow ns/pkt | established ns/pkt | update p50 ms | update p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']} | {r['backends_per_service']} | {r['full_apply_s']:.3f} | {r['new_flow_ns']:.0f} | "
              f"{r['established_ns']:.0f} | {r['update_p50_ms']:.3f} | {r['update_p99_ms']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
