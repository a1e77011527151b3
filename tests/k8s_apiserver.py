"""A protocol-faithful kube-apiserver double for the list/watch protocol.

A real HTTP/1.1 server (threaded) serving the collection endpoints that
xdplb's watcher uses, as the apiserver does:

- GET a collection: a JSON `<Kind>List` with `metadata.resourceVersion`;
  `limit` pages it and `metadata.continue` names a consistent snapshot;
  a continue token whose snapshot was compacted away answers HTTP 410
  (a `Status` with reason `Expired`).
- `?watch=1&resourceVersion=N`: a chunked stream of newline-delimited JSON
  events (ADDED, MODIFIED, DELETED) after N; `allowWatchBookmarks=true`
  adds BOOKMARK events (only `metadata.resourceVersion` is meaningful);
  `timeoutSeconds` ends the stream cleanly; a resourceVersion older than the
  compacted history gets an `ERROR` event with a 410 `Status`, in a 200
  stream, as the apiserver sends it.
- `fieldSelector=metadata.name=X` (what a node-local watcher asks for).

Resource versions are one global counter (etcd's revision). Test controls:
`apply()` / `delete()` (kubectl apply / delete, with clusterIP and nodePort
allocation for Services), `compact()`, `drop_watches()` (close every open
watch connection without ending the chunked stream), `emitted_ns` (when
each resourceVersion was written, CLOCK_MONOTONIC).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import ipaddress
import itertools
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

# kind -> (API prefix, plural, namespaced, apiVersion)
RESOURCES = {
    "Service": ("/api/v1", "services", True, "v1"),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True, "discovery.k8s.io/v1"),
    "Node": ("/api/v1", "nodes", False, "v1"),
    "Pod": ("/api/v1", "pods", True, "v1"),
    "Namespace": ("/api/v1", "namespaces", False, "v1"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True, "networking.k8s.io/v1"),
}
_BY_PATH = {f"{p}/{plural}": kind for kind, (p, plural, _, _) in RESOURCES.items()}


def _typed(kind: str, item: bytes) -> dict:
    """A stored list item as a whole object (watch events and GETs carry
    kind and apiVersion)."""
    return {"kind": kind, "apiVersion": RESOURCES[kind][3], **json.loads(item)}


def status_410(message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Expired", "code": 410}


class _Store:
    """One kind: objects (pre-encoded) and the event history."""

    def __init__(self) -> None:
        # Encoded as a list item: without kind and apiVersion, which the
        # apiserver leaves out of list items (tests/test_k8s_real.py checks).
        self.objects: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.log_rv: list[int] = []
        self.log: list[bytes] = []          # encoded watch events, in rv order
        self.compacted = 0                  # watches from rv < this get 410


class FakeApiServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, bookmark_interval: float = 1.0,
                 netns: str | None = None, service_cidr: str = "10.96.0.0/16") -> None:
        self.rv = 0
        self.cond = threading.Condition()          # guards everything below
        # One condition per kind on the same lock: a write wakes only the
        # watches of its kind (not all six per event).
        self.kind_cond = {k: threading.Condition(self.cond) for k in RESOURCES}
        self.stores = {k: _Store() for k in RESOURCES}
        self.snapshots: dict[str, tuple[int, int, list[bytes]]] = {}   # id -> (rv, kind-compact, items)
        self.bookmark_interval = bookmark_interval
        self.emitted_ns: dict[int, int] = {}
        self.stats = {"lists": 0, "pages": 0, "watches": 0, "watch_410": 0, "list_410": 0,
                      "dropped": 0, "bookmarks": 0}
        self._watch_socks: set[socket.socket] = set()
        # Cleared: new watch requests wait (to make a watcher fall behind on purpose).
        self.watch_gate = threading.Event()
        self.watch_gate.set()
        self.fail_watches = 0          # answer this many watch requests with HTTP 500
        self.expire_continue = 0       # answer this many continue requests with 410
        self._closing = False
        self._cip = ipaddress.IPv4Network(service_cidr).hosts()
        next(self._cip)
        self._node_ports = itertools.count(30000)
        self.requests: list[str] = []
        server = self
        handler = type("Handler", (_Handler,), {"api": server})
        if netns:
            from lb.lab import inside_ns

            with inside_ns(netns):
                self.httpd = ThreadingHTTPServer((host, port), handler)
        else:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-apiserver",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        with self.cond:
            for c in self.kind_cond.values():
                c.notify_all()
        self.drop_watches()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "xdplb", "user": {"token": "test-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "xdplb"}}],
        }))
        return path

    # -- writes (kubectl apply / delete) ----------------------------------------

    def apply(self, obj: dict) -> int:
        """Create or replace one object; returns its new resourceVersion."""
        return self.apply_many([obj])[-1]

    def apply_many(self, objs: list[dict]) -> list[int]:
        out = []
        with self.cond:
            for obj in objs:
                out.append(self._put(copy.deepcopy(obj)))
            for k in {o["kind"] for o in objs}:
                self.kind_cond[k].notify_all()
        return out

    def apply_manifests(self, path: Path) -> list[int]:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        items = []
        for d in docs:
            items += d["items"] if d.get("kind") == "List" else [d]
        return self.apply_many(items)

    def delete(self, kind: str, namespace: str, name: str) -> int | None:
        with self.cond:
            st = self.stores[kind]
            cur = st.objects.pop((namespace, name), None)
            if cur is None:
                return None
            self.rv += 1
            obj = _typed(kind, cur[1])
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._log(kind, "DELETED", obj)
            self.kind_cond[kind].notify_all()
            return self.rv

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        cur = self.stores[kind].objects.get((namespace, name))
        return _typed(kind, cur[1]) if cur else None

    def _put(self, obj: dict) -> int:
        kind = obj["kind"]
        prefix, _, namespaced, api_version = RESOURCES[kind]
        md = obj.setdefault("metadata", {})
        if namespaced:
            md.setdefault("namespace", "default")
        else:
            md.pop("namespace", None)
        key = (md.get("namespace", ""), md["name"])
        st = self.stores[kind]
        old = st.objects.get(key)
        if kind == "Service":
            self._allocate(obj, _typed(kind, old[1]) if old else None)
        self.rv += 1
        md["resourceVersion"] = str(self.rv)
        md.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{key}")))
        obj["apiVersion"] = api_version
        item = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
        st.objects[key] = (self.rv, json.dumps(item, separators=(",", ":")).encode())
        self._log(kind, "MODIFIED" if old else "ADDED", obj)
        return self.rv

    def _allocate(self, obj: dict, old: dict | None) -> None:
        """What the apiserver fills in: clusterIP(s) and nodePorts."""
        spec = obj.setdefault("spec", {})
        ospec = (old or {}).get("spec", {})
        if spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
            spec["clusterIP"] = ospec.get("clusterIP") or str(next(self._cip))
        if spec.get("clusterIP") and not spec.get("clusterIPs"):
            spec["clusterIPs"] = [spec["clusterIP"]]
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            oldp = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort") for p in ospec.get("ports", [])}
            for p in spec.get("ports", []):
                p.setdefault("protocol", "TCP")
                if not p.get("nodePort"):
                    p["nodePort"] = oldp.get((p.get("port"), p["protocol"])) or next(self._node_ports)

    def _log(self, kind: str, typ: str, obj: dict) -> None:
        st = self.stores[kind]
        st.log_rv.append(self.rv)
        st.log.append(json.dumps({"type": typ, "object": obj}, separators=(",", ":")).encode() + b"\n")
        self.emitted_ns[self.rv] = time.monotonic_ns()

    # -- test controls --------------------------------------------------------

    def compact(self) -> int:
        """Forget the history and every list snapshot: a watch or continue
        from before now gets 410 Gone."""
        with self.cond:
            for st in self.stores.values():
                st.compacted = self.rv + 1
                st.log_rv.clear()
                st.log.clear()
            self.snapshots.clear()
            return self.rv

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream (no final chunk)."""
        with self.cond:
            socks = list(self._watch_socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.stats["dropped"] += len(socks)
        return len(socks)

    def open_watches(self) -> int:
        with self.cond:
            return len(self._watch_socks)


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:      # quiet
        pass

    def _json(self, code: int, body: bytes | dict) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        kind = _BY_PATH.get(u.path.rstrip("/"))
        self.api.requests.append(self.path)
        if kind is None:
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": f"{u.path} not found"})
            return
        name = None
        fs = q.get("fieldSelector", "")
        if fs.startswith("metadata.name="):
            name = fs.split("=", 1)[1]
        if q.get("watch") in ("1", "true"):
            with self.api.cond:
                fail = self.api.fail_watches > 0
                self.api.fail_watches -= fail
            if fail:
                self._json(500, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "InternalError", "code": 500, "message": "injected failure"})
                return
            self._watch(kind, q, name)
        else:
            self._list(kind, q, name)

    def _list(self, kind: str, q: dict, name: str | None) -> None:
        t0 = time.perf_counter()
        try:
            self._list_(kind, q, name)
        finally:
            self.api.stats["list_s"] = self.api.stats.get("list_s", 0.0) + time.perf_counter() - t0

    def _list_(self, kind: str, q: dict, name: str | None) -> None:
        api = self.api
        limit = int(q.get("limit") or 0)
        token = q.get("continue")
        with api.cond:
            if token:
                try:
                    snap_id, offset = json.loads(base64.urlsafe_b64decode(token))
                except Exception:
                    self._json(400, {"kind": "Status", "code": 400, "reason": "BadRequest",
                                     "message": "invalid continue token"})
                    return
                snap = api.snapshots.get(snap_id)
                if api.expire_continue > 0:
                    api.expire_continue -= 1
                    api.snapshots.pop(snap_id, None)
                    snap = None
                if snap is None:
                    api.stats["list_410"] += 1
                    self._json(410, status_410("The provided continue parameter is too old to display "
                                               "a consistent list result. You can start a new list "
                                               "without the continue parameter."))
                    return
                rv, items = snap
            else:
                api.stats["lists"] += 1
                rv = api.rv
                st = api.stores[kind]
                items = [data for key, (_, data) in sorted(st.objects.items())
                         if name is None or key[1] == name]
                snap_id, offset = uuid.uuid4().hex, 0
                if limit and len(items) > limit:
                    api.snapshots[snap_id] = (rv, items)
        api.stats["pages"] += 1
        page = items[offset:offset + limit] if limit else items[offset:]
        md = {"resourceVersion": str(rv)}
        nxt = offset + len(page)
        if limit and nxt < len(items):
            md["continue"] = base64.urlsafe_b64encode(json.dumps([snap_id, nxt]).encode()).decode()
            md["remainingItemCount"] = len(items) - nxt
        else:
            api.snapshots.pop(snap_id, None)
        prefix, _, _, api_version = RESOURCES[kind]
        body = (b'{"kind":"%sList","apiVersion":"%s","metadata":%s,"items":[' %
                (kind.encode(), api_version.encode(), json.dumps(md).encode())
                + b",".join(page) + b"]}")
        self._json(200, body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _watch(self, kind: str, q: dict, name: str | None) -> None:
        api = self.api
        api.watch_gate.wait()
        st = api.stores[kind]
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q.get("timeoutSeconds") or 1800)
        rv_s = q.get("resourceVersion") or ""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")          # a watch connection is never reused
        self.end_headers()
        sock = self.connection
        prefix, _, _, api_version = RESOURCES[kind]
        with api.cond:
            api.stats["watches"] += 1
            api._watch_socks.add(sock)
            if rv_s in ("", "0"):
                # No resourceVersion: synthetic ADDED for what exists now.
                start = api.rv
                pending = [json.dumps({"type": "ADDED", "object": _typed(kind, d)}).encode() + b"\n"
                           for _, d in st.objects.values()]
            else:
                start = int(rv_s)
                pending = []
            if start + 1 < st.compacted:
                api.stats["watch_410"] += 1
                pending = [json.dumps({"type": "ERROR", "object": status_410(
                    f"too old resource version: {start} ({st.compacted - 1})")}).encode() + b"\n"]
                pos, expired = None, True
            else:
                pos, expired = bisect.bisect_right(st.log_rv, start), False
        deadline = time.monotonic() + timeout
        last_bm = time.monotonic()
        try:
            while True:
                for ev in pending:
                    if name is None or _name_of(ev) in (None, name):
                        self._chunk(ev)
                self.wfile.flush()
                if expired or api._closing:
                    break
                with api.cond:
                    while pos >= len(st.log) and not api._closing:
                        now = time.monotonic()
                        wake = min(deadline, last_bm + api.bookmark_interval) if bookmarks else deadline
                        if now >= wake:
                            break
                        api.kind_cond[kind].wait(wake - now)
                    pos = min(pos, len(st.log))       # compact() cleared the history
                    pending = st.log[pos:]
                    pos = len(st.log)
                    cur_rv = api.rv
                now = time.monotonic()
                if now >= deadline:
                    for ev in pending:
                        if name is None or _name_of(ev) in (None, name):
                            self._chunk(ev)
                    break
                if bookmarks and not pending and now - last_bm >= api.bookmark_interval:
                    api.stats["bookmarks"] += 1
                    pending = [json.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(cur_rv)}}}).encode() + b"\n"]
                    last_bm = now
            self.wfile.write(b"0\r\n\r\n")               # a clean end of the stream
            self.wfile.flush()
        except OSError:
            pass                                          # dropped: no final chunk
        finally:
            with api.cond:
                api._watch_socks.discard(sock)
            self.close_connection = True


def _name_of(ev: bytes) -> str | None:
    """The object's name, or None for BOOKMARK/ERROR (never filtered)."""
    e = json.loads(ev)
    if e.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
        return None
    return e["object"].get("metadata", {}).get("name", "")


def load_manifests(path: Path) -> list[dict]:
    out = []
    for d in yaml.safe_load_all(Path(path).read_text()):
        if d:
            out += d["items"] if d.get("kind") == "List" else [d]
    return out
