"""Kubernetes mode: follow a cluster's Services and EndpointSlices (and, for
NetworkPolicy, Pods, Namespaces and NetworkPolicies) and keep the maps equal
to what kube-proxy would program.

- `k8s_reflector.Reflector`: one thread per kind, list -> watch with the
  official client (`kubernetes`; it does the HTTP, the auth, kubeconfig and
  in-cluster credentials): paged lists, watch from the list's
  resourceVersion with bookmarks, relist and diff after 410 Gone, reconnect
  with exponential backoff. Emits slim objects (`k8s_model.parse`).
- `k8s_sync.Syncer`: translates only the Services a batch touches and
  validates only the resulting xdplb services.
- `KubernetesWatcher` (here): runs both, collects a burst of events
  (`batch_ms`) and hands one `Plan` to the daemon, which writes each
  changed service atomically in one reconciler pass
  (`Reconciler.apply_services`).
"""

from __future__ import annotations



import collections
import gc
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

from ..config import KubernetesSource
from .. import gcpause
from .k8s_reflector import BACKOFF_S, WATCH_TIMEOUT_S, Event, Reflector, _kv, _short, api_client
from .k8s_sync import KubeState, Plan, Syncer, to_service

__all__ = ["BACKOFF_S", "WATCH_TIMEOUT_S", "Event", "KubeState", "KubernetesWatcher", "Plan",
           "Reflector", "Syncer", "api_client", "to_service"]

log = logging.getLogger("xdplb.k8s")
REFREEZE_S = 5.0                   # move what survived into the frozen generation this often


# ---- the runner: reflectors + batching ----------------------------------------------------


KINDS_ALWAYS = ("Service", "EndpointSlice", "Node")
KINDS_POLICY = ("Pod", "Namespace", "NetworkPolicy")


class KubernetesWatcher:
    """Runs the reflectors and the syncer; `apply(plan)` is the daemon's."""

    def __init__(self, settings: KubernetesSource, apply: Callable[[Plan], None],
                 client=None) -> None:
        self.settings = settings
        self.client = client or api_client(settings.kubeconfig)
        self.apply_fn = apply
        self.syncer = Syncer(settings)
        self.queue: queue.Queue[Event] = queue.Queue()
        self.stop = threading.Event()
        kinds = KINDS_ALWAYS + (KINDS_POLICY if settings.network_policy else ())
        self.reflectors = []
        for k in kinds:
            fs = None
            if k == "Node":
                # Only this node (what kube-proxy watches too); no node: nothing to watch.
                fs = f"metadata.name={settings.node_name or '-'}"
            self.reflectors.append(Reflector(k, self.client, self.queue, self.stop,
                                             page_size=settings.page_size, field_selector=fs))
        self.synced = threading.Event()
        self.applied: collections.deque = collections.deque(maxlen=200_000)  # (ns, {kind: rv})
        self.latency_ns: collections.deque = collections.deque(maxlen=100_000)  # receive -> applied
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.applied_rv: dict[str, int] = {}      # kind -> highest resourceVersion in the maps
        self.slow_batches = 0
        self._slow_logged = 0
        self._mu = threading.Lock()               # applied/latency_ns: appended here, read by status()

    def start_reflectors(self) -> None:
        for r in self.reflectors:
            r.start()

    def initial(self, timeout: float | None = None, abort: threading.Event | None = None) -> Plan:
        """Wait for every kind's first list; the plan of the whole state."""
        pending = {r.kind for r in self.reflectors}
        events: list[Event] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        next_note = time.monotonic() + 10
        while pending and not self.stop.is_set():
            if abort is not None and abort.is_set():
                raise RuntimeError("stopped before the first list from the Kubernetes API")
            if time.monotonic() > next_note:
                log.warning(_kv("still waiting for the first list", kinds=sorted(pending)))
                next_note = time.monotonic() + 10
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"Kubernetes: no first list of {', '.join(sorted(pending))} "
                                   f"after {timeout}s")
            try:
                ev = self.queue.get(timeout=min(left, 1.0) if left is not None else 1.0)
            except queue.Empty:
                continue
            if ev.type == "SYNCED":
                pending.discard(ev.kind)
            events.append(ev)
        with gcpause.paused():                  # ~650k new long-lived objects: no pass over them midway
            plan = self.syncer.plan(events)
        self.applied_rv = dict(plan.rvs)
        if plan.identities is None:
            plan.identities = dict(self.syncer.identities)
        self.syncer.identities = plan.identities
        return plan

    def _gc_watch(self, phase: str, info: dict) -> None:
        """Full collections stall every thread: count and time them."""
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_t0 = time.monotonic_ns()
        elif self._gc_t0:
            ms = (time.monotonic_ns() - self._gc_t0) / 1e6
            g = self.gc_full
            g["count"] += 1
            g["total_ms"] = round(g["total_ms"] + ms, 3)
            g["max_ms"] = max(g["max_ms"], round(ms, 3))

    def run_forever(self) -> None:
        self.gc_full = {"count": 0, "total_ms": 0.0, "max_ms": 0.0}
        self._gc_t0 = 0
        gc.callbacks.append(self._gc_watch)
        self._thread = threading.Thread(target=self._loop, name="xdplb-k8s-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        batch_s = self.settings.batch_ms / 1000
        # The first sync made ~1M long-lived objects (slim objects, models):
        # frozen, out of the collector's sight, a full pass no longer walks
        # them between two events (measured: 300 ms stalls otherwise). Here,
        # after READY, not before it: the collection costs ~0.5 s.
        gc.collect()
        gc.freeze()
        self._frozen_at = time.monotonic()
        while not self.stop.is_set():
            try:
                ev = self.queue.get(timeout=0.5)
            except queue.Empty:
                # Idle: the young generations, off the event path. Not while a
                # list is being parsed (gcpause.paused): its million young objects would
                # all be walked.
                if not gcpause.held():
                    gc.collect(1)
                continue
            events = [ev]
            deadline = time.monotonic() + batch_s
            while True:                               # the burst: everything that arrives within batch_ms
                try:
                    left = deadline - time.monotonic()
                    events.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            # No collector pass between an event and its map update (a full
            # pass over the 20k-service state costs 100+ ms); idle time does it.
            guard = gcpause.paused()
            guard.__enter__()
            try:
                t0 = time.monotonic_ns()
                plan = self.syncer.plan(events)
                t1 = time.monotonic_ns()
                if plan.identities is not None or plan.upserts or plan.deletes:
                    self.apply_fn(plan)
                t2 = time.monotonic_ns()
                if t2 - min(plan.received_ns or [t0]) > 50_000_000:
                    # Over the 50 ms target: say where the time went (at most every 10 s).
                    self.slow_batches += 1
                    if t2 - self._slow_logged > 10_000_000_000:
                        self._slow_logged = t2
                        log.warning(_kv("slow batch (event -> map over 50 ms)", events=len(events),
                                        plan_ms=(t1 - t0) / 1e6, apply_ms=(t2 - t1) / 1e6,
                                        queued_ms=(t0 - min(plan.received_ns or [t0])) / 1e6,
                                        upserts=len(plan.upserts), slow_batches=self.slow_batches))
                if plan.identities is not None:
                    self.syncer.identities = plan.identities
                now = time.monotonic_ns()
                with self._mu:
                    self.applied.append((now, plan.rvs))
                    for k, rv in plan.rvs.items():
                        self.applied_rv[k] = max(self.applied_rv.get(k, 0), rv)
                    self.latency_ns.extend(now - t for t in plan.received_ns)
            except Exception as e:                    # noqa: BLE001 - log, keep following the cluster
                self.last_error = _short(e)
                log.exception("kubernetes: applying a batch failed")
            finally:
                guard.__exit__(None, None, None)
            if time.monotonic() - self._frozen_at > REFREEZE_S:
                # Updated services are new, unfrozen objects: after a while the
                # collector's full pass walks most of the state again (measured:
                # 300k objects and 290-400 ms stalls after 20-40k changes at 20k
                # services). Young garbage first, then the survivors join the
                # frozen state. (Only cyclic garbage that already reached the
                # oldest generation could be frozen with them; the state is acyclic.)
                gc.collect(1)
                gc.freeze()
                self._frozen_at = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        for r in self.reflectors:
            r.close()

    def status(self, since: int = 0, reset_latency: bool = False, brief: bool = False) -> dict:
        s = self.syncer
        if brief:                  # cheap enough to poll: what has reached the maps
            with self._mu:
                return {"synced": self.synced.is_set(), "applied_rv": dict(self.applied_rv),
                        "applied_total": len(self.applied)}
        with self._mu:
            lat = sorted(self.latency_ns)
            if reset_latency:
                self.latency_ns.clear()
            applied = list(itertools.islice(self.applied, since, None))
            applied_rv = dict(self.applied_rv)
            applied_total = len(self.applied)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3)) if lat else (lambda q: None)
        return {
            "synced": self.synced.is_set(),
            "services": len(s.state.services), "endpointslices": len(s.state.slices),
            "pods": len(s.state.pods), "networkpolicies": len(s.state.policies),
            "node": s.state.node.name if s.state.node else None,
            "xdplb_services": len(s.entries), "identities": len(s.identities),
            "sync": s.stats.__dict__, "last_error": self.last_error,
            "reflectors": {r.kind: {**r.stats.__dict__, "rv": r.rv, "objects": len(r.known)}
                           for r in self.reflectors},
            "receive_to_map_ms": {"p50": pct(0.5), "p99": pct(0.99), "n": len(lat)},
            "gc_full_collections": dict(getattr(self, "gc_full", {})),
            "slow_batches": self.slow_batches,
            "gc_frozen_objects": gc.get_freeze_count(),
            "applied_rv": applied_rv,
            "applied": applied,
            "applied_total": applied_total,
        }
