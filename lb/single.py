"""The table phases of Reconciler._apply for at most one changed service.

What an API call, a health transition or a watch event changes is one
service with a handful of backends. The batch phases (reconcile._Batch) put
every backend into flat numpy arrays, and on arrays of a few elements their
dozens of numpy calls cost more than the work. Here the same phases run in
plain Python, with one native call for the Maglev table: the same ids,
slots, generations and bytes in every map, in the same order
(tests/test_reconcile.py applies random changes through both paths and
compares the maps), so the invariant of lb.reconcile holds unchanged.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from . import maglev
from .config import Backend
from .dataplane import addr_words, family_of, htons
from .reconcile import PROTOCOLS, LiveBackend, Reconciler, _Change, _zero_counters, service_table_size
from .replies import addr_key


@dataclass(slots=True)
class _New:
    """A backend that needs an id (not kept from the live service)."""

    key: int                 # bkey()
    model: Backend
    state: int               # BACKEND_ACTIVE or BACKEND_DRAINING
    id: int = 0
    gen: int = 0
    reused: bool = False     # the id was used before: its counters may hold counts


class OneService:
    """_Batch's interface (allocate, write_tables, retire) for a plan of at
    most one service; an empty plan is a delete."""

    def __init__(self, rec: Reconciler, plan: list[_Change]) -> None:
        self.rec = rec
        self.ch = plan[0] if plan else None
        self.new: list[_New] = []
        self.active: list[LiveBackend | _New] = []      # the table's members, in the service's order
        self.rows: list[tuple[int, int, int]] = []      # their (address, port, weight)
        self.members: list[Backend] = []                # their models
        self.slots: np.ndarray | None = None            # the table: indices into self.active
        self.table: np.ndarray | None = None            # the table as backend ids
        if self.ch is not None:
            self._match()
            self._compute_ring()

    def _match(self) -> None:
        """_match_backends: the live service's backends keep their id and
        generation; state changes are noted, the rest is removed."""
        ch, c = self.ch, self.rec.c
        active, draining = c.BACKEND_ACTIVE, c.BACKEND_DRAINING
        replaced = self.rec._forwarding_changed(ch)          # then every backend is new
        live_backends = dict(ch.live.backends) if ch.live is not None and not replaced else {}
        for b in ch.svc.backends:
            k = (b.address._ip << 16) | b.port            # bkey()
            state = active if b.state == "active" else draining
            lb = live_backends.pop(k, None)
            if lb is None:
                member: LiveBackend | _New = _New(k, b, state)
                self.new.append(member)
            else:
                member = ch.kept[k] = lb
                if lb.state != state:
                    ch.state_changes.append((lb, state))
            if state == active:
                self.active.append(member)
                self.members.append(b)
                self.rows.append((b.address._ip, b.port, b.weight))
        ch.new_count = len(self.new)
        if ch.live is not None:
            ch.removed_backends = list((ch.live.backends if replaced else live_backends).values())

    def _compute_ring(self) -> None:
        ch = self.ch
        ch.ring_size = service_table_size(ch.svc, len(self.active))
        # IPv6 backends (of a VIP of either family: DSR's 4in6) by
        # Backend.key, as the batch path.
        if self.rows and any(b.address.version == 6 for b in self.members):
            self.slots = maglev.build_table([(m.key, w) for m, (_, _, w) in zip(self.members, self.rows)],
                                            ch.ring_size)
        elif self.rows:
            self.slots = maglev.build_table_ipv4(self.rows, ch.ring_size)

    def allocate(self) -> None:
        rec, ch = self.rec, self.ch
        if ch is None:
            return
        ch.svc_id = ch.live.svc_id if ch.live is not None else rec._alloc_many(rec.svc_ids, 1)[0]
        if self.new:
            gens = rec.dp.view("backends")["gen"]
            for nb, bid in zip(self.new, rec._alloc_many(rec.backend_ids, len(self.new))):
                old = int(gens[bid])
                # Generations start at 1 and skip 0 when they wrap (_allocate).
                nb.id, nb.gen, nb.reused = bid, 1 if old == 0xFFFFFFFF else old + 1, old != 0
        if self.slots is not None:
            self.table = np.array([m.id for m in self.active], np.uint32)[self.slots]
        rec._choose_ring(ch, lambda: self.table)

    def write_tables(self) -> None:
        """_write_tables: new backend records, their counters and reply
        entries, the new service's counters and key, the table, policy."""
        rec, ch = self.rec, self.ch
        if ch is not None and self.new:
            self._write_backends()
        rec._write_replies()
        if ch is None:
            return
        rec._write_fresh([ch])
        if ch.ring_new and ch.ring_size:
            rec.dp.view("maglev_pool")[ch.ring_offset:ch.ring_offset + ch.ring_size] = self.table
        rec._write_policies_and_states([ch])

    def _write_backends(self) -> None:
        rec, ch, c = self.rec, self.ch, self.rec.c
        bview = rec.dp.view("backends")
        size, base = bview.dtype.itemsize, bview.ctypes.data
        v = rec.dp.maps["backends"].value_type()       # zeroed, as the batch's records
        v.svc_id = ch.svc_id
        for nb in self.new:
            v.addr[:] = addr_words(nb.model.address)      # network order in memory
            v.family = family_of(nb.model.address, c)
            v.port = htons(nb.model.port)
            v.state, v.gen = nb.state, nb.gen
            ctypes.memmove(base + nb.id * size, ctypes.addressof(v), size)
        reused = [nb.id for nb in self.new if nb.reused]
        if reused:
            _zero_counters(rec.dp.maps["backend_stats"], np.array(reused, np.int64))
        if ch.svc.dsr:                                   # its replies never come back through the LB
            return
        proto = PROTOCOLS[ch.svc.protocol]
        for nb in self.new:                              # each address lists its service for replies
            rec.replies.add(ch.svc_id, addr_key(nb.key, proto))

    def retire(self) -> None:
        rec, ch = self.rec, self.ch
        if ch is None:
            return
        rec._retire_old(ch, rec.dp.maps["policy"])
        backends = ch.kept                                # kept first, then new: as _retire orders them
        for nb in self.new:
            backends[nb.key] = LiveBackend(nb.id, nb.gen, nb.state, nb.model.address, nb.model.port)
        rec._record_live(ch, backends, None)
