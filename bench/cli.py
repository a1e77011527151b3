"""`xdplb bench`: the benchmark sweep, its outputs and the CI gate.

    xdplb bench                  full sweep (4 engines x 1, 1k, 5k, 10k, 20k services)
    xdplb bench --quick          CI gate: xdplb and iptables-legacy at 1 and 5k services,
                                 ratios compared with bench/baseline.json (exit 1 on regression)
    xdplb bench --generator trex --trex-server HOST --vip VIP
                                 run the profile on a real TRex server instead of the lab
    xdplb bench --katran-object PATH [--katran-object PATH] [--versus-only]
                                 also Katran's own balancer (your build of its
                                 balancer.bpf.c) beside xdplb: 1 VIP x 10 backends
    xdplb bench --kube-proxy [iptables nftables iptables-legacy] [--kube-proxy-only]
                                 also the real kube-proxy (make k8s-bins) beside xdplb in
                                 Kubernetes mode, both following one real API server
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import gate, report

console = Console(stderr=True)
RESULTS = Path(__file__).resolve().parent / "results"
# sweep.ALL_ENGINES and kubeproxy_versus.MODES, spelled out: `xdplb --help`
# should not import the sweep.
ENGINES = ("xdplb", "nftables", "iptables-nft", "iptables-legacy")
KUBE_PROXY_MODES = ("iptables", "nftables", "iptables-legacy")


def error(message: str) -> None:
    """One line on stderr, however long (rich would wrap it at the width)."""
    console.print("[bold red]error:[/] " + escape(message), soft_wrap=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the CI gate: a short run compared with the baseline's ratios")
    p.add_argument("--services", type=int, nargs="+", help="service counts (default: 1 1000 5000 10000 20000)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, help="engines to run")
    p.add_argument("--endpoints", type=int, help="endpoints per service (default 3)")
    p.add_argument("--profile", help="TRex STL profile: a file or a name in bench/profiles (default udp_flows)")
    p.add_argument("--seconds", type=float, help="seconds per rate run")
    p.add_argument("--ops", type=int, help="add/update/delete operations of each kind per point")
    p.add_argument("--ops-budget", type=float, help="seconds for the operations of one point")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/{full,quick})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--baseline", type=Path, default=gate.BASELINE)
    p.add_argument("--update-baseline", action="store_true",
                   help="with --quick: write this run's ratios as the new baseline")
    p.add_argument("--stl-api", choices=["auto", "trex", "stand-in"], default="auto",
                   help="how to evaluate profiles: the TRex client if installed, or bench/stl.py")
    p.add_argument("--generator", choices=["kernel", "trex"], default="kernel",
                   help="kernel: the lab's in-kernel generator; trex: a TRex server")
    p.add_argument("--trex-server", help="TRex server host (with --generator trex)")
    p.add_argument("--vip", help="with --generator trex: the service address to send to")
    p.add_argument("--port", type=int, default=80, help="with --generator trex: the service port")
    p.add_argument("--katran-object", type=Path, action="append", metavar="PATH",
                   help="Katran's balancer.bpf.o built from its tree: measured beside xdplb on the same "
                        "traffic (repeat it for another build, e.g. one with its flood bypass off)")
    p.add_argument("--versus-only", action="store_true",
                   help="only the comparison with Katran (xdplb rows alone without --katran-object), "
                        "not the service-count sweep")
    p.add_argument("--versus-rounds", type=int, help="rounds of the comparison with Katran (default 3)")
    p.add_argument("--kube-proxy", nargs="*", choices=KUBE_PROXY_MODES, metavar="MODE",
                   help="the real kube-proxy in these modes (iptables, nftables, iptables-legacy; default "
                        "iptables nftables) beside xdplb in Kubernetes mode on one real API server, at "
                        "--services counts (default 1000 5000 10000 20000)")
    p.add_argument("--kube-proxy-only", action="store_true",
                   help="only the comparison with the real kube-proxy, not the service-count sweep")
    p.add_argument("--changes", type=int, help="with --kube-proxy: endpoint changes per row (default 1000)")
    p.add_argument("--change-rate", type=float,
                   help="with --kube-proxy: endpoint changes per second (default 100)")


def settings_from(args: argparse.Namespace):
    from . import sweep

    s = sweep.Settings.quick() if args.quick else sweep.Settings()
    for name, attr in (("services", "services"), ("engines", "engines"), ("endpoints", "endpoints"),
                       ("profile", "profile"), ("seconds", "seconds"), ("ops", "ops"),
                       ("ops_budget", "ops_budget_s")):
        v = getattr(args, name)
        if v is not None:
            setattr(s, attr, v)
    s.trex_client = args.stl_api
    s.katran_objects = list(args.katran_object or [])
    s.sweep = not (args.versus_only or args.kube_proxy_only)
    s.versus = args.versus_only
    if args.versus_rounds is not None:
        s.versus_rounds = args.versus_rounds
    if args.kube_proxy is not None:
        s.kube_proxy = list(dict.fromkeys(args.kube_proxy or ["iptables", "nftables"]))
        if args.services:
            s.kube_services = list(args.services)
    for name, attr in (("changes", "kube_changes"), ("change_rate", "kube_change_rate")):
        if getattr(args, name) is not None:
            setattr(s, attr, getattr(args, name))
    if s.profile.startswith("tcp"):
        s.proto = "tcp"
    return s


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="xdplb bench", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        args = p.parse_args(argv)
    if args.generator == "trex":
        return _trex(args)
    from . import sweep

    # SIGTERM unwinds like Ctrl-C, so labs, links, pins and the global
    # conntrack settings are cleaned up and restored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    settings = settings_from(args)
    bad = [n for n in settings.services if n < 1]
    if bad:
        error(f"--services must be ≥ 1 (got {bad})")
        return 2
    problem = _versus_problem(args, settings)
    if problem:
        error(problem)
        return 2
    out = args.out or RESULTS / ("quick" if args.quick else "full")
    units = ((1 + len(settings.engines) * len(settings.services) + (1 if settings.big_sync else 0)
              + (1 if settings.state_floor else 0)) if settings.sweep else 0) \
        + (1 if settings.katran_objects or settings.versus else 0) \
        + (len(set(settings.kube_services)) if settings.kube_proxy else 0)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=units)
        done = {"base": 0.0, "last": ""}

        def progress(what: str, frac: float) -> None:
            if what != done["last"]:
                if done["last"]:
                    done["base"] += 1
                done["last"] = what
            bar.update(task, description=what, completed=min(units, done["base"] + frac))

        doc = sweep.run(settings, progress,
                        partial=lambda d: report.write(d, out, with_plots=False))
        bar.update(task, completed=units, description="done")
    paths = report.write(doc, out, with_plots=not args.no_plots and bool(doc["results"]))
    console.print(f"sweep took {time.perf_counter() - t0:.0f} s; wrote "
                  + ", ".join(str(p) for p in paths.values()))
    print(report.markdown(doc))
    if not args.quick:
        return 0
    if args.update_baseline:
        base = gate.baseline_from(doc)
        args.baseline.write_text(json.dumps(base, indent=2) + "\n")
        console.print(f"baseline written to {args.baseline}: {base['ratios']}")
        return 0
    verdict = gate.check(doc, gate.load_baseline(args.baseline))
    for line in verdict.lines:
        print(line)
    print("bench gate:", "passed" if verdict.ok else "FAILED (performance regression)")
    return 0 if verdict.ok else 1


def _versus_problem(args: argparse.Namespace, settings) -> str | None:
    """What is wrong with the Katran options, in one line (before any lab is built)."""
    from .katran import KatranError, check_object

    if args.versus_only and args.quick:
        return "--versus-only has no quick gate: use one or the other"
    if args.kube_proxy_only and args.quick:
        return "--kube-proxy-only has no quick gate: use one or the other"
    if args.kube_proxy_only and args.kube_proxy is None:
        return "--kube-proxy-only needs --kube-proxy"
    if args.versus_only and args.kube_proxy_only:
        return "--versus-only and --kube-proxy-only exclude each other"
    if settings.kube_changes < 1 or settings.kube_change_rate <= 0:
        return f"--changes must be ≥ 1 and --change-rate > 0 (got {settings.kube_changes}, " \
               f"{settings.kube_change_rate:g})"
    if settings.kube_proxy:
        from .k8s_cluster import WITH_KUBE_PROXY, missing_binaries

        missing = missing_binaries(binaries=WITH_KUBE_PROXY)
        if missing:
            return f"--kube-proxy: {', '.join(missing)} not built: run `make k8s-bins`"
    if settings.versus_rounds < 1:
        return f"--versus-rounds must be ≥ 1 (got {settings.versus_rounds})"
    try:
        for path in settings.katran_objects:
            check_object(path)
    except KatranError as e:
        return str(e)
    return None


def _trex(args: argparse.Namespace) -> int:
    from . import trexrun

    if not args.trex_server or not args.vip:
        error("--generator trex needs --trex-server HOST and --vip ADDRESS")
        return 2
    try:
        res = {}
        for flows, kind in ((0, "new"), (1024, "established")):
            res[kind] = trexrun.run(args.trex_server, args.profile or "udp_flows",
                                    {"vip": args.vip, "port": args.port, "flows": flows},
                                    args.seconds or 10.0)
    except (trexrun.TrexError, trexrun.ProfileError) as e:
        error(str(e))
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
