"""IPv6 through the real program, by BPF test-run on a Lab(ipv6=True) LB
namespace: NAT66 forward and reply, the extension-header walk and its
bound, fragments, policy under every header shape, neighbour discovery."""

from __future__ import annotations

import os
import socket

import pytest
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6ND_NS, IPerror6, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether

from lb.demo import lab_config
from lbtest import XDP_DROP, XDP_PASS, XDP_REDIRECT, Harness, assert_checksums_valid, pin_dir, tcp

VIP6 = "fd00:96::10"
UDP_VIP6 = "fd00:96::53"
DENY_VIP6 = "fd00:96::20"
EMPTY_VIP6 = "fd00:96::30"
CLIENT6 = "fd00:1::10"
OTHER6 = "fd00:1::99"        # same link, no identity: "world"
EXT_MAX = 4                  # IPV6_EXT_MAX (constants.h); test_ext_max_matches checks it


def config6(topo) -> dict:
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket=f"/run/xdplb/test6-{os.getpid()}.sock")
    b6 = [f"[{b.ip6}]:{topo.backend_port}" for b in topo.backends]
    cfg["identities"]["clients6"] = ["fd00:1::10/128"]
    cfg["services"] += [
        {"name": "web6", "vip": VIP6, "port": 80, "protocol": "tcp", "backends": b6},
        {"name": "echo6", "vip": UDP_VIP6, "port": 53, "protocol": "udp",
         "backends": [f"[{b.ip6}]:{topo.udp_port}" for b in topo.backends]},
        {"name": "only6", "vip": DENY_VIP6, "port": 80, "protocol": "tcp", "backends": b6,
         "allow": ["clients6"]},
        {"name": "empty6", "vip": EMPTY_VIP6, "port": 80, "protocol": "tcp", "backends": []},
    ]
    return cfg


def say_hello(lab, ns: str, to: str) -> None:
    """One real UDP datagram from `ns` to the LB's address `to`: the sender
    resolves the LB by neighbour discovery, and the LB learns the sender
    from its solicitation, as on a real link."""
    with lab.inside(ns), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", (to, 9))


@pytest.fixture(scope="module")
def lb6(lab6, bpf_object):
    lab_, topo = lab6
    with Harness(lab_, topo, config6(topo), attach=False) as h:
        # As the IPv4 harness does for the client (its ping): crafted
        # packets skip the client's own resolution of its gateway.
        say_hello(lab_, topo.client_ns, topo.lb_client_ip6)
        yield h


def eth(dmac: str = "02:00:00:00:00:02"):
    return Ether(src="02:00:00:00:00:01", dst=dmac)


def tcp6(src, sport, dst, dport, *ext, flags="S", payload=b""):
    pkt = eth() / IPv6(src=src, dst=dst, hlim=64)
    for h in ext:
        pkt = pkt / h
    return pkt / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload


def l4_checksum_ok(pkt) -> bool:
    layer = TCP if TCP in pkt else UDP
    fresh = Ether(bytes(pkt))
    del fresh[layer].chksum
    return Ether(bytes(fresh))[layer].chksum == pkt[layer].chksum


def forward(lb, pkt):
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT, f"verdict {rc}, drops {lb.dp.maps['drop_stats'].lookup(0)}"
    return out


def test_nat66_forward_exact_output(lb6):
    topo = lb6.topo
    pkt = tcp6(CLIENT6, 40000, VIP6, 80, payload=b"GET / HTTP/1.0\r\n\r\n")
    out = forward(lb6, pkt)
    b = next(b for b in topo.backends if b.ip6 == out[IPv6].dst)
    # Only the destination, the port, the MACs and the TCP checksum change;
    # IPv6 has no header checksum and the hop limit is the kernel's business.
    expected = pkt.copy()
    expected[Ether].src, expected[Ether].dst = b.lb_iface.mac, b.iface.mac
    expected[IPv6].dst = b.ip6
    expected[TCP].dport = topo.backend_port
    del expected[TCP].chksum
    assert bytes(out) == bytes(Ether(bytes(expected)))
    assert l4_checksum_ok(out)


def test_nat66_flows_spread_and_stick(lb6):
    seen = set()
    for sport in range(41000, 41040):
        a = forward(lb6, tcp6(CLIENT6, sport, VIP6, 80))[IPv6].dst
        b = forward(lb6, tcp6(CLIENT6, sport, VIP6, 80, flags="A"))[IPv6].dst
        assert a == b
        seen.add(a)
    assert seen == {b.ip6 for b in lb6.topo.backends}


def test_udp6_checksum_incremental(lb6):
    pkt = eth() / IPv6(src=CLIENT6, dst=UDP_VIP6) / UDP(sport=5353, dport=53) / b"hello"
    out = forward(lb6, pkt)
    assert out[UDP].dport == lb6.topo.udp_port and l4_checksum_ok(out)


@pytest.mark.parametrize("ext", [
    [IPv6ExtHdrHopByHop()],
    [IPv6ExtHdrRouting(addresses=[], segleft=0)],
    [IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0), IPv6ExtHdrDestOpt()],
], ids=["hop-by-hop", "routing", "destination-options", "four"])
def test_extension_headers_walked(lb6, ext):
    pkt = tcp6(CLIENT6, 42000 + len(ext), VIP6, 80, *ext)
    out = forward(lb6, pkt)
    assert out[IPv6].dst in {b.ip6 for b in lb6.topo.backends}
    assert out[TCP].dport == lb6.topo.backend_port and l4_checksum_ok(out)
    # The extension headers go through untouched.
    n = len(bytes(pkt[IPv6].payload)) - len(bytes(pkt[TCP]))
    assert bytes(out[IPv6].payload)[:n] == bytes(pkt[IPv6].payload)[:n]


def test_ext_max_matches(lb6):
    assert lb6.dp.consts.IPV6_EXT_MAX == EXT_MAX


def test_chain_past_the_bound_is_dropped(lb6):
    bound = lb6.dp.consts.IPV6_EXT_MAX
    before = lb6.drop_count("ipv6_ext_chain")
    rc, _ = lb6.run(tcp6(CLIENT6, 43000, VIP6, 80, *[IPv6ExtHdrDestOpt() for _ in range(bound + 1)]))
    assert rc == XDP_DROP
    assert lb6.drop_count("ipv6_ext_chain") == before + 1


@pytest.mark.parametrize("where", ["first", "after-hop-by-hop"])
def test_fragment_header_is_dropped(lb6, where):
    ext = [IPv6ExtHdrFragment(m=1, id=7)]
    if where != "first":
        ext = [IPv6ExtHdrHopByHop()] + ext
    before = lb6.drop_count("fragment")
    rc, _ = lb6.run(tcp6(CLIENT6, 43100, VIP6, 80, *ext))
    assert rc == XDP_DROP and lb6.drop_count("fragment") == before + 1


@pytest.mark.parametrize("ext", [
    [], [IPv6ExtHdrHopByHop()], [IPv6ExtHdrRouting(segleft=0)], [IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0), IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrDestOpt() for _ in range(EXT_MAX + 1)],
    [IPv6ExtHdrFragment(m=1)],
], ids=["none", "hbh", "routing", "dstopt", "four", "too-long", "fragment"])
def test_denied_identity_never_passes(lb6, ext):
    rc, _ = lb6.run(tcp6(OTHER6, 44000, DENY_VIP6, 80, *ext))
    assert rc == XDP_DROP
    # The allowed client with the same shapes: forwarded up to the bound.
    rc, _ = lb6.run(tcp6(CLIENT6, 44000, DENY_VIP6, 80, *ext))
    fragment = any(isinstance(h, IPv6ExtHdrFragment) for h in ext)
    assert rc == (XDP_DROP if len(ext) > EXT_MAX or fragment else XDP_REDIRECT)


def test_neighbour_discovery_and_non_vip_pass(lb6):
    ns = eth("33:33:ff:00:00:01") / IPv6(src=CLIENT6, dst="ff02::1:ff00:1", hlim=255) / \
        ICMPv6ND_NS(tgt="fd00:1::1")
    rc, out = lb6.run(ns)
    assert rc == XDP_PASS and bytes(out) == bytes(ns)
    other = tcp6(CLIENT6, 45000, "fd00:1::1", 22)
    rc, out = lb6.run(other)
    assert rc == XDP_PASS and bytes(out) == bytes(other)


def test_no_backend_answered_with_icmpv6_port_unreachable(lb6):
    pkt = tcp6(CLIENT6, 48000, EMPTY_VIP6, 80)
    before = lb6.drop_count("no_backend")
    rc, out = lb6.run(pkt)
    assert rc == XDP_REDIRECT and lb6.drop_count("no_backend") == before + 1
    assert (out[Ether].src, out[Ether].dst) == (pkt[Ether].dst, pkt[Ether].src)
    assert (out[IPv6].src, out[IPv6].dst, out[IPv6].nh, out[IPv6].hlim) == (EMPTY_VIP6, CLIENT6, 58, 64)
    assert (out[ICMPv6DestUnreach].type, out[ICMPv6DestUnreach].code) == (1, 4)
    # The quote: the client's IPv6 header and its ports, byte for byte.
    assert bytes(out[ICMPv6DestUnreach].payload) == bytes(pkt[IPv6])[:48]
    assert out[IPerror6].src == CLIENT6
    fresh = Ether(bytes(out))
    del fresh[ICMPv6DestUnreach].cksum
    assert Ether(bytes(fresh))[ICMPv6DestUnreach].cksum == out[ICMPv6DestUnreach].cksum
    assert len(bytes(out)) == 14 + 40 + 8 + 48


def test_gateway_reply_translated_back(lb6):
    topo = lb6.topo
    out = forward(lb6, tcp6(CLIENT6, 46000, VIP6, 80))
    b = next(b for b in topo.backends if b.ip6 == out[IPv6].dst)
    reply = eth(b.lb_iface.mac) / IPv6(src=b.ip6, dst=CLIENT6) / \
        TCP(sport=topo.backend_port, dport=46000, flags="SA", seq=5, ack=1001)
    rc, back = lb6.run(reply, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    assert (back[IPv6].src, back[TCP].sport, back[IPv6].dst) == (VIP6, 80, CLIENT6)
    assert l4_checksum_ok(back)
    # A forged reply from the client's side is not translated.
    rc, _ = lb6.run(reply, ifname="l0")
    assert rc != XDP_REDIRECT


def test_snat66_reply_translated_back(lb6):
    topo = lb6.topo
    cfg = lb6.edit()
    cfg["snat_address"] = topo.snat_ip6
    lb6.apply(cfg)
    try:
        out = forward(lb6, tcp6(CLIENT6, 47000, VIP6, 80))
        assert out[IPv6].src == topo.snat_ip6 and l4_checksum_ok(out)
        b = next(b for b in topo.backends if b.ip6 == out[IPv6].dst)
        reply = eth(b.lb_iface.mac) / IPv6(src=b.ip6, dst=topo.snat_ip6) / \
            TCP(sport=topo.backend_port, dport=out[TCP].sport, flags="SA", seq=5, ack=1001)
        rc, back = lb6.run(reply, ifname=b.lb_iface.name)
        assert rc == XDP_REDIRECT
        assert (back[IPv6].src, back[TCP].sport) == (VIP6, 80)
        assert (back[IPv6].dst, back[TCP].dport) == (CLIENT6, 47000)
        assert l4_checksum_ok(back)
    finally:
        cfg.pop("snat_address")
        lb6.apply(cfg)


def checksums_valid(pkt) -> None:
    if IPv6 in pkt:
        assert l4_checksum_ok(pkt)
    else:
        assert_checksums_valid(pkt)


def snat_round_trip(lb, pkt, snat_ip: str, ip_layer, client: tuple[str, int], vip: tuple[str, int]) -> int:
    """Forward `pkt`, check it leaves from `snat_ip`, answer it as its
    backend and check the answer goes back from the VIP to the client.
    Returns the SNAT port."""
    out = forward(lb, pkt)
    lo, hi = lb.cfg.snat_ports.min, lb.cfg.snat_ports.max
    assert out[ip_layer].src == snat_ip and lo <= out[TCP].sport <= hi, out.summary()
    checksums_valid(out)
    b = next(b for b in lb.topo.backends if out[ip_layer].dst in (b.ip, b.ip6))
    reply = eth(b.lb_iface.mac) / ip_layer(src=out[ip_layer].dst, dst=snat_ip) / \
        TCP(sport=out[TCP].dport, dport=out[TCP].sport, flags="SA", seq=5, ack=1001)
    rc, back = lb.run(reply, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    assert ((back[ip_layer].src, back[TCP].sport), (back[ip_layer].dst, back[TCP].dport)) == (vip, client)
    checksums_valid(back)
    return out[TCP].sport


def test_snat_both_families_at_once(lb6):
    """One SNAT address per family: IPv4 and IPv6 services are SNATed side
    by side, each from its own address, and their replies reverse-NATed.
    Dropping the IPv4 address puts IPv4 back in gateway mode only."""
    from scapy.layers.inet import IP

    topo = lb6.topo
    cfg = lb6.edit()
    cfg["snat_address"] = [topo.snat_ip6, topo.snat_ip]
    lb6.apply(cfg)
    try:
        for sport in (47100, 47101, 47102):
            snat_round_trip(lb6, tcp("10.1.0.10", sport, "10.96.0.10", 80), topo.snat_ip, IP,
                            ("10.1.0.10", sport), ("10.96.0.10", 80))
            snat_round_trip(lb6, tcp6(CLIENT6, sport, VIP6, 80), topo.snat_ip6, IPv6,
                            (CLIENT6, sport), (VIP6, 80))
        cfg["snat_address"] = topo.snat_ip6
        lb6.apply(cfg)
        out = forward(lb6, tcp("10.1.0.10", 47110, "10.96.0.10", 80))
        assert out[IP].src == "10.1.0.10" and out[TCP].sport == 47110      # gateway mode
        snat_round_trip(lb6, tcp6(CLIENT6, 47110, VIP6, 80), topo.snat_ip6, IPv6,
                        (CLIENT6, 47110), (VIP6, 80))
    finally:
        cfg.pop("snat_address")
        lb6.apply(cfg)


# ---- fuzzing IPv6 (test_fuzz.py's invariants, on this module's LB) ------

FUZZ_PACKETS = int(os.environ.get("XDPLB_FUZZ6_PACKETS", "20000"))
VIPS6 = {VIP6, UDP_VIP6, DENY_VIP6}


def fuzz_seeds() -> list[bytes]:
    e = eth()
    return [bytes(p) for p in (
        tcp6(CLIENT6, 50000, VIP6, 80),
        tcp6(OTHER6, 50001, DENY_VIP6, 80),
        tcp6(CLIENT6, 50002, DENY_VIP6, 80, IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()),
        tcp6(OTHER6, 50003, DENY_VIP6, 80, IPv6ExtHdrRouting(segleft=0)),
        tcp6(OTHER6, 50004, DENY_VIP6, 80, IPv6ExtHdrFragment(m=1)),
        e / IPv6(src=CLIENT6, dst=UDP_VIP6) / UDP(sport=5353, dport=53) / b"query",
        e / IPv6(src=CLIENT6, dst=UDP_VIP6) / IPv6ExtHdrDestOpt() / UDP(sport=5354, dport=53) / b"q",
        e / IPv6(src=CLIENT6, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fd00:1::1"),
        tcp6(CLIENT6, 50005, "fd00:1::1", 22),
    )]


def v6_addresses(data: bytes) -> tuple[str | None, str | None]:
    if data[12:14] != b"\x86\xdd" or len(data) < 54:
        return None, None
    import ipaddress
    return str(ipaddress.IPv6Address(data[22:38])), str(ipaddress.IPv6Address(data[38:54]))


def l4_valid(pkt) -> bool:
    return (TCP in pkt or UDP in pkt) and l4_checksum_ok(pkt)


def test_fuzz6_keeps_the_invariants(lb6):
    import random

    from loader.testrun import test_run
    from test_fuzz import mutations

    rnd = random.Random(20261203)
    backends = {b.ip6 for b in lb6.topo.backends}
    l0 = lb6.topo.lb_client.ifindex
    tally = {}
    seeds = fuzz_seeds()
    with lb6.lab.inside(lb6.topo.lb_ns):
        for seed in seeds:
            gen = mutations(seed, rnd)
            for _ in range(FUZZ_PACKETS // len(seeds)):
                data = next(gen)
                res = test_run(lb6.dp.prog.fd, data, ingress_ifindex=l0)
                tally[res.retval] = tally.get(res.retval, 0) + 1
                assert res.retval != 0, data.hex()                     # XDP_ABORTED
                src, dst = v6_addresses(data)
                if res.retval == XDP_REDIRECT:
                    out = Ether(res.data_out)
                    assert dst in VIPS6 and out[IPv6].dst in backends, data.hex()
                    assert not (dst == DENY_VIP6 and src != CLIENT6), f"denied crossed: {data.hex()}"
                    assert l4_valid(out) == l4_valid(Ether(data)), data.hex()
                elif dst not in VIPS6:
                    assert res.retval == XDP_PASS and res.data_out == data, data.hex()
    print(f"\nfuzz6: {sum(tally.values())} packets, verdicts {tally}")
    assert tally.get(XDP_REDIRECT) and tally.get(XDP_DROP) and tally.get(XDP_PASS)
