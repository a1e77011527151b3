"""An established TCP stream through the VIP while the in-kernel generator
floods the same VIP with random-source SYNs (bench/flood.py's lab).

What is asserted is functional: the stream survives and keeps moving, the
guard bounds the state the flood writes, and the excess is dropped and
counted. The throughput the stream keeps is printed (run with -s); the
benchmark `python -m bench.flood` reports it properly."""

from __future__ import annotations

import os
import time

from bench.flood import FloodLab
from lb.config import FloodGuard

RATE, BURST, SECONDS = 20_000, 2_000, 2.0


def test_stream_survives_a_syn_flood_and_the_guard_bounds_new_state(bpf_object):
    fl = FloodLab(FloodGuard(new_flows_per_second=RATE, burst=BURST))
    try:
        stream = fl.start_stream()
        time.sleep(1.0)
        t0 = time.monotonic()
        time.sleep(SECONDS)
        t1 = time.monotonic()
        before = fl.counters()
        sent = fl.flood(SECONDS)
        t2 = time.monotonic()
        after = fl.counters()
        time.sleep(0.3)
        unloaded = stream.bytes_between(t0, t1)
        loaded = stream.bytes_between(t1, t2)
        new_state = after["ct_new"] - before["ct_new"]
        dropped = after["new_flow_rate_drops"] - before["new_flow_rate_drops"]
        cpus = len(os.sched_getaffinity(0))
        print(f"\nflood: {sent} SYNs offered in {t2 - t1:.2f}s; {new_state} got state, {dropped} dropped "
              f"(new_flow_rate); stream {unloaded[1] * 8 / unloaded[0] / 1e9:.2f} Gbit/s unloaded, "
              f"{loaded[1] * 8 / loaded[0] / 1e9:.2f} Gbit/s under the flood")
        assert sent > 3 * (BURST + RATE * SECONDS)             # a flood well over the guard
        assert new_state + dropped >= sent * 0.5                # the flood reached the program
        assert new_state <= cpus * (BURST + RATE * (t2 - t1 + 0.5))
        assert dropped > 0
        assert not stream.closed and loaded[1] > 0              # still connected and moving
    finally:
        fl.close()
