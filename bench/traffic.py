"""Traffic: delivered packet rate, program time per packet, first-packet
latency.

Rates: the in-kernel generator sends the compiled profile from the gen
namespace in live-frames mode, in calls of up to 2^20 frames, for a given
time; the sink's counters give what was delivered (and misrouted).

Everything runs on the generator's CPU (a veth peer's NAPI runs where its
frames were sent). So that a slow engine gets the CPU rather than the
generator filling a ring that only overflows, the generator keeps at most
a window of frames in flight (struct flow_ctl: the frames it holds back
cost it a map read) and its thread runs at SCHED_IDLE, below ksoftirqd.
`offered` counts the frames it really transmitted.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from loader import enable_run_stats, prog_info, test_run

from .lab import BenchLab
from .profile import GenSpec
from .progs import Generator, Sink, SinkCounts

MAX_CALL = 1 << 20


@contextlib.contextmanager
def idle_priority() -> Iterator[None]:
    """SCHED_IDLE for the calling thread meanwhile (sched_setscheduler(0)
    applies to the calling thread on Linux)."""
    try:
        old = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, old[0], old[1])


@dataclass
class RateResult:
    seconds: float
    offered: int
    delivered: int
    misrouted: int
    unstamped: int
    held: int = 0           # frames the generator kept back (flow control)
    stalls: int = 0         # flow-control windows given up for lost

    @property
    def offered_mpps(self) -> float:
        return self.offered / self.seconds / 1e6

    @property
    def delivered_mpps(self) -> float:
        return self.delivered / self.seconds / 1e6

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 4), "offered": self.offered,
                "delivered": self.delivered, "misrouted": self.misrouted,
                "unstamped": self.unstamped, "held": self.held, "stalls": self.stalls,
                "offered_mpps": round(self.offered_mpps, 5),
                "delivered_mpps": round(self.delivered_mpps, 5)}


def send_for(bl: BenchLab, gen: Generator, sink: Sink, spec: GenSpec, seconds: float,
             max_packets: int | None = None, first_call: int = 4096, window: int = 256) -> RateResult:
    """Send `spec` for about `seconds` (or until `max_packets` frames ran);
    the calls grow from `first_call` frames to what fills a quarter of the
    time. `window`: frames in flight at most (see struct flow_ctl)."""
    gen.configure(spec)
    gen.set_window(window)
    before = sink.counts()
    offered, chunk = 0, first_call
    t0 = time.perf_counter()
    with bl.inside(bl.gen_ns), idle_priority():
        while True:
            if max_packets is not None:
                chunk = min(chunk, max_packets - offered)
            if chunk <= 0:
                break
            c0 = time.perf_counter()
            gen.send(bl.g0, chunk)
            offered += chunk
            took = time.perf_counter() - c0
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
            rate = chunk / max(took, 1e-6)
            chunk = int(min(MAX_CALL, max(first_call, rate * min(seconds / 4, seconds - elapsed))))
    elapsed = time.perf_counter() - t0
    # The last frames may still sit in the ring (256) or in ksoftirqd's backlog.
    settle_deadline = time.perf_counter() + 0.5
    last = sink.counts()
    while time.perf_counter() < settle_deadline:
        time.sleep(0.02)
        now = sink.counts()
        if now == last:
            break
        last = now
    d: SinkCounts = last - before
    fc = gen.flow_ctl()
    return RateResult(elapsed, fc["sent"], d.good, d.misrouted, d.unstamped, fc["held"], fc["stalls"])


def program_ns_under_load(bl: BenchLab, gen: Generator, sink: Sink, spec: GenSpec, prog_fds: dict,
                          seconds: float, window: int = 256) -> dict:
    """run_time_ns / run_cnt of each program while traffic flows (run
    statistics cost a little per packet, so they are on only here)."""
    with enable_run_stats():
        before = {k: prog_info(fd) for k, fd in prog_fds.items()}
        r = send_for(bl, gen, sink, spec, seconds, window=window)
        after = {k: prog_info(fd) for k, fd in prog_fds.items()}
    out = {}
    for k in prog_fds:
        runs = after[k].run_cnt - before[k].run_cnt
        out[k] = {"ns_per_packet": (after[k].run_time_ns - before[k].run_time_ns) / runs if runs else None,
                  "runs": runs}
    out["delivered"] = r.delivered
    out["rate"] = r.as_dict()
    return out


_flow_offset = [10_000_000]      # flow numbers used by test-run so far: never reuse one


def testrun_ns(bl: BenchLab, prog_fd: int, spec: GenSpec, calls: int, new_flows: bool) -> float:
    """Median test-run `duration` with repeat=1 (each call starts from a
    fresh copy of the packet: nothing runs on its own output), in the lb
    namespace as if the packet came in on l0. New flows: packet number k of
    the profile, a k never used before; established: packet 0 every time
    (the first call creates the flow)."""
    return testrun_ns_interleaved(bl, prog_fd, {"": spec}, calls, new_flows)[""]


def testrun_ns_interleaved(bl: BenchLab, prog_fd: int, specs: dict[str, GenSpec], calls: int,
                           new_flows: bool) -> dict[str, float]:
    """testrun_ns() for several profiles (services) at once, their packets
    taking turns: figures measured side by side, under the same noise."""
    pkts: dict[str, list[bytes]] = {}
    for name, spec in specs.items():
        if spec.expected(0) is None:
            raise ValueError("test-run needs a profile without random flow variables")
        pkts[name] = [spec.expected(_flow_offset[0] + i if new_flows else 0) for i in range(calls)]
        _flow_offset[0] += calls
    durations: dict[str, list[int]] = {name: [] for name in specs}
    with bl.inside(bl.lb_ns):
        for i in range(calls):
            for name in specs:
                durations[name].append(test_run(prog_fd, pkts[name][i], ingress_ifindex=bl.l0).duration_ns)
    return {name: float(statistics.median(d)) for name, d in durations.items()}


# --------------------------------------------------------------------------
# first packet of a new service


PROBE = r"""
import socket, sys, time
ifname, interval = sys.argv[1], float(sys.argv[2])
frames = [bytes.fromhex(line) for line in sys.stdin.read().split()]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
print("ready", flush=True)
i = 0
while True:
    s.send(frames[i % len(frames)])
    i += 1
    t = time.perf_counter() + interval
    while time.perf_counter() < t:
        pass
"""


@contextlib.contextmanager
def probe_sender(bl: BenchLab, frames: list[bytes], interval_s: float) -> Iterator[subprocess.Popen]:
    """A process in the gen namespace sending `frames` in turn out of g0,
    one every `interval_s` (busy-waiting: sleep() is too coarse)."""
    proc = bl.lab.popen(bl.gen_ns, [sys.executable, "-c", PROBE, "g0", str(interval_s)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write("\n".join(f.hex() for f in frames))
        proc.stdin.close()
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"probe sender failed: {proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        proc.kill()
        proc.wait()
