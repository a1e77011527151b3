"""list -> watch for one Kubernetes kind, with the official client.

A `Reflector` thread lists a kind (paged: `limit`/`continue`), then watches
from the list's resourceVersion with bookmarks; after 410 Gone it relists
and diffs against what it had (key -> resourceVersion, all it keeps), and
after a dropped connection it resumes the watch from the last
resourceVersion after an exponential backoff. It emits slim objects
(`k8s_model.parse`), never the raw JSON.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import gcpause
from . import k8s_model as m

log = logging.getLogger("xdplb.k8s")

try:                                   # 3-4x faster on 20k-object lists
    from orjson import loads as _loads
except ImportError:                    # pragma: no cover
    _loads = json.loads

WATCH_TIMEOUT_S = (300, 600)       # like client-go: the server ends a watch after 5..10 min
BACKOFF_S = (0.1, 10.0)            # reconnect backoff: first, max


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
        with gcpause.paused():
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


