"""The loaded XDP program, its pinned maps and its XDP links.

Pin layout under the config's ``bpffs`` directory (default /sys/fs/bpf/xdplb)::

    maps/<map name>     every map but the dry-run probe
    links/<ifname>      one bpf_link per attached interface

Maps and links outlive the daemon: a restart (or kill -9) leaves traffic
flowing, and the next start reuses the maps and swaps the program in the
pinned links atomically (bpf_link_update).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from pathlib import Path

import numpy as np

from loader import BpfError, BpfObject, InterfaceNotFound, LinkInfo, Map, MapLayoutMismatch, XdpLink, xdp_query
from loader.netlink import ifindex as lookup_ifindex
from loader.netlink import mac as lookup_mac
from loader.xdp import MODES

from .config import Config

PROGRAM = "xdplb_main"
# No state: not pinned with the maps, nor shared with the dry-run copy.
# icmp_errors, the program array of the ICMP error path's tail call, belongs
# to its own program: each load pins its own (TAIL_CALLS).
UNPINNED_MAPS = frozenset({"probe", "fib_scratch", "nat_scratch", "icmp_scratch", "icmp_errors"})
TAIL_CALLS = "icmp_errors"
log = logging.getLogger("xdplb.dataplane")


def default_object_path() -> Path:
    env = os.environ.get("XDPLB_OBJECT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "bpf" / "xdp" / "xdplb.o"


def _pin_tail_calls(obj: BpfObject, pin_dir: Path) -> None:
    """Pin this load's tail-call program array as pin_dir/tail/icmp_errors,
    replacing the previous load's. A program array is emptied when no file
    descriptor or pin holds it: unpinned, the ICMP error path of a running
    program would vanish with the process that loaded it (a killed
    daemon). The previous load's array is left to its program's process."""
    if TAIL_CALLS not in obj.maps:
        return
    path = pin_dir / "tail" / TAIL_CALLS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    obj.maps[TAIL_CALLS].pin(path)


class LayoutVersionError(BpfError):
    pass


class Constants:
    """Enums and limits read from the object's BTF (constants.h), as
    attributes: ``consts.DROP_POLICY``."""

    def __init__(self, enums: dict[str, dict[str, int]]):
        self.enums = enums
        for members in enums.values():
            self.__dict__.update(members)

    def names(self, enum: str) -> dict[int, str]:
        return {v: k for k, v in self.enums[enum].items()}


def addr_word(ip) -> int:
    """An IPv4 address as the __u32 that holds it in network order."""
    return int.from_bytes(ip.packed, "little")


def word_addr(word: int):
    import ipaddress

    return ipaddress.IPv4Address(int(word).to_bytes(4, "little"))


def addr_words(ip) -> list[int]:
    """An address of either family as the __u32[4] of maps.h: network order
    in memory, IPv4 in word 0 and the rest zero."""
    raw = ip.packed.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]


def words_addr(words, family: int, consts):
    """The address that addr_words() wrote, by the record's `family`."""
    import ipaddress

    if family == consts.FAMILY_IPV6:
        return ipaddress.IPv6Address(b"".join(int(w).to_bytes(4, "little") for w in words))
    return word_addr(words[0])


def set_addr(field, ip) -> None:
    """Write `ip` into a ctypes __u32[4] field."""
    field[:] = addr_words(ip)


def is_ipv6_int(n: int) -> bool:
    """An address int (ipaddress's `_ip`) of an IPv6 address: the config
    refuses ::/96, so every IPv6 address is at least 2**32 (lb/config.py)."""
    return n >> 32 != 0


def family_of(ip, consts) -> int:
    return consts.FAMILY_IPV6 if ip.version == 6 else consts.FAMILY_IPV4


def htons(port: int) -> int:
    return int.from_bytes(int(port).to_bytes(2, "big"), "little")


ntohs = htons


class Dataplane:
    """Open (or create) the pinned maps, load the program, attach it."""

    def __init__(self, obj: BpfObject, pin_dir: Path, consts: Constants):
        self.obj = obj
        self.pin_dir = pin_dir
        self.consts = consts
        self.maps: dict[str, Map] = obj.maps
        self.prog = obj.program(PROGRAM)
        self._views: dict[str, np.ndarray] = {}

    # -- lifecycle -----------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, object_path: Path | None = None, *, dry_run: bool = False,
             share_with: "Dataplane | None" = None) -> "Dataplane":
        obj = BpfObject(object_path or default_object_path())
        consts = Constants(obj.btf.enums())
        pin_dir = Path(cfg.bpffs)
        try:
            _size_maps(obj, cfg, consts)
            if dry_run:
                obj.set_rodata("dry_run", 1)
            if share_with is not None:
                for name, m in share_with.maps.items():
                    if name not in UNPINNED_MAPS:
                        obj.reuse_map_fd(name, m.fd)
            else:
                try:
                    obj.reuse_pinned(pin_dir / "maps")
                except MapLayoutMismatch as e:
                    diffs = ", ".join(f"{k}: pinned={p} now={n}" for k, (p, n) in e.diffs.items())
                    raise LayoutVersionError(
                        f"pinned map {e.map_name!r} in {pin_dir / 'maps'} differs from this build and "
                        f"config ({diffs}): another layout version, or changed `limits:`. Run "
                        f"`xdplb down --purge` to remove the pins (this drops all flows), or start the "
                        f"build and limits that made them") from None
            obj.load()
            if share_with is None and not dry_run:
                names = [n for n in obj.map_names() if n in obj.maps and n not in UNPINNED_MAPS]
                obj.pin_maps(pin_dir / "maps", names)
                _pin_tail_calls(obj, pin_dir)
        except BaseException:
            obj.close()
            raise
        dp = cls(obj, pin_dir, consts)
        if share_with is None and not dry_run:
            dp._check_layout_version()
        return dp

    def close(self) -> None:
        self._views.clear()
        self.obj.close()

    def __enter__(self) -> "Dataplane":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_layout_version(self) -> None:
        meta = self.maps["meta"]
        cur = meta.lookup(0)
        want = self.consts.XDPLB_LAYOUT_VERSION
        if cur.layout_version == 0:
            cur.layout_version = want
            meta.update(0, cur)
        elif cur.layout_version != want:
            raise LayoutVersionError(
                f"pinned maps in {self.pin_dir / 'maps'} have layout version "
                f"{cur.layout_version}, this build uses {want}; refusing to reuse them. "
                f"Run `xdplb down --purge` to remove them (this drops all flows)."
            )

    # -- XDP links ------------------------------------------------------

    def link_path(self, ifname: str) -> Path:
        return self.pin_dir / "links" / ifname

    def attach(self, ifnames: list[str], mode: str = "native") -> list[int]:
        """Attach to (or swap the program on) every interface; returns ifindexes.

        A pinned link whose interface is gone (deleted, or moved to another
        network namespace; re-created since under the same name) is dead:
        it is replaced, and the maps, flows included, are kept. A pinned
        link still running on another interface here is refused, and so is
        a missing interface, before any link is touched."""
        plan = []
        for ifname in ifnames:
            idx, info = lookup_ifindex(ifname), self._pinned(ifname)
            holder = _holder(info.ifindex, info.prog_id) if info else None
            if holder is not None and info.ifindex != idx:
                path = self.link_path(ifname)
                raise BpfError(
                    f"pinned link {path} runs on {holder} (ifindex {info.ifindex}), not on {ifname} "
                    f"(ifindex {idx}): {ifname} was renamed or re-created while {holder} kept the "
                    f"program; `rm {path}` detaches it from {holder} (`xdplb down` detaches every "
                    f"interface), or give {holder} its name back")
            plan.append((ifname, idx, info, holder))
        for ifname, idx, info, holder in plan:
            path = self.link_path(ifname)
            if info is None:
                self._attach_new(ifname, idx, mode)
            elif holder is not None:    # live, on this very interface
                with XdpLink.from_pin(str(path)) as link:
                    link.update(self.prog.fd)
            else:
                path.unlink()           # its last reference: the dead link goes with it
                self._attach_new(ifname, idx, mode)
                log.warning(f"replaced a dead pinned XDP link (its interface was deleted or moved "
                            f"away; the maps and flows are kept) interface={ifname} ifindex={idx} "
                            f"old_ifindex={info.ifindex} old_link_id={info.id} pin={path}")
            self.maps["tx_ports"].update(idx, ctypes.c_uint32(idx))
            self.record_mac(idx)
        return [idx for _, idx, _, _ in plan]

    def record_mac(self, ifindex: int) -> None:
        """Tell the program the MAC of `ifindex`: unicast frames for another
        one are passed untouched (bpf/xdp/dmac.h). Read at every attach,
        so `xdplb apply` picks up a changed address."""
        m = self.maps["if_macs"]
        mac = lookup_mac(ifindex)
        if len(mac) == 6:       # an Ethernet address; other link types stay unchecked
            m.update(ifindex, m.value_type(addr=(ctypes.c_uint8 * 6)(*mac)))

    def _pinned(self, ifname: str) -> LinkInfo | None:
        path = self.link_path(ifname)
        if not path.exists():
            return None
        with XdpLink.from_pin(str(path)) as link:
            return link.info()

    def _attach_new(self, ifname: str, idx: int, mode: str) -> None:
        path = self.link_path(ifname)
        link = XdpLink.attach(self.prog.fd, idx, mode=mode, ifname=ifname)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            link.pin(str(path))
        finally:
            link.close()

    def detach_others(self, keep: list[str] | tuple[str, ...]) -> list[str]:
        """Detach pinned links of interfaces that are no longer configured."""
        links = self.pin_dir / "links"
        gone = [p.name for p in links.iterdir() if p.name not in keep] if links.is_dir() else []
        for name in gone:
            self.detach_link(self.pin_dir, name)
        return gone

    @staticmethod
    def detach_link(pin_dir: Path, ifname: str) -> bool:
        path = pin_dir / "links" / ifname
        if not path.exists():
            return False
        link = XdpLink.from_pin(str(path))
        try:
            if link.info().ifindex:     # a dead link (interface gone) has nothing to detach
                link.detach()
        finally:
            link.close()
        path.unlink()                   # the last reference: the link is freed
        return True

    @staticmethod
    def detach(pin_dir: Path, purge: bool = False) -> list[str]:
        """Detach every pinned link (and optionally remove the pinned maps)."""
        done = []
        links = pin_dir / "links"
        if links.is_dir():
            for path in sorted(links.iterdir()):
                Dataplane.detach_link(pin_dir, path.name)
                done.append(path.name)
            links.rmdir()
        # Nothing runs the program the tail-call array holds any more.
        (pin_dir / "tail" / TAIL_CALLS).unlink(missing_ok=True)
        if (pin_dir / "tail").is_dir():
            (pin_dir / "tail").rmdir()
        if purge:
            maps = pin_dir / "maps"
            if maps.is_dir():
                for path in maps.iterdir():
                    path.unlink()
                maps.rmdir()
            if pin_dir.is_dir() and not any(pin_dir.iterdir()):
                pin_dir.rmdir()
        return done

    def attached(self) -> dict[str, int]:
        """The program each pinned link runs, by interface; 0 for a link
        whose interface is gone (detached)."""
        out = {}
        links = self.pin_dir / "links"
        if links.is_dir():
            for path in sorted(links.iterdir()):
                link = XdpLink.from_pin(str(path))
                try:
                    info = link.info()
                    out[path.name] = info.prog_id if info.ifindex else 0
                finally:
                    link.close()
        return out

    # -- views --------------------------------------------------------------

    def view(self, name: str) -> np.ndarray:
        """A numpy view of an mmap()able array map (backends, maglev_pool)."""
        v = self._views.get(name)
        if v is None:
            m = self.maps[name]
            stride = -(-m.value_size // 8) * 8  # array elements are 8-byte aligned
            if name == "maglev_pool":
                dt, count = np.dtype(np.uint32), m.max_entries * stride // 4
            else:
                dt, count = self.obj.layouts.dtype(_struct_of(self.obj, name)), m.max_entries
                assert dt.itemsize == stride, (name, dt.itemsize, stride)
            v = np.frombuffer(m.mmap(), dtype=dt, count=count)
            self._views[name] = v
        return v

    def struct(self, name: str):
        return self.obj.layouts.struct(name)


def _holder(ifindex: int, prog_id: int) -> str | None:
    """Where a pinned link with this link info runs in this network
    namespace: the name of interface `ifindex` if its XDP program is
    `prog_id`. None if the link is dead: ifindex 0 (its interface was
    deleted), or no such interface running it here (moved to another
    namespace; the number may have been given to a new interface since)."""
    if ifindex == 0:
        return None
    try:
        if not any(xdp_query(ifindex, mode) == prog_id for mode in MODES):
            return None
        return socket.if_indextoname(ifindex)
    except (InterfaceNotFound, OSError):
        return None


def _struct_of(obj: BpfObject, map_name: str) -> str:
    btf = obj.btf
    vid = btf.map_defs()[map_name].value_type_id
    return btf.type(btf.resolve(vid)).name


def _size_maps(obj: BpfObject, cfg: Config, consts: Constants) -> None:
    limits = cfg.limits
    chunk = consts.MAGLEV_CHUNK_SLOTS
    if limits.maglev_slots:
        obj.set_max_entries("maglev_pool", -(-limits.maglev_slots // chunk))
    if limits.conntrack:
        obj.set_max_entries("conntrack", limits.conntrack)
    if limits.nat:
        obj.set_max_entries("rev_nat", limits.nat)
