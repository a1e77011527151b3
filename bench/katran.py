"""Katran's own balancer as a bench engine (`xdplb bench --katran-object PATH`).

The object is the user's build of katran/lib/bpf/balancer.bpf.c from
Katran's tree (nothing of Katran ships here). Its maps are filled the way
its library (katran/lib/KatranLb.cpp) fills them:

- `vip_map` {vip, port, proto} -> {flags 0, vip_num}; `reals` id -> address,
  one id per address from 1 (0 marks an unset ring slot); `ch_rings` holds
  vip_num's RING_SIZE slots of real ids, a Maglev table (lb.maglev's; which
  real a slot holds does not change what a packet costs);
- `lru_mapping`: one LRU hash per forwarding core, LruSize / cores entries
  each (KatranLb::initLrus), created here and put in the array of maps
  after load (KatranLb::attachLrus); every CPU forwards;
- `ctl_array[0]`: the MAC of the next hop, the destination of every frame
  it sends.

Katran only encapsulates (IPIP; GUE when built with GUE_ENCAP) and sends
with XDP_TX, back out of the interface the packet came in on: on the bench
lab that is l0, so its frames come back to g0, where the session puts a
second sink (bench/sweep.py Session).

Its sizes come from the object's map definitions (MAX_VIPS is vip_map's
max_entries, RING_SIZE is ch_rings' over it). The stats indices below are
Katran's #defines (katran/lib/bpf/balancer_consts.h), which are not in BTF.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from loader import BpfError, BpfObject, Map, MapType, XdpLink, check_errno, test_run
from loader import libbpf as L

from .engines import GUE_PORT, BService, Engine, SyncResult
from .lab import LB_GEN_IP, BenchLab
from .progs import be32

PROGRAM = "balancer_ingress"
# What the bench writes or reads; KatranLb::initialSanityChecking checks these too.
REQUIRED_MAPS = ("vip_map", "reals", "ch_rings", "ctl_array", "lru_mapping", "fallback_cache", "stats")
GUE_MAP = "pckt_srcs"           # present only in a GUE_ENCAP build: the outer source address

# katran/lib/bpf/balancer_consts.h: indices into `stats`, after MAX_VIPS per-VIP entries.
LRU_CNTRS = 0                   # v1: packets to VIPs, v2: LRU misses
NEW_CONN_RATE_CNTR = 2          # per CPU, v1: new flows in this second, v2: its start (ns)
XDP_TOTAL_CNTR, XDP_TX_CNTR, XDP_DROP_CNTR, XDP_PASS_CNTR = 16, 17, 18, 19
V4_SRC_INDEX = 0                # pckt_srcs slot of the IPv4 outer source

_NO_BYPASS_PROBE = 1 << 62      # new flows this second beyond any real MAX_CONN_RATE


class KatranError(Exception):
    """A Katran object the bench cannot use; the message is one line."""


def _bpf_map_create() -> Callable[..., int]:
    """libbpf's bpf_map_create (the loader binds what xdplb itself needs)."""
    fn = L.lib.bpf_map_create
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_void_p]
    return fn


def check_object(path: Path) -> None:
    """Fail early, in one line, for a path that is not a usable Katran
    balancer object (opened, not loaded: nothing reaches the kernel)."""
    if not path.is_file():
        raise KatranError(f"--katran-object {path}: no such file (build balancer.bpf.o in your Katran "
                          "checkout, see the README's section on Katran)")
    try:
        obj = BpfObject(path)
    except BpfError as e:
        raise KatranError(f"--katran-object {path}: {str(e).splitlines()[0]}") from None
    try:
        missing = [m for m in REQUIRED_MAPS if m not in obj.map_names()]
        progs = obj.program_names()
    finally:
        obj.close()
    if missing or PROGRAM not in progs:
        what = ", ".join([f"map {m}" for m in missing] + ([] if PROGRAM in progs else [f"program {PROGRAM}"]))
        raise KatranError(f"--katran-object {path}: not Katran's balancer (no {what})")


class Katran:
    """The loaded balancer with its per-CPU LRUs, filled as KatranLb does."""

    def __init__(self, path: Path, lru_size: int, cpus: int | None = None) -> None:
        check_object(path)
        self.path = path
        self.obj = BpfObject(path)
        self.lrus: list[Map] = []
        try:
            self.obj.load()
            self.prog = self.obj.program(PROGRAM)
            self.maps = self.obj.maps
            self.max_vips = self.maps["vip_map"].max_entries
            self.ring_size = self.maps["ch_rings"].max_entries // self.max_vips
            self.max_reals = self.maps["reals"].max_entries
            self.gue = GUE_MAP in self.maps
            n = min(cpus or L.num_possible_cpus(), self.maps["lru_mapping"].max_entries)
            self.lru_per_cpu = lru_size // n
            self._attach_lrus(n)
            if self.gue:
                src = self.maps[GUE_MAP].value_type()
                src.dst = be32(LB_GEN_IP)           # the lb's own address on l0
                self.maps[GUE_MAP].update(V4_SRC_INDEX, src)
        except BaseException:
            self.close()
            raise
        self._vips: dict[tuple[str, int, str], int] = {}
        self._reals: dict[str, int] = {}

    def _attach_lrus(self, cpus: int) -> None:
        """KatranLb::initLrus + attachLrus: an LRU hash of flow_key ->
        real_pos_lru per forwarding core, at lru_mapping[core]."""
        fallback = self.maps["fallback_cache"]
        create = _bpf_map_create()
        outer = self.maps["lru_mapping"]
        for cpu in range(cpus):
            fd = check_errno(create(MapType.LRU_HASH, f"katran_lru{cpu}".encode(), fallback.key_size,
                                    fallback.value_size, self.lru_per_cpu, None),
                             f"Katran LRU of CPU {cpu} ({self.lru_per_cpu} entries)")
            self.lrus.append(Map.from_fd(fd, fallback.key_type, fallback.value_type,
                                         name=f"katran_lru{cpu}"))
            outer.update(cpu, ctypes.c_uint32(fd))

    # -- configuration ----------------------------------------------------

    def set_next_hop(self, mac: str) -> None:
        """ctl_array[0]: the destination MAC of every frame Katran sends."""
        m = self.maps["ctl_array"]
        v = m.value_type()
        ctypes.memmove(v.mac, bytes.fromhex(mac.replace(":", "")), 6)
        m.update(0, v)

    def set_vip(self, vip: str, port: int, proto: str, reals: list[str]) -> None:
        """Add or replace a VIP and its reals (KatranLb addVip + modifyRealsForVip)."""
        key = (vip, port, proto)
        num = self._vips.get(key, len(self._vips))
        if num >= self.max_vips:
            raise KatranError(f"Katran's object takes {self.max_vips} VIPs (MAX_VIPS)")
        ids = [self._real_id(a) for a in reals]
        slots = maglev_ring(reals, self.ring_size)
        ring = (ctypes.c_uint32 * self.ring_size)(*np.asarray(ids, np.uint32)[slots].tolist())
        keys = (ctypes.c_uint32 * self.ring_size)(*range(num * self.ring_size, (num + 1) * self.ring_size))
        self.maps["ch_rings"].update_batch(keys, ring)
        vm = self.maps["vip_map"]
        self.maps["vip_map"].update(self._vip_key(vip, port, proto), vm.value_type(flags=0, vip_num=num))
        self._vips[key] = num

    def _real_id(self, addr: str) -> int:
        """A real's id: one per address, shared by VIPs, from 1 (KatranLb's
        reals_ numbering; id 0 marks an unset ring slot)."""
        if addr not in self._reals:
            rid = len(self._reals) + 1
            if rid >= self.max_reals:
                raise KatranError(f"Katran's object takes {self.max_reals - 1} reals (MAX_REALS)")
            rm = self.maps["reals"]
            r = rm.value_type()
            r.dst = be32(addr)
            rm.update(rid, r)
            self._reals[addr] = rid
        return self._reals[addr]

    def clear(self) -> None:
        for vip, port, proto in list(self._vips):
            self.maps["vip_map"].delete(self._vip_key(vip, port, proto))
        self._vips = {}
        for lru in self.lrus:
            _empty(lru)

    def _vip_key(self, vip: str, port: int, proto: str):
        k = self.maps["vip_map"].key_type()
        k.vip = be32(vip)
        k.port = socket.htons(port)         # network order, as KatranLb writes it
        k.proto = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
        return k

    # -- what it did --------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Katran's global counters, summed over CPUs."""
        stats = self.maps["stats"]

        def total(index: int, field: str = "v1") -> int:
            return sum(getattr(v, field) for v in stats.lookup(self.max_vips + index))

        return {"packets": total(XDP_TOTAL_CNTR), "tx": total(XDP_TX_CNTR), "drop": total(XDP_DROP_CNTR),
                "pass": total(XDP_PASS_CNTR), "lru_misses": total(LRU_CNTRS, "v2")}

    def lru_entries(self) -> int:
        return sum(len(lru.lookup_batch()) for lru in self.lrus)

    def flood_bypass_threshold(self, packet: bytes) -> int | None:
        """New flows per second per CPU above which this build stops writing
        its LRU (MAX_CONN_RATE, a compile-time constant of Katran's), found
        by test-runs of `packet` (a new flow to a configured VIP) with the
        CPU's rate counter preset; None if it never stops. Leaves the rate
        counters and the LRUs empty."""
        cpu = min(os.sched_getaffinity(0))

        def writes(preset: int) -> bool:
            lru = self.lrus[cpu]
            _empty(lru)
            rate = self.maps["stats"].value_type(v1=preset, v2=time.monotonic_ns())
            self.maps["stats"].update(self.max_vips + NEW_CONN_RATE_CNTR, rate)
            test_run(self.prog.fd, packet)
            return len(lru.lookup_batch()) > 0

        try:
            with _on_cpu(cpu):
                if not writes(0):
                    raise KatranError(f"{self.path}: a new flow wrote no LRU entry (is the VIP configured?)")
                if writes(_NO_BYPASS_PROBE):
                    return None
                lo, hi = 0, _NO_BYPASS_PROBE    # writes(lo), not writes(hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if writes(mid) else (lo, mid)
                return lo + 1                   # Katran bypasses when the count exceeds MAX_CONN_RATE
        finally:
            self.maps["stats"].update(self.max_vips + NEW_CONN_RATE_CNTR, self.maps["stats"].value_type())
            for lru in self.lrus:
                _empty(lru)

    def close(self) -> None:
        for lru in self.lrus:
            lru.close()
        self.lrus = []
        self.obj.close()


class KatranEngine(Engine):
    """Katran on l0, forwarding to the lab's backends by IPIP (or GUE)."""

    kernel_path = False
    encapsulates = True
    transmits_back = True

    def __init__(self, bl: BenchLab, path: Path, lru_size: int | None = None) -> None:
        super().__init__(bl)
        self.name = f"katran:{path}"
        self.path = path
        self.lru_size = lru_size or _xdplb_conntrack_size()
        self.lb: Katran | None = None
        self.link: XdpLink | None = None
        self.bypass_above: int | None = None

    @property
    def gue_port(self) -> int:
        return GUE_PORT if self.lb and self.lb.gue else 0   # Katran's default GUE_DPORT

    def attach(self) -> None:
        self.lb = Katran(self.path, self.lru_size)
        self.lb.set_next_hop(self.bl.g0_mac)        # XDP_TX goes back out of l0, to g0
        with self.bl.inside(self.bl.lb_ns):
            self.link = XdpLink.attach(self.lb.prog.fd, self.bl.l0, mode="native")

    def detach(self) -> None:
        if self.link:
            with self.bl.inside(self.bl.lb_ns), contextlib.suppress(BpfError):
                self.link.detach()          # the interface (and the link with it) may be gone
            self.link.close()
            self.link = None
        if self.lb:
            self.lb.close()
            self.lb = None

    def full_sync(self, services: list[BService]) -> SyncResult:
        assert self.lb is not None, "attach() first"
        self.lb.clear()
        t0 = time.perf_counter()
        for s in services:
            self.lb.set_vip(s.vip, s.port, s.proto, [a for a, _ in s.endpoints])
        dt = time.perf_counter() - t0
        self.services = list(services)
        return SyncResult(dt, {"lru_per_cpu": self.lb.lru_per_cpu, "cpus": len(self.lb.lrus),
                               "ring_size": self.lb.ring_size})

    def characterize(self, packet: bytes) -> dict:
        """The build's flood bypass (see Katran.flood_bypass_threshold)."""
        assert self.lb is not None
        self.bypass_above = self.lb.flood_bypass_threshold(packet)
        return {"flood_bypass_above": self.bypass_above, "lru_per_cpu": self.lb.lru_per_cpu,
                "cpus": len(self.lb.lrus), "gue": self.lb.gue}

    @property
    def label(self) -> str:
        encap = "GUE" if self.lb and self.lb.gue else "IPIP"
        if self.bypass_above is None:
            return f"katran {encap}, flood bypass off (an LRU write per new flow)"
        return f"katran {encap} as shipped (no LRU write above {self.bypass_above} new flows/s per CPU)"

    def clear(self) -> None:
        if self.lb:
            self.lb.clear()
        self.services = []

    def program_fd(self) -> int | None:
        return self.lb.prog.fd if self.lb else None

    def memory(self) -> dict:
        if not self.lb:
            return {}
        maps = list(self.lb.maps.values()) + self.lb.lrus
        return {"map_memlock_bytes": sum(m.memlock() for m in maps), "source": "Map.memlock()"}


def maglev_ring(reals: list[str], size: int) -> np.ndarray:
    """Slot -> index into reals: lb.maglev's permutations and fill at
    Katran's ring size (a prime that is not one of xdplb's table sizes, so
    build_tables() would refuse it). Which real a slot holds does not change
    what a packet costs."""
    from lb.maglev import _fill, permutation

    perms = np.array([permutation(a, size) for a in reals], np.int64)
    return _fill(perms[:, 0].copy(), perms[:, 1].copy(), np.ones(len(reals), np.int64), size)


def _xdplb_conntrack_size() -> int:
    """Katran's LruSize for the bench: xdplb's default conntrack size, so
    both keep the same number of flows."""
    from lb.config import Limits

    return Limits().conntrack


def _empty(m: Map) -> None:
    keys = [k for k, _ in m.lookup_batch()]
    if keys:
        m.delete_batch((m.key_type * len(keys))(*keys))


@contextlib.contextmanager
def _on_cpu(cpu: int) -> Iterator[None]:
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)

