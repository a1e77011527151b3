"""The daemon's operations with an IPv6 service, end to end: the real
daemon in an all-IPv6 lab of its own (client - lb - two backends, nothing
resolved beforehand), real curl over IPv6. Its neighbour keeper resolves
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
from lb.demo import DaemonProcess
from lb.lab import REPO_ROOT, Lab, backend_argv
from lbtest import pin_dir, wait_for, xdplb

VIP = "2001:db8:96::a"
CLIENT = "2001:db8:1::10"
BACKENDS = {"b1": "2001:db8:2::2", "b2": "2001:db8:3::2"}
PORT = 8080
METRICS_PORT = 19469


def _ns(lab: Lab, name: str) -> str:
    ns = lab.netns(name)
    for conf in ("all", "default"):
        lab.sysctl(ns, f"net.ipv6.conf.{conf}.accept_dad", 0)
    return ns


@pytest.fixture
def v6_lab():
    """client c0 2001:db8:1::10 -- l0 2001:db8:1::1 [lb] l1 2001:db8:2::1 --
    b1 2001:db8:2::2, l2 2001:db8:3::1 -- b2 2001:db8:3::2; HTTP servers on
    the backends. Every host routes by the LB; nothing is resolved."""
    with Lab(prefix="xo6", ipv6=True) as lab:
        client, lb = _ns(lab, "client"), _ns(lab, "lb")
        lab.sysctl(lb, "net.ipv6.conf.all.forwarding", 1)
        lab.veth(client, "c0", lb, "l0")
        lab.addr(client, "c0", f"{CLIENT}/64")
        lab.addr(lb, "l0", "2001:db8:1::1/64")
        lab.ipr(client).route("add", dst="::/0", gateway="2001:db8:1::1", family=socket.AF_INET6)
        servers = []
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        for i, (name, ip) in enumerate(BACKENDS.items(), start=1):
            ns = _ns(lab, name)
            lab.veth(lb, f"l{i}", ns, "eth0")
            lab.addr(lb, f"l{i}", f"2001:db8:{i + 1}::1/64")
            lab.addr(ns, "eth0", f"{ip}/64")
            lab.ipr(ns).route("add", dst="::/0", gateway=f"2001:db8:{i + 1}::1", family=socket.AF_INET6)
            servers.append(lab.popen(ns, backend_argv(name, PORT, None) + ["--host", "::"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO_ROOT))
        for p in servers:
            assert p.stdout.readline() == b"ready\n"
        yield lab, client, lb, servers


def curl6(lab: Lab, ns: str, n: int) -> list[str]:
    argv = ["curl", "-s", "-g", "--max-time", "2", "-H", "Connection: close"] + [f"http://[{VIP}]/"] * n
    return re.findall(r"backend=(\w+)", lab.run(ns, argv, timeout=2 * n + 30, check=False).stdout)


def test_ipv6_service_operations(v6_lab, bpf_object, tmp_path):
    lab, client, lb, servers = v6_lab
    cfg = {"interfaces": ["l0", "l1", "l2"], "bpffs": pin_dir(),
           "api_socket": f"/run/xdplb/ipv6-ops-{os.getpid()}.sock",
           "metrics_address": f"127.0.0.1:{METRICS_PORT}",
           "identities": {"frontend6": ["2001:db8:1::/64"]},
           "services": [{"name": "web6", "vip": VIP, "port": 80, "protocol": "tcp",
                         "backends": [f"[{ip}]:{PORT}" for ip in BACKENDS.values()], "allow": ["frontend6"],
                         "health_check": {"type": "tcp", "interval": 0.5, "timeout": 0.25, "fall": 2, "rise": 2}}]}
    d = DaemonProcess(cfg, tmp_path, lb)
    keys = {f"[{ip}]:{PORT}" for ip in BACKENDS.values()}
    try:
        d.start()
        # Next hops: managed IPv6 entries, resolved by NDP before READY.
        table = {n.get_attr("NDA_DST"): n for n in lab.ipr(lb).get_neighbours(family=socket.AF_INET6)}
        for ip in BACKENDS.values():
            assert table[ip]["state"] & 0x1E and table[ip].get_attr("NDA_FLAGS_EXT") & 1, ip
        assert d.call("status")["neighbours"]["unresolved"] == []

        res = json.loads(xdplb(d, "flow", f"[{CLIENT}]:40000", f"[{VIP}]:80", "tcp", "--json").stdout)
        assert (res["verdict"], res["service"], res["identity"]) == ("FORWARDED", "web6", "frontend6"), res
        assert res["backend"] in keys
        text = " ".join(xdplb(d, "flow", f"[{CLIENT}]:40000", f"[{VIP}]:80", "tcp").stdout.split())   # unwrapped
        assert f"[{CLIENT}]:40000 => web6 [{VIP}]:80 -> {res['backend']} tcp FORWARDED" in text, text
        mixed = xdplb(d, "flow", "10.1.0.10:40000", f"[{VIP}]:80", "tcp", check=False)
        assert mixed.returncode == 1 and "not of one address family" in mixed.stdout + mixed.stderr
        assert "Traceback" not in mixed.stdout + mixed.stderr

        st = subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, "stats", "--all"],
                            capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                            env=dict(os.environ, COLUMNS="160")).stdout          # one row per line
        assert f"[{VIP}]:80/tcp" in st and all(k in st for k in keys), st
        metrics = lab.run(lb, ["curl", "-s", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
        labels = {line.split("}")[0] for line in metrics.splitlines() if line.startswith("xdplb_backend_packets_total{")}
        assert labels == {f'xdplb_backend_packets_total{{backend="{k}",service="web6",state="active"' for k in keys}
        assert f'xdplb_service_packets_total{{port="80",protocol="tcp",service="web6",vip="{VIP}"}}' in metrics

        # Health over IPv6: b2's server dies, its key goes down and out of rotation.
        os.killpg(servers[1].pid, signal.SIGKILL)
        down = f"[{BACKENDS['b2']}]:{PORT}"

        def health() -> dict:
            return {b["backend"]: b for b in json.loads(xdplb(d, "status", "--json").stdout)["health"]["backends"]}

        assert set(health()) == keys
        wait_for(lambda: not health()[down]["up"] and health()[down]["in_rotation"] is False, 10, "b2 down")
        assert health()[down]["last_error"] == "connection refused"
        assert down in xdplb(d, "status").stdout
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)


def test_ipv6_traffic_neighbour_flush_and_monitor(v6_lab, bpf_object, tmp_path):
    """curl over IPv6 through the VIP, balanced over both backends, also
    after `ip -6 neigh flush all` on the LB (the keeper re-creates the
    backends' entries at once); `xdplb monitor` sees the flows: the
    client, the VIP and the backend as the data plane wrote them, with
    `[addr]:port`."""
    lab, client, lb, _ = v6_lab
    cfg = {"interfaces": ["l0", "l1", "l2"], "bpffs": pin_dir(),
           "api_socket": f"/run/xdplb/ipv6-mon-{os.getpid()}.sock", "metrics_address": False,
           "services": [{"name": "web6", "vip": VIP, "port": 80, "protocol": "tcp",
                         "backends": [f"[{ip}]:{PORT}" for ip in BACKENDS.values()]}]}
    d = DaemonProcess(cfg, tmp_path, lb)
    mon = None
    try:
        d.start()
        answers = curl6(lab, client, 40)
        assert len(answers) == 40 and set(answers) == set(BACKENDS), answers
        lab.run(lb, ["ip", "-6", "neigh", "flush", "all"])
        wait_for(lambda: d.call("status")["neighbours"]["readded"] >= 2, 2, "managed entries re-created")
        answers = curl6(lab, client, 40)
        assert len(answers) == 40 and set(answers) == set(BACKENDS), answers
        mon = subprocess.Popen([sys.executable, "-m", "lb.cli", "--socket", d.socket, "monitor",
                                "--verdict", "forwarded", "--count", "5", "--duration", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        started = mon.stderr.readline()
        assert started.startswith("monitoring flow events"), started + mon.stderr.read()
        assert len(curl6(lab, client, 5)) == 5
        lines = mon.communicate(timeout=40)[0].splitlines()
        assert len(lines) == 5, lines
        assert all(re.search(rf"\[{CLIENT}\]:\d+ => web6 \[{VIP}\]:80 -> \[2001:db8:[23]::2\]:{PORT} tcp FORWARDED",
                             line) for line in lines), lines
    finally:
        if mon is not None:
            mon.kill()
            mon.wait(10)
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)
