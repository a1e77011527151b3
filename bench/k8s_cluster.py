"""A real Kubernetes control plane in a network namespace, for the tests
and the bench (here, so that both import it without a test dependency).

etcd, kube-apiserver and kube-controller-manager, built from Go modules by
`make k8s-bins` (k8s/go.mod), run as processes in the lab namespace `ns`:

- etcd on the namespace's loopback (client 2379, peer 2380);
- kube-apiserver on `address`:6443 with the self-signed serving certificate
  it makes itself (the kubeconfig and the test's client trust its CA),
  static-token authentication (one token in group system:masters) and RBAC;
- kube-controller-manager running the controllers a cluster without
  kubelets needs for Services: the EndpointSlice and EndpointSlice-mirroring
  controllers, and the ServiceAccount controller (Pods are admitted only once
  their namespace has its `default` ServiceAccount).

No kubelet: a test creates a Node and Pods bound to it (`spec.nodeName`) and
sets their readiness through the `status` subresource, as a kubelet would;
the EndpointSlice controller then writes the slices, as in a cluster.

`Api` is the client: plain HTTPS requests made from inside the namespace
(its sockets are created there), server-side apply for writes. With
`keepalive` each thread keeps its connection (the bench's bulk writes: no
TLS handshake per request).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from lb.lab import Lab

BIN_DIR = Path(os.environ.get("XDPLB_K8S_BIN", "/var/cache/xdplb/k8s/bin"))
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
WITH_KUBE_PROXY = BINARIES + ("kube-proxy",)       # the bench's (bench/kubeproxy_versus.py)
TOKEN = "xdplb-test-admin-token"
CONTROLLERS = "endpointslice-controller,endpointslice-mirroring-controller,serviceaccount-controller"
SERVICE_CIDR = "10.96.0.0/16"
# Dual-stack: IPv4 first (a Service without ipFamilies is IPv4), then IPv6
# (the apiserver takes at most 2^20 addresses of an IPv6 range: /108 or longer).
DUAL_STACK_SERVICE_CIDR = f"{SERVICE_CIDR},fd00:10:96::/112"
KEEPALIVE_IDLE_S = 30          # a kept connection idle longer is replaced before use

# Where each kind lives in the API: (group-version path, plural, namespaced).
RESOURCES = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Node": ("/api/v1", "nodes", False),
    "Pod": ("/api/v1", "pods", True),
    "Service": ("/api/v1", "services", True),
    "Endpoints": ("/api/v1", "endpoints", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
}


def missing_binaries(bin_dir: Path = BIN_DIR, binaries: tuple[str, ...] = BINARIES) -> list[str]:
    return [b for b in binaries if not (bin_dir / b).is_file()]


def kubernetes_version() -> str:
    """The k8s.io/kubernetes release that k8s/go.mod pins (what `make
    k8s-bins` builds)."""
    gomod = Path(__file__).resolve().parent.parent / "k8s" / "go.mod"
    for line in gomod.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"] and len(parts) > 1:
            return parts[1]
    return "unknown"


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    """A minimal client for the tests, made inside the namespace."""

    def __init__(self, lab: Lab, ns: str, host: str, port: int = 6443, keepalive: bool = False) -> None:
        self.lab, self.ns, self.host, self.port = lab, ns, host, port
        self.keepalive = keepalive
        self._tls: ssl.SSLContext | None = None
        self._local = threading.local()           # keepalive: this thread's connection

    def trust(self, ca_file: Path) -> None:
        """The apiserver's certificate bundle (its serving cert and the CA
        that signed it), written once it has started."""
        self._tls = ssl.create_default_context(cafile=str(ca_file))

    def raw(self, method: str, path: str, body: Any = None,
            content_type: str = "application/json", timeout: float = 30) -> tuple[int, str]:
        """(HTTP status, body text): a watch's body is its newline-delimited events."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.keepalive:
            resp, text = self._kept(method, path, data, headers, timeout)
            return resp.status, text
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", timeout: float = 30) -> dict:
        status, text = self.raw(method, path, body, content_type, timeout)
        if status >= 300:
            raise ApiError(status, text)
        return json.loads(text) if text else {}

    def _connect(self, timeout: float) -> http.client.HTTPSConnection:
        with self.lab.inside(self.ns):
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._tls)
            conn.connect()
        return conn

    def _kept(self, method: str, path: str, data: bytes | None, headers: dict, timeout: float):
        """On this thread's connection. One idle for a while is replaced
        first; one the server closed meanwhile (seen as an EOF or a reset
        before any response) is replaced once: no request is applied twice."""
        conn, used = getattr(self._local, "conn", None), getattr(self._local, "used", 0.0)
        if conn is not None and time.monotonic() - used > KEEPALIVE_IDLE_S:
            conn.close()
            conn = None
        for attempt in (0, 1):
            fresh = conn is None
            if fresh:
                conn = self._connect(timeout)
            self._local.conn = conn
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                text = resp.read().decode()
                self._local.used = time.monotonic()
                return resp, text
            except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                conn.close()
                conn = self._local.conn = None
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
        prefix, plural, namespaced = RESOURCES[kind]
        p = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
        return f"{p}/{name}" if name else p

    def apply(self, obj: dict) -> dict:
        """Server-side apply (create or update, as `kubectl apply --server-side`)."""
        meta = obj["metadata"]
        path = self.path(obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", f"{path}?fieldManager=xdplb-test&force=true", obj,
                            "application/apply-patch+yaml")

    def set_status(self, kind: str, namespace: str | None, name: str, status: dict) -> dict:
        path = self.path(kind, namespace, name) + "/status"
        return self.request("PATCH", path, {"status": status}, "application/merge-patch+json")

    def get(self, kind: str, namespace: str | None = None, name: str | None = None,
            query: str = "") -> dict:
        return self.request("GET", self.path(kind, namespace, name) + (f"?{query}" if query else ""))

    def delete(self, kind: str, namespace: str | None, name: str, grace_s: int | None = None) -> dict:
        body = None if grace_s is None else {"gracePeriodSeconds": grace_s}
        return self.request("DELETE", self.path(kind, namespace, name), body)

    def ready(self) -> bool:
        try:
            conn = self._connect(2)
            conn.request("GET", "/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False


class Cluster:
    """The control plane's processes in `ns`; `address` is an address of the
    namespace that the apiserver binds and advertises."""

    def __init__(self, lab: Lab, ns: str, address: str, workdir: Path,
                 bin_dir: Path = BIN_DIR, nice: int = 10, service_cidr: str = SERVICE_CIDR) -> None:
        self.lab, self.ns, self.address, self.dir, self.bin = lab, ns, address, workdir, bin_dir
        self.nice = nice
        self.service_cidr = service_cidr          # --service-cluster-ip-range: one or two families
        self.procs: dict[str, subprocess.Popen] = {}
        self.api = Api(lab, ns, address)
        self.kubeconfig = workdir / "kubeconfig"

    # ---- lifecycle ------------------------------------------------------

    def start(self) -> Cluster:
        missing = missing_binaries(self.bin)
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not in {self.bin}: run `make k8s-bins`")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_credentials()
        self._start("etcd", self._etcd_argv())
        self._wait(self._etcd_healthy, "etcd", 30)
        self.start_apiserver()
        self._write_kubeconfig()
        self._start("kube-controller-manager", self._kcm_argv())
        return self

    @property
    def ca_file(self) -> Path:
        return self.dir / "certs" / "apiserver.crt"     # made by the apiserver on its first start

    def start_apiserver(self) -> None:
        self._start("kube-apiserver", self._apiserver_argv())
        self._wait(self._serving, "kube-apiserver", 90)

    def _serving(self) -> bool:
        if not self.ca_file.exists():
            return False
        self.api.trust(self.ca_file)
        return self.api.ready()

    def stop_apiserver(self, sig: int = signal.SIGTERM) -> None:
        self._stop("kube-apiserver", sig)

    def close(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name, signal.SIGTERM)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- etcd -----------------------------------------------------------

    def etcd(self, path: str, body: dict) -> dict:
        """etcd's JSON gateway (v3), from inside the namespace."""
        with self.lab.inside(self.ns):
            conn = http.client.HTTPConnection("127.0.0.1", 2379, timeout=10)
            conn.connect()
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {resp.status} {text[:200]}")
        return json.loads(text)

    def revision(self) -> int:
        # A range over an empty key returns the store's header revision.
        return int(self.etcd("/v3/kv/range", {"key": "AA=="})["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd's history up to now (what `etcdctl compact` does):
        watches from an older resourceVersion then get 410 Gone, for real."""
        rev = self.revision()
        self.etcd("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def _etcd_healthy(self) -> bool:
        try:
            self.revision()
            return True
        except (OSError, RuntimeError):
            return False

    # ---- processes ------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> None:
        # Niced (by default): an apiserver starting takes both cores for
        # seconds, and in a real cluster it does not run on the LB node; here
        # it must not starve the lab's clients and servers, whose requests the
        # tests time.
        log = open(self.dir / f"{name}.log", "ab")
        self.procs[name] = self.lab.popen(self.ns, ["nice", "-n", str(self.nice), *argv],
                                          stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _stop(self, name: str, sig: int) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): {self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready in {timeout:.0f}s: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- configuration --------------------------------------------------

    def _write_credentials(self) -> None:
        key, pub = self.dir / "sa.key", self.dir / "sa.pub"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                           check=True, capture_output=True)
        (self.dir / "tokens.csv").write_text(f'{TOKEN},admin,admin,"system:masters"\n')

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": f"https://{self.address}:6443", "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }))

    def _etcd_argv(self) -> list[str]:
        return [str(self.bin / "etcd"), "--name", "test", "--data-dir", str(self.dir / "etcd"),
                "--listen-client-urls", "http://127.0.0.1:2379",
                "--advertise-client-urls", "http://127.0.0.1:2379",
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "test=http://127.0.0.1:2380",
                "--log-level", "warn", "--quota-backend-bytes", str(2 << 30)]

    def _apiserver_argv(self) -> list[str]:
        return [str(self.bin / "kube-apiserver"),
                "--etcd-servers", "http://127.0.0.1:2379",
                "--bind-address", self.address, "--advertise-address", self.address,
                "--secure-port", "6443", "--cert-dir", str(self.dir / "certs"),
                "--token-auth-file", str(self.dir / "tokens.csv"),
                "--authorization-mode", "RBAC",
                "--service-cluster-ip-range", self.service_cidr,
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(self.dir / "sa.pub"),
                "--service-account-signing-key-file", str(self.dir / "sa.key"),
                "--enable-priority-and-fairness=false",
                "--v", "1"]

    def _kcm_argv(self) -> list[str]:
        return [str(self.bin / "kube-controller-manager"),
                "--kubeconfig", str(self.kubeconfig),
                "--controllers", CONTROLLERS,
                "--leader-elect=false", "--use-service-account-credentials=false",
                "--bind-address", "127.0.0.1", "--secure-port", "10257",
                "--cert-dir", str(self.dir / "kcm-certs"),
                "--v", "1"]
