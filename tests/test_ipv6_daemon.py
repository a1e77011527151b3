"""The daemon's operations with an IPv6 service, end to end: the real
daemon in the lab with IPv6 on its links (client - lb - two backends,
nothing resolved beforehand), real curl over IPv6. Its neighbour keeper resolves
the backends by NDP; health checks probe them over IPv6; `flow`, `stats`,
`status`, the Prometheus labels and `monitor` write `[addr]:port`. The
first test needs no answered traffic (the dry-run probe and the health
checks), the second the whole IPv6 data path."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lb.dataplane import Dataplane
from lb.demo import DaemonProcess, curl_many
from lb.lab import REPO_ROOT, Lab, build_lb_lab, start_backends
from lbtest import pin_dir, wait_for, xdplb

VIP = "fd00:96::a"
PORT = 8080
METRICS_PORT = 19469


@pytest.fixture
def v6_lab():
    """The tests' lab with IPv6 on every link (lb/lab.py: client fd00:1::10,
    backends fd00:244:<i>::2, each behind the LB), two backends serving both
    families; nothing resolved."""
    with Lab(ipv6=True) as lab:
        topo = build_lb_lab(lab, 2)
        servers = start_backends(lab, topo)
        yield lab, topo, servers


def curl6(lab: Lab, topo, n: int) -> list[str]:
    return curl_many(lab, topo, f"http://[{VIP}]/", n, topo.client_ip6)


def config(topo, name: str, **service) -> dict:
    return {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": pin_dir(),
            "api_socket": f"/run/xdplb/{name}-{os.getpid()}.sock", "metrics_address": False,
            "identities": {"frontend6": ["fd00:1::/64"]},
            "services": [{"name": "web6", "vip": VIP, "port": 80, "protocol": "tcp",
                          "backends": [f"[{b.ip6}]:{PORT}" for b in topo.backends], "allow": ["frontend6"],
                          **service}]}


def test_ipv6_service_operations(v6_lab, bpf_object, tmp_path):
    lab, topo, servers = v6_lab
    cfg = config(topo, "ops6", health_check={"type": "tcp", "interval": 0.5, "timeout": 0.25, "fall": 2,
                                             "rise": 2})
    cfg["metrics_address"] = f"127.0.0.1:{METRICS_PORT}"
    d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
    keys = {f"[{b.ip6}]:{PORT}" for b in topo.backends}
    client = topo.client_ip6
    try:
        d.start()
        # Next hops: managed IPv6 entries, resolved by NDP before READY.
        table = {n.get_attr("NDA_DST"): n for n in lab.ipr(topo.lb_ns).get_neighbours(family=socket.AF_INET6)}
        for b in topo.backends:
            assert table[b.ip6]["state"] & 0x1E and table[b.ip6].get_attr("NDA_FLAGS_EXT") & 1, b.ip6
        assert d.call("status")["neighbours"]["unresolved"] == []

        res = json.loads(xdplb(d, "flow", f"[{client}]:40000", f"[{VIP}]:80", "tcp", "--json").stdout)
        assert (res["verdict"], res["service"], res["identity"]) == ("FORWARDED", "web6", "frontend6"), res
        assert res["backend"] in keys and res["rewritten"]["dst"] == res["backend"]
        text = " ".join(xdplb(d, "flow", f"[{client}]:40000", f"[{VIP}]:80", "tcp").stdout.split())   # unwrapped
        assert f"[{client}]:40000 => web6 [{VIP}]:80 -> {res['backend']} tcp FORWARDED" in text, text
        mixed = xdplb(d, "flow", "10.1.0.10:40000", f"[{VIP}]:80", "tcp", check=False)
        assert mixed.returncode == 1 and "not of one address family" in mixed.stdout + mixed.stderr
        assert "Traceback" not in mixed.stdout + mixed.stderr

        st = subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, "stats", "--all"],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                            env=dict(os.environ, COLUMNS="160")).stdout          # one row per line
        assert f"[{VIP}]:80/tcp" in st and all(k in st for k in keys), st
        metrics = lab.run(topo.lb_ns, ["curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
        labels = {line.split("}")[0] for line in metrics.splitlines()
                  if line.startswith("xdplb_backend_packets_total{")}
        assert labels == {f'xdplb_backend_packets_total{{backend="{k}",service="web6",state="active"' for k in keys}
        assert f'xdplb_service_packets_total{{port="80",protocol="tcp",service="web6",vip="{VIP}"}}' in metrics

        # Health over IPv6: b2's server dies, its key goes down and out of rotation.
        os.killpg(servers[1].pid, signal.SIGKILL)
        down = f"[{topo.backends[1].ip6}]:{PORT}"

        def health() -> dict:
            return {b["backend"]: b for b in json.loads(xdplb(d, "status", "--json").stdout)["health"]["backends"]}

        assert set(health()) == keys
        wait_for(lambda: not health()[down]["up"] and health()[down]["in_rotation"] is False, 10, "b2 down")
        assert health()[down]["last_error"] == "connection refused"
        assert down in " ".join(xdplb(d, "status").stdout.split())
        assert set(curl6(lab, topo, 10)) == {"b1"}
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)


def test_ipv6_traffic_neighbour_flush_and_monitor(v6_lab, bpf_object, tmp_path):
    """curl over IPv6 through the VIP, balanced over both backends, also
    after `ip -6 neigh flush all` on the LB (the keeper re-creates the
    backends' entries at once); `xdplb monitor` sees the flows: the
    client, the VIP and the backend as the data plane wrote them, with
    `[addr]:port`."""
    lab, topo, _ = v6_lab
    cfg = config(topo, "mon6")
    d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
    names = {b.name for b in topo.backends}
    mon = None
    try:
        d.start()
        answers = curl6(lab, topo, 40)
        assert len(answers) == 40 and set(answers) == names, answers
        lab.run(topo.lb_ns, ["ip", "-6", "neigh", "flush", "all"])
        wait_for(lambda: d.call("status")["neighbours"]["readded"] >= 2, 2, "managed entries re-created")
        answers = curl6(lab, topo, 40)
        assert len(answers) == 40 and set(answers) == names, answers
        mon = subprocess.Popen([sys.executable, "-m", "lb.cli", "--socket", d.socket, "monitor",
                                "--verdict", "forwarded", "--count", "5", "--duration", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env=dict(os.environ, COLUMNS="200"))
        started = mon.stderr.readline()
        assert started.startswith("monitoring flow events"), started + mon.stderr.read()
        assert len(curl6(lab, topo, 5)) == 5
        lines = mon.communicate(timeout=40)[0].splitlines()
        assert len(lines) == 5, lines
        backend = "|".join(re.escape(f"[{b.ip6}]:{PORT}") for b in topo.backends)
        line_re = rf"\(frontend6\) \[{topo.client_ip6}\]:\d+ => web6 \[{VIP}\]:80 -> ({backend}) tcp FORWARDED"
        assert all(re.search(line_re, line) for line in lines), lines
    finally:
        if mon is not None:
            mon.kill()
            mon.wait(10)
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)
