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


# -- forged replies against the stateless path (bpf/xdp/reply.h) ---------------
#
# Over the flood guard's rate a gateway-mode flow is forwarded without state,
# and a reply without state is translated only if picking again for its flow
# lands on the reply's source and it came in by the route to that backend.
# Each case below makes real stateless flows (guard at 1/s, burst 1, on one
# CPU) and forges what an attacker could send instead of their replies.

@pytest.fixture(scope="module")
def sh(lab, bpf_object):
    from lb.demo import lab_config
    from lbtest import pin_dir

    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["flood_guard"] = {"new_flows_per_second": 1, "burst": 1}
    with Harness(lab_, topo, cfg, attach=False) as h:
        yield h


_ports = iter(range(51000, 60000))


def _global(h, name: str) -> int:
    return h.counters("global_stats", getattr(h.dp.consts, name))[0]


def _stateless_flow(h, client: str = ALLOWED):
    """A new flow forwarded without state; (client port, forwarded packet).
    A token saved up meanwhile (one a second) gives a flow state: that one
    is not used."""
    while True:
        port = next(_ports)
        before = _global(h, "CNT_GUARD_STATELESS")
        rc, fwd = h.run(tcp(client, port, WEB, 80))
        assert rc == XDP_REDIRECT
        if _global(h, "CNT_GUARD_STATELESS") == before + 1:
            return port, fwd


def _backend(h, ip: str):
    return next(b for b in h.topo.backends if b.ip == ip)


def _forged(src: str, sport: int, dst: str, dport: int):
    return Ether(**E) / IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags="SA", seq=7)


def _untouched(h, pkt, ifname: str) -> bool:
    rc, out = h.run(pkt, ifname=ifname)
    return rc == XDP_PASS and bytes(out) == bytes(pkt)


def _translated(h, pkt, ifname: str) -> bool:
    rc, out = h.run(pkt, ifname=ifname)
    return rc == XDP_REDIRECT and (out[IP].src, out[TCP].sport) == (WEB, 80)


@pytest.mark.usefixtures("one_cpu")
def test_forged_reply_on_the_wrong_interface_passes_untouched(sh):
    port, fwd = _stateless_flow(sh)
    b = _backend(sh, fwd[IP].dst)
    reply = _forged(b.ip, fwd[TCP].dport, ALLOWED, port)
    other = next(x for x in sh.topo.backends if x is not b)
    assert _untouched(sh, reply, "l0")                       # the client side
    assert _untouched(sh, reply, other.lb_iface.name)        # another backend's side
    assert _translated(sh, reply, b.lb_iface.name)           # the real one is
    assert sh.entries("conntrack") <= 1                      # (the fixture's one token)


@pytest.mark.usefixtures("one_cpu")
def test_forged_reply_from_a_backend_that_is_not_the_pick_passes_untouched(sh):
    port, fwd = _stateless_flow(sh)
    for b in sh.topo.backends:
        if b.ip == fwd[IP].dst:
            continue
        assert _untouched(sh, _forged(b.ip, fwd[TCP].dport, ALLOWED, port), b.lb_iface.name)
    # The backend's address with another port is another backend (not in the index).
    b = _backend(sh, fwd[IP].dst)
    assert _untouched(sh, _forged(b.ip, fwd[TCP].dport + 1, ALLOWED, port), b.lb_iface.name)


@pytest.mark.usefixtures("one_cpu")
def test_reply_after_the_services_table_changed_follows_the_new_pick(lab, bpf_object):
    """web on two backends, then on three: a stateless flow whose pick moved
    now goes to the new backend, and the old backend's replies to it are no
    longer translated; flows whose pick stayed keep theirs."""
    from lb.demo import lab_config
    from lbtest import pin_dir

    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock",
                     web_backends=[f"{b.ip}:{topo.backend_port}" for b in topo.backends[:2]])
    cfg["flood_guard"] = {"new_flows_per_second": 1, "burst": 1}
    with Harness(lab_, topo, cfg, attach=False) as h:
        flows = [_stateless_flow(h) for _ in range(40)]
        d = h.edit()
        d["services"][0]["backends"] = [f"{b.ip}:{topo.backend_port}" for b in topo.backends]
        h.apply(d)
        moved = kept = 0
        for port, fwd in flows:
            old = _backend(h, fwd[IP].dst)
            rc, now = h.run(tcp(ALLOWED, port, WEB, 80, flags="A"))
            assert rc == XDP_REDIRECT
            reply = _forged(old.ip, topo.backend_port, ALLOWED, port)
            if now[IP].dst == old.ip:
                kept += 1
                assert _translated(h, reply, old.lb_iface.name)
            else:
                moved += 1
                assert _untouched(h, reply, old.lb_iface.name)
                new = _backend(h, now[IP].dst)
                assert _translated(h, _forged(new.ip, topo.backend_port, ALLOWED, port), new.lb_iface.name)
        assert moved and kept            # Maglev moves about a third, keeps the rest


@pytest.mark.usefixtures("one_cpu")
def test_random_forged_replies_are_translated_only_where_the_forward_path_would_go(sh):
    """Random clients (allowed, denied, unknown) and ports, and random
    sources: a reply from a backend, on its interface, is recognised exactly
    when that client's packet on that port is forwarded to that backend;
    anything from an address that is no backend passes untouched."""
    import random

    rng = random.Random(13)
    nets = ("10.1.0.", "192.0.2.", "203.0.113.")
    recognised = untouched = 0
    before = _global(sh, "CNT_REPLY_STATELESS")
    for _ in range(150):
        client = nets[rng.randrange(3)] + str(rng.randrange(2, 250))
        port = rng.randrange(1024, 65536)
        rc, fwd = sh.run(tcp(client, port, WEB, 80, flags="A"))
        went = fwd[IP].dst if rc == XDP_REDIRECT else None
        b = sh.topo.backends[rng.randrange(len(sh.topo.backends))]
        reply = _forged(b.ip, sh.topo.backend_port, client, port)
        # Recognised: translated, then sent on or dropped for an unresolved
        # client neighbour (these clients do not exist), never passed.
        rc, out = sh.run(reply, ifname=b.lb_iface.name)
        if went == b.ip:
            assert rc != XDP_PASS, (client, port)
            recognised += 1
        else:
            assert rc == XDP_PASS and bytes(out) == bytes(reply), (client, port, went, b.ip)
            untouched += 1
        stranger = f"10.244.{rng.randrange(1, 4)}.{rng.randrange(3, 250)}"
        assert _untouched(sh, _forged(stranger, sh.topo.backend_port, client, port), b.lb_iface.name)
    assert recognised > 10 and untouched > 10        # exercised both ways
    # Nearly all through the stateless path (a token a second gives a flow state).
    assert _global(sh, "CNT_REPLY_STATELESS") - before >= recognised - 10
