"""The CI gate: ratios from one quick run against bench/baseline.json.

Only ratios measured side by side in one run are compared, never absolute
times: a slower or busier machine moves both sides. Each ratio is "higher
is better"; a run fails when a ratio falls below baseline x (1 - tolerance),
or when any packet was misrouted or an engine delivered nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .report import mpps, point, service_counts

BASELINE = Path(__file__).resolve().parent / "baseline.json"

# Default tolerances: how far below the baseline a ratio may fall. The
# scaling ratios are close to 1 and steady; the comparison with iptables
# also carries the kernel stack's noise.
TOLERANCE = {
    "xdplb_vs_iptables_legacy_new_mpps": 0.6,
    # xdplb's update p50 (~0.3 ms) is pure CPU time of one thread and
    # moves with whatever else shares the two cores; iptables' is mostly
    # iptables-restore's own: wide margin.
    "xdplb_vs_iptables_legacy_update_p50": 0.8,
    "xdplb_scale_new_mpps": 0.3,
    "xdplb_scale_established_mpps": 0.3,
    "xdplb_scale_new_ns": 0.3,
}


def ratios(doc: dict) -> dict[str, float]:
    """The gate's ratios: xdplb against iptables-legacy at the largest N of
    the run, and xdplb at the largest N against the smallest."""
    ns = service_counts(doc)
    top, low = ns[-1], ns[0]
    x_top, x_low, ipt = point(doc, "xdplb", top), point(doc, "xdplb", low), point(doc, "iptables-legacy", top)
    out: dict[str, float] = {}
    if x_top and ipt and mpps(ipt):
        out["xdplb_vs_iptables_legacy_new_mpps"] = mpps(x_top) / mpps(ipt)
        a, b = ipt["operations"]["update"], x_top["operations"]["update"]
        if a.get("count") and b.get("count"):
            out["xdplb_vs_iptables_legacy_update_p50"] = a["p50_ms"] / b["p50_ms"]
    if x_top and x_low and top != low:
        out["xdplb_scale_new_mpps"] = mpps(x_top) / mpps(x_low)
        out["xdplb_scale_established_mpps"] = mpps(x_top, "established") / mpps(x_low, "established")
        a, b = x_top["targets"]["last"].get("new_load_ns"), x_low["targets"]["last"].get("new_load_ns")
        if a and b:
            out["xdplb_scale_new_ns"] = b / a
    return out


@dataclass
class Verdict:
    ok: bool
    lines: list[str]


def check(doc: dict, baseline: dict) -> Verdict:
    lines: list[str] = []
    ok = True
    for r in doc["results"]:
        if "error" in r:
            ok = False
            lines.append(f"FAIL {r['engine']} at {r['services']}: {r['error']}")
            continue
        for tname, t in r["targets"].items():
            for kind in ("new", "established"):
                if kind not in t:
                    continue
                run = t[kind]
                if run["misrouted"]:
                    ok = False
                    lines.append(f"FAIL {r['engine']} at {r['services']}: {run['misrouted']} packets misrouted "
                                 f"({tname} service, {kind} flows)")
                if not run["delivered"]:
                    ok = False
                    lines.append(f"FAIL {r['engine']} at {r['services']}: nothing delivered ({tname}, {kind})")
    got = ratios(doc)
    if baseline.get("services_max") and service_counts(doc)[-1] != baseline["services_max"]:
        lines.append(f"note: the baseline was taken at {baseline['services_max']} services, this run at "
                     f"{service_counts(doc)[-1]}")
    tolerances = {**TOLERANCE, **baseline.get("tolerance", {})}
    for name, want in baseline.get("ratios", {}).items():
        if name not in got:
            ok = False
            lines.append(f"FAIL {name}: not measured in this run")
            continue
        floor = want * (1 - tolerances.get(name, 0.3))
        good = got[name] >= floor
        ok &= good
        lines.append(f"{'ok  ' if good else 'FAIL'} {name}: {got[name]:.3f} (baseline {want:.3f}, "
                     f"fails below {floor:.3f})")
    return Verdict(ok, lines)


def load_baseline(path: Path = BASELINE) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no baseline at {path}: record one with `xdplb bench --quick "
                                "--update-baseline`")
    return json.loads(path.read_text())


def baseline_from(doc: dict) -> dict:
    return {"comment": "Ratios of `xdplb bench --quick`; see bench/gate.py. Higher is better; "
                       "a run fails below baseline x (1 - tolerance).",
            "recorded": doc.get("started"), "machine": {k: doc["machine"].get(k) for k in
                                                         ("kernel", "cpus", "cpu_model")},
            "services_max": service_counts(doc)[-1], "ratios": {k: round(v, 4) for k, v in ratios(doc).items()},
            "tolerance": dict(TOLERANCE)}
