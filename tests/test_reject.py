"""A rejected config changes nothing: every map, counters included, is
compared byte for byte before and after (no live traffic here)."""

from __future__ import annotations

import pytest

from lb.config import ConfigError, config_from_dict
from lb.reconcile import CapacityError
from lbtest import Harness, dump_maps


@pytest.fixture(scope="module")
def h(lab, bpf_object):
    lab_, topo = lab
    cfg = None
    with Harness(lab_, topo, attach=False) as h:
        cfg = h.edit()
        cfg["limits"] = {"maglev_slots": 8192}
        for i in range(20):
            cfg["services"].append({"name": f"s{i}", "vip": f"10.98.0.{i + 1}", "port": 80,
                                    "protocol": "tcp", "backends": ["10.244.1.2:8080", "10.244.2.2:8080"]})
    with Harness(lab_, topo, cfg, attach=False) as h:
        yield h


def _reject(h, cfg: dict, *needles: str) -> None:
    before = dump_maps(h.dp.maps)
    with pytest.raises(ConfigError) as e:
        h.rec.apply(config_from_dict(cfg))
    text = str(e.value)
    for n in needles:
        assert n in text, text
    assert dump_maps(h.dp.maps) == before


def test_invalid_backend_named(h):
    cfg = h.edit()
    cfg["services"][5]["backends"].append("10.244.3.2:0")
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert "services[5] 's3'" in str(e.value) and "10.244.3.2:0" in str(e.value)


def test_duplicate_vip_named(h):
    cfg = h.edit()
    cfg["services"].append(dict(cfg["services"][3], name="twin"))
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert "twin" in str(e.value) and "s1" in str(e.value)


def test_maglev_pool_overflow_rejected_whole(h):
    cfg = h.edit()
    # 8192 slots hold the 22 current tables (~6000 slots) but not 10 more.
    for i in range(10):
        cfg["services"].append({"name": f"more{i}", "vip": f"10.98.1.{i + 1}", "port": 80,
                                "protocol": "tcp", "backends": ["10.244.3.2:8080", "10.244.2.2:8080"]})
    cfg["services"][4]["backends"] = ["10.244.3.2:8080"]     # a valid change that must not land
    _reject(h, cfg, "Maglev pool", "limits.maglev_slots")


def test_capacity_error_is_a_config_error(h):
    assert issubclass(CapacityError, ConfigError)


def test_valid_apply_after_rejections_still_works(h):
    cfg = h.edit()
    cfg["services"][4]["backends"] = ["10.244.3.2:8080"]
    res = h.apply(cfg)
    assert res.updated == 1 and res.added == 0
