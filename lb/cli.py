"""The `xdplb` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import api
from .endpoint import host_port
from .errors import headline, is_operational, problems

console = Console()
DEFAULT_BPFFS = "/sys/fs/bpf/xdplb"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _fail(message: str, errors: list[str] | None = None) -> int:
    """`error: message` on one line (never wrapped, never read as markup),
    then one line per problem when there are several."""
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True, highlight=False)
    for e in errors or []:
        console.print(Text(f"  - {e}"), soft_wrap=True, highlight=False)
    return 1


def cmd_run(args) -> int:
    from .daemon import run

    return run(args.config, netns=args.netns, object_path=Path(args.object) if args.object else None)


def cmd_apply(args) -> int:
    from .config import ConfigError, load_config

    try:
        load_config(args.file)           # fail fast, with line numbers, before the daemon
    except ConfigError as e:
        return _fail(f"config rejected, nothing changed: {headline(e)}", problems(e))
    text = Path(args.file).read_text()
    res = api.call(args.socket, "apply", config=text, source=args.file)
    if args.json:
        _print_json(res)
    else:
        console.print(escape(f"applied {args.file}: {res}"))
    return 0


# The tables that fill up with traffic or config (the rest are fixed-size).
FILL_SHOWN = ("services", "backends", "maglev_pool", "conntrack", "rev_nat", "reply_index", "identities",
              "policy", "nexthops", "drop_detail")


def cmd_status(args) -> int:
    # The table lists only unhealthy backends: no need to ship 200k healthy ones.
    st = api.call(args.socket, "status", **({} if args.json else {"health_backends": "unhealthy"}))
    if args.json:
        _print_json(st)
        return 0
    t = Table(title="xdplb status", show_header=False)
    for k in ("pid", "uptime_s", "config", "generation", "xdp_mode", "snat_address", "services",
              "backends", "identities", "errors", "pending_reclaim"):
        t.add_row(k, str(st[k]))
    t.add_row("interfaces", ", ".join(f"{k} (prog {v})" if v else f"{k} (detached: interface gone)"
                                      for k, v in st["interfaces"].items()))
    t.add_row("maglev pool", f"{st['maglev_pool']['free']} of {st['maglev_pool']['slots']} slots free")
    t.add_row("tables", ", ".join(f"{name} {m['entries']:,}/{m['capacity']:,} ({m['fill']:.0%})"
                                  for name, m in st["maps"].items()
                                  if name in FILL_SHOWN and m.get("capacity")))
    t.add_row("last apply", json.dumps(st["last_apply"]))
    n = st.get("neighbours")
    if n:
        t.add_row("next hops", f"{n['managed']} kept resolved (managed neighbour entries)"
                  + (f"; unresolved: {', '.join(n['unresolved'])}" if n["unresolved"] else "")
                  + (f"; {n['no_route']} backend addresses without a route" if n["no_route"] else ""))
    h = st.get("health")
    if h:
        t.add_row("health checks", f"{h['checked']} checked: {h['up']} up, {h['down']} down; "
                  f"{h['probes_per_s']} probes/s, {h['in_flight']} in flight (max {h['max_in_flight']}), "
                  f"lag {h['lag_s']}s" + (f"; fail open: {', '.join(h['fail_open'])}" if h["fail_open"] else ""))
    console.print(t)
    _print_unhealthy(h)
    return 0


def _print_unhealthy(h: dict | None, limit: int = 50) -> None:
    """Only the backends that are down or on their way: the rest are fine."""
    rows = [b for b in (h or {}).get("backends", []) if not b["up"] or b["failures"]]
    if not rows:
        return
    t = Table(title="unhealthy backends")
    for col in ("service", "backend", "health", "in table", "fails", "last error", "since"):
        t.add_column(col, no_wrap=col in ("backend", "since"))
    for b in rows[:limit]:
        since = time.strftime("%H:%M:%S", time.localtime(b["last_change"]))
        t.add_row(b["service"], escape(b["backend"]), "up" if b["up"] else "down",
                  "yes" if b["in_rotation"] else "no", str(b["failures"]), b["last_error"] or "", since)
    console.print(t)
    if len(rows) > limit:
        console.print(f"({len(rows) - limit} more; --json lists them all)")


def cmd_kubernetes(args) -> int:
    st = api.call(args.socket, "kubernetes", since=10**9)
    st.pop("applied", None)
    if args.json:
        _print_json(st)
        return 0
    t = Table(title="xdplb kubernetes", show_header=False)
    for k in ("synced", "node", "services", "endpointslices", "pods", "networkpolicies",
              "xdplb_services", "identities", "last_error"):
        t.add_row(k, str(st[k]))
    sy = st["sync"]
    t.add_row("not served", f"{sy['not_served']} services (headless, other proxy, ExternalName); "
              f"{sy['skipped_sctp']} SCTP ports; {sy['skipped_family']} addresses of a family without a clusterIP; "
              f"{sy['conflicts']} address conflicts; {sy['rejected']} rejected")
    lat = st["receive_to_map_ms"]
    t.add_row("event -> map", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms over {lat['n']} events")
    for kind, r in st["reflectors"].items():
        t.add_row(f"watch {kind}", f"rv {r['rv']}, {r['objects']} objects, {r['lists']} lists, "
                  f"{r['relists_410']} relists after 410, {r['reconnects']} reconnects, "
                  f"{r['bookmarks']} bookmarks, {r['bad_objects']} malformed")
    console.print(t)
    return 0


def cmd_stats(args) -> int:
    st = api.call(args.socket, "stats")
    if args.json:
        _print_json(st)
        return 0
    t = Table(title="services")
    for col in ("service", "vip", "backend", "state", "packets", "bytes"):
        # An endpoint folds onto the next line in a narrow terminal, never cut ("[2001:db8::2]:8…").
        t.add_column(col, justify="right" if col in ("packets", "bytes") else "left",
                     overflow="fold" if col in ("vip", "backend") else "ellipsis")
    shown = [s for s in st["services"] if s["packets"] or args.all]
    for s in shown:
        t.add_row(s["name"] or "?", escape(f"{host_port(s['vip'], s['port'])}/{s['protocol']}"), "", "",
                  str(s["packets"]), str(s["bytes"]))
        for b in s["backends"]:
            state = b["state"] + (f" ({b['health']})" if b.get("health") == "down" else "")
            t.add_row("", "", escape(host_port(b["address"], b["port"])), state, str(b["packets"]), str(b["bytes"]))
    console.print(t)
    if len(shown) < len(st["services"]):
        console.print(f"({len(st['services']) - len(shown)} services without traffic hidden; --all shows them)")
    d = Table(title="drops by identity and reason")
    for col in ("identity", "service", "reason", "packets", "bytes"):
        d.add_column(col)
    for row in st["drop_detail"]:
        d.add_row(row["identity"], row["service"] or "-", row["reason"], str(row["packets"]), str(row["bytes"]))
    console.print(d)
    g = Table(title="global")
    g.add_column("counter")
    g.add_column("packets", justify="right")
    for name, v in st["global"].items():
        g.add_row(name, str(v["packets"]))
    console.print(g)
    p = st["program"]
    if p["ns_per_packet"] is not None:
        console.print(f"program: {p['ns_per_packet']:.1f} ns/packet over {p['run_cnt']} runs")
    return 0


def cmd_flow(args) -> int:
    from .endpoint import parse_endpoint

    try:
        src, sport = parse_endpoint(args.src)
        dst, dport = parse_endpoint(args.dst)
    except ValueError as e:
        return _fail(str(e))
    res = api.call(args.socket, "flow", src=str(src), sport=sport, dst=str(dst), dport=dport,
                   proto=args.proto)
    if args.json:
        _print_json(res)
        return 0
    who = f"({res['identity']}) " if res["identity"] else ""
    target = f" -> {res['backend']}" if res["backend"] else ""
    svc = f"{res['service']} " if res["service"] else ""
    why = f" {res['reason']}" if res["reason"] else ""
    via = f" in {res['encapsulated']['forwarding']}" if res.get("encapsulated") else ""
    # escape(): "[fd00::1]:80" would otherwise be read as rich markup and vanish.
    console.print(escape(f"{who}{host_port(src, sport)} => {svc}{host_port(dst, dport)}{target} {args.proto} ")
                  + f"[bold]{res['verdict']}[/]" + escape(f"{via}{why}"), highlight=False)
    return 0


def cmd_service(args) -> int:
    import yaml

    if args.action == "put":
        try:
            svc = yaml.safe_load(Path(args.file).read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            return _fail(f"{args.file}: YAML syntax error{at}: {getattr(e, 'problem', None) or e}")
        res = api.call(args.socket, "upsert_service", service=svc)
    else:
        res = api.call(args.socket, "delete_service", name=args.name)
    if args.json:
        _print_json(res)
    else:
        console.print(escape(f"{args.action}: {res}"))
    return 0


def cmd_upgrade(args) -> int:
    res = api.call(args.socket, "upgrade", object=str(Path(args.object).resolve()))
    if args.json:
        _print_json(res)
    else:
        console.print(f"now running {res['object']} (program {res['prog_id']}) on "
                      f"{', '.join(res['interfaces'])}")
    return 0


def cmd_monitor(args) -> int:
    from .monitor import Filters, run

    for flag in ("count", "duration"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            return _fail(f"--{flag} must be > 0, not {v}")
    try:
        return run(args.socket, bpffs=args.bpffs, object_path=args.object, as_json=args.json,
                   filters=Filters(args.service, args.identity, args.verdict),
                   count=args.count, duration=args.duration)
    except ValueError as e:
        return _fail(str(e))


def cmd_down(args) -> int:
    from .dataplane import Dataplane

    from .bpffs import ensure_bpffs

    # Under `ip netns exec`: the host's bpffs, to see the daemon's pins
    # (never a new one: it would hold none).
    ensure_bpffs(args.bpffs, create=False)
    try:
        api.call(args.socket, "shutdown", timeout=5)
    except api.ApiError:
        pass                             # no daemon: just detach what is pinned
    done = Dataplane.detach(Path(args.bpffs), purge=args.purge)
    console.print(f"detached from {', '.join(done) or 'nothing'}"
                  + (f"; removed pinned maps in {args.bpffs}" if args.purge else ""))
    return 0


def cmd_demo(args) -> int:
    if args.nodes > 1:
        from .scaleout_demo import main as scaleout_main

        return scaleout_main(args)
    from .demo import main as demo_main

    return demo_main(args)


def cmd_bench(args) -> int:
    from bench.cli import main as bench_main

    return bench_main(args=args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdplb", description="XDP L4 load balancer")
    p.add_argument("--socket", default=api.DEFAULT_SOCKET, help="API socket (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="run the daemon: attach, apply, serve the API")
    s.add_argument("--config", required=True)
    s.add_argument("--netns", help="network namespace to run in (the demo and tests use it)")
    s.add_argument("--object", help="BPF object (default: the built bpf/xdp/xdplb.o)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("apply", help="apply a config file through the daemon, atomically per service")
    s.add_argument("-f", "--file", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("status", help="daemon, interfaces and map state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("kubernetes", help="Kubernetes mode: watches, objects, skipped features, latency")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_kubernetes)

    s = sub.add_parser("stats", help="counters per service, backend, identity and drop reason")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="also list services without traffic")
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("flow", help="which backend the live program would pick, or why it drops")
    s.add_argument("src", metavar="SRC:SPORT")
    s.add_argument("dst", metavar="DST:DPORT")
    s.add_argument("proto", choices=["tcp", "udp"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_flow)

    s = sub.add_parser("service", help="add/replace or delete one service through the daemon")
    sv = s.add_subparsers(dest="action", required=True)
    put = sv.add_parser("put", help="add or replace the service described by a YAML file")
    put.add_argument("-f", "--file", required=True)
    put.add_argument("--json", action="store_true")
    rm = sv.add_parser("delete", help="delete a service by name")
    rm.add_argument("name")
    rm.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_service)

    s = sub.add_parser("upgrade", help="replace the running program with a new build, atomically")
    s.add_argument("--object", required=True, help="the new BPF object (xdplb.o)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_upgrade)

    s = sub.add_parser(
        "monitor", help="stream flow events: new forwarded flows and drops",
        description="Print one line per flow event from the data plane: the first packet of "
        "each new forwarded flow and every drop, sampled and rate-limited in the kernel (config "
        "`monitor:`; `events_lost` in `xdplb stats` counts what the limit dropped). Reads the "
        "pinned ring buffer directly and asks the daemon only for names. Only one monitor at a "
        "time sees every event: a ring buffer has a single reader position, so two monitors "
        "split the events between them.")
    s.add_argument("--service", metavar="NAME", help="only events of this service")
    s.add_argument("--identity", metavar="NAME", help="only events from this source identity")
    s.add_argument("--verdict", choices=["forwarded", "dropped"])
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--count", type=int, metavar="N", help="stop after N events")
    s.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    s.add_argument("--bpffs", help="pin directory (default: the daemon's); without a daemon, "
                   "events show numeric ids")
    s.add_argument("--object", help="BPF object for the event layout (default: the built one)")
    s.set_defaults(fn=cmd_monitor)

    s = sub.add_parser("down", help="stop the daemon and detach XDP on purpose")
    s.add_argument("--bpffs", default=DEFAULT_BPFFS)
    s.add_argument("--purge", action="store_true", help="also remove the pinned maps (drops all flows)")
    s.set_defaults(fn=cmd_down)

    s = sub.add_parser("demo", help="build a veth lab and show xdplb balancing real HTTP traffic")
    s.add_argument("--requests", type=int, default=300)
    s.add_argument("--fillers", type=int, default=10000, help="extra services to load, to show scale")
    s.add_argument("--nodes", type=int, default=1, choices=range(1, 11), metavar="N",
                   help="N > 1: N nodes behind a BIRD 2 router doing ECMP (scale-out)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_demo)

    from .bgp_cli import add_parsers as bgp_parsers

    bgp_parsers(sub)

    from .backend_cli import add_arguments as backend_arguments

    s = sub.add_parser("backend", help="DSR backend: decapsulate the balancer's tunnels for "
                       "local VIPs (attach, detach, status)")
    backend_arguments(s)

    from bench.cli import add_arguments as bench_arguments

    s = sub.add_parser("bench", help="benchmark xdplb against kube-proxy's iptables and nftables "
                       "layouts on a veth lab (--quick: the CI gate)")
    bench_arguments(s)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:              # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if is_operational(e):            # the operator's to fix: one line, no traceback
            return _fail(headline(e), problems(e))
        raise                            # a bug: keep the traceback


if __name__ == "__main__":
    sys.exit(main())
