"""The backend side of DSR (bpf/decap/decap.c, lb/backend*.py).

Two namespaces joined by a veth: "lb" (lb0: 10.0.0.1, fd00::1) plays the
load balancer and the client, "backend" (eth0: 10.0.0.2, fd00::2) serves
the VIPs 10.96.0.10 and fd00:96::10. The client addresses (198.51.100.10,
fd00:c::10) are routed from the backend to the lb namespace, which drops
them (blackhole routes): frames are sent and captured on lb0 with packet
sockets, so the backend's direct answers are seen as they leave it.

- test-run: scapy-crafted frames through the program, exact bytes out.
- end to end: `xdplb backend attach` (the CLI, a subprocess) on eth0, a
  real HTTP server on the VIPs, and hand-made TCP connections through each
  encapsulation: the backend answers the client directly, from the VIP.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether

from lb.backend import Decap
from lb.lab import Lab
from loader import XDP_DROP, XDP_PASS, test_run, xdp_query

ROOT = Path(__file__).resolve().parent.parent
LB4, BE4, LB6, BE6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
OTHER4, OTHER6 = "10.96.0.99", "fd00:96::99"          # not VIPs
CLIENT4, CLIENT6 = "198.51.100.10", "fd00:c::10"
GUE_PORT = 6080
HTTP_PORT = 8080
_ports = itertools.count(41000)
_pins = itertools.count()


def pin_dir() -> Path:
    return Path(f"/sys/fs/bpf/xdplb-decap-test-{os.getpid()}-{next(_pins)}")


@dataclass
class Net:
    lab: Lab
    lb_ns: str
    be_ns: str
    lb_mac: str
    be_mac: str
    be_ifindex: int


def build_pair(lab: Lab, tag: str) -> Net:
    """lb <-> backend over lb0 <-> eth0 (see the module docstring)."""
    lb_ns, be_ns = lab.netns(f"{tag}lb"), lab.netns(f"{tag}be")
    for ns in (lb_ns, be_ns):
        for conf in ("all", "default"):
            lab.sysctl(ns, f"net.ipv6.conf.{conf}.accept_dad", 0)   # no tentative addresses
            lab.sysctl(ns, f"net.ipv4.conf.{conf}.rp_filter", 1)    # strict, the common default
    lab.sysctl(lb_ns, "net.ipv4.ip_forward", 0)
    lab.veth(lb_ns, "lb0", be_ns, "eth0")
    for ns, ifname, a4, a6 in ((lb_ns, "lb0", LB4, LB6), (be_ns, "eth0", BE4, BE6)):
        lab.addr(ns, ifname, f"{a4}/24")
        lab.addr(ns, ifname, f"{a6}/64")
        # The backend's answers cross the veth with partial checksums otherwise.
        lab.offload(ns, ifname, tx_checksum=False)
    lab.route(be_ns, "default", gateway=LB4)
    lab.ipr(be_ns).route("replace", dst="::/0", gateway=LB6, family=socket.AF_INET6)
    # The client addresses end in the lb namespace without an ICMP error.
    lab.ipr(lb_ns).route("replace", dst=f"{CLIENT4}/32", type="blackhole")
    lab.ipr(lb_ns).route("replace", dst=f"{CLIENT6}/128", type="blackhole", family=socket.AF_INET6)
    return Net(lab, lb_ns, be_ns, lab.mac(lb_ns, "lb0"), lab.mac(be_ns, "eth0"),
               lab.ifindex(be_ns, "eth0"))


@pytest.fixture(scope="module")
def net(bpf_object):
    with Lab(ipv6=True) as lab:
        yield build_pair(lab, "d")


# -- packets -------------------------------------------------------------------


def inner4(dst: str = VIP4, payload: bytes = b"hello") -> IP:
    return IP(src=CLIENT4, dst=dst, ttl=64, id=7) / TCP(sport=40000, dport=80, flags="S", seq=1) / payload


def inner6(dst: str = VIP6, payload: bytes = b"hello") -> IPv6:
    return IPv6(src=CLIENT6, dst=dst, hlim=64) / TCP(sport=40000, dport=80, flags="S", seq=1) / payload


def ipip(inner, outer: int = 4, dst: str | None = None, **kw) -> Ether:
    """`inner` in IPv4 (protocol 4/41) or IPv6 (next header 4/41), lb -> backend."""
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if outer == 4:
        return eth / IP(src=LB4, dst=dst or BE4, ttl=64, **kw) / inner
    return eth / IPv6(src=LB6, dst=dst or BE6, hlim=64, **kw) / inner


def gue(inner, outer: int = 4, dst: str | None = None, port: int = GUE_PORT, **udp_kw) -> Ether:
    """GUE variant 1: the inner packet right after the UDP header."""
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ip = IP(src=LB4, dst=dst or BE4, ttl=64) if outer == 4 else IPv6(src=LB6, dst=dst or BE6, hlim=64)
    return eth / ip / UDP(sport=51234, dport=port, **udp_kw) / bytes(inner)


def decapsulated(frame: Ether, inner) -> bytes:
    """What the stack must get: the frame's MACs, the inner family, the
    inner packet byte for byte."""
    etype = 0x0800 if inner.version == 4 else 0x86DD
    return bytes(Ether(src=frame.src, dst=frame.dst, type=etype)) + bytes(inner)


# -- test-run ------------------------------------------------------------------


class Harness:
    """The program loaded with its maps pinned, configured as `attach`
    would, not attached: packets go through BPF test-run in the backend ns."""

    def __init__(self, net: Net):
        self.net = net
        self.pins = pin_dir()
        self.d = Decap.load(self.pins)
        try:
            self.d.set_vips({ipaddress.ip_address(VIP4), ipaddress.ip_address(VIP6)})
            self.d.set_tunnel_dsts(net.be_ifindex, {ipaddress.ip_address(BE4),
                                                    ipaddress.ip_address(BE6)})
        except BaseException:
            self.close()
            raise

    def run(self, frame, ifindex: int | None = None) -> tuple[int, bytes]:
        with self.net.lab.inside(self.net.be_ns):
            res = test_run(self.d.prog_fd, bytes(frame), ingress_ifindex=ifindex or self.net.be_ifindex)
        return res.retval, res.data_out

    def snapshot(self) -> dict[str, int]:
        """Packets per counter and per drop reason ("drop:<reason>")."""
        out = {k: v["packets"] for k, v in self.d.counters().items()}
        out.update({f"drop:{k}": v["packets"] for k, v in self.d.drops().items()})
        return out

    def close(self) -> None:
        self.d.close()
        with Decap.open_pinned(self.pins) as d:
            d.purge()


@pytest.fixture(scope="module")
def h(net):
    harness = Harness(net)
    try:
        yield harness
    finally:
        harness.close()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _fragment() -> IP:
    return IP(src=CLIENT4, dst=VIP4, ttl=64, id=9, flags="MF", frag=0, proto=17) / (b"\x00" * 64)


def _udp_with_options() -> IP:
    return IP(src=CLIENT4, dst=VIP4, ttl=64, options=[IPOption_RR()]) / UDP(sport=5353, dport=53) / b"q"


DECAP_CASES = [
    ("IPv4 in IPv4", lambda: ipip(inner4(), 4), inner4, "ipip4"),
    ("IPv6 in IPv4", lambda: ipip(inner6(), 4), inner6, "ipip4"),
    ("IPv4 in IPv6", lambda: ipip(inner4(), 6), inner4, "ipip6"),
    ("IPv6 in IPv6", lambda: ipip(inner6(), 6), inner6, "ipip6"),
    ("GUE IPv4 over IPv4, UDP checksum 0", lambda: gue(inner4(), 4, chksum=0), inner4, "gue4"),
    ("GUE IPv6 over IPv4", lambda: gue(inner6(), 4), inner6, "gue4"),
    ("GUE IPv4 over IPv6", lambda: gue(inner4(), 6), inner4, "gue6"),
    ("GUE IPv6 over IPv6", lambda: gue(inner6(), 6), inner6, "gue6"),
    # The inner packet is the client's business: a fragment or a UDP datagram
    # goes up as it is (the stack reassembles, checks, delivers).
    ("inner IPv4 fragment", lambda: ipip(_fragment(), 4), _fragment, "ipip4"),
    ("inner UDP with options", lambda: gue(_udp_with_options(), 4), _udp_with_options, "gue4"),
]


@pytest.mark.parametrize("name,frame,inner,counter", DECAP_CASES, ids=[c[0] for c in DECAP_CASES])
def test_tunnel_to_a_vip_is_decapsulated_exactly(h, name, frame, inner, counter):
    frame, inner = frame(), inner()
    vip = ipaddress.ip_address(inner.dst)
    before, vip_before = h.snapshot(), h.d.vips()[vip]
    rc, out = h.run(frame)
    assert rc == XDP_PASS
    assert out == decapsulated(frame, inner)
    assert delta(before, h.snapshot()) == {counter: 1}
    assert h.d.vips()[vip] == (vip_before[0] + 1, vip_before[1] + len(bytes(frame)))


@pytest.mark.parametrize("frame", [
    lambda: ipip(inner4(OTHER4), 4), lambda: ipip(inner6(OTHER6), 6),
    lambda: gue(inner4(OTHER4), 6), lambda: gue(inner6("2001:db8::1"), 4),
], ids=["ipip4", "ip6ip6", "gue6", "gue4"])
def test_tunnel_to_another_inner_destination_passes_untouched(h, frame):
    frame = frame()
    before = h.snapshot()
    rc, out = h.run(frame)
    assert rc == XDP_PASS and out == bytes(frame)
    assert delta(before, h.snapshot()) == {"not_vip": 1}


def test_tunnel_to_an_address_not_accepted_passes_untouched(h):
    """Routed tunnel traffic (another outer destination) and tunnels to our
    address arriving on an interface they are not accepted on."""
    frames = [ipip(inner4(), 4, dst="10.0.0.77"), ipip(inner6(), 6, dst="fd00::77"),
              gue(inner4(), 4, dst="10.0.0.77")]
    before = h.snapshot()
    for f in frames:
        assert h.run(f) == (XDP_PASS, bytes(f))
    lo = 1
    for f in (ipip(inner4(), 4), gue(inner6(), 6)):
        assert h.run(f, ifindex=lo) == (XDP_PASS, bytes(f))
    assert delta(before, h.snapshot()) == {"pass": 5}


def _with_tot_len(pkt, delta_len: int) -> bytes:
    raw = bytearray(bytes(pkt))
    raw[2:4] = (len(raw) + delta_len).to_bytes(2, "big")
    return bytes(raw)


def _with_plen(pkt, delta_len: int) -> bytes:
    raw = bytearray(bytes(pkt))
    raw[4:6] = (len(raw) - 40 + delta_len).to_bytes(2, "big")
    return bytes(raw)


MALFORMED = [
    ("inner IPv4 header cut short", lambda: ipip(bytes(inner4())[:12], 4, proto=4), "inner_truncated"),
    ("inner IPv6 header cut short", lambda: ipip(bytes(inner6())[:30], 6, nh=41), "inner_truncated"),
    ("GUE without payload", lambda: gue(b"", 4), "inner_truncated"),
    ("inner IPv4 claims more than it has", lambda: ipip(_with_tot_len(inner4(), 8), 4, proto=4),
     "inner_bad_length"),
    ("inner IPv4 shorter than the tunnel payload", lambda: ipip(bytes(inner4()) + b"junk", 4, proto=4),
     "inner_bad_length"),
    ("inner IPv6 payload length off", lambda: ipip(_with_plen(inner6(), -3), 6, nh=41), "inner_bad_length"),
    ("inner IPv4 IHL below 5", lambda: ipip(bytes([0x44]) + bytes(inner4())[1:], 4, proto=4),
     "inner_bad_length"),
    ("GUE with version nibble 0 (variant 0 header)", lambda: gue(b"\x00\x00\x00\x00" + bytes(inner4()), 4),
     "gue_version"),
    ("GUE with version nibble 5", lambda: gue(bytes([0x55]) + bytes(inner4())[1:], 6), "gue_version"),
    ("protocol 4 carrying IPv6", lambda: ipip(bytes(inner6()), 4, proto=4), "inner_version"),
    ("next header 41 carrying IPv4", lambda: ipip(bytes(inner4()), 6, nh=41), "inner_version"),
    ("outer IPv4 fragment", lambda: ipip(inner4(), 4, flags="MF"), "outer_fragment"),
    ("outer IPv4 bad checksum", lambda: ipip(inner4(), 4, chksum=0x1234), "outer_bad_ip"),
    ("outer IPv4 options", lambda: ipip(inner4(), 4, options=[IPOption_RR()]), "outer_bad_ip"),
    ("outer IPv4 length past the frame", lambda: ipip(inner4(), 4, len=1400), "outer_bad_ip"),
    ("outer IPv6 payload length past the frame", lambda: ipip(inner6(), 6, plen=1400), "outer_bad_ip"),
    ("GUE UDP length off", lambda: gue(inner4(), 4, len=20), "bad_udp"),
]


@pytest.mark.parametrize("name,frame,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_tunnel_packets_are_dropped_by_reason(h, name, frame, reason):
    frame = frame()
    before = h.snapshot()
    rc, _ = h.run(frame)
    assert rc == XDP_DROP, name
    assert delta(before, h.snapshot()) == {"drop": 1, f"drop:{reason}": 1}, name


def test_other_traffic_passes_untouched(h, net):
    eth = Ether(src=net.lb_mac, dst=net.be_mac)
    frames = [
        Ether(src=net.lb_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=LB4, pdst=BE4, hwsrc=net.lb_mac),
        eth / IP(src=LB4, dst=BE4) / TCP(sport=1234, dport=22, flags="S"),
        eth / IP(src=CLIENT4, dst=VIP4) / TCP(sport=1234, dport=80, flags="S"),   # a VIP, but plain
        eth / IP(src=LB4, dst=BE4) / UDP(sport=53, dport=5353) / b"x",
        eth / IP(src=LB4, dst=BE4) / ICMP(),
        eth / IPv6(src=LB6, dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt=BE6),
        eth / IPv6(src=LB6, dst=BE6) / TCP(sport=1234, dport=22, flags="S"),
        Ether(src=net.lb_mac, dst=net.be_mac, type=0x88B5) / (b"\x00" * 46),
    ]
    before = h.snapshot()
    for f in frames:
        data = bytes(f)
        assert h.run(data) == (XDP_PASS, data)
    assert delta(before, h.snapshot()) == {"pass": len(frames)}


def test_gue_port_is_configurable_and_can_be_off(h):
    frame = gue(inner4(), 4)
    try:
        h.d.set_gue_port(0)
        before = h.snapshot()
        assert h.run(frame) == (XDP_PASS, bytes(frame))     # off: plain UDP
        h.d.set_gue_port(9999)
        assert h.run(frame) == (XDP_PASS, bytes(frame))     # no longer the GUE port
        other = gue(inner4(), 4, port=9999)
        rc, out = h.run(other)
        assert rc == XDP_PASS and out == decapsulated(other, inner4())
        assert delta(before, h.snapshot()) == {"pass": 2, "gue4": 1}
    finally:
        h.d.set_gue_port(GUE_PORT)


def test_vip_set_update_keeps_counters_and_stops_decapsulation(h):
    vip4, vip6 = ipaddress.ip_address(VIP4), ipaddress.ip_address(VIP6)
    h.run(ipip(inner4(), 4))
    kept = h.d.vips()[vip4]
    try:
        added, removed = h.d.set_vips({vip4, ipaddress.ip_address(OTHER4)})
        assert (added, removed) == ([ipaddress.ip_address(OTHER4)], [vip6])
        assert h.d.vips()[vip4] == kept
        frame = ipip(inner6(), 6)
        assert h.run(frame) == (XDP_PASS, bytes(frame))     # VIP6 is no longer served
        rc, out = h.run(ipip(inner4(OTHER4), 4))
        assert rc == XDP_PASS and out == decapsulated(ipip(inner4(OTHER4), 4), inner4(OTHER4))
    finally:
        h.d.set_vips({vip4, vip6})


def test_constants_from_btf(h):
    c = h.d.consts
    assert c.DECAP_GUE_PORT_DEFAULT == GUE_PORT == h.d.gue_port
    assert (c.DECAP_FAMILY_IPV4, c.DECAP_FAMILY_IPV6) == (socket.AF_INET, socket.AF_INET6)
    assert set(h.d.counters()) == {"pass", "not_vip", "ipip4", "ipip6", "gue4", "gue6", "drop"}


# -- end to end ----------------------------------------------------------------


def xdplb(net: Net, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI, as a subprocess inside `ns`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    p = net.lab.run(ns, [sys.executable, "-m", "lb.cli", *args], timeout=60, check=False,
                    env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"xdplb {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


class Wire:
    """A packet socket on lb0: sends frames, returns what arrives."""

    def __init__(self, net: Net, ifname: str = "lb0"):
        with net.lab.inside(net.lb_ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))

    def send(self, frame) -> None:
        self.sock.send(bytes(frame))

    def collect(self, match, timeout: float, until=None) -> list[Ether]:
        """Incoming frames that satisfy `match`, until `until(frames)` or timeout."""
        got: list[Ether] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                break
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            pkt = Ether(data)
            if match(pkt):
                got.append(pkt)
                if until is None or until(got):
                    break
        return got

    def close(self) -> None:
        self.sock.close()


def tcp_from(pkt, src: str, sport: int, dst: str, dport: int) -> bool:
    layer = IP if IP in pkt and pkt[IP].proto == 6 else IPv6
    return (layer in pkt and TCP in pkt and pkt[layer].src == src and pkt[layer].dst == dst
            and pkt[TCP].sport == sport and pkt[TCP].dport == dport)


@dataclass
class Exchange:
    synack: Ether
    body: bytes
    sent: int          # tunnel frames sent


def http_through_tunnel(net: Net, wire: Wire, encap, client: str, vip: str) -> Exchange:
    """A TCP connection by hand, each client packet encapsulated by `encap`:
    SYN, ACK + GET, then RST. Returns the SYN-ACK and the reply bytes."""
    sport = next(_ports)
    ip = (lambda: IP(src=client, dst=vip, ttl=64)) if ":" not in vip else \
        (lambda: IPv6(src=client, dst=vip, hlim=64))
    back = lambda p: tcp_from(p, vip, HTTP_PORT, client, sport)  # noqa: E731
    eth = Ether(src=net.lb_mac, dst=net.be_mac)
    wire.send(eth / encap(ip() / TCP(sport=sport, dport=HTTP_PORT, flags="S", seq=1000)))
    synack = wire.collect(lambda p: back(p) and p[TCP].flags == "SA", timeout=3)
    assert synack, f"no SYN-ACK from {vip}:{HTTP_PORT} to {client}:{sport}"
    synack = synack[0]
    ack = synack[TCP].seq + 1
    request = b"GET / HTTP/1.0\r\n\r\n"
    wire.send(eth / encap(ip() / TCP(sport=sport, dport=HTTP_PORT, flags="PA", seq=1001, ack=ack)
                          / request))
    segments: dict[int, bytes] = {}

    def complete(frames) -> bool:
        for f in frames:
            if bytes(f[TCP].payload):
                segments[f[TCP].seq] = bytes(f[TCP].payload)
        return b"backend=" in b"".join(v for _, v in sorted(segments.items()))

    wire.collect(lambda p: back(p) and len(p[TCP].payload) > 0, timeout=5, until=complete)
    body = b"".join(v for _, v in sorted(segments.items()))
    wire.send(eth / encap(ip() / TCP(sport=sport, dport=HTTP_PORT, flags="R", seq=1001 + len(request))))
    return Exchange(synack, body, sent=3)


ENCAPS = {
    # name: (encapsulate inner, counter, client, vip)
    "ipip4": (lambda p: IP(src=LB4, dst=BE4) / p, "ipip4", CLIENT4, VIP4),
    "ipip6 (IPv4 in IPv6)": (lambda p: IPv6(src=LB6, dst=BE6) / p, "ipip6", CLIENT4, VIP4),
    "ip6ip6": (lambda p: IPv6(src=LB6, dst=BE6) / p, "ipip6", CLIENT6, VIP6),
    "gue4": (lambda p: IP(src=LB4, dst=BE4) / UDP(sport=40001, dport=GUE_PORT, chksum=0) / bytes(p),
             "gue4", CLIENT4, VIP4),
    "gue6 (IPv6 in IPv6)": (lambda p: IPv6(src=LB6, dst=BE6) / UDP(sport=40002, dport=GUE_PORT) / bytes(p),
                            "gue6", CLIENT6, VIP6),
}


@pytest.fixture(scope="module")
def dsr(net):
    """`xdplb backend attach` on eth0 and an HTTP server on the VIPs' port."""
    pins = pin_dir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = net.lab.popen(net.be_ns, [sys.executable, "-m", "lb.backend_server", "--name", "be1",
                                        "--host", "::", "--port", str(HTTP_PORT)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    assert server.stdout.readline() == b"ready\n"
    wire = Wire(net)
    try:
        res = xdplb(net, net.be_ns, "backend", "attach", "eth0", "--vip", VIP4, "--vip", VIP6,
                    "--bpffs", str(pins), "--json")
        yield net, wire, pins, json.loads(res.stdout)
    finally:
        wire.close()
        xdplb(net, net.be_ns, "backend", "detach", "eth0", "--purge", "--bpffs", str(pins), check=False)


def backend_status(net: Net, pins: Path) -> dict:
    return json.loads(xdplb(net, net.be_ns, "backend", "status", "--json", "--bpffs", str(pins)).stdout)


def test_attach_sets_up_program_vips_and_arp(dsr):
    net, _wire, pins, res = dsr
    assert res["interface"] == "eth0" and res["mode"] == "native"
    assert set(res["vips"]) == {VIP4, VIP6}
    assert set(res["tunnel_dsts"]) == {BE4, BE6}                # eth0's, link-local left out
    assert set(res["addresses_added"]) == {VIP4, VIP6}
    assert res["sysctls"] == {"net.ipv4.conf.eth0.arp_ignore": 1, "net.ipv4.conf.eth0.arp_announce": 2}
    assert res["gue_port"] == GUE_PORT
    with net.lab.inside(net.be_ns):
        assert xdp_query(net.be_ifindex, "native") == res["prog_id"]
    assert net.lab.read_sysctl(net.be_ns, "net.ipv4.conf.eth0.arp_ignore") == "1"
    lo = {a.get_attr("IFA_ADDRESS"): a.get_attr("IFA_PROTO")
          for a in net.lab.ipr(net.be_ns).get_addr(index=1)}
    assert lo.get(VIP4) == lo.get(VIP6) == 0x78
    st = backend_status(net, pins)
    assert [(i["interface"], i["mode"], i["prog_id"]) for i in st["interfaces"]] == \
        [("eth0", "native", res["prog_id"])]
    assert {v["address"]: v["local_address"] for v in st["vips"]} == {VIP4: "xdplb", VIP6: "xdplb"}
    assert "strict" in " ".join(res["notes"])                   # rp_filter=1 is reported


@pytest.mark.parametrize("name", list(ENCAPS))
def test_backend_answers_the_client_directly(dsr, name):
    """A real HTTP exchange through the tunnel: the SYN-ACK and the reply
    leave the backend from the VIP to the client, not encapsulated, and the
    server saw the client's own address."""
    net, wire, pins, _ = dsr
    encap, counter, client, vip = ENCAPS[name]
    before = backend_status(net, pins)
    ex = http_through_tunnel(net, wire, encap, client, vip)
    assert ex.synack.src == net.be_mac                           # straight from the backend
    outer = ex.synack[IP] if ":" not in vip else ex.synack[IPv6]
    assert (outer.src, outer.dst) == (vip, client)               # from the VIP, to the client
    assert isinstance(outer.payload, TCP)                        # not encapsulated
    assert b"200 OK" in ex.body and b"backend=be1" in ex.body
    assert f"client={client}".encode() in ex.body or f"client=::ffff:{client}".encode() in ex.body
    after = backend_status(net, pins)
    assert after["counters"][counter]["packets"] - before["counters"][counter]["packets"] == ex.sent
    moved = {k for k in after["counters"]
             if k not in ("pass", counter) and after["counters"][k] != before["counters"][k]}
    assert moved == set()
    vip_packets = {v["address"]: v["packets"] for v in after["vips"]}
    assert vip_packets[vip] - {v["address"]: v["packets"] for v in before["vips"]}[vip] == ex.sent


def test_backend_does_not_answer_arp_for_the_vip(dsr):
    net, wire, _pins, _ = dsr
    def who_has(ip: str) -> list:
        wire.send(Ether(src=net.lb_mac, dst="ff:ff:ff:ff:ff:ff")
                  / ARP(op=1, hwsrc=net.lb_mac, psrc=LB4, pdst=ip))
        return wire.collect(lambda p: ARP in p and p[ARP].op == 2 and p[ARP].psrc == ip, timeout=1)

    assert who_has(BE4)                                         # the probe works
    assert not who_has(VIP4)
    # Without the setting the backend would claim the VIP on its link.
    net.lab.sysctl(net.be_ns, "net.ipv4.conf.eth0.arp_ignore", 0)
    try:
        assert who_has(VIP4)
    finally:
        net.lab.sysctl(net.be_ns, "net.ipv4.conf.eth0.arp_ignore", 1)


def test_without_decapsulation_the_syn_gets_no_answer(dsr):
    """What lets a DSR health check through the tunnel mark such a backend
    down: the stack cannot take the tunnel apart (no IPIP/FOU here)."""
    net, wire, pins, _ = dsr
    xdplb(net, net.be_ns, "backend", "detach", "eth0", "--bpffs", str(pins))
    try:
        assert backend_status(net, pins)["interfaces"] == []
        with net.lab.inside(net.be_ns):
            assert xdp_query(net.be_ifindex) is None
        for name in ("ipip4", "gue4"):
            encap, _c, client, vip = ENCAPS[name]
            sport = next(_ports)
            wire.send(Ether(src=net.lb_mac, dst=net.be_mac)
                      / encap(IP(src=client, dst=vip) / TCP(sport=sport, dport=HTTP_PORT, flags="S")))
            answer = wire.collect(lambda p: tcp_from(p, vip, HTTP_PORT, client, sport), timeout=1.5)
            assert answer == [], name
    finally:
        # Re-attach without --vip: the VIP set is kept.
        res = json.loads(xdplb(net, net.be_ns, "backend", "attach", "eth0", "--bpffs", str(pins),
                               "--json").stdout)
    assert set(res["vips"]) == {VIP4, VIP6} and res["addresses_added"] == []
    ex = http_through_tunnel(net, wire, ENCAPS["ipip4"][0], CLIENT4, VIP4)
    assert b"backend=be1" in ex.body


def test_attach_is_idempotent_and_updates_the_vip_set(dsr):
    net, wire, pins, first = dsr
    args = ("backend", "attach", "eth0", "--bpffs", str(pins), "--json")
    again = json.loads(xdplb(net, net.be_ns, *args, "--vip", VIP4, "--vip", VIP6).stdout)
    assert again["addresses_added"] == again["addresses_removed"] == [] and again["sysctls"] == {}
    assert again["prog_id"] != first["prog_id"]                  # swapped in the same link
    # An address an administrator put on lo is neither added nor removed.
    net.lab.addr(net.be_ns, "lo", "10.96.0.77/32")
    try:
        only4 = json.loads(xdplb(net, net.be_ns, *args, "--vip", VIP4, "--vip", "10.96.0.77").stdout)
        assert only4["addresses_added"] == [] and only4["addresses_removed"] == [VIP6]
        st = backend_status(net, pins)
        assert {v["address"]: v["local_address"] for v in st["vips"]} == \
            {VIP4: "xdplb", "10.96.0.77": "other"}
        frame = Ether(src=net.lb_mac, dst=net.be_mac) / IPv6(src=LB6, dst=BE6) / inner6()
        before = st["counters"]["not_vip"]["packets"]
        wire.send(frame)
        deadline = time.monotonic() + 5
        while (n := backend_status(net, pins)["counters"]["not_vip"]["packets"]) == before and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert n == before + 1                                      # VIP6 is not served now
        back = json.loads(xdplb(net, net.be_ns, *args, "--vip", VIP4, "--vip", VIP6).stdout)
        assert back["addresses_added"] == [VIP6] and back["addresses_removed"] == []
        lo = {a.get_attr("IFA_ADDRESS") for a in net.lab.ipr(net.be_ns).get_addr(index=1)}
        assert "10.96.0.77" in lo                                 # not ours: left alone
    finally:
        net.lab.ipr(net.be_ns).addr("del", index=1, address="10.96.0.77", prefixlen=32)
        xdplb(net, net.be_ns, *args, "--vip", VIP4, "--vip", VIP6)


def test_cli_errors_are_one_line(dsr, tmp_path):
    net, _wire, pins, _ = dsr
    other = pin_dir()
    cases = [
        (("attach", "nosuch0", "--vip", VIP4), "interface 'nosuch0' not found"),
        (("attach", "eth0", "--vip", "10.0.0.300"), "invalid VIP '10.0.0.300'"),
        (("attach", "eth0", "--vip", "224.0.0.5"), "not a unicast address"),
        (("attach", "eth0", "--vip", VIP4, "--gue-port", "70000"), "invalid GUE port 70000"),
        (("attach", "eth0", "--vip", VIP4, "--bpffs", str(tmp_path / "pins")),
         "is not on a BPF filesystem"),
        (("attach", "eth0", "--vip", VIP4, "--xdp-mode", "generic"), "runs the decap program in native mode"),
        (("attach", "eth0", "--vip", VIP4, "--bpffs", str(other)), "another XDP program (id "),
    ]
    for args, message in cases:
        if "--bpffs" not in args:
            args = (*args, "--bpffs", str(pins))
        p = xdplb(net, net.be_ns, "backend", *args, check=False)
        out = (p.stdout + p.stderr).strip()
        assert p.returncode == 1, (args, out)
        assert out.count("\n") == 0 and message in out and "Traceback" not in out, (args, out)
    assert backend_status(net, pins)["attached"]                 # nothing was broken
    assert not other.exists()                                     # and nothing pinned elsewhere


def test_detach_purge_removes_everything(bpf_object):
    """On a pair of its own: purge takes back the link, the maps, the pins
    and the VIP addresses xdplb added, and nothing else."""
    with Lab(ipv6=True) as lab:
        net = build_pair(lab, "p")
        pins = pin_dir()
        try:
            # An IPv6 VIP where IPv6 is off: refused before anything is made.
            lab.sysctl(net.be_ns, "net.ipv6.conf.lo.disable_ipv6", 1)
            p = xdplb(net, net.be_ns, "backend", "attach", "eth0", "--vip", VIP4, "--vip", VIP6,
                      "--bpffs", str(pins), check=False)
            assert p.returncode == 1 and "IPv6 is disabled on lo" in p.stdout, p.stdout + p.stderr
            assert not pins.exists()
            with lab.inside(net.be_ns):
                assert xdp_query(net.be_ifindex) is None
            lab.sysctl(net.be_ns, "net.ipv6.conf.lo.disable_ipv6", 0)

            xdplb(net, net.be_ns, "backend", "attach", "eth0", "--vip", VIP4, "--vip", VIP6,
                  "--bpffs", str(pins))
            assert (pins / "links" / "eth0").exists() and (pins / "maps" / "vips").exists()
            p = xdplb(net, net.be_ns, "backend", "detach", "eth0", "--purge", "--bpffs", str(pins))
            assert "detached from eth0" in p.stdout
            assert not pins.exists()
            with lab.inside(net.be_ns):
                assert xdp_query(net.be_ifindex) is None
            lo = {a.get_attr("IFA_ADDRESS") for a in lab.ipr(net.be_ns).get_addr(index=1)}
            assert lo == {"127.0.0.1", "::1"}
            assert backend_status(net, pins) == {"pin_dir": str(pins), "attached": False,
                                                 "interfaces": [], "vips": []}
        finally:
            if pins.exists():
                xdplb(net, net.be_ns, "backend", "detach", "eth0", "--purge", "--bpffs", str(pins),
                      check=False)
