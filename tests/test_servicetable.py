"""lb.servicetable: the daemon's O(1) view of the running services, and the
validation of one service against the running config."""

from __future__ import annotations

import pytest

from lb.config import ConfigError, config_from_dict
from lb.servicetable import ServiceTable, parse_service


def _svc(name: str, vip: str, port: int = 80, **extra) -> dict:
    return {"name": name, "vip": vip, "port": port, "protocol": "tcp", "backends": ["10.1.0.1:80"], **extra}


CFG = config_from_dict({"interfaces": ["eth0"], "identities": {"web": ["10.60.0.0/16"], "ops": ["10.61.0.0/24"]},
                        "services": [_svc("a", "10.96.0.1"), _svc("b", "10.96.0.2"), _svc("c", "10.96.0.3")]})


def test_table_keeps_the_config_order_and_finds_by_name_and_key():
    t = ServiceTable(CFG.services)
    assert t.services() is CFG.services and not t.changed
    b2 = parse_service(_svc("b", "10.96.0.9"), CFG)              # b moves to another VIP
    assert t.put(b2) == CFG.services[1] and t.changed
    assert [s.name for s in t.services()] == ["a", "b", "c"]    # replaced in place
    assert t.holder(b2) == "b" and t.holder(CFG.services[1]) is None    # its old key is free
    d = parse_service(_svc("d", "10.96.0.4"), CFG)
    assert t.put(d) is None and [s.name for s in t.services()] == ["a", "b", "c", "d"]
    assert t.pop("a") == CFG.services[0] and t.pop("a") is None
    assert [s.name for s in t.services()] == ["b", "c", "d"] and t.get("a") is None and len(t) == 3
    assert t.holder(CFG.services[0]) is None and t.holder(CFG.services[2]) == "c"


def test_one_service_is_validated_as_in_a_config():
    """The model is the one config_from_dict makes; a rejection reads the
    same (an unknown identity lists every defined one)."""
    raw = _svc("p", "10.96.0.7", allow=["web", "world"], deny=["ops"])
    full = config_from_dict({"interfaces": ["eth0"], "identities": {"web": ["10.60.0.0/16"], "ops": ["10.61.0.0/24"]},
                             "services": [raw]}).services[0]
    assert parse_service(raw, CFG) == full
    with pytest.raises(ConfigError) as e:
        parse_service(_svc("p", "10.96.0.7", allow=["nope"]), CFG)
    assert "unknown identity 'nope' (defined: ops, web, world)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_service(_svc("p", "10.96.0.7", port=70000), CFG)
    assert str(e.value) == "<api>: services[0] 'p': port must be in 1..65535"
    with pytest.raises(ConfigError):
        parse_service("not a service", CFG)


def test_a_dsr_service_is_validated_with_the_running_encap_source():
    raw = _svc("t", "10.96.0.8", forwarding="ipip")
    with pytest.raises(ConfigError) as e:
        parse_service(raw, CFG)
    assert "forwarding ipip needs encap_source" in str(e.value)
    cfg = CFG.model_copy(update={"encap_source": config_from_dict(
        {"interfaces": ["eth0"], "encap_source": "10.255.0.1"}).encap_source})
    assert parse_service(raw, cfg).forwarding == "ipip"
