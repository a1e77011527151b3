"""The flood guard (bpf/xdp/guard.h), packet by packet through BPF test-run:
a per-CPU token bucket bounds how many conntrack misses may write state;
over it, gateway-mode flows are forwarded without state and their replies
are recognised by picking again (bpf/xdp/reply.h).

The bucket is per CPU and test-run runs on the calling CPU, so each test
pins itself to one CPU: the counts below are exact."""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP

from lb.dataplane import htons
from lb.demo import UDP_VIP, WEB_VIP as WEB, filler_vip, lab_config
from lbtest import XDP_DROP, XDP_PASS, XDP_REDIRECT, Harness, assert_checksums_valid, pin_dir, tcp, udp

CLIENT = "10.1.0.10"

pytestmark = pytest.mark.usefixtures("one_cpu")


def _harness(lab, rate: int, burst: int, fillers: int = 0, **kw) -> Harness:
    lab_, topo = lab
    cfg = lab_config(topo, fillers=fillers, bpffs=pin_dir(), socket="/run/xdplb/unused.sock", **kw)
    cfg["flood_guard"] = {"new_flows_per_second": rate, "burst": burst}
    return Harness(lab_, topo, cfg, attach=False)


def _global(h: Harness, name: str) -> int:
    return h.counters("global_stats", getattr(h.dp.consts, name))[0]


def _state(h: Harness) -> tuple[int, int, int]:
    return h.entries("conntrack"), h.entries("rev_nat"), h.entries("affinity")


def _reply(h: Harness, fwd, client_port: int, ifname: str | None = None):
    """The backend's answer to the forwarded packet `fwd`, as it arrives
    from that backend (or on `ifname`)."""
    b = next(b for b in h.topo.backends if b.ip == fwd[IP].dst)
    l4 = TCP if TCP in fwd else UDP
    pkt = tcp(b.ip, fwd[TCP].dport, CLIENT, client_port, flags="SA") if l4 is TCP else \
        udp(b.ip, fwd[UDP].dport, CLIENT, client_port, payload=b"answer")
    return h.run(pkt, ifname=ifname or b.lb_iface.name)


def test_new_flows_over_the_burst_are_forwarded_without_state(lab, bpf_object):
    with _harness(lab, rate=1, burst=5) as h:
        sent = [h.run(tcp(CLIENT, 40000 + i, WEB, 80)) for i in range(20)]
        assert [rc for rc, _ in sent] == [XDP_REDIRECT] * 20
        assert h.drop_count("new_flow_rate") == 0
        assert _state(h) == (5, 0, 0)                    # gateway mode: conntrack only
        assert _global(h, "CNT_CT_NEW") == 5 and _global(h, "CNT_GUARD_STATELESS") == 15
        # Each stateless flow's next packets go where its first went.
        for i, (_, out) in enumerate(sent[5:], start=5):
            rc, again = h.run(tcp(CLIENT, 40000 + i, WEB, 80, flags="A"))
            assert rc == XDP_REDIRECT and (again[IP].dst, again[TCP].dport) == (out[IP].dst, out[TCP].dport)
            assert_checksums_valid(again)
        assert _state(h) == (5, 0, 0) and _global(h, "CNT_GUARD_STATELESS") == 30
        # Spread like stateful flows: the 15 stateless ones reach more than one backend.
        assert len({out[IP].dst for _, out in sent[5:]}) > 1


def test_replies_of_stateless_flows_are_translated_back(lab, bpf_object):
    with _harness(lab, rate=1, burst=1) as h:
        assert h.run(tcp(CLIENT, 41000, WEB, 80))[0] == XDP_REDIRECT      # the one token
        state = _state(h)
        for port in range(41001, 41021):
            rc, fwd = h.run(tcp(CLIENT, port, WEB, 80))
            assert rc == XDP_REDIRECT
            rc, out = _reply(h, fwd, port)
            assert rc == XDP_REDIRECT, port
            assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (WEB, 80, CLIENT, port)
            assert_checksums_valid(out)
        assert _state(h) == state                        # the replies wrote nothing either
        assert _global(h, "CNT_REPLY_STATELESS") == 20 and _global(h, "CNT_GUARD_STATELESS") == 20


def test_udp_over_the_rate_is_forwarded_and_answered(lab, bpf_object):
    with _harness(lab, rate=1, burst=1) as h:
        assert h.run(udp(CLIENT, 43000, UDP_VIP, 53))[0] == XDP_REDIRECT
        rc, fwd = h.run(udp(CLIENT, 43001, UDP_VIP, 53))
        assert rc == XDP_REDIRECT and _global(h, "CNT_GUARD_STATELESS") == 1
        assert h.entries("conntrack") == 1
        rc, out = _reply(h, fwd, 43001)
        assert rc == XDP_REDIRECT
        assert (out[IP].src, out[UDP].sport, out[IP].dst, out[UDP].dport) == (UDP_VIP, 53, CLIENT, 43001)
        assert bytes(out[UDP].payload) == b"answer"
        assert_checksums_valid(out)
        assert h.drop_count("new_flow_rate") == 0


def test_established_flows_keep_their_state_while_the_bucket_is_empty(lab, bpf_object):
    with _harness(lab, rate=1, burst=2) as h:
        first = {}
        for sport in (41500, 41501):
            rc, out = h.run(tcp(CLIENT, sport, WEB, 80))
            assert rc == XDP_REDIRECT
            first[sport] = out[IP].dst
        assert h.run(tcp(CLIENT, 41502, WEB, 80))[0] == XDP_REDIRECT      # bucket empty: stateless
        for _ in range(50):
            for sport, dst in first.items():
                rc, out = h.run(tcp(CLIENT, sport, WEB, 80, flags="A"))
                assert rc == XDP_REDIRECT and out[IP].dst == dst
        assert _global(h, "CNT_CT_HIT") == 100 and _global(h, "CNT_GUARD_STATELESS") == 1
        assert h.entries("conntrack") == 2


def test_tcp_that_lost_its_state_keeps_its_backend_and_its_replies(lab, bpf_object):
    """An entry evicted (here: deleted) under a flood: the flow's next
    packets go where Maglev says, which is where they went, its replies are
    translated by picking again, and no state is written while the bucket
    is empty."""
    with _harness(lab, rate=1, burst=1) as h:
        rc, out = h.run(tcp(CLIENT, 42000, WEB, 80))
        assert rc == XDP_REDIRECT
        backend = (out[IP].dst, out[TCP].dport)
        key, _ = h.dp.maps["conntrack"].lookup_batch()[0]
        h.dp.maps["conntrack"].delete(key)
        assert _state(h) == (0, 0, 0)
        for _ in range(10):
            rc, out = h.run(tcp(CLIENT, 42000, WEB, 80, flags="A"))
            assert rc == XDP_REDIRECT and (out[IP].dst, out[TCP].dport) == backend
            rc, back = _reply(h, out, 42000)
            assert rc == XDP_REDIRECT and (back[IP].src, back[TCP].sport) == (WEB, 80)
        assert _global(h, "CNT_GUARD_STATELESS") == 10 and _global(h, "CNT_REPLY_STATELESS") == 10
        assert _state(h) == (0, 0, 0) and h.drop_count("new_flow_rate") == 0


def test_snat_mode_drops_every_stateless_candidate(lab, bpf_object):
    """With SNAT a packet cannot go out without a port from the table, and
    its reply names that port, not the client: over the rate, new flows and
    mid-flow TCP without state are dropped."""
    with _harness(lab, rate=1, burst=1, snat=True) as h:
        assert h.run(tcp(CLIENT, 44000, WEB, 80))[0] == XDP_REDIRECT
        assert h.run(tcp(CLIENT, 44001, WEB, 80))[0] == XDP_DROP
        assert h.run(tcp(CLIENT, 44002, WEB, 80, flags="A"))[0] == XDP_DROP
        assert h.run(udp(CLIENT, 44003, UDP_VIP, 53))[0] == XDP_DROP
        assert h.drop_count("new_flow_rate") == 3 and _global(h, "CNT_GUARD_STATELESS") == 0


def test_a_service_whose_replies_need_reverse_nat_drops_over_the_rate(lab, bpf_object):
    """filler-21 is past its backend's reply index slots (SVC_F_REV_NAT): a
    reply cannot name it, so a flow of it cannot go without state."""
    with _harness(lab, rate=1, burst=1, fillers=24) as h:
        vip = filler_vip(21)
        assert h.run(tcp(CLIENT, 44100, vip, 80))[0] == XDP_REDIRECT
        assert h.entries("rev_nat") == 1
        assert h.run(tcp(CLIENT, 44101, vip, 80))[0] == XDP_DROP
        assert h.drop_count("new_flow_rate") == 1
        # web, listed in the same backends' index entries, still goes stateless.
        assert h.run(tcp(CLIENT, 44102, WEB, 80))[0] == XDP_REDIRECT
        assert _global(h, "CNT_GUARD_STATELESS") == 1


def test_a_reply_two_services_would_pick_passes_untouched(lab, bpf_object):
    """filler-0 has one backend, b1, which web (three backends) shares. A
    reply from b1 to a client port for which web would pick b1 too cannot be
    told apart from a reply of web's flow: it passes untranslated rather
    than risk the wrong VIP. The other ports' replies are filler-0's."""
    with _harness(lab, rate=1, burst=1, fillers=3) as h:
        vip, b1 = filler_vip(0), h.topo.backends[0]
        assert h.run(tcp(CLIENT, 44200, vip, 80))[0] == XDP_REDIRECT     # the one token
        ambiguous = clear = 0
        for port in range(44201, 44261):
            before = _global(h, "CNT_GUARD_STATELESS")
            rc, fwd = h.run(tcp(CLIENT, port, vip, 80))
            assert rc == XDP_REDIRECT and fwd[IP].dst == b1.ip
            web_pick = h.run(tcp(CLIENT, port, WEB, 80))[1][IP].dst
            if _global(h, "CNT_GUARD_STATELESS") != before + 2:
                continue        # a token saved up meanwhile (one a second) gave one state
            reply = tcp(b1.ip, h.topo.backend_port, CLIENT, port, flags="SA")
            rc, out = h.run(reply, ifname=b1.lb_iface.name)
            if web_pick == b1.ip:
                ambiguous += 1
                assert rc == XDP_PASS and bytes(out) == bytes(reply)
            else:
                clear += 1
                assert rc == XDP_REDIRECT and (out[IP].src, out[TCP].sport) == (vip, 80)
        assert ambiguous and clear and _global(h, "CNT_REPLY_STATELESS") == clear


def test_affinity_is_read_not_written_over_the_rate(lab, bpf_object):
    """A client bound to a backend keeps it for its stateless flows (the
    binding is read, never refreshed or written over the rate), and their
    replies are recognised: the reply side picks the same way."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["services"][0]["client_affinity_s"] = 600
    cfg["flood_guard"] = {"new_flows_per_second": 1, "burst": 1}
    with Harness(lab_, topo, cfg, attach=False) as h:
        rc, out = h.run(tcp(CLIENT, 45000, WEB, 80))
        assert rc == XDP_REDIRECT
        bound = out[IP].dst
        binding = h.dp.maps["affinity"].lookup_batch()
        for port in range(45001, 45031):
            rc, fwd = h.run(tcp(CLIENT, port, WEB, 80))
            assert rc == XDP_REDIRECT and fwd[IP].dst == bound
            rc, back = _reply(h, fwd, port)
            assert rc == XDP_REDIRECT and (back[IP].src, back[TCP].sport) == (WEB, 80)
        assert _global(h, "CNT_GUARD_STATELESS") == 30
        assert h.dp.maps["affinity"].lookup_batch() == binding           # not even refreshed
        assert h.entries("conntrack") == 1


def test_bucket_refills_with_time_up_to_the_burst(lab, bpf_object):
    with _harness(lab, rate=10, burst=2) as h:           # one token per 100 ms
        sport = iter(range(45500, 46000))

        def three() -> tuple[int, int]:
            before = _global(h, "CNT_CT_NEW"), _global(h, "CNT_GUARD_STATELESS")
            assert [h.run(tcp(CLIENT, next(sport), WEB, 80))[0] for _ in range(3)] == [XDP_REDIRECT] * 3
            return _global(h, "CNT_CT_NEW") - before[0], _global(h, "CNT_GUARD_STATELESS") - before[1]

        assert three() == (2, 1)
        time.sleep(0.5)                                  # 5 tokens' worth, capped at 2
        assert three() == (2, 1)


def test_guard_off_writes_state_for_every_new_flow_and_picks_no_reply(lab, bpf_object):
    """Without the guard no flow goes stateless, so a reply without state
    is not recognised by picking: it passes untouched, as before the guard."""
    with _harness(lab, rate=0, burst=1) as h:
        for i in range(300):
            assert h.run(tcp(CLIENT, 47000 + i, WEB, 80))[0] == XDP_REDIRECT
        assert h.entries("conntrack") == 300 and h.drop_count("new_flow_rate") == 0
        rc, fwd = h.run(tcp(CLIENT, 47000, WEB, 80, flags="A"))
        key = next(k for k, _ in h.dp.maps["conntrack"].lookup_batch() if k.sport == htons(47000))
        h.dp.maps["conntrack"].delete(key)
        rc, out = _reply(h, fwd, 47000)
        assert rc == XDP_PASS and out[IP].src == fwd[IP].dst
        assert _global(h, "CNT_REPLY_STATELESS") == 0


def test_the_flow_command_explains_without_taking_tokens(lab, bpf_object):
    """The dry-run copy ignores the guard: `xdplb flow` explains where a
    flow would go, and asking must not spend the live program's budget."""
    from lb.dataplane import Dataplane
    from lb.flow import probe

    lab_, topo = lab
    with _harness(lab, rate=1, burst=1) as h:
        dry = Dataplane.open(h.cfg, dry_run=True, share_with=h.dp)
        try:
            with lab_.inside(topo.lb_ns):
                for i in range(5):
                    res = probe(dry, h.rec, CLIENT, 48000 + i, WEB, 80, "tcp", h.ifindexes[0])
                    assert res["verdict"] == "FORWARDED", res
        finally:
            dry.close()
        assert h.run(tcp(CLIENT, 48100, WEB, 80))[0] == XDP_REDIRECT
        assert _global(h, "CNT_CT_NEW") == 1


def test_real_connections_over_the_rate_are_served_without_state(lab, bpf_object):
    """On the veths with XDP attached: a real client opens far more
    connections than the guard lets write state, and sends UDP from as many
    new ports. Every one is answered by a backend (the answers come back
    through the stateless reply path), and conntrack holds only what the
    guard allowed."""
    import sys

    from lb.demo import curl_many

    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["flood_guard"] = {"new_flows_per_second": 1, "burst": 2}
    with Harness(lab_, topo, cfg) as h:
        t0 = time.monotonic()
        answers = curl_many(lab_, topo, f"http://{WEB}/", 40, topo.client_ip)
        code = (f"import socket\nn = 0\nfor i in range(40):\n"
                f"    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
                f"    s.sendto(b'hi', ('{UDP_VIP}', 53))\n"
                f"    n += s.recvfrom(200)[0].startswith(b'backend=')\n    s.close()\nprint(n)")
        udp_answers = int(lab_.run(topo.client_ns, [sys.executable, "-c", code], timeout=120).stdout)
        elapsed = time.monotonic() - t0
        assert len(answers) == 40 and len(set(answers)) > 1
        assert udp_answers == 40
        assert h.drop_count("new_flow_rate") == 0
        # The clients run on this test's CPU, but a packet the kernel sends
        # from a softirq (an ACK) may leave from any: a bucket per CPU.
        budget = os.cpu_count() * (2 + elapsed + 1)
        assert h.entries("conntrack") <= budget
        assert _global(h, "CNT_GUARD_STATELESS") >= 80 - budget
        assert _global(h, "CNT_REPLY_STATELESS") >= 40      # at least a SYN-ACK per TCP flow
