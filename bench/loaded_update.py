"""Single-service update latency through the daemon's API, with every
core busy forwarding traffic through the LB, next to the same measurement
without traffic, in one run.

    python -m bench.loaded_update [--services 20000] [--backends 3] [--updates 1000]
                                  [--interval-ms 2] [--rounds 2] [--json FILE]

What is measured is what a user or controller waits for: `xdplb run` (a
real daemon process, in the lab's LB namespace, with N services from its
config file) gets `upsert_service` of one random service with one endpoint
replaced, over its API socket (lb.api.call: connect, JSON request, the
daemon's validation, reconcile and map writes, JSON reply), from this
process, one every `--interval-ms` (API requests arriving, not a saturated
control plane), in alternating blocks without and with traffic
(`--rounds`), `--updates` of each in all. The reply comes after the maps
are written; each update is then checked in the pinned maps themselves (the
service's Maglev table holds exactly the new endpoints), outside the timed
window. Next to each latency: the daemon process's CPU time over the call
(all its threads: the difference is time spent waiting for a CPU or the
lock) and the reconciler's own time from the reply.

The traffic: the harness's gen -> lb -> sink lab, from another process
(softirq work is not the daemon's) with one thread per CPU, each pinned to
its CPU (sched_setaffinity), at the default policy and nice 0 like
ksoftirqd, each running the in-kernel generator (bench/bpf/gen.c) in BPF
test-run's live-frames mode, open loop. l0 and s0 get one receive queue per
CPU (a veth delivers an XDP-transmitted frame to queue `cpu % queues` and
runs that queue's NAPI on the sending CPU), so each CPU runs the generator,
xdplb and the sink for its own frames: xdplb forwards on every core at
once, in softirq. /proc/stat over the loaded blocks gives each CPU's busy
and softirq shares. The traffic goes to the last service (new flows: every
packet a conntrack insert), which the updates leave alone, so the sink can
check that no packet reaches a wrong backend.

The daemon runs as `xdplb run` does in config mode: after its first apply
it freezes that state out of the cyclic GC (lb.daemon.freeze_state).
tests/test_reconcile.py checks that one-service updates enter no numba
parallel region.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import numpy as np

from lb.dataplane import Constants, Dataplane, addr_word, default_object_path, htons, ntohs, word_addr
from lb.demo import DaemonProcess
from lb.lab import Lab, cleanup_stale
from lb.reconcile import PROTOCOLS
from loader import BpfObject, Map

from . import lab as blab
from . import profile as prof
from .engines import BService, make_services, replace_endpoint, xdplb_config
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


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    return {"count": len(v), "p50_ms": round(1e3 * q(0.5), 4), "p90_ms": round(1e3 * q(0.9), 4),
            "p99_ms": round(1e3 * q(0.99), 4), "max_ms": round(1e3 * v[-1], 4),
            "mean_ms": round(1e3 * statistics.fmean(v), 4), "over_1ms": sum(x > 1e-3 for x in v)}


def process_cpu_ns(pid: int) -> int:
    """CPU time of process `pid`, all its threads (its CPUCLOCK_SCHED clock,
    as clock_getcpuclockid(3) makes it)."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


class PinnedMaps:
    """The daemon's services, backends and Maglev pool, opened from their
    pins: what a packet would find, read from the maps themselves."""

    def __init__(self, bpffs: str) -> None:
        obj = BpfObject(default_object_path())
        try:
            self.c, lay = Constants(obj.btf.enums()), obj.layouts
            self.maps = {name: Map.open_pinned(Path(bpffs) / "maps" / name, lay.map_key_type(name),
                                               lay.map_value_type(name), name=name)
                         for name in ("services", "backends", "maglev_pool")}
            self.backends = self.maps["backends"].numpy_view(lay.dtype("backend"), writable=False)
        finally:
            obj.close()
        chunk = self.maps["maglev_pool"].value_size // 4
        self.pool = self.maps["maglev_pool"].numpy_view(np.dtype((np.uint32, chunk)), writable=False).reshape(-1)

    def members(self, s: BService) -> set[tuple[str, int]]:
        """(address, port) of the backends in the service's Maglev table."""
        sm = self.maps["services"]
        key = sm.key_type(port=htons(s.port), proto=PROTOCOLS[s.proto], family=self.c.FAMILY_IPV4)
        key.vip[0] = addr_word(IPv4Address(s.vip))
        v = sm.lookup(key)
        if v is None:
            return set()
        recs = self.backends[np.unique(self.pool[v.ring_offset:v.ring_offset + v.ring_size])]
        return {(str(word_addr(int(r["addr"][0]))), ntohs(int(r["port"]))) for r in recs}

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def measure(n: int, backends: int, updates: int, interval_s: float, rounds: int, seed: int = 1) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    cleanup_stale("xb")                             # labs of benchmark runs that were killed
    bpffs = f"/sys/fs/bpf/xdplb-loaded-update-{os.getpid()}"
    with Lab(prefix="xb") as lab, Generator() as gen, tempfile.TemporaryDirectory(prefix="xdplb-lu-") as tmp:
        bl = blab.build(lab)
        # One receive queue per CPU on the veths that receive XDP frames.
        q = str(len(cpus))
        lab.run(bl.lb_ns, ["ethtool", "-L", "l0", "rx", q])
        lab.run(bl.sink_ns, ["ethtool", "-L", "s0", "rx", q])
        with Sink(gen) as sink:
            with bl.inside(bl.sink_ns):
                sink.attach(bl.s0)
            sink.configure(check=True)
            services = make_services(n, backends, "udp")
            cfg = xdplb_config(services, bpffs, n, backends) | {
                "api_socket": f"/run/xdplb/loaded-update-{os.getpid()}.sock", "metrics_address": False}
            daemon, maps = None, None
            try:
                t0 = time.perf_counter()
                daemon = DaemonProcess(cfg, Path(tmp), bl.lb_ns).start(timeout=900)
                start_s = time.perf_counter() - t0
                maps = PinnedMaps(bpffs)
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
                pid = daemon.proc.pid

                def one() -> tuple[float, float, float]:
                    """(latency, the daemon's CPU time, its reconcile time) of one
                    update, seconds; then its result checked in the maps."""
                    i = rng.randrange(n - 1)        # never the traffic's service
                    new = replace_endpoint(current[i], next(k))
                    body = new.xdplb()
                    c0 = process_cpu_ns(pid)
                    t0 = time.perf_counter()
                    res = daemon.call("upsert_service", service=body)
                    dt = time.perf_counter() - t0
                    used = (process_cpu_ns(pid) - c0) / 1e9
                    current[i] = new
                    if res.get("updated") != 1 or maps.members(new) != set(new.endpoints):
                        raise RuntimeError(f"update of {new.name} not in the maps after the reply: {res}")
                    return dt, used, res["seconds"]

                for _ in range(50):                 # warm-up: first touch of each path, allocator
                    one()
                kinds = ("unloaded", "loaded")
                lat: dict[str, list[list[float]]] = {kind: [[], [], []] for kind in kinds}
                cpu: dict[str, list] = {kind: [] for kind in kinds}
                before_sink, t_loaded = sink.counts(), 0.0
                per_block = max(1, updates // rounds)
                for _ in range(rounds):
                    for kind in kinds:
                        if kind == "loaded":
                            load.start()
                        t0, c0 = time.perf_counter(), cpu_times()
                        try:
                            for _ in range(per_block):
                                for column, x in zip(lat[kind], one()):
                                    column.append(x)
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
                if maps is not None:
                    maps.close()
                if daemon is not None:
                    daemon.kill(signal.SIGKILL)
                Dataplane.detach(Path(bpffs), purge=True)
    out = {"services": n, "backends_per_service": backends, "daemon_start_s": round(start_s, 3),
           "interval_ms": 1e3 * interval_s, "rounds": rounds, "cpus": cpus,
           "measured": "API upsert_service round trip (lb.api.call) to a running `xdplb run`, "
                       "each checked in the pinned maps after the reply"}
    for kind in kinds:
        wall, used, reconcile = lat[kind]
        out[kind] = quantiles(wall) | {"daemon_cpu": quantiles(used), "reconcile": quantiles(reconcile)}
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
    p.add_argument("--json")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)     # FD IFINDEX CPUS TEMPLATE (the load)
    a = p.parse_args(argv)
    if a.worker:
        fd, ifindex, cpus, template = a.worker
        return worker(int(fd), int(ifindex), [int(c) for c in cpus.split(",")], bytes.fromhex(template))
    build()
    m = machine_info()
    r = measure(a.services, a.backends, a.updates, a.interval_ms / 1e3, a.rounds)
    out = {"machine": {**{k: m.get(k) for k in ("hostname", "kernel", "cpus", "cpu_model", "python",
                                                 "loadavg_start")}, "commit": m["versions"]["xdplb_commit"]},
           "command": "python -m bench.loaded_update " + " ".join(argv if argv is not None else sys.argv[1:]),
           "result": r}
    print(f"{r['services']} services x {r['backends_per_service']} backends, `xdplb run` ready in "
          f"{r['daemon_start_s']:.1f} s; one API upsert_service every {r['interval_ms']:g} ms, "
          f"{r['rounds']} rounds")
    print("| traffic | updates | p50 ms | p90 ms | p99 ms | max ms | > 1 ms | daemon CPU p50 / p99 ms "
          "| reconcile p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("unloaded", "loaded"):
        s, d, rc = r[kind], r[kind]["daemon_cpu"], r[kind]["reconcile"]
        print(f"| {kind} | {s['count']} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | "
              f"{s['max_ms']:.3f} | {s['over_1ms']} | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} | "
              f"{rc['p50_ms']:.3f} / {rc['p99_ms']:.3f} |")
    t = r["traffic"]
    busy = ", ".join(f"{c} {100 * min(b[c]['busy'] for b in r['cpu_loaded']):.0f}% busy "
                     f"({100 * statistics.fmean(b[c]['softirq'] for b in r['cpu_loaded']):.0f}% softirq)"
                     for c in r["cpu_loaded"][0])
    print(f"loaded: {t['generated_mpps']} Mpps generated, {t['delivered_mpps']} Mpps delivered through xdplb, "
          f"{t['misrouted']} misrouted; {busy} (least busy block)")
    print(f"load average at the start: {m.get('loadavg_start')}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if not t["misrouted"] else 1


if __name__ == "__main__":
    sys.exit(main())
