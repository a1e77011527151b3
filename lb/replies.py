"""The gateway-mode reply index: backend address -> the services it serves.

The data plane finds the client flow of a reply (backend -> client) through
it (bpf/xdp/reply.h): the services listed for the reply's source address
give the VIPs to try in conntrack. An entry lists at most `slots` services
(REPLY_INDEX_SVCS). A listed service stays listed for as long as it uses the
address; one that joins a full entry waits, in order, for a free slot. While
a service waits anywhere it is *uncovered*, and its flows write a reverse-NAT
entry instead (SVC_F_REV_NAT).

Pure bookkeeping: the reconciler writes what `take_dirty()` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AddrKey = tuple[int, int]       # (bkey(address, port), IP protocol number)


@dataclass(slots=True)
class _Entry:
    listed: list[int] = field(default_factory=list)            # what the map holds
    waiting: dict[int, None] = field(default_factory=dict)     # ordered set


class ReplyIndex:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._entries: dict[AddrKey, _Entry] = {}
        self._uncovered: dict[int, int] = {}     # svc_id -> entries it waits in
        self._dirty: set[AddrKey] = set()

    def add(self, svc_id: int, key: AddrKey) -> None:
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry()
        if svc_id in e.listed or svc_id in e.waiting:
            return
        if len(e.listed) < self.slots:
            e.listed.append(svc_id)
            self._dirty.add(key)
        else:
            e.waiting[svc_id] = None
            self._uncovered[svc_id] = self._uncovered.get(svc_id, 0) + 1

    def remove(self, svc_id: int, key: AddrKey) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        if svc_id in e.waiting:
            del e.waiting[svc_id]
            self._cover(svc_id)
        elif svc_id in e.listed:
            e.listed.remove(svc_id)
            self._dirty.add(key)
            if e.waiting:                        # the first in line takes the slot
                first = next(iter(e.waiting))
                del e.waiting[first]
                e.listed.append(first)
                self._cover(first)
        if not e.listed:
            del self._entries[key]

    def needs_rev_nat(self, svc_id: int) -> bool:
        """True while the service waits for a slot at some address."""
        return svc_id in self._uncovered

    def listed(self, key: AddrKey) -> list[int]:
        e = self._entries.get(key)
        return list(e.listed) if e else []

    def keep_written(self, on_map: dict[AddrKey, list[int]]) -> None:
        """After a rebuild: only entries that differ from `on_map` (what the
        map holds) stay dirty, plus the keys it has that are gone."""
        self._dirty = {k for k in self._dirty if self.listed(k) != on_map.get(k)}
        self._dirty.update(k for k in on_map if k not in self._entries)

    def take_dirty(self) -> tuple[list[tuple[AddrKey, list[int]]], list[AddrKey]]:
        """Entries to write (key, listed services) and keys to delete, since
        the last call."""
        writes, deletes = [], []
        for key in self._dirty:
            e = self._entries.get(key)
            if e:
                writes.append((key, list(e.listed)))
            else:
                deletes.append(key)
        self._dirty.clear()
        return writes, deletes

    def _cover(self, svc_id: int) -> None:
        n = self._uncovered[svc_id] - 1
        if n:
            self._uncovered[svc_id] = n
        else:
            del self._uncovered[svc_id]
