"""`xdplb backend`: set up a DSR backend (decapsulation, VIPs) and show it.

    xdplb backend attach eth0 --vip 10.96.0.10 --vip fd00:96::10
    xdplb backend status [--json]
    xdplb backend detach eth0 [--purge]

Runs once and exits: the pinned link keeps the program attached.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from rich.console import Console
from rich.table import Table

from loader import xdp_query

from . import backend_host as host
from .bpffs import ensure_bpffs
from .backend import (DEFAULT_PIN_DIR, MODES, BackendError, Decap, IPAddress, address_order,
                      parse_address, parse_vip)

console = Console()


def attach(ifname: str, *, vips: list[str] | None = None, gue_port: int | None = None,
           tunnel_dsts: list[str] | None = None, pin_dir: Path = DEFAULT_PIN_DIR,
           mode: str = "native", object_path: Path | None = None) -> dict[str, Any]:
    """Attach (or refresh) decapsulation on `ifname`. `vips` replaces the VIP
    set (None keeps it); `tunnel_dsts` defaults to the interface's addresses."""
    # Everything the user typed is checked before anything changes.
    vip_set = {parse_vip(v) for v in vips} if vips is not None else None
    dsts = {parse_address(a, "tunnel address") for a in tunnel_dsts or []}
    if gue_port is not None and not 0 <= gue_port <= 65535:
        raise BackendError(f"invalid GUE port {gue_port}: must be 0 (off) or 1..65535")
    if mode not in MODES:
        raise BackendError(f"invalid XDP mode {mode!r}: one of {', '.join(MODES)}")
    with IPRoute() as ipr:
        ifindex = host.ifindex(ipr, ifname)
    v6 = sorted(str(ip) for ip in vip_set or () if ip.version == 6)
    if v6 and not host.ipv6_enabled():
        raise BackendError(f"IPv6 is disabled on {host.VIP_DEVICE}: the VIP {v6[0]} cannot be a "
                           "local address (net.ipv6.conf.lo.disable_ipv6)")
    ensure_bpffs(pin_dir)
    other = xdp_query(ifindex)
    if other and not (pin_dir / "links" / ifname).exists():   # before any pin is made
        raise BackendError(f"another XDP program (id {other}) is attached to {ifname}, not "
                           f"through {pin_dir}; detach it first")
    dsts = dsts or set(host.interface_addresses(ifname))
    if not dsts:
        raise BackendError(f"{ifname} has no address to accept tunnels on; name one with "
                           "--tunnel-dst ADDR")
    with Decap.load(pin_dir, object_path) as d:
        if vip_set is None:
            vip_set = set(d.vips())
        # The link first: if it cannot be made (another XDP program, no
        # native mode) the host is left as it was. A new link decapsulates
        # nothing until the tunnel addresses are in.
        prog_id = d.attach(ifname, ifindex, mode)
        if gue_port is not None:
            d.set_gue_port(gue_port)
        d.set_tunnel_dsts(ifindex, dsts)
        # Then ARP, the addresses, the map: the program never passes up a
        # packet for a VIP the stack would not take, and no VIP is ever
        # answered for in ARP.
        sysctls = host.quiet_arp(ifname) if any(ip.version == 4 for ip in vip_set) else {}
        added = host.add_vip_addresses(vip_set)
        d.set_vips(vip_set)
        removed = host.remove_vip_addresses(vip_set)
        notes = [] if vip_set else ["no VIPs: nothing is decapsulated (give them with --vip ADDR)"]
        note = host.rp_filter_note(ifname)
        if note:
            notes.append(note)
        return {"interface": ifname, "ifindex": ifindex, "prog_id": prog_id, "mode": mode,
                "vips": _strs(sorted(vip_set, key=address_order)), "tunnel_dsts": _strs(sorted(dsts, key=address_order)),
                "gue_port": d.gue_port, "addresses_added": _strs(added),
                "addresses_removed": _strs(removed), "sysctls": sysctls, "notes": notes}


def detach(ifname: str, *, purge: bool = False, pin_dir: Path = DEFAULT_PIN_DIR,
           object_path: Path | None = None) -> dict[str, Any]:
    """Detach from `ifname`; with purge, also remove the VIP addresses we
    added and the pinned maps (refused while another interface is attached)."""
    d = Decap.open_pinned(pin_dir, object_path)
    if d is None:        # nothing pinned; a purge still takes back our addresses
        removed = host.remove_vip_addresses(set()) if purge else []
        return {"interface": ifname, "detached": False, "purged": purge,
                "addresses_removed": _strs(removed)}
    with d:
        if purge:
            others = [s.ifname for s in d.links() if s.ifname != ifname]
            if others:
                raise BackendError(f"--purge: still attached to {', '.join(others)}; "
                                   "detach those first")
        detached = d.detach(ifname)
        removed: list[IPAddress] = []
        if purge:
            d.set_vips(set())
            removed = host.remove_vip_addresses(set())
            d.purge()
    return {"interface": ifname, "detached": detached, "purged": purge,
            "addresses_removed": _strs(removed)}


def status(*, pin_dir: Path = DEFAULT_PIN_DIR, object_path: Path | None = None) -> dict[str, Any]:
    d = Decap.open_pinned(pin_dir, object_path)
    if d is None:
        return {"pin_dir": str(pin_dir), "attached": False, "interfaces": [], "vips": []}
    with d:
        dsts = d.tunnel_dsts()
        local = host.vip_addresses()
        interfaces = [{"interface": s.ifname, "ifindex": s.ifindex, "prog_id": s.prog_id,
                       "mode": s.mode, "tunnel_dsts": _strs(dsts.get(s.ifindex, []))}
                      for s in d.links()]
        vips = [{"address": str(ip), "packets": p, "bytes": b, "local_address": local.get(ip)}
                for ip, (p, b) in sorted(d.vips().items(), key=lambda i: address_order(i[0]))]
        return {"pin_dir": str(pin_dir), "attached": bool(interfaces), "gue_port": d.gue_port,
                "interfaces": interfaces, "vips": vips, "counters": d.counters(),
                "drops": d.drops()}


def _strs(ips: list[IPAddress]) -> list[str]:
    return [str(ip) for ip in ips]


# -- the command line ---------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_attach(args: argparse.Namespace) -> int:
    res = attach(args.interface, vips=args.vip, gue_port=args.gue_port,
                 tunnel_dsts=args.tunnel_dst, pin_dir=Path(args.bpffs), mode=args.xdp_mode,
                 object_path=Path(args.object) if args.object else None)
    if args.json:
        _print_json(res)
        return 0
    console.print(f"decapsulating on {res['interface']} ({res['mode']}, program {res['prog_id']}) "
                  f"for {', '.join(res['vips']) or 'no VIP'}; tunnels to "
                  f"{', '.join(res['tunnel_dsts'])}; GUE port {res['gue_port'] or 'off'}",
                  highlight=False, soft_wrap=True)
    for key, label in (("addresses_added", "added to lo"), ("addresses_removed", "removed from lo")):
        if res[key]:
            console.print(f"  {label}: {', '.join(res[key])}", highlight=False, soft_wrap=True)
    for name, value in res["sysctls"].items():
        console.print(f"  set {name}={value}", highlight=False, soft_wrap=True)
    for note in res["notes"]:
        console.print(f"  note: {note}", highlight=False, soft_wrap=True)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    res = detach(args.interface, purge=args.purge, pin_dir=Path(args.bpffs),
                 object_path=Path(args.object) if args.object else None)
    if args.json:
        _print_json(res)
        return 0
    what = "detached from" if res["detached"] else "not attached to"
    extra = ""
    if res["purged"]:
        extra = f"; removed the pinned maps in {args.bpffs}" + (
            f" and {', '.join(res['addresses_removed'])} from lo" if res["addresses_removed"] else "")
    console.print(f"{what} {args.interface}{extra}", highlight=False, soft_wrap=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = status(pin_dir=Path(args.bpffs), object_path=Path(args.object) if args.object else None)
    if args.json:
        _print_json(st)
        return 0
    if "counters" not in st:
        console.print(f"not set up: nothing pinned in {st['pin_dir']}", highlight=False)
        return 0
    t = Table(title="xdplb backend", show_header=False)
    t.add_row("pins", st["pin_dir"])
    t.add_row("GUE port", str(st["gue_port"] or "off"))
    for i in st["interfaces"]:
        where = f"{i['mode'] or '?'}, program {i['prog_id']}" if i["ifindex"] else "interface gone"
        t.add_row(i["interface"], f"{where}; tunnels to {', '.join(i['tunnel_dsts']) or 'nothing'}")
    if not st["interfaces"]:
        t.add_row("interfaces", "none attached")
    console.print(t)
    v = Table(title="VIPs")
    for col in ("VIP", "local address", "packets", "bytes"):
        v.add_column(col, justify="right" if col in ("packets", "bytes") else "left")
    for vip in st["vips"]:
        v.add_row(vip["address"], {"xdplb": "on lo (added by xdplb)", "other": "on lo"}.get(
            vip["local_address"], "missing: the stack drops its packets"),
            str(vip["packets"]), str(vip["bytes"]))
    console.print(v)
    c = Table(title="packets")
    for col in ("counter", "packets", "bytes"):
        c.add_column(col, justify="left" if col == "counter" else "right")
    for name, n in st["counters"].items():
        c.add_row(name, str(n["packets"]), str(n["bytes"]))
    for name, n in st["drops"].items():
        if n["packets"]:
            c.add_row(f"  drop: {name}", str(n["packets"]), str(n["bytes"]))
    console.print(c)
    return 0


def _one_line(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """System errors (netlink, /proc/sys) become one-line BackendErrors,
    which `xdplb` prints without a traceback."""
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except NetlinkError as e:
            raise BackendError(f"backend {args.backend_cmd}: netlink: {os.strerror(e.code)}") from None
        except OSError as e:
            raise BackendError(f"backend {args.backend_cmd}: {e.strerror or e}"
                               + (f": {e.filename}" if e.filename else "")) from None
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `backend` subcommands, under the parser `xdplb` gives us."""
    sub = p.add_subparsers(dest="backend_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bpffs", default=str(DEFAULT_PIN_DIR),
                        help="pin directory (default %(default)s)")
    common.add_argument("--object", help="decap BPF object (default: the built bpf/decap/decap.o)")
    common.add_argument("--json", action="store_true")

    s = sub.add_parser("attach", parents=[common],
                       help="decapsulate DSR tunnels for these VIPs on IFACE (re-run to update)")
    s.add_argument("interface", metavar="IFACE")
    s.add_argument("--vip", action="append", metavar="ADDR",
                   help="a VIP this backend serves (repeat; replaces the set; omitted: keep it)")
    s.add_argument("--gue-port", type=int, metavar="N",
                   help="GUE's UDP port (default 6080 on first attach; 0 turns GUE off)")
    s.add_argument("--tunnel-dst", action="append", metavar="ADDR",
                   help="accept tunnels to this address (repeat; default: IFACE's addresses)")
    s.add_argument("--xdp-mode", choices=MODES, default="native")
    s.set_defaults(fn=_one_line(cmd_attach))

    s = sub.add_parser("detach", parents=[common], help="stop decapsulating on IFACE")
    s.add_argument("interface", metavar="IFACE")
    s.add_argument("--purge", action="store_true",
                   help="also remove the VIP addresses xdplb added and the pinned maps")
    s.set_defaults(fn=_one_line(cmd_detach))

    s = sub.add_parser("status", parents=[common],
                       help="attached interfaces, VIPs and counters by reason")
    s.set_defaults(fn=_one_line(cmd_status))
