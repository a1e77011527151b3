"""The demo as a user runs it: the whole thing, and Ctrl-C in the middle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _leftovers(pid: int) -> list[str]:
    ns = [n for n in os.listdir("/var/run/netns")] if os.path.isdir("/var/run/netns") else []
    left = [n for n in ns if n.startswith(f"xl{pid}-")]
    if Path(f"/sys/fs/bpf/xdplb-demo-{pid}").exists():
        left.append(f"/sys/fs/bpf/xdplb-demo-{pid}")
    return left


def test_demo_balances_and_drops_denied(bpf_object):
    p = subprocess.run([sys.executable, "-m", "lb.cli", "demo", "--fillers", "200", "--requests", "300",
                        "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout[p.stdout.index("{\n"):])
    assert r["answered"] == 300 and r["denied_answered"] == 0 and r["denied_drops"] >= 5
    # Flows are hashed independently: each share is binomial (sd 2.7% at 300).
    # +-10% is beyond 3.5 sd, so this fails on a real imbalance, not on luck.
    for n in r["per_backend"].values():
        assert 0.233 <= n / 300 <= 0.433, r["per_backend"]


def test_demo_tears_down_on_ctrl_c(bpf_object):
    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "demo", "--fillers", "100", "--requests", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        for line in p.stdout:
            if "sending" in line or time.time() > deadline:
                break
        assert _leftovers(p.pid), "the demo should be running with its lab"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert _leftovers(p.pid) == []


def test_scaleout_demo_with_three_nodes(bpf_object):
    """`xdplb demo --nodes 3` as a user runs it (~40 s): the router's
    multipath route over 3 nodes, 1000 new connections answered, spread
    over every node; one node's links down, 1000 answered by the other two;
    exit status 0 only then, and nothing left behind."""
    import re

    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "demo", "--nodes", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "3 next hops" in out, out
    assert "all nodes: 1000 of 1000" in out and "without lb3: 1000 of 1000" in out, out
    lb3 = [int(n) for n in re.findall(r"lb3\s+│\s+(\d+)\s+│", out)]
    assert len(lb3) == 2 and lb3[0] > 200 and lb3[1] == 0, out
    assert _leftovers(p.pid) == [] and not list(Path("/sys/fs/bpf").glob(f"xdplb-demo-{p.pid}*"))
