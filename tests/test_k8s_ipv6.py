"""Kubernetes dual-stack end to end: the apiserver double (dual-stack
service range) in the LB's namespace of the lab with IPv6 on its links,
the real daemon in Kubernetes mode, real curl over both families. A
PreferDualStack Service's IPv6 clusterIP is served from its IPv6
EndpointSlice, its IPv4 one from the IPv4 slice, and an endpoint's state
in one family's slice moves only that family's service."""

from __future__ import annotations

import collections

import pytest

from lb.demo import DaemonProcess, curl_many
from lb.lab import Lab, build_lb_lab, start_backends
from lbtest import k8s_daemon
from test_k8s_e2e import READY, TERMINATING, applied

pytestmark = pytest.mark.root

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"


def slice_(family: str, addresses: list[tuple[str, dict]], port: int) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"web-{family.lower()}", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family, "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": cond, "nodeName": "node-a"} for ip, cond in addresses]}


@pytest.fixture(scope="module")
def k8s6(bpf_object, tmp_path_factory):
    with Lab(ipv6=True) as lab:
        topo = build_lb_lab(lab, 3)
        start_backends(lab, topo)
        with k8s_daemon(topo, tmp_path_factory.mktemp("k8s-ipv6")) as (api, d):
            yield lab, topo, api, d


def backends(d: DaemonProcess, name: str) -> dict[str, str]:
    svc = next(s for s in d.call("stats")["services"] if s["name"] == name)
    return {b["address"]: b["state"] for b in svc["backends"]}


def test_dual_stack_service_over_both_families(k8s6):
    lab, topo, api, d = k8s6
    b, port = topo.backends, topo.backend_port
    api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"ipFamilyPolicy": "RequireDualStack", "clusterIPs": [VIP4, VIP6], "selector": {"app": "web"},
                        "ports": [{"name": "p", "port": 80, "targetPort": port, "protocol": "TCP"}]}})
    assert api.get("Service", "shop", "web")["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    api.apply(slice_("IPv4", [(x.ip, READY) for x in b], port))
    applied(d, api.apply(slice_("IPv6", [(x.ip6, READY) for x in b], port)))
    name6 = "shop.web.p.tcp.cluster.fd00-96--10"
    assert backends(d, name6) == {x.ip6: "active" for x in b}
    counts = collections.Counter(curl_many(lab, topo, f"http://[{VIP6}]/", 60, topo.client_ip6))
    assert sum(counts.values()) == 60 and set(counts) == {x.name for x in b}, counts
    assert len(curl_many(lab, topo, f"http://{VIP4}/", 10, topo.client_ip)) == 10
    # b1 terminates in the IPv6 slice only: drained over IPv6, untouched over IPv4.
    applied(d, api.apply(slice_("IPv6", [(b[0].ip6, TERMINATING)] + [(x.ip6, READY) for x in b[1:]], port)))
    assert backends(d, name6)[b[0].ip6] == "draining"
    assert backends(d, f"shop.web.p.tcp.cluster.{VIP4}")[b[0].ip] == "active"
    counts = collections.Counter(curl_many(lab, topo, f"http://[{VIP6}]/", 30, topo.client_ip6))
    assert sum(counts.values()) == 30 and b[0].name not in counts, counts
    assert d.call("kubernetes", since=10**9)["sync"]["skipped_family"] == 0
