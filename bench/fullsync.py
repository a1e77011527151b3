"""The full-sync target alone: N services x B backends, Maglev included.

    python -m bench.fullsync [--services 20000] [--backends 10] [--runs 3]
                             [--phases] [--profile validate|apply]

Each run is what the sweep's big_sync measures (bench.engines.XdplbEngine.
full_sync): on the bench lab, a fresh Dataplane with the program attached
and empty maps, then config_from_dict() (validation) and Reconciler.apply()
timed separately. A small full sync first warms numba (the sweep's earlier
points do the same). Prints every run and the medians.

--phases also times the reconciler's steps (planning, Maglev, writes, ...)
by wrapping its methods; --profile runs cProfile over one of the two halves
of the last run and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from lb.lab import Lab

from . import lab as blab
from .engines import XdplbEngine, make_services

# Reconciler steps timed by --phases, in the order _apply_locked runs them.
PHASES = ("_plan", "_match_backends", "_compute_rings", "_check_capacity", "_allocate", "_write_identities",
          "_write_config", "_write_tables", "_flip", "_remove", "_retire", "_remove_identities")


@contextmanager
def phase_timer(into: dict[str, float]) -> Iterator[None]:
    """Wrap the Reconciler's steps so that each adds its seconds to `into`."""
    from lb.reconcile import Reconciler

    saved = {name: getattr(Reconciler, name) for name in PHASES if hasattr(Reconciler, name)}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                into[name] = into.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    for name, fn in saved.items():
        setattr(Reconciler, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Reconciler, name, fn)


@contextmanager
def profiled(enabled: bool, top: int = 35) -> Iterator[None]:
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(top)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=20000)
    p.add_argument("--backends", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--phases", action="store_true", help="time the reconciler's steps")
    p.add_argument("--profile", choices=("validate", "apply"), help="cProfile the last run's half")
    p.add_argument("--json")
    a = p.parse_args(argv)

    services = make_services(a.services, a.backends, "udp")
    rows = []
    with Lab(prefix="xf") as lab:
        bl = blab.build(lab)
        eng = XdplbEngine(bl)
        try:
            eng.full_sync(make_services(100, a.backends, "udp"))     # warm-up (numba, imports)
            for run in range(a.runs):
                phases: dict[str, float] = {}
                last = run == a.runs - 1
                if a.profile and last:
                    import lb.config as lbc
                    import lb.reconcile as lbr
                    target = (lbc, "config_from_dict") if a.profile == "validate" else (lbr.Reconciler, "apply")
                    orig = getattr(*target)

                    def wrapped(*args, _orig=orig, **kw):
                        with profiled(True):
                            return _orig(*args, **kw)
                    setattr(*target, wrapped)
                try:
                    if a.phases:
                        with phase_timer(phases):
                            r = eng.full_sync(services)
                    else:
                        r = eng.full_sync(services)
                finally:
                    if a.profile and last:
                        setattr(*target, orig)
                row = {"total_s": r.seconds, "validate_s": r.detail["validate_s"],
                       "apply_s": r.detail["apply_s"], "rings": r.detail["rings_written"]}
                if phases:
                    row["phases"] = phases
                rows.append(row)
                ph = "  " + " ".join(f"{k.strip('_')}={v:.3f}" for k, v in phases.items()) if phases else ""
                print(f"run {run + 1}: total {r.seconds:.3f} s = validate {row['validate_s']:.3f} "
                      f"+ apply {row['apply_s']:.3f}{ph}", flush=True)
        finally:
            eng.close()
    med = {k: statistics.median(r[k] for r in rows) for k in ("total_s", "validate_s", "apply_s")}
    if a.phases:
        med["phases"] = {k: statistics.median(r["phases"].get(k, 0.0) for r in rows) for k in PHASES
                         if any(k in r["phases"] for r in rows)}
    print(f"median of {len(rows)} ({a.services} x {a.backends}): total {med['total_s']:.3f} s = "
          f"validate {med['validate_s']:.3f} + apply {med['apply_s']:.3f}")
    if a.phases:
        print("  apply steps (median): " + " ".join(f"{k.strip('_')}={v:.3f}" for k, v in med["phases"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"services": a.services, "backends": a.backends, "runs": rows, "median": med}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
