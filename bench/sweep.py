"""The sweep: every engine on a fresh gen -> lb -> sink lab, at every service
count, the same traffic and the same control-plane operations.

Per engine and service count N (3 endpoints each by default):
- full sync time (and the kernel memory it holds);
- delivered Mpps, new flows and established flows, to the last service
  (the worst case for a rule list) and to a random one, with the sink
  checking every packet's backend;
- xdplb and the bare forwarder: program ns/packet from run statistics under
  load, and from test-run (repeat=1 per call) next to the empty program's;
- single-service add, update (one endpoint replaced) and delete latency;
- time from the add call until the sink sees the new service's first packet;
- conntrack settings and statistics of every kernel-path run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lb.lab import Lab, cleanup_stale

from . import lab as blab
from . import memcg
from . import profile as prof
from . import traffic
from .engines import (BService, Engine, ForwarderEngine, make_engine, make_service, make_services,
                      replace_endpoint)
from .progs import Forwarder, Generator, Sink, build

FULL_SERVICES = [1, 1000, 5000, 10000, 20000]
QUICK_SERVICES = [1, 5000]
ALL_ENGINES = ["xdplb", "nftables", "iptables-nft", "iptables-legacy"]
QUICK_ENGINES = ["xdplb", "iptables-legacy"]


@dataclass
class Settings:
    services: list[int] = field(default_factory=lambda: list(FULL_SERVICES))
    engines: list[str] = field(default_factory=lambda: list(ALL_ENGINES))
    endpoints: int = 3
    profile: str = "udp_flows"
    proto: str = "udp"
    seconds: float = 1.5            # per rate run
    load_seconds: float = 1.0       # per run-statistics run
    testrun_calls: int = 5000
    ops: int = 100                  # per kind (add, update, delete)
    ops_budget_s: float = 24.0      # per engine and N for add + update (deletes undo the adds)
    first_packet_reps: int = 3
    probe_interval_us: float = 100.0
    established_flows: int = 1024
    window: int = 256
    targets: tuple[str, ...] = ("last", "random")
    trex_client: str = "auto"       # how profiles are evaluated: auto | trex | stand-in
    seed: int = 1
    big_sync: tuple[int, int] | None = (20000, 10)    # xdplb full sync of N x backends
    state_floor: bool = True        # also measure bench/bpf/fwd.c state_main
    conntrack: blab.ConntrackSettings = field(default_factory=blab.ConntrackSettings)
    sweep: bool = True              # False: only the comparison with Katran (bench/versus.py)
    versus: bool = False            # the comparison even without a Katran object (xdplb rows only)
    katran_objects: list[Path] = field(default_factory=list)    # Katran's balancer.bpf.o builds
    versus_backends: int = 10
    versus_rounds: int = 3
    versus_seconds: float = 2.0     # per window (new flows, established), per round and row
    kube_proxy: list[str] = field(default_factory=list)   # real kube-proxy modes beside xdplb (bench/kubeproxy_versus.py)
    kube_services: list[int] = field(default_factory=lambda: [1000, 5000, 10000, 20000])
    kube_changes: int = 1000        # endpoint changes per row
    kube_change_rate: float = 100.0     # per second

    @classmethod
    def quick(cls) -> "Settings":
        return cls(services=list(QUICK_SERVICES), engines=list(QUICK_ENGINES), seconds=1.0,
                   load_seconds=0.5, testrun_calls=2000, ops=20, ops_budget_s=15.0,
                   first_packet_reps=1, targets=("last",), big_sync=None, state_floor=False)


Progress = Callable[[str, float], None]      # (what, units of work done)


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    return {"count": len(v), "p50_ms": 1e3 * q(0.5), "p99_ms": 1e3 * q(0.99),
            "max_ms": 1e3 * v[-1], "mean_ms": 1e3 * statistics.fmean(v)}


class Session:
    """One engine on its own lab, with generator and sink; `make` builds an
    engine that needs more than the lab (bench/kubeproxy_real.py's)."""

    def __init__(self, settings: Settings, engine: str,
                 make: Callable[[blab.BenchLab], Engine] | None = None) -> None:
        self.s = settings
        self.lab = Lab(prefix="xb")
        self.stack = contextlib.ExitStack()
        self.stack.callback(self.lab.close)
        try:
            self.bl = blab.build(self.lab)
            self.gen = self.stack.enter_context(Generator())
            self.sink = self.stack.enter_context(Sink(self.gen))
            with self.bl.inside(self.bl.sink_ns):
                self.sink.attach(self.bl.s0)
            self.engine: Engine = make(self.bl) if make else make_engine(engine, self.bl)
            if self.engine.transmits_back:
                with self.bl.inside(self.bl.gen_ns):
                    self.sink.attach(self.bl.g0)
            self.stack.callback(self.engine.close)
            self.engine.attach()
            self.configure_sink()
            self.ct = self.stack.enter_context(blab.pinned_conntrack(self.bl, settings.conntrack)) \
                if self.engine.kernel_path else None
        except BaseException:
            self.stack.close()
            raise
        self.profiles_api = ""

    def close(self) -> None:
        self.stack.close()

    def configure_sink(self, watch_stamp: int = 0) -> None:
        e = self.engine
        self.sink.configure(check=e.name not in ForwarderEngine.PROGRAMS,     # they don't balance
                            watch_stamp=watch_stamp, encapsulated=e.encapsulates, gue_port=e.gue_port)

    def spec(self, svc: BService, flows: int) -> prof.GenSpec:
        spec, api, _ = prof.load(self.s.profile, {
            "vip": svc.vip, "port": svc.port, "stamp": svc.stamp, "src_mac": self.bl.g0_mac,
            "dst_mac": self.bl.l0_mac, "flows": flows}, client=self.s.trex_client)
        self.profiles_api = api
        return spec

    def allow(self, services: list[BService]) -> None:
        self.sink.clear_allowed()
        self.sink.allow([d for s in services for d in self.engine.deliveries(s)])

    # -- data plane -------------------------------------------------------

    def rate(self, spec: prof.GenSpec) -> dict:
        kernel = self.engine.kernel_path
        if kernel:
            blab.conntrack_flush(self.bl)
            before = blab.conntrack_stats(self.bl)
        r = traffic.send_for(self.bl, self.gen, self.sink, spec, self.s.seconds, window=self.s.window)
        out = r.as_dict()
        if kernel:
            out["conntrack"] = blab.stats_delta(before, blab.conntrack_stats(self.bl))
            blab.conntrack_flush(self.bl)
        return out

    def program_cost(self, spec_new: prof.GenSpec, spec_est: prof.GenSpec, floor_fd: int) -> dict:
        fd = self.engine.program_fd()
        if fd is None:
            return {}
        fds = {"engine": fd, "sink": self.sink.prog.fd, "generator": self.gen.prog.fd}
        out = {}
        for kind, spec in (("new", spec_new), ("established", spec_est)):
            load = traffic.program_ns_under_load(self.bl, self.gen, self.sink, spec, fds,
                                                 self.s.load_seconds)
            out[f"{kind}_load_ns"] = load["engine"]["ns_per_packet"]
            out[f"{kind}_load_runs"] = load["engine"]["runs"]
            out[f"{kind}_sink_load_ns"] = load["sink"]["ns_per_packet"]
            out[f"{kind}_testrun_ns"] = traffic.testrun_ns(self.bl, fd, spec, self.s.testrun_calls,
                                                           new_flows=kind == "new")
        out["testrun_floor_ns"] = traffic.testrun_ns(self.bl, floor_fd, spec_est,
                                                     self.s.testrun_calls, new_flows=False)
        return out

    # -- control plane ----------------------------------------------------

    def operations(self, services: list[BService], rng: random.Random) -> dict:
        """add / update / delete latency: `ops` of each, or as many adds and
        updates as fit in half of the budget each. Every added service is
        deleted again (timed: the deletes)."""
        n = len(services)
        half = self.s.ops_budget_s / 2
        res: dict[str, list[float]] = {"add": [], "update": [], "delete": []}
        added: list[BService] = []
        end = time.perf_counter() + half
        for k in range(self.s.ops):
            if k and time.perf_counter() > end:
                break
            s = make_service(n + 1 + k, self.s.endpoints, self.s.proto)
            res["add"].append(self.engine.add(s))
            added.append(s)
        current = {s.index: s for s in services}
        end = time.perf_counter() + half
        for k in range(self.s.ops):
            if k and time.perf_counter() > end:
                break
            i = rng.randrange(n)
            new = replace_endpoint(current[i], k)
            res["update"].append(self.engine.update(current[i], new))
            current[i] = new
        for s in added:
            res["delete"].append(self.engine.delete(s))
        out = {k: _quantiles(v) for k, v in res.items()}
        out["budget_s"] = self.s.ops_budget_s
        return out

    def first_packet(self, n: int, rep: int) -> dict:
        """Add a new service while a probe sends to it every ~100 us; the
        time from the call until the sink sees its first packet at one of
        its backends."""
        svc = make_service(n + 1000 + rep, self.s.endpoints, self.s.proto)
        self.sink.allow(self.engine.deliveries(svc))
        self.configure_sink(watch_stamp=svc.stamp)
        spec = self.spec(svc, flows=0)
        frames = [spec.expected(50_000_000 + rep * 10_000 + k) for k in range(4096)]
        out: dict = {}
        try:
            with traffic.probe_sender(self.bl, frames, self.s.probe_interval_us * 1e-6):
                time.sleep(0.05)
                early = self.sink.watch_first_ns()
                t0 = time.monotonic_ns()          # the clock of bpf_ktime_get_ns()
                call = self.engine.add(svc)
                deadline = time.monotonic() + 10
                first = 0
                while time.monotonic() < deadline:
                    first = self.sink.watch_first_ns()
                    if first:
                        break
                    time.sleep(0.0002)
            out = {"call_ms": 1e3 * call, "first_packet_ms": (first - t0) / 1e6 if first else None,
                   "before_add": bool(early), "probe_interval_us": self.s.probe_interval_us}
        finally:
            self.configure_sink()
            self.engine.delete(svc)
        return out


def machine_info() -> dict:
    def cmd(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    repo = Path(__file__).resolve().parent.parent
    return {
        "hostname": platform.node(), "kernel": platform.release(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "cpu_model": cpu, "memory": mem,
        "python": platform.python_version(), "loadavg_start": os.getloadavg(),
        "versions": {"iptables-legacy": cmd(["iptables-legacy", "--version"]),
                     "iptables-nft": cmd(["iptables-nft", "--version"]),
                     "nft": cmd(["nft", "--version"]), "clang": cmd(["clang", "--version"]),
                     "xdplb_commit": cmd(["git", "-C", str(repo), "describe", "--always", "--dirty"])},
    }


def run(settings: Settings, progress: Progress | None = None,
        partial: Callable[[dict], None] | None = None) -> dict:
    """The whole sweep; returns the result document (see README "Benchmarks").
    `partial(doc)` is called after every point (to save what is done)."""
    build()
    memcg.cleanup_stale()
    cleanup_stale("xb")             # labs of benchmark runs that were killed
    progress = progress or (lambda what, units: None)
    rng = random.Random(settings.seed)
    doc: dict = {"schema": 1, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine_info(), "settings": _settings_dict(settings),
                 "lab_limit": {}, "results": [], "targets_big_sync": None}
    t_start = time.perf_counter()

    if settings.katran_objects or settings.versus:
        from . import versus

        progress("xdplb beside Katran", 0)
        doc["versus"] = versus.run(settings, progress)
        progress("xdplb beside Katran", 1)
        if partial:
            partial(doc)
    if settings.kube_proxy:
        from . import kubeproxy_versus

        doc["kube_proxy"] = kubeproxy_versus.run(
            settings, progress, on_row=lambda section: partial(doc | {"kube_proxy": section}) if partial else None)
        if partial:
            partial(doc)
    if not settings.sweep:
        return _finish(doc, t_start)

    # The lab's limit: the bare forwarder, and the test-run floor. Then the
    # least any forwarder with an LRU conntrack costs (state-floor).
    for engine, key in (("forwarder", "lab_limit"), ("state-floor", "state_floor")):
        if engine == "state-floor" and not settings.state_floor:
            continue
        progress(f"{engine} (lab limit)", 0)
        doc[key] = _lab_limit(settings, engine, doc)
        progress(f"{engine} (lab limit)", 1)

    for engine in settings.engines:
        sess = Session(settings, engine)
        try:
            doc["conntrack_settings"] = sess.ct or doc.get("conntrack_settings")
            floor = Forwarder("empty_main")
            try:
                for n in settings.services:
                    progress(f"{engine} at {n} services", 0)
                    try:
                        doc["results"].append(_point(sess, n, rng, floor.prog.fd, progress, engine))
                    except Exception as e:     # keep the rest of the sweep; the gate fails on it
                        doc["results"].append({"engine": engine, "services": n,
                                               "error": f"{type(e).__name__}: {e}"[:2000]})
                        with contextlib.suppress(Exception):
                            sess.engine.clear()
                    if partial:
                        partial(doc)
            finally:
                floor.close()
        finally:
            sess.close()

    if settings.big_sync and "xdplb" in settings.engines:
        n, b = settings.big_sync
        progress(f"xdplb full sync {n} x {b}", 0)
        doc["targets_big_sync"] = big_sync(settings, n, b)
        progress(f"xdplb full sync {n} x {b}", 1)
    return _finish(doc, t_start)


def _finish(doc: dict, t_start: float) -> dict:
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["duration_s"] = round(time.perf_counter() - t_start, 1)
    return doc


def _lab_limit(settings: Settings, engine: str, doc: dict) -> dict:
    sess = Session(settings, engine)
    try:
        svc = make_service(0, settings.endpoints, settings.proto)
        spec_new, spec_est = sess.spec(svc, 0), sess.spec(svc, settings.established_flows)
        floor = Forwarder("empty_main")
        try:
            out = {"engine": engine, "new": sess.rate(spec_new), "established": sess.rate(spec_est),
                   **sess.program_cost(spec_new, spec_est, floor.prog.fd)}
        finally:
            floor.close()
        doc["settings"]["profile_api"] = sess.profiles_api
        return out
    finally:
        sess.close()


def _point(sess: Session, n: int, rng: random.Random, floor_fd: int, progress: Progress,
           engine: str) -> dict:
    s = sess.s
    services = make_services(n, s.endpoints, s.proto)
    sess.allow(services)
    sync = sess.engine.full_sync(services)
    progress(f"{engine} at {n} services", 0.2)
    point: dict = {"engine": engine, "services": n, "endpoints": s.endpoints,
                   "full_sync_s": sync.seconds, "sync_detail": sync.detail,
                   "memory": sess.engine.memory(), "targets": {}}
    targets = {"last": services[-1], "random": services[rng.randrange(n)]}
    for name in s.targets:
        svc = targets[name]
        spec_new, spec_est = sess.spec(svc, 0), sess.spec(svc, s.established_flows)
        t = {"service": svc.index, "new": sess.rate(spec_new)}
        if name == "last":      # established flows skip the rules: the last service is enough
            t["established"] = sess.rate(spec_est)
            t.update(sess.program_cost(spec_new, spec_est, floor_fd))
        point["targets"][name] = t
    progress(f"{engine} at {n} services", 0.5)
    point["operations"] = sess.operations(services, rng)
    progress(f"{engine} at {n} services", 0.8)
    point["first_packet"] = [sess.first_packet(n, k) for k in range(s.first_packet_reps)]
    sess.engine.clear()
    progress(f"{engine} at {n} services", 1)
    return point


def big_sync(settings: Settings, n: int, backends: int) -> dict:
    """xdplb only: full sync of n services x `backends` (Maglev included),
    and the map memory per service with its Maglev balance."""
    with Lab(prefix="xb") as lab:
        bl = blab.build(lab)
        eng = make_engine("xdplb", bl)
        try:
            services = make_services(n, backends, settings.proto)
            r = eng.full_sync(services)
            mem = eng.memory()
        finally:
            eng.close()
    return {"services": n, "backends": backends, "full_sync_s": r.seconds, "detail": r.detail,
            "memory": mem}


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["conntrack"] = asdict(s.conntrack)
    d["katran_objects"] = [str(p) for p in s.katran_objects]
    return d
