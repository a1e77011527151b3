"""The benchmark lab: gen -> lb -> sink, three namespaces and two veth pairs.

    gen   g0 10.1.0.2/24  <->  l0 10.1.0.1/24   lb   l1 10.3.0.1/24  <->  s0 10.3.0.2/24   sink
    lb:  clients 10.2.0.0/16 via 10.1.0.2, backends 10.128.0.0/10 via 10.3.0.2

Every backend address is behind the sink's one address, so one permanent
neighbour entry covers them all (the sink's XDP_DROP would starve ARP).
l0 runs threaded NAPI (set_threaded_napi): the engine's work (XDP program or
kernel stack) runs in a kernel thread that the scheduler puts on the other
core than the generator's, as it would on a load balancer's own core. The sink's XDP program runs natively on
s0, so frames redirected into l1 are received.

Built with lb.lab.Lab, which tears everything down even on failure.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lb.lab import Lab

GEN_IP, LB_GEN_IP = "10.1.0.2", "10.1.0.1"
LB_SINK_IP, SINK_IP = "10.3.0.1", "10.3.0.2"
CLIENTS = "10.2.0.0/16"
BACKENDS = "10.128.0.0/10"
CLUSTER_CIDR = "10.0.0.0/8"     # kube-proxy's clusterCIDR: the clients are inside (no masquerade)


@dataclass(frozen=True)
class BenchLab:
    lab: Lab
    gen_ns: str
    lb_ns: str
    sink_ns: str
    g0: int          # ifindexes, each in its own namespace
    l0: int
    l1: int
    s0: int
    g0_mac: str
    l0_mac: str
    l1_mac: str
    s0_mac: str
    namespaces: list[str] = field(default_factory=list)

    def inside(self, ns: str):
        return self.lab.inside(ns)


def build(lab: Lab) -> BenchLab:
    gen, lb, sink = lab.netns("gen"), lab.netns("lb"), lab.netns("sink")
    for conf in ("all", "default"):
        lab.sysctl(lb, f"net.ipv4.conf.{conf}.rp_filter", 0)
    lab.sysctl(lb, "net.ipv4.ip_forward", 1)
    lab.veth(gen, "g0", lb, "l0")
    lab.veth(lb, "l1", sink, "s0")
    for ns, ifname in ((lb, "l0"), (lb, "l1")):
        lab.sysctl(ns, f"net.ipv4.conf.{ifname}.rp_filter", 0)
    lab.addr(gen, "g0", f"{GEN_IP}/24")
    lab.addr(lb, "l0", f"{LB_GEN_IP}/24")
    lab.addr(lb, "l1", f"{LB_SINK_IP}/24")
    lab.addr(sink, "s0", f"{SINK_IP}/24")
    lab.route(lb, CLIENTS, gateway=GEN_IP)
    lab.route(lb, BACKENDS, gateway=SINK_IP)
    lab.route(gen, "default", gateway=LB_GEN_IP)
    lab.route(sink, "default", gateway=LB_SINK_IP)
    macs = {(ns, i): lab.mac(ns, i) for ns, i in ((gen, "g0"), (lb, "l0"), (lb, "l1"), (sink, "s0"))}
    lab.neigh(lb, "l1", SINK_IP, macs[(sink, "s0")])
    lab.neigh(lb, "l0", GEN_IP, macs[(gen, "g0")])
    lab.neigh(sink, "s0", LB_SINK_IP, macs[(lb, "l1")])
    lab.neigh(gen, "g0", LB_GEN_IP, macs[(lb, "l0")])
    return BenchLab(lab, gen, lb, sink, lab.ifindex(gen, "g0"), lab.ifindex(lb, "l0"),
                    lab.ifindex(lb, "l1"), lab.ifindex(sink, "s0"), macs[(gen, "g0")],
                    macs[(lb, "l0")], macs[(lb, "l1")], macs[(sink, "s0")], [gen, lb, sink])


def set_threaded_napi(bl: BenchLab, on: bool = True) -> None:
    """/sys/class/net/l0/threaded. Call it once an XDP program is on l0: a
    veth has NAPI only then. Our /sys is the host's, so the write happens in
    a private mount namespace with a sysfs of the lb namespace."""
    want = int(on)
    r = bl.lab.run(bl.lb_ns, ["unshare", "--mount", "sh", "-c",
                              "mount -t sysfs sysfs /sys && echo %d > /sys/class/net/l0/threaded && "
                              "cat /sys/class/net/l0/threaded" % want], check=False)
    if r.returncode != 0 or r.stdout.strip() != str(want):
        raise RuntimeError(f"cannot set threaded NAPI on l0: {r.stderr.strip() or r.stdout.strip()}")


# --------------------------------------------------------------------------
# addressing of the benchmark's services


def vip(i: int) -> str:
    """Service i's cluster IP: 10.96.0.1 ... (inside 10.96.0.0/12)."""
    return str(ipaddress.IPv4Address("10.96.0.1") + i)


def backend_ip(i: int, j: int) -> str:
    """Endpoint j (< 32) of service i: every endpoint has its own address."""
    return str(ipaddress.IPv4Address("10.128.0.0") + 32 * i + j + 1)


def backend_port(j: int) -> int:
    return 8080 + j


SERVICE_PORT = 80


# --------------------------------------------------------------------------
# conntrack: pinned settings and statistics


@dataclass
class ConntrackSettings:
    max: int = 1 << 20            # init netns only (global)
    buckets: int = 1 << 18        # init netns only (global)
    udp_timeout: int = 30
    udp_timeout_stream: int = 120
    tcp_timeout_syn_sent: int = 120


_GLOBAL = {"max": "net.netfilter.nf_conntrack_max", "buckets": "net.netfilter.nf_conntrack_buckets"}
_PER_NS = {"udp_timeout": "net.netfilter.nf_conntrack_udp_timeout",
           "udp_timeout_stream": "net.netfilter.nf_conntrack_udp_timeout_stream",
           "tcp_timeout_syn_sent": "net.netfilter.nf_conntrack_tcp_timeout_syn_sent"}


def _proc(key: str) -> Path:
    return Path("/proc/sys/" + key.replace(".", "/"))


@contextlib.contextmanager
def pinned_conntrack(lab: BenchLab, s: ConntrackSettings) -> Iterator[dict]:
    """Pin the conntrack table size (global: restored afterwards) and the lb
    namespace's timeouts; yields the values in force."""
    saved: dict[str, str] = {}
    try:
        for name, key in _GLOBAL.items():
            p = _proc(key)
            if p.exists():
                saved[key] = p.read_text().strip()
                p.write_text(f"{getattr(s, name)}\n")
        for name, key in _PER_NS.items():
            lab.lab.sysctl(lab.lb_ns, key, getattr(s, name))
        yield conntrack_settings(lab)
    finally:
        for key, value in saved.items():
            with contextlib.suppress(OSError):
                _proc(key).write_text(f"{value}\n")


def conntrack_settings(lab: BenchLab) -> dict:
    out = {k: int(_proc(key).read_text()) for k, key in _GLOBAL.items() if _proc(key).exists()}
    for k, key in _PER_NS.items():
        out[k] = int(lab.lab.read_sysctl(lab.lb_ns, key))
    return out


def conntrack_stats(lab: BenchLab) -> dict:
    """/proc/net/stat/nf_conntrack of the lb namespace, summed over CPUs,
    plus the entry count."""
    with lab.inside(lab.lb_ns):
        text = Path("/proc/net/stat/nf_conntrack").read_text().split("\n")
        count = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    names = text[0].split()
    totals = dict.fromkeys(names, 0)
    for line in text[1:]:
        if line.strip():
            for n, v in zip(names, line.split()):
                totals[n] += int(v, 16)
    totals.pop("entries", None)     # per-CPU copies of the global count
    totals["count"] = count
    return totals


NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2       # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE


def conntrack_flush(lab: BenchLab) -> None:
    """Delete every IPv4 conntrack entry of the lb namespace (what
    `conntrack -F` does): one ctnetlink DELETE without attributes, on a
    socket opened inside the namespace (a socket keeps its netns)."""
    with lab.inside(lab.lb_ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with sock:
        sock.bind((0, 0))
        # nlmsghdr (len, type, flags REQUEST|ACK, seq, pid) + nfgenmsg (AF_INET, v0, res 0)
        msg = struct.pack("=IHHII", 20, _CT_DELETE, 0x1 | 0x4, 1, 0) + struct.pack("=BBH", socket.AF_INET, 0, 0)
        sock.send(msg)
        reply = sock.recv(4096)
        err = struct.unpack("=i", reply[16:20])[0] if len(reply) >= 20 else 0
        if err not in (0, -errno.ENOENT):
            raise OSError(-err, f"conntrack flush in {lab.lb_ns}: {os.strerror(-err)}")


def stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if k != "count"} | {"count": after.get("count", 0)}


def pin_thread_to_cpu(cpu: int | None) -> None:
    """Keep the calling thread (the generator) on one CPU, if asked."""
    if cpu is not None and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})
