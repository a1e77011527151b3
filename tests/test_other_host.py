"""Unicast frames addressed to another MAC (a switch flooding unknown
unicast, a promiscuous bridge) are passed untouched and counted, never
forwarded: the host they were sent to forwards them (bpf/xdp/dmac.h).

By test-run, with the ingress interface's MAC recorded as attach records
it, and end to end: raw frames from the client into the attached LB."""

from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from lbtest import XDP_PASS, XDP_REDIRECT, Harness, tcp

VIP, UDP_VIP, CLIENT = "10.96.0.10", "10.96.0.53", "10.1.0.10"
OTHER_MAC = "02:00:00:00:aa:bb"          # unicast, not the LB's


def other_host_count(h: Harness) -> int:
    return h.counters("global_stats", h.dp.consts.CNT_OTHER_HOST)[0]


@pytest.fixture(scope="module")
def lb(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, attach=False) as h:
        yield h


def test_without_a_recorded_mac_nothing_changes(lb):
    """Test-run's ingress has no if_macs entry until one is written: a frame
    to any MAC is forwarded as it always was."""
    rc, _ = lb.run(tcp(CLIENT, 43000, VIP, 80, dmac=OTHER_MAC))
    assert rc == XDP_REDIRECT


@pytest.mark.parametrize("dmac, forwarded", [
    ("own", True),
    (OTHER_MAC, False),
    ("02:00:00:00:00:02", False),        # the MAC the other packet tests use
    ("ff:ff:ff:ff:ff:ff", True),         # broadcast and multicast: as before
    ("01:00:5e:00:00:01", True),
    ("33:33:00:00:00:01", True),
])
def test_a_recorded_mac_passes_frames_for_another(lb, dmac, forwarded):
    l0 = lb.topo.lb_client
    with lb.lab.inside(lb.topo.lb_ns):
        lb.dp.record_mac(l0.ifindex)
    try:
        assert bytes(lb.dp.maps["if_macs"].lookup(l0.ifindex).addr) == bytes.fromhex(l0.mac.replace(":", ""))
        dmac = l0.mac if dmac == "own" else dmac
        pkt = tcp(CLIENT, 43100 + hash(dmac) % 800, VIP, 80, dmac=dmac)
        before, ct = other_host_count(lb), lb.entries("conntrack")
        rc, out = lb.run(pkt)
        if forwarded:
            assert rc == XDP_REDIRECT and other_host_count(lb) == before
        else:
            assert rc == XDP_PASS and bytes(out) == bytes(pkt)       # untouched
            assert other_host_count(lb) == before + 1
            assert lb.entries("conntrack") == ct                     # no state either
    finally:
        lb.dp.maps["if_macs"].delete(l0.ifindex)


def test_attached_lb_does_not_forward_frames_for_another_mac(lab, bpf_object):
    """The real attach records l0's MAC; raw frames from the client reach
    the LB's native XDP on l0. One for another MAC is not answered (and
    counted), the same one for the LB's MAC is answered by a backend."""
    lab_, topo = lab
    with Harness(lab_, topo) as h:
        svc = next(s for s in h.rec.services.values() if s.name == "echo")

        def ask(dmac: str, sport: int) -> bytes | None:
            frame = Ether(src=topo.client.mac, dst=dmac) / IP(src=CLIENT, dst=UDP_VIP, ttl=64) / \
                UDP(sport=sport, dport=53) / b"hello"
            with lab_.inside(topo.client_ns), \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                    socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as tx:
                rx.bind((CLIENT, sport))
                rx.settimeout(1.0)
                tx.bind(("c0", 0))
                tx.send(bytes(frame))
                try:
                    return rx.recv(200)
                except TimeoutError:
                    return None

        before, svc_before = other_host_count(h), h.counters("svc_stats", svc.svc_id)[0]
        assert ask(OTHER_MAC, 44001) is None
        time.sleep(0.2)
        assert other_host_count(h) == before + 1
        assert h.counters("svc_stats", svc.svc_id)[0] == svc_before
        answer = ask(topo.lb_client.mac, 44002)
        assert answer and answer.startswith(b"backend=b"), answer
        assert h.counters("svc_stats", svc.svc_id)[0] == svc_before + 1
