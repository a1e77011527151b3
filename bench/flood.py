"""An established TCP stream under a random-source SYN flood.

    python -m bench.flood [--seconds 3] [--rounds 2] [--rates 200000 20000] [--object O] [--out FILE]

Lab (lb.lab.build_lb_lab plus a generator namespace):

    client c0 ──> lb l0 ─┐                    ┌─> l1 ──> b1 (stream server :8080)
    gen    g0 ──> lb lg ─┘  xdplb on l0 l1 lg └─ VIP 10.96.0.10:80 -> b1:8080

The stream: one TCP connection through the VIP, the backend writing as fast
as it can, the client reading and reporting its byte count every 0.1 s.
The flood: the in-kernel generator (bench/bpf/gen.c, live frames) sends TCP
SYNs to the same VIP from 10.2.0.0/16, every packet a new source, open loop.

CPUs: the generator thread is pinned to CPU 0, the stream's client and
server to CPU 1. A veth peer's NAPI runs on the sender's CPU, so the flood's
XDP work (and the SYNs that reach the backend) stays on CPU 0, as it would
on its own NIC queue; the stream and the flood share the maps, the guard's
per-CPU buckets, and the backend's listening socket.

Windows, in turn: no flood, a flood under each guard rate (`--rates`,
default: the config's default), a flood with the guard off; `--rounds`
times. The figure is each flood
window's stream throughput over the mean of the unloaded windows of the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from ipaddress import ip_address
from pathlib import Path

from lb.config import FloodGuard, config_from_dict
from lb.dataplane import Dataplane, addr_word
from lb.lab import Lab, build_lb_lab
from lb.neighbours import NeighbourKeeper, backend_addresses, drain_requests, recent_destinations
from lb.reconcile import Reconciler

from . import profile as prof
from .lab import pin_thread_to_cpu
from .progs import Generator
from .traffic import MAX_CALL

VIP, PORT = "10.96.0.10", 80
GEN_IP, LB_GEN_IP = "10.5.0.2", "10.5.0.1"
FLOOD_SOURCES = "10.2.0.0/16"

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
buf = bytes(1 << 16)
while True:
    c, _ = s.accept()
    try:
        while True:
            c.sendall(buf)
    except OSError:
        c.close()
"""

CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
buf = bytearray(1 << 16)
total, nxt = 0, time.monotonic() + 0.1
while True:
    n = c.recv_into(buf)
    if not n:
        print("closed", flush=True)
        break
    total += n
    now = time.monotonic()
    if now >= nxt:
        print(f"{now:.4f} {total}", flush=True)
        nxt = now + 0.1
"""


def _pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu)] + argv if cpu in os.sched_getaffinity(0) else argv


class Stream:
    """The client's byte counter, read from its stdout by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.samples: list[tuple[float, int]] = []
        self.closed = False
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("closed"):
                self.closed = True
                return
            t, n = line.split()
            self.samples.append((float(t), int(n)))

    def bytes_between(self, t0: float, t1: float) -> tuple[float, int]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return 0.0, 0
        return inside[-1][0] - inside[0][0], inside[-1][1] - inside[0][1]


class FloodLab:
    """The lab, xdplb on it, the stream and the generator; close() undoes all."""

    def __init__(self, guard: FloodGuard | None = None, stream_cpu: int = 1, gen_cpu: int = 0,
                 object_path: Path | None = None) -> None:
        self.lab = Lab()
        self.dp = None
        self.neighbours: NeighbourKeeper | None = None
        self.procs: list[subprocess.Popen] = []
        self.gen: Generator | None = None
        self.stream_cpu, self.gen_cpu = stream_cpu, gen_cpu
        self.guard = guard or FloodGuard()
        self.object_path = object_path
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        lab = self.lab
        self.topo = topo = build_lb_lab(lab, 1)
        self.gen_ns = gen = lab.netns("gen")
        lab.veth(gen, "g0", topo.lb_ns, "lg")
        lab.addr(gen, "g0", f"{GEN_IP}/24")
        lab.addr(topo.lb_ns, "lg", f"{LB_GEN_IP}/24")
        lab.sysctl(topo.lb_ns, "net.ipv4.conf.lg.rp_filter", 0)
        lab.route(topo.lb_ns, FLOOD_SOURCES, gateway=GEN_IP)
        self.g0, self.g0_mac = lab.ifindex(gen, "g0"), lab.mac(gen, "g0")
        self.lg_mac = lab.mac(topo.lb_ns, "lg")
        lab.neigh(topo.lb_ns, "lg", GEN_IP, self.g0_mac)
        self.bpffs = f"/sys/fs/bpf/xdplb-flood-{os.getpid()}"
        self.cfg_dict = {
            "interfaces": ["l0", "l1", "lg"], "bpffs": self.bpffs,
            "api_socket": f"/run/xdplb/flood-{os.getpid()}.sock", "metrics_address": False,
            "flood_guard": self.guard.model_dump(),
            "services": [{"name": "stream", "vip": VIP, "port": PORT, "protocol": "tcp",
                          "backends": [f"{topo.backends[0].ip}:{topo.backend_port}"]}]}
        cfg = config_from_dict(self.cfg_dict)
        self.dp = Dataplane.open(cfg, self.object_path)
        self.rec = Reconciler(self.dp)
        self.rec.apply(cfg)
        with lab.inside(topo.lb_ns):
            ifindexes = self.dp.attach(cfg.interfaces)
            # The product's keeper resolves the backend's next hop, as the daemon does.
            self.neighbours = NeighbourKeeper(lambda: backend_addresses(self.dp), lambda: ifindexes,
                                              lambda: drain_requests(self.dp),
                                              lambda: recent_destinations(self.dp))
        self.neighbours.sync(wait=2.0)
        b = topo.backends[0]
        server = lab.popen(b.ns, _pinned(self.stream_cpu, [sys.executable, "-c", SERVER,
                                                           str(topo.backend_port)]),
                           stdout=subprocess.PIPE, text=True)
        self.procs.append(server)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("stream server did not start")
        self.gen = Generator()
        spec, _, _ = prof.load("tcp_syn_flows", {"vip": VIP, "port": PORT, "src_mac": self.g0_mac,
                                                 "dst_mac": self.lg_mac, "src_min": "10.2.0.1",
                                                 "src_max": "10.2.255.254"})
        self.gen.configure(spec)
        self.gen.set_window(0)                       # open loop: a flood does not wait

    def set_guard(self, rate: int, burst: int | None = None) -> None:
        self.cfg_dict["flood_guard"] = {"new_flows_per_second": rate,
                                        "burst": burst or self.guard.burst}
        self.rec.apply(config_from_dict(self.cfg_dict))

    def start_stream(self) -> Stream:
        client = self.lab.popen(self.topo.client_ns,
                                _pinned(self.stream_cpu, [sys.executable, "-c", CLIENT, VIP, str(PORT)]),
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(client)
        return Stream(client)

    def flood(self, seconds: float) -> int:
        """SYNs for `seconds` from this thread (pinned meanwhile); returns frames sent."""
        assert self.gen is not None
        saved = os.sched_getaffinity(0)
        sent, chunk = 0, 1 << 16
        pin_thread_to_cpu(self.gen_cpu)
        try:
            with self.lab.inside(self.gen_ns):
                t0 = time.monotonic()
                while (left := seconds - (time.monotonic() - t0)) > 0:
                    c0 = time.monotonic()
                    sent += self.gen.send(self.g0, chunk)
                    # Calls have a fixed cost (~24 ms): grow them to a
                    # quarter of what is left, at the rate just seen.
                    rate = chunk / max(time.monotonic() - c0, 1e-6)
                    chunk = int(min(MAX_CALL, max(1 << 16, rate * left / 4)))
        finally:
            os.sched_setaffinity(0, saved)
        return sent

    def counters(self) -> dict[str, int]:
        c = self.dp.consts
        glob = self.dp.maps["global_stats"]
        drops = self.dp.maps["drop_stats"]
        # An older build (--object) may not have every counter.
        count = lambda name: sum(v.packets for v in glob.lookup(getattr(c, name))) \
            if hasattr(c, name) else 0                               # noqa: E731
        entries = self.dp.maps["conntrack"].lookup_batch()
        client = addr_word(ip_address(self.topo.client_ip))
        return {"ct_new": count("CNT_CT_NEW"), "ct_hit": count("CNT_CT_HIT"),
                "stateless": count("CNT_GUARD_STATELESS"), "stateless_replies": count("CNT_REPLY_STATELESS"),
                "new_flow_rate_drops": sum(v.packets for v in drops.lookup(c.DROP_NEW_FLOW_RATE)),
                "conntrack_entries": len(entries),
                # The stream's own entry: the flood must not evict it.
                "stream_entries": sum(1 for k, _ in entries if k.src[0] == client)}

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        if self.gen is not None:
            self.gen.close()
        if self.neighbours is not None:
            self.neighbours.close()
        if self.dp is not None:
            self.dp.close()
            Dataplane.detach(Path(self.bpffs), purge=True)
        self.lab.close()


def run(seconds: float = 3.0, rounds: int = 2, rates: tuple[int, ...] = (FloodGuard().new_flows_per_second,),
        burst: int = FloodGuard().burst, object_path: Path | None = None) -> dict:
    """Windows in turn, `rounds` times: unloaded, a flood under each guard
    rate, a flood with the guard off."""
    fl = FloodLab(FloodGuard(new_flows_per_second=rates[0], burst=burst), object_path=object_path)
    try:
        stream = fl.start_stream()
        time.sleep(1.0)                              # past slow start
        windows = []
        kinds = [("unloaded", rates[0])] + [(f"guard {r}/s", r) for r in rates] + [("guard off", 0)]
        for _ in range(rounds):
            for kind, rate in kinds:
                fl.set_guard(rate, burst)
                before = fl.counters()
                t0 = time.monotonic()
                sent = fl.flood(seconds) if kind != "unloaded" else (time.sleep(seconds) or 0)
                t1 = time.monotonic()
                time.sleep(0.15)                     # the client's next sample
                dt, nbytes = stream.bytes_between(t0, t1)
                after = fl.counters()
                windows.append({"kind": kind, "guard_rate": rate, "seconds": round(t1 - t0, 3),
                                "stream_gbit_s": round(nbytes * 8 / dt / 1e9, 4) if dt else 0.0,
                                "flood_offered_mpps": round(sent / (t1 - t0) / 1e6, 4),
                                **{k: after[k] - before[k] for k in after if not k.endswith("_entries")},
                                "conntrack_entries": after["conntrack_entries"],
                                "stream_entries": after["stream_entries"]})
        base = statistics.mean(w["stream_gbit_s"] for w in windows if w["kind"] == "unloaded")
        kept = {k: round(statistics.mean(w["stream_gbit_s"] for w in windows if w["kind"] == k) / base, 4)
                if base else None for k, _ in kinds[1:]}
        # Per round, against that round's own unloaded window: on a shared
        # machine the spread says how far to trust the mean.
        per_round = {k: [round(w["stream_gbit_s"] / u["stream_gbit_s"], 3)
                         for u, w in zip(windows[::len(kinds)], windows[i::len(kinds)]) if u["stream_gbit_s"]]
                     for i, (k, _) in enumerate(kinds) if i}
        return {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
                "object": str(object_path) if object_path else "bpf/xdp/xdplb.o",
                "burst": burst, "seconds": seconds, "rounds": rounds, "stream_closed": stream.closed,
                "unloaded_gbit_s": round(base, 4), "kept": kept, "kept_per_round": per_round,
                "windows": windows}
    finally:
        fl.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rates", type=int, nargs="+", default=[FloodGuard().new_flows_per_second],
                    help="guard rates to measure, new flows per second per CPU (default: the config default)")
    ap.add_argument("--burst", type=int, default=FloodGuard().burst)
    ap.add_argument("--object", type=Path, help="another build of bpf/xdp/xdplb.o to measure")
    ap.add_argument("--out", type=Path, default=Path("bench/results/flood.json"))
    a = ap.parse_args(argv)
    res = run(a.seconds, a.rounds, tuple(a.rates), a.burst, a.object)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("| window | stream Gbit/s | flood offered Mpps | new flows with state | stateless | "
          "stateless replies | new_flow_rate drops | stream's entry kept |\n|---|---|---|---|---|---|---|---|")
    for w in res["windows"]:
        print(f"| {w['kind']} | {w['stream_gbit_s']:.3f} | {w['flood_offered_mpps']:.3f} | {w['ct_new']} | "
              f"{w['stateless']} | {w['stateless_replies']} | {w['new_flow_rate_drops']} | "
              f"{'yes' if w['stream_entries'] else 'NO'} |")
    print(f"unloaded stream: {res['unloaded_gbit_s']:.3f} Gbit/s; kept under the flood: " +
          ", ".join(f"{k}: {v:.1%} (per round {', '.join(f'{x:.0%}' for x in res['kept_per_round'][k])})"
                    for k, v in res["kept"].items()) + f"; stream closed: {res['stream_closed']}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
