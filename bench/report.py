"""The sweep's outputs: the JSON document, a markdown table, PNG plots, and
the issue's targets checked against the figures."""

from __future__ import annotations

import json
from pathlib import Path

KIB = 1024


def point(doc: dict, engine: str, n: int) -> dict | None:
    return next((r for r in ok_results(doc) if r["engine"] == engine and r["services"] == n), None)


def ok_results(doc: dict) -> list[dict]:
    """Points that were measured (a failed one carries "error" instead)."""
    return [r for r in doc["results"] if "error" not in r]


def mpps(p: dict | None, kind: str = "new", target: str = "last") -> float | None:
    if not p or kind not in p["targets"].get(target, {}):
        return None
    return p["targets"][target][kind]["delivered_mpps"]


def engines(doc: dict) -> list[str]:
    return list(dict.fromkeys(r["engine"] for r in doc["results"]))


def service_counts(doc: dict) -> list[int]:
    return sorted({r["services"] for r in ok_results(doc)})


def _f(v, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def _first_packet(p: dict) -> float | None:
    vals = [f["first_packet_ms"] for f in p.get("first_packet", []) if f.get("first_packet_ms") is not None]
    return sorted(vals)[len(vals) // 2] if vals else None


def markdown(doc: dict) -> str:
    m = doc["machine"]
    s = doc["settings"]
    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, load average "
        f"{m['loadavg_start'][0]:.2f} at start. Profile `{s['profile']}` ({s.get('profile_api', '?')} STL API), "
        f"{s['endpoints']} endpoints per service, {s['seconds']:g} s per rate run."]
    if doc["results"] or doc.get("lab_limit"):
        lines += _sweep_tables(doc)
    if doc.get("versus"):
        from .versus import markdown as versus_markdown

        lines += versus_markdown(doc["versus"])
    if doc.get("kube_proxy"):
        from .kubeproxy_versus import markdown as kube_markdown

        lines += kube_markdown(doc["kube_proxy"], doc)
    tg = targets(doc)
    if tg:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in tg:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no' if t['met'] is not None else 'n/a'} |")
    return "\n".join(lines) + "\n"


def _sweep_tables(doc: dict) -> list[str]:
    lines = [
        "",
        "| engine | services | new flows Mpps (last / random) | established Mpps (last) | full sync s "
        "| add p50 / p99 ms | update p50 / p99 ms | delete p50 / p99 ms | first packet ms | kernel memory MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['services']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        ops = r.get("operations", {})

        def q(kind: str) -> str:
            o = ops.get(kind, {})
            if not o.get("count"):
                return "–"
            return f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} ({o['count']})"

        mem = r.get("memory", {}).get("kernel_bytes")
        lines.append(
            f"| {r['engine']} | {r['services']} | {_f(mpps(r))} / {_f(mpps(r, 'new', 'random'))} "
            f"| {_f(mpps(r, 'established'))} | {r['full_sync_s']:.3f} | {q('add')} | {q('update')} "
            f"| {q('delete')} | {_f(_first_packet(r), '{:.1f}')} | {_f(mem / 2**20 if mem else None, '{:.1f}')} |")
    lim = doc.get("lab_limit") or {}
    lines += ["", "Program time per packet (ns): run statistics under load / test-run (repeat=1 per "
              "call, median); test-run floor of the empty program: "
              f"{_f(lim.get('testrun_floor_ns'), '{:.0f}')} ns.", "",
              "| program | services | new flow load | established load | new flow test-run | established test-run |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, row in (("bare forwarder", lim), ("state floor (+1 LRU lookup, insert on miss)",
                                                  doc.get("state_floor") or {})):
        if row:
            lines.append(f"| {label} | – | {_f(row.get('new_load_ns'), '{:.0f}')} | "
                         f"{_f(row.get('established_load_ns'), '{:.0f}')} | "
                         f"{_f(row.get('new_testrun_ns'), '{:.0f}')} | "
                         f"{_f(row.get('established_testrun_ns'), '{:.0f}')} |")
    for r in ok_results(doc):
        t = r["targets"].get("last", {})
        if "new_load_ns" in t:
            lines.append(f"| {r['engine']} | {r['services']} | {_f(t['new_load_ns'], '{:.0f}')} | "
                         f"{_f(t['established_load_ns'], '{:.0f}')} | {_f(t['new_testrun_ns'], '{:.0f}')} | "
                         f"{_f(t['established_testrun_ns'], '{:.0f}')} |")
    if lim:
        lines += ["", f"Lab limit (bare forwarder): {_f(mpps_lim(lim, 'new'))} Mpps new flows, "
                  f"{_f(mpps_lim(lim, 'established'))} Mpps established."]
    floor = doc.get("state_floor")
    if floor:
        lines += ["", f"State floor (the forwarder plus one LRU conntrack lookup, and an insert when it "
                  f"misses): {_f(mpps_lim(floor, 'new'))} Mpps new flows, "
                  f"{_f(mpps_lim(floor, 'established'))} Mpps established."]
    return lines


def mpps_lim(lim: dict, kind: str) -> float | None:
    return lim.get(kind, {}).get("delivered_mpps")


def targets(doc: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    out: list[dict] = []
    if doc.get("versus"):
        from .versus import targets as versus_targets

        out += versus_targets(doc["versus"])
    if doc.get("kube_proxy"):
        from .kubeproxy_versus import targets as kube_targets

        out += kube_targets(doc["kube_proxy"])
    ns = service_counts(doc)
    if not ns:
        return out
    top, low = ns[-1], ns[0]
    x_top, x_low = point(doc, "xdplb", top), point(doc, "xdplb", low)

    def add(target: str, measured: str, met: bool | None) -> None:
        out.append({"target": target, "measured": measured, "met": met})

    for other, factor in (("iptables-legacy", 100), ("nftables", 5)):
        o = point(doc, other, top)
        if x_top and o and mpps(o):
            ratio = mpps(x_top) / mpps(o)
            add(f"new flows at {top} services: xdplb ≥ {factor} × {other}",
                f"{ratio:.1f}× ({mpps(x_top):.3f} vs {mpps(o):.4f} Mpps)", ratio >= factor)
    if x_top and x_low and top != low:
        r = mpps(x_top) / mpps(x_low)
        add(f"xdplb Mpps at {top} ≥ 0.9 × at {low} service(s)",
            f"{r:.2f} ({mpps(x_top):.3f} vs {mpps(x_low):.3f})", r >= 0.9)
        a, b = x_top["targets"]["last"].get("new_load_ns"), x_low["targets"]["last"].get("new_load_ns")
        if a and b:
            add(f"xdplb ns/pkt at {top} ≤ ns/pkt at {low} / 0.9 (new flows, under load)",
                f"{a:.0f} vs {b:.0f} ns ({b / a:.2f})", b / a >= 0.9)
    lim = doc.get("lab_limit") or {}
    floor = doc.get("state_floor") or {}
    if x_top and lim.get("new_load_ns"):
        t = x_top["targets"]["last"]
        for kind, factor in (("new", 3), ("established", 2)):
            a, f = t.get(f"{kind}_load_ns"), lim.get(f"{kind}_load_ns")
            if a and f:
                measured = f"{a / f:.1f}× ({a:.0f} vs {f:.0f} ns)"
                s = floor.get(f"{kind}_load_ns")
                if s:   # what keeping state costs by itself, in the same run
                    measured += f"; state floor alone {s / f:.1f}× ({s:.0f} ns)"
                add(f"xdplb ns/pkt ≤ {factor} × bare forwarder ({kind}, {top} services, under load)",
                    measured, a / f <= factor)
    if x_top and x_top.get("operations", {}).get("update", {}).get("count"):
        u = x_top["operations"]["update"]
        add(f"single-service update at {top} services: p99 ≤ 1 ms",
            f"p99 {u['p99_ms']:.3f} ms (p50 {u['p50_ms']:.3f}, {u['count']} ops)", u["p99_ms"] <= 1.0)
    big = doc.get("targets_big_sync")
    if big:
        add(f"full sync of {big['services']} services × {big['backends']} backends ≤ 1.5 s",
            f"{big['full_sync_s']:.3f} s", big["full_sync_s"] <= 1.5)
        mem = big["memory"]
        if "bytes_per_service" in mem:
            add(f"map memory per service ({big['backends']} backends) ≤ 8 KiB",
                f"{mem['bytes_per_service'] / KIB:.2f} KiB", mem["bytes_per_service"] <= 8 * KIB)
            add("Maglev imbalance ≤ 5%", f"max {100 * mem['maglev_imbalance']['max']:.2f}%",
                mem["maglev_imbalance"]["max"] <= 0.05)
    return out


def plots(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in engines(doc):
        rows = sorted((r for r in ok_results(doc) if r["engine"] == e), key=lambda r: r["services"])
        xs = [r["services"] for r in rows]
        line, = ax.plot(xs, [mpps(r) for r in rows], marker="o", label=f"{e} new flows")
        ax.plot(xs, [mpps(r, "established") for r in rows], marker="x", linestyle="--",
                color=line.get_color(), label=f"{e} established")
    lim = doc.get("lab_limit") or {}
    if mpps_lim(lim, "new"):
        ax.axhline(mpps_lim(lim, "new"), color="grey", linestyle=":", label="bare forwarder (lab limit)")
    files.append(_save(plt, fig, ax, out_dir / "mpps_vs_services.png", "services (3 endpoints each)",
                       "delivered Mpps (to the last service)", "Delivered packet rate against services"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in engines(doc):
        rows = sorted((r for r in ok_results(doc) if r["engine"] == e and r["operations"]["update"].get("count")),
                      key=lambda r: r["services"])
        xs = [r["services"] for r in rows]
        line, = ax.plot(xs, [r["operations"]["update"]["p50_ms"] for r in rows], marker="o", label=f"{e} p50")
        ax.plot(xs, [r["operations"]["update"]["p99_ms"] for r in rows], marker="x", linestyle="--",
                color=line.get_color(), label=f"{e} p99")
    files.append(_save(plt, fig, ax, out_dir / "update_latency_vs_services.png", "services",
                       "single-service update latency (ms)", "Update latency against services"))
    return files


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Both plots: log-log axes, labels, grid and legend; written as PNG."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(doc: dict, out_dir: Path, with_plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["targets"] = targets(doc)
    paths = {"json": out_dir / "bench.json", "table": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["table"].write_text(markdown(doc))
    if with_plots:
        for i, p in enumerate(plots(doc, out_dir)):
            paths[f"plot{i}"] = p
    return paths
