"""Prometheus metrics: the real daemon on the lab, real traffic, and the
endpoint fetched with curl from the LB's namespace."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lb.api import ApiError
from lb.config import ConfigError, config_from_dict, config_to_dict
from lb.dataplane import Dataplane
from lb.demo import WEB_VIP, DaemonProcess, curl_many, lab_config
from loader import Map, MapType, enable_run_stats
from lbtest import pin_dir

FAMILIES = {
    # data plane
    "xdplb_service_packets": "counter", "xdplb_service_bytes": "counter",
    "xdplb_backend_packets": "counter", "xdplb_backend_bytes": "counter",
    "xdplb_drops": "counter", "xdplb_dropped_bytes": "counter",
    "xdplb_identity_drops": "counter", "xdplb_xdp_actions": "counter", "xdplb_events": "counter",
    "xdplb_conntrack_entries": "gauge", "xdplb_nat_entries": "gauge",
    "xdplb_map_entries": "gauge", "xdplb_map_capacity": "gauge",
    "xdplb_program_runs": "counter", "xdplb_program_run_seconds": "counter",
    # control plane
    "xdplb_apply_duration_seconds": "histogram", "xdplb_apply_errors": "counter",
    "xdplb_config_generation": "gauge", "xdplb_reclaim_pending": "gauge", "xdplb_up": "gauge",
    "xdplb_neighbours_managed": "gauge", "xdplb_neighbours_unresolved": "gauge",
    # health checks
    "xdplb_backend_health": "gauge",
}


def free_port(lab_, ns: str) -> int:
    with lab_.inside(ns):
        s = socket.socket()
    with s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One /metrics page: {family: {frozenset(labels): value}} per sample name."""

    def __init__(self, text: str):
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[frozenset, float]] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value

    def get(self, name: str, **labels) -> float:
        return self.samples[name][frozenset(labels.items())]

    def where(self, name: str, **labels) -> dict[frozenset, float]:
        want = set(labels.items())
        return {k: v for k, v in self.samples.get(name, {}).items() if want <= k}


def scrape(lab_, topo, port: int) -> tuple[str, Scrape]:
    """curl (the real binary) from the LB's namespace, where the daemon runs."""
    out = lab_.run(topo.lb_ns, ["curl", "-s", "-S", "-D", "-", "--max-time", "20",
                                f"http://127.0.0.1:{port}/metrics"], timeout=30).stdout
    head, _, body = out.partition("\n\n")        # text mode: \r\n became \n
    return head, Scrape(body)


@pytest.fixture
def metrics_daemon(lab, bpf_object, tmp_path):
    lab_, topo = lab
    port = free_port(lab_, topo.lb_ns)
    cfg = lab_config(topo, fillers=20, bpffs=pin_dir(),
                     socket=f"/run/xdplb/test-metrics-{os.getpid()}.sock")
    cfg["metrics_address"] = f"127.0.0.1:{port}"
    cfg["services"][0]["health_check"] = {"type": "http", "interval": 0.5, "timeout": 0.25}
    d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
    try:
        yield d.start(), port
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)


def test_every_family_with_the_values_the_traffic_produced(lab, metrics_daemon):
    lab_, topo = lab
    d, port = metrics_daemon
    with enable_run_stats():          # so that xdplb_program_* count something
        answered = curl_many(lab_, topo, f"http://{WEB_VIP}/", 30, topo.client_ip)
    denied = curl_many(lab_, topo, f"http://{WEB_VIP}/", 3, topo.denied_client_ip, timeout=1.0)
    assert len(answered) == 30 and denied == []
    before = d.call("stats")
    head, m = scrape(lab_, topo, port)
    after = d.call("stats")

    assert "Content-Type: text/plain" in head, head
    for name, kind in FAMILIES.items():
        assert m.types.get(name) == kind, (name, m.types.get(name))

    # Per service and backend, summed over CPUs: what `xdplb stats` reads,
    # and what curl sent.
    web = {"service": "web", "vip": WEB_VIP, "port": "80", "protocol": "tcp"}
    packets = m.get("xdplb_service_packets_total", **web)
    web_before = next(s for s in before["services"] if s["name"] == "web")
    web_after = next(s for s in after["services"] if s["name"] == "web")
    assert web_before["packets"] <= packets <= web_after["packets"]
    assert packets >= 30 * 4                      # SYN, ACK, request, FIN/ACK at least
    assert m.get("xdplb_service_bytes_total", **web) >= packets * 40
    backends = m.where("xdplb_backend_packets_total", service="web")
    assert {dict(k)["backend"] for k in backends} == {f"{b.ip}:{topo.backend_port}" for b in topo.backends}
    assert {dict(k)["state"] for k in backends} == {"active"}
    assert sum(backends.values()) == packets
    assert all(v > 0 for v in backends.values()), backends
    assert sum(m.where("xdplb_backend_bytes_total", service="web").values()) == \
        m.get("xdplb_service_bytes_total", **web)
    assert len(m.samples["xdplb_service_packets_total"]) == len(d.config["services"])

    # Drops by reason and by identity.
    policy = m.get("xdplb_identity_drops_total", identity="blocked", service="web", reason="policy")
    assert policy >= 3 and m.get("xdplb_drops_total", reason="policy") >= policy
    assert m.get("xdplb_dropped_bytes_total", reason="policy") >= policy * 40
    assert m.get("xdplb_drops_total", reason="no_backend") == 0

    # Verdicts and events from global_stats.
    assert {dict(k)["action"] for k in m.samples["xdplb_xdp_actions_total"]} == \
        {"pass", "tx", "redirect", "drop", "aborted"}
    assert m.get("xdplb_xdp_actions_total", action="redirect") >= packets
    assert m.get("xdplb_xdp_actions_total", action="drop") >= policy
    assert m.get("xdplb_events_total", event="ct_new") >= 30
    assert m.get("xdplb_events_total", event="ct_hit") >= 30
    assert m.get("xdplb_events_total", event="reply") >= 30

    # Occupancy and fill level of every map.
    # Gateway mode: replies are found through conntrack, no reverse-NAT entries.
    assert m.get("xdplb_conntrack_entries") >= 30 and m.get("xdplb_nat_entries") == 0
    pinned = {p.name for p in (Path(d.config["bpffs"]) / "maps").iterdir()
              if Map.open_pinned(p).map_type != MapType.RINGBUF}   # a byte queue: no fill level
    capacity = {dict(k)["map"]: v for k, v in m.samples["xdplb_map_capacity"].items()}
    entries = {dict(k)["map"]: v for k, v in m.samples["xdplb_map_entries"].items()}
    assert pinned <= set(capacity) and pinned <= set(entries), pinned
    status = d.call("status")
    assert entries["services"] == entries["svc_stats"] == status["services"] == 22
    assert entries["backends"] == entries["backend_stats"] == status["backends"] == 26
    assert entries["identities"] == 2
    assert entries["conntrack"] == m.get("xdplb_conntrack_entries")
    assert entries["maglev_pool"] == status["maglev_pool"]["slots"] - status["maglev_pool"]["free"]
    assert capacity["maglev_pool"] == status["maglev_pool"]["slots"]
    assert capacity["conntrack"] == 262144 and capacity["services"] == 65536
    assert all(0 <= entries[n] <= capacity[n] for n in entries)

    # Program run time (kernel.bpf_stats_enabled was on during the traffic).
    assert m.get("xdplb_program_runs_total") >= packets
    assert m.get("xdplb_program_run_seconds_total") > 0

    # Control plane and health.
    assert m.get("xdplb_config_generation") >= 1
    assert m.get("xdplb_up") == 1
    assert m.get("xdplb_reclaim_pending") >= 0
    assert m.get("xdplb_neighbours_managed") == 3          # one per backend, all resolved
    assert m.get("xdplb_neighbours_unresolved") == 0
    assert m.get("xdplb_apply_duration_seconds_count", kind="full") == 1
    assert m.get("xdplb_apply_errors_total", kind="full") == 0
    health = m.where("xdplb_backend_health", service="web")
    assert len(health) == 3 and set(health.values()) == {1.0}

    # Only on the loopback of the LB's namespace: not from the client side.
    p = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3",
                                  f"http://{topo.lb_client_ip}:{port}/metrics"], check=False)
    assert p.returncode == 7, (p.returncode, p.stdout)     # couldn't connect


def test_control_plane_counts_applies_errors_and_moves_with_reload(lab, metrics_daemon, tmp_path):
    lab_, topo = lab
    d, port = metrics_daemon
    _, m = scrape(lab_, topo, port)
    gen = m.get("xdplb_config_generation")

    bad = yaml.safe_dump({**d.config, "services": d.config["services"] + [
        {"name": "bad", "vip": "10.96.3.3", "port": 99999, "protocol": "tcp"}]})
    with pytest.raises(ApiError, match="'bad': port must be in"):
        d.call("apply", config=bad, source="bad.yaml")
    d.call("upsert_service", service={"name": "one", "vip": "10.96.3.4", "port": 80, "protocol": "tcp",
                                      "backends": [f"{topo.backends[0].ip}:{topo.backend_port}"]})
    with pytest.raises(ApiError, match="nobody"):
        d.call("upsert_service", service={"name": "two", "vip": "10.96.3.5", "port": 80,
                                          "protocol": "tcp", "allow": ["nobody"]})
    _, m = scrape(lab_, topo, port)
    assert m.get("xdplb_apply_errors_total", kind="full") == 1
    assert m.get("xdplb_apply_errors_total", kind="service") == 1
    assert m.get("xdplb_apply_duration_seconds_count", kind="full") == 1
    assert m.get("xdplb_apply_duration_seconds_count", kind="service") == 1
    assert 0 < m.get("xdplb_apply_duration_seconds_sum", kind="service") < 5
    assert m.get("xdplb_config_generation") == gen + 1
    assert m.get("xdplb_service_packets_total", service="one", vip="10.96.3.4", port="80",
                 protocol="tcp") == 0

    # SIGHUP with a new metrics_address: the endpoint moves; false turns it off.
    new_port = free_port(lab_, topo.lb_ns)
    cfg = dict(d.config, metrics_address=f"127.0.0.1:{new_port}")
    d.path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.call("status")["generation"] == gen + 1:
        time.sleep(0.1)
    _, m = scrape(lab_, topo, new_port)
    assert m.get("xdplb_config_generation") == gen + 2
    assert m.get("xdplb_apply_duration_seconds_count", kind="full") == 2
    old = lab_.run(topo.lb_ns, ["curl", "-s", "--max-time", "3", f"http://127.0.0.1:{port}/metrics"],
                   check=False)
    assert old.returncode == 7
    d.path.write_text(yaml.safe_dump(dict(cfg, metrics_address=False), sort_keys=False))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.call("status")["generation"] == gen + 2:
        time.sleep(0.1)
    off = lab_.run(topo.lb_ns, ["curl", "-s", "--max-time", "3",
                                f"http://127.0.0.1:{new_port}/metrics"], check=False)
    assert off.returncode == 7
    assert "metrics endpoint off" in d.log.read_text()


@pytest.mark.parametrize("value, message", [
    ("localhost:9469", "metrics_address: host must be an IP address, not 'localhost'"),
    ("127.0.0.1:0", "metrics_address: port must be in 1..65535, not '0'"),
    ("127.0.0.1", "metrics_address must be 'host:port' (e.g. 127.0.0.1:9469) or false, not '127.0.0.1'"),
    ("::1:9469", "metrics_address: an IPv6 host goes in brackets, e.g. [::1]:9469"),
    (True, "metrics_address must be 'host:port' (e.g. 127.0.0.1:9469) or false, not True"),
])
def test_metrics_address_is_validated(value, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"interfaces": ["eth0"], "metrics_address": value})
    assert e.value.errors == [message]


@pytest.mark.parametrize("value, parsed", [
    (None, "127.0.0.1:9469"), ("0.0.0.0:80", "0.0.0.0:80"), ("[::1]:9469", "[::1]:9469"), (False, False)])
def test_metrics_address_default_off_and_round_trip(value, parsed):
    cfg = config_from_dict({"interfaces": ["eth0"], "metrics_address": value})
    assert cfg.metrics_address == parsed
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict({"interfaces": ["eth0"]}).metrics_address == "127.0.0.1:9469"
