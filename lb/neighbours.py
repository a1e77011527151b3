"""Keep the next hops that XDP forwards to resolved in the kernel's neighbour table.

bpf_fib_lookup() takes its MACs from the kernel's neighbour table, but the
kernel never sees the packets XDP forwards: it does not resolve a backend's
next hop by itself, and an entry it never sees used goes stale and may be
garbage-collected while XDP still depends on it. Managed neighbour entries
(NTF_EXT_MANAGED, Linux 5.16) are the kernel's answer to exactly this: the
kernel resolves one as soon as it is added, re-probes it while it lives and
never garbage-collects it.

`NeighbourKeeper` wants one managed entry per next hop of
  - every backend record of the data plane, active or draining (both carry
    packets), read straight from the mmap()ed `backends` map, and
  - every gateway of a route that leaves by an attached interface (the
    routers that clients come through).
It reconciles after every apply (`kick()`), at once when a neighbour entry is
deleted (`ip neigh flush`) or a route changes (a netlink subscription), and
every `interval` seconds.

Other next hops (the clients' side of replies) are resolved on demand: when
the program meets an unresolved one that it cannot hand to the kernel (a
rewritten source, bpf/xdp/forward.h), it drops the packet and writes the
next hop to the `neigh_requests` map; the keeper drains that map every
`poll` seconds and asks the kernel to resolve each one once (NTF_USE), so
the sender's retransmission finds it. To spare most flows that wait, when
an entry is deleted (a flush, the kernel's garbage collection) the keeper
also re-resolves at once every on-link destination that a CPU's next-hop
cache (`nexthops`) still holds: the clients XDP is talking to now. Entries it creates carry NDA_PROTOCOL
`NEIGH_PROTOCOL`: a restarted daemon adopts them, and only those are ever
deleted by it. Entries that are left when the daemon stops stay (the data
plane keeps forwarding, and the kernel keeps them fresh).

Next hops come from the routing tables (main, then default) by longest
prefix match over one dump, as the FIB would answer (route get costs 0.6 ms
per address through pyroute2: a minute for 100k backends). With policy
routing rules besides the three default ones, each address is asked of the
kernel with `route get` instead, which honours them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Callable, Iterable

import numpy as np
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_FAILED, NUD_INCOMPLETE, NUD_NOARP, NUD_PERMANENT

log = logging.getLogger("xdplb.neighbours")

# NDA_PROTOCOL of the entries xdplb creates (rtnetlink protocol numbers are
# free-form above the kernel's own; 0x58 is 'X').
NEIGH_PROTOCOL = 0x58
NTF_EXT_MANAGED = 1 << 0                 # NDA_FLAGS_EXT (include/uapi/linux/neighbour.h)
NTF_USE = 0x01                           # ndm_flags: resolve this entry now
NUD_VALID_STATES = 0x02 | 0x04 | 0x08 | 0x10 | NUD_PERMANENT | NUD_NOARP  # REACHABLE..PROBE
DEFAULT_RULE_PRIORITIES = frozenset({0, 32766, 32767})   # local, main, default
MAIN_TABLE, DEFAULT_TABLE = 254, 253

# Netlink multicast groups and message types (linux/rtnetlink.h).
RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x4, 0x40, 0x80
RTM_NEWROUTE, RTM_DELROUTE, RTM_DELNEIGH, RTM_NEWRULE, RTM_DELRULE = 24, 25, 29, 32, 33
RTN_UNICAST = 1


@dataclass(frozen=True, order=True)
class NextHop:
    ifindex: int
    address: str           # "" in a route: on-link, the destination is its own next hop


@dataclass
class Route:
    prefix: int            # host-order IPv4 network address
    plen: int
    metric: int
    hops: tuple[NextHop, ...]
    table: int = MAIN_TABLE


def _ip_int(text: str) -> int:
    return int(IPv4Address(text))


class RouteTable:
    """Longest-prefix match over the main and default tables of one dump."""

    def __init__(self, routes: Iterable[Route]):
        # plen -> prefix -> best route: the main table's before the default
        # table's (the rules' order), then the lowest metric.
        self.by_plen: dict[int, dict[int, Route]] = {}
        for r in routes:
            best = self.by_plen.setdefault(r.plen, {}).get(r.prefix)
            if best is None or (r.table != DEFAULT_TABLE, -r.metric) > (best.table != DEFAULT_TABLE, -best.metric):
                self.by_plen[r.plen][r.prefix] = r
        self.plens = sorted(self.by_plen, reverse=True)

    @classmethod
    def dump(cls, ipr: IPRoute) -> "RouteTable":
        routes: list[Route] = []
        for table in (MAIN_TABLE, DEFAULT_TABLE):
            for msg in ipr.get_routes(family=socket.AF_INET, table=table):
                if msg["type"] != RTN_UNICAST:
                    continue
                plen = msg["dst_len"]
                dst = msg.get_attr("RTA_DST")
                prefix = _ip_int(dst) if dst else 0
                routes.append(Route(prefix, plen, msg.get_attr("RTA_PRIORITY") or 0, _hops(msg), table))
        return cls(routes)

    def lookup(self, addrs: np.ndarray) -> list[tuple[NextHop, ...]]:
        """Next hops of every address (host-order uint32); () where no route."""
        out: list[tuple[NextHop, ...] | None] = [None] * len(addrs)
        todo = np.arange(len(addrs))
        for plen in self.plens:
            if not len(todo):
                break
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
            table = self.by_plen[plen]
            masked = (addrs[todo] & np.uint32(mask)).tolist()
            left = []
            for i, net in zip(todo.tolist(), masked):
                r = table.get(net)
                if r is None:
                    left.append(i)
                else:
                    out[i] = tuple(h if h.address else NextHop(h.ifindex, str(IPv4Address(int(addrs[i]))))
                                   for h in r.hops)
            todo = np.asarray(left, dtype=np.int64)
        return [o or () for o in out]

    def gateways(self, ifindexes: Iterable[int]) -> set[NextHop]:
        want = set(ifindexes)
        return {h for routes in self.by_plen.values() for r in routes.values()
                for h in r.hops if h.address and h.ifindex in want}


def _hops(msg) -> tuple[NextHop, ...]:
    """A route's next hops: its gateway(s) (several for a multipath route),
    or the interface alone for an on-link route."""
    mp = msg.get_attr("RTA_MULTIPATH")
    if mp:
        return tuple(NextHop(nh["oif"], nh.get_attr("RTA_GATEWAY") or "") for nh in mp if nh["oif"])
    oif = msg.get_attr("RTA_OIF")
    return (NextHop(oif, msg.get_attr("RTA_GATEWAY") or ""),) if oif else ()


def backend_addresses(dp, backends: np.ndarray | None = None) -> np.ndarray:
    """Distinct IPv4 addresses (host order) of the backend records that
    carry packets (active or draining), from the mmap()ed `backends` map of
    a Dataplane: `backends` if the caller took dp.view("backends") already.
    The caller keeps `dp` open meanwhile, or holds that view (which keeps
    the map's memory mapped)."""
    c = dp.consts
    if backends is None:
        backends = dp.view("backends")
    state = backends["state"]
    live = ((state == c.BACKEND_ACTIVE) | (state == c.BACKEND_DRAINING)) & (backends["family"] == c.FAMILY_IPV4)
    words = backends["addr"][:, 0][live].astype("<u4")     # the address words only, not whole records
    return _unique(words.byteswap())        # network-order words -> host-order ints


def _unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) of a 1-D integer array by sorting: numpy 2.4's
    np.unique (and np.union1d) took 13 ms for 60k uint32 where this takes
    0.3 ms (at 20k services, on every pass of the neighbour keeper)."""
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def drain_requests(dp) -> list[NextHop]:
    """The next hops the program asked for (neigh_requests), removed from
    the map. The caller keeps `dp` open meanwhile."""
    m = dp.maps["neigh_requests"]
    out = []
    for key, ifindex in list(m.items()):
        m.delete(key)
        if key.family == dp.consts.FAMILY_IPV4:
            out.append(NextHop(int(getattr(ifindex, "value", ifindex)),
                               str(IPv4Address(int(key.addr[0]).to_bytes(4, "little")))))
    return out


def recent_destinations(dp) -> np.ndarray:
    """IPv4 destinations (host order) whose next hop some CPU has cached and
    not yet expired (the `nexthops` map): the clients and backends XDP is
    forwarding to now. The caller keeps `dp` open meanwhile."""
    from .metrics import read_batch        # the batch reader of per-CPU maps

    m = dp.maps["nexthops"]
    got = read_batch(m)
    if got is None or not len(got[0]):
        return np.empty(0, np.uint32)
    keys, values = got
    words = np.ascontiguousarray(keys).view("<u4").reshape(len(keys), -1)  # addr[4], family
    stride = -(-m.value_size // 8) * 8
    per_cpu = np.ascontiguousarray(values).reshape(len(values), -1, stride)
    expires = np.ascontiguousarray(per_cpu[:, :, :8]).view("<u8").reshape(len(values), -1).max(axis=1)
    # bpf_ktime_get_coarse_ns() is CLOCK_MONOTONIC_COARSE.
    now = time.clock_gettime_ns(getattr(time, "CLOCK_MONOTONIC_COARSE", 6))
    live = (words[:, 4] == dp.consts.FAMILY_IPV4) & (expires > now)
    return _unique(words[live, 0].byteswap())


@dataclass
class KeeperStatus:
    managed: int = 0                     # entries xdplb keeps
    unresolved: list[str] = field(default_factory=list)   # "10.0.0.2 dev eth1 (FAILED)"
    no_route: int = 0                    # backend addresses without a route
    passes: int = 0
    readded: int = 0                     # entries re-created after someone deleted them
    requested: int = 0                   # next hops the data plane asked to resolve
    refreshed: int = 0                   # on-link destinations re-resolved after a deletion
    last_error: str | None = None


class NeighbourKeeper:
    """One managed neighbour entry per next hop the data plane forwards to.

    `addresses` returns the backend addresses to keep (see
    backend_addresses(); the daemon reads them under its lock, since an
    upgrade may swap the maps); `ifindexes` the interfaces XDP is attached
    to; `requests` drains the next hops the program asked for
    (drain_requests()); `recent` gives the destinations XDP forwards to now
    (recent_destinations()). Create it in the network namespace it should manage: its netlink
    sockets stay there whichever thread uses them. Passes are at least
    `spacing` seconds apart, however often it is kicked."""

    def __init__(self, addresses: Callable[[], np.ndarray], ifindexes: Callable[[], Iterable[int]],
                 requests: Callable[[], list[NextHop]] = list,
                 recent: Callable[[], np.ndarray] = lambda: np.empty(0, np.uint32), *,
                 interval: float = 1.0, spacing: float = 0.1, poll: float = 0.05):
        self._addresses = addresses
        self._ifindexes = ifindexes
        self._requests = requests
        self._recent = recent
        self.interval = interval
        self.spacing = spacing
        self.poll = poll
        # The thread joins this network namespace: pyroute2 gives each
        # thread a socket of its own, made where that thread is.
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.ipr = IPRoute()
        self._events = _subscribe()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._routes: RouteTable | None = None
        self._policy_routing = False
        self._hops_of: dict[int, tuple[NextHop, ...]] = {}   # backend address -> next hops
        self._known = np.empty(0, np.uint32)                   # its keys, sorted
        self._refs: Counter[NextHop] = Counter()               # next hop -> backend addresses
        self._no_route = 0
        self._mine: set[NextHop] = set()                       # entries we made or adopted
        self.status = KeeperStatus()
        self._unresolved_logged: set[str] = set()

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> "NeighbourKeeper":
        self._thread = threading.Thread(target=self._loop, name="xdplb-neighbours", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def kick(self) -> None:
        """Reconcile soon (after an apply): never blocks the caller."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                           # already woken

    def close(self) -> None:
        self._stop.set()
        self.kick()
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self._wake_r, self._wake_w, self._netns):
            os.close(fd)
        self._events.close()
        self.ipr.close()

    # -- one pass ----------------------------------------------------------------

    def sync(self, wait: float = 0.0) -> KeeperStatus:
        """Reconcile once; with `wait`, then wait up to that long for every
        wanted entry to resolve (the daemon does so before READY, so that
        the first flows find their next hops)."""
        with self._lock:
            wanted = self._reconcile()
        if wait > 0 and wanted:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                with self._lock:
                    pending = self._unresolved(wanted)
                if not pending:
                    break
                time.sleep(0.02)
        with self._lock:
            self.status.unresolved = self._unresolved(wanted)
        return self.status

    def _reconcile(self) -> set[NextHop]:
        self.status.passes += 1
        if self._routes is None:
            self._policy_routing = any(
                (r.get_attr("FRA_PRIORITY") or 0) not in DEFAULT_RULE_PRIORITIES
                for r in self.ipr.get_rules(family=socket.AF_INET))
            self._routes = RouteTable.dump(self.ipr)
            self._forget(self._known)
        # Only the backend addresses that came or went since the last pass
        # cost Python work: 200k backends stay cheap at every kick.
        addrs = self._addresses()
        self._forget(np.setdiff1d(self._known, addrs, assume_unique=True))
        new = np.setdiff1d(addrs, self._known, assume_unique=True)
        if len(new):
            hops = self._route_get(new.tolist()) if self._policy_routing else self._routes.lookup(new)
            for a, hs in zip(new.tolist(), hops):
                self._hops_of[a] = hs
                self._refs.update(hs)
                self._no_route += not hs
            self._known = np.sort(np.concatenate((self._known, new)))     # disjoint: np.union1d's unique costs 14 ms
        self.status.no_route = self._no_route
        wanted = self._routes.gateways(self._ifindexes()) | set(self._refs)
        self._apply(wanted)
        return wanted

    def _forget(self, addrs: np.ndarray) -> None:
        for a in addrs.tolist():
            hs = self._hops_of.pop(a)
            self._refs.subtract(hs)
            self._no_route -= not hs
            for h in hs:
                if self._refs[h] <= 0:
                    del self._refs[h]
        if len(addrs):
            self._known = np.setdiff1d(self._known, addrs, assume_unique=True)

    def _route_get(self, addrs: list[int]) -> list[tuple[NextHop, ...]]:
        out = []
        for a in addrs:
            dst = str(IPv4Address(a))
            try:
                msg = self.ipr.route("get", dst=dst)[0]
            except NetlinkError:
                out.append(())
                continue
            if msg["type"] != RTN_UNICAST:
                out.append(())
                continue
            gw = msg.get_attr("RTA_GATEWAY")
            out.append((NextHop(msg.get_attr("RTA_OIF"), gw or dst),))
        return out

    def _table(self) -> dict[NextHop, tuple[int, bool, int]]:
        """(ifindex, address) -> (state, managed, protocol) of every IPv4 entry."""
        out = {}
        for n in self.ipr.get_neighbours(family=socket.AF_INET):
            dst = n.get_attr("NDA_DST")
            if dst is None:
                continue
            out[NextHop(n["ifindex"], dst)] = (
                n["state"], bool((n.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED),
                n.get_attr("NDA_PROTOCOL") or 0)
        return out

    def _apply(self, wanted: set[NextHop]) -> None:
        table = self._table()
        for hop, (_, managed, proto) in table.items():
            if proto == NEIGH_PROTOCOL and managed:
                self._mine.add(hop)        # ours, maybe from a previous run
        for hop in sorted(wanted):
            state, managed, _ = table.get(hop, (None, False, 0))
            if managed or (state is not None and state & NUD_PERMANENT):
                continue                   # already kept, or pinned by the admin
            if hop in self._mine:
                self.status.readded += 1
                log.info("neighbour entry %s dev %s was deleted; re-created it (managed)",
                         hop.address, _ifname(hop.ifindex))
            self._set(hop)
        for hop in sorted(self._mine - wanted):
            with _quiet(errno.ENOENT):
                self.ipr.neigh("del", dst=hop.address, ifindex=hop.ifindex)
            self._mine.discard(hop)
        self.status.managed = len(self._mine)

    def _set(self, hop: NextHop) -> None:
        try:
            # State NONE and no address: the kernel resolves it now and
            # keeps it resolved (an existing entry keeps its address).
            self.ipr.neigh("replace", dst=hop.address, ifindex=hop.ifindex, state=0,
                           NDA_FLAGS_EXT=NTF_EXT_MANAGED, NDA_PROTOCOL=NEIGH_PROTOCOL)
        except NetlinkError as e:
            self.status.last_error = f"{hop.address} dev {_ifname(hop.ifindex)}: {e}"
            log.warning("cannot add a managed neighbour entry for %s dev %s: %s",
                        hop.address, _ifname(hop.ifindex), e)
            return
        self._mine.add(hop)

    def _unresolved(self, wanted: set[NextHop]) -> list[str]:
        table = self._table()
        out = []
        for hop in sorted(wanted):
            state = table.get(hop, (0, False, 0))[0]
            if not state & NUD_VALID_STATES:
                out.append(f"{hop.address} dev {_ifname(hop.ifindex)} ({_state_name(state)})")
        return out

    # -- the thread ---------------------------------------------------------------

    def resolve_requested(self) -> int:
        """Ask the kernel to resolve, once, each next hop the program asked
        for (NTF_USE: a plain entry, resolved now, aged as usual)."""
        hops = self._requests()
        with self._lock:
            for hop in hops:
                self._resolve_once(hop)
            self.status.requested += len(hops)
        return len(hops)

    def _resolve_once(self, hop: NextHop) -> None:
        """NTF_USE: a plain entry, resolved now, aged as usual (not kept)."""
        with _quiet(NetlinkError):
            self.ipr.neigh("replace", dst=hop.address, ifindex=hop.ifindex, state=0, flags=NTF_USE)

    def refresh_recent(self) -> int:
        """Re-resolve, once, every on-link destination XDP forwards to now
        whose kernel entry is gone (after a flush or the kernel's garbage
        collection), before the next-hop cache's copy expires."""
        addrs = self._recent()
        if not len(addrs):
            return 0
        n = 0
        with self._lock:
            valid = {hop.address for hop, (state, _, _) in self._table().items()
                     if state & NUD_VALID_STATES}
            todo = [a for a in addrs.tolist() if str(IPv4Address(a)) not in valid]
            if self._routes is None:
                self._reconcile()
            for a, hops in zip(todo, self._routes.lookup(np.asarray(todo, np.uint32))):
                for hop in hops:
                    if hop.address == str(IPv4Address(a)):     # on-link; gateways are kept
                        self._resolve_once(hop)
                        n += 1
            self.status.refreshed += n
        return n

    def _loop(self) -> None:
        from pyroute2 import netns

        netns.setns(self._netns, flags=0)   # this thread only (setns is per thread)
        next_pass, last, next_poll = 0.0, 0.0, 0.0
        while not self._stop.is_set():
            now, neigh_deleted = time.monotonic(), False
            if now >= next_poll:
                try:
                    self.resolve_requested()
                except Exception as e:
                    self.status.last_error = f"{type(e).__name__}: {e}"
                    log.exception("resolving requested next hops failed")
                next_poll = now + self.poll
            timeout = max(0.0, min(next_pass, next_poll) - time.monotonic())
            ready, _, _ = select.select([self._events.fileno(), self._wake_r], [], [], timeout)
            if self._stop.is_set():
                return
            if not ready and time.monotonic() < next_pass:
                continue                   # only the poll was due
            if self._wake_r in ready:
                with _quiet(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if self._events.fileno() in ready:
                routes_changed, neigh_deleted = _drain(self._events)
                if routes_changed:
                    self._routes = None
                if not (routes_changed or neigh_deleted or self._wake_r in ready):
                    continue               # only entries being added or updated
            self._stop.wait(max(0.0, last + self.spacing - time.monotonic()))
            last = time.monotonic()
            try:
                status = self.sync()
                if neigh_deleted:
                    self.refresh_recent()
                self.status.last_error = None
                self._log_unresolved(status.unresolved)
            except Exception as e:          # keep keeping; the watchdog sees the thread alive
                self.status.last_error = f"{type(e).__name__}: {e}"
                log.exception("neighbour keeper pass failed")
            next_pass = time.monotonic() + self.interval

    def _log_unresolved(self, unresolved: list[str]) -> None:
        now = set(unresolved)
        for u in sorted(now - self._unresolved_logged):
            log.warning("next hop not resolved: %s", u)
        for u in sorted(self._unresolved_logged - now):
            log.info("next hop resolved again: %s", u.split(" (")[0])
        self._unresolved_logged = now


def _subscribe() -> socket.socket:
    """A raw rtnetlink socket on the neighbour, route and rule groups. Only
    message types are read: any deletion or route change triggers a pass."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE))
    return s


def _drain(s: socket.socket) -> tuple[bool, bool]:
    routes_changed = neigh_deleted = False
    while True:
        try:
            data = s.recv(1 << 16)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.ENOBUFS:   # events lost: assume the worst
                return True, True
            raise
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind in (RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE):
                routes_changed = True
            elif kind == RTM_DELNEIGH:
                neigh_deleted = True
            off += (length + 3) & ~3 if length else len(data)
    return routes_changed, neigh_deleted


class _quiet:
    """Suppress a NetlinkError with the given code (or an exception type)."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(self.what, int):
            return isinstance(exc, NetlinkError) and exc.code == self.what
        return isinstance(exc, self.what)


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"


def _state_name(state: int) -> str:
    if not state:
        return "NONE"
    if state & NUD_FAILED:
        return "FAILED"
    if state & NUD_INCOMPLETE:
        return "INCOMPLETE"
    return hex(state)
