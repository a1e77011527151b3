"""Microbenchmarks of the pieces that set the control and data plane's
figures: Maglev table builds, map updates, and the program's test-run time.
Run with `make bench-micro` (see conftest.py): each is timed next to a
reference workload, and the gate compares the ratio (bench/microgate.py)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from bench import lab as blab
from bench import profile as prof
from bench.engines import XdplbEngine, make_services
from bench.progs import build
from lb import maglev
from lb.lab import Lab
from loader import test_run


def _rows(services: int, backends: int) -> list[list[tuple[str, int]]]:
    return [[(f"10.{128 + s // 65536}.{(s // 256) % 256}.{s % 256}:{8000 + b}", 1) for b in range(backends)]
            for s in range(services)]


def test_maglev_build_one_service(measure):
    """The default path of a small update: serial, no parallel region."""
    rows = _rows(1, 3)
    maglev.build_tables(rows)                   # numba: compile (or load the cache) first
    measure(maglev.build_tables, 3000, "python", args=(rows,))


def test_maglev_build_1000_services_x_10(measure):
    """A batch, serially: the same work on any number of free cores."""
    rows = _rows(1000, 10)
    measure(lambda: maglev.build_tables(rows, parallel=False), 25, "native")


def test_maglev_build_1000_services_x_10_parallel(measure):
    """The full sync's parallel build, against the serial one of this run:
    about 0.5 with two free cores, up to ~1.5 when the other core is busy
    (the region waits for a thread); more is a regression of the parallel
    path itself."""
    rows = _rows(1000, 10)
    measure(lambda: maglev.build_tables(rows, parallel=True), 25, "test_maglev_build_1000_services_x_10")


@pytest.fixture(scope="module")
def xdplb(bpf_object):
    build()
    with Lab(prefix="xbm") as lab:
        bl = blab.build(lab)
        eng = XdplbEngine(bl)
        try:
            eng.full_sync(make_services(1000, 3, "udp"))
            yield bl, eng
        finally:
            eng.close()


def test_services_map_update(measure, xdplb):
    _, eng = xdplb
    m = eng.dp.maps["services"]
    key = m.key_type(port=0x5000, proto=17, family=2)
    key.vip[0] = int.from_bytes(IPv4Address("10.111.0.1").packed, "little")
    val = m.value_type(svc_id=60000)
    measure(m.update, 5000, "kernel", args=(key, val))
    m.delete(key)


def test_single_service_update(measure, xdplb):
    """Reconciler.upsert_service of one service with a changed endpoint."""
    from bench.engines import replace_endpoint

    _, eng = xdplb
    svc = eng.services[500]
    k = iter(range(10**9))
    measure(lambda: eng.update(svc, replace_endpoint(svc, next(k))), 300, "python", warmup=20)


@pytest.mark.parametrize("kind", ["established", "new"])
def test_program_testrun(measure, benchmark, xdplb, kind):
    """One BPF_PROG_TEST_RUN of xdplb (repeat=1); the kernel's own duration
    is in extra_info."""
    bl, eng = xdplb
    svc = eng.services[-1]
    spec, _, _ = prof.load("udp_flows", {"vip": svc.vip, "port": svc.port, "stamp": svc.stamp,
                                         "src_mac": bl.g0_mac, "dst_mac": bl.l0_mac})
    rounds, warmup = 2000, 10
    pkts = [spec.expected(k if kind == "new" else 0) for k in range(1, rounds + warmup + 1)]
    it = iter(pkts)
    fd = eng.program_fd()
    durations = []

    def once():
        durations.append(test_run(fd, next(it), ingress_ifindex=bl.l0).duration_ns)

    with bl.inside(bl.lb_ns):          # fib lookups see the lab's routes
        measure(once, rounds, "kernel", warmup=warmup)
    durations.sort()
    benchmark.extra_info["kernel_duration_ns_median"] = durations[len(durations) // 2]
