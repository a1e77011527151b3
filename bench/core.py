"""Core figures of xdplb alone, from the benchmark harness's pieces.

    python -m bench.core [--services 1 20000] [--backends 3] [--json out.json]
    python -m bench.core --services 1 --forwarding nat ipip gue --rounds 3 --updates 0

For each service count, on the harness's gen -> lb -> sink lab:
- program ns/packet through BPF test-run, one packet per call (so every
  call starts from the original packet), median of many calls: new flows
  (a new flow each call: conntrack miss, Maglev, conntrack and NAT inserts)
  and established flows (the same flow), to the last service;
- full apply time of N services;
- single-service update latency (one endpoint replaced in a random
  service), p50/p99, through Reconciler.upsert_service; with
  --compare-paths, the same updates alternately through the one-service
  path (lb/single.py) and the batch path, in blocks of 100, side by side.

With --forwarding, every service is NAT (gateway mode), ipip or gue (DSR:
the packet leaves in a tunnel), one lab per mode, the modes alternated
over --rounds. --interleaved measures the modes closer still: one lab and
one program with a service of each mode, their packets taking turns.

`xdplb bench` measures all of this and more, next to kube-proxy's layouts;
this is the quick look at xdplb alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path

from lb.lab import Lab

from . import lab as blab
from . import profile as prof
from .engines import XdplbEngine, make_services, replace_endpoint
from .progs import Forwarder, build
from .traffic import testrun_ns, testrun_ns_interleaved


def measure(n: int, backends: int, updates: int = 1000, calls: int = 20000, compare: bool = False,
            forwarding: str = "nat") -> dict:
    with Lab(prefix="xb") as lab:
        bl = blab.build(lab)
        eng = XdplbEngine(bl, forwarding=forwarding)
        floor = Forwarder("empty_main")
        try:
            services = make_services(n, backends, "udp")
            sync = eng.full_sync(services)
            last = services[-1]
            spec = {flows: prof.load("udp_flows", {"vip": last.vip, "port": last.port, "stamp": last.stamp,
                                                   "src_mac": bl.g0_mac, "dst_mac": bl.l0_mac,
                                                   "flows": flows})[0] for flows in (0, 1)}
            fd = eng.program_fd()
            new_ns = testrun_ns(bl, fd, spec[0], calls, new_flows=True)
            est_ns = testrun_ns(bl, fd, spec[1], calls, new_flows=False)
            floor_ns = testrun_ns(bl, floor.prog.fd, spec[1], calls, new_flows=False)
            rng, current = random.Random(1), list(services)
            per_path: dict[bool, list[float]] = {True: [], False: []}
            for k in range(updates * (2 if compare else 1)):
                one_service = not compare or (k // 100) % 2 == 0
                eng.rec.one_service_path = one_service
                i = rng.randrange(n)
                new = replace_endpoint(current[i], k)
                per_path[one_service].append(eng.update(current[i], new))
                current[i] = new
            eng.rec.one_service_path = True
            lat = sorted(per_path[True])
            batch = sorted(per_path[False])
            return {"services": n, "backends_per_service": backends, "forwarding": forwarding,
                    "full_apply_s": sync.seconds,
                    "apply_detail": sync.detail, "new_flow_ns": new_ns, "established_ns": est_ns,
                    "testrun_floor_ns": floor_ns, "calls": calls,
                    "update_p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
                    "update_p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None, "updates": updates,
                    **({"batch_path_update_p50_ms": 1e3 * batch[len(batch) // 2],
                        "batch_path_update_p99_ms": 1e3 * batch[int(len(batch) * 0.99)]} if batch else {}),
                    "memory": {k: v for k, v in eng.memory().items() if k != "source"}}
        finally:
            floor.close()
            eng.close()


def interleaved(modes: list[str], backends: int, calls: int = 20000) -> dict:
    """New-flow and established ns/pkt of one service per forwarding mode,
    in one program, packets of the modes taking turns."""
    with Lab(prefix="xb") as lab:
        bl = blab.build(lab)
        eng = XdplbEngine(bl, forwarding=tuple(modes))
        try:
            services = make_services(len(modes), backends, "udp")
            eng.full_sync(services)
            fd = eng.program_fd()
            out = {}
            for flows, kind in ((0, "new_flow_ns"), (1, "established_ns")):
                specs = {m: prof.load("udp_flows", {"vip": s.vip, "port": s.port, "stamp": s.stamp,
                                                    "src_mac": bl.g0_mac, "dst_mac": bl.l0_mac,
                                                    "flows": flows})[0]
                         for m, s in zip(modes, services)}
                out[kind] = testrun_ns_interleaved(bl, fd, specs, calls, new_flows=flows == 0)
            return {"backends_per_service": backends, "calls": calls, **out}
        finally:
            eng.close()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, nargs="+", default=[1, 20000])
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--compare-paths", action="store_true",
                   help="also the batch path for the same kind of updates, alternating in blocks of 100")
    p.add_argument("--forwarding", nargs="+", choices=["nat", "ipip", "gue"], default=["nat"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--interleaved", action="store_true",
                   help="one program, a service per --forwarding mode, packets taking turns")
    p.add_argument("--json")
    a = p.parse_args(argv)
    build()
    if a.interleaved:
        rounds = [interleaved(a.forwarding, a.backends) for _ in range(a.rounds)]
        print("| round | " + " | ".join(f"{m} new-flow ns | {m} established ns" for m in a.forwarding) + " |")
        print("|---|" + "---|---|" * len(a.forwarding))
        for i, r in enumerate(rounds, 1):
            print(f"| {i} | " + " | ".join(f"{r['new_flow_ns'][m]:.0f} | {r['established_ns'][m]:.0f}"
                                           for m in a.forwarding) + " |")
        if a.json:
            Path(a.json).write_text(json.dumps({"interleaved": rounds}, indent=2))
        return 0
    rows = [measure(n, a.backends, a.updates, compare=a.compare_paths, forwarding=f)
            for _ in range(a.rounds) for n in a.services for f in a.forwarding]
    out = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "results": rows}
    print("| services | backends | forwarding | full apply s | new-flow ns/pkt | established ns/pkt | "
          "floor ns | update p50 ms | update p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']} | {r['backends_per_service']} | {r['forwarding']} | "
              f"{r['full_apply_s']:.3f} | {r['new_flow_ns']:.0f} | "
              f"{r['established_ns']:.0f} | {r['testrun_floor_ns']:.0f} | {_ms(r['update_p50_ms'])} | "
              f"{_ms(r['update_p99_ms'])} |")
    for r in rows:
        if "batch_path_update_p50_ms" in r:
            print(f"{r['services']} services: update p50 / p99 {r['update_p50_ms']:.3f} / {r['update_p99_ms']:.3f} ms "
                  f"(one-service path), {r['batch_path_update_p50_ms']:.3f} / {r['batch_path_update_p99_ms']:.3f} ms "
                  f"(batch path), same run")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
