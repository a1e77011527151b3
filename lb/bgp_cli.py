"""`xdplb bgp`, `xdplb drain`, `xdplb bird-config`: the BGP side of a node
(README "Scale-out")."""

from __future__ import annotations

import argparse
import json
import time

from . import api


def cmd_bgp(args) -> int:
    st = api.call(args.socket, "bgp")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"announced: {', '.join(st['announced'] or []) or '(none)'}"
          f"{'  [draining]' if st['draining'] else ''}")
    for name, state in (st["sessions"] or {}).items():
        print(f"session {name}: {state}")
    if st["error"]:
        print(f"error: {st['error']}")
    return 0


def new_flows(socket: str) -> int:
    """Flows this node gave a backend so far (the program's ct_new counter)."""
    return api.call(socket, "stats")["global"]["ct_new"]["packets"]


def cmd_drain(args) -> int:
    """Withdraw every VIP, then wait until `--quiet` seconds pass without a
    new flow (the router has converged) or `--timeout` runs out."""
    if args.undo:
        api.call(args.socket, "bgp", drain=False)
        print("drain undone: the VIPs are announced again")
        return 0
    st = api.call(args.socket, "bgp", drain=True)
    if st["error"]:
        raise api.ApiError(f"the VIPs may still be announced: {st['error']}")
    start = time.monotonic()
    last, quiet_since = new_flows(args.socket), start
    while (now := time.monotonic()) - quiet_since < args.quiet:
        if now - start > args.timeout:
            print(f"not drained: new flows still arrive after {args.timeout:g}s")
            return 1
        time.sleep(0.1)
        n = new_flows(args.socket)
        if n != last:
            last, quiet_since = n, time.monotonic()
    print(f"drained in {quiet_since - start:.1f}s: every VIP withdrawn, no new flow for "
          f"{args.quiet:g}s; the node can be stopped (established flows keep their backends "
          f"on the other nodes)")
    return 0


def cmd_bird_config(args) -> int:
    """Write BIRD's files from the config's bgp: section, before BIRD starts."""
    from .announce import vips_path, write_bird_files
    from .config import load_config

    cfg = load_config(args.config)
    if cfg.bgp is None:
        raise api.ApiError(f"{args.config}: no bgp: section")
    write_bird_files(cfg.bgp)
    print(f"wrote {cfg.bgp.bird_config} (VIP routes in {vips_path(cfg.bgp)})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bgp", help="BGP: the VIPs announced, the sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bgp)

    s = sub.add_parser("drain", help="withdraw this node's VIPs and wait until no new flow arrives")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds (default %(default)s)")
    s.add_argument("--quiet", type=float, default=2.0,
                   help="seconds without a new flow that mean converged (default %(default)s)")
    s.add_argument("--undo", action="store_true", help="announce the VIPs again")
    s.set_defaults(fn=cmd_drain)

    s = sub.add_parser("bird-config", help="write BIRD's config from the bgp: section (before BIRD starts)")
    s.add_argument("--config", required=True)
    s.set_defaults(fn=cmd_bird_config)
