"""New flows over the flood guard's rate: how many reach a backend, and what
each costs, for builds of xdplb side by side.

    python -m bench.overflow [--before OBJ] [--rounds 4] [--seconds 2] [--out FILE]

The setup of issue 13's table: one VIP with 10 backends, UDP, every packet
a new flow (profile udp_flows), sent by the in-kernel generator on the
harness's gen -> lb -> sink lab (bench.sweep.Session; the sink checks each
packet's backend). Rows, each on its own lab:

- this tree's build and `--before OBJ` (an older build of xdplb.o, e.g. the
  parent commit's), each with the default flood_guard and with it off;
- this tree's build in SNAT mode with the default guard, where new flows
  over the rate are still dropped: its delivered rate is the rate at which
  the drops start.

A window per row, one row after another, every other round in reverse
order, `--rounds` times, so that the load of a shared machine falls on all
rows alike. Per window: the share of offered packets that reached a
backend, the delivered rate, and program ns/packet from the kernel's run
statistics. The summary gives medians and, for ns/packet, the round-by-round
ratio to the first row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from lb.config import FloodGuard

from . import traffic
from .engines import make_service
from .progs import build
from .sweep import Session, Settings

BACKENDS = 10
GUARD = FloodGuard().model_dump()
OFF = {"new_flows_per_second": 0}
SNAT_ADDRESS = "10.3.0.1"          # the lb's address towards the sink (bench/lab.py)


def rows(before: Path | None) -> list[dict]:
    out = [{"name": "this build, default guard", "object": None, "settings": {"flood_guard": GUARD}}]
    if before:
        out.append({"name": "--before, default guard", "object": before, "settings": {"flood_guard": GUARD}})
    out.append({"name": "this build, guard off", "object": None, "settings": {"flood_guard": OFF}})
    if before:
        out.append({"name": "--before, guard off", "object": before, "settings": {"flood_guard": OFF}})
    out.append({"name": "this build, SNAT, default guard", "object": None,
                "settings": {"flood_guard": GUARD, "snat_address": SNAT_ADDRESS}})
    return out


def counters(dp) -> dict[str, int]:
    """What the program did with new flows: with state, without, dropped."""
    c = dp.consts
    glob, drops = dp.maps["global_stats"], dp.maps["drop_stats"]
    return {"with_state": sum(v.packets for v in glob.lookup(c.CNT_CT_NEW)),
            "stateless": sum(v.packets for v in glob.lookup(c.CNT_GUARD_STATELESS)),
            "guard_drops": sum(v.packets for v in drops.lookup(c.DROP_NEW_FLOW_RATE))}


def run(before: Path | None, rounds: int, seconds: float) -> dict:
    build()
    settings = Settings(endpoints=BACKENDS, profile="udp_flows", proto="udp")
    svc = make_service(0, BACKENDS, "udp")
    plan = rows(before)
    with contextlib.ExitStack() as stack:
        live = []
        for row in plan:
            sess = stack.enter_context(contextlib.closing(Session(settings, "xdplb")))
            sess.engine.object_path, sess.engine.settings = row["object"], row["settings"]
            sess.allow([svc])
            sess.engine.full_sync([svc])
            row["windows"] = []
            live.append((row, sess, sess.spec(svc, 0)))
        for r in range(rounds):
            for row, sess, spec in live if r % 2 == 0 else live[::-1]:
                c0 = counters(sess.engine.dp)
                # Open loop (window 0): a flood does not wait for the sink.
                m = traffic.program_ns_under_load(sess.bl, sess.gen, sess.sink, spec,
                                                  {"engine": sess.engine.program_fd()}, seconds, window=0)
                c1 = counters(sess.engine.dp)
                row["windows"].append({"ns_per_packet": m["engine"]["ns_per_packet"],
                                       "runs": m["engine"]["runs"], **m["rate"],
                                       **{k: c1[k] - c0[k] for k in c1}})
    first = plan[0]["windows"]
    for row in plan:
        ws = row["windows"]
        row["object"] = str(row["object"] or "bpf/xdp/xdplb.o")
        total = lambda k: sum(w[k] for w in ws)          # noqa: E731
        row["summary"] = {
            "ns_median": statistics.median(w["ns_per_packet"] for w in ws),
            # Of what reached the program: forwarded with state, without, dropped by the guard.
            "forwarded_share": (total("with_state") + total("stateless")) / max(1, total("runs")),
            "stateless_share": total("stateless") / max(1, total("runs")),
            "guard_drop_share": total("guard_drops") / max(1, total("runs")),
            "with_state_per_s": statistics.median(w["with_state"] / w["seconds"] for w in ws),
            "delivered_share": total("delivered") / max(1, total("offered")),
            "offered_mpps": statistics.median(w["offered_mpps"] for w in ws),
            "delivered_mpps": statistics.median(w["delivered_mpps"] for w in ws),
            "misrouted": sum(w["misrouted"] for w in ws),
            "ns_ratio_to_first": [round(w["ns_per_packet"] / f["ns_per_packet"], 3)
                                  for w, f in zip(ws, first)]}
    return {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "backends": BACKENDS, "rounds": rounds, "seconds": seconds, "guard": GUARD, "rows": plan}


def markdown(res: dict) -> list[str]:
    lines = ["| row | ns/pkt (median) | ÷ first row, per round | offered Mpps | reached the program: "
             "forwarded (stateless) / guard drops | new flows with state /s | delivered Mpps (share of offered) "
             "| misrouted |", "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        s = row["summary"]
        ratios = ", ".join(f"{x:.2f}" for x in s["ns_ratio_to_first"])
        lines.append(f"| {row['name']} | {s['ns_median']:.0f} | {ratios} | {s['offered_mpps']:.3f} | "
                     f"{s['forwarded_share']:.1%} ({s['stateless_share']:.1%}) / {s['guard_drop_share']:.1%} | "
                     f"{s['with_state_per_s']:,.0f} | {s['delivered_mpps']:.3f} ({s['delivered_share']:.1%}) | "
                     f"{s['misrouted']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overflow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="an older build of bpf/xdp/xdplb.o to measure beside this one")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/overflow.json"))
    a = ap.parse_args(argv)
    if a.before and not a.before.is_file():
        print(f"error: --before {a.before}: no such file", file=sys.stderr)
        return 2
    res = run(a.before, a.rounds, a.seconds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(markdown(res)))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
