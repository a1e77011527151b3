"""Health-check throughput and CPU: how many probes/s the checker sustains
and what it costs, against local listeners (no root, no lab).

    python -m bench.health [--backends 2000] [--interval 1.0] [--type tcp|http]
                           [--seconds 10] [--max-in-flight 256] [--max-rate R]
                           [--json out.json]

The listeners run in a separate process (`--serve`), so the figure is the
checker's own CPU: this process's CPU time over the measured window, in
which only the checker's thread is busy. Targets are 127.0.0.x:port pairs,
as many distinct ones as there are backends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lb.config import config_from_dict
from lb.health import HealthChecker

PORT_BASE = 21000
PORTS = 100                 # listeners; backends spread over 127.0.0.1..n
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"


def serve(ports: int) -> None:
    """Accept on PORT_BASE.. PORT_BASE+ports-1; answer any data with 200."""
    sel = selectors.DefaultSelector()
    for i in range(ports):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", PORT_BASE + i))
        s.listen(4096)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data is None:                 # a listener
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, True)
            else:
                try:
                    data = sock.recv(4096)
                    if data:
                        sock.send(RESPONSE)
                except OSError:
                    data = b""
                sel.unregister(sock)
                sock.close()


def config(backends: int, interval: float, check_type: str, per_service: int = 10) -> dict:
    hc = {"type": check_type, "interval": interval, "timeout": min(0.5, interval / 2)}
    services = []
    for s in range((backends + per_service - 1) // per_service):
        bk = []
        for j in range(per_service):
            i = s * per_service + j
            if i < backends:
                bk.append(f"127.0.{1 + i // PORTS // 250}.{1 + i // PORTS % 250}:{PORT_BASE + i % PORTS}")
        services.append({"name": f"s{s}", "vip": f"10.96.{s // 250}.{s % 250 + 1}", "port": 80,
                         "protocol": "tcp", "backends": bk, "health_check": hc})
    return {"interfaces": ["lo"], "services": services}


def measure(backends: int, interval: float, check_type: str, seconds: float,
            max_in_flight: int, max_rate: float | None) -> dict:
    cfg = config_from_dict(config(backends, interval, check_type))
    checker = HealthChecker(max_in_flight=max_in_flight, max_rate=max_rate)
    checker.update(cfg)
    checker.start()
    try:
        time.sleep(min(3.0, 2 * interval + 1))          # warm up: first round spread over the interval
        p0, c0, t0 = checker.probes, os.times(), time.monotonic()
        lag = 0.0
        end = t0 + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            lag = max(lag, checker.lag)
        p1, c1, t1 = checker.probes, os.times(), time.monotonic()
        summary = checker.summary()
    finally:
        checker.stop()
    rate = (p1 - p0) / (t1 - t0)
    user, system = c1.user - c0.user, c1.system - c0.system
    cpu = (user + system) / (t1 - t0)
    return {"backends": backends, "interval_s": interval, "type": check_type,
            "max_in_flight": max_in_flight, "max_rate": max_rate, "wanted_per_s": round(backends / interval),
            "probes_per_s": round(rate), "cpu_core_fraction": round(cpu, 3),
            "us_cpu_per_probe": round(1e6 * cpu / rate, 1) if rate else None,
            # On loopback the kernel runs both ends' TCP in this process's
            # context: most of `system` is the listener's side too.
            "user_fraction": round(user / (user + system), 2) if user + system else None,
            "up": summary["up"], "down": summary["down"], "peak_in_flight": summary["peak_in_flight"],
            "max_lag_s": round(lag, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", type=int, nargs="+", default=[2000])
    p.add_argument("--interval", type=float, nargs="+", default=[1.0])
    p.add_argument("--type", choices=["tcp", "http"], nargs="+", default=["tcp"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-rate", type=float, default=None,
                   help="the checker's probes/s cap (default: none, to find the ceiling)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(PORTS)
        return 0
    server = subprocess.Popen([sys.executable, "-m", "bench.health", "--serve"], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert server.stdout.readline() == b"ready\n"
        results = []
        for t in a.type:
            for n in a.backends:
                for iv in a.interval:
                    r = measure(n, iv, t, a.seconds, a.max_in_flight, a.max_rate)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                        "kernel": platform.release()},
                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
