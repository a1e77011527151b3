"""ICMP and ICMPv6 errors about translated flows (icmp_error.h), through the
real program by BPF test-run on a Lab(ipv6=True) LB namespace: both
families, gateway and SNAT mode, both directions, exact output bytes."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from lbtest import XDP_DROP, XDP_PASS, XDP_REDIRECT
from test_packets6 import CLIENT6, DENY_VIP6, OTHER6, UDP_VIP6, VIP6, config6, lb6  # noqa: F401 (fixture)

VIP, UDP_VIP, CLIENT, DENIED = "10.96.0.10", "10.96.0.53", "10.1.0.10", "192.0.2.10"
# Routers that send errors: one between the LB and the backends, one
# between the client and the LB. Neither is an address of the lab.
ROUTER = {4: "10.244.1.254", 6: "fd00:244:1::fe"}
CLIENT_ROUTER = {4: "10.1.0.254", 6: "fd00:1::fe"}
FAMILY = {4: dict(ip=IP, vip=VIP, udp_vip=UDP_VIP, client=CLIENT),
          6: dict(ip=IPv6, vip=VIP6, udp_vip=UDP_VIP6, client=CLIENT6)}
MTU = 1280


@pytest.fixture(scope="module")
def lb(lb6):
    """test_packets6's LB: its IPv4 and IPv6 services, by test-run."""
    return lb6


@pytest.fixture(params=["gateway", "snat"])
def mode(request, lb):
    """Gateway mode, or SNAT for the family the test asks for (fam)."""
    yield request.param


def snat_for(lb, fam: int):
    cfg = lb.edit()
    cfg["snat_address"] = lb.topo.snat_ip if fam == 4 else lb.topo.snat_ip6
    lb.apply(cfg)


def gateway(lb):
    cfg = lb.edit()
    cfg.pop("snat_address", None)
    lb.apply(cfg)


@pytest.fixture
def in_mode(lb, mode):
    def set_(fam):
        if mode == "snat":
            snat_for(lb, fam)
    yield set_
    if mode == "snat":
        gateway(lb)


def eth(src="02:00:00:00:00:01", dst="02:00:00:00:00:02"):
    return Ether(src=src, dst=dst)


def client_packet(fam, sport, proto="tcp", src=None):
    f = FAMILY[fam]
    src = src or f["client"]
    if proto == "tcp":
        return eth() / f["ip"](src=src, dst=f["vip"]) / TCP(sport=sport, dport=80, flags="S", seq=1000) / \
            (b"x" * 40)
    return eth() / f["ip"](src=src, dst=f["udp_vip"]) / UDP(sport=sport, dport=53) / (b"q" * 40)


def l3(pkt):
    return pkt[IP] if IP in pkt else pkt[IPv6]


def forward(lb, pkt):
    rc, out = lb.run(pkt)
    assert rc == XDP_REDIRECT, rc
    return out


def backend_of(lb, out):
    dst = l3(out).dst
    return next(b for b in lb.topo.backends if dst in (b.ip, b.ip6))


def error_to(fam, src, dst, quote: bytes, kind="too_big", smac=None, dmac=None):
    """An ICMP(v6) error from `src` to `dst` quoting `quote`."""
    if fam == 4:
        icmp = {"too_big": ICMP(type=3, code=4, nexthopmtu=MTU), "port": ICMP(type=3, code=3),
                "time": ICMP(type=11, code=0), "echo": ICMP(type=8, id=7, seq=1)}[kind]
        return eth(smac or "02:00:00:00:00:01", dmac or "02:00:00:00:00:02") / \
            IP(src=src, dst=dst, id=0, flags=0) / icmp / Raw(quote)
    icmp = {"too_big": ICMPv6PacketTooBig(mtu=MTU), "port": ICMPv6DestUnreach(code=4),
            "time": ICMPv6TimeExceeded(), "echo": ICMPv6EchoRequest(id=7, seq=1)}[kind]
    return eth(smac or "02:00:00:00:00:01", dmac or "02:00:00:00:00:02") / \
        IPv6(src=src, dst=dst) / icmp / Raw(quote)


def rebuilt(pkt):
    """`pkt` with its outer checksums recomputed by scapy (the quote kept)."""
    fresh = Ether(bytes(pkt))
    if IP in fresh:
        del fresh[IP].chksum
    icmp = l3(fresh).payload
    for name in ("chksum", "cksum"):
        if name in icmp.fields:
            delattr(icmp, name)
    return Ether(bytes(fresh))


def counter(lb, name):
    return lb.counters("global_stats", getattr(lb.dp.consts, "CNT_" + name.upper()))[0]


def expected_error(fam, smac, dmac, src, dst, kind, quote):
    return bytes(rebuilt(error_to(fam, src, dst, quote, kind, smac, dmac)))


# ---- to the client: errors about client -> backend packets ----------------

@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("quote_len", ["full", "truncated"])
def test_router_error_reaches_the_client(lb, in_mode, mode, fam, quote_len):
    in_mode(fam)
    topo = lb.topo
    pkt = client_packet(fam, 50000 + fam + (10 if quote_len == "full" else 0))
    out = forward(lb, pkt)
    b = backend_of(lb, out)
    if mode == "snat":
        assert l3(out).src == (topo.snat_ip if fam == 4 else topo.snat_ip6)
    # A router on the backend's side: the whole TCP header is quoted (its
    # checksum with it), or only the first 8 bytes (RFC 792's minimum).
    n = (20 if fam == 4 else 40) + (20 if quote_len == "full" else 8)
    err = error_to(fam, ROUTER[fam], l3(out).src, bytes(l3(out))[:n], "too_big",
                   smac=b.iface.mac, dmac=b.lb_iface.mac)
    before = counter(lb, "icmp_error_to_client")
    rc, back = lb.run(err, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    assert counter(lb, "icmp_error_to_client") == before + 1
    # The quote is the client's packet as the client sent it, byte for byte
    # (addresses, ports, IP and TCP checksums restored); the error goes to
    # the client from the router, every checksum valid.
    assert bytes(back) == expected_error(fam, topo.lb_client.mac, topo.client.mac, ROUTER[fam],
                                         FAMILY[fam]["client"], "too_big", bytes(l3(pkt))[:n])


@pytest.mark.parametrize("fam", [4, 6])
def test_backend_port_unreachable_comes_from_the_vip(lb, in_mode, fam):
    in_mode(fam)
    topo = lb.topo
    pkt = client_packet(fam, 51000 + fam, proto="udp")
    out = forward(lb, pkt)
    b = backend_of(lb, out)
    backend_ip = l3(out).dst
    err = error_to(fam, backend_ip, l3(out).src, bytes(l3(out))[:(20 if fam == 4 else 40) + 48], "port",
                   smac=b.iface.mac, dmac=b.lb_iface.mac)
    rc, back = lb.run(err, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    n = (20 if fam == 4 else 40) + 48
    assert bytes(back) == expected_error(fam, topo.lb_client.mac, topo.client.mac, FAMILY[fam]["udp_vip"],
                                         FAMILY[fam]["client"], "port", bytes(l3(pkt))[:n])


@pytest.mark.parametrize("fam", [4, 6])
def test_error_from_the_client_side_is_not_translated_to_the_client(lb, fam):
    """The reply path's guarantee: only the backend's side speaks for a flow."""
    out = forward(lb, client_packet(fam, 52000 + fam))
    err = error_to(fam, ROUTER[fam], l3(out).src, bytes(l3(out))[:(20 if fam == 4 else 40) + 20])
    before = lb.drop_count("spoofed_reply")
    rc, _ = lb.run(err, ifname="l0")
    assert rc == XDP_DROP and lb.drop_count("spoofed_reply") == before + 1


@pytest.mark.parametrize("fam", [4, 6])
def test_error_quoting_no_flow_passes_untouched(lb, fam):
    b = lb.topo.backends[0]
    ip = FAMILY[fam]["ip"]
    never = ip(src=FAMILY[fam]["client"], dst=b.ip if fam == 4 else b.ip6) / \
        TCP(sport=52999, dport=lb.topo.backend_port, flags="S")
    err = error_to(fam, ROUTER[fam], FAMILY[fam]["client"], bytes(never)[:(20 if fam == 4 else 40) + 20],
                   smac=b.iface.mac, dmac=b.lb_iface.mac)
    rc, out = lb.run(err, ifname=b.lb_iface.name)
    assert rc == XDP_PASS and bytes(out) == bytes(err)


@pytest.mark.parametrize("fam", [4, 6])
def test_message_shorter_than_its_frame_is_read_as_its_length_says(lb, fam):
    """The IP length, not the frame, bounds the quote: a message that ends
    before the quoted ports (the rest is padding) quotes no flow."""
    out = forward(lb, client_packet(fam, 53500 + fam))
    b = backend_of(lb, out)
    hdr = 20 if fam == 4 else 40
    err = error_to(fam, ROUTER[fam], l3(out).src, bytes(l3(out))[:hdr + 20], smac=b.iface.mac,
                   dmac=b.lb_iface.mac)
    if fam == 4:
        err[IP].len = 20 + 8 + hdr + 4          # the quote stops inside the ports
    else:
        err[IPv6].plen = 8 + hdr + 4
    frame = bytes(err)
    rc, got = lb.run(Ether(frame), ifname=b.lb_iface.name)
    assert rc == XDP_PASS and bytes(got) == frame


@pytest.mark.parametrize("fam", [4, 6])
def test_echo_quoting_a_flow_is_untouched(lb, fam):
    """Only errors are translated: an echo request whose payload happens to
    look like a translated packet is not."""
    out = forward(lb, client_packet(fam, 53000 + fam))
    b = backend_of(lb, out)
    echo = error_to(fam, l3(out).dst, l3(out).src, bytes(l3(out))[:(20 if fam == 4 else 40) + 20], "echo",
                    smac=b.iface.mac, dmac=b.lb_iface.mac)
    rc, got = lb.run(echo, ifname=b.lb_iface.name)
    assert rc == XDP_PASS and bytes(got) == bytes(echo)


# ---- to the backend: errors about replies ---------------------------------

def reply_through(lb, fam, sport, proto="tcp", src=None):
    """A flow and its reply through the LB: (backend, the reply as the
    backend sent it, as the LB sent it to the client)."""
    topo = lb.topo
    out = forward(lb, client_packet(fam, sport, proto, src))
    b = backend_of(lb, out)
    o = l3(out)
    l4 = TCP(sport=o.dport, dport=o.sport, flags="SA", seq=5, ack=1001) if proto == "tcp" else \
        UDP(sport=o.dport, dport=o.sport)
    reply = eth(b.iface.mac, b.lb_iface.mac) / FAMILY[fam]["ip"](src=o.dst, dst=o.src) / l4 / (b"r" * 60)
    rc, back = lb.run(reply, ifname=b.lb_iface.name)
    assert rc == XDP_REDIRECT
    assert l3(back).dst == (src or FAMILY[fam]["client"])
    return b, reply, back


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_client_side_error_reaches_the_backend(lb, in_mode, mode, fam, proto):
    in_mode(fam)
    topo = lb.topo
    b, reply, back = reply_through(lb, fam, 54000 + fam, proto)
    n = (20 if fam == 4 else 40) + 40
    vip = l3(back).src
    err = error_to(fam, CLIENT_ROUTER[fam], vip, bytes(l3(back))[:n], "too_big")
    before = counter(lb, "icmp_error_to_backend")
    rc, out = lb.run(err, ifname="l0")
    assert rc == XDP_REDIRECT
    assert counter(lb, "icmp_error_to_backend") == before + 1
    # To the backend, quoting its reply as it sent it; in SNAT mode from
    # the SNAT address (the backend only knows that one).
    src = CLIENT_ROUTER[fam] if mode == "gateway" else (topo.snat_ip if fam == 4 else topo.snat_ip6)
    assert bytes(out) == expected_error(fam, b.lb_iface.mac, b.iface.mac, src, l3(reply).src, "too_big",
                                        bytes(l3(reply))[:n])


@pytest.mark.parametrize("fam", [4, 6])
def test_client_side_error_about_a_denied_client_is_dropped(lb, fam):
    """A client the policy denies had no flow: an error naming it is
    dropped as its own packets are, forged or not."""
    vip = VIP if fam == 4 else DENY_VIP6
    denied = DENIED if fam == 4 else OTHER6
    ip = FAMILY[fam]["ip"]
    quote = bytes(ip(src=vip, dst=denied) / TCP(sport=80, dport=55000, flags="SA"))[:(20 if fam == 4 else 40) + 20]
    err = error_to(fam, CLIENT_ROUTER[fam], vip, quote)
    before = lb.drop_count("policy")
    rc, _ = lb.run(err, ifname="l0")
    assert rc == XDP_DROP and lb.drop_count("policy") == before + 1


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("guard", ["on", "off"])
def test_client_side_error_quoting_no_flow_is_dropped_as_before(lb, fam, guard):
    """A port without a service names no flow; nor, with the flood guard
    off, does a flow without state (with it on, such a flow may be one the
    guard forwarded: test_client_side_error_about_a_flow_without_state)."""
    ip, vip = FAMILY[fam]["ip"], FAMILY[fam]["vip"]
    cfg = lb.edit()
    if guard == "off":
        cfg["flood_guard"] = {"new_flows_per_second": 0}
        lb.apply(cfg)
    try:
        for port in ([80, 81] if guard == "off" else [81]):
            quote = bytes(ip(src=vip, dst=FAMILY[fam]["client"]) / TCP(sport=port, dport=55999, flags="SA"))
            err = error_to(fam, CLIENT_ROUTER[fam], vip, quote[:(20 if fam == 4 else 40) + 20])
            before = lb.drop_count("unsupported_l4")
            rc, _ = lb.run(err, ifname="l0")
            assert rc == XDP_DROP and lb.drop_count("unsupported_l4") == before + 1, port
    finally:
        cfg.pop("flood_guard", None)
        lb.apply(cfg)


def test_counters_are_named_in_stats(lb):
    from lb.stats import collect
    names = collect(lb.dp, lb.rec)["global"]
    assert "icmp_error_to_client" in names and "icmp_error_to_backend" in names


def test_the_error_path_outlives_the_loading_process(lab6, bpf_object):
    """A program array is emptied when nothing holds it: the pin keeps the
    error path of a running program after its loader is gone (kill -9 of
    the daemon), until the next load pins its own."""
    from pathlib import Path

    from lb.config import config_from_dict
    from lb.dataplane import Dataplane
    from loader import Map
    from lbtest import pin_dir

    lab_, topo = lab6
    cfg = config6(topo)
    cfg["bpffs"] = pin_dir()
    dp = Dataplane.open(config_from_dict(cfg))
    icmp_prog = dp.obj.program("xdplb_icmp_error").id
    pinned = Path(cfg["bpffs"]) / "tail" / "icmp_errors"
    try:
        dp.close()                                  # every descriptor of the load gone
        with Map.open_pinned(pinned) as m:
            assert int.from_bytes(bytes(m.lookup(0)), "little") == icmp_prog
        dp2 = Dataplane.open(config_from_dict(cfg))    # the next load pins its own
        try:
            with Map.open_pinned(pinned) as m:
                assert int.from_bytes(bytes(m.lookup(0)), "little") == dp2.obj.program("xdplb_icmp_error").id
        finally:
            dp2.close()
    finally:
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)
    assert not pinned.exists()


# ---- fuzzing ICMPv6 errors (test_fuzz.py does IPv4's, with its seeds) -----

def icmp6_checksum_ok(frame: bytes) -> bool:
    pkt = Ether(frame)
    if IPv6 not in pkt or not hasattr(pkt[IPv6].payload, "cksum"):
        return False
    return bytes(rebuilt(pkt)) == bytes(pkt)


def is_icmp6_error(frame: bytes) -> bool:
    return len(frame) > 55 and frame[12:14] == b"\x86\xdd" and frame[20] == 58 and 1 <= frame[54] <= 4


def check6(lb, data: bytes, ingress: int, tally: dict) -> None:
    import ipaddress

    from loader.testrun import test_run
    res = test_run(lb.dp.prog.fd, data, ingress_ifindex=ingress)
    tally[res.retval] = tally.get(res.retval, 0) + 1
    assert res.retval != 0, data.hex()                               # XDP_ABORTED
    dst = str(ipaddress.IPv6Address(data[38:54])) if len(data) >= 54 and data[12:14] == b"\x86\xdd" else None
    vips = {VIP6, UDP_VIP6, DENY_VIP6}
    if res.retval == XDP_REDIRECT and not is_icmp6_error(data):
        assert dst in vips, data.hex()      # damage made it TCP/UDP to a VIP: test_packets6's case
    elif res.retval == XDP_REDIRECT:
        out = res.data_out
        assert is_icmp6_error(out), data.hex()
        assert icmp6_checksum_ok(out) == icmp6_checksum_ok(data), data.hex()
        o_dst = str(ipaddress.IPv6Address(out[38:54]))
        q = out[62:]
        qsrc, qdst = str(ipaddress.IPv6Address(q[8:24])), str(ipaddress.IPv6Address(q[24:40]))
        backends = {b.ip6 for b in lb.topo.backends}
        if o_dst in backends:                       # about a reply, from the client's side
            assert ingress == lb.topo.lb_client.ifindex and dst in vips and qsrc == o_dst, data.hex()
            assert not (dst == DENY_VIP6 and qdst != CLIENT6), f"about a denied client: {data.hex()}"
            tally["to_backend"] = tally.get("to_backend", 0) + 1
        else:                                       # about a forwarded packet
            assert ingress != lb.topo.lb_client.ifindex and o_dst == qsrc and qdst in vips, data.hex()
            tally["to_client"] = tally.get("to_client", 0) + 1
    elif dst not in vips:
        assert (res.retval == XDP_PASS and res.data_out == data) or \
            (res.retval == XDP_DROP and is_icmp6_error(data)), data.hex()


def test_fuzz6_icmp_errors_keep_the_invariants(lb):
    import os
    import random

    from test_fuzz import mutations

    packets = int(os.environ.get("XDPLB_FUZZ6_PACKETS", "20000"))
    rnd = random.Random(20261203)
    l0 = lb.topo.lb_client.ifindex
    seeds = []
    for proto, sport in (("tcp", 56000), ("udp", 56001)):
        b, reply, back = reply_through(lb, 6, sport, proto)
        out = forward(lb, client_packet(6, sport, proto))         # the same flow, established
        sent = bytes(out[IPv6])
        for n in (48, 88):
            seeds.append((error_to(6, CLIENT_ROUTER[6], l3(back).src, bytes(l3(back))[:n]), l0))
            seeds.append((error_to(6, CLIENT_ROUTER[6], l3(back).src, bytes(l3(back))[:n], "echo"), l0))
            seeds.append((error_to(6, ROUTER[6], CLIENT6, sent[:n], "time", b.iface.mac, b.lb_iface.mac),
                          b.lb_iface.ifindex))
            seeds.append((error_to(6, l3(out).dst, CLIENT6, sent[:n], "port", b.iface.mac, b.lb_iface.mac),
                          b.lb_iface.ifindex))
            seeds.append((error_to(6, ROUTER[6], CLIENT6, sent[:n], "too_big"), l0))      # wrong side
    denied = bytes(IPv6(src=DENY_VIP6, dst=OTHER6) / TCP(sport=80, dport=56002, flags="SA"))
    seeds.append((error_to(6, CLIENT_ROUTER[6], DENY_VIP6, denied[:60]), l0))
    tally: dict = {}
    with lb.lab.inside(lb.topo.lb_ns):
        for seed, ingress in seeds:
            gen = mutations(bytes(seed), rnd)
            for _ in range(max(1, packets // len(seeds))):
                check6(lb, next(gen), ingress, tally)
    print(f"\nfuzz6 icmp errors: {tally}")
    assert tally.get("to_backend") and tally.get("to_client")


@pytest.mark.parametrize("fam", [4, 6])
def test_client_side_error_about_a_flow_without_state(lb, one_cpu, fam):
    """The flood guard forwarded the flow without state: the error goes to
    the backend the forward path picks for it, as the flow's packets do."""
    cfg = lb.edit()
    cfg["flood_guard"] = {"new_flows_per_second": 1, "burst": 1}
    lb.apply(cfg)
    try:
        forward(lb, client_packet(fam, 57000 + fam))          # takes the one token
        stateless = lb.counters("global_stats", lb.dp.consts.CNT_GUARD_STATELESS)[0]
        b, reply, back = reply_through(lb, fam, 57100 + fam)
        assert lb.counters("global_stats", lb.dp.consts.CNT_GUARD_STATELESS)[0] > stateless
        n = (20 if fam == 4 else 40) + 40
        err = error_to(fam, CLIENT_ROUTER[fam], l3(back).src, bytes(l3(back))[:n], "too_big")
        rc, out = lb.run(err, ifname="l0")
        assert rc == XDP_REDIRECT
        assert bytes(out) == expected_error(fam, b.lb_iface.mac, b.iface.mac, CLIENT_ROUTER[fam],
                                            l3(reply).src, "too_big", bytes(l3(reply))[:n])
    finally:
        cfg.pop("flood_guard")
        lb.apply(cfg)
