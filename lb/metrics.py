"""Prometheus metrics of the running daemon, served on `metrics_address`
(127.0.0.1:9469 by default; `metrics_address: false` turns them off).

Nothing is cached between scrapes: each scrape reads the maps, under the
daemon's lock so that ids and names agree with the maps, and sums the
per-CPU counters over CPUs. What one scrape costs:

- counters per service and backend: one BPF_MAP_LOOKUP_BATCH per 4096 ids,
  up to the highest id in use (ids are allocated lowest first, so dense);
- entry counts of hash, LRU and LPM maps (conntrack, NAT, ...): the same
  batch lookup over every entry (a full 262144-entry conntrack copies about
  14 MiB); LPM tries and devmaps have no batch lookup and are walked key by
  key (they hold few entries);
- arrays are indexed by ids the control plane allocates, so their fill
  level comes from the allocators (services, backends, Maglev pool slots);
  fixed-index arrays (config, drop_stats, ...) count as full; ring buffers
  have no fill level and are left out.

Only the map reads hold the lock (about 70 ms at 20k services). Rendering
the 80k series of 20k services (7.7 MB of text) in prometheus_client costs
the rest: a scrape took 1-1.5 s on the 2-core test machine.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from loader import libbpf as L
from loader.errors import ENOTSUPP, error_for, last_errno
from loader.maps import Map
from loader.stats import prog_info

from .endpoint import host_text

XDP_ACTIONS = frozenset({"pass", "tx", "redirect", "drop", "aborted"})   # the kernel's verdicts
HASHED = frozenset({L.MapType.HASH, L.MapType.LRU_HASH, L.MapType.PERCPU_HASH,
                    L.MapType.LRU_PERCPU_HASH, L.MapType.LPM_TRIE, L.MapType.DEVMAP_HASH})
ARRAYS = frozenset({L.MapType.ARRAY, L.MapType.PERCPU_ARRAY, L.MapType.DEVMAP})
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHUNK = 4096


def listen_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:9469' or '[::1]:9469' -> (host, port) for bind()."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ---- reading maps in batches --------------------------------------------


def _value_bytes(m: Map) -> int:
    # Per-CPU values come as ncpus slots of value_size rounded up to 8.
    return ((m.value_size + 7) & ~7) * m.ncpus if m.percpu else m.value_size


def read_batch(m: Map, limit: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Raw (keys, values) of every entry, as uint8 arrays of shape (n, size),
    one BPF_MAP_LOOKUP_BATCH per CHUNK entries. For arrays, `limit` stops
    after the first `limit` indexes. None if the map type has no batch op."""
    chunk = CHUNK
    vsize = _value_bytes(m)
    tokens = [ctypes.create_string_buffer(max(m.key_size, 8)) for _ in range(2)]
    token_in: Any = None
    keys_out: list[np.ndarray] = []
    values_out: list[np.ndarray] = []
    opts = L.opts(L.BpfMapBatchOpts)
    n = 0
    while limit is None or n < limit:
        want = chunk if limit is None else max(1, min(chunk, limit - n))
        keys = np.empty((want, m.key_size), np.uint8)
        values = np.empty((want, vsize), np.uint8)
        count = ctypes.c_uint32(want)
        token_out = tokens[1] if token_in is tokens[0] else tokens[0]
        rc = L.lib.bpf_map_lookup_batch(m.fd, token_in, token_out, keys.ctypes.data,
                                        values.ctypes.data, ctypes.byref(count), ctypes.byref(opts))
        err = last_errno(rc) if rc < 0 else 0
        if err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP) and token_in is None:
            return None
        if err == errno.ENOSPC:          # one hash bucket holds more than `want` entries
            chunk *= 2
            continue
        if err and err != errno.ENOENT:
            raise error_for(err, f"map {m.name}: lookup_batch")
        keys_out.append(keys[:count.value])
        values_out.append(values[:count.value])
        n += count.value
        if err == errno.ENOENT:
            break
        token_in = token_out
    if not keys_out:
        return np.empty((0, m.key_size), np.uint8), np.empty((0, vsize), np.uint8)
    return np.concatenate(keys_out), np.concatenate(values_out)


def count_entries(m: Map) -> int:
    got = read_batch(m)
    if got is not None:
        return len(got[0])
    return sum(1 for _ in m.keys())       # LPM tries, devmaps: no batch lookup


def counter_sums(m: Map, counter: np.dtype, limit: int | None = None) -> np.ndarray:
    """A per-CPU array of `struct counter` summed over CPUs: an (n, 2) uint64
    array of (packets, bytes), row i for index i."""
    got = read_batch(m, limit)
    if got is None:
        raise error_for(errno.EOPNOTSUPP, f"map {m.name}: lookup_batch")
    return sum_counters(m, got[1], counter)


def sum_counters(m: Map, values: np.ndarray, counter: np.dtype) -> np.ndarray:
    """Raw per-CPU `struct counter` values (n, ncpus slots) -> (n, 2) sums."""
    stride = (m.value_size + 7) & ~7
    per_cpu = np.dtype({"names": list(counter.names),
                        "formats": [counter.fields[f][0] for f in counter.names],
                        "offsets": [counter.fields[f][1] for f in counter.names],
                        "itemsize": stride})
    recs = np.ascontiguousarray(values).view(per_cpu).reshape(len(values), m.ncpus)
    out = np.empty((len(values), 2), np.uint64)
    out[:, 0] = recs["packets"].sum(axis=1, dtype=np.uint64)
    out[:, 1] = recs["bytes"].sum(axis=1, dtype=np.uint64)
    return out


# ---- one scrape's snapshot ------------------------------------------------


@dataclass
class Snapshot:
    """Everything one scrape exports, read under the daemon's lock."""

    # Raw values, turned into label strings outside the lock:
    # (svc_id, name, vip, port, protocol, [(backend_id, address, port, state)])
    services: list[tuple] = field(default_factory=list)
    backend_states: dict[int, str] = field(default_factory=dict)
    svc_counts: np.ndarray | None = None
    backend_counts: np.ndarray | None = None
    drops: dict[str, tuple[int, int]] = field(default_factory=dict)
    identity_drops: dict[tuple[str, str, str], int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    map_entries: dict[str, int] = field(default_factory=dict)
    map_capacity: dict[str, int] = field(default_factory=dict)
    conntrack: int = 0
    nat: int = 0
    prog_runs: int = 0
    prog_ns: int = 0
    generation: int = 0
    reclaim_pending: int = 0
    neighbours: tuple[int, int] | None = None     # (managed, unresolved) next hops
    up: bool = False


def _label_name(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def map_fill(dp, rec) -> tuple[dict[str, int], dict[str, int]]:
    """(entries in use, capacity) per map that has a fill level: hashed maps
    are counted, id-indexed arrays report the ids allocated, the Maglev pool
    its slots; ring buffers have none. The caller holds the daemon's lock."""
    entries: dict[str, int] = {}
    capacity: dict[str, int] = {}
    used_arrays = {"services": None, "svc_stats": rec.svc_ids.count, "svc_keys": rec.svc_ids.count,
                   "backends": rec.backend_ids.count, "backend_stats": rec.backend_ids.count}
    for name, m in dp.maps.items():
        if name == "maglev_pool":          # in slots: services' tables are runs of slots
            entries[name], capacity[name] = rec.pool.used, rec.pool.total
            continue
        if m.map_type in HASHED:
            entries[name] = count_entries(m)
        elif m.map_type in ARRAYS:
            used = used_arrays.get(name)
            entries[name] = m.max_entries if used is None else used   # fixed-index arrays are full
        else:
            continue                       # a ring buffer is a byte queue, not a table: no fill level
        capacity[name] = m.max_entries
    return entries, capacity


def snapshot(daemon) -> Snapshot:
    """Read the maps and the reconciler's view (the caller holds the lock)."""
    dp, rec = daemon.dp, daemon.rec
    c, maps = dp.consts, dp.maps
    counter = dp.obj.layouts.dtype("counter")
    s = Snapshot()
    s.backend_states = {v: _label_name(k, "BACKEND_") for k, v in c.enums["backend_state"].items()}
    names_by_id: dict[int, str] = {}
    for (vip, port, proto), live in rec.services.items():
        names_by_id[live.svc_id] = live.name or ""
        s.services.append((live.svc_id, live.name or "", vip, port, proto,
                           [(b.id, b.address, b.port, b.state) for b in live.backends.values()]))
    # Ids are allocated lowest first: reading up to the highest in use is enough.
    max_sid = max(names_by_id, default=0)
    max_bid = max((b[0] for svc in s.services for b in svc[5]), default=0)
    s.svc_counts = counter_sums(maps["svc_stats"], counter, max_sid + 1)
    s.backend_counts = counter_sums(maps["backend_stats"], counter, max_bid + 1)

    reasons = {v: _label_name(k, "DROP_") for k, v in c.enums["drop_reason"].items()
               if k not in ("DROP_NONE", "DROP_REASON_MAX")}
    drops = counter_sums(maps["drop_stats"], counter)
    s.drops = {name: (int(drops[r, 0]), int(drops[r, 1])) for r, name in reasons.items()}

    identities = {v: k for k, v in rec.identity_ids().items()}
    identities.setdefault(c.IDENTITY_WORLD, "world")
    identities.setdefault(c.IDENTITY_UNKNOWN, "unknown")
    detail = read_batch(maps["drop_detail"])
    if detail is not None and len(detail[0]):
        keys = np.ascontiguousarray(detail[0]).view(dp.obj.layouts.dtype("drop_key")).ravel()
        sums = sum_counters(maps["drop_detail"], detail[1], counter)
        agg: dict[tuple[str, str, str], int] = defaultdict(int)
        for k, packets in zip(keys.tolist(), sums[:, 0].tolist()):
            ident, sid, reason = k
            agg[(identities.get(ident, str(ident)), names_by_id.get(sid, ""),
                 reasons.get(reason, str(reason)))] += packets
        s.identity_drops = dict(agg)

    glob = counter_sums(maps["global_stats"], counter)
    for i, name in c.names("xdplb_counter").items():
        if name == "CNT_MAX":
            continue
        label = _label_name(name, "CNT_")
        (s.actions if label in XDP_ACTIONS else s.events)[label] = int(glob[i, 0])

    s.map_entries, s.map_capacity = map_fill(dp, rec)
    s.conntrack = s.map_entries.get("conntrack", 0)
    s.nat = s.map_entries.get("rev_nat", 0)

    info = prog_info(dp.prog.fd)
    s.prog_runs, s.prog_ns = info.run_cnt, info.run_time_ns
    s.generation = rec.generation
    s.reclaim_pending = rec.reclaimer.pending
    return s


# ---- the collector ----------------------------------------------------------


class DaemonCollector:
    """Builds the metric families from a fresh snapshot on every scrape."""

    def __init__(self, daemon):
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []        # families depend on the maps; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        with d.lock:
            s = snapshot(d)
        s.up = not d.health_problems()
        keeper = getattr(d, "neighbours", None)
        if keeper is not None:
            s.neighbours = (keeper.status.managed, len(keeper.status.unresolved))
        # Outside the daemon's lock: the health checker has its own locking.
        health = getattr(d, "health", None)
        states = health.states() if health is not None and hasattr(health, "states") else None
        yield from families(s, states)


def _memo(fn):
    """`fn` of an address, memoized for one scrape (backends repeat, and
    IPv4Address.__str__ is the costliest step at 20k services)."""
    return functools.lru_cache(maxsize=None)(fn)


def families(s: Snapshot, health: dict | None) -> Iterator[Metric]:
    svc_labels = ["service", "vip", "port", "protocol"]
    pk = CounterMetricFamily("xdplb_service_packets", "Packets to the service's VIP:port, "
                             "summed over CPUs.", labels=svc_labels)
    by = CounterMetricFamily("xdplb_service_bytes", "Bytes to the service's VIP:port.", labels=svc_labels)
    b_labels = ["service", "backend", "state"]
    bpk = CounterMetricFamily("xdplb_backend_packets", "Packets forwarded to the backend.", labels=b_labels)
    bby = CounterMetricFamily("xdplb_backend_bytes", "Bytes forwarded to the backend.", labels=b_labels)
    svc_counts, b_counts = s.svc_counts.tolist(), s.backend_counts.tolist()
    ip, host = _memo(str), _memo(host_text)          # host: "[2001:db8::2]" before a port
    for sid, name, vip, port, proto, backends in s.services:
        values = [name, ip(vip), str(port), proto]
        pk.add_metric(values, svc_counts[sid][0])
        by.add_metric(values, svc_counts[sid][1])
        for bid, addr, bport, state in backends:
            values = [name, f"{host(addr)}:{bport}", s.backend_states.get(state, str(state))]
            bpk.add_metric(values, b_counts[bid][0])
            bby.add_metric(values, b_counts[bid][1])
    yield pk
    yield by
    yield bpk
    yield bby

    pk = CounterMetricFamily("xdplb_drops", "Packets dropped by XDP, by reason.", labels=["reason"])
    by = CounterMetricFamily("xdplb_dropped_bytes", "Bytes dropped by XDP, by reason.", labels=["reason"])
    for reason, (p, b) in sorted(s.drops.items()):
        pk.add_metric([reason], p)
        by.add_metric([reason], b)
    yield pk
    yield by

    f = CounterMetricFamily("xdplb_identity_drops", "Packets dropped, by source identity, service "
                            "and reason (an LRU of the most recent combinations).",
                            labels=["identity", "service", "reason"])
    for labels, p in sorted(s.identity_drops.items()):
        f.add_metric(list(labels), p)
    yield f

    f = CounterMetricFamily("xdplb_xdp_actions", "Packets by XDP verdict.", labels=["action"])
    for action, p in sorted(s.actions.items()):
        f.add_metric([action], p)
    yield f
    f = CounterMetricFamily("xdplb_events", "Data-plane events: new flows, conntrack hits, stale "
                            "conntrack entries, reverse-NATed replies, neighbour passes.", labels=["event"])
    for event, p in sorted(s.events.items()):
        f.add_metric([event], p)
    yield f

    yield GaugeMetricFamily("xdplb_conntrack_entries", "Flows in the conntrack LRU.", value=s.conntrack)
    yield GaugeMetricFamily("xdplb_nat_entries", "Entries in the reverse-NAT LRU (SNAT mode, and services flagged rev_nat).", value=s.nat)
    e = GaugeMetricFamily("xdplb_map_entries", "Entries in use per BPF map (maglev_pool: slots; "
                          "fixed-index arrays are always full).", labels=["map"])
    cap = GaugeMetricFamily("xdplb_map_capacity", "Capacity per BPF map (max_entries; "
                            "maglev_pool: slots).", labels=["map"])
    for name in sorted(s.map_capacity):
        cap.add_metric([name], s.map_capacity[name])
        if name in s.map_entries:
            e.add_metric([name], s.map_entries[name])
    yield e
    yield cap

    yield CounterMetricFamily("xdplb_program_runs", "Runs of the XDP program (counted only while "
                              "kernel.bpf_stats_enabled=1).", value=s.prog_runs)
    yield CounterMetricFamily("xdplb_program_run_seconds", "Time spent in the XDP program (counted "
                              "only while kernel.bpf_stats_enabled=1).", value=s.prog_ns / 1e9)

    yield GaugeMetricFamily("xdplb_config_generation", "Applies since the daemon started "
                            "(full configs and single-service changes).", value=s.generation)
    yield GaugeMetricFamily("xdplb_reclaim_pending", "Retired ids and Maglev regions waiting for "
                            "an RCU grace period.", value=s.reclaim_pending)
    yield GaugeMetricFamily("xdplb_up", "1 if the daemon's health check passes (maps pinned, "
                            "links attached, API serving).", value=1 if s.up else 0)

    if s.neighbours is not None:
        yield GaugeMetricFamily("xdplb_neighbours_managed", "Next hops of backends and gateways "
                                "kept resolved as managed neighbour entries.", value=s.neighbours[0])
        yield GaugeMetricFamily("xdplb_neighbours_unresolved", "Of those, next hops that do not "
                                "resolve (new flows through them wait or, with SNAT, drop as no_neigh).",
                                value=s.neighbours[1])

    if health is not None:
        f = GaugeMetricFamily("xdplb_backend_health", "Active health check: 1 up, 0 down.",
                              labels=["service", "backend"])
        for (service, backend), ok in sorted(health.items()):
            f.add_metric([service, backend], 1 if ok else 0)
        yield f


# ---- the endpoint -----------------------------------------------------------


class Metrics:
    """The daemon's registry, its control-plane instruments and the HTTP
    endpoint. `start`/`stop` may be called again to move the endpoint."""

    def __init__(self, daemon):
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(daemon))
        self.apply_seconds = Histogram("xdplb_apply_duration_seconds", "Time to make the maps hold "
                                       "a config: kind=full (whole config) or service (one service).",
                                       ["kind"], registry=self.registry, buckets=APPLY_BUCKETS)
        self.apply_errors = Counter("xdplb_apply_errors", "Configs and service changes rejected "
                                    "(nothing was changed) or failed.", ["kind"], registry=self.registry)
        for kind in ("full", "service"):          # export zeros before the first event
            self.apply_seconds.labels(kind)
            self.apply_errors.labels(kind)
        self.address: str | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, address: str) -> None:
        host, port = listen_address(address)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            from .config import ConfigError

            raise ConfigError([f"metrics_address {address}: cannot listen: {e.strerror or e}"]) from None
        self._thread.name = "xdplb-metrics"
        self.address = address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._server = self._thread = None
        self.address = None

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()
