"""Policy bypass attempts by a denied identity: every one must fail."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.l2 import Dot1Q, Ether

from lbtest import XDP_DROP, XDP_PASS, XDP_REDIRECT, Harness, tcp

WEB = "10.96.0.10"
DENIED = "192.0.2.10"
ALLOWED = "10.1.0.10"
E = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.fixture(scope="module")
def h(lab, bpf_object):
    lab_, topo = lab
    with Harness(lab_, topo, attach=False) as h:
        yield h


ATTEMPTS = {
    "plain": Ether(**E) / IP(src=DENIED, dst=WEB) / TCP(sport=50000, dport=80, flags="S"),
    "first fragment": Ether(**E) / IP(src=DENIED, dst=WEB, flags="MF") / TCP(sport=50001, dport=80),
    "later fragment": Ether(**E) / IP(src=DENIED, dst=WEB, frag=8, proto=6) / (b"\x00" * 40),
    "ip options": Ether(**E) / IP(src=DENIED, dst=WEB, options=[IPOption_RR()]) / TCP(sport=50002, dport=80),
    "vlan tag": Ether(**E) / Dot1Q(vlan=10) / IP(src=DENIED, dst=WEB) / TCP(sport=50003, dport=80),
    "802.1ad tag": Ether(**E, type=0x88a8) / Dot1Q(vlan=10) / IP(src=DENIED, dst=WEB) / TCP(sport=50004, dport=80),
    "other port": Ether(**E) / IP(src=DENIED, dst=WEB) / TCP(sport=50005, dport=443),
    "other protocol": Ether(**E) / IP(src=DENIED, dst=WEB) / UDP(sport=50006, dport=80),
    "tcp flags soup": Ether(**E) / IP(src=DENIED, dst=WEB) / TCP(sport=50007, dport=80, flags="FSRPAUEC"),
}


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_denied_identity_cannot_reach_a_backend(h, name):
    rc, out = h.run(ATTEMPTS[name])
    assert rc == XDP_DROP, name


def test_stacked_vlan_is_not_parsed_and_not_forwarded(h):
    pkt = Ether(**E) / Dot1Q(vlan=10) / Dot1Q(vlan=11) / IP(src=DENIED, dst=WEB) / TCP(sport=50008, dport=80)
    rc, out = h.run(pkt)
    assert rc == XDP_PASS and bytes(out) == bytes(pkt)      # the kernel, not a backend, gets it


def test_spoofed_reply_to_an_existing_nat_flow_is_dropped(h):
    """The denied client forges the backend's reply tuple of an allowed
    client's flow, to have the LB translate it: it arrives on the
    client-facing interface, so it is dropped."""
    _, fwd = h.run(tcp(ALLOWED, 50100, WEB, 80))
    backend = fwd[IP].dst
    forged = Ether(**E) / IP(src=backend, dst=ALLOWED) / TCP(sport=h.topo.backend_port, dport=50100, flags="A")
    before = h.drop_count("spoofed_reply")
    rc, _ = h.run(forged, ifname="l0")
    assert rc == XDP_DROP and h.drop_count("spoofed_reply") == before + 1


def test_spoofing_an_allowed_source_address_is_out_of_scope_but_counted(h):
    """Identity is the source address: a forged allowed source is forwarded.
    This documents the limit (anti-spoofing belongs to the edge's uRPF)."""
    rc, _ = h.run(Ether(**E) / IP(src=ALLOWED, dst=WEB) / TCP(sport=50200, dport=80))
    assert rc == XDP_REDIRECT
