"""Kubernetes mode end to end: the apiserver double (inside the LB's netns)
-> the real client library -> the real daemon (`xdplb run` with a
`kubernetes:` block) -> real XDP on the lab's veths -> real curl and
UDP to the lab's backend servers."""

from __future__ import annotations

import collections
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from lb.demo import DaemonProcess, curl_many
from lbtest import k8s_daemon

pytestmark = pytest.mark.root

NODE_IP = "10.96.200.1"


def node() -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}


def service(name: str, ip: str, port: int, target: int, proto: str = "TCP", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "selector": {"app": name},
                     "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": proto}], **spec}}


def slice_(name: str, port: int, eps: list[tuple[str, dict]], proto: str = "TCP") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": proto}],
            "endpoints": [{"addresses": [ip], "conditions": cond, "nodeName": "node-a",
                           "targetRef": {"kind": "Pod", "namespace": "shop", "name": f"pod-{ip}"}}
                          for ip, cond in eps]}


READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


@pytest.fixture(scope="module")
def k8s(lab, bpf_object, tmp_path_factory):
    """The double in the LB namespace, and a daemon in Kubernetes mode."""
    lab_, topo = lab
    with k8s_daemon(topo, tmp_path_factory.mktemp("k8s-e2e"), [node()]) as (api, d):
        yield lab_, topo, api, d


def applied(d: DaemonProcess, rv: int, kinds=("Service", "EndpointSlice"), timeout: float = 20) -> None:
    """Wait until the daemon's maps hold everything up to resourceVersion rv."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = d.call("kubernetes", brief=True)
        if any(st["applied_rv"].get(k, 0) >= rv for k in kinds):
            return
        time.sleep(0.02)
    raise AssertionError(f"rv {rv} not applied: {d.call('kubernetes', since=10**9)}")


def stats(d: DaemonProcess) -> dict:
    return d.call("stats")


def drops(d: DaemonProcess, reason: str) -> int:
    return sum(x["packets"] for x in stats(d)["drop_detail"] if x["reason"] == reason)


def test_clusterip_balances_and_terminating_endpoint_drains(k8s):
    lab_, topo, api, d = k8s
    b = topo.backends
    api.apply(service("web", "10.96.0.10", 80, topo.backend_port))
    rv = api.apply(slice_("web", topo.backend_port, [(x.ip, READY) for x in b]))
    applied(d, rv)
    counts = collections.Counter(curl_many(lab_, topo, "http://10.96.0.10/", 60, topo.client_ip))
    assert sum(counts.values()) == 60 and set(counts) == {x.name for x in b}, counts
    # b1 terminates: it keeps its flows (draining) but gets no new one.
    rv = api.apply(slice_("web", topo.backend_port,
                          [(b[0].ip, TERMINATING)] + [(x.ip, READY) for x in b[1:]]))
    applied(d, rv)
    counts = collections.Counter(curl_many(lab_, topo, "http://10.96.0.10/", 40, topo.client_ip))
    assert sum(counts.values()) == 40 and b[0].name not in counts, counts
    web = next(s for s in stats(d)["services"] if s["name"] == "shop.web.p.tcp.cluster.10.96.0.10")
    assert {x["address"]: x["state"] for x in web["backends"]}[b[0].ip] == "draining"


def test_udp_service_and_nodeport(k8s):
    lab_, topo, api, d = k8s
    b = topo.backends
    api.apply(service("echo", "10.96.0.53", 53, topo.udp_port, "UDP"))
    api.apply(service("nodeweb", "10.96.0.11", 80, topo.backend_port, type="NodePort"))
    api.apply(slice_("nodeweb", topo.backend_port, [(b[1].ip, READY)]))
    rv = api.apply(slice_("echo", topo.udp_port, [(x.ip, READY) for x in b], "UDP"))
    applied(d, rv)
    code = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3);"
            "s.sendto(b'hi', ('10.96.0.53', 53)); print(s.recvfrom(200)[0].decode())")
    out = lab_.run(topo.client_ns, [sys.executable, "-c", code], timeout=10).stdout
    assert re.match(r"backend=b\d client=10\.1\.0\.10:\d+", out), out
    node_port = api.get("Service", "shop", "nodeweb")["spec"]["ports"][0]["nodePort"]
    assert 30000 <= node_port <= 32767                     # allocated by the (double) apiserver
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3",
                                    f"http://{NODE_IP}:{node_port}/"]).stdout
    assert out.startswith(f"backend={b[1].name} "), out


def test_service_without_endpoints_refuses_new_flows(k8s):
    """kube-proxy REJECTs: the client is refused at once (ICMP port
    unreachable from the VIP), and the drop is counted as no_backend."""
    lab_, topo, api, d = k8s
    rv = api.apply(service("empty", "10.96.0.12", 80, topo.backend_port))
    applied(d, rv)
    before = drops(d, "no_backend")
    for _ in range(3):
        t0 = time.monotonic()
        r = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "5", "http://10.96.0.12/"], check=False)
        assert r.returncode == 7 and time.monotonic() - t0 < 2.0, r     # refused, not timed out
    assert drops(d, "no_backend") >= before + 3


def test_session_affinity_client_ip_sticks(k8s):
    lab_, topo, api, d = k8s
    b = topo.backends
    api.apply(service("sticky", "10.96.0.16", 80, topo.backend_port, sessionAffinity="ClientIP",
                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}))
    rv = api.apply(slice_("sticky", topo.backend_port, [(x.ip, READY) for x in b]))
    applied(d, rv)
    answers = curl_many(lab_, topo, "http://10.96.0.16/", 20, topo.client_ip)
    assert len(answers) == 20 and len(set(answers)) == 1, answers      # one client, one backend
    # Without affinity the same 20 connections spread (3 backends).
    api.apply(service("loose", "10.96.0.17", 80, topo.backend_port))
    rv = api.apply(slice_("loose", topo.backend_port, [(x.ip, READY) for x in b]))
    applied(d, rv)
    assert len(set(curl_many(lab_, topo, "http://10.96.0.17/", 20, topo.client_ip))) >= 2


def test_load_balancer_source_ranges_enforced_at_xdp(k8s):
    lab_, topo, api, d = k8s
    b = topo.backends
    svc = service("lbweb", "10.96.0.13", 80, topo.backend_port, type="LoadBalancer",
                  loadBalancerSourceRanges=["10.1.0.0/24"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "10.96.150.1"}]}}
    api.apply(svc)
    rv = api.apply(slice_("lbweb", topo.backend_port, [(x.ip, READY) for x in b]))
    applied(d, rv)
    assert len(curl_many(lab_, topo, "http://10.96.150.1/", 5, topo.client_ip)) == 5
    before = drops(d, "policy")
    assert curl_many(lab_, topo, "http://10.96.150.1/", 3, topo.denied_client_ip, timeout=1.0) == []
    assert drops(d, "policy") >= before + 3
    # The ClusterIP of the same Service has no source ranges.
    assert len(curl_many(lab_, topo, "http://10.96.0.13/", 3, topo.denied_client_ip)) == 3


def test_networkpolicy_enforced_at_xdp_by_pod_identity(k8s):
    lab_, topo, api, d = k8s
    b = topo.backends

    def pod(name: str, ip: str, labels: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop",
                "labels": labels}, "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}

    api.apply_many([pod("client", topo.client_ip, {"app": "client"}),
                    pod("intruder", topo.denied_client_ip, {"app": "intruder"}),
                    *[pod(f"np-{x.name}", x.ip, {"app": "npweb"}) for x in b],
                    service("npweb", "10.96.0.14", 80, topo.backend_port)])
    rv = api.apply(slice_("npweb", topo.backend_port, [(x.ip, READY) for x in b]))
    applied(d, rv)
    assert len(curl_many(lab_, topo, "http://10.96.0.14/", 2, topo.denied_client_ip)) == 2  # no policy yet
    rv = api.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "npweb-from-client", "namespace": "shop"},
                    "spec": {"podSelector": {"matchLabels": {"app": "npweb"}}, "policyTypes": ["Ingress"],
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                          "ports": [{"protocol": "TCP", "port": topo.backend_port}]}]}})
    applied(d, rv, kinds=("NetworkPolicy",))
    assert len(curl_many(lab_, topo, "http://10.96.0.14/", 5, topo.client_ip)) == 5
    before = drops(d, "policy")
    assert curl_many(lab_, topo, "http://10.96.0.14/", 3, topo.denied_client_ip, timeout=1.0) == []
    assert drops(d, "policy") >= before + 3
    st = stats(d)
    denied = [x for x in st["drop_detail"] if x["reason"] == "policy" and x["service"].startswith("shop.npweb.")]
    assert denied and denied[0]["identity"].startswith("pod.shop.")


def test_api_refuses_service_edits_in_kubernetes_mode(k8s):
    _, _, _, d = k8s
    from lb import api as lbapi

    with pytest.raises(lbapi.ApiError, match="Kubernetes mode"):
        d.call("delete_service", name="shop.web.p.tcp.cluster.10.96.0.10")


def test_reload_keeps_cluster_services_and_cli_reports(k8s):
    lab_, topo, api, d = k8s
    rv = api.apply(service("reload", "10.96.0.15", 80, topo.backend_port))
    api.apply(slice_("reload", topo.backend_port, [(topo.backends[2].ip, READY)]))
    applied(d, rv + 1)
    before = d.call("status")["services"]
    size = d.log.stat().st_size
    d.proc.send_signal(signal.SIGHUP)                 # re-reads the YAML: no services in it
    deadline = time.monotonic() + 20
    while "reload ok" not in d.log.read_text()[size:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload ok" in d.log.read_text()[size:]
    assert d.call("status")["services"] == before
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", "http://10.96.0.15/"]).stdout
    assert out.startswith(f"backend={topo.backends[2].name} "), out
    import subprocess

    cli = subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, "kubernetes"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert cli.returncode == 0 and "xdplb_services" in cli.stdout and "watch EndpointSlice" in cli.stdout
