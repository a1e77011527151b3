"""xdplb beside Katran's own balancer, on the same traffic, in one run.

    xdplb bench --katran-object PATH [--katran-object PATH ...] [--versus-only]

One VIP with 10 backends (`versus_backends`), UDP. Rows, each an engine on
its own gen -> lb -> sink lab (bench/sweep.Session):

- `xdplb`: gateway NAT, flood guard off (a conntrack write per new flow);
- `xdplb-ipip`: DSR by IPIP, once xdplb has it (issue 12); until then the
  row says why it was skipped;
- one per Katran object (bench/katran.py), its flood bypass found by
  test-runs: a build as shipped stops writing its LRU above MAX_CONN_RATE
  new flows per second per CPU, a build with MAX_CONN_RATE raised never does.

Figures: per-packet program time from the kernel's run statistics
(run_time_ns / run_cnt) while the in-kernel generator sends new flows
(every packet a new flow) or established ones (`established_flows` flows in
turn), and the share of what was offered that reached a backend (the sink
checks each packet's backend). Every row measures one window of each kind,
one row after another (every other round in reverse order), `versus_rounds`
times, so that the load of a shared machine falls on all of them alike; the
ratios are of medians, with the range of the round-by-round ratios.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Callable

from . import traffic
from .engines import BService, make_service
from .katran import KatranEngine
from .sweep import Session, Settings

XDPLB_ROWS = ("xdplb", "xdplb-ipip")
KINDS = ("new", "established")


def plan(settings: Settings) -> list[str]:
    """The rows' engines: Katran's only when an object was given."""
    return list(XDPLB_ROWS) + [f"katran:{p}" for p in settings.katran_objects]


def run(settings: Settings, progress: Callable[[str, float], None] | None = None) -> dict:
    progress = progress or (lambda what, units: None)
    svc = make_service(0, settings.versus_backends, settings.proto)
    rows: list[dict] = []
    live: list[tuple[dict, Session, dict]] = []
    with contextlib.ExitStack() as stack:
        for name in plan(settings):
            try:
                sess = stack.enter_context(contextlib.closing(Session(settings, name)))
            except NotImplementedError as e:          # xdplb-ipip before issue 12
                rows.append({"engine": name, "skipped": str(e)})
                continue
            row, specs = _set_up(sess, svc, settings)
            rows.append(row)
            live.append((row, sess, specs))
        done, total = 0, settings.versus_rounds * len(live)
        for r in range(settings.versus_rounds):
            # Every other round in reverse, so that no row is always first.
            for row, sess, specs in live if r % 2 == 0 else live[::-1]:
                progress("xdplb beside Katran", done / max(total, 1))
                _measure(row, sess, specs, settings.versus_seconds)
                done += 1
    for row in rows:
        if "windows" in row:
            row.update(_summary(row["windows"]))
    return {"service": {"vip": svc.vip, "port": svc.port, "proto": svc.proto,
                        "backends": settings.versus_backends},
            "rounds": settings.versus_rounds, "seconds": settings.versus_seconds,
            "established_flows": settings.established_flows, "rows": rows}


def _set_up(sess: Session, svc: BService, settings: Settings) -> tuple[dict, dict]:
    """The service on the session's engine, its traffic, and (Katran) the
    build's flood bypass."""
    sess.allow([svc])
    sync = sess.engine.full_sync([svc])
    specs = {"new": sess.spec(svc, 0), "established": sess.spec(svc, settings.established_flows)}
    row = {"engine": sess.engine.name, "sync": sync.detail, "windows": {k: [] for k in KINDS}}
    if isinstance(sess.engine, KatranEngine):
        row["katran"] = sess.engine.characterize(_probe(specs["new"]))
    row["label"] = sess.engine.label
    return row, specs


def _measure(row: dict, sess: Session, specs: dict, seconds: float) -> None:
    """One window of each kind: program time from run statistics, and what
    was offered and delivered."""
    fd = sess.engine.program_fd()
    for kind in KINDS:
        m = traffic.program_ns_under_load(sess.bl, sess.gen, sess.sink, specs[kind], {"engine": fd}, seconds)
        row["windows"][kind].append({"ns_per_packet": m["engine"]["ns_per_packet"],
                                     "runs": m["engine"]["runs"], **m["rate"]})
    if isinstance(sess.engine, KatranEngine):
        row["katran_counters"] = sess.engine.lb.counters()      # totals so far


def _probe(spec) -> bytes:
    packet = spec.expected(0)
    if packet is None:
        raise ValueError("the profile must not use random flow variables")
    return packet


def _summary(windows: dict[str, list[dict]]) -> dict:
    """Per kind: median, min and max ns/packet over the rounds, and the share
    of offered packets delivered (all rounds together)."""
    out = {}
    for kind, ws in windows.items():
        ns = [w["ns_per_packet"] for w in ws if w["ns_per_packet"]]
        offered = sum(w["offered"] for w in ws)
        out[kind] = {"ns_median": statistics.median(ns) if ns else None,
                     "ns_min": min(ns, default=None), "ns_max": max(ns, default=None),
                     "delivered_share": sum(w["delivered"] for w in ws) / offered if offered else None,
                     "misrouted": sum(w["misrouted"] for w in ws),
                     "offered_mpps": statistics.median(w["offered_mpps"] for w in ws) if ws else None}
    return out


def paired(a: dict, b: dict, kind: str) -> list[float]:
    """a's ns/packet over b's, round by round (windows seconds apart: the
    machine's load of the moment cancels out)."""
    return [wa["ns_per_packet"] / wb["ns_per_packet"] for wa, wb in zip(a["windows"][kind], b["windows"][kind])
            if wa["ns_per_packet"] and wb["ns_per_packet"]]


def targets(section: dict) -> list[dict]:
    """Issue 12: xdplb ipip ≤ 0.8 × Katran's ns/pkt, new and established
    flows. Issue 13: a new flow with a conntrack write ≤ 0.8 × Katran's with
    its LRU write."""
    by_engine = {r["engine"]: r for r in section["rows"] if "windows" in r}
    katran = {"LRU write per flow" if r["katran"]["flood_bypass_above"] is None else "as shipped": r
              for r in by_engine.values() if "katran" in r}
    out: list[dict] = []

    def compare(issue: int, engine: str, variant: str, kind: str, factor: float) -> None:
        x, k = by_engine.get(engine), katran.get(variant)
        if not (x and k and x[kind]["ns_median"] and k[kind]["ns_median"]):
            return
        a, b = x[kind]["ns_median"], k[kind]["ns_median"]
        rounds = paired(x, k, kind)
        out.append({"target": f"#{issue}: {engine} ≤ {factor:g} × Katran {variant}, {kind} flows, ns/pkt",
                    "measured": f"{a / b:.2f}× ({a:.0f} vs {b:.0f} ns; round by round "
                                f"{min(rounds):.2f}–{max(rounds):.2f}×)", "met": a / b <= factor})

    for kind in KINDS:
        for variant in katran:
            compare(12, "xdplb-ipip", variant, kind, 0.8)
    compare(13, "xdplb", "LRU write per flow", "new", 0.8)
    return out


def markdown(section: dict) -> list[str]:
    s = section["service"]
    base = next((r for r in section["rows"] if r["engine"] == "xdplb" and "windows" in r), None)
    lines = ["", f"xdplb beside Katran: 1 VIP × {s['backends']} backends ({s['proto']}), "
             f"{section['rounds']} rounds of {section['seconds']:g} s windows. ns: program time per packet "
             "(kernel run statistics), median [min–max] over the rounds; ÷ xdplb: the row's ns over xdplb's "
             "in the same round, median [min–max]; delivered: share of the offered packets that reached a "
             "right backend.", "",
             "| engine | new flow ns | ÷ xdplb | delivered | offered Mpps | established ns | ÷ xdplb | delivered |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['engine']} | skipped: {r['skipped']} | | | | | | |")
            continue
        cells = []
        for kind in KINDS:
            k = r[kind]
            cells.append("–" if k["ns_median"] is None
                         else f"{k['ns_median']:.0f} [{k['ns_min']:.0f}–{k['ns_max']:.0f}]")
            rounds = paired(r, base, kind) if base else []
            cells.append(f"{statistics.median(rounds):.2f} [{min(rounds):.2f}–{max(rounds):.2f}]" if rounds else "–")
            share = "–" if k["delivered_share"] is None else f"{100 * k['delivered_share']:.0f} %"
            cells.append(share + (f", {k['misrouted']} misrouted" if k["misrouted"] else ""))
            if kind == "new":
                cells.append(f"{k['offered_mpps']:.3f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines
