"""A service without active backends: new flows are dropped (`no_backend`)
and answered with ICMP port unreachable from the VIP (bpf/xdp/reject.h),
as kube-proxy's REJECT does, within a per-CPU budget."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Dot1Q, Ether

from lb.demo import UDP_VIP, WEB_VIP, lab_config
from lbtest import XDP_DROP, XDP_REDIRECT, Harness, assert_checksums_valid, pin_dir, tcp, udp

CLIENT = "10.1.0.10"


pytestmark = pytest.mark.usefixtures("one_cpu")   # rejects are budgeted per CPU


def _empty(lab, per_second: int = 1000, burst: int = 100, attach: bool = False) -> Harness:
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    for svc in cfg["services"]:
        svc["backends"] = []
    cfg["no_backend_reject"] = {"icmp_per_second": per_second, "burst": burst}
    return Harness(lab_, topo, cfg, attach=attach)


def test_tcp_syn_gets_port_unreachable_from_the_vip(lab, bpf_object):
    with _empty(lab) as h:
        syn = tcp(CLIENT, 47000, WEB_VIP, 80)
        rc, out = h.run(syn)
        assert rc == XDP_REDIRECT
        assert (out[Ether].dst, out[Ether].src) == (syn[Ether].src, syn[Ether].dst)
        assert (out[IP].src, out[IP].dst, out[IP].proto, out[IP].len) == (WEB_VIP, CLIENT, 1, 56)
        assert (out[ICMP].type, out[ICMP].code) == (3, 3)
        quoted = out[IPerror]
        assert (quoted.src, quoted.dst, quoted[TCPerror].sport, quoted[TCPerror].dport) == \
            (CLIENT, WEB_VIP, 47000, 80)
        assert len(bytes(out)) == 14 + 20 + 8 + 28
        assert_checksums_valid(out)
        assert h.drop_count("no_backend") == 1
        assert h.counters("global_stats", h.dp.consts.CNT_REJECTS)[0] == 1


def test_udp_with_a_long_payload_is_quoted_and_cut(lab, bpf_object):
    with _empty(lab) as h:
        rc, out = h.run(udp(CLIENT, 5353, UDP_VIP, 53, payload=b"q" * 900))
        assert rc == XDP_REDIRECT and len(bytes(out)) == 70
        assert out[IPerror].len == 20 + 8 + 900                  # the original's header, as sent
        assert (out[UDPerror].sport, out[UDPerror].dport) == (5353, 53)
        assert_checksums_valid(out)


def test_budget_spent_means_silent_drop(lab, bpf_object):
    with _empty(lab, per_second=1, burst=3) as h:
        verdicts = [h.run(tcp(CLIENT, 47100 + i, WEB_VIP, 80))[0] for i in range(10)]
        assert verdicts == [XDP_REDIRECT] * 3 + [XDP_DROP] * 7
        assert h.drop_count("no_backend") == 10


def test_rejects_off_and_vlan_tagged_frames_are_only_dropped(lab, bpf_object):
    with _empty(lab, per_second=0) as h:
        assert h.run(tcp(CLIENT, 47200, WEB_VIP, 80))[0] == XDP_DROP
    with _empty(lab) as h:
        tagged = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=7) / \
            IP(src=CLIENT, dst=WEB_VIP) / TCP(sport=47300, dport=80, flags="S")
        assert h.run(tagged)[0] == XDP_DROP
        assert h.counters("global_stats", h.dp.consts.CNT_REJECTS)[0] == 0


def test_denied_source_gets_no_reject(lab, bpf_object):
    """Policy comes first: a denied identity learns nothing about backends."""
    with _empty(lab) as h:
        rc, _ = h.run(tcp("192.0.2.10", 47400, WEB_VIP, 80))
        assert rc == XDP_DROP and h.drop_count("policy") == 1
        assert h.counters("global_stats", h.dp.consts.CNT_REJECTS)[0] == 0


def test_curl_is_refused_at_once(lab, bpf_object):
    """A real client: connection refused, not a timeout."""
    lab_, topo = lab
    with _empty(lab, attach=True):
        t0 = time.monotonic()
        r = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "5", f"http://{WEB_VIP}/"],
                     check=False)
        took = time.monotonic() - t0
        assert r.returncode == 7, (r.returncode, r.stderr)      # CURLE_COULDNT_CONNECT: refused
        assert took < 2.0, took                                  # not a SYN retry timeout
