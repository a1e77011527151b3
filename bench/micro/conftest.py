"""Microbenchmarks (pytest-benchmark), outside the default `tests/` run.

    make bench-micro        run them and compare ratios with bench/micro/baseline.json
    make bench-micro-save   record that baseline (on a quiet machine)

Absolute times differ from one machine to the next (the CI gate once failed
on an Intel VM against times recorded on an AMD one), so the gate compares
ratios measured in the same run: every benchmark is timed through the
`measure` fixture, which runs a fixed *reference* workload between rounds
(untimed by pytest-benchmark, timed by us), interleaved with them, and
stores the reference's median next to the benchmark's (extra_info). The
reference is the kind of work the benchmark does:

- "python": the interpreter (dicts, tuples, ints, attribute and method
  calls), for control-plane code;
- "native": compiled code (hashlib's blake2b over 32 KiB, and numpy
  gathering 4 MiB in random order), for numba's Maglev builds;
- "kernel": system calls (getppid, a pipe round trip), for map updates and
  BPF test-run;

or another benchmark of the same run (its name). bench/microgate.py turns
the JSON into ratios and judges them. None of the references uses numba, let
alone a parallel region.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "bpf", "bench-bpf"], check=True)
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
    return ROOT / "bpf" / "xdp" / "xdplb.o"


# ---- the reference workloads (fixed and deterministic) -----------------------


def _python_work() -> int:
    d: dict = {}
    acc = 0
    for i in range(400):
        k = (i * 2654435761) & 0xFFFFFFFF
        d[k] = (k >> 16, k & 0xFFFF, i)
        acc += len(d) + d[k][1] % 7
    return acc + sum(a ^ b for a, b, _ in d.values())


_BLOCK = bytes(range(256)) * 128          # 32 KiB
_SOURCE = np.arange(1 << 20, dtype=np.int32)                        # 4 MiB, as a 1M-slot pool
_ORDER = np.random.default_rng(2016).permutation(1 << 20)


def _native_work() -> int:
    """Integer code in the CPU and a walk of 4 MiB in random order: numba's
    Maglev builds are as sensitive to the memory system (caches shared with
    the other core) as to the core (measured: a busy sibling slowed a
    1000-service build 2-3x and this walk alike, blake2b alone not at all)."""
    hashlib.blake2b(_BLOCK, digest_size=16).digest()
    return int(_SOURCE[_ORDER].sum())


_PIPE = os.pipe()


def _kernel_work() -> None:
    r, w = _PIPE
    for _ in range(20):
        os.getppid()
    for _ in range(5):
        os.write(w, b"x" * 64)
        os.read(r, 64)


REFERENCES = {"python": _python_work, "native": _native_work, "kernel": _kernel_work}
REFERENCE_SAMPLES = 200


@pytest.fixture
def measure(benchmark):
    """measure(fn, rounds, reference, warmup=...): benchmark.pedantic of fn,
    one call per round, with a timed call of the reference workload before
    every k-th round (k: about REFERENCE_SAMPLES calls in all, and every
    round when there are fewer; the other rounds run warm, right after the
    previous one). The reference may also name another benchmark of the run."""

    def run(fn, rounds: int, reference: str, warmup: int = 3, args: tuple = ()):
        work = REFERENCES.get(reference)
        ref: list[float] = []
        every = max(1, rounds // REFERENCE_SAMPLES)
        count = [0]

        def setup():
            if work is not None and count[0] % every == 0:
                t0 = time.perf_counter()
                work()
                ref.append(time.perf_counter() - t0)
            count[0] += 1
            return args, {}

        for _ in range(warmup):
            setup()
            fn(*args)
        ref.clear()
        benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)
        benchmark.extra_info["reference"] = reference
        if ref:
            benchmark.extra_info["reference_median_s"] = statistics.median(ref)
            benchmark.extra_info["reference_rounds"] = len(ref)

    return run
