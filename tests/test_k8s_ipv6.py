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


def test_networkpolicy_over_ipv6_by_dual_stack_pod_identity(k8s6):
    """Pods with an IPv4 and an IPv6 podIP are one identity holding both
    addresses; a NetworkPolicy admitting the client's pods lets its IPv6
    address through the IPv6 VIP, and the intruder's IPv6 address is
    dropped at XDP as `policy`."""
    lab, topo, api, d = k8s6
    b, port = topo.backends, topo.backend_port

    def pod(name: str, ips: tuple[str, str], labels: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}

    def np_slice(family: str, ips: list[str]) -> dict:
        s = slice_(family, [(ip, READY) for ip in ips], port)
        s["metadata"].update(name=f"npweb-{family.lower()}", labels={"kubernetes.io/service-name": "npweb"})
        return s

    api.apply_many([pod("client", (topo.client_ip, topo.client_ip6), {"app": "client"}),
                    pod("intruder", (topo.denied_client_ip, topo.denied_client_ip6), {"app": "intruder"}),
                    *[pod(f"np-{x.name}", (x.ip, x.ip6), {"app": "npweb"}) for x in b],
                    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "npweb", "namespace": "shop"},
                     "spec": {"ipFamilyPolicy": "PreferDualStack", "clusterIPs": ["10.96.0.14", "fd00:96::14"],
                              "selector": {"app": "npweb"},
                              "ports": [{"name": "p", "port": 80, "targetPort": port, "protocol": "TCP"}]}},
                    np_slice("IPv4", [x.ip for x in b])])
    applied(d, api.apply(np_slice("IPv6", [x.ip6 for x in b])))
    url = "http://[fd00:96::14]/"
    assert len(curl_many(lab, topo, url, 2, topo.denied_client_ip6)) == 2          # no policy yet
    applied(d, api.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": {"name": "npweb-from-client", "namespace": "shop"},
                          "spec": {"podSelector": {"matchLabels": {"app": "npweb"}}, "policyTypes": ["Ingress"],
                                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}}),
            kinds=("NetworkPolicy",))
    assert len(curl_many(lab, topo, url, 5, topo.client_ip6)) == 5
    assert curl_many(lab, topo, url, 3, topo.denied_client_ip6, timeout=1.0) == []
    denied = [x for x in d.call("stats")["drop_detail"]
              if x["reason"] == "policy" and x["service"] == "shop.npweb.p.tcp.cluster.fd00-96--14"]
    assert denied and denied[0]["packets"] >= 3 and denied[0]["identity"].startswith("pod.shop."), denied
