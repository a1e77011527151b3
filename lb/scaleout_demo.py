"""`xdplb demo --nodes N`: N xdplb nodes behind a BIRD 2 router doing ECMP.

It builds lb/scaleout_lab.py's lab, shows the router's multipath route for
the VIP, sends new connections from 100 client addresses and shows the share
of flows per node and the connections per backend, then takes one node's
links down and shows the same clients answered by the others. It always
tears the lab down.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .lab import Lab
from .scaleout_lab import (ECHO_PORT, VIP, build_scaleout_lab, multipath_nexthops, running_cluster,
                           set_node_links, wait_nexthops)
from .streams import connect_burst

console = Console()


def _flows(daemons: dict) -> dict[str, int]:
    return {name: d.call("stats")["global"]["ct_new"]["packets"] for name, d in daemons.items()}


def _round(lab: Lab, topo, rounds: int) -> tuple[collections.Counter, int]:
    """`rounds` bursts of one new connection per client address."""
    answers: collections.Counter = collections.Counter()
    for _ in range(rounds):
        answers.update(connect_burst(lab, topo.client_ns, topo.client_ips, VIP, ECHO_PORT, 2.0).values())
    return answers, answers.pop(None, 0)


def _show(out: Console, title: str, before: dict, after: dict, answers: collections.Counter,
          unanswered: int) -> dict:
    total = sum(answers.values()) + unanswered
    t = Table(title=f"{title}: {total - unanswered} of {total} new connections answered")
    for col in ("node", "new flows", "share"):
        t.add_column(col, justify="right" if col != "node" else "left")
    flows = {n: after[n] - before[n] for n in after}
    for n, v in flows.items():
        t.add_row(n, str(v), f"{100 * v / max(1, sum(flows.values())):.1f}%")
    out.print(t)
    out.print("  per backend: " + ", ".join(f"{b} {v}" for b, v in sorted(answers.items())))
    return {"flows_per_node": flows, "per_backend": dict(answers), "unanswered": unanswered}


def run_scaleout_demo(nodes: int = 3, rounds: int = 10, out: Console = console) -> dict:
    result: dict = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="xdplb-scaleout-") as tmp:
        out.print(f"[bold]building the lab[/]: a BIRD 2 router, {nodes} xdplb nodes with BIRD 2, "
                  f"3 DSR backends, a client with 100 addresses")
        topo = build_scaleout_lab(lab, Path(tmp), nodes=nodes)
        t0 = time.monotonic()
        with running_cluster(lab, topo, Path(f"/sys/fs/bpf/xdplb-demo-{os.getpid()}")) as daemons:
            out.print(f"  every node announced {VIP} in {time.monotonic() - t0:.1f}s")
            hops = multipath_nexthops(lab, topo)
            out.print(f"router's route to {VIP}: [bold]{len(hops)} next hops[/] " + ", ".join(hops))
            before = _flows(daemons)
            answers, unanswered = _round(lab, topo, rounds)
            result["all_nodes"] = _show(out, "all nodes", before, _flows(daemons), answers, unanswered)

            dead = topo.nodes[-1]
            out.print(f"[bold]{dead.name}'s links go down[/]")
            t0 = time.monotonic()
            set_node_links(lab, dead, False)
            wait_nexthops(lab, topo, topo.nodes[:-1])
            out.print(f"  the router dropped it after {time.monotonic() - t0:.2f}s (BFD): "
                      + ", ".join(multipath_nexthops(lab, topo)))
            before = _flows(daemons)
            answers, unanswered = _round(lab, topo, rounds)
            result["one_node_lost"] = _show(out, f"without {dead.name}", before, _flows(daemons),
                                            answers, unanswered)
    return result


def main(args) -> int:
    r = run_scaleout_demo(nodes=args.nodes)
    return 0 if r["all_nodes"]["unanswered"] == 0 and r["one_node_lost"]["unanswered"] == 0 else 1
