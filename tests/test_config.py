"""lb.config: parsing, validation messages, identity ids, round trip."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lb import config as cfgmod
from lb.config import (
    Backend,
    ConfigError,
    Limits,
    Service,
    SnatPorts,
    config_from_dict,
    config_to_dict,
    identity_id,
    load_config,
    parse_config,
)

EXAMPLE = """\
interfaces: [eth0]
xdp_mode: native
snat_address: 10.0.0.1
snat_ports: {min: 10000, max: 32767}
hash_seed: 1234
bpffs: /sys/fs/bpf/xdplb
api_socket: /run/xdplb/api.sock
netns: lbns
limits: {maglev_slots: 4194304, conntrack: 262144, nat: 262144}
identities:
  frontend: [10.1.0.0/24]
  blocked: [192.0.2.0/24]
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    protocol: tcp
    backends: [10.244.1.2:8080, {address: 10.244.1.3, port: 8080, weight: 2}]
    allow: [frontend]
    deny: [blocked]
"""


def base(**services_extra) -> dict:
    """A minimal valid config as a dict, to be broken by each test."""
    return {
        "interfaces": ["eth0"],
        "identities": {"frontend": ["10.1.0.0/24"], "blocked": ["192.0.2.0/24"]},
        "services": [
            {"name": "web", "vip": "10.96.0.10", "port": 80, "protocol": "tcp", "backends": ["10.244.1.2:8080"]},
            {"name": "dns", "vip": "10.96.0.10", "port": 53, "protocol": "udp", "backends": []},
            {"name": "api", "vip": "10.96.0.11", "port": 443, "protocol": "tcp", "backends": ["10.244.2.1:8443"]},
        ],
    }


def errors_of(d) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(d)
    return exc.value.errors


def one_error(d) -> str:
    errs = errors_of(d)
    assert len(errs) == 1, errs
    return errs[0]


# ---- the documented example ---------------------------------------------


def test_example_parses():
    cfg = parse_config(EXAMPLE)
    assert cfg.interfaces == ("eth0",)
    assert cfg.xdp_mode == "native"
    assert cfg.snat_address == (IPv4Address("10.0.0.1"),) and cfg.snat_for(6) is None
    assert cfg.snat_ports == SnatPorts(min=10000, max=32767)
    assert cfg.hash_seed == 1234
    assert cfg.bpffs == Path("/sys/fs/bpf/xdplb")
    assert cfg.netns == "lbns"
    assert cfg.limits == Limits(maglev_slots=4194304, conntrack=262144, nat=262144)
    assert cfg.identities["frontend"] == (IPv4Network("10.1.0.0/24"),)
    (web,) = cfg.services
    assert web.key == (IPv4Address("10.96.0.10"), 80, "tcp")
    assert web.proto_number == 6
    assert [b.key for b in web.backends] == ["10.244.1.2:8080", "10.244.1.3:8080"]
    assert [b.weight for b in web.backends] == [1, 2]
    assert web.backends[0].address == IPv4Address("10.244.1.2")
    assert web.allow == ("frontend",) and web.deny == ("blocked",)
    assert web.has_policy


def test_defaults():
    cfg = config_from_dict({"interfaces": ["eth0"]})
    assert cfg.xdp_mode == "native"
    assert cfg.snat_address is None and not cfg.snat
    assert (cfg.snat_ports.min, cfg.snat_ports.max) == (10000, 32767)
    assert cfg.snat_ports.max < 32768  # below Linux's ephemeral range
    assert cfg.hash_seed == cfgmod.DEFAULT_HASH_SEED
    assert cfg.bpffs == Path("/sys/fs/bpf/xdplb")
    assert cfg.limits.maglev_slots == 4194304
    assert cfg.services == () and cfg.identities == {}


def test_models_are_frozen():
    cfg = parse_config(EXAMPLE)
    with pytest.raises(ValidationError):
        cfg.hash_seed = 1
    with pytest.raises(ValidationError):
        cfg.services[0].backends[0].port = 1


def test_load_config_file(tmp_path):
    p = tmp_path / "lb.yaml"
    p.write_text(EXAMPLE)
    assert load_config(p) == parse_config(EXAMPLE)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_case_insensitive_enums():
    d = base()
    d["services"][0]["protocol"] = "TCP"
    d["services"][0]["backends"] = [{"address": "10.0.0.1", "port": 1, "state": "Draining"}]
    d["xdp_mode"] = "GENERIC"
    cfg = config_from_dict(d)
    assert cfg.services[0].protocol == "tcp"
    assert cfg.services[0].backends[0].state == "draining"
    assert cfg.xdp_mode == "generic"


def test_active_backends_and_zero_backends():
    d = base()
    d["services"][0]["backends"] = [
        "10.0.0.1:80",
        {"address": "10.0.0.2", "port": 80, "state": "draining"},
        {"address": "10.0.0.3", "port": 80, "weight": 5},
    ]
    cfg = config_from_dict(d)
    assert [b.key for b in cfg.services[0].active_backends] == ["10.0.0.1:80", "10.0.0.3:80"]
    assert cfg.service("dns").backends == ()  # valid: rejects new flows
    assert not cfg.service("dns").has_policy


# ---- error reporting ----------------------------------------------------


def test_port_error_names_service_and_backend():
    d = base()
    d["services"][2]["backends"] = ["10.244.2.1:8443", "10.0.0.1:99999"]
    assert one_error(d) == "services[2] 'api': backends[1] '10.0.0.1:99999': port must be in 1..65535"


def test_mapping_backend_errors():
    d = base()
    d["services"][0]["backends"] = [{"address": "10.0.0.1", "port": 0, "weight": 70000, "state": "gone"}]
    errs = errors_of(d)
    prefix = "services[0] 'web': backends[0] '10.0.0.1:0': "
    assert prefix + "port must be in 1..65535" in errs
    assert prefix + "weight must be in 1..65535" in errs
    assert prefix + "state must be 'active' or 'draining'" in errs


@pytest.mark.parametrize(
    "backend, message",
    [
        ("10.0.0.1", "must be 'address:port'"),
        ("10.0.0.300:80", "address is not a valid IPv4 address"),
        ("10.0.0.1:http", "port must be an integer"),
        ("fd00::1:80", "an IPv6 backend goes in brackets, e.g. '[2001:db8::2]:8080'"),
        (5, "must be 'address:port' or a mapping"),
        ({"port": 80}, "address is required"),
        ({"address": "fd00::1", "port": 80}, "an IPv6 backend of an IPv4 VIP"),
        ("[::1.2.3.4]:80", "is in ::/96 (IPv4-compatible addresses are not used)"),
        ({"address": "10.0.0.1", "port": 80, "color": "red"}, "unknown key 'color'"),
        ({"address": "10.0.0.1", "port": True}, "port must be an integer"),
    ],
)
def test_backend_errors(backend, message):
    d = base()
    d["services"][0]["backends"] = ["10.244.1.2:8080", backend]
    err = one_error(d)
    assert err.startswith("services[0] 'web': backends[1]"), err
    assert message in err


def test_ipv6_vip_backends_and_snat():
    d = base()
    d["services"][0]["vip"] = "fd00::10"
    d["services"][0]["backends"] = ["[fd00:1::2]:8080", {"address": "fd00:1::3", "port": 8080}]
    d["snat_address"] = "fd00::1"
    d["identities"] = {"v6": ["fd00:2::/64"]}
    cfg = config_from_dict(d)
    svc = cfg.services[0]
    assert str(svc.vip) == "fd00::10" and cfg.snat_for(6) == IPv6Address("fd00::1")
    assert [b.key for b in svc.backends] == ["[fd00:1::2]:8080", "[fd00:1::3]:8080"]
    assert [str(n) for n in cfg.identities["v6"]] == ["fd00:2::/64"]
    # The short form round-trips.
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_mixed_family_service_names_the_entry():
    d = base()
    d["services"][0]["vip"] = "fd00::10"
    d["services"][0]["backends"] = ["[fd00:1::2]:8080", "10.0.0.2:8080"]
    assert one_error(d) == ("services[0] 'web': backends[1] '10.0.0.2:8080': an IPv4 backend of an "
                            "IPv6 VIP (a service's VIP and its backends are of one family)")


def test_sctp_is_not_supported():
    d = base()
    d["services"][1]["protocol"] = "SCTP"
    assert one_error(d) == "services[1] 'dns': protocol: sctp is not supported (use tcp or udp)"
    d["services"][1]["protocol"] = "icmp"
    assert "must be tcp or udp" in one_error(d)


def test_all_problems_reported_at_once():
    d = base()
    d["services"][0]["port"] = 0
    d["services"][2]["backends"] = ["10.0.0.1:99999"]
    d["hash_seed"] = 2**32
    d["surprise"] = True
    errs = errors_of(d)
    assert len(errs) == 4, errs
    assert "services[0] 'web': port must be in 1..65535" in errs
    assert "hash_seed must be in 0..4294967295" in errs
    assert "unknown key 'surprise'" in errs


def test_unknown_keys_are_errors():
    d = base()
    d["services"][1]["weight"] = 3
    d["limits"] = {"conntrack": 10, "maglev": 5}
    errs = errors_of(d)
    assert "services[1] 'dns': unknown key 'weight'" in errs
    assert "limits: unknown key 'maglev'" in errs


def test_service_name_rules():
    d = base()
    d["services"][0]["name"] = "bad name!"
    d["services"][1]["name"] = "x" * 64
    d["services"][2]["name"] = ""
    errs = errors_of(d)
    assert len(errs) == 3
    assert all("name must be 1..63 characters from [A-Za-z0-9._-]" in e for e in errs)
    assert errs[0].startswith("services[0] 'bad name!'")


def test_duplicate_service_name():
    d = base()
    d["services"][2]["name"] = "web"
    assert one_error(d) == "services[2] 'web': name already used by services[0]"


def test_duplicate_service_key_names_both():
    d = base()
    d["services"][2].update(vip="10.96.0.10", port=80, protocol="TCP")
    assert one_error(d) == "services[2] 'api': 10.96.0.10:80/tcp is already used by services[0] 'web'"


def test_same_vip_port_different_protocol_is_fine():
    d = base()
    d["services"][1].update(port=80)  # udp/80 next to tcp/80
    config_from_dict(d)


def test_duplicate_backend():
    d = base()
    d["services"][0]["backends"] = ["10.0.0.1:80", {"address": "10.0.0.1", "port": 80, "weight": 3}]
    assert one_error(d) == "services[0] 'web': backends[1] '10.0.0.1:80': duplicate of backends[0]"


def test_same_backend_in_two_services_is_fine():
    d = base()
    d["services"][2]["backends"] = d["services"][0]["backends"]
    config_from_dict(d)


def test_identity_rules():
    d = base()
    d["identities"] = {
        "world": ["1.2.3.0/24"],
        "Upper": [],
        "frontend": ["10.1.0.1/24"],
        "v6": ["fd00::/64"],
        "junk": ["nonsense"],
    }
    errs = errors_of(d)
    assert "identities['world']: 'world' is reserved (every unmatched source) and cannot be defined" in errs
    assert "identities['Upper']: name must match [a-z0-9][a-z0-9._-]*" in errs
    assert "identities['frontend'][0] '10.1.0.1/24': host bits are set (did you mean 10.1.0.0/24?)" in errs
    assert not any("identities['v6']" in e for e in errs)
    assert "identities['junk'][0] 'nonsense': not a valid IPv4 network" in errs


def test_same_cidr_in_two_identities_names_both():
    d = base()
    d["identities"]["other"] = ["10.9.0.0/16", "192.0.2.0/24"]
    assert one_error(d) == (
        "identities['other'][1] '192.0.2.0/24': also in identities['blocked']; a CIDR can have one identity"
    )


def test_overlapping_but_different_cidrs_are_fine():
    d = base()
    d["identities"]["inner"] = ["10.1.0.128/25"]  # longest prefix wins in the LPM trie
    config_from_dict(d)


def test_unknown_identity_in_allow_and_deny():
    d = base()
    d["services"][0]["allow"] = ["frontend", "nobody"]
    d["services"][2]["deny"] = ["ghost"]
    errs = errors_of(d)
    assert len(errs) == 2
    assert errs[0].startswith("services[0] 'web': allow[1] 'nobody': unknown identity 'nobody'")
    assert errs[1].startswith("services[2] 'api': deny[0] 'ghost': unknown identity 'ghost'")


def test_world_may_be_referenced():
    d = base()
    d["services"][0]["allow"] = ["frontend"]
    d["services"][0]["deny"] = ["world"]
    d["services"][2]["allow"] = ["world"]
    cfg = config_from_dict(d)
    assert cfg.services[0].deny == ("world",)


def test_identity_in_allow_and_deny():
    d = base()
    d["services"][0]["allow"] = ["frontend"]
    d["services"][0]["deny"] = ["blocked", "frontend"]
    assert one_error(d) == "services[0] 'web': identity 'frontend' is in both allow and deny"


def test_empty_allow_means_default_deny():
    d = base()
    d["services"][0]["allow"] = []
    svc = config_from_dict(d).services[0]
    assert svc.allow == () and svc.has_policy


def test_interfaces_rules():
    for ifaces, message in [
        ([], "interfaces must name at least one interface"),
        (["eth0", "eth0"], "interfaces[1] 'eth0': listed twice (also interfaces[0])"),
        (["a" * 16], f"interfaces[0] '{'a' * 16}': not a valid interface name"),
        (["eth/0"], "interfaces[0] 'eth/0': not a valid interface name"),
        ("eth0", "interfaces must be a list"),
    ]:
        d = base()
        d["interfaces"] = ifaces
        assert one_error(d).startswith(message)
    d = base()
    del d["interfaces"]
    assert one_error(d) == "interfaces is required"


def test_snat_ports_rules():
    d = base()
    d["snat_ports"] = {"min": 30000, "max": 20000}
    assert one_error(d) == "snat_ports: min (30000) must be <= max (20000)"
    d["snat_ports"] = {"min": 0}
    assert one_error(d) == "snat_ports.min must be in 1..65535"
    d["snat_ports"] = {"min": 2000, "max": 2000}
    assert config_from_dict(d).snat_ports.count == 1


def test_limits_must_be_positive():
    d = base()
    d["limits"] = {"conntrack": 0}
    assert one_error(d) == "limits.conntrack must be in 1..4294967295"


def test_paths_must_be_absolute():
    d = base()
    d["bpffs"] = "relative"
    assert one_error(d).startswith("bpffs must be an absolute path")


def test_yaml_syntax_error_has_line_number():
    with pytest.raises(ConfigError) as exc:
        parse_config("interfaces: [eth0]\nservices:\n  - name: [oops\n", source="lb.yaml")
    (err,) = exc.value.errors
    assert "YAML syntax error at line" in err
    assert str(exc.value).startswith("lb.yaml: ")


def test_yaml_duplicate_key_is_an_error():
    with pytest.raises(ConfigError, match=r"line 2, column 1: duplicate key 'interfaces'"):
        parse_config("interfaces: [eth0]\ninterfaces: [eth1]\n")


def test_configs_are_parsed_by_libyaml():
    """PyYAML's pure-Python parser took 42 s for a 20k-service config on
    the development VM, libyaml's 14 s with the same constructors (xdplb run
    at 20k services spent most of its start there). Both give the same
    data and the same errors."""
    import yaml

    from lb.config import _Loader

    assert yaml.__with_libyaml__ and issubclass(_Loader, yaml.CSafeLoader)
    text = "interfaces: [eth0]\nservices:\n  - {name: a, vip: 10.0.0.1, port: 80, backends: ['10.1.0.1:80']}\n"
    assert yaml.load(text, Loader=_Loader) == yaml.safe_load(text)


@pytest.mark.parametrize("text", ["", "- eth0\n", "just a string\n"])
def test_top_level_must_be_mapping(text):
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(text)


def test_never_raises_raw_validation_error():
    for bad in [{"services": "nope"}, {"interfaces": [1, None]}, {"identities": ["x"]}, {"limits": 5}]:
        with pytest.raises(ConfigError) as exc:
            config_from_dict(bad)
        assert not isinstance(exc.value, ValidationError)
        assert exc.value.errors


def test_config_error_str_lists_everything():
    err = ConfigError(["a: one", "b: two"], source="x.yaml")
    assert str(err) == "x.yaml: 2 problems:\n  - a: one\n  - b: two"
    assert isinstance(err, ValueError)
    assert str(ConfigError(["only"])) == "only"


def test_standalone_service_validates_itself():
    with pytest.raises(ValidationError, match="duplicate of backends"):
        Service(name="s", vip="10.0.0.1", port=1, protocol="udp", backends=["10.0.0.2:1", "10.0.0.2:1"])
    assert Backend.model_validate("10.0.0.2:1").key == "10.0.0.2:1"


# ---- identity ids -------------------------------------------------------


def test_identity_ids_are_stable():
    cfg = parse_config(EXAMPLE)
    ids = cfg.identity_ids()
    assert ids["world"] == 2
    # Pinned values: a change here changes identities on upgrade.
    assert ids["frontend"] == identity_id("frontend") == 1741451223
    assert ids["blocked"] == 1798676543
    assert all(256 <= v < 2**31 for k, v in ids.items() if k != "world")


@given(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True))
def test_identity_id_range(name):
    assert 256 <= identity_id(name) < 2**31
    assert 1000 <= identity_id(name, user_min=1000) < 2**31


def test_identity_constants_can_come_from_btf():
    cfg = parse_config(EXAMPLE)
    ids = cfg.identity_ids(user_min=4096, world=7)
    assert ids["world"] == 7
    assert ids["frontend"] == identity_id("frontend", user_min=4096) >= 4096


def test_identity_id_collision_is_reported(monkeypatch):
    cfg = parse_config(EXAMPLE)
    # A one-id user range: every two names collide.
    with pytest.raises(ConfigError, match=r"collides with identities\['frontend'\]; rename one"):
        cfg.identity_ids(user_min=2**31 - 1)
    monkeypatch.setattr(cfgmod, "IDENTITY_USER_MIN", 2**31 - 1)
    with pytest.raises(ConfigError) as exc:
        config_from_dict(base())
    assert exc.value.errors == [
        f"identities['blocked']: its id {2**31 - 1} collides with identities['frontend']; rename one"
    ]


# ---- round trip ---------------------------------------------------------


def test_round_trip_example():
    cfg = parse_config(EXAMPLE)
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    # Plain data: survives YAML.
    assert parse_config(yaml.safe_dump(d)) == cfg
    assert d["services"][0]["backends"][0] == "10.244.1.2:8080"
    assert d["services"][0]["backends"][1]["weight"] == 2


def test_round_trip_does_not_alias_input():
    d = base()
    before = copy.deepcopy(d)
    config_from_dict(d)
    assert d == before


_octet = st.integers(0, 255)
_ip = st.tuples(st.integers(1, 223), _octet, _octet, st.integers(1, 254)).map(lambda t: ".".join(map(str, t)))
_backend = st.one_of(
    st.tuples(_ip, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.fixed_dictionaries(
        {"address": _ip, "port": st.integers(1, 65535)},
        optional={"weight": st.integers(1, 65535), "state": st.sampled_from(["active", "draining"])},
    ),
)


def _bkey(b) -> str:
    return b if isinstance(b, str) else f"{b['address']}:{b['port']}"


@st.composite
def configs(draw) -> dict:
    idents = draw(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), max_size=4, unique=True))
    nets = draw(
        st.lists(
            st.tuples(_octet, _octet, st.integers(8, 32)), min_size=len(idents), max_size=len(idents), unique=True
        )
    )
    identities = {
        name: [str(IPv4Network(f"10.{a}.{b}.0/{p}", strict=False))] for name, (a, b, p) in zip(idents, nets)
    }
    if len({tuple(v) for v in identities.values()}) < len(identities):
        identities = {}
    services = []
    for i in range(draw(st.integers(0, 4))):
        svc = {
            "name": f"svc-{i}",
            "vip": f"10.96.0.{i + 1}",
            "port": draw(st.integers(1, 65535)),
            "protocol": draw(st.sampled_from(["tcp", "udp"])),
            "backends": draw(st.lists(_backend, max_size=5, unique_by=_bkey)),
        }
        refs = sorted(identities) + ["world"]
        if draw(st.booleans()):
            svc["allow"] = draw(st.lists(st.sampled_from(refs), unique=True))
        svc["deny"] = [r for r in draw(st.lists(st.sampled_from(refs), unique=True)) if r not in svc.get("allow", [])]
        services.append(svc)
    d = {"interfaces": ["eth0"], "identities": identities, "services": services}
    if draw(st.booleans()):
        d["snat_address"] = draw(_ip)
    return d


def test_snat_address_one_per_family():
    d = base()
    d["snat_address"] = ["fd00::1", "10.0.0.1"]
    cfg = config_from_dict(d)
    assert cfg.snat_address == (IPv4Address("10.0.0.1"), IPv6Address("fd00::1"))   # IPv4 first
    assert (cfg.snat_for(4), cfg.snat_for(6)) == cfg.snat_address
    assert config_from_dict(config_to_dict(cfg)) == cfg
    d["snat_address"] = ["10.0.0.1"]
    assert config_from_dict(d).snat_for(6) is None


@pytest.mark.parametrize("value, message", [
    (["10.0.0.1", "10.0.0.2"], "snat_address: takes one address per family, not two IPv4 addresses "
                               "(10.0.0.1, 10.0.0.2)"),
    (["fd00::1", "fd00::2"], "snat_address: takes one address per family, not two IPv6"),
    (["10.0.0.1", "fd00::1", "10.0.0.2"], "snat_address: takes at most two addresses"),
    ([], "snat_address must name an address"),
    (["10.0.0.1", "nope"], "snat_address is not a valid IPv4 address: 'nope'"),
])
def test_bad_snat_address_is_one_clear_line(value, message):
    d = base()
    d["snat_address"] = value
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert len(e.value.errors) == 1 and str(e.value).startswith(message), str(e.value)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_round_trip_property(d):
    cfg = config_from_dict(d)
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


# ---- the backend-list fast path -------------------------------------------


def _slow_backend(text: str) -> Backend:
    """The per-backend validation (the fast path only takes lists)."""
    return Backend.model_validate(text)


@pytest.mark.parametrize("text", ["10.244.1.2:8080", "0.0.0.0:1", "255.255.255.255:65535", "1.2.3.4:80"])
def test_fast_backend_is_the_validated_model(text):
    svc = Service.model_validate({"name": "s", "vip": "10.96.0.1", "port": 80, "protocol": "tcp",
                                  "backends": [text]})
    fast, slow = svc.backends[0], _slow_backend(text)
    assert type(fast) is Backend and type(fast.address) is IPv4Address
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert fast.address == IPv4Address(text.split(":")[0]) and hash(fast.address) == hash(slow.address)
    assert fast.model_dump() == slow.model_dump() and fast.model_dump(mode="json") == slow.model_dump(mode="json")
    assert fast.model_fields_set == slow.model_fields_set and fast.key == text
    drained = fast.model_copy(update={"state": "draining"})
    assert drained.state == "draining" and fast.state == "active"
    assert drained.model_fields_set == slow.model_copy(update={"state": "draining"}).model_fields_set
    assert fast.model_fields_set == {"address", "port"}       # the shared set is untouched
    with pytest.raises(ValidationError):
        fast.port = 1                                           # still frozen


@pytest.mark.parametrize("odd", ["10.0.0.1:080", "10.0.0.1:0", "10.0.0.1:99999", "010.0.0.1:80",
                                 {"address": "10.0.0.1", "port": 80, "weight": 2}])
def test_non_canonical_backends_take_the_full_validation(odd):
    d = base()
    d["services"][0]["backends"] = ["10.244.1.2:8080", odd]
    try:
        got = config_from_dict(d).services[0].backends
    except ConfigError as e:
        got = e.errors
    ref = copy.deepcopy(d)
    ref["services"][0]["backends"] = [{"address": "10.244.1.2", "port": 8080}, odd]
    try:
        want = config_from_dict(ref).services[0].backends
    except ConfigError as e:
        want = e.errors
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 70000)), max_size=8, unique=True))
def test_fast_and_full_backend_validation_agree(pairs):
    # Unique: duplicates are a cross-entry rule, checked once entries are valid.
    texts = [f"{IPv4Address(a)}:{p}" for a, p in pairs]
    d = base()
    d["services"][0]["backends"] = texts
    ref = copy.deepcopy(d)
    ref["services"][0]["backends"] = [5, *texts]          # not a string: the whole list goes the slow way
    try:
        fast = config_from_dict(d).services[0].backends
    except ConfigError as e:
        fast = [m.replace("backends[", "backends[+") for m in e.errors]
    try:
        slow = config_from_dict(ref).services[0].backends
        pytest.fail("5 is not a backend")
    except ConfigError as e:
        slow = [m for m in e.errors if "backends[0]" not in m]
    if isinstance(fast, tuple):
        assert not slow and fast == tuple(_slow_backend(t) for t in texts)
    else:
        renumber = {f"backends[{i + 1}]": f"backends[+{i}]" for i in range(len(texts))}
        for old, new in sorted(renumber.items(), reverse=True):
            slow = [m.replace(old, new) for m in slow]
        assert fast == slow


# ---- direct server return ---------------------------------------------------


def dsr(**svc) -> dict:
    d = base()
    d["encap_source"] = "10.255.0.1"
    d["services"][0].update({"port": 8080, "forwarding": "ipip", **svc})
    return d


def test_forwarding_defaults_to_nat_and_is_case_insensitive():
    cfg = config_from_dict(dsr(forwarding="GUE"))
    assert cfg.services[0].forwarding == "gue" and cfg.services[0].dsr
    assert cfg.services[1].forwarding == "nat" and not cfg.services[1].dsr
    assert cfg.gue_port == cfgmod.GUE_PORT_DEFAULT == 6080
    assert cfg.encap_source == (IPv4Network("10.255.0.1/32"),)


@pytest.mark.parametrize("value", ["vxlan", 4, None, ""])
def test_bad_forwarding_is_named(value):
    assert one_error(dsr(forwarding=value)) == \
        f"services[0] 'web': forwarding must be nat, ipip or gue, not {value!r}"


def test_dsr_needs_encap_source_and_the_service_port():
    d = dsr(backends=["10.244.1.2:8080", "10.244.1.3:80"], health_check={"type": "http"})
    del d["encap_source"]
    assert errors_of(d) == [
        "services[0] 'web': backends[1] '10.244.1.3:80': forwarding ipip does not rewrite the port: "
        "the backend must serve the service's port 8080",
        "services[0] 'web': health_check: forwarding ipip is checked with type tcp (a SYN through "
        "the tunnel), not http",
        "services[0] 'web': forwarding ipip needs encap_source (an address of this LB for the "
        "tunnels' outer source)",
    ]


def test_snat_does_not_stop_dsr_services():
    """SNAT applies to the NAT services; a DSR service's replies never
    cross the LB, so it is neither SNATed nor an error."""
    d = dsr()
    d["snat_address"] = "10.255.0.2"
    cfg = config_from_dict(d)
    assert cfg.snat and cfg.services[0].dsr


@pytest.mark.parametrize("source,message", [
    ("10.255.0.300", "encap_source is not a valid IPv4 address: '10.255.0.300'"),
    ("10.255.0.1/24", "encap_source: host bits are set (did you mean 10.255.0.0/24?)"),
    ("10.0.0.0/8", "encap_source: a prefix of at most 65536 addresses (/16 or longer), not /8"),
    ("fd00::/64", "encap_source: a prefix of at most 65536 addresses (/112 or longer), not /64"),
    (["10.255.0.1", "10.255.0.2"], "encap_source: takes at most one source per family"),
    ([], "encap_source must name an address (or one per family)"),
])
def test_encap_source_errors(source, message):
    d = dsr()
    d["encap_source"] = source
    assert one_error(d) == message


def test_encap_source_prefix_and_gue_port_round_trip():
    d = dsr(forwarding="gue")
    d["encap_source"] = "10.255.1.16/28"
    d["gue_port"] = 7000
    cfg = config_from_dict(d)
    assert cfg.encap_source == (IPv4Network("10.255.1.16/28"),) and cfg.gue_port == 7000
    assert config_from_dict(config_to_dict(cfg)) == cfg
    d["gue_port"] = 0
    assert one_error(d) == "gue_port must be in 1..65535"


def test_dsr_takes_either_family_with_a_source_of_the_backends_family():
    """The outer header is of the backend's family, the inner one the
    client's: every pair is valid (4in4, 6in6, 4in6, 6in4), given an
    encap_source of each backend family."""
    d = dsr(vip="fd00::20", backends=["[fd00:1::2]:8080", "10.244.1.2:8080"])
    assert errors_of(d) == [
        "services[0] 'web': backends[0] '[fd00:1::2]:8080': forwarding ipip to an IPv6 backend "
        "needs an IPv6 encap_source"]
    d["encap_source"] = ["10.255.0.1", "fd00:255::/112"]
    cfg = config_from_dict(d)
    assert cfg.encap_source_of(6) == IPv6Network("fd00:255::/112")
    assert cfg.encap_source_of(4) == IPv4Network("10.255.0.1/32")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    d["encap_source"] = "fd00:255::1"
    assert errors_of(d) == [
        "services[0] 'web': backends[1] '10.244.1.2:8080': forwarding ipip to an IPv4 backend "
        "needs an IPv4 encap_source"]


def test_bgp_needs_a_peer_of_each_vip_family():
    """A BGP session carries its own family: IPv6 VIPs without an IPv6 peer
    would never be announced, so the config says so in one line."""
    d = base()
    d["services"].append({"name": "web6", "vip": "fd00::10", "port": 80, "protocol": "tcp",
                          "backends": ["[fd00:1::2]:80"]})
    i = len(d["services"]) - 1
    d["bgp"] = {"local_asn": 65001, "peers": [{"address": "10.0.0.1", "asn": 65000}]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert str(e.value) == (f"bgp.peers: no IPv6 peer to announce the IPv6 VIPs (first: services[{i}] 'web6'); "
                            "BGP sessions carry their own family only")
    d["bgp"]["peers"].append({"address": "fd00::1", "asn": 65000})
    assert [p.address.version for p in config_from_dict(d).bgp.peers] == [4, 6]
