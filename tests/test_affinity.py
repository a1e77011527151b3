"""Client-IP affinity (bpf/xdp/affinity.h), packet by packet through BPF
test-run. The clock is bpf_ktime_get_ns() (CLOCK_MONOTONIC), so the tests
age entries by writing `last_ns` from time.monotonic_ns() instead of
sleeping."""

from __future__ import annotations

import time
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP

from lb.config import ConfigError, config_from_dict
from lb.dataplane import addr_word
from lb.demo import WEB_VIP, lab_config
from lbtest import XDP_REDIRECT, Harness, pin_dir, tcp

CLIENT = "10.1.0.10"


def _harness(lab, affinity_s: int | None) -> Harness:
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    if affinity_s:
        cfg["services"][0]["client_affinity_s"] = affinity_s
    return Harness(lab_, topo, cfg, attach=False)


def _backend(h: Harness, sport: int, flags: str = "S") -> str:
    rc, out = h.run(tcp(CLIENT, sport, WEB_VIP, 80, flags=flags))
    assert rc == XDP_REDIRECT
    return out[IP].dst


def _entry(h: Harness):
    m = h.dp.maps["affinity"]
    items = m.lookup_batch()
    assert len(items) == 1
    return m, items[0]


def _backend_ids(h: Harness) -> dict[str, int]:
    live = next(s for s in h.rec.services.values() if s.name == "web")
    return {str(b.address): b.id for b in live.backends.values()}


def test_without_affinity_one_client_spreads(lab, bpf_object):
    with _harness(lab, None) as h:
        assert len({_backend(h, 50000 + i) for i in range(30)}) >= 2
        assert not h.dp.maps["affinity"].lookup_batch()


def test_one_client_sticks_and_clients_spread(lab, bpf_object):
    with _harness(lab, 60) as h:
        assert len({_backend(h, 50000 + i) for i in range(30)}) == 1
        seen = set()
        for i in range(30):
            rc, out = h.run(tcp(f"10.1.0.{20 + i}", 50000, WEB_VIP, 80))
            assert rc == XDP_REDIRECT
            seen.add(out[IP].dst)
        assert len(seen) >= 2
        assert h.entries("affinity") == 31


def test_entry_points_where_told_until_it_expires(lab, bpf_object):
    with _harness(lab, 10) as h:
        first = _backend(h, 51000)
        other = next(b for b in _live_web(h).backends.values() if str(b.address) != first)
        m, (key, val) = _entry(h)
        val.backend_id, val.backend_gen = other.id, other.gen
        val.last_ns = time.monotonic_ns() - 9 * 10**9            # 9 s old of 10: still valid
        m.update(key, val)
        assert _backend(h, 51001) == str(other.address)
        _, (_, val) = _entry(h)
        assert time.monotonic_ns() - val.last_ns < 10**9          # the clock restarted
        # Aged past the timeout before each flow: Maglev decides, so 20
        # flows do not all land on one backend.
        picks = []
        for i in range(20):
            _, (_, v) = _entry(h)
            v.last_ns = time.monotonic_ns() - 11 * 10**9
            m.update(key, v)
            picks.append(_backend(h, 51100 + i))
        assert len(set(picks)) >= 2


def _live_web(h: Harness):
    return next(s for s in h.rec.services.values() if s.name == "web")


def test_draining_backend_loses_new_flows_keeps_old(lab, bpf_object):
    with _harness(lab, 60) as h:
        sticky = _backend(h, 52000)
        cfg = h.edit()
        web = cfg["services"][0]
        web["backends"] = [b if not b.startswith(sticky + ":") else
                           {"address": sticky, "port": int(b.rsplit(":", 1)[1]), "state": "draining"}
                           for b in web["backends"]]
        h.apply(cfg)
        assert _backend(h, 52000, flags="A") == sticky           # its flow stays
        moved = _backend(h, 52001)
        assert moved != sticky
        assert {_backend(h, 52002 + i) for i in range(10)} == {moved}   # re-bound


def test_entry_is_keyed_by_client_and_service(lab, bpf_object):
    with _harness(lab, 60) as h:
        _backend(h, 53000)
        (key, val), = h.dp.maps["affinity"].lookup_batch()
        assert key.client[0] == addr_word(IPv4Address(CLIENT))
        assert key.svc_id == _live_web(h).svc_id


def test_config_bounds():
    base = {"interfaces": ["eth0"], "services": [
        {"name": "a", "vip": "10.96.0.1", "port": 80, "protocol": "tcp", "client_affinity_s": 0}]}
    with pytest.raises(ConfigError, match=r"services\[0\] 'a': client_affinity_s must be in 1..86400"):
        config_from_dict(base)
    base["services"][0]["client_affinity_s"] = 10800          # Kubernetes' default
    assert config_from_dict(base).services[0].client_affinity_s == 10800
