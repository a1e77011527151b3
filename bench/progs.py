"""The benchmark's own XDP programs (bench/bpf/*.c): generator, sink, bare
forwarder, pass-through and the empty program, with typed access to their
maps. Layouts and constants come from each object's BTF."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lb.dataplane import Constants
from loader import BPF_F_TEST_XDP_LIVE_FRAMES, BpfObject, XdpLink, test_run

from .profile import MAX_VARS, MAX_WRITES, OPS, TEMPLATE_MAX, GenSpec

BPF_DIR = Path(__file__).resolve().parent / "bpf"
REPO = BPF_DIR.parent.parent


def build() -> None:
    """`make bench-bpf` (quietly; a no-op when the objects are current)."""
    subprocess.run(["make", "-s", "-C", str(REPO), "bench-bpf"], check=True)


class _Prog:
    object_name = ""

    def __init__(self, program: str, reuse: dict[str, int] | None = None) -> None:
        self.obj = BpfObject(BPF_DIR / f"{self.object_name}.o")
        try:
            self.consts = Constants(self.obj.btf.enums())
            for name, fd in (reuse or {}).items():
                self.obj.reuse_map_fd(name, fd)
            self.obj.load()
            self.prog = self.obj.program(program)
        except BaseException:
            self.obj.close()
            raise
        self.maps = self.obj.maps
        self.links: list[XdpLink] = []

    def attach(self, ifindex: int, mode: str = "native") -> None:
        """Attach in the calling thread's netns; detached on close()."""
        self.links.append(XdpLink.attach(self.prog.fd, ifindex, mode=mode))

    def detach(self) -> None:
        while self.links:
            link = self.links.pop()
            try:
                link.detach()
            except Exception:
                pass        # the interface (and the link with it) may be gone
            link.close()

    def close(self) -> None:
        self.detach()
        self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Generator(_Prog):
    object_name = "gen"

    def __init__(self) -> None:
        super().__init__("gen_main")
        c = self.consts
        if (c.GEN_TEMPLATE_MAX, c.GEN_MAX_VARS, c.GEN_MAX_WRITES) != (TEMPLATE_MAX, MAX_VARS, MAX_WRITES):
            raise RuntimeError("bench/profile.py limits differ from bench/bpf/bench.h")
        self.spec: GenSpec | None = None

    def configure(self, spec: GenSpec) -> None:
        m = self.maps["gen_config"]
        cfg = m.value_type()
        cfg.len = len(spec.template)
        cfg.nvars, cfg.nwrites = len(spec.vars), len(spec.writes)
        cfg.ip_csum_off, cfg.l4_csum_off, cfg.l4_is_udp = spec.ip_csum_off, spec.l4_csum_off, spec.l4_is_udp
        ctypes.memmove(cfg.pkt, spec.template, len(spec.template))
        for i, v in enumerate(spec.vars):
            g = cfg.vars[i]
            g.min, g.range, g.init, g.step, g.div, g.limit = v.min, v.range, v.init, v.step, v.div, v.limit
            g.op = OPS[v.op]
        for i, w in enumerate(spec.writes):
            g = cfg.writes[i]
            g.offset, g.size, g.var, g.add = w.offset, w.size, w.var, w.add
            g.tmpl_value = int.from_bytes(spec.template[w.offset:w.offset + w.size], "big")
            g.fix_ip, g.fix_l4 = w.fix_ip, w.fix_l4
        m.update(0, cfg)
        self.spec = spec

    def set_window(self, window: int) -> None:
        """Frames in flight at most (0: open loop); resets the flow-control counters."""
        m = self.maps["flow_ctl"]
        m.update(0, m.value_type(window=window))

    def flow_ctl(self) -> dict:
        v = self.maps["flow_ctl"].lookup(0)
        return {"sent": v.sent, "delivered": v.delivered, "held": v.held, "stalls": v.stalls,
                "window": v.window}

    @property
    def packets(self) -> int:
        """Frames generated so far: the flow counter of the stream."""
        return self.maps["gen_state"].lookup(0).packets

    def reset(self, packets: int = 0) -> None:
        st = self.maps["gen_state"].value_type(packets=packets)
        self.maps["gen_state"].update(0, st)

    def send(self, ifindex: int, count: int, batch_size: int = 256) -> int:
        """Run `count` frames in live-frames mode out of `ifindex` (in the
        calling thread's netns). Returns the frames the program produced."""
        assert self.spec is not None, "configure() first"
        before = self.packets
        test_run(self.prog.fd, self.spec.template, repeat=count, ingress_ifindex=ifindex,
                 flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
        return self.packets - before


@dataclass
class SinkCounts:
    good: int = 0
    misrouted: int = 0
    unstamped: int = 0
    other: int = 0

    def __sub__(self, o: "SinkCounts") -> "SinkCounts":
        return SinkCounts(self.good - o.good, self.misrouted - o.misrouted,
                          self.unstamped - o.unstamped, self.other - o.other)

    @property
    def delivered(self) -> int:
        return self.good + self.misrouted


class Sink(_Prog):
    object_name = "sink"

    def __init__(self, gen: Generator | None = None) -> None:
        """With `gen`, the sink reports deliveries to the generator's flow control."""
        super().__init__("sink_main", {"flow_ctl": gen.maps["flow_ctl"].fd} if gen else None)

    def configure(self, check: bool = True, sample_max: int = 0, watch_stamp: int = 0,
                  encapsulated: bool = False, gue_port: int = 0) -> None:
        """`encapsulated`: frames are due inside an outer IPv4 header (IPIP,
        or GUE to `gue_port`), as DSR engines send them; plain ones are then
        misrouted, and the other way round."""
        m, c = self.maps["sink_config"], self.consts
        m.update(0, m.value_type(check=int(check), sample_max=sample_max, watch_stamp=watch_stamp,
                                 delivery=c.SINK_ENCAP if encapsulated else c.SINK_PLAIN,
                                 gue_port=socket.htons(gue_port)))
        if sample_max or watch_stamp:
            self.maps["sink_state"].update(0, self.maps["sink_state"].value_type())

    def allow(self, entries: list[tuple]) -> None:
        """(backend address, port, "tcp"|"udp", stamp[, vip]) that may receive
        `stamp`; with a vip, as an encapsulated frame whose inner destination
        is the vip (the port is then the service's: DSR does not rewrite it)."""
        m = self.maps["sink_backends"]
        if not entries:
            return
        keys = (m.key_type * len(entries))()
        vals = (m.value_type * len(entries))()
        for i, (addr, port, proto, stamp, *vip) in enumerate(entries):
            keys[i].addr = be32(addr)
            keys[i].port = socket.htons(port)
            keys[i].proto = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
            vals[i].stamp = stamp
            vals[i].vip = be32(vip[0]) if vip else 0
        m.update_batch(keys, vals)

    def clear_allowed(self) -> None:
        m = self.maps["sink_backends"]
        keys = [k for k in m.keys()]
        if keys:
            arr = (m.key_type * len(keys))(*keys)
            m.delete_batch(arr)

    def counts(self) -> SinkCounts:
        c, m = self.consts, self.maps["sink_stats"]

        def total(i: int) -> int:
            return sum(v.packets for v in m.lookup(i))

        return SinkCounts(total(c.SINK_GOOD), total(c.SINK_MISROUTED), total(c.SINK_UNSTAMPED),
                          total(c.SINK_OTHER))

    def samples(self) -> list[tuple[int, bytes]]:
        """(verdict, frame bytes) of the packets kept, in arrival order."""
        n = min(self.maps["sink_state"].lookup(0).samples, self.consts.SINK_SAMPLES)
        out = []
        for i in range(n):
            s = self.maps["sink_samples"].lookup(i)
            out.append((s.verdict, bytes(s.data)[:min(s.len, self.consts.SINK_SAMPLE_BYTES)]))
        return out

    def watch_first_ns(self) -> int:
        return self.maps["sink_state"].lookup(0).watch_first_ns


class Forwarder(_Prog):
    """fwd_main (MAC rewrite + bpf_redirect), pass_main and empty_main."""

    object_name = "fwd"

    def __init__(self, program: str = "fwd_main") -> None:
        super().__init__(program)

    def configure(self, out_ifindex: int, smac: str, dmac: str) -> None:
        m = self.maps["fwd_config"]
        c = m.value_type(ifindex=out_ifindex)
        ctypes.memmove(c.smac, bytes.fromhex(smac.replace(":", "")), 6)
        ctypes.memmove(c.dmac, bytes.fromhex(dmac.replace(":", "")), 6)
        m.update(0, c)


def be32(addr: str) -> int:
    """An IPv4 address as the __be32 a map field holds (read as a host int)."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def program_fd(fwd: Forwarder, name: str) -> int:
    return fwd.obj.program(name).fd
