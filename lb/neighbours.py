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
It reconciles after every full apply (`kick()`), at once when a neighbour
entry is deleted (`ip neigh flush`) or a route changes (a netlink
subscription), and every `interval` seconds. A one-service change only
names the addresses it may have added (`added()`): those cost a route
lookup and, for a next hop not kept yet, one netlink request, never a pass
over every backend (30 ms at 20k services, taken from the API's share of
the GIL). What a change removed goes at the next full pass.

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

Both families alike: IPv6 next hops (link-local gateways included, kept
per interface) are resolved by NDP through the same managed entries, and
the keeper reads and watches the IPv6 routes and rules as IPv4's. Next hops
come from the routing tables (main, then default) of the address's family
(lb/routes.py) by longest prefix match over one dump, as the FIB would
answer (route get costs 0.6 ms per address through pyroute2: a minute for
100k backends). With policy routing rules besides the default ones, each
address is asked of the kernel with `route get` instead, which honours them.
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
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_FAILED, NUD_INCOMPLETE, NUD_NOARP, NUD_PERMANENT

from .routes import (DEFAULT_TABLE, FAMILIES, IPV4, IPV6, MAIN_TABLE, RTN_UNICAST, Family, NextHop,  # noqa: F401
                     Route, RouteTable, family_of, no_addresses, unique, words_to_values)

log = logging.getLogger("xdplb.neighbours")

# NDA_PROTOCOL of the entries xdplb creates (rtnetlink protocol numbers are
# free-form above the kernel's own; 0x58 is 'X').
NEIGH_PROTOCOL = 0x58
NTF_EXT_MANAGED = 1 << 0                 # NDA_FLAGS_EXT (include/uapi/linux/neighbour.h)
NTF_USE = 0x01                           # ndm_flags: resolve this entry now
NUD_VALID_STATES = 0x02 | 0x04 | 0x08 | 0x10 | NUD_PERMANENT | NUD_NOARP  # REACHABLE..PROBE
DEFAULT_RULE_PRIORITIES = frozenset({0, 32766, 32767})   # local, main, default (IPv6: no default)

# Netlink multicast groups and message types (linux/rtnetlink.h).
RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_ROUTE = 0x4, 0x40, 0x80, 0x400
RTMGRP_IPV6_RULE = 1 << (19 - 1)         # RTNLGRP_IPV6_RULE has no legacy RTMGRP_ constant
RTM_NEWROUTE, RTM_DELROUTE, RTM_DELNEIGH, RTM_NEWRULE, RTM_DELRULE = 24, 25, 29, 32, 33
Addresses = dict[Family, np.ndarray]     # per family: IPv4 host-order uint32, IPv6 ints


def _families(dp) -> dict[int, Family]:
    """The data plane's family numbers (constants.h) -> Family."""
    return {dp.consts.FAMILY_IPV4: IPV4, dp.consts.FAMILY_IPV6: IPV6}


def backend_addresses(dp, backends: np.ndarray | None = None) -> Addresses:
    """Distinct addresses per family of the backend records that carry
    packets (active or draining), from the mmap()ed `backends` map of a
    Dataplane: `backends` if the caller took dp.view("backends") already.
    The caller keeps `dp` open meanwhile, or holds that view (which keeps
    the map's memory mapped)."""
    c = dp.consts
    if backends is None:
        backends = dp.view("backends")
    state, family = backends["state"], backends["family"]
    live = (state == c.BACKEND_ACTIVE) | (state == c.BACKEND_DRAINING)
    v4 = backends["addr"][:, 0][live & (family == c.FAMILY_IPV4)]   # the address words only, not whole records
    v6 = IPV6.empty()
    if len(v4) < np.count_nonzero(live):             # an IPv4-only config skips a pass over the records
        v6 = unique(words_to_values(backends["addr"][live & (family == c.FAMILY_IPV6)], IPV6))
    return {IPV4: unique(v4.astype("<u4").byteswap()), IPV6: v6}   # network-order words -> host-order ints


def drain_requests(dp) -> list[NextHop]:
    """The next hops the program asked for (neigh_requests), removed from
    the map. The caller keeps `dp` open meanwhile."""
    m = dp.maps["neigh_requests"]
    families = _families(dp)
    out = []
    for key, ifindex in list(m.items()):
        m.delete(key)
        fam = families.get(key.family)
        if fam is not None:
            raw = b"".join(int(w).to_bytes(4, "little") for w in key.addr)[:fam.bits // 8]
            out.append(NextHop(int(getattr(ifindex, "value", ifindex)), str(fam.address(raw))))
    return out


def recent_destinations(dp) -> Addresses:
    """Destinations per family whose next hop some CPU has cached and not
    yet expired (the `nexthops` map): the clients and backends XDP is
    forwarding to now. The caller keeps `dp` open meanwhile."""
    from .metrics import read_batch        # the batch reader of per-CPU maps

    m = dp.maps["nexthops"]
    got = read_batch(m)
    if got is None or not len(got[0]):
        return no_addresses()
    keys, values = got
    words = np.ascontiguousarray(keys).view("<u4").reshape(len(keys), -1)  # addr[4], family
    stride = -(-m.value_size // 8) * 8
    per_cpu = np.ascontiguousarray(values).reshape(len(values), -1, stride)
    expires = np.ascontiguousarray(per_cpu[:, :, :8]).view("<u8").reshape(len(values), -1).max(axis=1)
    # bpf_ktime_get_coarse_ns() is CLOCK_MONOTONIC_COARSE.
    now = time.clock_gettime_ns(getattr(time, "CLOCK_MONOTONIC_COARSE", 6))
    return {fam: unique(words_to_values(words[(words[:, 4] == number) & (expires > now), :4], fam))
            for number, fam in _families(dp).items()}


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


class _FamilyHops:
    """The next hops of one family's backend addresses. Only the addresses
    that came or went since the last pass cost Python work: 200k backends
    stay cheap at every kick."""

    def __init__(self, family: Family):
        self.family = family
        self.routes: RouteTable | None = None
        self.policy_routing = False
        self.hops_of: dict[int, tuple[NextHop, ...]] = {}    # backend address -> next hops
        self.known = family.empty()                           # its keys, sorted
        self.no_route = 0

    def update(self, ipr: IPRoute, addrs: np.ndarray, refs: Counter) -> None:
        """Follow `addrs` (sorted, distinct), counting next hops in `refs`."""
        if self.routes is None:
            self.policy_routing = any(
                (r.get_attr("FRA_PRIORITY") or 0) not in DEFAULT_RULE_PRIORITIES
                for r in ipr.get_rules(family=self.family.af))
            self.routes = RouteTable.dump(ipr, self.family)
            self._forget(self.known, refs)
        self._forget(np.setdiff1d(self.known, addrs, assume_unique=True), refs)
        new = np.setdiff1d(addrs, self.known, assume_unique=True)
        if not len(new):
            return
        hops = self._route_get(ipr, new.tolist()) if self.policy_routing else self.routes.lookup(new)
        for a, hs in zip(new.tolist(), hops):
            self.hops_of[a] = hs
            refs.update(hs)
            self.no_route += not hs
        self.known = np.sort(np.concatenate((self.known, new)))   # disjoint: np.union1d's unique costs 14 ms

    def add(self, ipr: IPRoute, addrs: list[int], refs: Counter) -> set[NextHop]:
        """Follow these addresses too (no pass over the others); returns the
        next hops that no address had before. Needs `routes`."""
        assert self.routes is not None
        new = sorted(set(a for a in addrs if a not in self.hops_of))
        if not new:
            return set()
        arr = self.family.array(new)
        hops = self._route_get(ipr, new) if self.policy_routing else self.routes.lookup(arr)
        fresh = set()
        for a, hs in zip(new, hops):
            self.hops_of[a] = hs
            fresh.update(h for h in hs if refs[h] <= 0)
            refs.update(hs)
            self.no_route += not hs
        self.known = np.insert(self.known, np.searchsorted(self.known, arr), arr)
        return fresh

    def _forget(self, addrs: np.ndarray, refs: Counter) -> None:
        for a in addrs.tolist():
            hs = self.hops_of.pop(a)
            refs.subtract(hs)
            self.no_route -= not hs
            for h in hs:
                if refs[h] <= 0:
                    del refs[h]
        if len(addrs):
            self.known = np.setdiff1d(self.known, addrs, assume_unique=True)

    def _route_get(self, ipr: IPRoute, addrs: list[int]) -> list[tuple[NextHop, ...]]:
        """The kernel's answer for each address, which honours policy routing."""
        out = []
        for a in addrs:
            dst = self.family.text(a)
            try:
                msg = ipr.route("get", dst=dst, family=self.family.af)[0]
            except NetlinkError:
                out.append(())
                continue
            if msg["type"] != RTN_UNICAST:
                out.append(())
                continue
            gw = msg.get_attr("RTA_GATEWAY")
            out.append((NextHop(msg.get_attr("RTA_OIF"), gw or dst),))
        return out


class NeighbourKeeper:
    """One managed neighbour entry per next hop the data plane forwards to.

    `addresses` returns the backend addresses to keep (see
    backend_addresses(); the daemon reads them under its lock, since an
    upgrade may swap the maps); `ifindexes` the interfaces XDP is attached
    to; `requests` drains the next hops the program asked for
    (drain_requests()); `recent` gives the destinations XDP forwards to now
    (recent_destinations()). Create it in the network namespace it should manage: its netlink
    sockets stay there whichever thread uses them. Passes are at least
    `spacing` seconds apart, however often it is kicked; addresses given to
    added() are followed `coalesce` seconds after the first of a burst."""

    def __init__(self, addresses: Callable[[], Addresses], ifindexes: Callable[[], Iterable[int]],
                 requests: Callable[[], list[NextHop]] = list,
                 recent: Callable[[], Addresses] = no_addresses, *,
                 interval: float = 1.0, spacing: float = 0.1, poll: float = 0.05, coalesce: float = 0.01):
        self._addresses = addresses
        self._ifindexes = ifindexes
        self._requests = requests
        self._recent = recent
        self.interval = interval
        self.spacing = spacing
        self.poll = poll
        self.coalesce = coalesce
        # The thread joins this network namespace: pyroute2 gives each
        # thread a socket of its own, made where that thread is.
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.ipr = IPRoute()
        self._events = _subscribe()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._full_due = True                                  # kick(): a full pass
        self._added: deque[str] = deque()                      # added(): addresses to follow now
        self._thread: threading.Thread | None = None
        self._backends = {f: _FamilyHops(f) for f in FAMILIES}
        self._refs: Counter[NextHop] = Counter()               # next hop -> backend addresses
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
        """A full pass soon (after an apply): never blocks the caller."""
        self._full_due = True
        self._wake()

    def added(self, addresses: Iterable[str]) -> None:
        """Follow these backend addresses now (after a one-service change),
        without a pass over every backend: never blocks the caller. An
        address that no record holds any more is dropped at the next full
        pass."""
        self._added.extend(addresses)      # deque: appends and pops are thread-safe
        self._wake()

    def _wake(self) -> None:
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
        addrs = self._addresses()
        ifindexes = list(self._ifindexes())
        wanted: set[NextHop] = set()
        for fam, backends in self._backends.items():
            backends.update(self.ipr, addrs.get(fam, fam.empty()), self._refs)
            wanted |= backends.routes.gateways(ifindexes)
        self.status.no_route = sum(b.no_route for b in self._backends.values())
        wanted |= set(self._refs)
        self._apply(wanted)
        return wanted

    def follow_added(self) -> int:
        """The addresses given to added() since the last pass: their next
        hops looked up, and each next hop that is new asked of the kernel
        (one request each). Returns how many next hops were new."""
        by_family: dict[Family, list[int]] = {}
        while self._added:
            text = self._added.popleft()
            fam = family_of(text)
            by_family.setdefault(fam, []).append(fam.value(text))
        fresh: set[NextHop] = set()
        with self._lock:
            for fam, values in by_family.items():
                fresh |= self._backends[fam].add(self.ipr, values, self._refs)
            self.status.no_route = sum(b.no_route for b in self._backends.values())
            for hop in sorted(fresh - self._mine):
                self._keep(hop)
            self.status.managed = len(self._mine)
        return len(fresh)

    def _keep(self, hop: NextHop) -> None:
        """One next hop kept, as _apply() would, asking only about it."""
        try:
            msg = self.ipr.neigh("get", dst=hop.address, ifindex=hop.ifindex,
                                 family=family_of(hop.address).af)[0]
        except NetlinkError:
            msg = None
        if msg is not None:
            managed = bool((msg.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED)
            if managed and (msg.get_attr("NDA_PROTOCOL") or 0) == NEIGH_PROTOCOL:
                self._mine.add(hop)
            if managed or msg["state"] & NUD_PERMANENT:
                return
        self._set(hop)

    def _routes_changed(self) -> None:
        for backends in self._backends.values():
            backends.routes = None

    def _table(self) -> dict[NextHop, tuple[int, bool, int]]:
        """(ifindex, address) -> (state, managed, protocol) of every entry."""
        out = {}
        for fam in FAMILIES:
            for n in self.ipr.get_neighbours(family=fam.af):
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
                self.ipr.neigh("del", dst=hop.address, ifindex=hop.ifindex, family=family_of(hop.address).af)
            self._mine.discard(hop)
        self.status.managed = len(self._mine)

    def _set(self, hop: NextHop) -> None:
        try:
            # State NONE and no address: the kernel resolves it now and
            # keeps it resolved (an existing entry keeps its address).
            self.ipr.neigh("replace", dst=hop.address, ifindex=hop.ifindex, state=0,
                           family=family_of(hop.address).af,
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
            self.ipr.neigh("replace", dst=hop.address, ifindex=hop.ifindex, state=0, flags=NTF_USE,
                           family=family_of(hop.address).af)

    def refresh_recent(self) -> int:
        """Re-resolve, once, every on-link destination XDP forwards to now
        whose kernel entry is gone (after a flush or the kernel's garbage
        collection), before the next-hop cache's copy expires."""
        recent = self._recent()
        if not any(len(a) for a in recent.values()):
            return 0
        n = 0
        with self._lock:
            valid = {hop.address for hop, (state, _, _) in self._table().items()
                     if state & NUD_VALID_STATES}
            if any(b.routes is None for b in self._backends.values()):
                self._reconcile()
            for fam, addrs in recent.items():
                todo = [a for a in addrs.tolist() if fam.text(a) not in valid]
                for a, hops in zip(todo, self._backends[fam].routes.lookup(fam.array(todo))):
                    for hop in hops:
                        if hop.address == fam.text(a):     # on-link; gateways are kept
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
            routes_changed = False
            if self._events.fileno() in ready:
                routes_changed, neigh_deleted = _drain(self._events)
                if routes_changed:
                    self._routes_changed()
                if not (routes_changed or neigh_deleted or self._wake_r in ready):
                    continue               # only entries being added or updated
            if not (self._full_due or routes_changed or neigh_deleted or time.monotonic() >= next_pass
                    or any(b.routes is None for b in self._backends.values())):
                # A burst of changes is followed in one go, not one wake-up
                # (and one GIL hand-off) per change.
                self._stop.wait(self.coalesce)
                try:
                    self.follow_added()    # one-service changes: their addresses only
                except Exception as e:
                    self.status.last_error = f"{type(e).__name__}: {e}"
                    log.exception("following added backends failed")
                continue
            self._stop.wait(max(0.0, last + self.spacing - time.monotonic()))
            last = time.monotonic()
            self._full_due = False
            self._added.clear()            # the full pass reads every record
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
        """Once per next hop when it stops resolving, once when it resolves
        again: not at every INCOMPLETE <-> FAILED turn of a hop that never does."""
        now = {u.split(" (")[0]: u for u in unresolved}
        for hop in sorted(now.keys() - self._unresolved_logged):
            log.warning("next hop not resolved: %s", now[hop])
        for hop in sorted(self._unresolved_logged - now.keys()):
            log.info("next hop resolved again: %s", hop)
        self._unresolved_logged = set(now)


def _subscribe() -> socket.socket:
    """A raw rtnetlink socket on the neighbour, route and rule groups. Only
    message types are read: any deletion or route change triggers a pass."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_RULE))
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
