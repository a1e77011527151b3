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


@pytest.fixture(scope="module")
def lab():
    """A client, the LB and 3 backends running real servers."""
    from lb.lab import Lab, build_lb_lab, start_backends, warm_neighbours

    with Lab() as lab:
        topo = build_lb_lab(lab, 3)
        start_backends(lab, topo)
        warm_neighbours(topo)
        yield lab, topo
