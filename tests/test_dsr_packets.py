"""Direct server return on the LB side (bpf/xdp/encap.h), packet by packet:
the real program through BPF test-run in the lab's LB namespace (real
routes and neighbours for the FIB). Every tunnel packet is compared byte
for byte with the one scapy builds from the client's packet."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPerror6, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from lb.dataplane import ntohs, word_addr
from lb.demo import lab_config
from lbtest import (DSR_UDP_VIP, ENCAP_SOURCE, ENCAP_SOURCE6, GUE_VIP, GUE_VIP6, IPIP_VIP, IPIP_VIP6, VIP_4IN6,
                    VIP_6IN4, XDP_DROP, XDP_PASS, XDP_REDIRECT, Harness, assert_checksums_valid, tcp, udp,
                    with_dsr6_services, with_dsr_services)

CLIENT, DENIED = "10.1.0.10", "192.0.2.10"
UDP_VIP = DSR_UDP_VIP
PORT = 8080                        # the lab's backend port, served by the DSR services too
GUE_PORT = 6080


def dsr_config(topo, *, encap_source: str = ENCAP_SOURCE, **kw) -> dict:
    cfg = lab_config(topo, fillers=0, bpffs="/unused", socket="/unused", **kw)
    return with_dsr_services(cfg, topo, encap_source=encap_source)


@pytest.fixture(scope="module")
def lb(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, dsr_config(topo), attach=False) as h:
        yield h


def backend_of(topo, ip):
    return next(b for b in topo.backends if b.ip == ip)


def expected_tunnel(topo, out: Ether, inner, *, gue: bool, source: str = ENCAP_SOURCE) -> bytes:
    """The frame encap.h must write for `inner` to the backend `out` went
    to: every outer field, and the inner packet as the client sent it."""
    b = backend_of(topo, out[IP].dst)
    outer = IP(version=4, ihl=5, tos=inner.tos & 0xFC, id=0, flags="DF", frag=0, ttl=64,
               proto=17 if gue else 4, src=source, dst=b.ip)
    payload = bytes(inner)
    if gue:
        # The source port comes from the flow's hash: taken from the output,
        # checked for its range by the caller.
        payload = bytes(UDP(sport=out[UDP].sport, dport=GUE_PORT, len=8 + len(payload), chksum=0)) + payload
        outer.len = 20 + len(payload)
    return bytes(Ether(src=b.lb_iface.mac, dst=b.iface.mac) / outer / payload)


def flows(h, vip: str, sports) -> dict[int, tuple[Ether, Ether]]:
    """Each flow's first packet (a SYN: Maglev) and a second one (an ACK:
    conntrack), as they leave the LB."""
    return {sport: (h.run(tcp(CLIENT, sport, vip, PORT))[1], h.run(tcp(CLIENT, sport, vip, PORT, flags="A"))[1])
            for sport in sports}


def counters(lb, name: str) -> int:
    return lb.counters("global_stats", getattr(lb.dp.consts, "CNT_" + name.upper()))[0]


@pytest.mark.parametrize("gue", [False, True], ids=["ipip", "gue"])
def test_tcp_syn_is_encapsulated_exactly(lb, gue):
    topo = lb.topo
    vip = GUE_VIP if gue else IPIP_VIP
    pkt = tcp(CLIENT, 40000, vip, PORT, payload=b"GET / HTTP/1.0\r\n\r\n")
    pkt[IP].tos = 0xB9                  # DSCP 46 with ECT(1): the outer keeps the DSCP only
    pkt = Ether(bytes(pkt))
    before = counters(lb, "encap_gue" if gue else "encap_ipip")
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT
    assert bytes(out) == expected_tunnel(topo, out, pkt[IP], gue=gue)
    assert_checksums_valid(IP(bytes(out[IP])[:20] + b"\0" * 8))   # the outer header's own checksum
    inner = IP(bytes(out[UDP].payload)) if gue else out[IP].payload
    assert bytes(inner) == bytes(pkt[IP])                              # untouched, checksums too
    if gue:
        assert 49152 <= out[UDP].sport <= 65535
    assert counters(lb, "encap_gue" if gue else "encap_ipip") == before + 1


def test_udp_service_and_zero_checksum_inner_untouched(lb):
    pkt = udp(CLIENT, 5353, UDP_VIP, PORT, chksum=0)
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT and out[IP].proto == 4
    assert bytes(out[IP].payload) == bytes(pkt[IP])


def test_gue_source_port_varies_with_the_flow_and_not_within_it(lb):
    ports = set()
    for syn, ack in flows(lb, GUE_VIP, range(43000, 43064)).values():
        assert syn[IP].dst == ack[IP].dst and syn[UDP].sport == ack[UDP].sport
        assert 49152 <= syn[UDP].sport <= 65535
        ports.add(syn[UDP].sport)
    assert len(ports) >= 56, "64 flows should get (nearly) 64 source ports"


def test_flows_spread_over_backends_and_stick(lb):
    pairs = flows(lb, IPIP_VIP, range(44000, 44060)).values()
    assert all(syn[IP].dst == ack[IP].dst for syn, ack in pairs)
    assert len({syn[IP].dst for syn, _ in pairs}) == 3


def assert_dropped_before_encapsulation(h, pkt) -> None:
    """A denied identity's packet: a policy drop, nothing encapsulated, no
    conntrack entry."""
    before = (counters(h, "encap_ipip"), h.drop_count("policy"), h.entries("conntrack"))
    rc, _ = h.run(pkt)
    assert rc == XDP_DROP
    assert (counters(h, "encap_ipip"), h.drop_count("policy"), h.entries("conntrack")) == \
        (before[0], before[1] + 1, before[2])


def test_policy_drops_before_encapsulation(lb):
    assert_dropped_before_encapsulation(lb, tcp(DENIED, 40001, IPIP_VIP, PORT))


def test_no_reply_state_and_the_backends_answer_passes_untouched(lb):
    """A DSR flow writes its conntrack entry only, and no reply-index entry
    names a DSR service: nothing a backend sends is translated for it. Its
    direct answer, from the VIP, passes untouched should it reach the LB."""
    topo, c = lb.topo, lb.dp.consts
    rev, replies = lb.entries("rev_nat"), counters(lb, "reply")
    _, out = lb.run(tcp(CLIENT, 45000, IPIP_VIP, PORT))
    b = backend_of(topo, out[IP].dst)
    assert lb.entries("rev_nat") == rev
    dsr_ids = {live.svc_id for live in lb.rec.services.values() if live.flags & (c.SVC_F_IPIP | c.SVC_F_GUE)}
    assert len(dsr_ids) == 3
    for _, listed in lb.dp.maps["reply_index"].items():
        assert not set(listed.svc_id) & dsr_ids
    answer = tcp(IPIP_VIP, PORT, CLIENT, 45000, flags="SA")
    rc, passed = lb.run(answer, ifname=b.lb_iface.name)
    assert rc == XDP_PASS and bytes(passed) == bytes(answer)
    assert counters(lb, "reply") == replies


def test_conntrack_entry_points_at_the_backend(lb):
    _, syn = lb.run(tcp(CLIENT, 45100, GUE_VIP, PORT))
    entries = [v for k, v in lb.dp.maps["conntrack"].items()
               if word_addr(k.dst[0]) == IPv4Address(GUE_VIP) and ntohs(k.sport) == 45100]
    assert len(entries) == 1 and entries[0].nat_port == 0
    rec = lb.dp.maps["backends"].lookup(entries[0].backend_id)
    assert str(word_addr(rec.addr[0])) == syn[IP].dst


def assert_vlan_tag_kept(h, pkt, layer, ethertype: int, proto: int) -> None:
    """`pkt` tagged: the tag stays in front of the outer header (of
    `ethertype`, carrying `proto`), the inner packet untouched."""
    tagged = Ether(src=pkt.src, dst=pkt.dst) / Dot1Q(vlan=7) / pkt[layer]
    rc, out = h.run(tagged)
    assert rc == XDP_REDIRECT
    assert out[Dot1Q].vlan == 7 and out[Dot1Q].type == ethertype
    outer = out[Dot1Q].payload
    assert (outer.nh if isinstance(outer, IPv6) else outer.proto) == proto
    assert bytes(outer.payload) == bytes(pkt[layer])


def test_vlan_tag_is_kept_in_front_of_the_outer_header(lb):
    assert_vlan_tag_kept(lb, tcp(CLIENT, 46000, IPIP_VIP, PORT), IP, 0x0800, 4)


def too_big_answer(h, big: Ether) -> Ether:
    """`big` is dropped as encap_mtu and answered back out of the ingress
    interface (the MACs swapped); the answer."""
    drops = h.drop_count("encap_mtu")
    rc, out = h.run(big)
    assert rc == XDP_REDIRECT, "the answer goes back out of the ingress interface"
    assert out[Ether].dst == big[Ether].src and out[Ether].src == big[Ether].dst
    assert h.drop_count("encap_mtu") == drops + 1
    return out


@pytest.mark.parametrize("gue,cache_ms", [(False, 1000), (False, 0), (True, 1000), (True, 0)],
                         ids=["ipip-cached", "ipip-fib", "gue-cached", "gue-fib"])
def test_too_big_is_answered_with_fragmentation_needed(lab, bpf_object, gue, cache_ms):
    """A full-size packet (1500 bytes, the links' MTU) cannot take 20 or 28
    bytes more: the client gets ICMP fragmentation needed from the VIP with
    the MTU less the overhead, whether the next hop came from the FIB (which
    checks the tunnel packet's length against the route) or from the cache
    (bpf_check_mtu on the egress device)."""
    lab_, topo = lab
    cfg = dsr_config(topo)
    cfg["nexthop_cache_ms"] = cache_ms
    vip, overhead = (GUE_VIP, 28) if gue else (IPIP_VIP, 20)
    with Harness(lab_, topo, cfg, attach=False) as h:
        rc, _ = h.run(tcp(CLIENT, 47000, vip, PORT))                  # the flow, and a cached next hop
        assert rc == XDP_REDIRECT
        fits = tcp(CLIENT, 47000, vip, PORT, flags="A", payload=b"x" * (1500 - overhead - 40))
        fits[IP].flags = "DF"
        rc, out = h.run(fits)
        assert rc == XDP_REDIRECT and len(out[IP]) == 1500
        big = tcp(CLIENT, 47000, vip, PORT, flags="A", payload=b"x" * (1500 - 40))
        big[IP].flags = "DF"
        big = Ether(bytes(big))
        drops = h.drop_count("encap_mtu")
        out = too_big_answer(h, big)
        assert (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code) == (vip, CLIENT, 3, 4)
        assert out[ICMP].nexthopmtu == 1500 - overhead
        assert bytes(out[IPerror])[:28] == bytes(big[IP])[:28]        # its header and 8 bytes
        assert len(out) == 14 + 20 + 8 + 28
        assert_checksums_valid(out)
        assert h.counters("global_stats", h.dp.consts.CNT_FRAG_NEEDED)[0] >= 1
        # DF clear: XDP cannot fragment, so it is only dropped (and counted).
        rc, _ = h.run(tcp(CLIENT, 47000, vip, PORT, flags="A", payload=b"x" * (1500 - 40)))
        assert rc == XDP_DROP and h.drop_count("encap_mtu") == drops + 2


def test_outer_source_prefix_spreads_by_flow(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, dsr_config(topo, encap_source="10.255.1.16/28"), attach=False) as h:
        sources = set()
        for syn, ack in flows(h, IPIP_VIP, range(48000, 48064)).values():
            assert syn[IP].src == ack[IP].src
            assert IPv4Address(syn[IP].src) in IPv4Network("10.255.1.16/28")
            assert_checksums_valid(IP(bytes(syn[IP])[:20] + b"\0" * 8))
            sources.add(syn[IP].src)
        assert len(sources) >= 12, "64 flows over 16 sources"


def test_snat_does_not_apply_to_dsr_services(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, dsr_config(topo, snat=True), attach=False) as h:
        pkt = tcp(CLIENT, 49000, IPIP_VIP, PORT)
        rc, out = h.run(pkt)
        assert rc == XDP_REDIRECT and bytes(out[IP].payload) == bytes(pkt[IP])
        assert h.entries("rev_nat") == 0
        rc, out = h.run(tcp(CLIENT, 49000, "10.96.0.10", 80))          # the NAT service still SNATs
        assert rc == XDP_REDIRECT and out[IP].src == topo.snat_ip and h.entries("rev_nat") == 1


def test_defaults_agree_with_the_objects(lb):
    """The GUE port the LB sends to by default is the one the backends'
    decapsulation listens on by default; the service flags are distinct."""
    from lb import backend, config
    from loader import BpfObject

    obj = BpfObject(backend.default_object_path())
    try:
        assert config.GUE_PORT_DEFAULT == obj.btf.enums()["decap_limits"]["DECAP_GUE_PORT_DEFAULT"]
    finally:
        obj.close()
    c = lb.dp.consts
    flags = [c.SVC_F_HAS_POLICY, c.SVC_F_DEFAULT_DENY, c.SVC_F_REV_NAT, c.SVC_F_IPIP, c.SVC_F_GUE]
    assert len(set(flags)) == len(flags) and all(f & (f - 1) == 0 for f in flags)


# ---- IPv6: 6in6, 4in6, 6in4 (a Lab(ipv6=True)) ---------------------------------------

CLIENT6, DENIED6 = "fd00:1::10", "fd00:2::10"


def dsr6_config(topo, **kw) -> dict:
    cfg = lab_config(topo, fillers=0, bpffs="/unused", socket="/unused", **kw)
    return with_dsr6_services(cfg, topo)


def say_hello(lab_, topo) -> None:
    """A real datagram from the client to the LB (test_packets6.py's): the
    LB learns the client by neighbour discovery, as on a real link."""
    with lab_.inside(topo.client_ns), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", (topo.lb_client_ip6, 9))


@pytest.fixture(scope="module")
def lb6(lab6, bpf_object):
    lab_, topo = lab6
    with Harness(lab_, topo, dsr6_config(topo), attach=False) as h:
        say_hello(lab_, topo)
        yield h


def tcp6(src, sport, dst, dport, flags="S", payload=b"", tc=0) -> Ether:
    return Ether(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                       IPv6(src=src, dst=dst, hlim=64, tc=tc) /
                       TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload))


def client_packet(src, sport, vip, flags="S", payload=b"") -> Ether:
    """A TCP packet to a DSR VIP of either family; IPv4 with DF set."""
    if ":" in vip:
        return tcp6(src, sport, vip, PORT, flags=flags, payload=payload)
    pkt = tcp(src, sport, vip, PORT, flags=flags, payload=payload)
    pkt[IP].flags = "DF"
    return Ether(bytes(pkt))


def backend6_of(topo, addr):
    return next(b for b in topo.backends if addr in (b.ip, b.ip6))


def expected_tunnel6(topo, out: Ether, inner, *, gue: bool) -> bytes:
    """The frame encap.h must write for `inner` (IPv4 or IPv6) to the IPv6
    backend `out` went to; the flow label and GUE port are the flow's, read
    from the output and checked by the callers."""
    b = backend6_of(topo, out[IPv6].dst)
    tos = inner.tc if isinstance(inner, IPv6) else inner.tos
    payload = bytes(inner)
    if gue:
        payload = bytes(UDP(sport=out[UDP].sport, dport=GUE_PORT, len=8 + len(payload), chksum=0)) + payload
    outer = IPv6(version=6, tc=tos & 0xFC, fl=out[IPv6].fl, plen=len(payload),
                 nh=17 if gue else (41 if isinstance(inner, IPv6) else 4), hlim=64, src=ENCAP_SOURCE6, dst=b.ip6)
    return bytes(Ether(src=b.lb_iface.mac, dst=b.iface.mac) / outer / payload)


@pytest.mark.parametrize("vip,gue", [(IPIP_VIP6, False), (GUE_VIP6, True), (VIP_4IN6, False)],
                         ids=["6in6-ipip", "6in6-gue", "4in6"])
def test_ipv6_tunnel_is_exact(lb6, vip, gue):
    """Every outer field: traffic class the inner DSCP without ECN, hop
    limit 64, next header 41 (IPv6), 4 (IPv4) or 17 (GUE, checksum 0: RFC
    6935), from the IPv6 encap_source to the backend; the inner packet
    untouched, checksums too."""
    v6 = ":" in vip
    src = CLIENT6 if v6 else CLIENT
    pkt = client_packet(src, 40000, vip, payload=b"GET / HTTP/1.0\r\n\r\n")
    if v6:
        pkt[IPv6].tc = 0xB9
    else:
        pkt[IP].tos = 0xB9
        pkt = Ether(bytes(pkt))
    inner = pkt[IPv6] if v6 else pkt[IP]
    counter = "encap_gue" if gue else "encap_ipip"
    before = counters(lb6, counter)
    rc, out = lb6.run(pkt)
    assert rc == XDP_REDIRECT, lb6.drop_count("encap")
    assert bytes(out) == expected_tunnel6(lb6.topo, out, inner, gue=gue)
    assert out[IPv6].tc == 0xB8 and out[IPv6].fl != 0
    carried = bytes(out[UDP].payload) if gue else bytes(out[IPv6].payload)
    assert carried == bytes(inner)
    if gue:
        assert 49152 <= out[UDP].sport <= 65535 and out[UDP].chksum == 0
    assert counters(lb6, counter) == before + 1


def test_6in4_gue_to_ipv4_backends(lb6):
    """An IPv6 VIP with IPv4 backends: the IPv6 packet in UDP in IPv4,
    from the IPv4 encap_source, the outer header's checksum valid."""
    pkt = client_packet(CLIENT6, 40100, VIP_6IN4)
    rc, out = lb6.run(pkt)
    assert rc == XDP_REDIRECT
    b = backend6_of(lb6.topo, out[IP].dst)
    assert (out[IP].src, out[IP].proto, out[IP].flags, out[IP].ttl) == (ENCAP_SOURCE, 17, 2, 64)
    assert out[Ether].type == 0x0800 and out[Ether].dst == b.iface.mac
    assert out[UDP].dport == GUE_PORT and bytes(out[UDP].payload) == bytes(pkt[IPv6])
    assert_checksums_valid(IP(bytes(out[IP])[:20] + b"\0" * 8))


def test_flow_label_and_gue_port_vary_by_flow_and_not_within_it(lb6):
    labels, ports = set(), set()
    for sport in range(43000, 43064):
        syn = lb6.run(tcp6(CLIENT6, sport, GUE_VIP6, PORT))[1]
        ack = lb6.run(tcp6(CLIENT6, sport, GUE_VIP6, PORT, flags="A"))[1]
        assert (syn[IPv6].dst, syn[IPv6].fl, syn[UDP].sport) == (ack[IPv6].dst, ack[IPv6].fl, ack[UDP].sport)
        labels.add(syn[IPv6].fl)
        ports.add(syn[UDP].sport)
    assert len(labels) >= 60 and len(ports) >= 56, (len(labels), len(ports))
    dsts = {lb6.run(tcp6(CLIENT6, sport, IPIP_VIP6, PORT))[1][IPv6].dst for sport in range(44000, 44060)}
    assert dsts == {b.ip6 for b in lb6.topo.backends}


def test_ipv6_policy_drops_before_encapsulation(lb6):
    assert_dropped_before_encapsulation(lb6, tcp6(DENIED6, 40001, IPIP_VIP6, PORT))
    assert_dropped_before_encapsulation(lb6, tcp6(DENIED6, 40002, VIP_6IN4, PORT))
    assert_dropped_before_encapsulation(lb6, tcp(DENIED, 40003, VIP_4IN6, PORT))


def test_ipv6_vlan_tag_is_kept(lb6):
    assert_vlan_tag_kept(lb6, tcp6(CLIENT6, 46000, IPIP_VIP6, PORT), IPv6, 0x86DD, 41)
    assert_vlan_tag_kept(lb6, client_packet(CLIENT, 46001, VIP_4IN6), IP, 0x86DD, 4)


@pytest.mark.parametrize("vip,overhead,cache_ms", [
    (IPIP_VIP6, 40, 1000), (IPIP_VIP6, 40, 0), (GUE_VIP6, 48, 1000), (GUE_VIP6, 48, 0),
    (VIP_4IN6, 40, 1000), (VIP_6IN4, 28, 0)],
    ids=["6in6-cached", "6in6-fib", "gue6-cached", "gue6-fib", "4in6", "6in4-gue"])
def test_too_big_answers_packet_too_big(lab6, bpf_object, vip, overhead, cache_ms):
    """A 1500-byte packet (the links' MTU) cannot take the tunnel's bytes:
    an IPv6 client gets ICMPv6 packet too big from the VIP with the MTU
    less the overhead (DF or not: IPv6 is never fragmented on the way), an
    IPv4 one (4in6) ICMP fragmentation needed, as for IPv4 tunnels."""
    lab_, topo = lab6
    cfg = dsr6_config(topo)
    cfg["nexthop_cache_ms"] = cache_ms
    v6 = ":" in vip
    src = CLIENT6 if v6 else CLIENT
    with Harness(lab_, topo, cfg, attach=False) as h:
        say_hello(lab_, topo)
        rc, _ = h.run(client_packet(src, 47000, vip))
        assert rc == XDP_REDIRECT
        headers = 60 if v6 else 40
        fits = client_packet(src, 47000, vip, flags="A", payload=b"x" * (1500 - overhead - headers))
        rc, out = h.run(fits)
        assert rc == XDP_REDIRECT and len(out) - 14 == 1500
        big = client_packet(src, 47000, vip, flags="A", payload=b"x" * (1500 - headers))
        out = too_big_answer(h, big)
        if v6:
            assert (out[IPv6].src, out[IPv6].dst, out[IPv6].nh) == (vip, CLIENT6, 58)
            assert out[ICMPv6PacketTooBig].mtu == 1500 - overhead
            assert bytes(out[IPerror6])[:48] == bytes(big[IPv6])[:48]
            assert icmp6_checksum_ok(out)
        else:
            assert (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code) == (vip, CLIENT, 3, 4)
            assert out[ICMP].nexthopmtu == 1500 - overhead
            assert_checksums_valid(out)
        assert h.counters("global_stats", h.dp.consts.CNT_FRAG_NEEDED)[0] >= 1


def icmp6_checksum_ok(pkt: Ether) -> bool:
    fresh = Ether(bytes(pkt))
    del fresh[ICMPv6PacketTooBig].cksum
    return Ether(bytes(fresh))[ICMPv6PacketTooBig].cksum == pkt[ICMPv6PacketTooBig].cksum


def test_no_packet_too_big_below_the_ipv6_minimum_mtu(lab6, bpf_object):
    """Backend links of MTU 1300: 6in6 leaves 1260 for the client, below
    IPv6's 1280, to which a client raises any smaller MTU (RFC 8201): a
    packet too big would bring the same packets back, so the LB only drops
    and counts them. Packets that fit still go."""
    lab_, topo = lab6
    cfg = dsr6_config(topo)
    cfg["nexthop_cache_ms"] = 0
    try:
        for b in topo.backends:
            lab_.run(topo.lb_ns, ["ip", "link", "set", b.lb_iface.name, "mtu", "1300"])
        with Harness(lab_, topo, cfg, attach=False) as h:
            say_hello(lab_, topo)
            rc, out = h.run(tcp6(CLIENT6, 48000, IPIP_VIP6, PORT, payload=b"x" * (1260 - 60)))
            assert rc == XDP_REDIRECT and len(out) - 14 == 1300
            drops, ptb = h.drop_count("encap_mtu"), h.counters("global_stats", h.dp.consts.CNT_FRAG_NEEDED)[0]
            rc, _ = h.run(tcp6(CLIENT6, 48000, IPIP_VIP6, PORT, flags="A", payload=b"x" * (1280 - 60)))
            assert rc == XDP_DROP
            assert h.drop_count("encap_mtu") == drops + 1
            assert h.counters("global_stats", h.dp.consts.CNT_FRAG_NEEDED)[0] == ptb
    finally:
        for b in topo.backends:
            lab_.run(topo.lb_ns, ["ip", "link", "set", b.lb_iface.name, "mtu", "1500"])


def test_ipv6_outer_source_prefix_spreads_by_flow(lab6, bpf_object):
    lab_, topo = lab6
    cfg = dsr6_config(topo)
    cfg["encap_source"] = [ENCAP_SOURCE, "fd00:255::10/124"]
    with Harness(lab_, topo, cfg, attach=False) as h:
        say_hello(lab_, topo)
        sources = set()
        for sport in range(48100, 48164):
            syn = h.run(tcp6(CLIENT6, sport, IPIP_VIP6, PORT))[1]
            ack = h.run(tcp6(CLIENT6, sport, IPIP_VIP6, PORT, flags="A"))[1]
            assert syn[IPv6].src == ack[IPv6].src
            assert IPv6Address(syn[IPv6].src) in IPv6Network("fd00:255::10/124")
            sources.add(syn[IPv6].src)
        assert len(sources) >= 12, "64 flows over 16 sources"
