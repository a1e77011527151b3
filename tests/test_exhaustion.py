"""What happens when a table is full, and that it shows."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from lb.demo import lab_config
from lb.reconcile import CapacityError
from lbtest import XDP_DROP, XDP_REDIRECT, Harness, dump_maps, pin_dir, tcp

WEB = "10.96.0.10"


def test_snat_ports_exhausted_drop_counted_and_existing_flows_unaffected(lab, bpf_object):
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock", snat=True)
    cfg["snat_ports"] = {"min": 20000, "max": 20001}          # two ports per backend
    cfg["services"][0]["backends"] = [f"{topo.backends[0].ip}:{topo.backend_port}"]
    with Harness(lab_, topo, cfg, attach=False) as h:
        ports = set()
        for sport in (30001, 30002):
            rc, out = h.run(tcp("10.1.0.10", sport, WEB, 80))
            assert rc == XDP_REDIRECT
            ports.add(out[TCP].sport)
        assert ports == {20000, 20001}
        before = h.drop_count("nat_exhausted")
        rc, _ = h.run(tcp("10.1.0.10", 30003, WEB, 80))
        assert rc == XDP_DROP and h.drop_count("nat_exhausted") == before + 1
        # The flows that hold the ports keep working.
        rc, out = h.run(tcp("10.1.0.10", 30001, WEB, 80, flags="A"))
        assert rc == XDP_REDIRECT and out[TCP].sport in ports


def test_conntrack_full_evicts_least_recently_used(lab, bpf_object):
    """The conntrack is an LRU: when full, the oldest flows lose their entry
    (and fall back to Maglev, which picks the same backend while the
    backend set is unchanged); new flows are never refused."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["limits"] = {"conntrack": 512, "nat": 512}
    with Harness(lab_, topo, cfg, attach=False) as h:
        first = {}
        for sport in range(31000, 31000 + 3000):
            rc, out = h.run(tcp("10.1.0.10", sport, WEB, 80))
            assert rc == XDP_REDIRECT
            if sport < 31010:
                first[sport] = out[IP].dst
        entries = h.entries("conntrack")
        assert entries <= 512 + 2 * 64           # LRU lists are per CPU: a little slack
        assert h.drop_count("ct_full") == 0
        for sport, dst in first.items():          # evicted, same backend again via Maglev
            _, out = h.run(tcp("10.1.0.10", sport, WEB, 80, flags="A"))
            assert out[IP].dst == dst


def test_full_maglev_pool_rejects_and_keeps_maps(lab, bpf_object):
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["limits"] = {"maglev_slots": 2048}
    with Harness(lab_, topo, cfg, attach=False) as h:
        more = h.edit()
        for i in range(20):
            more["services"].append({"name": f"x{i}", "vip": f"10.99.0.{i + 1}", "port": 80,
                                     "protocol": "tcp", "backends": ["10.244.1.2:8080"]})
        before = dump_maps(h.dp.maps)
        with pytest.raises(CapacityError) as e:
            h.apply(more)
        assert "Maglev pool full" in str(e.value) and "x" in str(e.value)
        assert dump_maps(h.dp.maps) == before
