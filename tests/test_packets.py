"""Packet-level behaviour of the real program, through BPF test-run, on the
lab's LB namespace (so bpf_fib_lookup sees real routes and neighbours)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.l2 import Dot1Q, Ether

from lb.demo import lab_config
from lbtest import (XDP_DROP, XDP_PASS, XDP_REDIRECT, Harness, assert_checksums_valid,
                    pin_dir, tcp, udp)

VIP = "10.96.0.10"
CLIENT = "10.1.0.10"
DENIED = "192.0.2.10"


@pytest.fixture(scope="module")
def lb(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, attach=False) as h:
        yield h


def backend_of(topo, ip):
    return next(b for b in topo.backends if b.ip == ip)


def test_dnat_forward_exact_output(lb):
    topo = lb.topo
    pkt = tcp(CLIENT, 40000, VIP, 80, payload=b"GET / HTTP/1.0\r\n\r\n")
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT
    b = backend_of(topo, out[IP].dst)
    # Everything but addresses, ports, MACs and checksums is untouched.
    expected = pkt.copy()
    expected[Ether].src, expected[Ether].dst = b.lb_iface.mac, b.iface.mac
    expected[IP].dst = b.ip
    expected[TCP].dport = topo.backend_port
    del expected[IP].chksum
    del expected[TCP].chksum
    assert bytes(out) == bytes(Ether(bytes(expected)))
    assert_checksums_valid(out)


def test_same_flow_same_backend_and_flows_spread(lb):
    seen = {}
    for sport in range(41000, 41060):
        _, out1 = lb.run(tcp(CLIENT, sport, VIP, 80))
        _, out2 = lb.run(tcp(CLIENT, sport, VIP, 80, flags="A"))
        assert out1[IP].dst == out2[IP].dst
        seen[sport] = out1[IP].dst
    assert len(set(seen.values())) == 3          # 60 flows reach all 3 backends


def test_udp_dnat_checksums(lb):
    topo = lb.topo
    rc, out = lb.run(udp(CLIENT, 5353, "10.96.0.53", 53))
    assert rc == XDP_REDIRECT
    assert out[UDP].dport == topo.udp_port
    assert out[IP].dst in {b.ip for b in topo.backends}
    assert_checksums_valid(out)
    # A zero UDP checksum means "none" and must stay zero.
    rc, out = lb.run(udp(CLIENT, 5354, "10.96.0.53", 53, chksum=0))
    assert rc == XDP_REDIRECT and out[UDP].chksum == 0


def test_reply_is_reverse_translated(lb):
    topo = lb.topo
    _, fwd = lb.run(tcp(CLIENT, 42000, VIP, 80))
    b = backend_of(topo, fwd[IP].dst)
    reply = tcp(b.ip, topo.backend_port, CLIENT, 42000, flags="SA")
    rc, out = lb.run(reply, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (VIP, 80, CLIENT, 42000)
    assert out[Ether].dst == topo.client.mac
    assert_checksums_valid(out)


def test_spoofed_reply_from_wrong_interface_is_dropped(lb):
    topo = lb.topo
    _, fwd = lb.run(tcp(CLIENT, 42100, VIP, 80))
    b = backend_of(topo, fwd[IP].dst)
    before = lb.drop_count("spoofed_reply")
    rc, _ = lb.run(tcp(b.ip, topo.backend_port, CLIENT, 42100, flags="SA"), ifname="l0")
    assert rc == XDP_DROP
    assert lb.drop_count("spoofed_reply") == before + 1


def test_denied_identity_dropped_and_counted(lb):
    c = lb.dp.consts
    blocked = lb.rec.identity_ids()["blocked"]
    svc_id = lb.rec.services[next(s.key for s in lb.cfg.services if s.name == "web")].svc_id
    key = lb.dp.maps["drop_detail"].key_type(identity=blocked, svc_id=svc_id, reason=c.DROP_POLICY)
    before = lb.dp.maps["drop_detail"].lookup(key)
    before = sum(v.packets for v in before) if before else 0
    for sport in range(43000, 43005):
        rc, out = lb.run(tcp(DENIED, sport, VIP, 80))
        assert rc == XDP_DROP
    after = sum(v.packets for v in lb.dp.maps["drop_detail"].lookup(key))
    assert after == before + 5


def test_world_is_denied_where_allow_list_exists(lb):
    # 10.1.0.77 is in frontend; 10.1.1.5 is nobody's: world.
    rc, _ = lb.run(tcp("10.1.0.77", 43100, VIP, 80))
    assert rc == XDP_REDIRECT
    rc, _ = lb.run(tcp("198.51.100.7", 43101, VIP, 80))
    assert rc == XDP_DROP


def test_service_without_policy_allows_everyone(lb):
    rc, _ = lb.run(udp(DENIED, 5000, "10.96.0.53", 53))
    assert rc == XDP_REDIRECT


def test_non_vip_traffic_passes_untouched(lb):
    for pkt in (tcp(CLIENT, 44000, "10.1.0.1", 22), udp(CLIENT, 44001, "10.244.1.2", 53),
                Ether() / IP(src=CLIENT, dst="10.1.0.1") / ICMP(),
                Ether(type=0x86dd) / (b"\x60" + b"\x00" * 53)):
        data = bytes(pkt)
        rc, out = lb.run(pkt)
        assert rc == XDP_PASS
        assert bytes(out) == data


@pytest.mark.parametrize("name,pkt,reason", [
    ("options", Ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_RR()]) / TCP(dport=80), "ip_options"),
    ("first fragment", Ether() / IP(src=CLIENT, dst=VIP, flags="MF") / TCP(dport=80), "fragment"),
    ("later fragment", Ether() / IP(src=CLIENT, dst=VIP, frag=10, proto=6) / (b"x" * 16), "fragment"),
    ("truncated tcp", Ether() / IP(src=CLIENT, dst=VIP, proto=6) / (b"\x00" * 10), "truncated"),
    ("bad ihl", Ether() / IP(src=CLIENT, dst=VIP, ihl=4) / TCP(dport=80), "bad_ip"),
    ("long tot_len", Ether() / IP(src=CLIENT, dst=VIP, len=1400) / TCP(dport=80), "bad_ip"),
    ("icmp to vip", Ether() / IP(src=CLIENT, dst=VIP) / ICMP(), "unsupported_l4"),
    ("unknown port", Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=443), "no_service"),
    ("wrong protocol", Ether() / IP(src=CLIENT, dst=VIP) / UDP(dport=80), "no_service"),
])
def test_malformed_vip_packets_dropped_by_reason(lb, name, pkt, reason):
    before = lb.drop_count(reason)
    rc, _ = lb.run(pkt)
    assert rc == XDP_DROP, name
    assert lb.drop_count(reason) == before + 1, name


def test_vlan_tagged_vip_traffic_is_balanced_and_policed(lb):
    pkt = Ether() / Dot1Q(vlan=7) / IP(src=CLIENT, dst=VIP) / TCP(sport=45000, dport=80, flags="S")
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT and out[Dot1Q].vlan == 7
    assert out[IP].dst in {b.ip for b in lb.topo.backends}
    assert_checksums_valid(out)
    denied = Ether() / Dot1Q(vlan=7) / IP(src=DENIED, dst=VIP) / TCP(sport=45001, dport=80)
    assert lb.run(denied)[0] == XDP_DROP


def test_counters_per_service_and_backend(lb):
    web = next(s for s in lb.rec.services.values() if s.name == "web")
    before = lb.counters("svc_stats", web.svc_id)[0]
    pkt = tcp(CLIENT, 46000, VIP, 80)
    _, out = lb.run(pkt)
    after = lb.counters("svc_stats", web.svc_id)
    assert after[0] == before + 1
    from ipaddress import IPv4Address

    from lb.reconcile import bkey

    b = web.backends[bkey(IPv4Address(out[IP].dst), lb.topo.backend_port)]
    assert lb.counters("backend_stats", b.id)[0] >= 1


def test_snat_mode_rewrites_source_and_replies(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, attach=False, snat=True) as h:
        rc, out = h.run(tcp(CLIENT, 48000, VIP, 80))
        assert rc == XDP_REDIRECT
        assert out[IP].src == topo.snat_ip
        lo, hi = h.cfg.snat_ports.min, h.cfg.snat_ports.max
        assert lo <= out[TCP].sport <= hi
        assert_checksums_valid(out)
        nat_port = out[TCP].sport
        b = backend_of(topo, out[IP].dst)
        # Same flow keeps its NAT port.
        _, again = h.run(tcp(CLIENT, 48000, VIP, 80, flags="A"))
        assert again[TCP].sport == nat_port and again[IP].dst == b.ip
        reply = tcp(b.ip, topo.backend_port, topo.snat_ip, nat_port, flags="SA")
        rc, back = h.run(reply, ifname=b.lb_iface.name)
        assert rc == XDP_REDIRECT
        assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (VIP, 80, CLIENT, 48000)
        assert_checksums_valid(back)


def test_missing_neighbour_passes_to_kernel(lab, bpf_object):
    lab_, topo = lab
    from pyroute2 import NetNS

    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["nexthop_cache_ms"] = 0                      # every packet asks the FIB
    with Harness(lab_, topo, cfg, attach=False) as h:
        _, out = h.run(tcp(CLIENT, 49000, VIP, 80))
        b = backend_of(topo, out[IP].dst)
        with NetNS(topo.lb_ns) as ns:
            ns.neigh("del", dst=b.ip, ifindex=b.lb_iface.ifindex)
        try:
            rc, out2 = h.run(tcp(CLIENT, 49000, VIP, 80, flags="A"))
            assert rc == XDP_PASS                 # the kernel resolves ARP and forwards
            assert out2[IP].dst == b.ip           # already translated
        finally:
            h.neighbours.sync(wait=2.0)           # the product's keeper puts it back


def test_python_constants_agree_with_btf(lb):
    """The few values Python also names must match constants.h."""
    from lb import config

    c = lb.dp.consts
    assert config.IDENTITY_WORLD == c.IDENTITY_WORLD
    assert config.IDENTITY_USER_MIN == c.IDENTITY_USER_MIN
    assert lb.rec.identity_ids()["world"] == c.IDENTITY_WORLD


def test_nexthop_cache_follows_neighbour_changes_within_its_ttl(lab, bpf_object):
    """With the cache on, a lost neighbour is noticed once the cached next
    hop expires: the packet then goes to the kernel to resolve it."""
    import os
    import time

    from pyroute2 import NetNS

    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["nexthop_cache_ms"] = 300
    with Harness(lab_, topo, cfg, attach=False) as h:
        os.sched_setaffinity(0, {0})                  # the cache is per CPU: stay on one
        try:
            _, out = h.run(tcp(CLIENT, 49100, VIP, 80))
            b = backend_of(topo, out[IP].dst)
            with NetNS(topo.lb_ns) as ns:
                ns.neigh("del", dst=b.ip, ifindex=b.lb_iface.ifindex)
            rc, _ = h.run(tcp(CLIENT, 49100, VIP, 80, flags="A"))
            assert rc == XDP_REDIRECT                 # still cached
            time.sleep(0.4)
            rc, _ = h.run(tcp(CLIENT, 49100, VIP, 80, flags="A"))
            assert rc == XDP_PASS                     # expired: the FIB says NO_NEIGH
        finally:
            os.sched_setaffinity(0, range(os.cpu_count()))
            lab_.ping(topo.lb_ns, b.ip)
