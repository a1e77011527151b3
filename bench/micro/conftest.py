"""Microbenchmarks (pytest-benchmark), outside the default `tests/` run:

    make bench-micro        compare with the stored baseline (fails when a
                            median is more than 150% slower)
    make bench-micro-save   store a new baseline (bench/micro/baseline/)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "bpf", "bench-bpf"], check=True)
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    return ROOT / "bpf" / "xdp" / "xdplb.o"
