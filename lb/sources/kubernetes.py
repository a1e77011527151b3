"""Kubernetes mode: follow a cluster's Services and EndpointSlices (and, for
NetworkPolicy, Pods, Namespaces and NetworkPolicies) and keep the maps equal
to what kube-proxy would program.

- One `Reflector` thread per kind does list -> watch with the official
  client (`kubernetes` package; it does the HTTP, the auth and kubeconfig):
  paged lists (`limit`/`continue`), a watch from the list's
  resourceVersion with bookmarks, a relist and diff after 410 Gone, and a
  reconnect with exponential backoff when the connection drops. It keeps
  only key -> resourceVersion per object and emits slim objects
  (`k8s_model.parse`), never the raw JSON.
- `KubeState` holds the slim objects and indexes, and turns a batch of
  events into the set of Services to re-translate.
- `Syncer` collects a burst of events (`batch_ms`), translates only the
  dirty Services, validates only the resulting xdplb services (pydantic,
  per service; cross-checks against O(1) indexes) and hands them to the
  daemon, which applies each one atomically (`Reconciler.upsert_service`).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import _COLLECT, Backend, KubernetesSource, Service, _identity_ids
from . import k8s_model as m

log = logging.getLogger("xdplb.k8s")

try:                                   # 3-4x faster on 20k-object lists
    from orjson import loads as _loads
except ImportError:                    # pragma: no cover
    _loads = json.loads

WATCH_TIMEOUT_S = (300, 600)       # like client-go: the server ends a watch after 5..10 min
BACKOFF_S = (0.1, 10.0)            # reconnect backoff: first, max
REFREEZE_S = 5.0                   # move what survived into the frozen generation this often


_gc_mu = threading.Lock()
_gc_state = {"holders": 0, "restore": False}


@contextlib.contextmanager
def no_gc():
    """No cyclic-GC pass inside (process-wide; threads may nest it): parsing
    a 20k-object list or applying a batch makes many young objects, and a
    collection in the middle would walk them all for nothing (the data is
    acyclic: refcounting frees it). The first holder records whether the
    collector was on; the last one restores that."""
    with _gc_mu:
        if _gc_state["holders"] == 0:
            _gc_state["restore"] = gc.isenabled()
            gc.disable()
        _gc_state["holders"] += 1
    try:
        yield
    finally:
        with _gc_mu:
            _gc_state["holders"] -= 1
            if _gc_state["holders"] == 0 and _gc_state["restore"]:
                gc.enable()


def _kv(message: str, **fields: Any) -> str:
    from ..daemon import kv

    return kv(message, **fields)


# ---- the client -------------------------------------------------------------


def api_client(kubeconfig: Path | None):
    """An ApiClient from a kubeconfig, else in-cluster service-account files,
    else $KUBECONFIG / ~/.kube/config (what the library finds)."""
    from kubernetes import client, config

    if kubeconfig is not None:
        return config.new_client_from_config(config_file=str(kubeconfig))
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        c = client.Configuration()
        config.load_incluster_config(client_configuration=c)
        return client.ApiClient(c)
    return config.new_client_from_config()


def _list_fn(kind: str, c):
    from kubernetes import client

    return {
        "Service": lambda: client.CoreV1Api(c).list_service_for_all_namespaces,
        "EndpointSlice": lambda: client.DiscoveryV1Api(c).list_endpoint_slice_for_all_namespaces,
        "Node": lambda: client.CoreV1Api(c).list_node,
        "Pod": lambda: client.CoreV1Api(c).list_pod_for_all_namespaces,
        "Namespace": lambda: client.CoreV1Api(c).list_namespace,
        "NetworkPolicy": lambda: client.NetworkingV1Api(c).list_network_policy_for_all_namespaces,
    }[kind]()


def _raw_watch():
    """The library's Watch, without its model deserialization (we keep slim
    objects; deserializing every event into client models costs more than
    the whole translation). ERROR events still raise ApiException."""
    from kubernetes import watch

    class RawWatch(watch.Watch):
        def get_return_type(self, func):
            return None

    return RawWatch()


# ---- events -------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    kind: str
    type: str                    # ADDED | MODIFIED | DELETED | SYNCED
    key: tuple[str, str]
    obj: Any                     # slim object (None for DELETED / SYNCED)
    rv: int
    received_ns: int


def _rv(obj: dict) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


@dataclass
class ReflectorStats:
    lists: int = 0
    pages: int = 0
    relists_410: int = 0
    watches: int = 0
    reconnects: int = 0
    bookmarks: int = 0
    events: int = 0
    bad_objects: int = 0


class Reflector(threading.Thread):
    """list -> watch for one kind; emits Events into `out`."""

    def __init__(self, kind: str, client, out: queue.Queue, stop: threading.Event, *,
                 page_size: int = 500, field_selector: str | None = None,
                 watch_timeout_s: tuple[int, int] = WATCH_TIMEOUT_S) -> None:
        super().__init__(name=f"xdplb-k8s-{kind}", daemon=True)
        self.kind, self.client, self.out, self.stop = kind, client, out, stop
        self.page_size, self.field_selector = page_size, field_selector
        self.watch_timeout_s = watch_timeout_s
        self.known: dict[tuple[str, str], int] = {}      # key -> resourceVersion: all we keep
        self.rv = "0"
        self.stats = ReflectorStats()
        self.synced = threading.Event()
        self._watch = None

    def _kw(self) -> dict:
        return {"field_selector": self.field_selector} if self.field_selector else {}

    def run(self) -> None:
        need_list, delay = True, BACKOFF_S[0]
        while not self.stop.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                t0 = time.monotonic()
                self.watch_once()
                if time.monotonic() - t0 < 1.0:       # ended at once: do not spin
                    self.stop.wait(delay * (0.5 + random.random()))
                    delay = min(delay * 2, BACKOFF_S[1])
                else:
                    delay = BACKOFF_S[0]              # a watch that worked resets the backoff
            except Exception as e:                    # noqa: BLE001 - every failure: back off, retry
                status = getattr(e, "status", None)
                if status == 410:
                    self.stats.relists_410 += 1
                    log.info(_kv("watch expired (410 Gone), relisting", kind=self.kind, rv=self.rv))
                    need_list = True
                    continue
                self.stats.reconnects += 1
                log.warning(_kv("list/watch failed, retrying", kind=self.kind, error=_short(e),
                                backoff_s=round(delay, 2)))
                if status is not None and status >= 400:
                    need_list = True                  # e.g. 403/500: start over cleanly
                self.stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_S[1])

    def close(self) -> None:
        w = self._watch
        if w is not None:
            w.stop()

    # -- list ---------------------------------------------------------------------

    def relist(self) -> None:
        """A full paged list; what changed since `known` becomes events
        (a relist after 410 is a diff, not a reset)."""
        with no_gc():
            self._relist()

    def _relist(self) -> None:
        fn = _list_fn(self.kind, self.client)
        t0 = time.monotonic()
        fetch = 0.0
        while True:
            items, token, rv = [], None, "0"
            self.stats.lists += 1
            try:
                while True:
                    kw = {"limit": self.page_size, **self._kw()}
                    if token:
                        kw["_continue"] = token
                    tf = time.monotonic()
                    resp = fn(_preload_content=False, _request_timeout=(10, 120), **kw)
                    try:
                        data = resp.data
                        fetch += time.monotonic() - tf
                        body = _loads(data)
                    finally:
                        resp.release_conn()
                    self.stats.pages += 1
                    items += body.get("items") or []
                    md = body.get("metadata") or {}
                    rv = md.get("resourceVersion") or rv
                    token = md.get("continue")
                    if not token:
                        break
            except Exception as e:                     # noqa: BLE001
                if getattr(e, "status", None) == 410 and token:
                    log.info(_kv("list continue token expired (410), listing again", kind=self.kind))
                    continue
                raise
            break
        now = time.monotonic_ns()
        seen: set[tuple[str, str]] = set()
        events = []
        for obj in items:
            key = m.key_of(self.kind, obj)
            seen.add(key)
            orv = _rv(obj)
            if self.known.get(key) == orv:
                continue
            ev = self._event("MODIFIED" if key in self.known else "ADDED", obj, now)
            if ev is not None:
                events.append(ev)
        for key in [k for k in self.known if k not in seen]:
            del self.known[key]
            events.append(Event(self.kind, "DELETED", key, None, int(rv), now))
        self.rv = rv
        for ev in events:
            self.out.put(ev)
        self.out.put(Event(self.kind, "SYNCED", ("", ""), len(self.known), int(rv), now))
        self.synced.set()
        log.info(_kv("listed", kind=self.kind, objects=len(self.known), changes=len(events),
                     rv=rv, pages=self.stats.pages, seconds=time.monotonic() - t0, http_s=fetch))

    def _event(self, typ: str, obj: dict, now: int) -> Event | None:
        key = m.key_of(self.kind, obj)
        orv = _rv(obj)
        if typ == "DELETED":
            self.known.pop(key, None)
            return Event(self.kind, typ, key, None, orv, now)
        try:
            slim = m.parse(self.kind, obj)
        except m.BadObject as e:
            # Keep whatever good version we had: nothing half-applied.
            self.stats.bad_objects += 1
            log.error(_kv("ignoring malformed object, keeping its last good version", error=e))
            return None
        self.known[key] = orv
        return Event(self.kind, typ, key, slim, orv, now)

    # -- watch ----------------------------------------------------------------------

    def watch_once(self) -> None:
        from kubernetes.client.rest import ApiException

        fn = _list_fn(self.kind, self.client)
        w = self._watch = _raw_watch()
        timeout = random.randint(*self.watch_timeout_s)
        self.stats.watches += 1
        try:
            for ev in w.stream(fn, resource_version=self.rv, allow_watch_bookmarks=True,
                               timeout_seconds=timeout, _request_timeout=(10, timeout + 30),
                               **self._kw()):
                if self.stop.is_set():
                    break
                typ, obj = ev.get("type"), ev.get("raw_object") or ev.get("object")
                if not isinstance(obj, dict):
                    continue
                if typ == "BOOKMARK":
                    self.stats.bookmarks += 1
                    self.rv = str(_rv(obj) or self.rv)
                    continue
                if typ == "ERROR":                    # the library raises for these; be safe
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
                if typ not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                self.stats.events += 1
                self.rv = str(_rv(obj) or self.rv)
                e = self._event(typ, obj, time.monotonic_ns())
                if e is not None:
                    self.out.put(e)
        finally:
            self._watch = None


def _short(e: Exception) -> str:
    s = f"{type(e).__name__}: {e}"
    return s.splitlines()[0][:300]


# ---- state -------------------------------------------------------------------------


class KubeState:
    """Slim objects and the indexes that say what an event touches."""

    def __init__(self, node_name: str | None, proxy_name: str | None, network_policy: bool) -> None:
        self.node_name, self.proxy_name, self.network_policy = node_name, proxy_name, network_policy
        self.services: dict[tuple[str, str], m.KService] = {}
        self.slices: dict[tuple[str, str], m.KSlice] = {}
        self.slices_of: dict[tuple[str, str], set[tuple[str, str]]] = collections.defaultdict(set)
        self.node: m.KNode | None = None
        self.pods: dict[tuple[str, str], m.KPod] = {}
        self.namespaces: dict[str, m.KNamespace] = {}
        self.policies: dict[tuple[str, str], m.KPolicy] = {}
        self.ranges: collections.Counter[str] = collections.Counter()   # every loadBalancerSourceRange

    def apply(self, ev: Event, dirty: set, flags: set) -> None:
        """Record one event; add the Services it touches to `dirty`, and
        'policy' / 'node' to `flags` when every Service may be touched."""
        k, key, obj = ev.kind, ev.key, ev.obj
        if k == "Service":
            old = self.services.pop(key, None)
            if old is not None:
                self.ranges.subtract(old.lb_source_ranges)
            if obj is not None:
                self.services[key] = obj
                self.ranges.update(obj.lb_source_ranges)
            if (old.lb_source_ranges if old else ()) != (obj.lb_source_ranges if obj else ()):
                flags.add("policy")                  # the CIDR identities change
            dirty.add(key)
        elif k == "EndpointSlice":
            old = self.slices.pop(key, None)
            if old is not None and old.service_key:
                self.slices_of[old.service_key].discard(key)
                dirty.add(old.service_key)
            if obj is not None:
                self.slices[key] = obj
                if obj.service_key:
                    self.slices_of[obj.service_key].add(key)
                    dirty.add(obj.service_key)
        elif k == "Node":
            if key[1] == self.node_name:
                self.node = obj
                flags.add("node")
        elif k in ("Pod", "Namespace", "NetworkPolicy"):
            if not self.network_policy:
                return
            store = {"Pod": self.pods, "NetworkPolicy": self.policies}.get(k)
            if k == "Namespace":
                store, key = self.namespaces, key[1]
            old = store.pop(key, None)
            if obj is not None:
                store[key] = obj
            if k == "Pod" and old is not None and obj is not None and \
                    (old.labels, old.ips, old.host_network) == (obj.labels, obj.ips, obj.host_network):
                return                               # a status change that moves no identity
            flags.add("policy")

    def slices_for(self, key: tuple[str, str]) -> list[m.KSlice]:
        return [self.slices[s] for s in self.slices_of.get(key, ())]

    def policy_view(self) -> m.PolicyView:
        return m.PolicyView(self.pods, self.namespaces, self.policies)


# ---- the syncer ------------------------------------------------------------------------


@dataclass
class Plan:
    """One batch's outcome: apply `identities` (if not None) first, then
    delete and upsert these services, each atomically."""

    identities: dict[str, tuple[IPv4Network, ...]] | None = None
    upserts: list[Service] = field(default_factory=list)
    deletes: list[tuple] = field(default_factory=list)       # SvcKey
    rvs: dict[str, int] = field(default_factory=dict)        # kind -> highest resourceVersion in the batch
    received_ns: list[int] = field(default_factory=list)     # when each event of the batch arrived


@dataclass
class SyncStats:
    batches: int = 0
    events: int = 0
    translated: int = 0
    upserts: int = 0
    deletes: int = 0
    rejected: int = 0
    conflicts: int = 0
    skipped_sctp: int = 0
    skipped_ipv6: int = 0
    not_served: int = 0


def to_service(e: m.Entry) -> Service:
    """Validate one translated entry as a config.Service. Backends were
    built from checked values (IPv4, ports 1..65535) and are constructed
    without re-validation; the service itself is validated in full."""
    backends = tuple(Backend.model_construct(address=a, port=p, weight=1, state=s)
                     for a, p, s in e.backends)
    # _COLLECT skips config._service_problems(): duplicate backends, an
    # identity listed twice, allow/deny overlap and udp health checks cannot
    # occur in a translation (backends come from a dict, allow is a sorted
    # set, there is no deny and no health check), and the check stringifies
    # every backend address (2/3 of a 20k-service first sync).
    return Service.model_validate({"name": e.name, "vip": e.vip, "port": e.port,
                                   "protocol": e.protocol, "backends": backends,
                                   "allow": e.allow, "client_affinity_s": e.client_affinity_s},
                                  context={_COLLECT: True})


class Syncer:
    """Kubernetes state -> xdplb services, incrementally."""

    def __init__(self, settings: KubernetesSource) -> None:
        self.settings = settings
        self.state = KubeState(settings.node_name, settings.proxy_name, settings.network_policy)
        self.entries: dict[str, Service] = {}                   # xdplb name -> service
        self.by_key: dict[tuple, str] = {}                       # SvcKey -> xdplb name
        self.owned: dict[tuple[str, str], tuple[str, ...]] = {}  # k8s service -> xdplb names
        self.owner: dict[str, tuple[str, str]] = {}              # xdplb name -> k8s service
        self.identities: dict[str, tuple[IPv4Network, ...]] = {}
        self.view: m.PolicyView = self.state.policy_view()
        self.pod_ips: set[str] = set()
        self.stats = SyncStats()
        self.notes: dict[tuple[str, str], list[str]] = {}       # why parts of a service are not served
        # SvcKey -> k8s services that wanted it while another held it: retried when it frees up.
        self.waiting: dict[tuple, set[tuple[str, str]]] = {}
        self.identity_limit = 65536          # the identities map's size (the daemon sets it)

    # -- batches ---------------------------------------------------------------------

    def plan(self, events: Iterable[Event]) -> Plan:
        plan = Plan()
        dirty: set[tuple[str, str]] = set()
        flags: set[str] = set()
        for ev in events:
            if ev.type == "SYNCED":
                continue
            self.stats.events += 1
            plan.received_ns.append(ev.received_ns)
            plan.rvs[ev.kind] = max(plan.rvs.get(ev.kind, 0), ev.rv)
            self.state.apply(ev, dirty, flags)
        if "policy" in flags:
            new = self._identities()
            if new != self.identities:
                plan.identities = new
            # Every service whose answer may depend on the policy view.
            pods = self.pod_ips | set(self.view.pod_by_ip)
            for key, names in self.owned.items():
                if any(self.entries[n].allow is not None for n in names) or \
                        any(str(b.address) in pods for n in names for b in self.entries[n].backends):
                    dirty.add(key)
            dirty |= {k for k, s in self.state.services.items() if s.lb_source_ranges}
            self.pod_ips = set(self.view.pod_by_ip)
        if "node" in flags:
            dirty |= {k for k, s in self.state.services.items()
                      if s.type in ("NodePort", "LoadBalancer") or s.etp_local or s.itp_local}
        for key in sorted(dirty):
            self._retranslate(key, plan)
        freed = {k for sk in plan.deletes for k in self.waiting.pop(sk, ())} - dirty
        for key in sorted(freed):                     # an address a Service waited for is free now
            self._retranslate(key, plan)
        self.stats.batches += 1
        self.stats.upserts += len(plan.upserts)
        self.stats.deletes += len(plan.deletes)
        return plan

    def _identities(self) -> dict[str, tuple[IPv4Network, ...]]:
        view = self.state.policy_view()
        ids = view.identities(+self.state.ranges)
        problems = _identity_ids(ids, None, None)[1]
        cidrs = sum(len(v) for v in ids.values())
        if cidrs > self.identity_limit:
            problems.append(f"{cidrs} identity CIDRs (pod IPs, policy and source-range CIDRs) exceed "
                            f"the identities map's {self.identity_limit} entries")
        if problems:
            log.error(_kv("identities not updated; keeping the previous identities and policy",
                          problems="; ".join(problems)))
            return self.identities
        self.view = view
        return ids

    def _retranslate(self, key: tuple[str, str], plan: Plan) -> None:
        svc = self.state.services.get(key)
        new: dict[str, Service] = {}
        if svc is not None:
            why = m.serves(svc, self.settings.proxy_name)
            if why is not None:
                self.stats.not_served += 1
                log.debug(_kv("not served", service=f"{key[0]}/{key[1]}", reason=why))
            else:
                tr = m.translate(svc, self.state.slices_for(key), self.state.node,
                                 self.settings.node_name, self.view)
                self.stats.translated += 1
                self.stats.skipped_sctp += tr.sctp
                self.stats.skipped_ipv6 += tr.ipv6
                if tr.skipped and self.notes.get(key) != tr.skipped:
                    for reason in tr.skipped:
                        log.warning(_kv("not served", reason=reason))
                self.notes[key] = tr.skipped
                try:
                    new = {e.name: to_service(e) for e in tr.entries}
                except ValidationError as err:
                    # Nothing of this Service changes: the maps keep its last good state.
                    self.stats.rejected += 1
                    log.error(_kv("service rejected, keeping its last applied state",
                                  service=f"{key[0]}/{key[1]}", error=_short(err)))
                    return
        old = self.owned.get(key, ())
        known = set(plan.identities or self.identities) | {"world"}
        for name in list(new):
            s = new[name]
            holder = self.by_key.get(s.key)
            if holder is not None and holder != name and self.owner.get(holder) != key:
                self.stats.conflicts += 1
                self.waiting.setdefault(s.key, set()).add(key)
                log.error(_kv("address already served by another Service; not serving this one",
                              service=f"{key[0]}/{key[1]}", address=f"{s.vip}:{s.port}/{s.protocol}",
                              holder=f"{self.owner[holder][0]}/{self.owner[holder][1]}"))
                del new[name]
            elif s.allow is not None and not set(s.allow) <= known:
                self.stats.rejected += 1
                log.error(_kv("service refers to unknown identities; keeping its last state", service=name))
                if name in self.entries:
                    new[name] = self.entries[name]
                else:
                    del new[name]
        for name in old:
            if name not in new:
                s = self.entries.pop(name)
                self.by_key.pop(s.key, None)
                self.owner.pop(name, None)
                plan.deletes.append(s.key)
        for name, s in new.items():
            if self.entries.get(name) != s:
                plan.upserts.append(s)
            self.entries[name] = s
            self.by_key[s.key] = name
            self.owner[name] = key
        if new:
            self.owned[key] = tuple(new)
        else:
            self.owned.pop(key, None)

    def services(self) -> tuple[Service, ...]:
        return tuple(self.entries.values())


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
        with no_gc():                  # ~650k new long-lived objects: no pass over them midway
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
                # list is being parsed (no_gc): its million young objects would
                # all be walked.
                if _gc_state["holders"] == 0:
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
            guard = no_gc()
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
