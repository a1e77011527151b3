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
  answered with a well-formed ICMP fragmentation needed, or dropped.
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
import ipaddress
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, IPerror, TCPerror
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from lb.config import GUE_PORT_DEFAULT
from lb.demo import lab_config
from lbtest import (DSR_UDP_VIP, ENCAP_SOURCE, GUE_VIP, IPIP_VIP, XDP_ABORTED, XDP_DROP, XDP_PASS,
                    XDP_REDIRECT, XDP_TX, Harness, checksum_errors, with_dsr_services)
from loader.testrun import test_run

PACKETS = int(os.environ.get("XDPLB_FUZZ_PACKETS", "100000"))
WEB, ECHO = "10.96.0.10", "10.96.0.53"
DSR_VIPS = {IPIP_VIP, GUE_VIP, DSR_UDP_VIP}
VIPS = {WEB, ECHO} | DSR_VIPS
POLICED = {WEB, IPIP_VIP, GUE_VIP}                 # allow: [frontend]
ALLOWED, DENIED = "10.1.0.10", "192.0.2.10"
DSR_PORT = 8080


@pytest.fixture(scope="module")
def fz(lab, bpf_object):
    lab_, topo = lab
    cfg = with_dsr_services(lab_config(topo, fillers=0, bpffs="/unused", socket="/unused"), topo)
    with Harness(lab_, topo, cfg, attach=False) as h:
        h.backends = {(b.ip, topo.backend_port) for b in topo.backends} | \
                     {(b.ip, topo.udp_port) for b in topo.backends}
        h.backend_ips = {b.ip for b in topo.backends}
        h.l0 = topo.lb_client.ifindex
        h.tally = collections.Counter()
        yield h
        print(f"\nfuzz: {sum(h.tally.values())} packets: " +
              ", ".join(f"{k}={v}" for k, v in sorted(h.tally.items())))


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


def check(fz, data: bytes, ingress: int | None = None) -> int:
    ingress = ingress or fz.l0
    error = is_icmp_error(data)
    before = drops_by_reason(fz, ICMP_ERROR_DROPS) if error else {}
    res = test_run(fz.dp.prog.fd, data, ingress_ifindex=ingress)
    rc = res.retval
    fz.tally[{XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx", XDP_REDIRECT: "redirect"}.get(rc, "other")] += 1
    assert rc != XDP_ABORTED, data.hex()
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


def mutations(seed: bytes, rnd: random.Random):
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
        elif kind == 1 and len(b) > 14:                  # IHL / version byte
            b[14] = rnd.randrange(256)
        elif kind == 2 and len(b) > 17:                  # total length
            b[16:18] = struct.pack("!H", rnd.randrange(65536))
        elif kind == 3 and len(b) > 21:                  # flags + fragment offset
            b[20:22] = struct.pack("!H", rnd.randrange(65536))
        elif kind == 4 and len(b) > 46:                  # TCP data offset / flags, UDP length
            b[46:48] = struct.pack("!H", rnd.randrange(65536))
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
