"""The flood guard (bpf/xdp/guard.h), packet by packet through BPF test-run:
a per-CPU token bucket bounds how many conntrack misses may write state.

The bucket is per CPU and test-run runs on the calling CPU, so each test
pins itself to one CPU: the counts below are exact."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP

from lb.demo import UDP_VIP, WEB_VIP as WEB, lab_config
from lbtest import XDP_DROP, XDP_REDIRECT, Harness, pin_dir, tcp, udp



pytestmark = pytest.mark.usefixtures("one_cpu")


def _harness(lab, rate: int, burst: int, **kw) -> Harness:
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock", **kw)
    cfg["flood_guard"] = {"new_flows_per_second": rate, "burst": burst}
    return Harness(lab_, topo, cfg, attach=False)


def _global(h: Harness, name: str) -> int:
    return h.counters("global_stats", getattr(h.dp.consts, name))[0]


def test_syns_over_the_burst_are_dropped_and_write_no_state(lab, bpf_object):
    with _harness(lab, rate=1, burst=5) as h:
        verdicts = [h.run(tcp("10.1.0.10", 40000 + i, WEB, 80))[0] for i in range(20)]
        assert verdicts == [XDP_REDIRECT] * 5 + [XDP_DROP] * 15
        assert h.drop_count("new_flow_rate") == 15
        assert h.entries("conntrack") == 5 and h.entries("rev_nat") == 0   # gateway mode
        assert _global(h, "CNT_CT_NEW") == 5


def test_established_flows_pass_while_the_bucket_is_empty(lab, bpf_object):
    with _harness(lab, rate=1, burst=2) as h:
        first = {}
        for sport in (41000, 41001):
            rc, out = h.run(tcp("10.1.0.10", sport, WEB, 80))
            assert rc == XDP_REDIRECT
            first[sport] = out[IP].dst
        assert h.run(tcp("10.1.0.10", 41002, WEB, 80))[0] == XDP_DROP     # bucket empty
        for _ in range(50):
            for sport, dst in first.items():
                rc, out = h.run(tcp("10.1.0.10", sport, WEB, 80, flags="A"))
                assert rc == XDP_REDIRECT and out[IP].dst == dst
        assert _global(h, "CNT_CT_HIT") == 100 and _global(h, "CNT_GUARD_STATELESS") == 0


def test_tcp_that_lost_its_state_keeps_its_backend_and_writes_nothing(lab, bpf_object):
    """An entry evicted (here: deleted) under a flood: the flow's next
    packets go where Maglev says, which is where they went, and no state is
    written while the bucket is empty."""
    with _harness(lab, rate=1, burst=1) as h:
        rc, out = h.run(tcp("10.1.0.10", 42000, WEB, 80))
        assert rc == XDP_REDIRECT
        backend = (out[IP].dst, out[TCP].dport)
        key, _ = h.dp.maps["conntrack"].lookup_batch()[0]
        h.dp.maps["conntrack"].delete(key)
        assert h.entries("conntrack") == 0 and h.entries("rev_nat") == 0
        for _ in range(10):
            rc, out = h.run(tcp("10.1.0.10", 42000, WEB, 80, flags="A"))
            assert rc == XDP_REDIRECT and (out[IP].dst, out[TCP].dport) == backend
        assert _global(h, "CNT_GUARD_STATELESS") == 10
        assert h.entries("conntrack") == 0 and h.entries("rev_nat") == 0
        assert h.drop_count("new_flow_rate") == 0


def test_udp_over_the_rate_is_dropped(lab, bpf_object):
    with _harness(lab, rate=1, burst=1) as h:
        assert h.run(udp("10.1.0.10", 43000, UDP_VIP, 53))[0] == XDP_REDIRECT
        assert h.run(udp("10.1.0.10", 43001, UDP_VIP, 53))[0] == XDP_DROP
        assert h.run(udp("10.1.0.10", 43000, UDP_VIP, 53))[0] == XDP_REDIRECT  # has state
        assert h.drop_count("new_flow_rate") == 1


def test_snat_mode_drops_every_stateless_candidate(lab, bpf_object):
    """With SNAT a packet cannot go out without a port from the table, so
    even a mid-flow TCP packet over the rate is dropped."""
    with _harness(lab, rate=1, burst=1, snat=True) as h:
        assert h.run(tcp("10.1.0.10", 44000, WEB, 80))[0] == XDP_REDIRECT
        assert h.run(tcp("10.1.0.10", 44001, WEB, 80, flags="A"))[0] == XDP_DROP
        assert h.drop_count("new_flow_rate") == 1 and _global(h, "CNT_GUARD_STATELESS") == 0


def test_bucket_refills_with_time_up_to_the_burst(lab, bpf_object):
    with _harness(lab, rate=100, burst=2) as h:          # one token per 10 ms
        sport = iter(range(45000, 46000))
        assert [h.run(tcp("10.1.0.10", next(sport), WEB, 80))[0] for _ in range(3)] == \
            [XDP_REDIRECT, XDP_REDIRECT, XDP_DROP]
        time.sleep(0.2)                                  # 20 tokens' worth, capped at 2
        assert [h.run(tcp("10.1.0.10", next(sport), WEB, 80))[0] for _ in range(3)] == \
            [XDP_REDIRECT, XDP_REDIRECT, XDP_DROP]


def test_guard_off_writes_state_for_every_new_flow(lab, bpf_object):
    with _harness(lab, rate=0, burst=1) as h:
        for i in range(300):
            assert h.run(tcp("10.1.0.10", 47000 + i, WEB, 80))[0] == XDP_REDIRECT
        assert h.entries("conntrack") == 300 and h.drop_count("new_flow_rate") == 0


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
                    res = probe(dry, h.rec, "10.1.0.10", 48000 + i, WEB, 80, "tcp", h.ifindexes[0])
                    assert res["verdict"] == "FORWARDED", res
        finally:
            dry.close()
        assert h.run(tcp("10.1.0.10", 48100, WEB, 80))[0] == XDP_REDIRECT
