"""xdplb beside the real kube-proxy, following one real API server, in one run.

    xdplb bench --kube-proxy [iptables nftables iptables-legacy] [--kube-proxy-only]
                [--services 1000 5000 10000 20000] [--changes 1000] [--change-rate 100]

The cluster: etcd, kube-apiserver and kube-controller-manager (`make
k8s-bins`, bench/k8s_cluster.py) in a namespace of their own, reached by each
engine's lb namespace through a veth (an API server is not on the load
balancer either). N Services in namespace `bench`: ClusterIP (the sweep's
VIPs, bench/lab.py), UDP port 80, one EndpointSlice of 3 ready endpoints on
port 8080. The Services have no selector and the bench writes their
EndpointSlices (managed-by `xdplb-bench`), as the mirroring controller or a
custom controller would, for two reasons measured here:
- setup: 1,000 Services took 19-30 s this way against 65 s with 3 Pods each
  made ready through status for the EndpointSlice controller (7 requests a
  Service instead of 2, the API server's CPU being the limit): at 20,000,
  some 8 minutes against 20;
- precision: the controller stamps `endpoints.kubernetes.io/last-change-
  trigger-time` with the Pod's Ready condition time, in whole seconds;
  kube-proxy measures its programming latency from that annotation, so the
  bench writes it itself, the write's time to the nanosecond.
(The controller's path is what tests/test_k8s_real.py runs.)

Per service count (ascending: the cluster grows, it is never rebuilt) and
engine, each engine on a fresh gen -> lb -> sink lab (bench/sweep.Session):
1. start it: seconds until every Service is forwarded (cold start);
2. read the kernel back: every Service with its endpoints;
3. the sweep's traffic: new flows to the last and to a random Service,
   established flows to the last, the sink checking every packet's backend;
4. `changes` endpoint changes at `change_rate` per second, each replacing
   endpoint 0 of a random Service (the same sequence for every engine) with
   a new address; per change, API write -> the engine's kernel write
   returned (bench/kubeproxy_real.py says how each engine reports it);
5. read the kernel back again: every Service with its current endpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import random
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lb.lab import Lab

from .engines import BService
from .k8s_cluster import WITH_KUBE_PROXY, Api, Cluster, kubernetes_version, missing_binaries
from .kubeproxy_real import API_ADDRESS, NAMESPACE, NODE, NODE_IP, ApiLink, XdplbK8sEngine, make_real_engine
from .lab import SERVICE_PORT, backend_ip, vip
from .sweep import Session, _quantiles

MODES = {"iptables": "kube-proxy-iptables", "iptables-legacy": "kube-proxy-iptables-legacy",
         "nftables": "kube-proxy-nftables"}
XDPLB = XdplbK8sEngine.name
# The sweep's engine with kube-proxy's rule layout rebuilt by the bench, per real engine.
REBUILT = {"kube-proxy-iptables": "iptables-nft", "kube-proxy-iptables-legacy": "iptables-legacy",
           "kube-proxy-nftables": "nftables"}
TARGET_PORT = 8080
ENDPOINTS = 3
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
MANAGED_BY = "xdplb-bench"


@dataclass(frozen=True)
class Write:
    index: int          # the Service changed
    mono_ns: int        # CLOCK_MONOTONIC just before the request (its trigger time, in CLOCK_REALTIME)
    rv: int             # the EndpointSlice's resourceVersion after it


def rfc3339(t_ns: int) -> str:
    """CLOCK_REALTIME ns as RFC 3339 with nanoseconds (Go's time.RFC3339Nano)."""
    secs = dt.datetime.fromtimestamp(t_ns // 1_000_000_000, dt.timezone.utc)
    return secs.strftime("%Y-%m-%dT%H:%M:%S") + f".{t_ns % 1_000_000_000:09d}Z"


class BenchServices:
    """The bench's Services and EndpointSlices in the API, and their changes."""

    def __init__(self, api: Api, proto: str) -> None:
        self.api, self.proto = api, proto
        self.endpoints: dict[int, list[str]] = {}      # Service index (1..N) -> addresses
        self.versions: dict[int, int] = {}

    def prepare(self) -> None:
        self.api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        self.api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        self.api.set_status("Node", None, NODE, {"addresses": [{"type": "InternalIP", "address": NODE_IP}],
                                                 "conditions": [{"type": "Ready", "status": "True"}]})

    def grow(self, n: int, threads: int = 2) -> float:
        """Create Services up to index n; seconds taken. Index 0 is left out:
        its VIP is the API server's own Service (the first of the range)."""
        new = [i for i in range(len(self.endpoints) + 1, n + 1)]
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            for _ in ex.map(self._create, new):
                pass
        return time.monotonic() - t0

    def _create(self, i: int) -> None:
        name = f"svc-{i}"
        self.api.request("POST", Api.path("Service", NAMESPACE), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"clusterIP": vip(i), "ports": [{"name": "p", "port": SERVICE_PORT,
                                                     "targetPort": TARGET_PORT, "protocol": self.proto.upper()}]}})
        addresses = [backend_ip(i, j) for j in range(ENDPOINTS)]
        self.api.request("POST", Api.path("EndpointSlice", NAMESPACE), self._slice(i, addresses))
        self.endpoints[i] = addresses
        self.versions[i] = 0

    def _slice(self, i: int, addresses: list[str], trigger_ns: int | None = None) -> dict:
        meta: dict = {"name": f"svc-{i}", "namespace": NAMESPACE,
                      "labels": {"kubernetes.io/service-name": f"svc-{i}",
                                 "endpointslice.kubernetes.io/managed-by": MANAGED_BY}}
        if trigger_ns is not None:
            meta["annotations"] = {TRIGGER: rfc3339(trigger_ns)}
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": TARGET_PORT, "protocol": self.proto.upper()}],
                "endpoints": [{"addresses": [a], "conditions": {"ready": True, "serving": True,
                                                                "terminating": False}, "nodeName": NODE}
                              for a in addresses]}

    def change(self, i: int) -> Write:
        """Endpoint 0 of Service i moves to an address it never had just
        before (3..31 in its block, in turn: endpoints 1 and 2 are 1 and 2)."""
        self.versions[i] += 1
        addresses = list(self.endpoints[i])
        addresses[0] = backend_ip(i, 3 + self.versions[i] % 29)
        mono, real = time.monotonic_ns(), time.time_ns()
        obj = self.api.request("PUT", Api.path("EndpointSlice", NAMESPACE, f"svc-{i}"),
                               self._slice(i, addresses, real))
        self.endpoints[i] = addresses
        return Write(i, mono, int(obj["metadata"]["resourceVersion"]))

    def bservices(self) -> list[BService]:
        return [BService(i, self.proto, vip(i), SERVICE_PORT, tuple((a, TARGET_PORT) for a in eps))
                for i, eps in sorted(self.endpoints.items())]


def check_served(served: dict, services: list[BService]) -> dict:
    """What the kernel holds against what the API says, for every Service."""
    missing = [s.index for s in services if (s.vip, s.port, s.proto) not in served]
    wrong = [s.index for s in services if (s.vip, s.port, s.proto) in served
             and served[(s.vip, s.port, s.proto)] != set(s.endpoints)]
    return {"services": len(services), "missing": len(missing), "wrong": len(wrong),
            "examples": [f"svc-{i}" for i in (missing + wrong)[:3]]}


# --------------------------------------------------------------------------
# the run


def plan(settings) -> list[str]:
    """The rows' engines, xdplb first."""
    return [XDPLB] + [MODES[m] for m in settings.kube_proxy]


def run(settings, progress: Callable[[str, float], None] | None = None,
        on_row: Callable[[dict], None] | None = None) -> dict:
    """The section; `on_row(section)` after every row (to save what is done)."""
    missing = missing_binaries(binaries=WITH_KUBE_PROXY)
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run `make k8s-bins`")
    progress = progress or (lambda what, units: None)
    counts = sorted(set(settings.kube_services))
    engines = plan(settings)
    workdir = Path(tempfile.mkdtemp(prefix="xdplb-bench-k8s-"))
    section: dict = {"kubernetes": kubernetes_version(), "workdir": str(workdir),
                     "changes": settings.kube_changes, "change_rate": settings.kube_change_rate,
                     "endpoints": ENDPOINTS, "proto": settings.proto, "populate": [], "rows": []}
    with Lab(prefix="xb") as lab:
        ns = lab.netns("api")
        lab.addr(ns, "lo", f"{API_ADDRESS}/32")
        # Not niced: the engines under test would starve it, which an API
        # server on its own machine does not suffer.
        cluster = Cluster(lab, ns, API_ADDRESS, workdir / "cluster", nice=0)
        with contextlib.closing(cluster):
            t0 = time.monotonic()
            cluster.start()
            section["cluster_start_s"] = time.monotonic() - t0
            api = Api(lab, ns, API_ADDRESS, keepalive=True)
            api.trust(cluster.ca_file)
            svcs = BenchServices(api, settings.proto)
            svcs.prepare()
            link = ApiLink(lab, ns, cluster.kubeconfig, workdir)
            for n in counts:
                what = f"real kube-proxy and xdplb at {n} services"
                progress(what, 0)
                section["populate"].append({"services": n, "seconds": svcs.grow(n)})
                for k, name in enumerate(engines):
                    progress(what, (k + 0.1) / len(engines))
                    try:
                        row = _point(settings, name, link, svcs, random.Random(settings.seed + n))
                    except Exception as e:     # keep the others; the table shows it
                        row = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
                    section["rows"].append({"engine": name, "services": n, **row})
                    if on_row:
                        on_row(section)
                progress(what, 1)
    return section


def _point(settings, name: str, link: ApiLink, svcs: BenchServices, rng: random.Random) -> dict:
    services = svcs.bservices()
    sess = Session(settings, name, make=lambda bl: make_real_engine(name, bl, link, len(services) + 64))
    try:
        eng = sess.engine
        sess.allow(services)
        sync = eng.full_sync(services)
        row: dict = {"label": eng.label, "ready_s": sync.seconds, "ready_detail": sync.detail,
                     "served_before": check_served(eng.served(), services), "targets": {}}
        for target, svc in (("last", services[-1]), ("random", services[rng.randrange(len(services))])):
            t = {"service": svc.index, "new": sess.rate(sess.spec(svc, 0))}
            if target == "last":
                t["established"] = sess.rate(sess.spec(svc, settings.established_flows))
            row["targets"][target] = t
        row["changes"] = _changes(eng, svcs, rng, settings.kube_changes, settings.kube_change_rate)
        row["served_after"] = check_served(eng.served(), svcs.bservices())
        row["rss_mb"] = eng.rss_mb()
        return row
    finally:
        sess.close()


def _changes(eng, svcs: BenchServices, rng: random.Random, count: int, rate: float) -> dict:
    """`count` changes paced at `rate` per second (a slow API server makes
    them later, not fewer); per change, write -> programmed."""
    indices = sorted(svcs.endpoints)
    mark = eng.mark()
    writes: list[Write] = []
    t0 = time.monotonic()
    for k in range(count):
        time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        writes.append(svcs.change(rng.choice(indices)))
    took = time.monotonic() - t0
    lat = eng.programmed(mark, writes)
    return {"count": count, "rate_per_s": rate, "achieved_per_s": count / took if took else None,
            "observed": len(lat), "kernel_writes": eng.kernel_writes(mark), **_quantiles(lat)}


# --------------------------------------------------------------------------
# report


def ok_rows(section: dict) -> list[dict]:
    return [r for r in section["rows"] if "error" not in r]


def row_of(section: dict, engine: str, n: int) -> dict | None:
    return next((r for r in ok_rows(section) if r["engine"] == engine and r["services"] == n), None)


def new_mpps(r: dict | None, target: str = "last") -> float | None:
    return r["targets"][target]["new"]["delivered_mpps"] if r else None


def markdown(section: dict, doc: dict | None = None) -> list[str]:
    """The section's table, and when `doc` has the sweep's rows at the same
    counts, each real kube-proxy beside the layout the bench rebuilds of it."""
    lines = ["", f"xdplb beside the real kube-proxy (Kubernetes {section['kubernetes']}), one API server: "
             f"{section['endpoints']} endpoints per Service ({section['proto']}), {section['changes']} endpoint "
             f"changes at {section['change_rate']:g}/s per row. ready: engine start → every Service "
             "forwarded; programmed: API write → the engine's kernel write returned; writes: kernel writes "
             "(kube-proxy's syncs, xdplb's batches) for the changes; ÷ xdplb: the row's p99 over xdplb's "
             "(or xdplb's Mpps over the row's) at the same count; rules: Services the kernel held with their "
             "current endpoints after the changes, of all.", "",
             "| engine | services | ready s | programmed p50 / p99 / max ms (n) | writes | p99 ÷ xdplb "
             "| new flows Mpps last / random | xdplb ÷ row | established Mpps | rules |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        if "error" in r:
            error = " ".join(r["error"].split())[:160]
            lines.append(f"| {r['engine']} | {r['services']} | error: {error} | | | | | | | |")
            continue
        c, x = r["changes"], row_of(section, XDPLB, r["services"])
        prog = (f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f} / {c['max_ms']:.1f} ({c['observed']})"
                if c.get("count") and c["observed"] else "–")
        p99 = "–"
        if x and x is not r and c.get("p99_ms") and x["changes"].get("p99_ms"):
            p99 = f"{c['p99_ms'] / x['changes']['p99_ms']:.0f}×"
        mx, mr = new_mpps(x), new_mpps(r)
        ratio = f"{mx / mr:.1f}×" if x is not r and mx and mr else "–"
        after = r["served_after"]
        held = after["services"] - after["missing"] - after["wrong"]
        lines.append(f"| {r['label']} | {r['services']} | {r['ready_s']:.2f} | {prog} "
                     f"| {c['kernel_writes']['count']} | {p99} | {mr:.4f} / {new_mpps(r, 'random'):.4f} | {ratio} "
                     f"| {r['targets']['last']['established']['delivered_mpps']:.4f} | {held}/{after['services']} |")
    pops = ", ".join(f"{p['services']}: {p['seconds']:.0f} s" for p in section["populate"])
    lines += ["", f"Writing the Services and EndpointSlices through the API (cumulative count: seconds): {pops}."]
    return lines + (_beside_rebuilt(section, doc) if doc else [])


def _beside_rebuilt(section: dict, doc: dict) -> list[str]:
    """Real kube-proxy against the bench's rebuilt layout of it (the sweep's
    row at the same count): new flows to the last Service, start (first
    sync against the rebuilt full restore), one change (API write -> rules
    p50 against the rebuilt update's restore p50)."""
    from .report import mpps, point

    rows = []
    for r in ok_rows(section):
        rebuilt = point(doc, REBUILT.get(r["engine"], ""), r["services"])
        if rebuilt:
            update = rebuilt["operations"]["update"]
            rows.append(f"| {r['label']} | {REBUILT[r['engine']]} | {r['services']} | {new_mpps(r):.4f} / "
                        f"{mpps(rebuilt):.4f} | {r['ready_s']:.2f} / {rebuilt['full_sync_s']:.2f} "
                        f"| {r['changes']['p50_ms']:.0f} / "
                        + (f"{update['p50_ms']:.0f} |" if update.get("count") else "– |"))
    if not rows:
        return []
    return ["", "The real kube-proxy against the bench's rebuilt layout of it (sweep rows above, same run): "
            "new flows to the last Service; start (real: process start → first sync done; rebuilt: the full "
            "restore); one change (real: API write → rules, p50 at the change rate above; rebuilt: one "
            "update's restore, p50).", "",
            "| kube-proxy | rebuilt engine | services | new flows Mpps real / rebuilt | start s real / rebuilt "
            "| change ms real / rebuilt |", "|---|---|---:|---:|---:|---:|", *rows]


def targets(section: dict) -> list[dict]:
    """Issue 15's, at the largest count measured."""
    out: list[dict] = []
    counts = sorted({r["services"] for r in ok_rows(section)})
    if not counts:
        return out
    n = counts[-1]
    x = row_of(section, XDPLB, n)
    if not x:
        return out
    kube = [r for r in ok_rows(section) if r["services"] == n and r["engine"] != XDPLB]
    for r in kube:
        a, b = x["changes"].get("p99_ms"), r["changes"].get("p99_ms")
        if a and b:
            out.append({"target": f"#15: API write → programmed p99 at {n}: xdplb ≤ 1/10 × {r['label']}",
                        "measured": f"1/{b / a:.0f} ({a:.1f} vs {b:.1f} ms)", "met": a * 10 <= b})
    if not kube:
        return out
    slower = all(x["ready_s"] < r["ready_s"] for r in kube)
    out.append({"target": f"#15: cold start with {n} Services: xdplb ≤ 3 s and before kube-proxy's first sync",
                "measured": f"{x['ready_s']:.2f} s; " + ", ".join(
                    f"{r['label']} {r['ready_s']:.2f} s" for r in kube),
                "met": x["ready_s"] <= 3 and slower})
    for r in kube:
        factor = 5 if r["engine"] == MODES["nftables"] else 100
        a, b = new_mpps(x), new_mpps(r)
        if a and b:
            out.append({"target": f"#15: new flows at {n}: xdplb ≥ {factor} × {r['label']}",
                        "measured": f"{a / b:.1f}× ({a:.3f} vs {b:.4f} Mpps)", "met": a / b >= factor})
    return out
