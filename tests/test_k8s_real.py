"""Kubernetes mode against the real control plane: etcd, kube-apiserver and
kube-controller-manager (built by `make k8s-bins`) in the LB's namespace, a
Node and real Pod objects whose readiness the test sets through the status
subresource, EndpointSlices written by the real EndpointSlice controller,
and the real daemon serving them at XDP to real clients (curl) and servers.

The double (tests/k8s_apiserver.py) stays for the fast tests; these check
that what the real server and controller send is what xdplb expects."""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bench.k8s_cluster import ApiError, Cluster
from k8s_apiserver import FakeApiServer
from lb.dataplane import Dataplane
from lb.demo import DaemonProcess, curl_many
from lb.lab import start_backends
from lbtest import pin_dir

pytestmark = pytest.mark.root

NS = "shop"
NODE_A, NODE_B = "node-a", "node-b"
API_ADDRESS = "10.255.0.1"          # the LB namespace's loopback address (lb.lab)
# Each test's Services target a port of their own on the backends (servers
# started by the fixture): in gateway mode the backend sees client:port ->
# backend:port whatever the VIP, and a client reuses a source port for
# another VIP with another timestamp offset (per destination), so a SYN can
# meet the backend's TIME_WAIT of an older connection to another VIP and be
# refused by PAWS (README, "Gateway mode and shared backends"). Services of
# one test never share a VIP's worth of backends with another's.
PORTS = {"drain": 8082, "sticky": 8083, "local": 8084, "np": 8085, "steady": 8086, "late": 8087}


def node(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}, \
        {"addresses": [{"type": "InternalIP", "address": ip}],
         "conditions": [{"type": "Ready", "status": "True"}]}


def pod(name: str, labels: dict, node_name: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node_name, "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "server", "image": "registry.invalid/server:1",
                                     "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]}}


def pod_status(ip: str, ready: bool) -> dict:
    return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}


def service(name: str, ip: str | None, selector: dict | None, target, **spec) -> dict:
    s = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
         "spec": {"ports": [{"name": "p", "port": 80, "targetPort": target, "protocol": "TCP"}], **spec}}
    if ip:
        s["spec"]["clusterIP"] = ip
    if selector is not None:
        s["spec"]["selector"] = selector
    return s


def xdplb_name(name: str, ip: str) -> str:
    return f"{NS}.{name}.p.tcp.cluster.{ip}"


def backends_of(d: DaemonProcess, name: str) -> dict[str, str] | None:
    for s in d.call("stats")["services"]:
        if s["name"] == name:
            return {b["address"]: b["state"] for b in s["backends"]}
    return None


def wait_backends(d: DaemonProcess, name: str, want: dict[str, str] | None, timeout: float = 30) -> None:
    """Wait until the daemon serves `name` with exactly these backends
    (None: not served at all)."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = backends_of(d, name)
        if got == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}: want {want}, have {got}")


@pytest.fixture(scope="module")
def k8s(lab, bpf_object, tmp_path_factory):
    """The real control plane and a daemon in Kubernetes mode, in the LB
    namespace; three backend Pods (be1, be2 on node-a, be3 on node-b) whose
    addresses are the lab's backend servers."""
    lab_, topo = lab
    tmp = tmp_path_factory.mktemp("k8s-real")
    cluster = Cluster(lab_, topo.lb_ns, API_ADDRESS, tmp / "cluster")
    d = None
    bpffs = pin_dir()
    try:
        cluster.start()
        api = cluster.api
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for name, ip in ((NODE_A, "10.96.200.1"), (NODE_B, "10.96.200.2")):
            obj, status = node(name, ip)
            api.apply(obj)
            api.set_status("Node", None, name, status)
        _wait_default_service_account(api)
        for port in PORTS.values():
            start_backends(lab_, dataclasses.replace(topo, backend_port=port, udp_port=None))
        for i, b in enumerate(topo.backends):
            make_backend_pod(api, f"be{i + 1}", b.ip, NODE_A if i < 2 else NODE_B, topo.backend_port)
        cfg = {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": bpffs,
               "api_socket": f"/run/xdplb/k8s-real-{os.getpid()}.sock", "metrics_address": False,
               "kubernetes": {"kubeconfig": str(cluster.kubeconfig), "node_name": NODE_A}}
        d = DaemonProcess(cfg, tmp, topo.lb_ns).start()
        yield lab_, topo, cluster, d
    finally:
        if d is not None:
            d.kill(signal.SIGKILL)
        Dataplane.detach(Path(bpffs), purge=True)
        cluster.close()


def make_backend_pod(api, name: str, ip: str, node_name: str, port: int, ready: bool = True) -> None:
    api.apply(pod(name, {"role": "backend", "pod": name}, node_name, port))
    api.set_status("Pod", NS, name, pod_status(ip, ready))


def _wait_default_service_account(api, timeout: float = 30) -> None:
    """The ServiceAccount controller makes `default` in a new namespace; the
    apiserver admits no Pod there before it exists."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.request("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/default")
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_selector_service_named_port_balances_over_controller_slices(k8s):
    lab_, topo, cluster, d = k8s
    cluster.api.apply(service("web", "10.96.0.10", {"role": "backend"}, "http"))
    wait_backends(d, xdplb_name("web", "10.96.0.10"), {b.ip: "active" for b in topo.backends})
    slices = cluster.api.get("EndpointSlice", NS, query="labelSelector=kubernetes.io/service-name%3Dweb")
    managed = {s["metadata"]["labels"].get("endpointslice.kubernetes.io/managed-by") for s in slices["items"]}
    assert managed == {"endpointslice-controller.k8s.io"}          # the real controller wrote them
    counts = collections.Counter(curl_many(lab_, topo, "http://10.96.0.10/", 90, topo.client_ip))
    assert sum(counts.values()) == 90 and set(counts) == {b.name for b in topo.backends}, counts


def test_not_ready_and_terminating_pods_drain(k8s):
    lab_, topo, cluster, d = k8s
    api, b = cluster.api, topo.backends
    name = xdplb_name("drain", "10.96.0.11")
    api.apply(service("drain", "10.96.0.11", {"role": "backend"}, PORTS["drain"]))
    wait_backends(d, name, {x.ip: "active" for x in b})
    # Not ready: the controller keeps it in the slice with ready=false.
    api.set_status("Pod", NS, "be1", pod_status(b[0].ip, ready=False))
    wait_backends(d, name, {b[0].ip: "draining", b[1].ip: "active", b[2].ip: "active"})
    assert b[0].name not in curl_many(lab_, topo, "http://10.96.0.11/", 30, topo.client_ip)
    api.set_status("Pod", NS, "be1", pod_status(b[0].ip, ready=True))
    wait_backends(d, name, {x.ip: "active" for x in b})
    # Deleted with a grace period: terminating (and, no kubelet here, it stays so).
    api.delete("Pod", NS, "be1", grace_s=30)
    wait_backends(d, name, {b[0].ip: "draining", b[1].ip: "active", b[2].ip: "active"})
    counts = collections.Counter(curl_many(lab_, topo, "http://10.96.0.11/", 30, topo.client_ip))
    assert sum(counts.values()) == 30 and b[0].name not in counts, counts
    # Gone for good: out of the slice, out of the maps.
    api.delete("Pod", NS, "be1", grace_s=0)
    wait_backends(d, name, {b[1].ip: "active", b[2].ip: "active"})
    _recreate(api, "be1", b[0].ip, NODE_A, topo.backend_port)
    wait_backends(d, name, {x.ip: "active" for x in b})


def _recreate(api, name: str, ip: str, node_name: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:                          # the old object may still be going away
        try:
            make_backend_pod(api, name, ip, node_name, port)
            return
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_session_affinity_and_internal_traffic_policy(k8s):
    lab_, topo, cluster, d = k8s
    api, b = cluster.api, topo.backends
    api.apply(service("sticky", "10.96.0.16", {"role": "backend"}, PORTS["sticky"], sessionAffinity="ClientIP",
                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}))
    api.apply(service("local", "10.96.0.17", {"role": "backend"}, PORTS["local"], internalTrafficPolicy="Local"))
    wait_backends(d, xdplb_name("sticky", "10.96.0.16"), {x.ip: "active" for x in b})
    answers = curl_many(lab_, topo, "http://10.96.0.16/", 20, topo.client_ip)
    assert len(answers) == 20 and len(set(answers)) == 1, answers
    # Only the pods of this node (node-a: be1, be2).
    wait_backends(d, xdplb_name("local", "10.96.0.17"), {b[0].ip: "active", b[1].ip: "active"})
    assert set(curl_many(lab_, topo, "http://10.96.0.17/", 30, topo.client_ip)) <= {b[0].name, b[1].name}


def test_headless_externalname_and_other_proxy_are_not_served(k8s):
    _, topo, cluster, d = k8s
    api = cluster.api
    api.apply(service("headless", "None", {"role": "backend"}, "http"))
    api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": NS},
               "spec": {"type": "ExternalName", "externalName": "example.invalid"}})
    other = service("other", "10.96.0.19", {"role": "backend"}, "http")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "someone-else"}
    api.apply(other)
    api.apply(service("control", "10.96.0.20", {"role": "backend"}, "http"))
    wait_backends(d, xdplb_name("control", "10.96.0.20"), {x.ip: "active" for x in topo.backends})
    names = {s["name"] for s in d.call("stats")["services"]}
    assert not {n for n in names if n.startswith((f"{NS}.headless.", f"{NS}.ext.", f"{NS}.other."))}, names


def test_networkpolicy_from_real_pods_enforced_at_xdp(k8s):
    lab_, topo, cluster, d = k8s
    api = cluster.api
    for name, ip, app in (("client", topo.client_ip, "client"), ("intruder", topo.denied_client_ip, "intruder")):
        api.apply(pod(name, {"app": app}, NODE_A, 1))
        api.set_status("Pod", NS, name, pod_status(ip, True))
    api.apply(service("np", "10.96.0.14", {"role": "backend"}, PORTS["np"]))
    wait_backends(d, xdplb_name("np", "10.96.0.14"), {x.ip: "active" for x in topo.backends})
    assert len(curl_many(lab_, topo, "http://10.96.0.14/", 2, topo.denied_client_ip)) == 2
    api.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "backend-from-client", "namespace": NS},
               "spec": {"podSelector": {"matchLabels": {"role": "backend"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}})
    deadline = time.monotonic() + 30
    while curl_many(lab_, topo, "http://10.96.0.14/", 1, topo.denied_client_ip, timeout=1.0):
        assert time.monotonic() < deadline, "the intruder is still answered"
    assert len(curl_many(lab_, topo, "http://10.96.0.14/", 5, topo.client_ip)) == 5
    policy = [x for x in d.call("stats")["drop_detail"]
              if x["reason"] == "policy" and x["service"] == xdplb_name("np", "10.96.0.14")]
    assert policy and policy[0]["identity"].startswith(f"pod.{NS}.")
    api.delete("NetworkPolicy", NS, "backend-from-client")


def test_relist_after_compaction_and_apiserver_restart_under_traffic(k8s):
    """The daemon is stopped (SIGSTOP) while the apiserver restarts, Services
    and Pods change, etcd's history is compacted and the apiserver restarts
    again: no event reached the daemon, its watches come back with a
    resourceVersion that no longer exists (410 Gone, for real), it relists,
    and the maps converge. Traffic through a VIP meanwhile is answered
    throughout: the data plane never depended on the apiserver."""
    lab_, topo, cluster, d = k8s
    api, b = cluster.api, topo.backends
    api.apply(service("steady", "10.96.0.21", {"role": "backend"}, PORTS["steady"]))
    wait_backends(d, xdplb_name("steady", "10.96.0.21"), {x.ip: "active" for x in b})
    relists = _relists(d)

    asked, missed, marks = [], [], {}
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            asked.append(t0)
            # 5 s, not 2: the apiserver's restarts load both cores meanwhile.
            if not curl_many(lab_, topo, "http://10.96.0.21/", 1, topo.client_ip, timeout=5.0):
                missed.append(t0)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        d.proc.send_signal(signal.SIGSTOP)
        marks["stopped"] = time.monotonic()
        try:
            # The first restart closes the daemon's watches before any
            # change is sent on them; the second drops the apiserver's watch
            # cache, which would otherwise still hold the compacted events.
            cluster.stop_apiserver()
            cluster.start_apiserver()
            marks["restarted"] = time.monotonic()
            api.apply(service("late", "10.96.0.22", {"pod": "be3"}, PORTS["late"]))
            api.set_status("Pod", NS, "be2", pod_status(b[1].ip, ready=False))
            time.sleep(2)                       # the controller writes the slices
            cluster.compact()
            cluster.stop_apiserver()
            cluster.start_apiserver()
        finally:
            d.proc.send_signal(signal.SIGCONT)
            marks["continued"] = time.monotonic()
        wait_backends(d, xdplb_name("late", "10.96.0.22"), {b[2].ip: "active"}, timeout=60)
        wait_backends(d, xdplb_name("steady", "10.96.0.21"),
                      {b[0].ip: "active", b[1].ip: "draining", b[2].ip: "active"}, timeout=30)
    finally:
        stop.set()
        t.join(10)
        api.set_status("Pod", NS, "be2", pod_status(b[1].ip, ready=True))
    assert _relists(d) > relists, d.call("kubernetes")["reflectors"]
    start = asked[0]
    assert len(asked) >= 5 and not missed, (len(missed), len(asked), [round(t - start, 2) for t in missed],
                                           {k: round(v - start, 2) for k, v in marks.items()},
                                           [(x["reason"], x["service"], x["packets"]) for x in d.call("stats")["drop_detail"]])


def _relists(d: DaemonProcess) -> int:
    return sum(r["relists_410"] for r in d.call("kubernetes")["reflectors"].values())


# ---- the double against the real server ----------------------------------

# Values that are protocol, not data: the double must give the same ones.
PROTOCOL_KEYS = {"kind", "apiVersion", "type", "code", "reason", "status"}


def shape_problems(double, real, path: str = "") -> list[str]:
    """What the double sends that the real server does not send alike: every
    key of the double's document must be in the real one with the same JSON
    type, and protocol values must be equal. (The real server sends more:
    managedFields, uids, timestamps; xdplb must not need them.)"""
    if isinstance(double, dict):
        if not isinstance(real, dict):
            return [f"{path or '/'}: object vs {type(real).__name__}"]
        out = []
        for k, v in double.items():
            if k == "items" and isinstance(real.get(k), list):
                out += _item_problems(v, real[k], f"{path}/items")
            elif k not in real:
                out.append(f"{path}/{k}: only in the double")
            elif k in PROTOCOL_KEYS and not isinstance(v, (dict, list)) and v != real[k]:
                out.append(f"{path}/{k}: {v!r} vs {real[k]!r}")
            else:
                out += shape_problems(v, real[k], f"{path}/{k}")
        return out
    if isinstance(double, list):
        if not isinstance(real, list):
            return [f"{path}: list vs {type(real).__name__}"]
        if double and real:
            return shape_problems(double[0], real[0], f"{path}[0]")
        return [] if bool(double) == bool(real) else [f"{path}: {len(double)} vs {len(real)} items"]
    if type(double) is not type(real) and not (isinstance(double, (int, float)) and isinstance(real, (int, float))):
        return [f"{path}: {type(double).__name__} vs {type(real).__name__}"]
    return []


def _item_problems(double: list, real: list, path: str) -> list[str]:
    """List items paired by namespace and name (the real cluster holds more
    objects than the double)."""
    def key(o: dict) -> tuple:
        md = o.get("metadata", {})
        return md.get("namespace"), md.get("name")
    by_key = {key(o): o for o in real}
    out = []
    for o in double:
        if key(o) not in by_key:
            out.append(f"{path}: {key(o)} only in the double")
        else:
            out += shape_problems(o, by_key[key(o)], f"{path}[{key(o)[1]}]")
    return out


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_double_answers_as_the_real_apiserver(k8s, tmp_path):
    """The same objects in the double and in the real apiserver, the same
    requests xdplb's watcher makes, the answers compared shape for shape:
    lists and pages, a continue token, watch events with bookmarks, a watch
    from a compacted resourceVersion (410 in a 200 stream) and an expired
    continue token (HTTP 410). The double cannot drift from the real server
    unseen."""
    _, _, cluster, _ = k8s
    real = cluster.api
    double = FakeApiServer(bookmark_interval=0.5).start()
    try:
        def dget(path: str) -> tuple[int, str]:
            conn = http.client.HTTPConnection(double.host, double.port, timeout=30)
            try:
                conn.request("GET", path, headers={"Accept": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            finally:
                conn.close()

        def both(obj: dict) -> None:
            real.apply(obj)
            double.apply(obj)

        real.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "conf"}})
        for i in range(3):
            both({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"c{i}", "namespace": "conf"},
                  "spec": {"clusterIP": f"10.96.1.{i + 1}", "selector": {"app": f"c{i}"},
                           "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        both({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"name": "c0-x", "namespace": "conf", "labels": {"kubernetes.io/service-name": "c0"}},
              "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["10.244.9.9"], "conditions": {"ready": True}}]})
        problems = {}

        def compare(what: str, d: tuple[int, str], r: tuple[int, str], stream: bool = False) -> None:
            if d[0] != r[0]:
                problems[what] = [f"HTTP {d[0]} vs {r[0]}"]
                return
            dd, rr = (_events(d[1]), _events(r[1])) if stream else (json.loads(d[1]), json.loads(r[1]))
            if p := shape_problems(dd, rr):
                problems[what] = p

        for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
            compare(f"list {path}", dget(path), real.raw("GET", path))
        page = "/api/v1/services?limit=1"
        d1, r1 = dget(page), real.raw("GET", page)
        compare("first page", d1, r1)
        dc, rc = (json.loads(x[1])["metadata"]["continue"] for x in (d1, r1))
        compare("next page", dget(f"{page}&continue={dc}"), real.raw("GET", f"{page}&continue={rc}"))

        # A watch from the list's resourceVersion sees the change after it.
        drv, rrv = (json.loads(x)["metadata"]["resourceVersion"] for x in
                    (dget("/api/v1/services")[1], real.raw("GET", "/api/v1/services")[1]))
        both({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c1", "namespace": "conf"},
              "spec": {"clusterIP": "10.96.1.2", "selector": {"app": "c1"},
                       "ports": [{"name": "p", "port": 81, "targetPort": 8080, "protocol": "TCP"}]}})
        watch = "/api/v1/services?watch=1&allowWatchBookmarks=true&timeoutSeconds=2&resourceVersion="
        dw, rw = dget(watch + drv), real.raw("GET", watch + rrv)
        assert {e["type"] for e in _events(dw[1])} - {"BOOKMARK"} == {"MODIFIED"}
        assert {e["type"] for e in _events(rw[1])} - {"BOOKMARK"} == {"MODIFIED"}
        modified = lambda x: [e for e in _events(x[1]) if e["type"] == "MODIFIED"]   # noqa: E731
        if p := shape_problems(modified(dw), modified(rw)):
            problems["watch event"] = p

        # History compacted: a watch from before it, and a continue token into it.
        page_d, page_r = dget(page), real.raw("GET", page)
        both({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c2", "namespace": "conf"},
              "spec": {"clusterIP": "10.96.1.3", "selector": {"app": "c2"},
                       "ports": [{"name": "p", "port": 82, "targetPort": 8080, "protocol": "TCP"}]}})
        double.compact()
        cluster.compact()
        # A running apiserver still serves both from its watch cache and its
        # list snapshots; a restarted one has neither.
        cluster.stop_apiserver()
        cluster.start_apiserver()
        compare("watch from a compacted resourceVersion", dget(watch + drv), real.raw("GET", watch + rrv),
                stream=True)
        dc, rc = (json.loads(x[1])["metadata"]["continue"] for x in (page_d, page_r))
        compare("continue after compaction", dget(f"{page}&continue={dc}"),
                real.raw("GET", f"{page}&continue={rc}"))
    finally:
        double.close()
    assert not problems, json.dumps(problems, indent=1)
