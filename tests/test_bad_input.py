"""Bad control input: generated invalid configs and API requests get a clear
error naming the problem, and nothing is applied."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config import ConfigError, config_from_dict

BASE = {
    "interfaces": ["eth0"],
    "identities": {"frontend": ["10.1.0.0/24"], "blocked": ["192.0.2.0/24"]},
    "services": [
        {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp",
         "backends": ["10.244.1.2:8080", {"address": "10.244.1.3", "port": 8080, "weight": 2}],
         "allow": ["frontend"]},
        {"name": "dns", "vip": "10.96.0.53", "port": 53, "protocol": "udp", "backends": ["10.244.2.2:53"]},
    ],
}

BAD_VALUES = st.sampled_from([
    None, -1, 0, 65536, 2**40, "", "x" * 300, "10.0.0.300", "::1", "10.0.0.1/33", [], {}, [None],
    "10.1.0.1/24", "sctp", "ICMP", True, 1.5, "eth0 ", "a/b", {"address": "1.2.3.4"},
])

# (path into the config, what must be in the error)
TARGETS = [
    (("interfaces",), "interfaces"),
    (("interfaces", 0), "interfaces[0]"),
    (("identities", "frontend"), "frontend"),
    (("identities", "frontend", 0), "frontend"),
    (("services", 0, "vip"), "'web'"),
    (("services", 0, "port"), "'web'"),
    (("services", 0, "protocol"), "'web'"),
    (("services", 0, "name"), "services[0]"),
    (("services", 0, "backends"), "'web'"),
    (("services", 0, "backends", 0), "backends[0]"),
    (("services", 0, "backends", 1, "weight"), "backends[1]"),
    (("services", 0, "backends", 1, "port"), "backends[1]"),
    (("services", 0, "allow"), "'web'"),
    (("services", 1, "port"), "'dns'"),
    (("snat_address",), "snat_address"),
    (("hash_seed",), "hash_seed"),
    (("limits",), "limits"),
]


def _set(cfg, path, value):
    for p in path[:-1]:
        cfg = cfg[p]
    cfg[path[-1]] = value


def test_base_config_is_valid():
    config_from_dict(BASE)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(target=st.sampled_from(TARGETS), value=BAD_VALUES)
def test_generated_invalid_configs_are_rejected_by_name(target, value):
    path, where = target
    cfg = copy.deepcopy(BASE)
    _set(cfg, path, value)
    try:
        config_from_dict(cfg)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        assert where in str(e), (path, value, str(e))
        return
    # A few replacements are valid on purpose; anything else slipping
    # through is a validation hole.
    assert _acceptable(path, value), (path, value)


def _acceptable(path, value) -> bool:
    return ((path == ("services", 0, "allow") and value in ([], None))  # deny all / no policy
            or (path == ("snat_address",) and value is None)           # gateway mode
            or (path == ("limits",) and value in ({}, None))            # defaults
            or (path == ("hash_seed",) and type(value) is int and 0 <= value < 2**32)
            or (path == ("services", 0, "backends") and value == [])     # rejects new flows
            or (path == ("identities", "frontend") and value == [])       # an identity with no members
            or (path == ("identities", "frontend", 0) and _ipv6_network(value))  # an IPv6 member
            or (path == ("interfaces", 0) and _valid_ifname(value))
            or (path == ("services", 0, "name") and isinstance(value, str)
                and re.fullmatch(r"[A-Za-z0-9._-]{1,63}", value) is not None))


def _ipv6_network(v) -> bool:
    try:
        return isinstance(v, str) and ipaddress.IPv6Network(v, strict=False).prefixlen >= 0
    except ValueError:
        return False


def _valid_ifname(v) -> bool:
    """Linux's rule (dev_valid_name): 1..15 bytes, not . or .., no / : or space."""
    return (isinstance(v, str) and 0 < len(v) <= 15 and v not in (".", "..")
            and not any(c in v for c in "/: \t\n"))


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["services"].append(dict(c["services"][0], name="web2")), "web2"),         # duplicate VIP
    (lambda c: c["services"][0]["allow"].append("nobody"), "nobody"),                       # unknown identity
    (lambda c: c["services"].append(dict(c["services"][1])), "dns"),                       # duplicate name
    (lambda c: c["identities"].update(world=["10.9.0.0/16"]), "world"),                    # reserved name
    (lambda c: c["identities"].update(dup=["10.1.0.0/24"]), "10.1.0.0/24"),                # CIDR in two identities
    (lambda c: c["services"][0]["backends"].append("10.244.1.2:8080"), "10.244.1.2:8080"),  # duplicate backend
    (lambda c: c.update(surprise=1), "surprise"),                                           # unknown key
])
def test_cross_entry_errors_name_the_entries(mutate, needle):
    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert needle in str(e.value)


def test_zero_backends_is_valid_and_documented():
    cfg = copy.deepcopy(BASE)
    cfg["services"][0]["backends"] = []
    assert config_from_dict(cfg).services[0].backends == ()


def _raw_call(path: str, payload: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(payload)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.fixed_dictionaries({"cmd": st.sampled_from(["apply", "flow", "upsert_service", "delete_service", "nope"])},
                          optional={"config": st.text(max_size=50), "service": st.dictionaries(st.text(max_size=5), st.integers()),
                                    "name": st.integers(), "src": st.text(max_size=10), "proto": st.text(max_size=4)})
    .map(lambda d: json.dumps(d).encode() + b"\n")))
def _api_examples(daemon, payload):
    reply = _raw_call(daemon.socket, payload)
    assert reply["ok"] is False and reply["error"], (payload, reply)


def test_api_rejects_garbage_and_keeps_serving(lab, daemon_factory):
    from lbtest import xdplb

    d = daemon_factory()
    before = json.loads(xdplb(d, "status", "--json").stdout)
    _api_examples(d)
    after = json.loads(xdplb(d, "status", "--json").stdout)
    assert after["generation"] == before["generation"] and after["services"] == before["services"]


