"""Test harness: the real program and control plane on the lab."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from lb.config import config_from_dict
from lb.dataplane import Dataplane
from lb.neighbours import NeighbourKeeper, backend_addresses, drain_requests, recent_destinations
from lb.demo import DaemonProcess, lab_config
from lb.reconcile import Reconciler
from loader.testrun import test_run

ROOT = Path(__file__).resolve().parent.parent
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
_seq = itertools.count()


def pin_dir() -> str:
    return f"/sys/fs/bpf/xdplb-test-{os.getpid()}-{next(_seq)}"


@contextlib.contextmanager
def daemons(topo, workdir: Path):
    """start(fillers=0, edit=None, **lab_config_kw): `xdplb run` in the lab's
    lb namespace with lab_config()'s config (passed through `edit` if
    given); every daemon started is killed and detached at the end."""
    started: list[DaemonProcess] = []

    def start(fillers: int = 0, edit=None, **kw) -> DaemonProcess:
        cfg = lab_config(topo, fillers=fillers, bpffs=pin_dir(),
                         socket=f"/run/xdplb/test-{os.getpid()}-{next(_seq)}.sock", **kw)
        d = DaemonProcess(edit(cfg) if edit else cfg, workdir, topo.lb_ns)
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            d.kill(signal.SIGKILL)
            Dataplane.detach(Path(d.config["bpffs"]), purge=True)


class Harness:
    """Loads xdplb, applies a config, attaches it to the lab's LB."""

    def __init__(self, lab, topo, cfg: dict | None = None, *, attach: bool = True, **cfg_kw):
        self.lab, self.topo = lab, topo
        self.bpffs = pin_dir()
        self.cfg_dict = cfg or lab_config(topo, fillers=0, bpffs=self.bpffs,
                                          socket=f"/run/xdplb/test-{os.getpid()}.sock", **cfg_kw)
        self.cfg_dict["bpffs"] = self.bpffs
        self.cfg = config_from_dict(self.cfg_dict)
        self.dp = Dataplane.open(self.cfg)
        self.neighbours = None
        try:
            self.rec = Reconciler(self.dp)
            self.rec.apply(self.cfg)
            with lab.inside(topo.lb_ns):
                if attach:
                    self.ifindexes = self.dp.attach(self.cfg.interfaces)
                else:   # test-run only: the devmap still needs the egress ports
                    self.ifindexes = [lab.ifindex(topo.lb_ns, i) for i in self.cfg.interfaces]
                    for idx in self.ifindexes:
                        self.dp.maps["tx_ports"].update(idx, idx)
                # As the daemon does: the product keeps the backends' next
                # hops resolved (its sockets stay in the lb namespace).
                self.neighbours = NeighbourKeeper(lambda: backend_addresses(self.dp),
                                                  lambda: self.ifindexes,
                                                  lambda: drain_requests(self.dp),
                                                  lambda: recent_destinations(self.dp))
            self.neighbours.sync(wait=2.0)
            # A real client reaches the VIP through its gateway, the LB, so it
            # has resolved it (and the LB learnt the client from the ARP
            # request). Crafted packets skip that step: the client takes it.
            lab.ping(topo.client_ns, topo.lb_client_ip)
        except BaseException:
            self.close()
            raise

    def apply(self, cfg_dict: dict):
        self.cfg_dict = cfg_dict
        self.cfg = config_from_dict(cfg_dict)
        res = self.rec.apply(self.cfg)
        self.neighbours.sync(wait=2.0)
        return res

    def edit(self):
        return copy.deepcopy(self.cfg_dict)

    def run(self, pkt, ifname: str = "l0"):
        """BPF test-run in the lb namespace, as if `pkt` arrived on `ifname`."""
        with self.lab.inside(self.topo.lb_ns):
            ifindex = self.lab.ifindex(self.topo.lb_ns, ifname)
            res = test_run(self.dp.prog.fd, bytes(pkt), ingress_ifindex=ifindex)
        return res.retval, Ether(res.data_out)

    def counters(self, map_name: str, key) -> tuple[int, int]:
        vals = self.dp.maps[map_name].lookup(key)
        return sum(v.packets for v in vals), sum(v.bytes for v in vals)

    def entries(self, map_name: str) -> int:
        """How many entries a hashed map holds."""
        return len(self.dp.maps[map_name].lookup_batch())

    def drop_count(self, reason: str) -> int:
        return self.counters("drop_stats", getattr(self.dp.consts, "DROP_" + reason.upper()))[0]

    def close(self) -> None:
        try:
            if self.neighbours is not None:
                self.neighbours.close()
            self.dp.close()
        finally:
            Dataplane.detach(Path(self.bpffs), purge=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# DSR services of the lab (with_dsr_services): the backends serve the
# service's own port, since the packet reaches them unchanged.
IPIP_VIP, GUE_VIP, DSR_UDP_VIP = "10.96.0.20", "10.96.0.21", "10.96.0.22"
ENCAP_SOURCE = "10.255.0.1"        # the lab LB's address on lo
# IPv6 DSR services of a Lab(ipv6=True) (with_dsr6_services): IPv6 in IPv6
# (ipip, gue, udp), IPv4 in IPv6 (an IPv4 VIP, IPv6 backends) and IPv6 in
# IPv4 (an IPv6 VIP, IPv4 backends).
IPIP_VIP6, GUE_VIP6, DSR_UDP_VIP6 = "fd00:96::20", "fd00:96::21", "fd00:96::22"
VIP_4IN6, VIP_6IN4 = "10.96.0.23", "fd00:96::24"
ENCAP_SOURCE6 = "fd00:255::1"      # the lab LB's IPv6 address on lo


def with_dsr_services(cfg: dict, topo, *, encap_source: str = ENCAP_SOURCE,
                      health_check: dict | None = None) -> dict:
    """`cfg` (lab_config()'s) plus DSR services: ipip and gue over TCP for
    the frontend identity, ipip over UDP for everyone."""
    backends = [f"{b.ip}:{topo.backend_port}" for b in topo.backends]
    port = topo.backend_port
    extra = {"health_check": health_check} if health_check else {}
    cfg["encap_source"] = encap_source
    cfg["services"] += [
        {"name": "dsr-ipip", "vip": IPIP_VIP, "port": port, "protocol": "tcp",
         "backends": backends, "forwarding": "ipip", "allow": ["frontend"], **extra},
        {"name": "dsr-gue", "vip": GUE_VIP, "port": port, "protocol": "tcp",
         "backends": backends, "forwarding": "gue", "allow": ["frontend"], **extra},
        {"name": "dsr-udp", "vip": DSR_UDP_VIP, "port": port, "protocol": "udp",
         "backends": backends, "forwarding": "ipip"},
    ]
    return cfg


def with_dsr6_services(cfg: dict, topo, *, health_check: dict | None = None) -> dict:
    """`cfg` (lab_config()'s, in a Lab(ipv6=True)) plus the IPv6 DSR
    services, with an encap_source of each family: TCP ones for the
    frontend identities (fd00:1::/64 and 10.1.0.0/24), udp for everyone;
    fd00:2::/64 is `blocked6`."""
    b6 = [f"[{b.ip6}]:{topo.backend_port}" for b in topo.backends]
    b4 = [f"{b.ip}:{topo.backend_port}" for b in topo.backends]
    port = topo.backend_port
    extra = {"health_check": health_check} if health_check else {}
    cfg["encap_source"] = [ENCAP_SOURCE, ENCAP_SOURCE6]
    cfg["identities"].update({"frontend6": ["fd00:1::/64"], "blocked6": ["fd00:2::/64"]})

    def svc(name, vip, forwarding, backends, allow, protocol="tcp"):
        return {"name": name, "vip": vip, "port": port, "protocol": protocol, "backends": backends,
                "forwarding": forwarding, **({"allow": allow} if allow else {}),
                **(extra if protocol == "tcp" else {})}
    cfg["services"] += [
        svc("dsr6-ipip", IPIP_VIP6, "ipip", b6, ["frontend6"]),
        svc("dsr6-gue", GUE_VIP6, "gue", b6, ["frontend6"]),
        svc("dsr6-udp", DSR_UDP_VIP6, "ipip", b6, None, "udp"),
        svc("dsr-4in6", VIP_4IN6, "ipip", b6, ["frontend"]),
        svc("dsr-6in4", VIP_6IN4, "gue", b4, ["frontend6"]),
    ]
    return cfg


def tcp(src: str, sport: int, dst: str, dport: int, flags: str = "S", payload: bytes = b"",
        dmac: str = "02:00:00:00:00:02"):
    return Ether(src="02:00:00:00:00:01", dst=dmac) / IP(src=src, dst=dst, ttl=64, id=1) / \
        TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"hello", chksum=None):
    u = UDP(sport=sport, dport=dport)
    if chksum is not None:
        u.chksum = chksum
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst, ttl=64) / u / payload


def checksum_errors(pkt) -> list[str]:
    """Recompute every checksum with scapy; name the ones that differ."""
    bad = []
    ip = pkt[IP]
    fresh = IP(bytes(ip))
    del fresh.chksum
    if IP(bytes(fresh)).chksum != ip.chksum:
        bad.append("IPv4 header")
    if ICMP in pkt:                     # an ICMP error: its own checksum only
        fresh = IP(bytes(ip))
        del fresh[ICMP].chksum
        if IP(bytes(fresh))[ICMP].chksum != pkt[ICMP].chksum:
            bad.append("ICMP")
        return bad
    for layer in (TCP, UDP):
        if layer in pkt:
            l4 = pkt[layer]
            if layer is UDP and l4.chksum == 0:
                continue
            fresh = IP(bytes(ip))
            del fresh[layer].chksum
            if IP(bytes(fresh))[layer].chksum != l4.chksum:
                bad.append(layer.__name__)
    return bad


def assert_checksums_valid(pkt) -> None:
    assert checksum_errors(pkt) == [], f"bad checksums: {checksum_errors(pkt)}"


def _raw(v) -> bytes:
    if isinstance(v, list):
        return b"".join(_raw(x) for x in v)
    if isinstance(v, int):
        return v.to_bytes(8, "little")
    return bytes(v)


def dump_maps(maps: dict, skip: tuple[str, ...] = ()) -> dict[str, bytes | list]:
    """Every entry of every map, as bytes, to compare before/after. Program
    arrays are left out: they hold the ids of one load's programs, which
    the control plane never writes."""
    from loader import MapType

    out = {}
    for name, m in sorted(maps.items()):
        if name in skip or m.map_type == MapType.PROG_ARRAY:
            continue
        if m.map_flags & 1024:                      # BPF_F_MMAPABLE: the whole array
            out[name] = bytes(m.mmap(writable=False))
        else:
            out[name] = sorted((_raw(k), _raw(v)) for k, v in m.lookup_batch())
    return out


def xdplb(d: DaemonProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI against daemon `d`'s API socket."""
    return subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, *args],
                          capture_output=True, text=True, cwd=ROOT, check=check, timeout=120)


def stats(d: DaemonProcess) -> dict:
    return json.loads(xdplb(d, "stats", "--json").stdout)


def download(lab_, topo, url: str, result: dict, max_time: int = 30) -> threading.Thread:
    """curl `url` from the client in a thread; result["out"] gets "size code"."""
    def run():
        p = lab_.run(topo.client_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
                                      "--max-time", str(max_time), url], timeout=max_time + 10, check=False)
        result["out"] = p.stdout
    t = threading.Thread(target=run)
    t.start()
    return t


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    """Poll until cond() is truthy and return its value (a wait, not a
    timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ipv6_pair(lab, a: str = "m", b: str = "p") -> tuple[str, str]:
    """Two namespaces of an `ipv6=True` lab joined by a veth (a0 in `a`,
    a1 in `b`): a0 2001:db8:1::1/64 and 10.70.0.1/24, a1 2001:db8:1::2/64,
    fe80::2/64 and 10.70.0.2/24. DAD is off so the addresses are usable at
    once; no neighbour is resolved."""
    ns_a, ns_b = lab.netns(a), lab.netns(b)
    for ns in (ns_a, ns_b):
        lab.sysctl(ns, "net.ipv6.conf.default.accept_dad", 0)
        lab.sysctl(ns, "net.ipv6.conf.all.accept_dad", 0)
    lab.veth(ns_a, "a0", ns_b, "a1")
    for ns, ifname, cidrs in ((ns_a, "a0", ("2001:db8:1::1/64", "10.70.0.1/24")),
                              (ns_b, "a1", ("2001:db8:1::2/64", "fe80::2/64", "10.70.0.2/24"))):
        for cidr in cidrs:
            lab.addr(ns, ifname, cidr)
    return ns_a, ns_b


_K8S_DAEMONS = itertools.count()


@contextlib.contextmanager
def k8s_daemon(topo, workdir: Path, objects: list[dict] = ()):
    """The apiserver double in the LB's namespace (holding `objects`) and
    `xdplb run` in Kubernetes mode on it, started; both stopped after."""
    from k8s_apiserver import FakeApiServer

    api = FakeApiServer(netns=topo.lb_ns, bookmark_interval=0.5).start()
    if objects:
        api.apply_many(list(objects))
    bpffs = pin_dir()
    cfg = {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": bpffs,
           "api_socket": f"/run/xdplb/k8s-{os.getpid()}-{next(_K8S_DAEMONS)}.sock", "metrics_address": False,
           "kubernetes": {"kubeconfig": str(api.kubeconfig(workdir / "kubeconfig")), "node_name": "node-a"}}
    d = DaemonProcess(cfg, workdir, topo.lb_ns)
    try:
        d.start()
        yield api, d
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(bpffs), purge=True)
        api.close()
