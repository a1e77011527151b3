"""An established TCP stream through the VIP while the in-kernel generator
floods the same VIP with random-source SYNs (bench/flood.py's lab).

What is asserted is functional: the stream survives, keeps moving and keeps
its conntrack entry; the guard bounds the state the flood writes; the rest
of the flood is forwarded without state (gateway mode turns nothing away),
and the backend's SYN-ACKs come back through the stateless reply path. The
throughput the stream keeps is printed (run with -s); the benchmark
`python -m bench.flood` reports it properly."""

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
        delta = {k: after[k] - before[k] for k in ("ct_new", "stateless", "stateless_replies",
                                                   "new_flow_rate_drops")}
        cpus = len(os.sched_getaffinity(0))
        print(f"\nflood: {sent} SYNs offered in {t2 - t1:.2f}s; {delta}; stream "
              f"{unloaded[1] * 8 / unloaded[0] / 1e9:.2f} Gbit/s unloaded, "
              f"{loaded[1] * 8 / loaded[0] / 1e9:.2f} Gbit/s under the flood")
        assert sent > 3 * (BURST + RATE * SECONDS)             # a flood well over the guard
        # The flood reached the program and went on, with or without state.
        assert delta["ct_new"] + delta["stateless"] >= sent * 0.5
        assert delta["ct_new"] <= cpus * (BURST + RATE * (t2 - t1 + 0.5))
        assert delta["new_flow_rate_drops"] == 0
        assert delta["stateless_replies"] > 0                  # SYN-ACKs translated back
        assert before["stream_entries"] == after["stream_entries"] == 1
        assert not stream.closed and loaded[1] > 0              # still connected and moving
    finally:
        fl.close()
