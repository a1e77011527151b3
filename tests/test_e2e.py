"""End to end: the real daemon, real XDP on veths, real curl and servers."""

from __future__ import annotations

import collections
import json
import re
import signal
import sys
import time
from pathlib import Path

import yaml

from bench.xdplb_maps import open_pinned_maps
from lb.demo import UDP_VIP, WEB_VIP, curl_many, filler_vip
from lbtest import download as _download, dump_maps, stats, xdplb

ROOT = Path(__file__).resolve().parent.parent
TRAFFIC_MAPS = ("global_stats", "svc_stats", "backend_stats", "drop_stats", "drop_detail",
                "conntrack", "rev_nat", "monitor_bucket", "flood_bucket", "reject_bucket", "nexthops", "events")


def test_balance_and_denied_identity(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 300, topo.client_ip)
    assert len(answers) == 300
    counts = collections.Counter(answers)
    for b in topo.backends:                      # binomial, sd 2.7%: +-10% is > 3.5 sd
        assert 0.233 <= counts[b.name] / 300 <= 0.433, counts
    denied = curl_many(lab_, topo, f"http://{WEB_VIP}/", 3, topo.denied_client_ip, timeout=1.0)
    assert denied == []
    st = stats(d)
    drops = [x for x in st["drop_detail"] if x["identity"] == "blocked" and x["service"] == "web"]
    assert drops and drops[0]["reason"] == "policy" and drops[0]["packets"] >= 3
    web = next(s for s in st["services"] if s["name"] == "web")
    assert sum(b["packets"] for b in web["backends"]) == web["packets"] > 300


def test_status_shows_table_fill_levels(lab, daemon_factory):
    """Exhaustion must be visible before it bites: `status` gives each
    table's entries against its capacity, and they follow the traffic."""
    lab_, topo = lab
    d = daemon_factory(fillers=50)
    before = json.loads(xdplb(d, "status", "--json").stdout)["maps"]
    assert before["services"]["entries"] == 52 and before["services"]["capacity"] == 65536
    assert before["conntrack"]["entries"] == 0 and before["conntrack"]["capacity"] == 262144
    assert len(curl_many(lab_, topo, f"http://{WEB_VIP}/", 20, topo.client_ip)) == 20
    after = json.loads(xdplb(d, "status", "--json").stdout)["maps"]
    # Gateway mode: one conntrack entry per flow, replies found through the
    # reply index: one entry per backend address.
    assert after["conntrack"]["entries"] >= 20 and after["rev_nat"]["entries"] == 0
    assert after["reply_index"]["entries"] == 6     # web (tcp) and echo (udp)
    assert after["conntrack"]["fill"] == round(after["conntrack"]["entries"] / 262144, 4)
    table = xdplb(d, "status").stdout
    assert "conntrack " in table and "/262,144" in table


def test_gateway_mode_preserves_client_and_udp_works(lab, daemon_factory):
    lab_, topo = lab
    daemon_factory()
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{WEB_VIP}/"]).stdout
    assert re.match(r"backend=b\d client=10\.1\.0\.10:\d+", out), out
    code = (f"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3);"
            f"s.sendto(b'hi', ('{UDP_VIP}', 53)); print(s.recvfrom(200)[0].decode())")
    out = lab_.run(topo.client_ns, [sys.executable, "-c", code], timeout=10).stdout
    assert re.match(r"backend=b\d client=10\.1\.0\.10:\d+", out), out


def test_snat_mode_backends_see_lb_address(lab, daemon_factory):
    lab_, topo = lab
    daemon_factory(snat=True)
    answers = [lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{WEB_VIP}/"]).stdout
               for _ in range(5)]
    for out in answers:
        m = re.match(r"backend=b\d client=([\d.]+):(\d+)", out)
        assert m and m.group(1) == topo.snat_ip, out
        assert 10000 <= int(m.group(2)) <= 32767


def test_kill_9_during_download_and_restart(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    n = 3_000_000
    result: dict = {}
    t = _download(lab_, topo, f"http://{WEB_VIP}/bytes?n={n}&rate=750000", result)
    time.sleep(1.0)
    d.kill(signal.SIGKILL)                       # no cleanup at all
    time.sleep(0.5)
    d.start()                                    # same pins: reconcile, swap the program
    t.join(60)
    assert result["out"] == f"{n} 200", result
    st = stats(d)
    assert next(s for s in st["services"] if s["name"] == "web")["packets"] > 0
    assert curl_many(lab_, topo, f"http://{WEB_VIP}/", 3, topo.client_ip)


def test_established_flow_sticks_across_backend_set_change(lab, daemon_factory, tmp_path):
    lab_, topo = lab
    d = daemon_factory()
    n = 2_000_000
    # Find which backend a long download lands on, via the server's own answer.
    result: dict = {}
    t = _download(lab_, topo, f"http://{WEB_VIP}/bytes?n={n}&rate=700000", result)
    time.sleep(0.8)
    st = stats(d)
    web = next(s for s in st["services"] if s["name"] == "web")
    busy = max(web["backends"], key=lambda b: b["packets"])
    others = [b for b in web["backends"] if b is not busy]
    # New backend set: the busy one drains, one other is removed entirely.
    cfg = dict(d.config)
    cfg["services"] = [dict(s) for s in d.config["services"]]
    cfg["services"][0]["backends"] = [
        {"address": busy["address"], "port": busy["port"], "state": "draining"},
        f"{others[0]['address']}:{others[0]['port']}",
    ]
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    xdplb(d, "apply", "-f", str(path))
    t.join(60)
    assert result["out"] == f"{n} 200", result      # the draining backend kept its flow
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 30, topo.client_ip)
    names = {b.ip: b.name for b in topo.backends}
    assert set(answers) == {names[others[0]["address"]]}


def test_20k_services_last_one_answers_and_is_counted(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory(fillers=20000)
    vip = filler_vip(19999)
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{vip}/"]).stdout
    assert out.startswith("backend=b"), out
    st = stats(d)
    last = next(s for s in st["services"] if s["name"] == "filler-19999")
    assert last["vip"] == vip and last["packets"] >= 4


def test_invalid_apply_changes_nothing_and_names_the_entry(lab, daemon_factory, tmp_path):
    lab_, topo = lab
    d = daemon_factory(fillers=50)
    maps = open_pinned_maps(d.config["bpffs"])
    # Live traffic (ARP, stray segments of earlier tests' flows) may move
    # counters and flow tables; test_reject.py compares those too, without traffic.
    before = dump_maps(maps, skip=TRAFFIC_MAPS)
    bad = dict(d.config)
    bad["services"] = list(d.config["services"])
    bad["services"][30] = dict(bad["services"][30], backends=["10.244.1.2:8080", "10.244.2.2:99999"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    p = xdplb(d, "apply", "-f", str(path), check=False)
    assert p.returncode != 0
    assert "filler-28" in p.stdout and "99999" in p.stdout, p.stdout
    bad["services"][30] = d.config["services"][30]
    bad["services"].append({"name": "new", "vip": "10.96.1.1", "port": 80, "protocol": "tcp",
                            "backends": ["10.244.1.2:8080"], "allow": ["nobody"]})
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    p = xdplb(d, "apply", "-f", str(path), check=False)
    assert p.returncode != 0 and "'new'" in p.stdout and "nobody" in p.stdout, p.stdout
    assert dump_maps(maps, skip=TRAFFIC_MAPS) == before
    for m in maps.values():
        m.close()


def test_flow_command_asks_the_live_program(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    maps = open_pinned_maps(d.config["bpffs"])
    ct_before = len(maps["conntrack"].lookup_batch())
    res = json.loads(xdplb(d, "flow", "10.1.0.10:40000", f"{WEB_VIP}:80", "tcp", "--json").stdout)
    assert res["verdict"] == "FORWARDED" and res["service"] == "web" and res["identity"] == "frontend"
    assert res["backend"] in {f"{b.ip}:{topo.backend_port}" for b in topo.backends}
    res = json.loads(xdplb(d, "flow", "192.0.2.10:40000", f"{WEB_VIP}:80", "tcp", "--json").stdout)
    assert (res["verdict"], res["reason"], res["identity"]) == ("DROPPED", "policy", "blocked")
    assert len(maps["conntrack"].lookup_batch()) == ct_before     # dry run: no state
    # The live program agrees with the dry run.
    out = lab_.run(topo.client_ns, ["curl", "-s", "--local-port", "40000", "--max-time", "3",
                                    f"http://{WEB_VIP}/"]).stdout
    first = json.loads(xdplb(d, "flow", "10.1.0.10:40000", f"{WEB_VIP}:80", "tcp", "--json").stdout)
    assert first["backend"].startswith(next(b.ip for b in topo.backends if out.startswith(f"backend={b.name} ")))
    for m in maps.values():
        m.close()


def test_sighup_reloads_and_bad_config_keeps_state(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    gen = json.loads(xdplb(d, "status", "--json").stdout)["generation"]
    cfg = yaml.safe_load(d.path.read_text())
    cfg["services"].append({"name": "extra", "vip": "10.96.2.2", "port": 80, "protocol": "tcp",
                            "backends": [f"{topo.backends[0].ip}:{topo.backend_port}"]})
    d.path.write_text(yaml.safe_dump(cfg))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 20
    while json.loads(xdplb(d, "status", "--json").stdout)["generation"] == gen and time.time() < deadline:
        time.sleep(0.2)
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", "http://10.96.2.2/"]).stdout
    assert out.startswith("backend=b1")
    d.path.write_text("services: [oops")
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    st = json.loads(xdplb(d, "status", "--json").stdout)
    assert st["errors"] == 1 and st["services"] == 3
    assert lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", "http://10.96.2.2/"]).stdout
