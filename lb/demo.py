"""`xdplb demo`: real HTTP through the XDP load balancer, on a lab it builds.

client (10.1.0.10 allowed, 192.0.2.10 denied) -> lb (XDP on l0..l3) -> b1..b3

It loads a few real services and thousands of filler services, sends real
HTTP requests through the VIP with curl, and prints what the backends
answered and what the XDP counters saw. It always tears the lab down.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from . import api
from .dataplane import Dataplane
from .lab import REPO_ROOT, Lab, LbTopology, build_lb_lab, start_backends

console = Console()
WEB_VIP = "10.96.0.10"
UDP_VIP = "10.96.0.53"


def filler_vip(i: int) -> str:
    """10.97.0.1 ... : one address per filler service, inside the lab's VIP range."""
    return f"10.{97 + i // 65000}.{(i % 65000) // 250}.{i % 250 + 1}"


def lab_config(topo: LbTopology, *, fillers: int, bpffs: str, socket: str,
               snat: bool = False, web_backends: list[dict] | None = None) -> dict:
    """The demo's config: real services plus `fillers` services that point
    at the same backends (so any of them can be asked for real)."""
    backends = web_backends or [f"{b.ip}:{topo.backend_port}" for b in topo.backends]
    cfg = {
        "interfaces": [i.name for i in topo.lb_ifaces],
        "bpffs": bpffs,
        "api_socket": socket,
        "identities": {"frontend": ["10.1.0.0/24"], "blocked": ["192.0.2.0/24"]},
        "services": [
            {"name": "web", "vip": WEB_VIP, "port": 80, "protocol": "tcp",
             "backends": backends, "allow": ["frontend"]},
            {"name": "echo", "vip": UDP_VIP, "port": 53, "protocol": "udp",
             "backends": [f"{b.ip}:{topo.udp_port}" for b in topo.backends]},
        ],
    }
    if snat:
        cfg["snat_address"] = topo.snat_ip
    n = len(topo.backends)
    for i in range(fillers):
        b = topo.backends[i % n]
        cfg["services"].append({"name": f"filler-{i}", "vip": filler_vip(i), "port": 80,
                                "protocol": "tcp", "backends": [f"{b.ip}:{topo.backend_port}"]})
    return cfg


class DaemonProcess:
    """`xdplb run` as a real process, inside the lab's lb namespace."""

    def __init__(self, config: dict, workdir: Path, netns: str, env: dict[str, str] | None = None):
        self.config = config
        self.env = env or {}            # extra environment, e.g. NOTIFY_SOCKET
        self.path = workdir / "xdplb.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.socket = config["api_socket"]
        self.netns = netns
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "DaemonProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lb.cli", "--socket", self.socket, "run",
             "--config", str(self.path), "--netns", self.netns],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xdplb run exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                api.call(self.socket, "status", timeout=5)
                return self
            except api.ApiError:
                time.sleep(0.1)
        raise TimeoutError(f"xdplb run not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def call(self, cmd: str, **kw):
        return api.call(self.socket, cmd, **kw)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def curl_many(lab: Lab, topo: LbTopology, url: str, count: int, source: str,
              timeout: float = 2.0) -> list[str]:
    """`count` requests in one curl, each on a new connection (a new flow)."""
    argv = ["curl", "-s", "--interface", source, "--max-time", str(timeout),
            "-H", "Connection: close"]
    for _ in range(count):
        argv.append(url)
    out = lab.run(topo.client_ns, argv, timeout=timeout * count + 30, check=False)
    return re.findall(r"backend=(\w+)", out.stdout)


def run_demo(requests: int = 300, fillers: int = 10000, denied_attempts: int = 5,
             out=console) -> dict:
    pid = os.getpid()
    bpffs = f"/sys/fs/bpf/xdplb-demo-{pid}"
    result: dict = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="xdplb-demo-") as tmp:
        daemon = None
        try:
            out.print("[bold]building the lab[/]: client, lb and 3 backends in network namespaces")
            topo = build_lb_lab(lab, 3)
            start_backends(lab, topo)
            cfg = lab_config(topo, fillers=fillers, bpffs=bpffs, socket=f"/run/xdplb/demo-{pid}.sock")
            out.print(f"starting [bold]xdplb run[/] with {len(cfg['services'])} services "
                      f"({fillers} fillers) on {', '.join(cfg['interfaces'])}")
            t0 = time.perf_counter()
            daemon = DaemonProcess(cfg, Path(tmp), topo.lb_ns).start()
            status = daemon.call("status")
            out.print(f"  ready in {time.perf_counter() - t0:.1f}s; first apply took "
                      f"{status['last_apply'].get('seconds', 0):.2f}s")

            with _run_stats():
                before = daemon.call("stats")["program"]
                out.print(f"sending {requests} HTTP requests to http://{WEB_VIP}/ from {topo.client_ip}")
                answers = curl_many(lab, topo, f"http://{WEB_VIP}/", requests, topo.client_ip)
                after = daemon.call("stats")
            denied = curl_many(lab, topo, f"http://{WEB_VIP}/", denied_attempts,
                               topo.denied_client_ip, timeout=1.0)
            stats = daemon.call("stats")

            runs = after["program"]["run_cnt"] - before["run_cnt"]
            ns = after["program"]["run_time_ns"] - before["run_time_ns"]
            per_backend = collections.Counter(answers)
            drops = [d for d in stats["drop_detail"] if d["identity"] == "blocked"]
            result = {
                "requests": requests, "answered": len(answers),
                "per_backend": {b.name: per_backend.get(b.name, 0) for b in topo.backends},
                "denied_attempts": denied_attempts, "denied_answered": len(denied),
                "denied_drops": sum(d["packets"] for d in drops if d["reason"] == "policy"),
                "program_ns_per_packet": ns / runs if runs else None,
                "program_runs": runs, "services": len(cfg["services"]),
            }
            _print(out, result, stats)
        finally:
            if daemon:
                daemon.stop()
            Dataplane.detach(Path(bpffs), purge=True)
    return result


class _run_stats:
    """Turn on BPF run-time statistics (kernel.bpf_stats_enabled) meanwhile."""

    def __enter__(self):
        from loader.stats import enable_run_stats

        self._cm = enable_run_stats()
        self._cm.__enter__()

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _print(out: Console, r: dict, stats: dict) -> None:
    t = Table(title=f"{r['answered']} of {r['requests']} requests answered, by backend")
    t.add_column("backend")
    t.add_column("requests", justify="right")
    t.add_column("share", justify="right")
    web = next(s for s in stats["services"] if s["name"] == "web")
    for name, n in r["per_backend"].items():
        t.add_row(name, str(n), f"{100 * n / max(1, r['answered']):.1f}%")
    out.print(t)
    x = Table(title="XDP counters for service web")
    x.add_column("backend")
    x.add_column("packets", justify="right")
    for b in web["backends"]:
        x.add_row(f"{b['address']}:{b['port']}", str(b["packets"]))
    out.print(x)
    out.print(f"denied source 192.0.2.10 (identity [bold]blocked[/]): {r['denied_answered']} of "
              f"{r['denied_attempts']} attempts answered; {r['denied_drops']} packets dropped at XDP "
              f"(reason policy)")
    if r["program_ns_per_packet"]:
        out.print(f"XDP program time: [bold]{r['program_ns_per_packet']:.0f} ns/packet[/] over "
                  f"{r['program_runs']} packets, with {r['services']} services loaded")


def main(args) -> int:
    r = run_demo(requests=args.requests, fillers=args.fillers)
    if args.json:
        print(json.dumps(r, indent=2))
    ok = r["answered"] == r["requests"] and r["denied_answered"] == 0 and r["denied_drops"] > 0
    return 0 if ok else 1
