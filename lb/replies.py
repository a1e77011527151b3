"""The gateway-mode reply index: backend address -> the services it serves.

The data plane finds the client flow of a reply (backend -> client) through
it (bpf/xdp/reply.h): the services listed for the reply's source address
give the VIPs to try in conntrack. An entry lists at most `slots` services
(REPLY_INDEX_SVCS). A listed service stays listed for as long as it uses the
address; one that joins a full entry waits, in order, for a free slot. While
a service waits anywhere it is *uncovered*, and its flows write a reverse-NAT
entry instead (SVC_F_REV_NAT).

Most addresses serve one service, so those are one int in a dict. A full
sync adds its 200k backends as arrays (`add_many`), turned into dict entries
only when something first looks at one address (the next update): making
them costs 60 ms that the full sync does not wait for.

Pure bookkeeping: the reconciler writes what `take_dirty()` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def addr_key(bkey, proto):
    """One int per (address, port, protocol): bkey() (48 bits) and the
    protocol number. Ints, or int64 arrays of them."""
    return (bkey << 8) | proto


@dataclass(slots=True)
class _Shared:
    listed: list[int] = field(default_factory=list)            # what the map holds
    waiting: dict[int, None] = field(default_factory=dict)     # ordered set


_NO_KEYS = np.zeros(0, np.int64)
_NO_KEYS.flags.writeable = False


@dataclass
class Dirty:
    """Entries to write (keys as addr_key ints, one row of `slots` service
    ids each, unused slots 0) and keys to delete."""

    keys: np.ndarray
    values: np.ndarray
    deletes: np.ndarray


class ReplyIndex:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._single: dict[int, int] = {}        # key -> its one service
        self._shared: dict[int, _Shared] = {}    # keys with two services or more
        self._uncovered: dict[int, int] = {}     # svc_id -> entries it waits in
        self._dirty: set[int] = set()
        self._bulk: list[tuple[np.ndarray, np.ndarray]] = []   # add_many's, not yet written
        self._lazy: list[tuple[np.ndarray, np.ndarray]] = []   # add_many's, not yet in _single

    def _materialize(self) -> None:
        for keys, ids in self._lazy:
            self._single.update(zip(keys.tolist(), ids.tolist()))
        self._lazy = []

    def add(self, svc_id: int, key: int) -> None:
        if self._lazy:
            self._materialize()
        one = self._single.get(key)
        if one is None and key not in self._shared:
            self._single[key] = svc_id
            self._dirty.add(key)
            return
        if one == svc_id:
            return
        if one is not None:
            del self._single[key]
            self._shared[key] = _Shared([one])
        e = self._shared[key]
        if svc_id in e.listed or svc_id in e.waiting:
            return
        if len(e.listed) < self.slots:
            e.listed.append(svc_id)
            self._dirty.add(key)
        else:
            e.waiting[svc_id] = None
            self._uncovered[svc_id] = self._uncovered.get(svc_id, 0) + 1

    def add_many(self, svc_ids: np.ndarray, keys: np.ndarray) -> None:
        """add() for each pair; in one step when every key is new and
        distinct (a full sync)."""
        keys, svc_ids = np.asarray(keys, np.int64), np.asarray(svc_ids, np.uint32)
        if not (self._single or self._shared or self._lazy):    # an empty index: a first sync
            ordered = np.sort(keys)
            if not (ordered[1:] == ordered[:-1]).any():
                self._lazy.append((keys, svc_ids))
                self._bulk.append((keys, svc_ids))
                return
        for s, k in zip(svc_ids.tolist(), keys.tolist()):
            self.add(s, k)

    def remove(self, svc_id: int, key: int) -> None:
        if self._lazy:
            self._materialize()
        if self._single.get(key) == svc_id:
            del self._single[key]
            self._dirty.add(key)
            return
        e = self._shared.get(key)
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
        if len(e.listed) == 1 and not e.waiting:
            self._single[key] = e.listed[0]
            del self._shared[key]

    def needs_rev_nat(self, svc_id: int) -> bool:
        """True while the service waits for a slot at some address."""
        return svc_id in self._uncovered

    def listed(self, key: int) -> list[int]:
        if self._lazy:
            self._materialize()
        one = self._single.get(key)
        if one is not None:
            return [one]
        e = self._shared.get(key)
        return list(e.listed) if e else []

    def keep_written(self, on_map: dict[int, list[int]]) -> None:
        """After a rebuild from the map: only entries that differ from
        `on_map` (what it holds) stay dirty, plus the keys it has that are
        gone."""
        self._flush_bulk()
        self._dirty = {k for k in self._dirty if self.listed(k) != on_map.get(k)}
        self._dirty.update(k for k in on_map if not self.listed(k))

    def take_dirty(self) -> Dirty:
        """What changed since the last call. Bulk-added keys come first, so
        a later change to one of them (also in the rest) is written after."""
        if not self._bulk and not self._dirty:       # most calls of a one-service update
            return Dirty(_NO_KEYS, np.zeros((0, self.slots), np.uint32), _NO_KEYS)
        parts_k = [k for k, _ in self._bulk]
        parts_v = []
        for k, ids in self._bulk:
            v = np.zeros((len(k), self.slots), np.uint32)
            v[:, 0] = ids
            parts_v.append(v)
        self._bulk = []
        writes = [(k, self.listed(k)) for k in self._dirty]
        deletes = [k for k, listed in writes if not listed]
        writes = [(k, listed) for k, listed in writes if listed]
        self._dirty = set()
        if writes:
            v = np.zeros((len(writes), self.slots), np.uint32)
            for i, (_, listed) in enumerate(writes):
                v[i, :len(listed)] = listed
            parts_k.append(np.array([k for k, _ in writes], np.int64))
            parts_v.append(v)
        if len(parts_k) == 1:                        # no bulk part: nothing to join
            keys, values = parts_k[0], parts_v[0]
        else:
            keys = np.concatenate(parts_k) if parts_k else _NO_KEYS
            values = np.concatenate(parts_v) if parts_v else np.zeros((0, self.slots), np.uint32)
        return Dirty(keys, values, np.array(deletes, np.int64))

    def _flush_bulk(self) -> None:
        for k, _ in self._bulk:
            self._dirty.update(k.tolist())
        self._bulk = []

    def _cover(self, svc_id: int) -> None:
        n = self._uncovered[svc_id] - 1
        if n:
            self._uncovered[svc_id] = n
        else:
            del self._uncovered[svc_id]
