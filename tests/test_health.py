"""Active health checks (lb.health): config, state machine, scheduler, and
end to end: a real daemon probing real backends in the netns lab."""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lb.config import ConfigError, HealthCheck, config_from_dict, config_to_dict
from lb.health import BackendHealth, HealthChecker, Target, probe

ROOT = Path(__file__).resolve().parent.parent


def _cfg(health_check, *, protocol: str = "tcp", backends=None) -> dict:
    return {"interfaces": ["eth0"], "services": [
        {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": protocol,
         "backends": backends or ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
         "health_check": health_check}]}


def _errors(health_check, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(health_check, **kw))
    return e.value.errors


# ---- config ---------------------------------------------------------------


def test_config_defaults_and_round_trip():
    tcp = config_from_dict(_cfg({"type": "tcp"})).services[0].health_check
    assert (tcp.type, tcp.interval, tcp.timeout, tcp.rise, tcp.fall, tcp.port, tcp.path) == \
        ("tcp", 1.0, 0.5, 2, 3, None, None)
    cfg = config_from_dict(_cfg({"type": "HTTP", "path": "/healthz", "port": 8081, "interval": 2}))
    http = cfg.services[0].health_check
    assert (http.type, http.path, http.expect_status, http.port, http.interval) == \
        ("http", "/healthz", 200, 8081, 2.0)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict({k: v for k, v in _cfg(None).items()}).services[0].health_check is None


@pytest.mark.parametrize("check, message", [
    ({"type": "tcp", "interval": 1, "timeout": 1},
     "services[0] 'web': health_check: timeout (1s) must be less than interval (1s)"),
    ({"type": "tcp", "interval": 0}, "services[0] 'web': health_check.interval must be > 0 and <= 3600 (seconds)"),
    ({"type": "tcp", "timeout": -1}, "services[0] 'web': health_check.timeout must be > 0 and <= 3600 (seconds)"),
    ({"type": "tcp", "interval": "1s"}, "services[0] 'web': health_check.interval must be a number"),
    ({"type": "tcp", "rise": 0}, "services[0] 'web': health_check.rise must be in 1..1000"),
    ({"type": "tcp", "fall": 0}, "services[0] 'web': health_check.fall must be in 1..1000"),
    ({"type": "tcp", "port": 70000}, "services[0] 'web': health_check.port must be in 1..65535"),
    ({"type": "http", "path": "healthz"},
     "services[0] 'web': health_check.path must start with '/', not 'healthz'"),
    ({"type": "http", "path": "/a b"},
     "services[0] 'web': health_check.path must not contain spaces or control characters: '/a b'"),
    ({"type": "http", "expect_status": 99}, "services[0] 'web': health_check.expect_status must be in 100..599"),
    ({"type": "tcp", "path": "/x"}, "services[0] 'web': health_check: path only applies to type http"),
    ({"type": "icmp"}, "services[0] 'web': health_check.type must be 'tcp' or 'http'"),
    ({"type": "tcp", "retries": 3}, "services[0] 'web': health_check: unknown key 'retries'"),
    ("tcp", "services[0] 'web': health_check must be a mapping"),
])
def test_config_errors_name_the_service(check, message):
    assert message in _errors(check)


def test_udp_service_needs_a_tcp_port_to_probe():
    assert _errors({"type": "tcp"}, protocol="udp") == [
        "services[0] 'web': health_check: a udp service needs health_check.port (a TCP port to probe)"]
    assert config_from_dict(_cfg({"type": "tcp", "port": 8081}, protocol="udp"))


# ---- state machine ---------------------------------------------------------


def test_state_machine_rise_and_fall():
    h = BackendHealth()
    assert h.up                                       # starts up: a fresh start black-holes nothing
    assert [h.record("refused", rise=2, fall=3) for _ in range(2)] == [False, False] and h.up
    assert not h.record(None, 2, 3) and h.failures == 0 and h.successes == 1   # a pass resets the streak
    assert [h.record("refused", 2, 3) for _ in range(3)] == [False, False, True]
    assert not h.up and h.failures == 3 and h.last_error == "refused"
    assert not h.record("refused", 2, 3)              # already down: no new transition
    assert [h.record(None, 2, 3) for _ in range(2)] == [False, True]
    assert h.up and h.successes == 2 and h.last_error == "refused" and h.probes == 9


# ---- checker logic, with a stub probe (no network) -----------------------------


class StubProbe:
    """Records calls and concurrency; answers from `fail` (keys that fail)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.fail: set[str] = set()
        self.calls: list[tuple[float, str]] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, t: Target) -> str | None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.calls.append((time.monotonic(), t.backend))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return "stub failure" if t.backend in self.fail else None
        finally:
            self.in_flight -= 1


def _many(n: int, interval: float, timeout: float | None = None, per_service: int = 10) -> dict:
    hc = {"type": "tcp", "interval": interval, "timeout": timeout or interval / 2, "rise": 2, "fall": 3}
    services = []
    for s in range(n // per_service):
        services.append({"name": f"s{s}", "vip": f"10.96.{s // 250}.{s % 250 + 1}", "port": 80,
                         "protocol": "tcp", "health_check": hc,
                         "backends": [f"10.{s // 250}.{s % 250}.{b + 1}:8080" for b in range(per_service)]})
    return {"interfaces": ["eth0"], "services": services}


@contextmanager
def running(checker: HealthChecker):
    checker.start()
    try:
        yield checker
    finally:
        checker.stop()


def test_scheduler_bounds_concurrency():
    """400 probes/s wanted, each taking 50 ms: 20 would be in flight; the
    limit is 8, so the checker must never run more than 8 at once."""
    stub = StubProbe(delay=0.05)
    checker = HealthChecker(max_in_flight=8, max_rate=None, probe_fn=stub)
    checker.update(config_from_dict(_many(200, interval=0.5)))
    t0 = time.monotonic()
    with running(checker):
        time.sleep(1.5)
        summary = checker.summary()
        # FIFO backlog: no target starves, every one gets probed.
        _wait(lambda: len({b for _, b in stub.calls}) == 200, 10.0)
        elapsed = time.monotonic() - t0
    assert stub.peak == 8 and checker.peak_in_flight == 8
    assert summary["backlog"] > 0 and summary["lag_s"] > 0      # behind, and it says so
    # Saturated at no more than 8 / 50 ms = 160 probes/s.
    assert len(stub.calls) <= elapsed * 8 / 0.05 + 8


def test_scheduler_caps_the_probe_rate():
    """400 probes/s wanted, 100/s allowed: the checker starts no more than
    that (plus a 50 ms burst), and still gets round to every target."""
    stub = StubProbe()
    checker = HealthChecker(max_rate=100, probe_fn=stub)
    checker.update(config_from_dict(_many(200, interval=0.5)))
    t0 = time.monotonic()
    with running(checker):
        _wait(lambda: len({b for _, b in stub.calls}) == 200, 10.0)
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert checker.summary()["lag_s"] > 0
    assert len(stub.calls) <= elapsed * 100 + 5 + 1
    assert len(stub.calls) >= 0.7 * elapsed * 100          # the cap is a rate, not a stall
    with pytest.raises(ValueError):
        checker.set_limits(0, None)


def test_scheduler_spreads_probes_over_the_interval():
    stub = StubProbe()
    interval = 1.0
    checker = HealthChecker(probe_fn=stub)
    checker.update(config_from_dict(_many(500, interval=interval)))
    t0 = time.monotonic()
    with running(checker):
        time.sleep(2.6)
    first: dict[str, float] = {}
    by_backend = collections.defaultdict(list)
    for t, b in stub.calls:
        first.setdefault(b, t - t0)
        by_backend[b].append(t)
    # Bounds with room for a busy machine (the thread may start late, a
    # probe may be served late): what is checked is the spread and the
    # phase, which an all-at-once or back-to-back scheduler fails anyway.
    assert len(first) == 500 and max(first.values()) < interval + 0.5
    # First probes land evenly over the interval (not all at once): each
    # quarter gets about 125 of 500.
    quarters = collections.Counter(min(3, int(v / interval * 4)) for v in first.values())
    assert all(75 <= quarters[q] <= 175 for q in range(4)), quarters
    # Later probes keep each target's phase: one interval apart.
    gaps = [b - a for times in by_backend.values() for a, b in zip(times, times[1:])]
    assert gaps and all(0.75 * interval <= g <= 2.0 * interval for g in gaps), (min(gaps), max(gaps))
    assert checker.peak_in_flight <= checker.max_in_flight


def test_checker_transitions_and_target_changes():
    stub = StubProbe()
    seen = []
    checker = HealthChecker(on_transition=seen.append, probe_fn=stub)
    d = _cfg({"type": "tcp", "interval": 0.1, "timeout": 0.05, "rise": 2, "fall": 3})
    cfg = config_from_dict(d)
    checker.update(cfg)
    svc = cfg.services[0]
    with running(checker):
        time.sleep(0.25)
        assert checker.states() == {("web", f"10.0.0.{i}:8080"): True for i in (1, 2, 3)}
        stub.fail.add("10.0.0.2:8080")
        _wait(lambda: not checker.states()[("web", "10.0.0.2:8080")], 2.0)
        tr = seen[-1]
        assert (tr.service, tr.backend, tr.up, tr.reason, tr.streak) == \
            ("web", "10.0.0.2:8080", False, "stub failure", 3)
        [bad] = checker.snapshot(unhealthy_only=True)
        assert (bad["service"], bad["backend"], bad["up"], bad["last_error"]) == \
            ("web", "10.0.0.2:8080", False, "stub failure") and bad["failures"] >= 3
        assert len(checker.snapshot()) == 3
        # The data plane's view: the down backend drains, the others stay.
        eff = checker.effective_service(svc)
        assert [b.state for b in eff.backends] == ["active", "draining", "active"]
        assert checker.effective_config(cfg).services[0] == eff
        # A reload with one more backend keeps the down one down; the new one starts up.
        d2 = copy.deepcopy(d)
        d2["services"][0]["backends"].append("10.0.0.4:8080")
        checker.update(config_from_dict(d2))
        assert checker.states()[("web", "10.0.0.2:8080")] is False
        assert checker.states()[("web", "10.0.0.4:8080")] is True
        # A removed backend stops being probed and leaves the state table.
        d3 = copy.deepcopy(d)
        d3["services"][0]["backends"] = ["10.0.0.1:8080", "10.0.0.2:8080"]
        checker.update(config_from_dict(d3))
        time.sleep(0.15)          # a probe in flight at the update may still finish
        mark = len(stub.calls)
        time.sleep(0.4)
        later = {b for _, b in stub.calls[mark:]}
        assert later == {"10.0.0.1:8080", "10.0.0.2:8080"}
        assert set(checker.states()) == {("web", "10.0.0.1:8080"), ("web", "10.0.0.2:8080")}
        # Back up after `rise` passes.
        stub.fail.clear()
        _wait(lambda: checker.states()[("web", "10.0.0.2:8080")], 2.0)
        assert seen[-1].up and seen[-1].streak == 2
        assert checker.effective_service(config_from_dict(d3).services[0]) == config_from_dict(d3).services[0]
        # Every backend down: fail open (keep them all), and say so.
        stub.fail.update({"10.0.0.1:8080", "10.0.0.2:8080"})
        _wait(lambda: not any(checker.states().values()), 2.0)
        svc3 = config_from_dict(d3).services[0]
        assert checker.effective_service(svc3) == svc3
        assert checker.summary()["fail_open"] == ["web"]
        # No health_check any more: nothing probed, nothing tracked.
        d4 = copy.deepcopy(d3)
        del d4["services"][0]["health_check"]
        checker.update(config_from_dict(d4))
        assert checker.states() == {} and checker.summary()["fail_open"] == []


def _wait(cond, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    assert cond(), "condition not met in time"


# ---- the real probe, on loopback --------------------------------------------


class _Status(BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/healthz" else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass        # TCP probes close with RST before sending a request: expected


def _target(port: int, **check) -> Target:
    return Target("web", f"127.0.0.1:{port}", "127.0.0.1", port,
                  HealthCheck.model_validate({"type": "tcp", "timeout": 0.3, **check}))


def test_probe_tcp_and_http_against_real_sockets():
    srv = _QuietServer(("127.0.0.1", 0), _Status)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))         # accepts (backlog), never answers
    with srv, closing(silent), closing(socket.socket()) as unused:
        unused.bind(("127.0.0.1", 0))                       # a port nobody listens on
        port, mute, dead = srv.server_address[1], silent.getsockname()[1], unused.getsockname()[1]
        run = lambda t: asyncio.run(probe(t))               # noqa: E731
        assert run(_target(port)) is None
        assert run(_target(dead)) == "connection refused"
        assert run(_target(port, type="http", path="/healthz")) is None
        assert run(_target(port, type="http", path="/other")) == "HTTP 503, want 200"
        assert run(_target(port, type="http", path="/other", expect_status=503)) is None
        assert run(_target(mute, type="http")) == "http timeout"
        srv.shutdown()


def test_probe_ipv6_backend_from_another_namespace():
    """TCP and HTTP probes of an IPv6 backend over a veth, from the LB's
    namespace (AF_INET6 sockets, nothing resolved beforehand): up, refused,
    the HTTP status checked, and a link gone is a failure."""
    from lb.lab import Lab
    from lbtest import ipv6_pair

    with Lab(prefix="xh6", ipv6=True) as lab_:
        m, p = ipv6_pair(lab_)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        srv = lab_.popen(p, backend_argv("b6", 8080, None) + ["--host", "2001:db8:1::2"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        ready, _, _ = select.select([srv.stdout], [], [], 10)
        assert ready and srv.stdout.readline() == b"ready\n"

        def target(port: int, **check) -> Target:
            return Target("web", f"[2001:db8:1::2]:{port}", "2001:db8:1::2", port,
                          HealthCheck.model_validate({"type": "tcp", "timeout": 0.4, **check}))

        with lab_.inside(m):
            run = lambda t: asyncio.run(probe(t))           # noqa: E731
            assert run(target(8080)) is None
            assert run(target(8081)) == "connection refused"
            assert run(target(8080, type="http", path="/")) is None
            assert run(target(8080, type="http", path="/nope")) == "HTTP 404, want 200"
            lab_.run(p, ["ip", "link", "set", "a1", "down"])
            assert run(target(8080)) in ("connect timeout", "connect error: no route to host")


def test_dsr_probes_to_an_ipv6_backend_go_through_its_tunnel(bpf_object):
    """DSR health probes of an IPv6 backend running the project's
    decapsulation: a SYN to the VIP in IPv6-in-IPv6 (ipip), in GUE over
    IPv6, and an IPv4 VIP's SYN in IPv6 (ipip), each answered with a
    SYN-ACK from the VIP straight to the LB; a closed port is refused; once
    the decapsulation is detached, every probe fails though the backend's
    own address still accepts connections."""
    from lb.lab import REPO_ROOT, Lab
    from lb.tunnel_probe import syn_through_tunnel
    from lbtest import ipv6_pair, pin_dir

    vip6, vip4, backend = "2001:db8:96::a", "10.96.9.9", "2001:db8:1::2"
    with Lab(prefix="xt6", ipv6=True) as lab_:
        m, p = ipv6_pair(lab_)
        lab_.route(m, "10.96.9.0/24", gateway="10.70.0.2")   # the IPv4 VIP's probe source: 10.70.0.1
        pins = pin_dir()

        def backend_cli(*args: str) -> None:
            lab_.run(p, [sys.executable, "-m", "lb.cli", "backend", *args, "--bpffs", pins],
                     timeout=60, check=True, cwd=REPO_ROOT)

        backend_cli("attach", "a1", f"--vip={vip6}", f"--vip={vip4}")
        try:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            srv = lab_.popen(p, backend_argv("b6", 8080, None) + ["--host", "::"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
            ready, _, _ = select.select([srv.stdout], [], [], 10)
            assert ready and srv.stdout.readline() == b"ready\n"

            def run(vip: str, port: int, mode: str) -> str | None:
                with lab_.inside(m):
                    return asyncio.run(syn_through_tunnel(backend, vip, port, mode, 6080, 1.0))

            assert run(vip6, 8080, "ipip") is None
            assert run(vip6, 8080, "gue") is None
            assert run(vip4, 8080, "ipip") is None
            assert run(vip6, 8081, "ipip") == "connection refused"
            backend_cli("detach", "a1")
            assert re.search("protocol unreachable|timeout", run(vip6, 8080, "ipip"))
            assert re.search("port unreachable|timeout", run(vip6, 8080, "gue"))
            with lab_.inside(m):
                plain = Target("web", f"[{backend}]:8080", backend, 8080,
                               HealthCheck.model_validate({"type": "tcp", "timeout": 0.4}))
                assert asyncio.run(probe(plain)) is None
        finally:
            backend_cli("detach", "a1", "--purge")


# ---- end to end: the real daemon in the lab ---------------------------------

from lb.dataplane import Dataplane  # noqa: E402
from lb.demo import WEB_VIP, DaemonProcess, curl_many, lab_config  # noqa: E402
from lb.lab import backend_argv  # noqa: E402
from lbtest import pin_dir  # noqa: E402

HC_PORT = 8081                 # the health listener, separate from the service's 8080
INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.25, 2, 3
# Slack on top of fall x interval (rise x interval): the probe in flight,
# the apply, and this test's 50 ms status polling.
MARGIN = 0.75


def start_server(lab_, ns: str, name: str, port: int, udp_port: int | None = None) -> subprocess.Popen:
    """lb.backend_server in `ns`; returns once it listens."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = lab_.popen(ns, backend_argv(name, port, udp_port), stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    ready, _, _ = select.select([p.stdout], [], [], 10)
    assert ready and p.stdout.readline() == b"ready\n", f"{name} on {port} did not start"
    return p


def stop_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


@pytest.fixture
def health_daemon(lab, bpf_object, tmp_path):
    """Start `xdplb run` with a health_check on `web`; always stop and detach."""
    lab_, topo = lab
    started = []

    def start(health_check: dict) -> DaemonProcess:
        cfg = lab_config(topo, fillers=0, bpffs=pin_dir(),
                         socket=f"/run/xdplb/test-health-{os.getpid()}-{len(started)}.sock")
        cfg["services"][0]["health_check"] = health_check
        d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
        started.append(d)
        d.start()
        _wait(lambda: all(b["successes"] >= 1 for b in health(d)), 10)    # probes really pass
        return d

    yield start
    for d in started:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(d.config["bpffs"]), purge=True)


def health(d: DaemonProcess) -> list[dict]:
    return d.call("status")["health"]["backends"]


def entry(d: DaemonProcess, ip: str) -> dict:
    return next(b for b in health(d) if b["backend"] == f"{ip}:8080")


def xdplb(d: DaemonProcess, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, *args],
                          capture_output=True, text=True, cwd=ROOT, check=True, timeout=60).stdout


def wait_rotation(d: DaemonProcess, ip: str, up: bool, limit: float) -> float:
    """Seconds until `ip`'s web backend is `up` per its checks *and* in (or
    out of) the Maglev table; fails after `limit` + 5 s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit + 5:
        e = entry(d, ip)
        if e["up"] is up and e["in_rotation"] is up:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{ip} not {'up' if up else 'down'} after {limit + 5}s: {entry(d, ip)}")


def _download(lab_, topo, url: str, result: dict) -> threading.Thread:
    def run():
        p = lab_.run(topo.client_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
                                      "--max-time", "40", url], timeout=50, check=False)
        result["out"] = p.stdout
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def health_listeners(lab):
    """An HTTP health endpoint on :8081 in every backend, separate from the
    service on :8080, so a test can fail a backend's checks while its
    service port keeps serving the flows it already has."""
    lab_, topo = lab
    procs = {b.ip: start_server(lab_, b.ns, f"hc-{b.name}", HC_PORT) for b in topo.backends}
    yield procs
    for p in procs.values():
        stop_server(p)


def test_unhealthy_backend_drains_and_returns(lab, health_daemon, health_listeners, tmp_path):
    lab_, topo = lab
    names = {b.ip: b.name for b in topo.backends}
    d = health_daemon({"type": "http", "path": "/", "port": HC_PORT, "interval": INTERVAL,
                       "timeout": TIMEOUT, "rise": RISE, "fall": FALL})
    # A long download (4 s); find the backend it landed on from the counters.
    n = 3_000_000
    result: dict = {}
    t = _download(lab_, topo, f"http://{WEB_VIP}/bytes?n={n}&rate=750000", result)
    time.sleep(0.8)
    web = next(s for s in d.call("stats")["services"] if s["name"] == "web")
    busy = max(web["backends"], key=lambda b: b["packets"])["address"]

    # Its health endpoint dies (the service port keeps serving).
    stop_server(health_listeners[busy])
    took = wait_rotation(d, busy, up=False, limit=FALL * INTERVAL + MARGIN)
    assert took <= FALL * INTERVAL + MARGIN, took
    e = entry(d, busy)
    assert e["failures"] >= FALL and e["last_error"] == "connection refused"
    # From now on no new flow goes to it, and none fails.
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 60, topo.client_ip)
    assert len(answers) == 60 and names[busy] not in answers, collections.Counter(answers)
    st = json.loads(xdplb(d, "stats", "--json"))
    b = next(x for s in st["services"] if s["name"] == "web" for x in s["backends"] if x["address"] == busy)
    assert (b["state"], b["health"]) == ("draining", "down")
    status = json.loads(xdplb(d, "status", "--json"))["health"]
    assert (status["checked"], status["down"]) == (3, 1) and len(status["backends"]) == 3
    assert [b["backend"] for b in d.call("status", health_backends="unhealthy")["health"]["backends"]] \
        == [f"{busy}:8080"]
    assert "down" in xdplb(d, "status")              # the table shows it too
    # The flow it already held drains: every byte arrives.
    t.join(60)
    assert result["out"] == f"{n} 200", result

    # A reload (SIGHUP, new config) keeps it out until it rises.
    cfg = yaml.safe_load(d.path.read_text())
    cfg["services"].append({"name": "extra", "vip": "10.96.2.2", "port": 80, "protocol": "tcp",
                            "backends": [f"{topo.backends[0].ip}:8080"]})
    d.path.write_text(yaml.safe_dump(cfg))
    gen = d.call("status")["generation"]
    d.proc.send_signal(signal.SIGHUP)
    _wait(lambda: d.call("status")["generation"] > gen, 20)
    assert entry(d, busy)["in_rotation"] is False and entry(d, busy)["up"] is False
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 30, topo.client_ip)
    assert len(answers) == 30 and names[busy] not in answers

    # The health endpoint returns: back in rotation after `rise` passes.
    health_listeners[busy] = start_server(lab_, next(x.ns for x in topo.backends if x.ip == busy),
                                          f"hc-{names[busy]}", HC_PORT)
    took = wait_rotation(d, busy, up=True, limit=RISE * INTERVAL + MARGIN)
    assert took <= RISE * INTERVAL + MARGIN, took
    assert entry(d, busy)["successes"] >= RISE
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 60, topo.client_ip)
    assert len(answers) == 60 and names[busy] in answers, collections.Counter(answers)
    assert "backend down service=web backend=" + f"{busy}:8080" in d.log.read_text()


def test_killed_backend_is_taken_out_and_comes_back(lab, health_daemon, tmp_path):
    """A TCP check on the service port itself; the backend's real server is
    killed, then the backend is removed from and re-added to the config."""
    lab_, topo = lab
    victim = topo.backends[2]
    d = health_daemon({"type": "tcp", "interval": INTERVAL, "timeout": TIMEOUT,
                       "rise": RISE, "fall": FALL})
    server = next(p for p in lab_.processes
                  if p.poll() is None and p.args[-4:] == ["--port", "8080", "--udp-port", "9090"]
                  and victim.name in p.args)
    try:
        stop_server(server)
        took = wait_rotation(d, victim.ip, up=False, limit=FALL * INTERVAL + MARGIN)
        assert took <= FALL * INTERVAL + MARGIN, took
        answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 60, topo.client_ip)
        assert len(answers) == 60 and victim.name not in answers, collections.Counter(answers)

        # A daemon restart (kill -9, start on the same pins) keeps it out:
        # it has to rise before it takes new flows again.
        d.kill(signal.SIGKILL)
        d.start()
        e = entry(d, victim.ip)
        assert e["up"] is False and e["in_rotation"] is False, e
        answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 30, topo.client_ip)
        assert len(answers) == 30 and victim.name not in answers, collections.Counter(answers)

        # Removed from the config: no longer probed (nor tracked).
        cfg = copy.deepcopy(d.config)
        cfg["services"][0]["backends"] = [f"{b.ip}:8080" for b in topo.backends[:2]]
        path = tmp_path / "two.yaml"
        path.write_text(yaml.safe_dump(cfg))
        xdplb(d, "apply", "-f", str(path))
        assert {b["backend"] for b in health(d)} == {f"{b.ip}:8080" for b in topo.backends[:2]}
    finally:
        server = start_server(lab_, victim.ns, victim.name, topo.backend_port, topo.udp_port)
    # Re-added (its server back): probed again, starts up, takes new flows.
    path.write_text(yaml.safe_dump(d.config))
    xdplb(d, "apply", "-f", str(path))
    e = entry(d, victim.ip)
    assert e["up"] and e["in_rotation"]
    time.sleep(RISE * INTERVAL + 0.2)
    assert entry(d, victim.ip)["successes"] >= 1
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 60, topo.client_ip)
    assert len(answers) == 60 and victim.name in answers, collections.Counter(answers)
