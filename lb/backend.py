"""The backend side of DSR: the decapsulation program, its maps and links.

A DSR load balancer encapsulates each packet towards the backend it picked
(IPIP, IPv6 tunnel or GUE). `bpf/decap/decap.c`, attached to the backend's
interface, strips the outer header of packets whose outer destination is a
tunnel address of that interface and whose inner destination is one of the
backend's VIPs, and passes the inner packet to the stack. lb/backend_host.py
makes the VIPs local addresses; lb/backend_cli.py is `xdplb backend`.

Pin layout under the pin directory (default /sys/fs/bpf/xdplb-backend)::

    maps/<map name>     vips, tunnel_dsts, config, stats, drops
    links/<ifname>      one bpf_link per attached interface

As with the balancer's pins, the links outlive the command that made them:
decapsulation needs no daemon.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import BpfError, BpfObject, Map, XdpLink, xdp_query

from .bpffs import ensure_bpffs
from .dataplane import Constants, htons, ntohs

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/xdplb-backend")
PROGRAM = "xdplb_decap"
MODES = ("native", "generic")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BackendError(BpfError):
    """A backend-side setup problem, said in one line."""


def default_object_path() -> Path:
    """$XDPLB_DECAP_OBJECT, the tree's build, or what `make install` put
    beside the virtualenv (/opt/xdplb/decap.o for /opt/xdplb/venv)."""
    env = os.environ.get("XDPLB_DECAP_OBJECT")
    if env:
        return Path(env)
    built = Path(__file__).resolve().parent.parent / "bpf" / "decap" / "decap.o"
    installed = Path(sys.prefix).parent / "decap.o"
    return installed if not built.exists() and installed.exists() else built


def parse_vip(text: str) -> IPAddress:
    """A VIP as given on the command line: one unicast address, no prefix."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise BackendError(f"invalid VIP {text!r}: not an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or \
            (isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255")):
        raise BackendError(f"invalid VIP {text!r}: not a unicast address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        raise BackendError(f"invalid VIP {text!r}: write the IPv4 address {ip.ipv4_mapped} instead")
    return ip


def parse_address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise BackendError(f"invalid {what} {text!r}: not an IPv4 or IPv6 address") from None


def addr_words(ip: IPAddress) -> list[int]:
    """An address as the __u32[4] that holds it: network order, IPv4 in [0]."""
    raw = ip.packed.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]


def words_addr(family: int, words: Any, consts: Constants) -> IPAddress:
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    if family == consts.DECAP_FAMILY_IPV4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


@dataclass(frozen=True)
class LinkState:
    ifname: str
    ifindex: int       # 0 once the interface is gone
    prog_id: int
    mode: str | None   # native or generic; None if it cannot be told


class Decap:
    """The pinned maps, and the program when opened with load()."""

    def __init__(self, obj: BpfObject, pin_dir: Path, maps: dict[str, Map], loaded: bool):
        self.obj = obj
        self.pin_dir = pin_dir
        self.maps = maps
        self.consts = Constants(obj.btf.enums())
        self.loaded = loaded

    # -- opening -----------------------------------------------------------

    @classmethod
    def load(cls, pin_dir: Path = DEFAULT_PIN_DIR, object_path: Path | None = None) -> Decap:
        """Load the program, reusing the pinned maps (or pinning new ones)."""
        ensure_bpffs(pin_dir)        # mounted, or the host's bound in; else says what to run
        obj = BpfObject(object_path or default_object_path())
        try:
            obj.reuse_pinned(pin_dir / "maps")
            obj.load()
            obj.pin_maps(pin_dir / "maps")
            d = cls(obj, pin_dir, obj.maps, loaded=True)
            d._check_layout()
        except BaseException:
            obj.close()
            raise
        return d

    @classmethod
    def open_pinned(cls, pin_dir: Path = DEFAULT_PIN_DIR,
                    object_path: Path | None = None) -> Decap | None:
        """The pinned maps with their types from the object's BTF, without
        loading a program; None if nothing is pinned."""
        maps_dir = pin_dir / "maps"
        if not maps_dir.is_dir():
            return None
        obj = BpfObject(object_path or default_object_path())
        maps: dict[str, Map] = {}
        try:
            for name in obj.map_names():
                path = maps_dir / name
                if not path.exists():
                    raise BackendError(f"{maps_dir} lacks the map {name!r}: remove the pins with "
                                       "`xdplb backend detach IFACE --purge`")
                maps[name] = Map.open_pinned(path, obj.layouts.map_key_type(name),
                                             obj.layouts.map_value_type(name), name=name)
            d = cls(obj, pin_dir, maps, loaded=False)
            d._check_layout()
        except BaseException:
            for m in maps.values():
                m.close()
            obj.close()
            raise
        return d

    def _check_layout(self) -> None:
        cfg = self.maps["config"].lookup(0)
        want = self.consts.DECAP_LAYOUT_VERSION
        if cfg.layout_version == 0:          # fresh maps: the first load sets them up
            if self.loaded:
                cfg.layout_version = want
                cfg.gue_port = htons(self.consts.DECAP_GUE_PORT_DEFAULT)
                self.maps["config"].update(0, cfg)
        elif cfg.layout_version != want:
            raise BackendError(
                f"pinned maps in {self.pin_dir / 'maps'} have layout version "
                f"{cfg.layout_version}, this build uses {want}; remove them with "
                "`xdplb backend detach IFACE --purge`")

    def close(self) -> None:
        if not self.loaded:          # maps opened from pins are ours to close
            for m in self.maps.values():
                m.close()
        self.obj.close()

    def __enter__(self) -> Decap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prog_fd(self) -> int:
        if not self.loaded:
            raise BackendError("the decap program is not loaded (opened from pins only)")
        return self.obj.program(PROGRAM).fd

    # -- configuration -----------------------------------------------------

    def _addr_key(self, map_name: str, ip: IPAddress, **extra: int) -> Any:
        family = self.consts.DECAP_FAMILY_IPV4 if ip.version == 4 else self.consts.DECAP_FAMILY_IPV6
        key = self.maps[map_name].key_type(family=family, **extra)
        key.addr[:] = addr_words(ip)
        return key

    @property
    def gue_port(self) -> int:
        return ntohs(self.maps["config"].lookup(0).gue_port)

    def set_gue_port(self, port: int) -> None:
        if not 0 <= port <= 65535:
            raise BackendError(f"invalid GUE port {port}: must be 0 (off) or 1..65535")
        cfg = self.maps["config"].lookup(0)
        cfg.gue_port = htons(port)
        self.maps["config"].update(0, cfg)

    def vips(self) -> dict[IPAddress, tuple[int, int]]:
        """VIP -> (packets, bytes) decapsulated towards it."""
        return {words_addr(k.family, k.addr, self.consts):
                (sum(c.packets for c in v), sum(c.bytes for c in v))
                for k, v in self.maps["vips"].items()}

    def set_vips(self, vips: set[IPAddress]) -> tuple[list[IPAddress], list[IPAddress]]:
        """Make the VIP set exactly `vips`; kept VIPs keep their counters.
        Returns (added, removed)."""
        if len(vips) > self.maps["vips"].max_entries:
            raise BackendError(f"{len(vips)} VIPs: at most {self.maps['vips'].max_entries}")
        have = set(self.vips())
        added = sorted(vips - have, key=address_order)
        removed = sorted(have - vips, key=address_order)
        zero = self.maps["vips"].value_type()
        for ip in added:
            self.maps["vips"].update(self._addr_key("vips", ip), zero)
        for ip in removed:
            self.maps["vips"].delete(self._addr_key("vips", ip))
        return added, removed

    def tunnel_dsts(self) -> dict[int, list[IPAddress]]:
        """ifindex -> the outer destinations tunnels are accepted on there."""
        out: dict[int, list[IPAddress]] = {}
        for k in self.maps["tunnel_dsts"].keys():
            out.setdefault(k.ifindex, []).append(words_addr(k.family, k.addr, self.consts))
        return {i: sorted(a, key=address_order) for i, a in out.items()}

    def set_tunnel_dsts(self, ifindex: int, addrs: set[IPAddress]) -> None:
        m = self.maps["tunnel_dsts"]
        have = set(self.tunnel_dsts().get(ifindex, []))
        for ip in addrs - have:
            m.update(self._addr_key("tunnel_dsts", ip, ifindex=ifindex), 1)
        for ip in have - addrs:
            m.delete(self._addr_key("tunnel_dsts", ip, ifindex=ifindex))

    # -- counters ------------------------------------------------------------

    def _table(self, map_name: str, enum: str, prefix: str) -> dict[str, dict[str, int]]:
        out = {}
        for value, name in sorted(self.consts.names(enum).items()):
            if name.endswith("_MAX") or name == "DECAP_DROP_NONE":
                continue
            per_cpu = self.maps[map_name].lookup(value)
            out[name.removeprefix(prefix).lower()] = {
                "packets": sum(c.packets for c in per_cpu), "bytes": sum(c.bytes for c in per_cpu)}
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """What happened to packets: pass, not_vip, ipip4, ..., drop."""
        return self._table("stats", "decap_counter", "DECAP_CNT_")

    def drops(self) -> dict[str, dict[str, int]]:
        """Drops by reason."""
        return self._table("drops", "decap_drop", "DECAP_DROP_")

    # -- links ---------------------------------------------------------------

    def link_path(self, ifname: str) -> Path:
        return self.pin_dir / "links" / ifname

    def attach(self, ifname: str, ifindex: int, mode: str = "native") -> int:
        """Attach to `ifname`, or swap this program into its pinned link.
        Returns the program id now running there."""
        if mode not in MODES:
            raise BackendError(f"invalid XDP mode {mode!r}: one of {', '.join(MODES)}")
        path = self.link_path(ifname)
        if not path.exists():
            other = xdp_query(ifindex)
            if other:
                raise BackendError(f"another XDP program (id {other}) is attached to {ifname}, "
                                   f"not through {self.pin_dir}; detach it first")
        if path.exists():
            link = XdpLink.from_pin(str(path))
            try:
                info = link.info()
                if info.ifindex != ifindex:
                    raise BackendError(f"the pinned link {path} is not on {ifname} (ifindex "
                                       f"{ifindex}): run `xdplb backend detach {ifname}` first")
                current = _mode(ifindex, info.prog_id)
                if current and current != mode:
                    raise BackendError(f"{ifname} runs the decap program in {current} mode; "
                                       f"detach it first to change to {mode}")
                link.update(self.prog_fd)
            finally:
                link.close()
        else:
            link = XdpLink.attach(self.prog_fd, ifindex, mode=mode, ifname=ifname)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                link.pin(str(path))
            finally:
                link.close()
        return self.obj.program(PROGRAM).id

    def links(self) -> list[LinkState]:
        out = []
        links = self.pin_dir / "links"
        for path in sorted(links.iterdir()) if links.is_dir() else []:
            link = XdpLink.from_pin(str(path))
            try:
                info = link.info()
            finally:
                link.close()
            out.append(LinkState(path.name, info.ifindex, info.prog_id,
                                 _mode(info.ifindex, info.prog_id) if info.ifindex else None))
        return out

    def detach(self, ifname: str) -> bool:
        """Detach from `ifname` and forget its tunnel addresses."""
        path = self.link_path(ifname)
        if not path.exists():
            return False
        link = XdpLink.from_pin(str(path))
        try:
            ifindex = link.info().ifindex
            if ifindex:               # 0: the interface is gone, and the link with it
                link.detach()
        finally:
            link.close()
        path.unlink()
        if ifindex:
            self.set_tunnel_dsts(ifindex, set())
        return True

    def purge(self) -> None:
        """Remove the pinned maps and the pin directory (no link may remain)."""
        left = [s.ifname for s in self.links()]
        if left:
            raise BackendError(f"still attached to {', '.join(left)}: detach first")
        for d in (self.pin_dir / "links", self.pin_dir / "maps"):
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink()
                d.rmdir()
        if self.pin_dir.is_dir() and not any(self.pin_dir.iterdir()):
            self.pin_dir.rmdir()


def _mode(ifindex: int, prog_id: int) -> str | None:
    """Which mode runs prog_id on ifindex (a link does not say)."""
    for mode in MODES:
        try:
            if xdp_query(ifindex, mode) == prog_id:
                return mode
        except BpfError:
            return None
    return None


def address_order(ip: IPAddress) -> tuple[int, int]:
    """Sort key: IPv4 before IPv6, then by value."""
    return ip.version, int(ip)


__all__ = ["BackendError", "DEFAULT_PIN_DIR", "Decap", "LinkState", "address_order",
           "default_object_path", "parse_address", "parse_vip"]

