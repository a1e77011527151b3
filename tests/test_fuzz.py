"""Hostile packets through the real program (BPF test-run), with invariants
checked on every packet:

- never XDP_ABORTED;
- a forwarded packet is well formed, and its checksums are valid exactly
  when the received packet's were (scapy recomputes both);
- traffic that is neither for a VIP nor a reply passes untouched;
- nothing from a denied identity reaches a backend of a policed service;
- DSR services (ipip, gue): a tunnel packet has a well-formed outer header
  (valid checksum, exact lengths, DF, the GUE port) to a backend, and
  carries the received IP packet byte for byte, so its checksums are valid
  exactly when the received ones were; a packet too big for the tunnel is
  answered with a well-formed ICMP fragmentation needed, or dropped;
- IPv6 DSR (6in6 ipip/gue, 4in6, 6in4, a Lab(ipv6=True)): the same, the
  outer IPv6 header exact (traffic class, payload length, next header, hop
  limit, the flow's label, GUE checksum 0), and too big answered with
  ICMPv6 packet too big (ICMP fragmentation needed for an IPv4 client);
- ICMP errors quoting a translated flow (icmp_error.h), from either side:
  a translated one goes to that flow's backend (about a reply) or client
  (about a forwarded packet) with the quote to match, never about a denied
  client; its outer, ICMP and quoted IPv4 header checksums are each valid
  exactly when the received one was. One from the wrong side is dropped
  as a forged reply is, and one leaving from the VIP towards an unresolved
  neighbour as such a reply is.

CI runs XDPLB_FUZZ_PACKETS (default 100,000) mutated packets plus hypothesis
examples; `XDPLB_FUZZ_PACKETS=10000000 pytest tests/test_fuzz.py` is the
long run. Counts are printed at the end (-s shows them).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from lb.config import GUE_PORT_DEFAULT
from lb.demo import lab_config
from lbtest import (DSR_UDP_VIP, DSR_UDP_VIP6, ENCAP_SOURCE, ENCAP_SOURCE6, GUE_VIP, GUE_VIP6, IPIP_VIP, IPIP_VIP6,
                    VIP_4IN6, VIP_6IN4, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, Harness,
                    checksum_errors, with_dsr6_services, with_dsr_services)
from loader.testrun import test_run

PACKETS = int(os.environ.get("XDPLB_FUZZ_PACKETS", "100000"))
WEB, ECHO = "10.96.0.10", "10.96.0.53"
DSR_VIPS = {IPIP_VIP, GUE_VIP, DSR_UDP_VIP}
VIPS = {WEB, ECHO} | DSR_VIPS
POLICED = {WEB, IPIP_VIP, GUE_VIP}                 # allow: [frontend]
ALLOWED, DENIED = "10.1.0.10", "192.0.2.10"
DSR_PORT = 8080


@contextlib.contextmanager
def fuzz_harness(lab_, topo, with_services, name: str):
    """The lab's program with `with_services`' config; the harness keeps
    a tally, printed at the end."""
    cfg = with_services(lab_config(topo, fillers=0, bpffs="/unused", socket="/unused"), topo)
    with Harness(lab_, topo, cfg, attach=False) as h:
        h.backend_ips = {b.ip for b in topo.backends} | {b.ip6 for b in topo.backends if b.ip6}
        h.l0 = topo.lb_client.ifindex
        h.tally = collections.Counter()
        yield h
        print(f"\n{name}: {sum(h.tally.values())} packets: " +
              ", ".join(f"{k}={v}" for k, v in sorted(h.tally.items())))


@pytest.fixture(scope="module")
def fz(lab, bpf_object):
    lab_, topo = lab
    with fuzz_harness(lab_, topo, with_dsr_services, "fuzz") as h:
        h.backends = {(b.ip, topo.backend_port) for b in topo.backends} | \
                     {(b.ip, topo.udp_port) for b in topo.backends}
        yield h


def seeds() -> list:
    """Well-formed starting points: every kind of packet the LB meets."""
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    return [
        e / IP(src=ALLOWED, dst=WEB) / TCP(sport=40000, dport=80, flags="S"),
        e / IP(src=DENIED, dst=WEB) / TCP(sport=40001, dport=80, flags="S"),
        e / IP(src=ALLOWED, dst=ECHO) / UDP(sport=5353, dport=53) / b"query",
        e / IP(src=DENIED, dst=WEB) / UDP(sport=5353, dport=80) / b"x",
        e / IP(src=ALLOWED, dst="10.1.0.1") / TCP(sport=40002, dport=22),
        e / IP(src=ALLOWED, dst=WEB, options=[IPOption_RR()]) / TCP(dport=80),
        e / IP(src=DENIED, dst=WEB, flags="MF") / TCP(sport=40003, dport=80),
        e / IP(src=DENIED, dst=WEB, frag=100, proto=6) / (b"y" * 24),
        e / Dot1Q(vlan=5) / IP(src=DENIED, dst=WEB) / TCP(sport=40004, dport=80),
        e / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP(src=DENIED, dst=WEB) / TCP(sport=40005, dport=80),
        e / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP(),
        e / IP(src="10.1.0.1", dst=ALLOWED) / ICMP(type=3, code=4) / IPerror(src=ALLOWED, dst=WEB) / TCPerror(sport=40000, dport=80),
        e / IP(src=ALLOWED, dst=WEB) / ICMP(type=3, code=3) / IPerror(src=WEB, dst=ALLOWED) / TCPerror(sport=80, dport=40000),
        e / IP(src=ALLOWED, dst=WEB) / TCP(sport=40006, dport=80, dataofs=15, flags="FSRPAUEC"),
        e / IP(src=ALLOWED, dst=WEB) / TCP(sport=40007, dport=80, dataofs=2),
        e / IP(src=ALLOWED, dst=ECHO) / UDP(sport=5354, dport=53, chksum=0) / b"nocsum",
        e / IP(src=ALLOWED, dst=ECHO) / UDP(sport=5355, dport=53, chksum=0x1234) / b"badcsum",
        e / IP(src=ALLOWED, dst=ECHO) / UDP(sport=5356, dport=53, len=4) / b"short",
        # DSR services: tunnels, policy first, and the MTU answer.
        e / IP(src=ALLOWED, dst=IPIP_VIP) / TCP(sport=40010, dport=DSR_PORT, flags="S"),
        e / IP(src=ALLOWED, dst=GUE_VIP) / TCP(sport=40011, dport=DSR_PORT, flags="PA") / b"GET / HTTP/1.0\r\n",
        e / IP(src=DENIED, dst=IPIP_VIP) / TCP(sport=40012, dport=DSR_PORT, flags="S"),
        e / IP(src=DENIED, dst=GUE_VIP, flags="DF") / TCP(sport=40013, dport=DSR_PORT, flags="A") / (b"d" * 1460),
        e / IP(src=ALLOWED, dst=IPIP_VIP, flags="DF") / TCP(sport=40014, dport=DSR_PORT, flags="A") / (b"b" * 1460),
        e / IP(src=ALLOWED, dst=GUE_VIP) / TCP(sport=40015, dport=DSR_PORT, flags="A") / (b"n" * 1460),
        e / IP(src=DENIED, dst=DSR_UDP_VIP) / UDP(sport=5357, dport=DSR_PORT, chksum=0) / b"open",
        e / IP(src=ALLOWED, dst=DSR_UDP_VIP) / UDP(sport=5358, dport=DSR_PORT, chksum=0x4321) / b"badcsum",
        e / Dot1Q(vlan=5) / IP(src=ALLOWED, dst=IPIP_VIP) / TCP(sport=40016, dport=DSR_PORT),
    ]


def src_of(data: bytes) -> tuple[str | None, str | None]:
    """(source, destination) IPv4 addresses as the data plane would read them."""
    off = 12
    eth = data[off:off + 2]
    if eth in (b"\x81\x00", b"\x88\xa8") and len(data) >= 18:
        off += 4
        eth = data[off:off + 2]
    if eth != b"\x08\x00" or len(data) < off + 2 + 20:
        return None, None
    ip = data[off + 2:off + 22]
    return str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))


def l2_len(data: bytes) -> int:
    return 18 if data[12:14] in (b"\x81\x00", b"\x88\xa8") else 14


def check_tunnel(fz, data: bytes, out: bytes, dst: str) -> None:
    """A DSR packet: outer header as encap.h writes it, the received IP
    packet inside byte for byte."""
    l2 = l2_len(data)
    assert out[:12] != data[:12] and out[l2 - 2:l2] == b"\x08\x00" and out[12:l2 - 2] == data[12:l2 - 2]
    outer = IP(out[l2:l2 + 20])
    fresh = IP(bytes(outer))
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == outer.chksum, "outer IPv4 checksum"
    assert (outer.version, outer.ihl, outer.flags, outer.frag, outer.ttl) == (4, 5, 2, 0, 64)
    assert outer.src == ENCAP_SOURCE and outer.dst in fz.backend_ips
    inner_len = struct.unpack("!H", data[l2 + 2:l2 + 4])[0]
    overhead = {4: 20, 17: 28}[outer.proto]
    assert overhead == (28 if dst == GUE_VIP else 20)
    assert outer.len == inner_len + overhead
    if outer.proto == 17:
        sport, dport, length, csum = struct.unpack("!HHHH", out[l2 + 20:l2 + 28])
        assert sport >= 49152 and dport == GUE_PORT_DEFAULT and length == inner_len + 8 and csum == 0
    inner = out[l2 + overhead:l2 + overhead + inner_len]
    assert inner == data[l2:l2 + inner_len], "the inner packet is not the received one"
    fz.tally["tunnelled_valid" if not checksum_errors(Ether(data)) else "tunnelled_corrupt_in"] += 1


def check_too_big(fz, data: bytes, out: Ether, src: str, dst: str) -> None:
    """A DSR packet too big for the tunnel, answered from the VIP with
    ICMP fragmentation needed quoting it."""
    tot_len, df = struct.unpack("!H", data[16:18])[0], data[20] & 0x40
    assert dst in DSR_VIPS and df and tot_len + (28 if dst == GUE_VIP else 20) > 1500, data.hex()
    assert (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code) == (dst, src, 3, 4)
    assert out[ICMP].nexthopmtu == 1500 - (28 if dst == GUE_VIP else 20)
    assert checksum_errors(out) == [] and bytes(out)[42:70] == data[14:42]
    fz.tally["frag_needed"] += 1


def ones_sum_ok(b: bytes) -> bool:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return s == 0xffff


def icmp_checksum_errors(frame: bytes) -> list[str]:
    """checksum_errors() of an ICMP error, and its quoted IPv4 header's."""
    l2 = l2_len(frame)
    quoted = frame[l2 + 28:l2 + 48]
    bad = checksum_errors(Ether(frame))
    return bad + ([] if len(quoted) < 20 or ones_sum_ok(quoted) else ["quoted IPv4 header"])


def is_icmp_error(data: bytes) -> bool:
    l2 = l2_len(data)
    return len(data) > l2 + 20 and data[l2 - 2:l2] == b"\x08\x00" and data[l2 + 9] == 1 and \
        data[l2 + 20] in (3, 11, 12)


def check_icmp_error(fz, data: bytes, out: bytes, ingress: int) -> None:
    """A translated ICMP error: to the backend of the flow it quotes the
    reply of, or to the client of the flow it quotes a packet of."""
    assert is_icmp_error(data), data.hex()
    assert icmp_checksum_errors(out) == icmp_checksum_errors(data), data.hex()
    l2 = l2_len(out)
    dst = str(ipaddress.IPv4Address(out[l2 + 16:l2 + 20]))
    q = out[l2 + 28:]
    qsrc, qdst = str(ipaddress.IPv4Address(q[12:16])), str(ipaddress.IPv4Address(q[16:20]))
    qsport, qdport = struct.unpack("!HH", q[20:24])
    if dst in fz.backend_ips:           # about a reply, from the client's side
        assert ingress == fz.l0 and qsrc == dst and (qsrc, qsport) in fz.backends, data.hex()
        assert src_of(data)[1] in VIPS - DSR_VIPS, data.hex()
        assert not (qdst == DENIED and src_of(data)[1] in POLICED), f"about a denied client: {data.hex()}"
        fz.tally["icmp_error_to_backend"] += 1
    else:                               # about a forwarded packet, from the backend's side
        assert ingress != fz.l0 and dst == qsrc and qdst in VIPS - DSR_VIPS, data.hex()
        assert not (qsrc == DENIED and qdst in POLICED), f"about a denied client: {data.hex()}"
        fz.tally["icmp_error_to_client"] += 1


# Why a translated error may be dropped: as a reply would be (from the
# wrong side; or, leaving from the VIP, towards a client whose neighbour
# entry went stale while the fuzzing ran: forward.h's fib_verdict).
ICMP_ERROR_DROPS = ("SPOOFED_REPLY", "NO_NEIGH", "MTU", "FIB")


def drops_by_reason(fz, reasons) -> dict[str, int]:
    return {r: fz.drop_count(r) for r in reasons}


def run_counted(fz, data: bytes, ingress: int | None = None):
    """`data` through the program, its verdict tallied; never XDP_ABORTED."""
    res = test_run(fz.dp.prog.fd, data, ingress_ifindex=ingress or fz.l0)
    fz.tally[{XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx", XDP_REDIRECT: "redirect"}.get(res.retval, "other")] += 1
    assert res.retval != XDP_ABORTED, data.hex()
    return res


def check(fz, data: bytes, ingress: int | None = None) -> int:
    ingress = ingress or fz.l0
    error = is_icmp_error(data)
    before = drops_by_reason(fz, ICMP_ERROR_DROPS) if error else {}
    res = run_counted(fz, data, ingress)
    rc = res.retval
    src, dst = src_of(data)
    if rc in (XDP_TX, XDP_REDIRECT):
        assert not (src == DENIED and dst in POLICED), f"denied identity crossed the policy: {data.hex()}"
        if dst in DSR_VIPS and ICMP not in Ether(res.data_out):
            check_tunnel(fz, data, res.data_out, dst)
            return rc
        out = Ether(res.data_out)
        if ICMP in out and is_icmp_error(data):
            check_icmp_error(fz, data, res.data_out, ingress)
            return rc
        if ICMP in out:
            check_too_big(fz, data, out, src, dst)
            return rc
        assert IP in out and (TCP in out or UDP in out), data.hex()
        # Incremental updates keep a good checksum good and a damaged one
        # damaged: the LB neither breaks packets nor launders corrupt ones.
        assert bool(checksum_errors(out)) == bool(checksum_errors(Ether(data))), data.hex()
        fz.tally["forwarded_valid" if not checksum_errors(out) else "forwarded_corrupt_in"] += 1
        l4 = out[TCP] if TCP in out else out[UDP]
        assert (out[IP].dst, l4.dport) in fz.backends, data.hex()
        assert dst in VIPS, data.hex()
        assert src != DENIED or dst != WEB, f"denied identity crossed the policy: {data.hex()}"
    elif dst not in VIPS:
        # Or an error about a translated flow, dropped as its reply would be.
        if rc == XDP_DROP and error:
            after = drops_by_reason(fz, ICMP_ERROR_DROPS)
            assert any(after[r] > before[r] for r in ICMP_ERROR_DROPS), data.hex()
        else:
            assert rc == XDP_PASS and res.data_out == data, data.hex()
    return rc


# (offset, size) of the fields mutations() damages besides random bytes:
# IPv4's version/IHL, total length, flags/offset and the L4 header's word
# at 12 (TCP data offset and flags); IPv6's version/class, payload length,
# next header + hop limit and the same L4 word.
IPV4_FIELDS = ((14, 1), (16, 2), (20, 2), (46, 2))
IPV6_FIELDS = ((14, 1), (18, 2), (20, 2), (66, 2))


def mutations(seed: bytes, rnd: random.Random, fields=IPV4_FIELDS):
    """Truncation at every offset, then random byte, field and flag damage."""
    # Test-run refuses frames shorter than an Ethernet header (EINVAL), as
    # no driver would hand one to XDP: truncation starts there.
    for cut in range(14, len(seed)):
        yield seed[:cut]
    while True:
        b = bytearray(seed)
        kind = rnd.randrange(6)
        if kind == 0:                                    # random bytes
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif 1 <= kind <= 4 and len(b) >= sum(fields[kind - 1]):     # a header field
            off, size = fields[kind - 1]
            b[off:off + size] = rnd.randrange(256 ** size).to_bytes(size, "big")
        else:                                            # cut and pad
            b = b[:rnd.randrange(14, len(b) + 1)] + bytes(rnd.randrange(8))
        yield bytes(b)


# ~4k packets/s on the development VM: the long run needs more than the
# suite's default per-test timeout.
@pytest.mark.timeout(max(300, PACKETS // 1000))
def test_mutated_packets_keep_the_invariants(fz):
    rnd = random.Random(20261126)
    base = [bytes(p) for p in seeds()]
    per_seed = max(1, PACKETS // len(base))
    with fz.lab.inside(fz.topo.lb_ns):          # FIB lookups see the LB's routes
        for seed in base:
            gen = mutations(seed, rnd)
            for _ in range(per_seed):
                check(fz, next(gen))
    assert sum(fz.tally.values()) >= PACKETS - len(base)
    assert fz.tally["redirect"] > 0 and fz.tally["drop"] > 0 and fz.tally["pass"] > 0


def icmp_error_seeds(fz) -> list[tuple[bytes, int]]:
    """ICMP errors quoting real translated flows, (frame, ingress ifindex):
    about replies from the client's side, about forwarded packets from the
    backend's side (from the backend itself and from a router), full and
    truncated quotes, TCP and UDP, and about a denied client."""
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    out = []
    for proto, dst, sport in (("tcp", WEB, 40100), ("udp", ECHO, 40101)):
        l4 = TCP(sport=sport, dport=80, flags="S") if proto == "tcp" else UDP(sport=sport, dport=53)
        rc = check(fz, bytes(e / IP(src=ALLOWED, dst=dst) / l4 / b"f"))
        assert rc == XDP_REDIRECT
        fwd = Ether(test_run(fz.dp.prog.fd, bytes(e / IP(src=ALLOWED, dst=dst) / l4 / b"f"),
                             ingress_ifindex=fz.l0).data_out)
        b = next(b for b in fz.topo.backends if b.ip == fwd[IP].dst)
        sent = bytes(fwd[IP])
        reply = bytes(IP(src=dst, dst=ALLOWED) / (TCP(sport=80, dport=sport, flags="SA") if proto == "tcp"
                                                  else UDP(sport=53, dport=sport)) / (b"r" * 32))
        for quote in (sent[:28], sent[:48]):
            out.append((bytes(e / IP(src=b.ip, dst=ALLOWED) / ICMP(type=3, code=3) / quote), b.lb_iface.ifindex))
            out.append((bytes(e / IP(src="10.244.9.1", dst=ALLOWED) / ICMP(type=3, code=4, nexthopmtu=1280) / quote),
                        b.lb_iface.ifindex))
            out.append((bytes(e / IP(src="10.244.9.1", dst=ALLOWED) / ICMP(type=11) / quote), fz.l0))
        for quote in (reply[:28], reply[:48]):
            out.append((bytes(e / IP(src="10.1.0.254", dst=dst) / ICMP(type=3, code=4, nexthopmtu=1280) / quote),
                        fz.l0))
            out.append((bytes(e / IP(src="10.1.0.254", dst=dst) / ICMP(type=8) / quote), fz.l0))
    denied = bytes(IP(src=WEB, dst=DENIED) / TCP(sport=80, dport=40102, flags="SA"))
    out.append((bytes(e / IP(src="10.1.0.254", dst=WEB) / ICMP(type=3, code=4) / denied[:48]), fz.l0))
    return out


@pytest.mark.timeout(max(300, PACKETS // 1000))
def test_icmp_errors_keep_the_invariants(fz):
    rnd = random.Random(20261203)
    with fz.lab.inside(fz.topo.lb_ns):
        seeds_ = icmp_error_seeds(fz)
        before = fz.tally["icmp_error_to_backend"], fz.tally["icmp_error_to_client"]
        for seed, ingress in seeds_:
            gen = mutations(seed, rnd)
            for _ in range(max(1, PACKETS // 4 // len(seeds_))):
                check(fz, next(gen), ingress)
    # Mutations that keep the quoted flow intact are translated both ways.
    assert fz.tally["icmp_error_to_backend"] > before[0] and fz.tally["icmp_error_to_client"] > before[1]


ports = st.integers(0, 65535)
addrs = st.sampled_from([ALLOWED, DENIED, "198.51.100.7", "10.1.0.99", "10.244.1.2", "0.0.0.0"])


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(src=addrs, dst=st.sampled_from([WEB, ECHO, "10.1.0.1", "10.96.0.99", *sorted(DSR_VIPS)]),
       sport=ports, dport=ports | st.just(DSR_PORT), proto=st.sampled_from(["tcp", "udp"]),
       flags=st.integers(0, 255), ttl=st.integers(0, 255), vlan=st.none() | st.integers(0, 4095),
       payload=st.binary(max_size=64) | st.integers(1400, 1472).map(lambda n: b"p" * n),
       tos=st.integers(0, 255), df=st.booleans())
def test_structured_packets_keep_the_invariants(fz, src, dst, sport, dport, proto, flags, ttl, vlan, payload,
                                                tos, df):
    l4 = TCP(sport=sport, dport=dport, flags=flags) if proto == "tcp" else UDP(sport=sport, dport=dport)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    ip = IP(src=src, dst=dst, ttl=ttl, tos=tos, flags="DF" if df else 0) / l4 / payload
    pkt = eth / Dot1Q(vlan=vlan) / ip if vlan is not None else eth / ip
    with fz.lab.inside(fz.topo.lb_ns):
        rc = check(fz, bytes(pkt))
    if src == DENIED and dst in POLICED:
        assert rc == XDP_DROP


# ---- IPv6 DSR ------------------------------------------------------------------------

ALLOWED6, DENIED6 = "fd00:1::10", "fd00:2::10"
# VIP -> (outer header's family, overhead): 6in6 ipip/udp, GUE over IPv6, 4in6, 6in4 (GUE over IPv4).
TUNNELS6 = {IPIP_VIP6: (6, 40), DSR_UDP_VIP6: (6, 40), GUE_VIP6: (6, 48), VIP_4IN6: (6, 40), VIP_6IN4: (4, 28)}
POLICED6 = {IPIP_VIP6, GUE_VIP6, VIP_4IN6, VIP_6IN4}


@pytest.fixture(scope="module")
def fz6(lab6, bpf_object):
    lab_, topo = lab6
    with fuzz_harness(lab_, topo, with_dsr6_services, "fuzz6") as h:
        with lab_.inside(topo.client_ns), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", (topo.lb_client_ip6, 9))     # the LB learns the client (ND)
        yield h


def seeds6() -> list:
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    return [
        e / IPv6(src=ALLOWED6, dst=IPIP_VIP6, tc=0xB9) / TCP(sport=40020, dport=DSR_PORT, flags="S"),
        e / IPv6(src=ALLOWED6, dst=GUE_VIP6) / TCP(sport=40021, dport=DSR_PORT, flags="PA") / b"GET / HTTP/1.0\r\n",
        e / IPv6(src=DENIED6, dst=IPIP_VIP6) / TCP(sport=40022, dport=DSR_PORT, flags="S"),
        e / IPv6(src=DENIED6, dst=GUE_VIP6) / TCP(sport=40023, dport=DSR_PORT, flags="A") / (b"d" * 1440),
        e / IPv6(src=ALLOWED6, dst=IPIP_VIP6) / TCP(sport=40024, dport=DSR_PORT, flags="A") / (b"b" * 1440),
        e / IPv6(src=ALLOWED6, dst=GUE_VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=40025, dport=DSR_PORT) / (b"g" * 1400),
        e / IPv6(src=DENIED6, dst=DSR_UDP_VIP6) / UDP(sport=5360, dport=DSR_PORT) / b"open",
        e / IPv6(src=ALLOWED6, dst=DSR_UDP_VIP6) / UDP(sport=5361, dport=DSR_PORT, chksum=0x4321) / b"badcsum",
        e / IPv6(src=DENIED6, dst=IPIP_VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / TCP(dport=DSR_PORT),
        e / Dot1Q(vlan=5) / IPv6(src=ALLOWED6, dst=IPIP_VIP6) / TCP(sport=40026, dport=DSR_PORT),
        e / IPv6(src=ALLOWED6, dst=VIP_6IN4) / TCP(sport=40027, dport=DSR_PORT, flags="S"),
        e / IPv6(src=DENIED6, dst=VIP_6IN4) / TCP(sport=40028, dport=DSR_PORT, flags="S"),
        e / IPv6(src=ALLOWED6, dst=VIP_6IN4) / TCP(sport=40029, dport=DSR_PORT, flags="A") / (b"f" * 1440),
        e / IP(src=ALLOWED, dst=VIP_4IN6) / TCP(sport=40030, dport=DSR_PORT, flags="S"),
        e / IP(src=DENIED, dst=VIP_4IN6) / TCP(sport=40031, dport=DSR_PORT, flags="S"),
        e / IP(src=ALLOWED, dst=VIP_4IN6, flags="DF") / TCP(sport=40032, dport=DSR_PORT, flags="A") / (b"4" * 1460),
        e / IPv6(src=ALLOWED6, dst="fd00:1::1") / TCP(sport=40033, dport=22),
    ]


def addrs_of(data: bytes) -> tuple[int, int, str | None, str | None]:
    """(l2 length, IP version, source, destination) as the data plane reads them."""
    l2 = l2_len(data)
    eth = data[l2 - 2:l2]
    if eth == b"\x86\xdd" and len(data) >= l2 + 40:
        return l2, 6, str(ipaddress.IPv6Address(data[l2 + 8:l2 + 24])), str(ipaddress.IPv6Address(data[l2 + 24:l2 + 40]))
    if eth == b"\x08\x00" and len(data) >= l2 + 20:
        return l2, 4, str(ipaddress.IPv4Address(data[l2 + 12:l2 + 16])), str(ipaddress.IPv4Address(data[l2 + 16:l2 + 20]))
    return l2, 0, None, None


def check_tunnel6(fz, data: bytes, out: bytes, l2: int, version: int, dst: str) -> None:
    """Outer header as encap.h writes it for `dst`'s tunnel, the received IP
    packet inside byte for byte."""
    outer_v, overhead = TUNNELS6[dst]
    inner_len = 40 + struct.unpack("!H", data[l2 + 4:l2 + 6])[0] if version == 6 else \
        struct.unpack("!H", data[l2 + 2:l2 + 4])[0]
    assert out[12:l2 - 2] == data[12:l2 - 2], "the VLAN tag is kept"
    assert out[l2 - 2:l2] == (b"\x86\xdd" if outer_v == 6 else b"\x08\x00")
    gue = dst in (GUE_VIP6, VIP_6IN4)
    if outer_v == 6:
        outer = IPv6(out[l2:l2 + 40])
        tc = (data[l2] & 0x0F) << 4 | data[l2 + 1] >> 4 if version == 6 else data[l2 + 1]
        assert (outer.version, outer.tc, outer.plen, outer.hlim) == (6, tc & 0xFC, inner_len + overhead - 40, 64)
        assert outer.nh == (17 if gue else 41 if version == 6 else 4)
        assert outer.src == ENCAP_SOURCE6 and outer.dst in fz.backend_ips
    else:
        outer = IP(out[l2:l2 + 20])
        fresh = IP(bytes(outer))
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == outer.chksum, "outer IPv4 checksum"
        assert (outer.version, outer.ihl, outer.flags, outer.ttl, outer.proto) == (4, 5, 2, 64, 17)
        assert outer.src == ENCAP_SOURCE and outer.dst in fz.backend_ips and outer.len == inner_len + overhead
    if gue:
        o = l2 + overhead - 8
        sport, dport, length, csum = struct.unpack("!HHHH", out[o:o + 8])
        assert sport >= 49152 and dport == GUE_PORT_DEFAULT and length == inner_len + 8 and csum == 0
    assert out[l2 + overhead:l2 + overhead + inner_len] == data[l2:l2 + inner_len], "the inner packet"
    fz.tally["tunnelled"] += 1


def check_too_big6(fz, data: bytes, out: Ether, version: int, src: str, dst: str) -> None:
    _, overhead = TUNNELS6[dst]
    if version == 4:
        assert data[20] & 0x40 and (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code) == (dst, src, 3, 4)
        assert out[ICMP].nexthopmtu == 1500 - overhead and checksum_errors(out) == []
        fz.tally["frag_needed"] += 1
        return
    assert (out[IPv6].src, out[IPv6].dst, out[IPv6].nh) == (dst, src, 58)
    ptb = out[ICMPv6PacketTooBig]
    assert ptb.mtu == 1500 - overhead and bytes(out)[62:110] == data[14:62]
    fresh = Ether(bytes(out))
    del fresh[ICMPv6PacketTooBig].cksum
    assert Ether(bytes(fresh))[ICMPv6PacketTooBig].cksum == ptb.cksum, "ICMPv6 checksum"
    fz.tally["packet_too_big"] += 1


def check6(fz, data: bytes) -> int:
    res = run_counted(fz, data)
    rc = res.retval
    l2, version, src, dst = addrs_of(data)
    if rc in (XDP_TX, XDP_REDIRECT):
        assert src not in (DENIED, DENIED6) or dst not in POLICED6, f"denied identity crossed the policy: {data.hex()}"
        assert dst in TUNNELS6, data.hex()
        out = Ether(res.data_out)
        if ICMP in out or ICMPv6PacketTooBig in out:
            check_too_big6(fz, data, out, version, src, dst)
        else:
            check_tunnel6(fz, data, res.data_out, l2, version, dst)
    elif dst not in TUNNELS6 and dst not in VIPS:
        assert rc == XDP_PASS and res.data_out == data, data.hex()
    return rc


@pytest.mark.timeout(max(300, PACKETS // 1000))
def test_mutated_ipv6_dsr_packets_keep_the_invariants(fz6):
    rnd = random.Random(20261203)
    base = [bytes(p) for p in seeds6()]
    per_seed = max(1, PACKETS // len(base))
    with fz6.lab.inside(fz6.topo.lb_ns):
        for seed in base:
            gen = mutations(seed, rnd, IPV6_FIELDS if seed[12:14] == b"\x86\xdd" else IPV4_FIELDS)
            for _ in range(per_seed):
                check6(fz6, next(gen))
    assert sum(fz6.tally.values()) >= PACKETS - len(base)
    assert fz6.tally["tunnelled"] > 0 and fz6.tally["packet_too_big"] > 0 and fz6.tally["frag_needed"] > 0
    assert fz6.tally["drop"] > 0 and fz6.tally["pass"] > 0
