"""Shared fixtures. Tests that touch the kernel run as root (CI does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "bpf"], check=True)
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    return ROOT / "bpf" / "xdp" / "xdplb.o"


@pytest.fixture
def one_cpu():
    """Keep the test on one CPU: per-CPU budgets (token buckets) then count
    exactly, since BPF test-run runs on the calling CPU."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    yield
    os.sched_setaffinity(0, saved)


@pytest.fixture(scope="module")
def lab():
    """A client, the LB and 3 backends running real servers. Nothing is
    warmed: the LB's neighbour table starts as a real gateway's does."""
    from lb.lab import Lab, build_lb_lab, start_backends

    with Lab() as lab:
        topo = build_lb_lab(lab, 3)
        start_backends(lab, topo)
        yield lab, topo


@pytest.fixture
def daemon_factory(lab, bpf_object, tmp_path):
    """Start `xdplb run` in the lab's lb namespace; always stop and detach."""
    from lbtest import daemons

    with daemons(lab[1], tmp_path) as start:
        yield start
