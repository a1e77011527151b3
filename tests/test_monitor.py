"""`xdplb monitor`: flow events from the kernel's ring buffer.

End to end with the real daemon, real curl and a real monitor process, and
through BPF test-run for what needs exact numbers: the per-CPU rate limit,
1-in-N sampling of new flows, and the dry-run copy staying silent."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from lb import monitor
from lb.config import ConfigError, config_from_dict
from lb.dataplane import Dataplane
from lb.demo import UDP_VIP, WEB_VIP, DaemonProcess, lab_config
from lbtest import XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, Harness, pin_dir, tcp, udp
from loader import RingBuffer
from loader.testrun import test_run

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "10.1.0.10"
DENIED = "192.0.2.10"
FORWARD = (XDP_TX, XDP_REDIRECT, XDP_PASS)


# -- helpers ----------------------------------------------------------------------


@contextlib.contextmanager
def one_cpu():
    """Pin this thread to one CPU: the token bucket is per CPU, so the
    bounds below hold exactly only if every test-run lands on the same one."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


class Events:
    """The harness's ring, drained into decoded events."""

    def __init__(self, h: Harness):
        self.h = h
        self.raw: list = []
        self.ring = RingBuffer(h.dp.maps["events"], self.raw.append,
                               record_type=h.dp.obj.layouts.struct("flow_event"))
        self.decoder = monitor.Decoder(h.dp.consts)

    def drain(self) -> list[monitor.FlowEvent]:
        self.ring.consume()
        names = monitor.Names.from_api(monitor.names(self.h.cfg, self.h.rec))
        out = [self.decoder.decode(r, names) for r in self.raw]
        self.raw.clear()
        return out

    def close(self) -> None:
        self.ring.close()


def global_count(h: Harness, name: str) -> int:
    return h.counters("global_stats", getattr(h.dp.consts, name))[0]


def harness(lab, topo, **mon) -> Harness:
    cfg = lab_config(topo, fillers=0, bpffs="/unused", socket=f"/run/xdplb/test-{os.getpid()}.sock")
    if mon:
        cfg["monitor"] = mon
    return Harness(lab, topo, cfg, attach=False)


def run_many(h: Harness, pkt, repeat: int = 1) -> tuple[int, float]:
    """test-run `pkt` `repeat` times back to back, as arriving on l0."""
    with h.lab.inside(h.topo.lb_ns):
        ifindex = h.lab.ifindex(h.topo.lb_ns, "l0")
        t0 = time.monotonic()
        res = test_run(h.dp.prog.fd, bytes(pkt), repeat=repeat, ingress_ifindex=ifindex)
        return res.retval, time.monotonic() - t0


# -- kernel side, through test-run --------------------------------------------


def test_rate_limit_bounds_events_and_counts_the_rest(lab, bpf_object):
    lab_, topo = lab
    rate, burst, n = 50, 20, 1000
    with harness(lab_, topo, events_per_second=rate, burst=burst) as h:
        ev = Events(h)
        dropped0 = h.drop_count("policy")
        with one_cpu():
            rc, elapsed = run_many(h, tcp(DENIED, 5511, WEB_VIP, 80), repeat=n)
            first = ev.drain()
            # A quiet spell refills the bucket, up to `burst` and no more.
            time.sleep(0.5)
            rc2, elapsed2 = run_many(h, tcp(DENIED, 5511, WEB_VIP, 80), repeat=n)
            second = ev.drain()
        # The data path is unaffected: every packet was dropped and counted.
        assert rc == rc2 == XDP_DROP
        assert h.drop_count("policy") - dropped0 == 2 * n
        # A fresh bucket starts full; then one event per 1/rate seconds.
        assert burst <= len(first) <= burst + rate * elapsed + 1, (len(first), elapsed)
        assert burst <= len(second) <= burst + rate * elapsed2 + 1, (len(second), elapsed2)
        # Everything not delivered is accounted for, nothing twice.
        delivered = len(first) + len(second)
        assert global_count(h, "CNT_EVENTS") == delivered
        assert global_count(h, "CNT_EVENTS_LOST") == 2 * n - delivered
        # What an event says, and how the CLI prints it.
        e = first[0]
        assert (e.verdict, e.reason, e.identity, e.service) == ("DROPPED", "policy", "blocked", "web")
        assert (e.src, e.sport, e.dst, e.dport, e.proto) == (DENIED, 5511, WEB_VIP, 80, "tcp")
        assert e.backend is None and e.ifindex == lab_.ifindex(topo.lb_ns, "l0")
        assert e.line() == f"(blocked) {DENIED}:5511 => web {WEB_VIP}:80 tcp DROPPED policy"
        ev.close()


def test_new_flows_are_sampled_and_name_the_backend_they_reached(lab, bpf_object):
    lab_, topo = lab
    with harness(lab_, topo, events_per_second=100000, burst=1000, sample_forwarded=4) as h:
        ev = Events(h)
        reached = {}
        with one_cpu():
            for sport in range(42000, 42040):
                rc, out = h.run(tcp(CLIENT, sport, WEB_VIP, 80))
                assert rc in FORWARD
                reached[sport] = f"{out[IP].dst}:{out[TCP].dport}"
            events = ev.drain()
            # Established packets of the same flows make no events.
            for sport in range(42000, 42040):
                assert h.run(tcp(CLIENT, sport, WEB_VIP, 80, flags="A"))[0] in FORWARD
            later = ev.drain()
        assert len(events) == 40 // 4          # one new flow in 4, on one CPU
        assert later == []
        for e in events:
            assert (e.verdict, e.reason, e.identity, e.service) == ("FORWARDED", None, "frontend", "web")
            assert e.backend == reached[e.sport]
            assert e.line() == \
                f"(frontend) {CLIENT}:{e.sport} => web {WEB_VIP}:80 -> {e.backend} tcp FORWARDED"
        # Sampled-out flows are not losses.
        assert global_count(h, "CNT_EVENTS") == 10 and global_count(h, "CNT_EVENTS_LOST") == 0
        ev.close()


def test_dry_run_copy_emits_nothing(lab, bpf_object):
    lab_, topo = lab
    with harness(lab_, topo) as h:
        ev = Events(h)
        dry = Dataplane.open(h.cfg, dry_run=True, share_with=h.dp)
        try:
            with lab_.inside(topo.lb_ns):
                ifindex = lab_.ifindex(topo.lb_ns, "l0")
                for pkt in (tcp(DENIED, 5000, WEB_VIP, 80), tcp(CLIENT, 5001, WEB_VIP, 80),
                            tcp(CLIENT, 5002, WEB_VIP, 81)):
                    test_run(dry.prog.fd, bytes(pkt), ingress_ifindex=ifindex)
        finally:
            dry.close()
        assert ev.drain() == []
        assert global_count(h, "CNT_EVENTS") == global_count(h, "CNT_EVENTS_LOST") == 0
        # The live copy, same maps, same packet: an event.
        assert h.run(tcp(DENIED, 5000, WEB_VIP, 80))[0] == XDP_DROP
        assert [e.reason for e in ev.drain()] == ["policy"]
        ev.close()


def test_events_off_then_on_through_apply(lab, bpf_object):
    lab_, topo = lab
    with harness(lab_, topo, events_per_second=0) as h:
        ev = Events(h)
        assert h.run(tcp(DENIED, 6000, WEB_VIP, 80))[0] == XDP_DROP
        assert h.run(tcp(CLIENT, 6001, WEB_VIP, 80))[0] in FORWARD
        assert ev.drain() == []
        assert global_count(h, "CNT_EVENTS") == global_count(h, "CNT_EVENTS_LOST") == 0
        cfg = h.edit()
        cfg["monitor"] = {"events_per_second": 10}
        h.apply(cfg)                       # the control plane flips the config copy
        assert h.run(tcp(DENIED, 6000, WEB_VIP, 80))[0] == XDP_DROP
        assert h.run(tcp(CLIENT, 6002, WEB_VIP, 80))[0] in FORWARD
        assert [e.verdict for e in ev.drain()] == ["DROPPED", "FORWARDED"]
        # `echo` has no policy, so the program never looked the source up:
        # the event still names its identity. TCP to that UDP-only VIP is
        # a drop with no service.
        rc, out = h.run(udp(CLIENT, 6003, UDP_VIP, 53))
        assert rc in FORWARD
        assert h.run(tcp(DENIED, 6004, UDP_VIP, 53))[0] == XDP_DROP
        fwd, drop = ev.drain()
        assert (fwd.identity, fwd.service, fwd.backend) == \
            ("frontend", "echo", f"{out[IP].dst}:{out[UDP].dport}")
        assert (drop.identity, drop.service, drop.reason) == ("blocked", None, "no_service")
        assert drop.line() == f"(blocked) {DENIED}:6004 => {UDP_VIP}:53 tcp DROPPED no_service"
        ev.close()


def test_monitor_config_is_validated():
    base = {"interfaces": ["eth0"]}
    assert config_from_dict(base).monitor.events_per_second == 1000      # on by default
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, "monitor": {"burst": 0, "sample_forwarded": -1, "rate": 5}})
    msg = "\n".join(e.value.errors)
    assert "monitor.burst must be in 1..1000000" in msg
    assert "monitor.sample_forwarded must be in 1..1000000" in msg
    assert "monitor: unknown key 'rate'" in msg


# -- end to end: daemon, curl, `xdplb monitor` --------------------------------


@pytest.fixture
def daemon(lab, bpf_object, tmp_path):
    lab_, topo = lab
    bpffs = pin_dir()
    cfg = lab_config(topo, fillers=0, bpffs=bpffs, socket=f"/run/xdplb/test-mon-{os.getpid()}.sock")
    d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
    try:
        yield d.start()
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(bpffs), purge=True)


def start_monitor(d: DaemonProcess, *args: str) -> subprocess.Popen:
    """`xdplb monitor` from the host namespace; returns once it is reading."""
    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "--socket", d.socket, "monitor", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sel = selectors.DefaultSelector()
    sel.register(p.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = p.stderr.readline()
            if line.startswith("monitoring flow events"):
                return p
            if not line and p.poll() is not None:
                break
    p.kill()
    raise AssertionError(f"monitor did not start: {p.communicate()}")


def curl(lab_, topo, source: str, count: int, timeout: float) -> list[tuple[str, int]]:
    """(backend name, client port) of each answered request; each a new flow."""
    argv = ["curl", "-s", "--interface", source, "--max-time", str(timeout), "-H", "Connection: close"]
    out = lab_.run(topo.client_ns, argv + [f"http://{WEB_VIP}/"] * count,
                   timeout=timeout * count + 30, check=False).stdout
    return [(b, int(port)) for b, port in re.findall(r"backend=(\w+) client=[\d.]+:(\d+)", out)]


def test_monitor_shows_forwarded_and_dropped_flows_from_the_lab(lab, daemon):
    lab_, topo = lab
    mon = start_monitor(daemon, "--json", "--duration", "6")
    try:
        answered = curl(lab_, topo, CLIENT, 5, timeout=2.0)
        assert curl(lab_, topo, DENIED, 2, timeout=1.0) == []
        out, err = mon.communicate(timeout=30)
    finally:
        mon.kill()
    assert mon.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(answered) == 5
    by_port = {e["sport"]: e for e in events if e["verdict"] == "FORWARDED" and e["src"] == CLIENT}
    for name, port in answered:
        e = by_port[port]                # every new flow, since sample_forwarded is 1
        assert (e["service"], e["identity"], e["dst"], e["dport"], e["proto"]) == \
            ("web", "frontend", WEB_VIP, 80, "tcp")
        assert e["backend"] == f"{topo.backend(name).ip}:{topo.backend_port}"   # where it went
    drops = [e for e in events if e["identity"] == "blocked"]
    assert len(drops) >= 2               # each attempt's SYN (and retries)
    for e in drops:
        assert (e["verdict"], e["reason"], e["service"], e["src"]) == ("DROPPED", "policy", "web", DENIED)
    assert "events shown" in err


def test_monitor_text_lines_filters_and_errors(lab, daemon):
    lab_, topo = lab
    bad = subprocess.run([sys.executable, "-m", "lb.cli", "--socket", daemon.socket, "monitor",
                          "--service", "nope", "--count", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "--service 'nope': no such service" in bad.stdout, bad
    mon = start_monitor(daemon, "--service", "web", "--count", "2", "--duration", "20")
    try:
        assert len(curl(lab_, topo, CLIENT, 1, timeout=2.0)) == 1
        curl(lab_, topo, DENIED, 1, timeout=1.0)
        out, err = mon.communicate(timeout=30)
    finally:
        mon.kill()
    lines = out.splitlines()
    assert len(lines) == 2, (out, err)
    assert re.fullmatch(rf"\(frontend\) {CLIENT}:\d+ => web {WEB_VIP}:80 -> 10\.244\.[123]\.2:"
                        rf"{topo.backend_port} tcp FORWARDED", lines[0]), lines[0]
    assert re.fullmatch(rf"\(blocked\) {DENIED}:\d+ => web {WEB_VIP}:80 tcp DROPPED policy",
                        lines[1]), lines[1]
    # Ctrl-C: a clean exit with the summary, not a traceback.
    mon = start_monitor(daemon)
    try:
        mon.send_signal(signal.SIGINT)
        out, err = mon.communicate(timeout=30)
    finally:
        mon.kill()
    assert mon.returncode == 0 and "0 events shown" in err and "Traceback" not in err, err
