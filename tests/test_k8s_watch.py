"""The watcher against the apiserver double, over real HTTP with the real
client library (`kubernetes`, a kubeconfig pointing at the double): paged
lists, watch resumption, bookmarks, 410 relist+diff, reconnects."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from k8s_apiserver import FakeApiServer, load_manifests
from lb.config import KubernetesSource
from lb.sources.kubernetes import KubernetesWatcher, api_client
from lbtest import wait_for

MANIFESTS = Path(__file__).resolve().parent / "k8s_manifests"


def svc(name: str, ip: str, port: int = 80, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": "TCP"}]}}


def eps(name: str, service: str, addrs: list[str], ns: str = "default", ready: bool = True) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addrs]}


class Harness:
    def __init__(self, api: FakeApiServer, tmp: Path, **settings):
        self.api = api
        self.plans = []
        kc = api.kubeconfig(tmp / "kubeconfig")
        self.w = KubernetesWatcher(KubernetesSource(kubeconfig=kc, node_name="node-a", **settings),
                                   self.plans.append)
        self.w.start_reflectors()
        self.initial = self.w.initial(timeout=30)
        self.w.run_forever()
        # Every reflector is watching (not just listed): the tests cut watches.
        wait_for(lambda: api.open_watches() == len(self.w.reflectors), what="all watches open")

    def backends(self, name_part: str) -> set[str]:
        for n, s in self.w.syncer.entries.items():
            if name_part in n:
                return {b.key for b in s.backends}
        return set()

    def refl(self, kind: str):
        return next(r for r in self.w.reflectors if r.kind == kind)

    def close(self):
        self.w.close()


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.2) as a:
        yield a


@pytest.fixture
def harness(api, tmp_path):
    hs = []

    def make(**kw) -> Harness:
        h = Harness(api, tmp_path, **kw)
        hs.append(h)
        return h

    yield make
    for h in hs:
        h.close()


def test_kubeconfig_client_talks_http_to_the_double(api, tmp_path):
    from kubernetes import client

    c = api_client(api.kubeconfig(tmp_path / "kc"))
    api.apply(svc("a", "10.96.0.1"))
    names = [s.metadata.name for s in client.CoreV1Api(c).list_service_for_all_namespaces().items]
    assert names == ["a"]
    assert any(r.startswith("/api/v1/services") for r in api.requests)


def test_paged_list_uses_continue(api, harness):
    api.apply_many([svc(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(1050)])
    h = harness(page_size=100)
    assert len(h.w.syncer.entries) == 1050
    assert h.refl("Service").stats.pages == 11
    assert sum("continue=" in r for r in api.requests if r.startswith("/api/v1/services")) == 10


def test_expired_continue_token_restarts_the_list(api, harness):
    api.apply_many([svc(f"s{i}", f"10.96.1.{i + 1}") for i in range(30)])
    api.expire_continue = 1
    h = harness(page_size=10)
    assert len(h.w.syncer.entries) == 30
    assert api.stats["list_410"] == 1
    assert h.refl("Service").stats.lists >= 2


def test_watch_delivers_add_modify_delete(api, harness):
    api.apply_many([svc("web", "10.96.0.10"), eps("web-1", "web", ["10.244.0.1"])])
    h = harness()
    assert h.backends("web") == {"10.244.0.1:8080"}
    api.apply(eps("web-1", "web", ["10.244.0.1", "10.244.0.2"]))
    wait_for(lambda: h.backends("web") == {"10.244.0.1:8080", "10.244.0.2:8080"}, what="modify")
    api.apply_many([svc("api", "10.96.0.11"), eps("api-1", "api", ["10.244.0.9"])])
    wait_for(lambda: h.backends("api") == {"10.244.0.9:8080"}, what="add")
    api.delete("Service", "default", "web")
    wait_for(lambda: not h.backends("web"), what="delete")
    assert any(p.deletes for p in h.plans)


def test_dropped_connection_resumes_from_last_resource_version(api, harness):
    api.apply_many([svc("web", "10.96.0.10"), eps("web-1", "web", ["10.244.0.1"])])
    h = harness()
    lists = h.refl("EndpointSlice").stats.lists
    api.watch_gate.clear()               # reconnects wait: the change happens while we are away
    assert api.drop_watches() == len(h.w.reflectors)
    time.sleep(0.3)
    rv = api.apply(eps("web-1", "web", ["10.244.0.3"]))
    api.watch_gate.set()
    wait_for(lambda: h.backends("web") == {"10.244.0.3:8080"}, what="the change made while disconnected")
    r = h.refl("EndpointSlice")
    assert r.stats.reconnects >= 1
    assert r.stats.lists == lists                     # resumed by resourceVersion: no relist
    resumed = [q for q in api.requests if q.startswith("/apis/discovery.k8s.io/v1/endpointslices?")
               and "watch=true" in q and "resourceVersion=0" not in q]
    assert len(resumed) >= 2 and int(r.rv) >= rv


def test_bookmarks_advance_resource_version_without_events(api, harness):
    api.apply_many([svc("web", "10.96.0.10")])
    h = harness()
    r = h.refl("Service")
    before = int(r.rv)
    rv = api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    wait_for(lambda: int(r.rv) >= rv, what="a bookmark")
    assert r.stats.bookmarks > 0 and r.stats.events == 0 and int(r.rv) > before
    # Compacting now does not hurt: the Service watch resumes from the bookmark.
    api.compact()
    api.drop_watches()
    api.apply(svc("api", "10.96.0.11"))
    wait_for(lambda: "default.api" in " ".join(h.w.syncer.entries), what="the new service")
    assert r.stats.relists_410 == 0


def test_410_gone_relists_and_diffs(api, harness, caplog):
    api.apply_many([svc("a", "10.96.0.1"), svc("b", "10.96.0.2"), svc("c", "10.96.0.3"),
                    eps("a-1", "a", ["10.244.0.1"]), eps("b-1", "b", ["10.244.0.2"])])
    h = harness()
    caplog.set_level(logging.INFO, logger="xdplb.k8s")
    api.watch_gate.clear()
    api.drop_watches()
    time.sleep(0.3)
    api.apply(eps("a-1", "a", ["10.244.0.11"]))      # modified
    api.delete("Service", "default", "c")             # deleted: only a relist+diff can notice
    api.apply(svc("d", "10.96.0.4"))                  # added
    api.compact()                                     # the watchers' resourceVersions are gone
    n_plans = len(h.plans)
    api.watch_gate.set()
    wait_for(lambda: {n.split(".")[1] for n in h.w.syncer.entries} == {"a", "b", "d"}, what="relist")
    wait_for(lambda: h.backends("default.a.") == {"10.244.0.11:8080"}, what="the modified slice")
    assert h.refl("Service").stats.relists_410 >= 1
    assert h.refl("EndpointSlice").stats.relists_410 >= 1
    assert api.stats["watch_410"] >= 2
    # A diff, not a reset: b (unchanged) is not re-applied.
    after = [s.name for p in h.plans[n_plans:] for s in p.upserts]
    assert not [n for n in after if n.startswith("default.b.")]
    assert "watch expired (410 Gone), relisting" in caplog.text


def test_watch_errors_back_off_and_recover(api, harness, caplog):
    api.apply_many([svc("web", "10.96.0.10"), eps("web-1", "web", ["10.244.0.1"])])
    h = harness(network_policy=False)
    api.fail_watches = 12
    api.drop_watches()
    wait_for(lambda: api.fail_watches == 0 and api.open_watches() == 3, timeout=90,
             what="every watch re-established after the injected failures")
    api.apply(eps("web-1", "web", ["10.244.0.5"]))
    wait_for(lambda: h.backends("web") == {"10.244.0.5:8080"}, timeout=30, what="recovery")
    # (the library retries some 500s itself; the rest reach the reflector)
    assert sum(r.stats.reconnects for r in h.w.reflectors) >= 3
    backoffs = [float(x.split("backoff_s=")[1]) for x in caplog.messages if "backoff_s=" in x]
    assert max(backoffs) > min(backoffs)              # exponential: the delay grew


def test_malformed_object_keeps_last_good_version(api, harness, caplog):
    api.apply_many([svc("web", "10.96.0.10"), eps("web-1", "web", ["10.244.0.1"])])
    h = harness()
    bad = eps("web-1", "web", ["10.244.0.2"])
    bad["endpoints"][0]["addresses"] = []
    api.apply(bad)
    api.apply(svc("other", "10.96.0.12"))             # a later event still flows
    wait_for(lambda: any("default.other" in n for n in h.w.syncer.entries), what="later event")
    # The Service and the EndpointSlice come over two watch streams: the
    # later Service event says nothing of when the slice's arrived.
    wait_for(lambda: h.refl("EndpointSlice").stats.bad_objects >= 1, what="the malformed slice")
    assert h.backends("default.web") == {"10.244.0.1:8080"}
    assert h.refl("EndpointSlice").stats.bad_objects == 1
    assert "EndpointSlice default/web-1: endpoints[0].addresses must not be empty" in caplog.text


def test_semantics_manifests_through_the_watcher(api, harness):
    """The translation tests' manifests, applied as kubectl would, end up
    as the same services when they travel over list/watch."""
    api.apply_manifests(MANIFESTS / "semantics.yaml")
    h = harness()
    names = set(h.w.syncer.entries)
    assert "shop.dns.dns-udp.udp.cluster.10.96.0.10" in names
    assert "shop.web.http.tcp.node.10.96.200.1" in names
    assert not [n for n in names if ".db." in n or ".mesh." in n or ".sig." in n]
    st = h.w.status()
    assert st["sync"]["skipped_sctp"] >= 1 and st["sync"]["skipped_family"] == 0
    # Policy arrives later, over the watch: the web services get allow lists.
    api.apply_many(load_manifests(MANIFESTS / "policies.yaml"))
    wait_for(lambda: h.w.syncer.entries["shop.web.http.tcp.cluster.10.96.0.20"].allow is not None,
             what="policy applied")
    assert h.plans and h.plans[-1].identities is not None or any(p.identities for p in h.plans)


def test_address_conflict_waits_for_the_holder_to_go():
    """Two Services claim one externalIP:port: the first keeps it, the
    second is logged and served as soon as the first lets go."""
    from lb.sources import k8s_model as m
    from lb.sources.kubernetes import Event, Syncer

    def ev(typ, obj):
        k = obj["kind"]
        return Event(k, typ, m.key_of(k, obj), m.parse(k, obj) if typ != "DELETED" else None, 1, 0)

    a, b = svc("a", "10.96.0.1"), svc("b", "10.96.0.2")
    for s in (a, b):
        s["spec"]["externalIPs"] = ["10.96.100.1"]
    sy = Syncer(KubernetesSource(node_name="node-a"))
    sy.plan([ev("ADDED", a)])
    sy.plan([ev("ADDED", b)])
    assert sy.stats.conflicts == 1
    assert [n for n in sy.entries if ".ext." in n] == ["default.a.p.tcp.ext.10.96.100.1"]
    plan = sy.plan([ev("DELETED", a)])
    assert [n for n in sy.entries if ".ext." in n] == ["default.b.p.tcp.ext.10.96.100.1"]
    assert {s.name for s in plan.upserts} == {"default.b.p.tcp.ext.10.96.100.1"}


def test_identities_over_the_map_size_keep_the_previous_policy(caplog):
    """More pod addresses than the identities map holds: nothing of the
    new identity set is applied, services keep their last allow lists."""
    from lb.sources import k8s_model as m
    from lb.sources.kubernetes import Event, Syncer

    def ev(obj):
        k = obj["kind"]
        return Event(k, "ADDED", m.key_of(k, obj), m.parse(k, obj), 1, 0)

    def pod(name, ip, app):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                "labels": {"app": app}}, "status": {"phase": "Running", "podIP": ip}}

    sy = Syncer(KubernetesSource(node_name="node-a"))
    sy.identity_limit = 3
    pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}}
    plan = sy.plan([ev(svc("web", "10.96.0.1")), ev(eps("web-1", "web", ["10.244.0.1"])),
                    ev(pod("web-0", "10.244.0.1", "web")), ev(pod("c-0", "10.244.0.9", "client")), ev(pol)])
    (web,) = sy.entries.values()
    assert plan.identities is not None and len(web.allow) == 1
    plan = sy.plan([ev(pod("c-1", "10.244.0.10", "client")), ev(pod("x-0", "10.244.0.11", "other"))])
    assert plan.identities is None                    # 4 CIDRs > 3: not applied
    assert "exceed the identities map's 3 entries" in caplog.text
    assert list(sy.entries.values()) == [web]


def test_in_cluster_service_account_credentials(tmp_path, monkeypatch):
    """Without a kubeconfig, inside a pod: the library's in-cluster loader
    (service-account token and CA files, KUBERNETES_SERVICE_HOST/PORT)."""
    from kubernetes.config import incluster_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token-123")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    c = api_client(None)
    assert c.configuration.host == "https://10.96.0.1:443"
    assert c.configuration.ssl_ca_cert == str(ca)
    auth = c.configuration.auth_settings()["BearerToken"]
    assert (auth["key"], auth["value"].lower()) == ("authorization", "bearer sa-token-123")


def annotated(name: str, ip: str, port: int = 80, **annotations: str) -> dict:
    s = svc(name, ip, port)
    s["metadata"]["annotations"] = {f"xdplb.io/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return s


def test_forwarding_and_table_size_annotations(caplog):
    """xdplb.io/forwarding and xdplb.io/maglev-table-size set a Service's
    forwarding and Maglev table size. A value that is not one, or that the
    Service cannot take (ipip without encap_source, a backend on another
    port, a table too small or not a table size), is logged once, counted
    in the sync stats, and the Service is served with the default."""
    from lb.sources import k8s_model as m
    from lb.sources.kubernetes import Event, Syncer

    def ev(obj, typ="ADDED"):
        k = obj["kind"]
        return Event(k, typ, m.key_of(k, obj), m.parse(k, obj), 1, 0)

    def slice_on(name, service, port, addrs):
        e = eps(name, service, addrs)
        e["ports"][0]["port"] = port
        return e

    objs = [annotated("dsr", "10.96.0.1", forwarding="ipip", maglev_table_size="1009"),
            slice_on("dsr-1", "dsr", 80, ["10.244.0.1", "10.244.0.2"]),
            annotated("gue", "10.96.0.2", forwarding=" GUE "), slice_on("gue-1", "gue", 80, ["10.244.0.3"]),
            annotated("typo", "10.96.0.3", forwarding="dsr"), slice_on("typo-1", "typo", 80, ["10.244.0.4"]),
            annotated("port", "10.96.0.4", forwarding="ipip"), eps("port-1", "port", ["10.244.0.5"]),
            annotated("nan", "10.96.0.5", maglev_table_size="big"), eps("nan-1", "nan", ["10.244.0.6"]),
            annotated("odd", "10.96.0.6", maglev_table_size="1000"), eps("odd-1", "odd", ["10.244.0.7"]),
            annotated("small", "10.96.0.7", maglev_table_size="101"),
            eps("small-1", "small", ["10.244.0.8", "10.244.0.9"])]

    def options(sy):
        return {n.split(".")[1]: (s.forwarding, s.maglev_table_size) for n, s in sy.entries.items()}

    # Without encap_source, ipip and gue cannot be: nat, and said so.
    sy = Syncer(KubernetesSource(node_name="node-a"))
    sy.plan([ev(o) for o in objs])
    assert options(sy)["dsr"] == ("nat", 1009) and options(sy)["gue"] == ("nat", None)
    assert "needs encap_source" in caplog.text

    caplog.clear()
    sy = Syncer(KubernetesSource(node_name="node-a"))
    sy.encap_families = frozenset({4})
    sy.plan([ev(o) for o in objs])
    assert options(sy) == {"dsr": ("ipip", 1009), "gue": ("gue", None), "typo": ("nat", None),
                           "port": ("nat", None), "nan": ("nat", None), "odd": ("nat", None),
                           "small": ("nat", None)}
    assert sy.stats.bad_annotations == 5 and sy.stats.rejected == 0
    for reason in ("xdplb.io/forwarding='dsr' is not one of nat, ipip, gue",
                   "the backend must serve the service's port 80",
                   "xdplb.io/maglev-table-size='big' is not a number",
                   "maglev_table_size 1000: must be one of the table sizes",
                   "maglev_table_size 101: too small for 2 active backends"):
        assert caplog.text.count(reason) == 1, reason
    # Retranslating without a change says nothing again; fixing the value serves it.
    sy.plan([ev(slice_on("typo-1", "typo", 80, ["10.244.0.4", "10.244.0.10"]), "MODIFIED")])
    assert sy.stats.bad_annotations == 5
    sy.plan([ev(annotated("typo", "10.96.0.3", forwarding="ipip"), "MODIFIED")])
    assert options(sy)["typo"] == ("ipip", None) and sy.stats.bad_annotations == 5


def test_forwarding_annotation_needs_an_encap_source_of_the_backends_family(caplog):
    """An IPv6 Service annotated ipip on a daemon whose encap_source is
    IPv4 only: the tunnels to its IPv6 backends would have no outer source,
    so it is served by NAT and the reason logged, as the config file's
    check says it; with an IPv6 encap_source too, it is served by ipip."""
    from lb.sources import k8s_model as m
    from lb.sources.kubernetes import Event, Syncer

    s = annotated("v6", "fd00:96::1", forwarding="ipip")
    s["spec"].update(ipFamilies=["IPv6"], clusterIPs=["fd00:96::1"])
    e = eps("v6-1", "v6", ["fd00:244::1"])
    e["addressType"] = "IPv6"
    e["ports"][0]["port"] = 80
    objs = [Event(o["kind"], "ADDED", m.key_of(o["kind"], o), m.parse(o["kind"], o), 1, 0) for o in (s, e)]

    for families, want in ((frozenset({4}), "nat"), (frozenset({4, 6}), "ipip")):
        sy = Syncer(KubernetesSource(node_name="node-a"))
        sy.encap_families = families
        sy.plan(objs)
        (svc6,) = sy.entries.values()
        assert svc6.forwarding == want and str(svc6.vip) == "fd00:96::1"
    assert caplog.text.count("forwarding ipip to an IPv6 backend needs an IPv6 encap_source") == 1


def test_annotations_through_the_watcher(api, harness):
    """The same through the apiserver double and the real client: an
    annotation added later changes the service; a bad one is counted in
    `xdplb kubernetes` status and the Service keeps being served."""
    api.apply_many([svc("web", "10.96.0.10"), eps("web-1", "web", ["10.244.0.1"])])
    h = harness()
    (name,) = [n for n in h.w.syncer.entries if ".web." in n]
    assert h.w.syncer.entries[name].maglev_table_size is None
    api.apply(annotated("web", "10.96.0.10", maglev_table_size="2039"))
    wait_for(lambda: h.w.syncer.entries[name].maglev_table_size == 2039, what="annotation applied")
    api.apply(annotated("web", "10.96.0.10", maglev_table_size="2039", forwarding="vxlan"))
    wait_for(lambda: h.w.status()["sync"]["bad_annotations"] == 1, what="bad annotation counted")
    s = h.w.syncer.entries[name]
    assert (s.forwarding, s.maglev_table_size) == ("nat", 2039)
    assert h.backends("web") == {"10.244.0.1:8080"}
