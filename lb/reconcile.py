"""Turn the desired state into map contents, one atomic step per service.

Invariant: a packet sees either the old or the new version of a service,
never a mix. It holds because

1. everything a service record points at (backend records, the Maglev table
   region, the policy entries of its generation) is written *before* the
   record, into ids, slots and generations that no live record references;
2. the record itself is replaced by one map update of a non-preallocated hash
   map, which the kernel swaps under RCU, and the program copies it to the
   stack once per packet;
3. what the old record pointed at is retired, not freed: ids and slots are
   reused only after an RCU grace period (membarrier, see lb.alloc), so a
   packet that read the old record still finds what it expects.

A backend's address and port never change under its id; only its `state`
word changes in place (one aligned 4-byte store), which is harmless to read
torn. Validation and capacity checks run before the first write, so a
rejected config leaves every map byte-for-byte unchanged.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import numpy as np

from . import gcpause, maglev
from .alloc import IdAllocator, Reclaimer, RegionAllocator
from .config import IPPROTO, Config, ConfigError, Service
from .dataplane import Dataplane, addr_words, family_of, htons, is_ipv6_int, ntohs, set_addr, words_addr
from .replies import ReplyIndex, addr_key

log = logging.getLogger("xdplb.reconcile")

PROTOCOLS = IPPROTO                                  # IANA numbers, not ours
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
SvcKey = tuple[IPAddress, int, str]


def forwarding_flags(c) -> dict[str, int]:
    """The service flags of each `forwarding:` (constants `c` from BTF)."""
    return {"nat": 0, "ipip": c.SVC_F_IPIP, "gue": c.SVC_F_GUE}


def forwarding_name(flags: int, c) -> str:
    """A service record's `forwarding:` from its flags."""
    return next((name for name, f in forwarding_flags(c).items() if f and flags & f), "nat")
# Up to this many changed services, the small-update paths: records built
# through ctypes, and (maglev.use_parallel) no parallel region.
SERIAL_BUILD_MAX = maglev.SERIAL_MAX_SERVICES


class CapacityError(ConfigError):
    """The config is valid but does not fit in the maps."""


def bkey(address: IPAddress, port: int) -> int:
    """A backend's (address, port) as one int: cheap to hash at 200k backends.
    (`_ip` is the address's int value; int() costs a method call per use.
    An IPv6 address's is at least 2**32, so the families never collide.)"""
    return (address._ip << 16) | port


@dataclass(slots=True)
class LiveBackend:
    id: int
    gen: int
    state: int
    address: IPAddress
    port: int


@dataclass
class LiveService:
    key: SvcKey
    svc_id: int
    ring_offset: int
    ring_size: int
    policy_gen: int
    flags: int
    affinity_timeout_s: int = 0
    _backends: dict[int, LiveBackend] | None = field(default_factory=dict, repr=False)
    policy: dict[int, int] = field(default_factory=dict)
    name: str | None = None
    applied: Service | None = None     # the model last applied (None if recovered)
    # (_Made, first, end): where `applied`'s backends are in the arrays of
    # the apply that made them, until `backends` is first read. A full sync
    # of 200k backends does not make 200k objects that only status, metrics
    # and updates look at.
    _pending: tuple | None = field(default=None, repr=False)

    @property
    def backends(self) -> dict[int, LiveBackend]:
        """Backends by bkey(). (Readers hold the daemon's lock, as for
        every other part of the reconciler's state.)"""
        if self._backends is None:
            made, b0, b1 = self._pending
            models = self.applied.backends
            self._backends = dict(zip(made.keys[b0:b1].tolist(), map(
                LiveBackend, made.id[b0:b1].tolist(), made.gen[b0:b1].tolist(),
                made.state[b0:b1].tolist(), [b.address for b in models], [b.port for b in models])))
            self._pending = None
        return self._backends


@dataclass(frozen=True)
class _Made:
    """What one apply wrote for its backends, kept for LiveService.backends."""

    keys: np.ndarray
    id: np.ndarray
    gen: np.ndarray
    state: np.ndarray


@dataclass
class ApplyResult:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    rings_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)



def service_table_size(svc: Service, active: int) -> int:
    """M of `svc`'s table with `active` backends taking new flows: the
    config's `maglev_table_size`, else the count's size; 0 without any."""
    if not active:
        return 0
    return svc.maglev_table_size or maglev.table_size(active)

@dataclass
class _Change:
    """What one service needs, computed before any write."""

    svc: Service
    live: LiveService | None
    svc_id: int = 0
    new_count: int = 0                                     # backends that need an id
    kept: dict = field(default_factory=dict)               # bkey -> LiveBackend
    state_changes: list = field(default_factory=list)      # (LiveBackend, new_state)
    removed_backends: list = field(default_factory=list)   # LiveBackend
    ring_new: bool = True                                  # write a new table (else keep the live one)
    ring_offset: int = 0
    ring_size: int = 0                                     # table size M (0: no active backend)
    policy: dict = field(default_factory=dict)
    flags: int = 0
    policy_gen: int = 0
    policy_changed: bool = False


@dataclass
class _Backends:
    """The backends of every planned service as flat arrays (plan entry i
    owns start[i]:start[i + 1]): one Python pass over the models, the rest
    in numpy. 200k backends in per-object Python cost more than the work."""

    start: np.ndarray          # int64[len(plan) + 1]
    addr: np.ndarray           # int64, host order; object (Python ints) if any is IPv6
    port: np.ndarray           # int64
    weight: np.ndarray         # int64
    state: np.ndarray          # uint32: BACKEND_ACTIVE or BACKEND_DRAINING
    new: np.ndarray            # bool: needs an id (not kept from the live service)
    id: np.ndarray             # uint32: backend id (new ones: once allocated)
    gen: np.ndarray            # uint32: generation under that id
    # The Maglev tables (_compute_rings): plan entry i's table is
    # slots[t_offsets[i]:+ring_size], indices into its active backends,
    # which are the active ones of start[i]:start[i + 1], a_start[i] onwards
    # in the active-only order.
    slots: np.ndarray | None = None
    t_offsets: np.ndarray | None = None
    a_start: np.ndarray | None = None
    reused: np.ndarray | None = None     # indices of new backends whose id was used before

    @property
    def keys(self) -> np.ndarray:
        return (self.addr << 16) | self.port        # bkey() of each

    def owner(self) -> np.ndarray:
        """The plan index of each backend."""
        return np.repeat(np.arange(len(self.start) - 1), np.diff(self.start))


class Reconciler:
    def __init__(self, dp: Dataplane, reclaimer: Reclaimer | None = None):
        self.dp = dp
        self.c = dp.consts
        self.reclaimer = reclaimer or Reclaimer()
        self.services: dict[SvcKey, LiveService] = {}
        self.identities: dict[IPNetwork, int] = {}
        self.vips: dict[IPAddress, int] = {}
        self.config: Config | None = None
        self.generation = 0
        self.pending_policy = 0       # old-generation entries awaiting a grace period
        self.policy_entries = 0       # entries of live generations
        m = dp.maps
        self.svc_ids = IdAllocator(1, m["services"].max_entries)
        self.backend_ids = IdAllocator(1, m["backends"].max_entries)
        self.pool = RegionAllocator(m["maglev_pool"].max_entries * self.c.MAGLEV_CHUNK_SLOTS)
        # Record layouts for batches built as arrays (made from BTF once).
        self._dtypes = {name: dp.obj.layouts.dtype(name) for name in ("svc_key", "svc_value", "vip_key",
                                                                         "backend_addr")}
        self.replies = ReplyIndex(self.c.REPLY_INDEX_SVCS)
        # Service flags of each `forwarding:`; a DSR service's replies never
        # cross the LB, so its backends are not in the reply index.
        self._forwarding_flags = forwarding_flags(self.c)
        self._dsr_flags = sum(self._forwarding_flags.values())
        # The active config record as last read or written (this reconciler
        # is its only writer): an update with the same settings skips the
        # two map lookups; one with the same Config object skips building it.
        self._config_written: bytes | None = None
        self._config_of: Config | None = None
        # identity_ids() of the last identities mapping asked about (a
        # Config's, shared by its model_copy()s): hashing every name on
        # each one-service update would cost O(identities).
        self._ids_of: dict | None = None
        self._ids: dict[str, int] = {}
        # False: every apply takes the batch path (_Batch), even for one
        # service; tests compare the two paths' map contents.
        self.one_service_path = True
        self._recover()

    # -- recovery from the pinned maps --------------------------------------

    def _recover(self) -> None:
        """Rebuild the allocators and the live view from what the maps hold."""
        dp, c = self.dp, self.c
        bview = dp.view("backends")
        for key, val in dp.maps["services"].items():
            skey = (words_addr(key.vip, key.family, c), ntohs(key.port),
                    PROTOCOL_NAMES.get(key.proto, str(key.proto)))
            # SVC_F_REV_NAT follows the reply index, not the config.
            live = LiveService(skey, val.svc_id, val.ring_offset, val.ring_size, val.policy_gen,
                               int(val.flags) & ~c.SVC_F_REV_NAT, int(val.affinity_timeout_s))
            self.services[skey] = live
            self.svc_ids.reserve(val.svc_id)
            if val.ring_size:
                self.pool.reserve(val.ring_offset, val.ring_size)
        by_id = {s.svc_id: s for s in self.services.values()}
        used = np.nonzero(bview["state"] != c.BACKEND_FREE)[0]
        for bid in used:
            rec = bview[bid]
            owner = by_id.get(int(rec["svc_id"]))
            if owner is None:            # orphan of an interrupted apply
                bview["state"][bid] = c.BACKEND_FREE
                continue
            b = LiveBackend(int(bid), int(rec["gen"]), int(rec["state"]),
                            words_addr(rec["addr"], int(rec["family"]), c), ntohs(int(rec["port"])))
            owner.backends[bkey(b.address, b.port)] = b
            self.backend_ids.reserve(int(bid))
        stale = []
        for key, val in dp.maps["policy"].items():
            owner = by_id.get(key.svc_id)
            if owner is None or key.gen != owner.policy_gen:
                stale.append(key)
            else:
                owner.policy[key.identity] = int(val.verdict)
                self.policy_entries += 1
        for key in stale:
            dp.maps["policy"].delete(key)
        for key, val in dp.maps["identities"].items():
            addr = words_addr(key.addr, key.family, c)
            net = ip_network((addr, key.prefixlen - 32))
            self.identities[net] = val.identity
        for key, val in dp.maps["vips"].items():
            self.vips[words_addr(key.addr, key.family, c)] = val.services
        self._recover_replies()

    def _recover_replies(self) -> None:
        """The map gives who is listed, in order; the live backends give
        every member (the ones that did not fit are in no map). Only entries
        that differ from the map are rewritten."""
        members = {(s.svc_id, addr_key(k, PROTOCOLS[s.key[2]])) for s in self.services.values()
                   if not s.flags & self._dsr_flags for k in s.backends}
        on_map: dict = {}
        for key, val in self.dp.maps["reply_index"].items():
            ak = addr_key(bkey(words_addr(key.addr, key.family, self.c), ntohs(key.port)), key.proto)
            on_map[ak] = [int(i) for i in val.svc_id if i]
            for sid in on_map[ak]:
                if (sid, ak) in members:
                    self.replies.add(sid, ak)
        for sid, ak in sorted(members):
            self.replies.add(sid, ak)
        self.replies.keep_written(on_map)

    def identity_ids(self, cfg: Config | None = None) -> dict[str, int]:
        """Identity name -> id, with the reserved values from BTF."""
        cfg = cfg or self.config
        if cfg is None:
            return {"world": self.c.IDENTITY_WORLD}
        if cfg.identities is not self._ids_of:
            self._ids = cfg.identity_ids(user_min=self.c.IDENTITY_USER_MIN, world=self.c.IDENTITY_WORLD)
            self._ids_of = cfg.identities
        return self._ids

    # -- apply ----------------------------------------------------------

    def apply(self, cfg: Config) -> ApplyResult:
        """Make the maps hold `cfg`. Raises ConfigError before any write."""
        t0 = time.perf_counter()
        # The pause covers the diff too: its 20k keys are the allocations
        # that would start a pass over the (million-object) config.
        with gcpause.paused():
            desired = {s.key: s for s in cfg.services}
            changed = [s for k, s in desired.items()
                       if k not in self.services or self.services[k].applied != s]
            removed = [k for k in self.services if k not in desired]
            result = self._apply(cfg, changed, removed)
        result.unchanged = len(desired) - len(changed)
        result.seconds = time.perf_counter() - t0
        return result

    def upsert_service(self, cfg: Config, svc: Service) -> ApplyResult:
        """Apply one already validated service (the API path). Of `cfg`,
        only the settings and identities are read: its services need not
        include `svc` (the daemon makes that tuple only when it is read)."""
        t0 = time.perf_counter()
        result = self._apply(cfg, [svc], [], identities=False)
        result.seconds = time.perf_counter() - t0
        return result

    def apply_services(self, cfg: Config, changed: list[Service], removed: list[SvcKey]) -> ApplyResult:
        """Several services of an already validated `cfg` in one pass (the
        Kubernetes path): each service record is still replaced atomically
        on its own, the per-call work (capacity check, config read, one
        batched flip) is shared. Raises ConfigError before any write."""
        t0 = time.perf_counter()
        result = self._apply(cfg, changed, removed, identities=False)
        result.seconds = time.perf_counter() - t0
        return result

    def delete_service(self, cfg: Config, key: SvcKey) -> ApplyResult:
        t0 = time.perf_counter()
        result = self._apply(cfg, [], [key], identities=False)
        result.seconds = time.perf_counter() - t0
        return result

    def write_identities(self, cfg: Config) -> None:
        """Add or re-point the CIDRs of `cfg.identities` (before services
        that refer to them are upserted). Kubernetes mode's incremental path."""
        self._write_identities(cfg, self.identity_ids(cfg))

    def prune_identities(self, cfg: Config) -> None:
        """Delete CIDRs `cfg.identities` no longer has (after the upserts)."""
        self._remove_identities(cfg)
        self.config = cfg

    def _apply(self, cfg: Config, changed: list[Service], removed: list[SvcKey],
               identities: bool = True) -> ApplyResult:
        with gcpause.paused():
            return self._apply_locked(cfg, changed, removed, identities)

    def _apply_locked(self, cfg: Config, changed: list[Service], removed: list[SvcKey],
                      identities: bool) -> ApplyResult:
        ids = self.identity_ids(cfg)
        plan = [self._plan(svc, ids) for svc in changed]
        # One service (an API call, a health transition, a watch event): in
        # plain Python and one native call; numpy's per-call cost on arrays
        # of a few elements was most of it. tests/test_reconcile.py checks
        # that both write the same bytes.
        if len(plan) <= 1 and self.one_service_path:
            from .single import OneService      # it builds on this module

            work: _Batch | OneService = OneService(self, plan)
        else:
            work = _Batch(self, plan)
        self._check_capacity(cfg, plan, removed, identities)
        work.allocate()
        # --- from here on, writes ---
        if identities:
            self._write_identities(cfg, ids)
        self._write_config(cfg)
        work.write_tables()
        self._flip(plan)
        self._remove(removed)
        work.retire()
        self._write_replies()           # what the retired backends left
        if identities:
            self._remove_identities(cfg)
        self.config = cfg
        self.generation += 1
        res = ApplyResult(removed=len(removed), rings_written=sum(ch.ring_new for ch in plan))
        res.added = sum(ch.live is None for ch in plan)
        res.updated = len(plan) - res.added
        return res

    # -- planning (no writes) ----------------------------------------------

    def _plan(self, svc: Service, ids: dict[str, int]) -> _Change:
        """Policy and flags; the backends are matched in _match_backends."""
        c = self.c
        live = self.services.get(svc.key)
        ch = _Change(svc, live)
        # Policy: explicit entries, and default-deny when an allow list exists.
        world = c.IDENTITY_WORLD
        ident = lambda name: world if name == "world" else ids[name]  # noqa: E731
        for name in svc.allow or []:
            ch.policy[ident(name)] = c.VERDICT_ALLOW
        for name in svc.deny or []:
            ch.policy[ident(name)] = c.VERDICT_DENY
        if svc.allow is not None:
            ch.flags |= c.SVC_F_HAS_POLICY | c.SVC_F_DEFAULT_DENY
        if ch.policy:
            ch.flags |= c.SVC_F_HAS_POLICY
        ch.flags |= self._forwarding_flags[svc.forwarding]
        if live:
            ch.policy_changed = ch.policy != live.policy or (ch.flags != live.flags)
            ch.policy_gen = live.policy_gen + 1 if ch.policy_changed else live.policy_gen
        else:
            ch.policy_changed = True
            ch.policy_gen = 1
        return ch

    def _forwarding_changed(self, ch: _Change) -> bool:
        """A live service whose forwarding changes keeps none of its
        backends: its flows cannot go on (a NAT flow's socket on the backend
        is not the VIP's), so every backend is a new one, the old retired."""
        return ch.live is not None and bool((ch.live.flags ^ ch.flags) & self._dsr_flags)

    def _match_backends(self, plan: list[_Change]) -> _Backends:
        """Every planned backend into flat arrays; the ones a live service
        already has keep their id and generation (state changes are noted)."""
        c = self.c
        counts = [len(ch.svc.backends) for ch in plan]
        flat = [b for ch in plan for b in ch.svc.backends]
        n = len(flat)
        start = np.zeros(len(plan) + 1, np.int64)
        np.cumsum(counts, out=start[1:])
        # One comprehension per field: the fastest way through 200k models.
        active, draining = c.BACKEND_ACTIVE, c.BACKEND_DRAINING
        addr = [b.address._ip for b in flat]
        port = [b.port for b in flat]
        state = [active if b.state == "active" else draining for b in flat]
        new, ids, gens = np.ones(n, np.bool_), np.zeros(n, np.uint32), np.zeros(n, np.uint32)
        kept: list[tuple[int, int, int]] = []       # (index, id, gen) of kept backends
        b1 = 0
        for ch, count in zip(plan, counts):
            live = ch.live
            b0, b1 = b1, b1 + count
            if live is None or self._forwarding_changed(ch):
                ch.new_count = count
                ch.removed_backends = list(live.backends.values()) if live else []
                continue
            live_backends = dict(live.backends)
            for j in range(b0, b1):
                k = (addr[j] << 16) | port[j]            # bkey()
                lb = live_backends.pop(k, None)
                if lb is None:
                    ch.new_count += 1
                    continue
                kept.append((j, lb.id, lb.gen))
                ch.kept[k] = lb
                if lb.state != state[j]:
                    ch.state_changes.append((lb, state[j]))
            ch.removed_backends = list(live_backends.values())
        if kept:
            j, i, g = zip(*kept)
            new[list(j)], ids[list(j)], gens[list(j)] = False, i, g
        return _Backends(start=start, addr=_int_array(addr), port=np.array(port, np.int64),
                         weight=np.fromiter([b.weight for b in flat], np.int64, n),
                         state=np.array(state, np.uint32), new=new, id=ids, gen=gens)

    def _compute_rings(self, plan: list[_Change], fb: _Backends) -> None:
        """Maglev tables for every planned service, in one native call."""
        active = fb.state == self.c.BACKEND_ACTIVE
        before = np.zeros(len(active) + 1, np.int64)      # active backends before each
        np.cumsum(active, out=before[1:])
        a_start = before[fb.start]
        counts = np.diff(a_start)
        want = [service_table_size(ch.svc, n) for ch, n in zip(plan, counts.tolist())]
        # maglev decides: a few services never enter a parallel region. It
        # stalls for milliseconds when the other core is busy (measured:
        # one-service p99 0.315 ms, max 16.8 ms in parallel; 0.041 / 0.144 ms
        # serially); tests/test_reconcile.py checks the small paths.
        if fb.addr.dtype == object:      # IPv6 backends: by their keys, as Backend.key spells them
            keys = [_backend_key(a, p) for a, p in zip(fb.addr[active].tolist(), fb.port[active].tolist())]
            weights = fb.weight[active].tolist()
            bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
            fb.slots, fb.t_offsets, sizes = maglev.build_tables(
                [list(zip(keys[b0:b1], weights[b0:b1])) for b0, b1 in zip(bounds, bounds[1:])],
                sizes=want)
        else:
            fb.slots, fb.t_offsets, sizes = maglev.build_tables_ipv4(
                fb.addr[active], fb.port[active], fb.weight[active], counts, sizes=want)
        fb.a_start = a_start
        for ch, size in zip(plan, sizes.tolist()):
            ch.ring_size = size

    def _check_capacity(self, cfg: Config, plan: list[_Change], removed: list[SvcKey],
                        identities: bool) -> None:
        """Check every allocation before the first write. Costs O(changes),
        so a one-service update stays cheap at 20k services."""
        errors: list[str] = []
        for _attempt in (0, 1):
            errors = self._simulate(cfg, plan, removed)
            if not errors or not self.reclaimer.pending:
                break
            self.reclaimer.synchronize()     # retired ids/slots become free
        if identities:
            m = self.dp.maps["identities"]
            n = len({net for nets in cfg.identities.values() for net in nets} | set(self.identities))
            if n > m.max_entries:
                errors.append(f"identities: {n} CIDRs exceed the map's {m.max_entries} entries")
        if errors:
            raise CapacityError(errors)

    def _simulate(self, cfg: Config, plan: list[_Change], removed: list[SvcKey]) -> list[str]:
        m = self.dp.maps
        errors: list[str] = []

        def where(ch: _Change) -> str:
            i = next((i for i, s in enumerate(cfg.services) if s.key == ch.svc.key), None)
            # The daemon's API passes a cfg whose services need not hold it (upsert_service).
            return f"service '{ch.svc.name}'" if i is None else f"services[{i}] '{ch.svc.name}'"

        new_services = [ch for ch in plan if ch.live is None]
        free_svc = self.svc_ids.capacity - self.svc_ids.count
        if len(new_services) > free_svc:
            ch = new_services[free_svc]
            errors.append(f"{where(ch)}: no free service id: {len(new_services)} new services, "
                          f"{free_svc} free (the services map holds {m['services'].max_entries - 1})")
        free_backends = self.backend_ids.capacity - self.backend_ids.count
        need = 0
        for ch in plan:
            need += ch.new_count
            if need > free_backends:
                errors.append(f"{where(ch)}: no free backend id: the update needs {need}, "
                              f"{free_backends} free (the backends map holds "
                              f"{m['backends'].max_entries - 1})")
                break
        rings = [ch for ch in plan if ch.ring_size]
        if rings:
            pool = self.pool.copy()
            for ch in rings:
                if pool.alloc(ch.ring_size) is None:
                    errors.append(f"{where(ch)}: Maglev pool full: needs {ch.ring_size} slots, "
                                  f"{pool.free_total} free of {pool.total} "
                                  f"(raise limits.maglev_slots)")
                    break
        entries = self.policy_entries + self.pending_policy + sum(
            len(ch.policy) for ch in plan if ch.policy_changed)
        if entries > m["policy"].max_entries:
            errors.append(f"policy: {entries} entries needed during the update, "
                          f"the map holds {m['policy'].max_entries}")
        return errors

    def _allocate(self, plan: list[_Change], fb: _Backends) -> None:
        fresh = [ch for ch in plan if ch.live is None]
        for ch, svc_id in zip(fresh, self._alloc_many(self.svc_ids, len(fresh))):
            ch.svc_id = svc_id
        for ch in plan:
            if ch.live is not None:
                ch.svc_id = ch.live.svc_id
        new = np.nonzero(fb.new)[0]
        if len(new):
            fb.id[new] = self._alloc_many(self.backend_ids, len(new))
            old = self.dp.view("backends")["gen"][fb.id[new]]
            # Generations start at 1 and skip 0 when they wrap, so gen 0 means
            # "never used": counters still zero from map creation (_write_tables).
            fb.gen[new] = np.where(old == np.uint32(0xFFFFFFFF), np.uint32(1), old + np.uint32(1))
            fb.reused = new[old != 0]
        act_ids = fb.id[fb.state == self.c.BACKEND_ACTIVE]
        for i, ch in enumerate(plan):
            off = int(fb.t_offsets[i])
            self._choose_ring(ch, lambda: act_ids[int(fb.a_start[i]):][fb.slots[off:off + ch.ring_size]])

    def _choose_ring(self, ch: _Change, table: Callable[[], np.ndarray]) -> None:
        """Keep the live table if the new one (`table()`, backend ids) is
        identical, else allocate a region for the new one."""
        live, size = ch.live, ch.ring_size
        if live and live.ring_size == size and size:
            if self.dp.view("maglev_pool")[live.ring_offset:live.ring_offset + size].tobytes() == \
                    table().tobytes():
                ch.ring_new = False                 # identical table: keep it
                ch.ring_offset = live.ring_offset
                return
        elif live and not size and not live.ring_size:
            ch.ring_new = False
            return
        ch.ring_offset = self._alloc(self.pool, size) if size else 0

    def _alloc_many(self, allocator: IdAllocator, n: int) -> list[int]:
        got = allocator.alloc_many(n)
        if got is None:
            self.reclaimer.synchronize()
            got = allocator.alloc_many(n)
        if got is None:     # _check_capacity makes this unreachable
            raise CapacityError([f"allocation of {n} ids failed in IdAllocator"])
        return got

    def _alloc(self, allocator, *args) -> int:
        got = allocator.alloc(*args)
        if got is None:
            self.reclaimer.synchronize()
            got = allocator.alloc(*args)
        if got is None:     # _check_capacity makes this unreachable
            raise CapacityError([f"allocation failed in {type(allocator).__name__}"])
        return got

    # -- writes ---------------------------------------------------------------

    def _write_identities(self, cfg: Config, ids: dict[str, int]) -> None:
        m = self.dp.maps["identities"]
        K, V = m.key_type, m.value_type
        for name, nets in cfg.identities.items():
            for net in nets:
                if self.identities.get(net) != ids[name]:
                    m.update(_ident_key(K, net, self.c), V(identity=ids[name]))
                    self.identities[net] = ids[name]

    def _remove_identities(self, cfg: Config) -> None:
        m = self.dp.maps["identities"]
        want = {net for nets in cfg.identities.values() for net in nets}
        for net in [n for n in self.identities if n not in want]:
            m.delete(_ident_key(m.key_type, net, self.c))
            del self.identities[net]

    def _write_config(self, cfg: Config) -> None:
        if cfg is self._config_of:                   # its settings are the active ones
            return
        c, maps = self.c, self.dp.maps
        conf = maps["config"]
        want = conf.value_type()
        for ip in cfg.snat_address or ():
            src = want.snat_v6 if ip.version == 6 else want.snat_v4
            set_addr(src.addr, ip)
            src.family = family_of(ip, c)
        want.snat_port_min = cfg.snat_ports.min
        want.snat_port_max = cfg.snat_ports.max
        want.hash_seed = cfg.hash_seed
        want.monitor_rate = cfg.monitor.events_per_second
        want.monitor_burst = cfg.monitor.burst
        want.monitor_sample = cfg.monitor.sample_forwarded
        want.nexthop_ttl_ms = cfg.nexthop_cache_ms
        want.new_flow_rate = cfg.flood_guard.new_flows_per_second
        want.new_flow_burst = cfg.flood_guard.burst
        want.reject_rate = cfg.no_backend_reject.icmp_per_second
        want.reject_burst = cfg.no_backend_reject.burst
        for src in cfg.encap_source or ():
            slot = want.encap_v6 if src.version == 6 else want.encap_v4
            set_addr(slot.addr, src.network_address)
            slot.spread_mask = int(src.hostmask)
            slot.family = family_of(src.network_address, c)
        want.gue_port = htons(cfg.gue_port)
        if bytes(want) == self._config_written:      # what this reconciler last saw active
            self._config_of = cfg
            return
        meta = maps["meta"].lookup(0)
        if bytes(conf.lookup(meta.active_config)) == bytes(want):
            self._config_written, self._config_of = bytes(want), cfg
            return
        # The inactive copy may still be read by packets that saw it active
        # before the previous flip: wait a grace period before rewriting it.
        self.reclaimer.synchronize()
        inactive = meta.active_config ^ 1
        conf.update(inactive, want)
        meta.active_config = inactive
        meta.layout_version = c.XDPLB_LAYOUT_VERSION
        maps["meta"].update(0, meta)
        self._config_written, self._config_of = bytes(want), cfg

    def _write_tables(self, plan: list[_Change], fb: _Backends) -> None:
        """Backends, Maglev slots, policy entries and zeroed counters: all
        into ids/slots/generations that no live record points at yet."""
        c, maps = self.c, self.dp.maps
        bview, pool = self.dp.view("backends"), self.dp.view("maglev_pool")
        new = np.nonzero(fb.new)[0]
        if len(new):
            ids = fb.id[new].astype(np.int64)
            svc_ids = np.array([ch.svc_id for ch in plan], np.uint32)
            recs = np.zeros(len(new), dtype=bview.dtype)
            # Host-order ints, byte-swapped once: network order in memory.
            if fb.addr.dtype == object:
                _set_addrs(recs["addr"], recs["family"], fb.addr[new].tolist(), c)
            else:
                recs["addr"][:, 0] = fb.addr[new].astype(np.uint32).byteswap()
                recs["family"] = c.FAMILY_IPV4
            recs["port"] = fb.port[new].astype(np.uint16).byteswap()
            recs["state"] = fb.state[new]
            recs["gen"] = fb.gen[new]
            owner = fb.owner()[new]
            recs["svc_id"] = svc_ids[owner]
            bview[ids] = recs
            # Only ids used before can hold counts (a full sync from empty
            # maps: none, and 200k per-CPU zeroes not written).
            _zero_counters(maps["backend_stats"], fb.id[fb.reused].astype(np.int64))
            # Each new backend's address lists its service for replies
            # (NAT services: DSR replies go straight to the client).
            protos = np.array([PROTOCOLS[ch.svc.protocol] for ch in plan], np.int64)
            nat = np.array([not ch.svc.dsr for ch in plan], np.bool_)[owner]
            self.replies.add_many(svc_ids[owner][nat], addr_key(fb.keys[new][nat], protos[owner][nat]))
        self._write_replies()
        self._write_fresh(plan)
        rings = [i for i, ch in enumerate(plan) if ch.ring_new and ch.ring_size]
        if rings:
            maglev.place_tables(pool, [plan[i].ring_offset for i in rings], fb.slots, fb.t_offsets[rings],
                                [plan[i].ring_size for i in rings],
                                fb.id[fb.state == c.BACKEND_ACTIVE], fb.a_start[rings])
        self._write_policies_and_states(plan)

    def _write_fresh(self, plan: list[_Change]) -> None:
        """Zeroed counters and the svc_keys entry of each new service."""
        fresh = [ch for ch in plan if ch.live is None]
        if fresh:
            fresh_ids = np.array([ch.svc_id for ch in fresh], dtype=np.int64)
            _zero_counters(self.dp.maps["svc_stats"], fresh_ids)
            self._write_svc_keys(fresh_ids, [ch.svc for ch in fresh])

    def _write_policies_and_states(self, plan: list[_Change]) -> None:
        """The entries of each changed policy, under its new generation;
        then each kept backend's draining <-> active change."""
        pm = self.dp.maps["policy"]
        keys, vals = [], []
        for ch in plan:
            if ch.policy_changed:
                for ident, verdict in ch.policy.items():
                    keys.append(pm.key_type(svc_id=ch.svc_id, identity=ident, gen=ch.policy_gen))
                    vals.append(pm.value_type(verdict=verdict))
        if keys:
            pm.update_batch((pm.key_type * len(keys))(*keys), (pm.value_type * len(vals))(*vals))
        # Draining <-> active: one aligned 4-byte store per backend.
        state_view = self.dp.view("backends")["state"]
        for ch in plan:
            for lb, state in ch.state_changes:
                state_view[lb.id] = state
                lb.state = state

    def _write_svc_keys(self, ids: np.ndarray, svcs: list[Service]) -> None:
        """svc_id -> (VIP, port, proto) for replies, before the ids go live."""
        self.dp.maps["svc_keys"].update_batch(ids.astype(np.uint32), self._svc_keys(svcs))

    def _svc_keys(self, svcs: list[Service]) -> np.ndarray:
        keys = np.zeros(len(svcs), self._dtypes["svc_key"])
        vips = [s.vip._ip for s in svcs]
        if any(map(is_ipv6_int, vips)):
            _set_addrs(keys["vip"], keys["family"], vips, self.c)
        else:
            keys["vip"][:, 0] = np.array(vips, np.uint32).byteswap()
            keys["family"] = self.c.FAMILY_IPV4
        keys["port"] = np.array([s.port for s in svcs], np.uint16).byteswap()
        keys["proto"] = [PROTOCOLS[s.protocol] for s in svcs]
        return keys

    def _flags(self, ch: _Change) -> int:
        """The record's flags: the config's, and SVC_F_REV_NAT while the
        service waits for a reply-index slot (replies.py)."""
        return ch.flags | (self.c.SVC_F_REV_NAT if self.replies.needs_rev_nat(ch.svc_id) else 0)

    def _write_replies(self) -> None:
        """Write the reply-index entries that changed (replies.py)."""
        d = self.replies.take_dirty()
        m = self.dp.maps["reply_index"]
        kdt = self._dtypes["backend_addr"]
        if len(d.keys):
            m.update_batch(_backend_addrs(kdt, d.keys, self.c), d.values)
        if len(d.deletes):
            m.delete_batch(_backend_addrs(kdt, d.deletes, self.c))

    def _flip(self, plan: list[_Change]) -> None:
        """The service records, in one batch."""
        sm = self.dp.maps["services"]
        self._vip_refs([ch.svc.vip for ch in plan if ch.live is None], +1)
        if not plan:
            return
        if len(plan) <= SERIAL_BUILD_MAX:    # a few: ctypes records, no array set-up
            keys = (sm.key_type * len(plan))()
            vals = (sm.value_type * len(plan))()
            for i, ch in enumerate(plan):
                _svc_key(keys[i], ch.svc.key, self.c)
                v = vals[i]
                v.svc_id = ch.svc_id
                v.ring_offset = ch.ring_offset
                v.ring_size = ch.ring_size      # a kept table has this size too (_allocate)
                v.policy_gen = ch.policy_gen
                v.flags = self._flags(ch)
                v.affinity_timeout_s = ch.svc.client_affinity_s or 0
            sm.update_batch(keys, vals)
            return
        # Many: built as arrays (20k records field by field through ctypes: 0.1 s).
        svcs = [ch.svc for ch in plan]
        keys = self._svc_keys(svcs)
        vals = np.zeros(len(plan), self._dtypes["svc_value"])
        vals["svc_id"] = [ch.svc_id for ch in plan]
        vals["ring_offset"] = [ch.ring_offset for ch in plan]
        vals["ring_size"] = [ch.ring_size for ch in plan]
        vals["policy_gen"] = [ch.policy_gen for ch in plan]
        vals["flags"] = [self._flags(ch) for ch in plan]
        vals["affinity_timeout_s"] = [s.client_affinity_s or 0 for s in svcs]
        sm.update_batch(keys, vals)

    def _vip_refs(self, vips: list[IPAddress], delta: int) -> None:
        """Count services per VIP address; one batch for many services."""
        if len(vips) < 8:
            for vip in vips:
                self._vip_ref(vip, delta)
            return
        # Counted by int: IPv4Address hashes in Python, 3 lookups per service.
        per_ip = Counter(v._ip for v in vips)
        addr = {v._ip: v for v in vips}
        touched = {addr[ip]: self.vips.get(addr[ip], 0) + delta * k for ip, k in per_ip.items()}
        vm = self.dp.maps["vips"]
        up = [(v, n) for v, n in touched.items() if n > 0]
        if up:
            keys = np.zeros(len(up), dtype=self._dtypes["vip_key"])
            ints = [v._ip for v, _ in up]
            if any(map(is_ipv6_int, ints)):
                _set_addrs(keys["addr"], keys["family"], ints, self.c)
            else:
                keys["addr"][:, 0] = np.array(ints, np.uint32).byteswap()
                keys["family"] = self.c.FAMILY_IPV4
            vm.update_batch(keys, np.array([n for _, n in up], np.uint32))
        for v, n in touched.items():
            if n > 0:
                self.vips[v] = n
            elif v in self.vips:
                self._vip_ref(v, -self.vips[v])

    def _vip_ref(self, vip: IPAddress, delta: int) -> None:
        vm = self.dp.maps["vips"]
        key = vm.key_type(family=family_of(vip, self.c))
        set_addr(key.addr, vip)
        n = self.vips.get(vip, 0) + delta
        if n > 0:
            vm.update(key, vm.value_type(services=n))
            self.vips[vip] = n
        else:
            vm.delete(key)
            self.vips.pop(vip, None)

    def _remove(self, removed: list[SvcKey]) -> None:
        c, maps = self.c, self.dp.maps
        sm, pm = maps["services"], maps["policy"]
        for key in removed:
            live = self.services.pop(key)
            k = sm.key_type()
            _svc_key(k, key, c)
            sm.delete(k)
            self._vip_ref(key[0], -1)
            self._retire_backends(live, live.backends.values())
            if live.ring_size:
                self.reclaimer.retire_region(self.pool, live.ring_offset, live.ring_size)
            self._retire_policy(pm, live.svc_id, live.policy_gen, live.policy)
            self.policy_entries -= len(live.policy)
            self.reclaimer.retire_id(self.svc_ids, live.svc_id)

    def _retire_backends(self, live: LiveService, backends) -> None:
        """A removed backend loses its flows now (conntrack sees FREE and
        re-picks; its replies no longer match); its id is reused only after
        a grace period."""
        state = self.dp.view("backends")["state"]
        proto = PROTOCOLS[live.key[2]]
        listed = not live.flags & self._dsr_flags        # a DSR service's never are
        for b in backends:
            state[b.id] = self.c.BACKEND_FREE
            self.reclaimer.retire_id(self.backend_ids, b.id)
            if listed:
                self.replies.remove(live.svc_id, addr_key(bkey(b.address, b.port), proto))

    def _retire_policy(self, pm, svc_id: int, gen: int, entries: dict[int, int]) -> None:
        if not entries:
            return
        keys = [pm.key_type(svc_id=svc_id, identity=i, gen=gen) for i in entries]
        self.pending_policy += len(keys)

        def delete_old_generation() -> None:
            for k in keys:
                pm.delete(k)
            self.pending_policy -= len(keys)

        self.reclaimer.retire_callback(delete_old_generation)

    def _retire(self, plan: list[_Change], fb: _Backends) -> None:
        """Record the new live state; retire what only old records use."""
        pm = self.dp.maps["policy"]
        made = None
        start = fb.start.tolist()
        ids = gens = states = keys = new = None        # as lists, if some service needs them
        for i, ch in enumerate(plan):
            self._retire_old(ch, pm)
            backends, pending = ch.kept, None
            b0, b1 = start[i], start[i + 1]
            if ch.new_count == b1 - b0:          # all new (a full sync): made when first read
                made = made or _Made(fb.keys, fb.id, fb.gen, fb.state)
                backends, pending = None, (made, b0, b1)
            elif ch.new_count:
                if ids is None:
                    ids, gens, states = fb.id.tolist(), fb.gen.tolist(), fb.state.tolist()
                    keys, new = fb.keys.tolist(), fb.new.tolist()
                for j, b in enumerate(ch.svc.backends, b0):
                    if new[j]:
                        backends[keys[j]] = LiveBackend(ids[j], gens[j], states[j], b.address, b.port)
            self._record_live(ch, backends, pending)

    def _retire_old(self, ch: _Change, pm) -> None:
        """Retire what only the service's old record uses: removed backends,
        a replaced table, a replaced policy generation."""
        live = ch.live
        if live is not None:
            self._retire_backends(live, ch.removed_backends)
            if ch.ring_new and live.ring_size:
                self.reclaimer.retire_region(self.pool, live.ring_offset, live.ring_size)
            if ch.policy_changed:
                self._retire_policy(pm, live.svc_id, live.policy_gen, live.policy)
                self.policy_entries -= len(live.policy)
        if ch.policy_changed:
            self.policy_entries += len(ch.policy)

    def _record_live(self, ch: _Change, backends: dict | None, pending: tuple | None) -> None:
        self.services[ch.svc.key] = LiveService(
            ch.svc.key, ch.svc_id, ch.ring_offset, ch.ring_size, ch.policy_gen, ch.flags,
            ch.svc.client_affinity_s or 0, backends, dict(ch.policy), ch.svc.name, ch.svc, pending)


class _Batch:
    """The table phases of _apply for many services, as flat arrays."""

    def __init__(self, rec: Reconciler, plan: list[_Change]) -> None:
        self.rec, self.plan = rec, plan
        self.fb = rec._match_backends(plan)
        rec._compute_rings(plan, self.fb)

    def allocate(self) -> None:
        self.rec._allocate(self.plan, self.fb)

    def write_tables(self) -> None:
        self.rec._write_tables(self.plan, self.fb)

    def retire(self) -> None:
        self.rec._retire(self.plan, self.fb)


def _zero_counters(m, ids: np.ndarray) -> None:
    """Per-CPU counters of a newly (re)used id start at zero."""
    if not len(ids):
        return
    keys = ids.astype(np.uint32)
    values = np.zeros((len(ids), m.ncpus * 2), dtype=np.uint64)  # struct counter per CPU
    m.update_batch(keys, values)


def _int_array(ints: list[int]) -> np.ndarray:
    """int64, or Python ints (object) when an IPv6 address is among them."""
    if ints and any(map(is_ipv6_int, ints)):
        return np.array(ints, dtype=object)
    return np.array(ints, np.int64)


def _ip(n: int) -> IPAddress:
    return IPv6Address(n) if is_ipv6_int(n) else IPv4Address(n)


def _backend_key(addr: int, port: int) -> str:
    """Backend.key of an (address int, port): the Maglev permutation's input."""
    return f"[{IPv6Address(addr)}]:{port}" if is_ipv6_int(addr) else f"{IPv4Address(addr)}:{port}"


def _set_addrs(addrs: np.ndarray, families: np.ndarray, ints: list[int], c) -> None:
    """Rows of __u32[4] addresses and their families from address ints."""
    for i, n in enumerate(ints):
        ip = _ip(n)
        addrs[i] = addr_words(ip)
        families[i] = family_of(ip, c)


def _backend_addrs(dtype: np.dtype, keys: np.ndarray, c) -> np.ndarray:
    """reply_index keys from replies.addr_key() ints."""
    if len(keys) <= 8 or keys.dtype == object:  # few (1 vs 6 us), or IPv6: struct, not numpy
        f = dtype.fields
        a, p, pr, fa = f["addr"][1], f["port"][1], f["proto"][1], f["family"][1]
        buf = bytearray(len(keys) * dtype.itemsize)
        for i, k in enumerate(keys.tolist()):
            o = i * dtype.itemsize
            ip = _ip(k >> 24)
            buf[o + a:o + a + 16] = ip.packed.ljust(16, b"\0")     # network order in memory
            struct.pack_into(">H", buf, o + p, (k >> 8) & 0xFFFF)
            buf[o + pr], buf[o + fa] = k & 0xFF, family_of(ip, c)
        return np.frombuffer(buf, dtype=dtype)
    out = np.zeros(len(keys), dtype=dtype)
    out["addr"][:, 0] = (keys >> 24).astype(np.uint32).byteswap()     # network order in memory
    out["port"] = ((keys >> 8) & 0xFFFF).astype(np.uint16).byteswap()
    out["proto"] = keys & 0xFF
    out["family"] = c.FAMILY_IPV4
    return out


def _svc_key(k, key: SvcKey, c) -> None:
    vip, port, proto = key
    set_addr(k.vip, vip)
    k.port = htons(port)
    k.proto = PROTOCOLS[proto]
    k.family = family_of(vip, c)


def _ident_key(K, net: IPNetwork, c):
    k = K(prefixlen=32 + net.prefixlen, family=family_of(net, c))
    set_addr(k.addr, net.network_address)
    return k


__all__ = ["Reconciler", "CapacityError", "ApplyResult", "PROTOCOLS", "forwarding_flags", "forwarding_name"]
