"""Single-service update latency with every core busy forwarding traffic
through the LB, next to the same measurement without traffic, in one run.

    python -m bench.loaded_update [--services 20000] [--backends 3] [--updates 1000]
                                  [--interval-ms 2] [--rounds 2] [--json FILE]
                                  [--no-freeze] [--nice N | --fifo P | --slice-us US]

On a gateway, softirq work from XDP keeps every core busy, and the daemon's
updates compete with it for the CPU. Here: the harness's gen -> lb -> sink
lab, xdplb with N services, and the traffic from another process (softirq
work is not the daemon's: no GIL or scheduling group shared with it) with
one thread per CPU, each pinned to its CPU (sched_setaffinity), at the
default policy and nice 0 like ksoftirqd, each running the in-kernel
generator (bench/bpf/gen.c) in BPF test-run's live-frames mode, open loop.
l0 and s0 get one receive queue per CPU (a veth delivers an XDP-transmitted
frame to queue `cpu % queues` and runs that queue's NAPI on the sending
CPU), so each CPU runs the generator, xdplb and the sink for its own frames:
xdplb forwards on every core at once, in softirq. /proc/stat over the loaded
blocks gives each CPU's busy and softirq shares.

The measured operation is what `python -m bench.core` and `xdplb bench`
time: `Reconciler.upsert_service` of one random service with one endpoint
replaced, including the validation of that one service (as the API does),
from this process's main thread, one every `--interval-ms` (API requests or
watch events arriving, not a saturated control plane), in alternating
blocks without and with traffic (`--rounds`), `--updates` of each in all.
Each update's CPU time (its thread's) is reported next to its latency: the
difference is time spent waiting for a CPU. The traffic goes to the last
service (new flows: every packet a conntrack insert), which the updates
leave alone, so the sink can check that no packet reaches a wrong backend.

After the full sync, its million objects are frozen out of the cyclic GC
(gc.freeze(), as Kubernetes mode does after its first sync); --no-freeze
leaves them, as the daemon's config/API mode does today, and the full GC
passes that then land on updates are counted. The calls of maglev's
parallel functions during the measured updates are counted (0 expected).
--nice/--fifo/--slice-us run the updating thread at another priority, to
see what scheduling, not the update's own work, adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from lb import maglev
from lb.lab import Lab, cleanup_stale

from . import lab as blab
from . import profile as prof
from .engines import XdplbEngine, make_services, replace_endpoint
from .progs import Generator, Sink, build
from .sweep import machine_info

CHUNK = 1 << 13          # frames per test-run call of a load thread (~10 ms)
REPO = Path(__file__).resolve().parent.parent


def cpu_times() -> dict[int, list[int]]:
    """/proc/stat per CPU: user nice system idle iowait irq softirq steal (ticks)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0].startswith("cpu") and f[0] != "cpu":
            out[int(f[0][3:])] = [int(x) for x in f[1:9]]
    return out


def busy_share(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per CPU: the share of time busy, and in softirq, between two cpu_times()."""
    out = {}
    for cpu in sorted(after):
        d = [a - b for a, b in zip(after[cpu], before.get(cpu, after[cpu]))]
        total = sum(d) or 1
        out[f"cpu{cpu}"] = {"busy": round(1 - (d[3] + d[4]) / total, 4), "softirq": round(d[6] / total, 4),
                            "system": round(d[2] / total, 4)}
    return out


class Load:
    """The traffic: one worker process (another process, as softirq work is
    not the daemon's: no GIL or scheduler group shared with the updates)
    with one thread per CPU, each pinned to its CPU, running the generator
    program in live-frames mode out of g0 until stop()."""

    def __init__(self, bl: blab.BenchLab, gen: Generator, cpus: list[int]) -> None:
        self.bl, self.gen, self.cpus = bl, gen, cpus
        self.proc: subprocess.Popen | None = None
        self.frames = 0

    def start(self) -> None:
        fd = self.gen.prog.fd
        assert self.gen.spec is not None
        argv = [sys.executable, "-m", "bench.loaded_update", "--worker", str(fd), str(self.bl.g0),
                ",".join(map(str, self.cpus)), self.gen.spec.template.hex()]
        self.proc = self.bl.lab.popen(self.bl.gen_ns, argv, pass_fds=[fd], cwd=REPO, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "running":
            raise RuntimeError(f"load worker failed to start (exit {self.proc.wait()})")
        time.sleep(0.3)                             # every core busy before the first update

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stdin.close()                     # the worker's signal to finish its calls
        out = self.proc.stdout.read()
        if self.proc.wait(30) != 0 or not out.strip().isdigit():
            raise RuntimeError(f"load worker failed (exit {self.proc.returncode}): {out.strip()}")
        self.frames += int(out)
        self.proc = None


def worker(prog_fd: int, ifindex: int, cpus: list[int], template: bytes) -> int:
    """The load process: a thread per CPU sending CHUNK frames per test-run
    call until stdin closes; prints the frames sent."""
    from loader import BPF_F_TEST_XDP_LIVE_FRAMES
    from loader import test_run

    stop = threading.Event()
    sent = [0] * len(cpus)
    errors: list[BaseException] = []

    def run(i: int, cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})          # this thread only
            while not stop.is_set():
                test_run(prog_fd, template, repeat=CHUNK, ingress_ifindex=ifindex,
                         flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=256)
                sent[i] += CHUNK
        except BaseException as e:                  # noqa: BLE001 - reported below
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(cpus)]
    for t in threads:
        t.start()
    print("running", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        print(f"error: {errors[0]!r}", flush=True)
        return 1
    print(sum(sent), flush=True)
    return 0


def request_slice(ns: int) -> None:
    """sched_setattr(0, {SCHED_OTHER, sched_runtime=ns}) for the calling
    thread: since Linux 6.12 a fair task may ask for its own slice (0.1-100
    ms); a short one lets it preempt the running task when it wakes
    (EEVDF's earlier deadline) instead of waiting out that task's slice."""
    import ctypes

    class SchedAttr(ctypes.Structure):
        _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                    ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                    ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                    ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=0, sched_nice=os.getpriority(os.PRIO_PROCESS, 0),
                     sched_runtime=ns)
    nr = {"x86_64": 314, "aarch64": 274}[platform.machine()]
    if libc.syscall(nr, 0, ctypes.byref(attr), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sched_setattr(slice {ns} ns): {os.strerror(err)}")


_saved: dict[str, object] = {}


def count_parallel_calls() -> dict[str, int]:
    """Count the calls of maglev's parallel functions (numba parallel
    regions) from now on; the counts fill the returned dict."""
    calls: dict[str, int] = {}
    for name in maglev.PARALLEL_FUNCTIONS:
        fn = _saved.setdefault(name, getattr(maglev, name))

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        setattr(maglev, name, counted)
    return calls


def uncount_parallel_calls() -> None:
    for name, fn in _saved.items():
        setattr(maglev, name, fn)
    _saved.clear()


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    return {"count": len(v), "p50_ms": round(1e3 * q(0.5), 4), "p90_ms": round(1e3 * q(0.9), 4),
            "p99_ms": round(1e3 * q(0.99), 4), "max_ms": round(1e3 * v[-1], 4),
            "mean_ms": round(1e3 * statistics.fmean(v), 4), "over_1ms": sum(x > 1e-3 for x in v)}


class GcWatch:
    """Cyclic-GC passes while installed (they stop every thread): how many
    walked the oldest generation, and the longest pass of any generation."""

    def __init__(self) -> None:
        self.count, self.max_ms, self._t0 = 0, 0.0, 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter_ns()
        elif self._t0:
            self.count += info.get("generation") == 2
            self.max_ms = max(self.max_ms, (time.perf_counter_ns() - self._t0) / 1e6)

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def set_priority(nice: int | None, fifo: int | None) -> None:
    """For the calling thread: a nice value (and the same for this process's
    autogroup, which is what competes with other sessions' tasks while
    kernel.sched_autogroup_enabled=1), or SCHED_FIFO at `fifo`."""
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)         # on Linux: this thread
        ag = Path("/proc/self/autogroup")
        if ag.exists():
            ag.write_text(f"{nice}\n")
    if fifo is not None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo))


def measure(n: int, backends: int, updates: int, interval_s: float, rounds: int, freeze: bool = True,
            slice_us: float = 0, nice: int | None = None, fifo: int | None = None, seed: int = 1) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if slice_us:
        request_slice(int(slice_us * 1000))
    set_priority(nice, fifo)
    cleanup_stale("xb")                             # labs of benchmark runs that were killed
    with Lab(prefix="xb") as lab, Generator() as gen:
        bl = blab.build(lab)
        # One receive queue per CPU on the veths that receive XDP frames.
        q = str(len(cpus))
        lab.run(bl.lb_ns, ["ethtool", "-L", "l0", "rx", q])
        lab.run(bl.sink_ns, ["ethtool", "-L", "s0", "rx", q])
        with Sink(gen) as sink:
            with bl.inside(bl.sink_ns):
                sink.attach(bl.s0)
            sink.configure(check=True)
            eng = XdplbEngine(bl)
            parallel_calls: dict[str, int] = {}
            try:
                services = make_services(n, backends, "udp")
                sync = eng.full_sync(services)
                target = services[-1]
                sink.allow([(a, p, target.proto, target.stamp) for a, p in target.endpoints])
                spec, _, _ = prof.load("udp_flows", {"vip": target.vip, "port": target.port,
                                                     "stamp": target.stamp, "src_mac": bl.g0_mac,
                                                     "dst_mac": bl.l0_mac, "flows": 0})
                gen.configure(spec)
                gen.set_window(0)                   # open loop
                load = Load(bl, gen, cpus)
                rng = random.Random(seed)
                current = list(services)
                k = iter(range(10**9))

                def one() -> tuple[float, float]:
                    """(wall, this thread's CPU time) of one update, seconds."""
                    i = rng.randrange(n - 1)        # never the traffic's service
                    new = replace_endpoint(current[i], next(k))
                    c0 = time.thread_time_ns()
                    dt = eng.update(current[i], new)
                    current[i] = new
                    return dt, (time.thread_time_ns() - c0) / 1e9

                if freeze:
                    # As Kubernetes mode does after its first sync (lb/sources/
                    # kubernetes.py): the full sync's million objects frozen,
                    # out of the collector's passes.
                    gc.collect()
                    gc.freeze()
                for _ in range(50):                 # warm-up: imports, numba's cache, allocator
                    one()
                parallel_calls = count_parallel_calls()
                kinds = ("unloaded", "loaded")
                lat: dict[str, list[float]] = {k: [] for k in kinds}
                cpu_time: dict[str, list[float]] = {k: [] for k in kinds}
                cpu: dict[str, list] = {k: [] for k in kinds}
                gcs = {k: GcWatch() for k in kinds}
                before_sink, t_loaded = sink.counts(), 0.0
                per_block = max(1, updates // rounds)
                for _ in range(rounds):
                    for kind in kinds:
                        if kind == "loaded":
                            load.start()
                        t0, c0 = time.perf_counter(), cpu_times()
                        try:
                            with gcs[kind]:
                                for _ in range(per_block):
                                    wall, used = one()
                                    lat[kind].append(wall)
                                    cpu_time[kind].append(used)
                                    time.sleep(interval_s)
                        finally:
                            c1 = cpu_times()
                            if kind == "loaded":
                                t_loaded += time.perf_counter() - t0
                                load.stop()
                        cpu[kind].append(busy_share(c0, c1))
                counts = sink.counts() - before_sink
                sent = load.frames
            finally:
                uncount_parallel_calls()
                eng.close()
                if freeze:
                    gc.unfreeze()
    out = {"services": n, "backends_per_service": backends, "full_sync_s": round(sync.seconds, 3),
           "interval_ms": 1e3 * interval_s, "rounds": rounds, "cpus": cpus, "gc_frozen": freeze,
           "slice_us": slice_us or None, "nice": nice, "fifo": fifo,
           "parallel_regions_entered": sum(parallel_calls.values())}
    for kind in kinds:
        out[kind] = quantiles(lat[kind]) | {"cpu_time": quantiles(cpu_time[kind]),
                                            "gc_full_passes": gcs[kind].count,
                                            "gc_longest_pass_ms": round(gcs[kind].max_ms, 3)}
        out[f"cpu_{kind}"] = cpu[kind]
    out["traffic"] = {"seconds": round(t_loaded, 3), "generated": sent,
                      "delivered": counts.good, "misrouted": counts.misrouted,
                      "generated_mpps": round(sent / t_loaded / 1e6, 3) if t_loaded else 0.0,
                      "delivered_mpps": round(counts.good / t_loaded / 1e6, 3) if t_loaded else 0.0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=20000)
    p.add_argument("--backends", type=int, default=3)
    p.add_argument("--updates", type=int, default=1000, help="of each kind (unloaded, loaded)")
    p.add_argument("--interval-ms", type=float, default=2.0, help="pause between two updates")
    p.add_argument("--rounds", type=int, default=2, help="alternating blocks of each kind")
    p.add_argument("--no-freeze", action="store_true",
                   help="leave the full sync's objects to the cyclic GC (the daemon's API mode today)")
    p.add_argument("--slice-us", type=float, default=0,
                   help="ask the scheduler for this slice for the updating thread (sched_setattr)")
    p.add_argument("--nice", type=int, help="nice value of the updating thread (and of its autogroup)")
    p.add_argument("--fifo", type=int, help="SCHED_FIFO priority for the updating thread")
    p.add_argument("--json")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)     # FD IFINDEX CPUS TEMPLATE (the load)
    a = p.parse_args(argv)
    if a.worker:
        fd, ifindex, cpus, template = a.worker
        return worker(int(fd), int(ifindex), [int(c) for c in cpus.split(",")], bytes.fromhex(template))
    build()
    r = measure(a.services, a.backends, a.updates, a.interval_ms / 1e3, a.rounds, freeze=not a.no_freeze,
                slice_us=a.slice_us, nice=a.nice, fifo=a.fifo)
    m = machine_info()
    out = {"machine": {**{k: m.get(k) for k in ("hostname", "kernel", "cpus", "cpu_model", "python",
                                                 "loadavg_start")}, "commit": m["versions"]["xdplb_commit"]},
           "command": "python -m bench.loaded_update " + " ".join(argv if argv is not None else sys.argv[1:]),
           "result": r}
    print(f"{r['services']} services x {r['backends_per_service']} backends, one update every "
          f"{r['interval_ms']:g} ms, {r['rounds']} rounds, GC {'frozen' if r['gc_frozen'] else 'as is'}, "
          f"slice {r['slice_us'] or 'default'}, nice {r['nice'] or 0}, "
          f"{'SCHED_FIFO ' + str(r['fifo']) if r['fifo'] else 'SCHED_OTHER'}")
    print("| traffic | updates | p50 ms | p90 ms | p99 ms | max ms | > 1 ms | CPU p50 / p99 ms | GC: full passes, longest pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("unloaded", "loaded"):
        s = r[kind]
        print(f"| {kind} | {s['count']} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | "
              f"{s['max_ms']:.3f} | {s['over_1ms']} | {s['cpu_time']['p50_ms']:.3f} / "
              f"{s['cpu_time']['p99_ms']:.3f} | {s['gc_full_passes']}, {s['gc_longest_pass_ms']:.1f} ms |")
    t = r["traffic"]
    busy = ", ".join(f"{c} {100 * min(b[c]['busy'] for b in r['cpu_loaded']):.0f}% busy "
                     f"({100 * statistics.fmean(b[c]['softirq'] for b in r['cpu_loaded']):.0f}% softirq)"
                     for c in r["cpu_loaded"][0])
    print(f"loaded: {t['generated_mpps']} Mpps generated, {t['delivered_mpps']} Mpps delivered through xdplb, "
          f"{t['misrouted']} misrouted; {busy} (least busy block)")
    print(f"numba parallel regions entered by the measured updates: {r['parallel_regions_entered']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if not t["misrouted"] else 1


if __name__ == "__main__":
    sys.exit(main())
