"""Desired state: the YAML config, parsed and validated.

Everything a user can get wrong is caught here, before any map is touched,
and reported all at once: each message names the entry it is about, e.g.
``services[2] 'api': backends[1] '10.0.0.1:99999': port must be in 1..65535``.

The models are frozen pydantic v2 models. `load_config`, `parse_config` and
`config_from_dict` raise `ConfigError` (never pydantic's ValidationError).
Rules between entries (unique names, known identities, ...) are checked
once every entry is valid on its own, so a config with malformed entries
reports those first.

Numeric identities are derived from identity names by hashing, so they are
the same on every machine and across restarts without being stored anywhere.
The reserved values live in bpf/xdp/constants.h; the defaults below mirror
it and callers that have read the object's BTF pass the real values.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)

from . import gcpause

__all__ = [
    "Backend",
    "Config",
    "HealthCheck",
    "HealthCheckLimits",
    "KubernetesSource",
    "ConfigError",
    "FloodGuard",
    "DEFAULT_HASH_SEED",
    "IDENTITY_USER_MIN",
    "IDENTITY_WORLD",
    "Limits",
    "Monitor",
    "NoBackendReject",
    "Service",
    "SnatPorts",
    "WORLD",
    "config_from_dict",
    "config_to_dict",
    "identity_id",
    "load_config",
    "parse_config",
]

# Mirrors of enum xdplb_identity (constants.h). Callers that read the BTF
# pass its values to identity_id()/Config.identity_ids(); reassigning these
# module attributes also works, since defaults are resolved at call time.
IDENTITY_WORLD = 2
IDENTITY_USER_MIN = 256
IDENTITY_ID_LIMIT = 2**31  # user ids stay below this (fits __u32, never "negative")

WORLD = "world"  # the identity of every source that matches no CIDR
DEFAULT_HASH_SEED = 0x9E3779B9
IPPROTO = {"tcp": 6, "udp": 17}
# How a service's packets reach its backends: NAT, or direct server return
# in an IPIP or GUE tunnel (bpf/xdp/encap.h).
FORWARDING = ("nat", "ipip", "gue")
# GUE's UDP port unless `gue_port:` says otherwise: IANA's "gue" port, the
# default of the backends' decapsulation (DECAP_GUE_PORT_DEFAULT in
# bpf/decap/constants.h; tests/test_dsr.py checks that they agree).
GUE_PORT_DEFAULT = 6080

_COLLECT = "xdplb.collect"  # validation context key: report cross-entry rules at Config level
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_IDENTITY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class ConfigError(ValueError):
    """A config that cannot be used. `errors` lists every problem found."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.errors) == 1:
            return f"{where}{self.errors[0]}"
        lines = "\n".join(f"  - {e}" for e in self.errors)
        return f"{where}{len(self.errors)} problems:\n{lines}"


class _Problems(ValueError):
    """Several problems found by one validator. Messages are relative to the
    validated object; `_translate` prefixes them with its location."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        super().__init__("; ".join(messages))


# ---- scalar types -------------------------------------------------------


def _int_range(lo: int, hi: int):
    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise ValueError(f"must be in {lo}..{hi}")
        return v

    return AfterValidator(check)


def _is_ipv6(v: str) -> bool:
    if ":" not in v:
        return False
    try:
        ipaddress.IPv6Network(v.strip("[]"), strict=False)
    except ValueError:
        return False
    return True


# A dotted quad as ipaddress accepts it (no leading zeros): parsed without
# ipaddress's per-octet Python code, which dominated validating 200k backends.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_ADDRESS_PORT = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}):([0-9]{{1,5}})")


def _fast_ipv4(v: str) -> IPv4Address | None:
    if _DOTTED_QUAD.fullmatch(v):
        return IPv4Address(int.from_bytes(socket.inet_aton(v), "big"))
    return None


# IPv4-compatible IPv6 addresses (::/96, deprecated by RFC 4291) are refused
# as VIPs, backends and SNAT addresses: then an IPv6 address's int is never
# below 2**32, and an address's int alone says its family (lb/reconcile.py
# keys backends by it).
_V4_COMPATIBLE = IPv6Network("::/96")


def _ipv6_address(v: str) -> IPv6Address:
    try:
        ip = IPv6Address(v)
    except ValueError:
        raise ValueError(f"is not a valid IP address: {v!r}") from None
    if ip in _V4_COMPATIBLE:
        raise ValueError(f"{ip} is in ::/96 (IPv4-compatible addresses are not used)")
    return ip


def _ip_address(v: Any) -> Any:
    """An IPv4 or IPv6 address."""
    if isinstance(v, (IPv4Address, IPv6Address)):
        return v
    if isinstance(v, str) and (fast := _fast_ipv4(v)) is not None:
        return fast
    if not isinstance(v, str):
        raise ValueError("must be an IP address string")
    if ":" in v:
        return _ipv6_address(v)
    try:
        return IPv4Address(v)
    except ValueError:
        raise ValueError(f"is not a valid IPv4 address: {v!r}") from None


def _ip_network(v: Any) -> Any:
    """An IPv4 or IPv6 CIDR, host bits clear."""
    if isinstance(v, (IPv4Network, IPv6Network)):
        return v
    if not isinstance(v, str):
        raise ValueError("must be a CIDR string")
    # No value in these messages: a CIDR is always named by its entry label.
    kind = IPv6Network if ":" in v else IPv4Network
    try:
        return kind(v)
    except ValueError:
        pass
    try:
        loose = kind(v, strict=False)
    except ValueError:
        raise ValueError(f"not a valid {'IPv6' if kind is IPv6Network else 'IPv4'} network") from None
    # The LPM trie would silently mask them off; say so instead.
    raise ValueError(f"host bits are set (did you mean {loose}?)")


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


def _forwarding(v: Any) -> Any:
    v = _lower(v)
    if not isinstance(v, str) or v not in FORWARDING:
        raise ValueError(f"must be {', '.join(FORWARDING[:-1])} or {FORWARDING[-1]}, not {v!r}")
    return v


# encap_source as a prefix: its host bits come from the flow hash (the
# data plane takes at most 16 of them, encap.h).
ENCAP_SOURCE_SPREAD_BITS = 16


def _encap_source_one(v: Any) -> IPv4Network | IPv6Network:
    """An address of this LB, or a prefix routed to it (`10.0.0.16/28`)."""
    if isinstance(v, (IPv4Network, IPv6Network)):
        net = v
    elif isinstance(v, str) and "/" not in v:
        ip = _ip_address(v)
        net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
    else:
        net = _ip_network(v)
    least = net.max_prefixlen - ENCAP_SOURCE_SPREAD_BITS
    if net.prefixlen < least:
        raise ValueError(f"a prefix of at most {2 ** ENCAP_SOURCE_SPREAD_BITS} addresses "
                         f"(/{least} or longer), not /{net.prefixlen}")
    return net


def _encap_source(v: Any) -> Any:
    """One source, or a list of one per family (`[10.0.0.1, fd00::1]`):
    a tunnel's outer header is of its backend's family."""
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise ValueError("must name an address (or one per family)")
    nets = tuple(_encap_source_one(x) for x in items)
    if len({n.version for n in nets}) != len(nets):
        raise ValueError("takes at most one source per family")
    return nets


def _snat_addresses(v: Any) -> Any:
    """`snat_address`: one address, or a list of at most one per family."""
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise ValueError("must name an address (leave it out for gateway mode)")
    if len(items) > 2:
        raise ValueError(f"takes at most two addresses, one per family, not {len(items)}")
    ips = sorted((_ip_address(x) for x in items), key=lambda ip: ip.version)
    if len(ips) == 2 and ips[0].version == ips[1].version:
        raise ValueError(f"takes one address per family, not two IPv{ips[0].version} "
                         f"addresses ({ips[0]}, {ips[1]})")
    return tuple(ips)


def _protocol(v: Any) -> Any:
    v = _lower(v)
    if v == "sctp":
        raise ValueError("sctp is not supported (use tcp or udp)")
    if not isinstance(v, str) or v not in IPPROTO:
        raise ValueError(f"must be tcp or udp, not {v!r}")
    return v


def _service_name(v: str) -> str:
    if not _SERVICE_NAME.fullmatch(v):
        raise ValueError("must be 1..63 characters from [A-Za-z0-9._-]")
    return v


def _identity_name(v: str) -> str:
    if v == WORLD:
        raise ValueError(f"'{WORLD}' is reserved (every unmatched source) and cannot be defined")
    if not _IDENTITY_NAME.fullmatch(v):
        raise ValueError("name must match [a-z0-9][a-z0-9._-]*")
    return v


def _ifname(v: str) -> str:
    # The kernel's dev_valid_name(): < IFNAMSIZ, no '/', ':' or whitespace.
    if not v or len(v) > 15 or v in (".", "..") or any(c in "/:" or c.isspace() for c in v):
        raise ValueError("not a valid interface name (1..15 chars, no '/', ':' or spaces)")
    return v


def _netns_name(v: str) -> str:
    if not v or v in (".", "..") or "/" in v or "\0" in v:
        raise ValueError(f"is not a valid network namespace name: {v!r}")
    return v


DEFAULT_METRICS_ADDRESS = "127.0.0.1:9469"


def _metrics_address(v: Any) -> Any:
    """'host:port' with an IP host ('[::1]:9469' for IPv6); null means the
    default, false turns the endpoint off."""
    if v is None:
        return DEFAULT_METRICS_ADDRESS
    if v is False:
        return False
    example = f"'host:port' (e.g. {DEFAULT_METRICS_ADDRESS}) or false"
    if not isinstance(v, str):
        raise ValueError(f"must be {example}, not {v!r}")
    host, sep, port = v.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be {example}, not {v!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be in 1..65535, not {port!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"host must be an IP address, not {host!r}") from None
    if ip.version == 6 and not bracketed:
        raise ValueError(f"an IPv6 host goes in brackets, e.g. [{ip}]:{int(port)}")
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


MetricsAddress = Annotated[str | Literal[False], BeforeValidator(_metrics_address)]


def _absolute(v: Path) -> Path:
    if not v.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(v)!r}")
    return v


Port = Annotated[int, Strict(), _int_range(1, 65535)]
Weight = Annotated[int, Strict(), _int_range(1, 65535)]
Uint32 = Annotated[int, Strict(), _int_range(0, 2**32 - 1)]
Positive = Annotated[int, Strict(), _int_range(1, 2**32 - 1)]
Address = Annotated[IPv4Address | IPv6Address, BeforeValidator(_ip_address)]
Network = Annotated[IPv4Network | IPv6Network, BeforeValidator(_ip_network)]
Protocol = Annotated[Literal["tcp", "udp"], BeforeValidator(_protocol)]
Forwarding = Annotated[Literal["nat", "ipip", "gue"], BeforeValidator(_forwarding)]
EncapSources = Annotated[tuple[IPv4Network | IPv6Network, ...], BeforeValidator(_encap_source)]
# IPv4 first, at most one of each family.
SnatAddresses = Annotated[tuple[Address, ...], BeforeValidator(_snat_addresses)]
ServiceName = Annotated[str, Strict(), AfterValidator(_service_name)]
IdentityName = Annotated[str, Strict(), AfterValidator(_identity_name)]
IdentityRef = Annotated[str, Strict()]  # checked against the defined names later
IfName = Annotated[str, Strict(), AfterValidator(_ifname)]
AbsPath = Annotated[Path, AfterValidator(_absolute)]
BackendState = Annotated[Literal["active", "draining"], BeforeValidator(_lower)]


def _seconds(v: float) -> float:
    if not 0 < v <= 3600:
        raise ValueError("must be > 0 and <= 3600 (seconds)")
    return v


def _http_path(v: str) -> str:
    # It goes verbatim into the request line: no spaces or control characters.
    if not v.startswith("/"):
        raise ValueError(f"must start with '/', not {v!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError(f"must not contain spaces or control characters: {v!r}")
    return v


def _positive_rate(v: float) -> float:
    if not 0 < v <= 1e6:
        raise ValueError("must be > 0 and <= 1000000")
    return v


Seconds = Annotated[float, Strict(), AfterValidator(_seconds)]
CheckCount = Annotated[int, Strict(), _int_range(1, 1000)]
HttpStatus = Annotated[int, Strict(), _int_range(100, 599)]
HttpPath = Annotated[str, Strict(), AfterValidator(_http_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- models -------------------------------------------------------------


class Backend(_Model):
    """One backend: `"10.244.1.2:8080"`, `"[2001:db8::2]:8080"` or a
    mapping with weight and state."""

    address: Address
    port: Port
    weight: Weight = 1
    # draining: keeps its flows (conntrack) but gets no new ones.
    state: BackendState = "active"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, Mapping) or isinstance(data, Backend):
            return data
        if not isinstance(data, str):
            raise ValueError("must be 'address:port' or a mapping {address, port, weight, state}")
        if m := _ADDRESS_PORT.fullmatch(data):          # the common case, without IPv6 probing
            return {"address": _fast_ipv4(m.group(1)), "port": int(m.group(2))}
        address, sep, port = data.rpartition(":")
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        elif _is_ipv6(address) or _is_ipv6(data):
            raise ValueError("an IPv6 backend goes in brackets, e.g. '[2001:db8::2]:8080'")
        if not sep or not address:
            raise ValueError("must be 'address:port'")
        # Leave a non-numeric port as a string so the field reports it.
        return {"address": address, "port": int(port) if port.isdigit() else port}

    @property
    def key(self) -> str:
        """Stable identity of the backend, e.g. ``10.244.1.2:8080`` or
        ``[2001:db8::2]:8080``; also what the Maglev permutation is derived
        from."""
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


# "a.b.c.d:port" exactly as str(IPv4Address) and int formatting spell them
# (no leading zeros anywhere): text equality is then backend equality.
_CANONICAL_BACKEND = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}):([1-9][0-9]{{0,4}})")
_new = object.__new__
_set = object.__setattr__
# Shared by every backend built from a string: one object, not 200k for the
# collector to walk. Never mutated: the model is frozen, and model_copy()
# copies it before adding to it.
_STRING_FIELDS = {"address", "port"}


def _backend_list(v: Any, handler: Any) -> Any:
    """A service's backends. The common form, a list of "a.b.c.d:port"
    strings with valid ports, is parsed here in one call and the models are
    built directly: BaseModel.model_construct() without its per-field
    Python loop (validating 200k backends one by one was most of a 20k
    service config). tests/test_config.py checks that the result is the
    model validation gives, field for field. Anything else, or any doubt,
    takes the per-backend validation (and its messages)."""
    if not isinstance(v, list):
        return handler(v)
    out = []
    match, aton, from_bytes = _CANONICAL_BACKEND.fullmatch, socket.inet_aton, int.from_bytes
    for item in v:
        m = match(item) if type(item) is str else None
        if m is None or (port := int(m[2])) > 65535:
            return handler(v)
        ip = _new(IPv4Address)
        ip._ip = from_bytes(aton(m[1]), "big")        # what IPv4Address(int) stores
        b = _new(Backend)
        _set(b, "__dict__", {"address": ip, "port": port, "weight": 1, "state": "active"})
        _set(b, "__pydantic_fields_set__", _STRING_FIELDS)
        _set(b, "__pydantic_extra__", None)
        _set(b, "__pydantic_private__", None)
        out.append(b)
    return tuple(out)


class HealthCheck(_Model):
    """Active probing of a service's backends (lb.health). Defaults: a TCP
    connect to the backend's own port every 1 s with a 0.5 s timeout; down
    after 3 consecutive failures, up again after 2 consecutive passes.
    `http` sends GET `path` (default "/") and wants `expect_status` (200)."""

    type: Annotated[Literal["tcp", "http"], BeforeValidator(_lower)] = "tcp"
    interval: Seconds = 1.0
    timeout: Seconds = 0.5
    rise: CheckCount = 2
    fall: CheckCount = 3
    port: Port | None = None             # None: the backend's own port
    # http only; None on a tcp check so config_to_dict() round-trips.
    path: HttpPath | None = None
    expect_status: HttpStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _http_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and _lower(data.get("type")) == "http":
            data = {"path": "/", "expect_status": 200, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> HealthCheck:
        problems = []
        if self.timeout >= self.interval:
            problems.append(f"timeout ({self.timeout:g}s) must be less than interval ({self.interval:g}s)")
        if self.type == "tcp":
            problems += [f"{f} only applies to type http" for f in ("path", "expect_status")
                         if getattr(self, f) is not None]
        if problems:
            raise _Problems(problems)
        return self


class HealthCheckLimits(_Model):
    """What the health checker may spend, all services together: at most
    `max_in_flight` probes at once, `max_probes_per_s` started per second.
    Beyond that, probes queue and the effective interval stretches (status
    shows the lag). One probe costs ~140 us of CPU (bench/health.py)."""

    max_in_flight: Annotated[int, Strict(), _int_range(1, 65536)] = 256
    max_probes_per_s: Annotated[float, Strict(), AfterValidator(_positive_rate)] = 2000.0


class Service(_Model):
    """A (VIP, port, protocol) and its backends and policy."""

    name: ServiceName
    vip: Address
    port: Port
    protocol: Protocol
    backends: Annotated[tuple[Backend, ...], WrapValidator(_backend_list)] = ()
    # None: no policy, everyone allowed. A list (even empty): default deny.
    allow: tuple[IdentityRef, ...] | None = None
    deny: tuple[IdentityRef, ...] = ()
    # None: not probed, every backend counts as up.
    health_check: HealthCheck | None = None
    # Client-IP affinity (Kubernetes sessionAffinity: ClientIP), seconds.
    client_affinity_s: Annotated[int, Strict(), _int_range(1, 86400)] | None = None
    # nat: the LB rewrites the destination (and with snat_address the
    # source); ipip / gue: direct server return, the packet goes unchanged
    # in a tunnel and the backend answers the client itself.
    forwarding: Forwarding = "nat"
    # Maglev's table size M, fixed: None picks it from the active backend
    # count (lb/maglev.py table_size), which re-hashes every new flow of the
    # service when the count crosses a size step. Fixed, adding or removing
    # a backend moves only ~1/N of the flows, on every node alike.
    maglev_table_size: Annotated[int, Strict()] | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Service:
        # Inside config_from_dict() the Config-level pass reports these along
        # with every other cross-entry problem; standalone, check here.
        if not (info.context or {}).get(_COLLECT):
            problems = _service_problems(self)
            if problems:
                raise _Problems(problems)
        return self

    @property
    def key(self) -> tuple[IPv4Address | IPv6Address, int, str]:
        """What the data plane looks the service up by: (vip, port, protocol)."""
        return (self.vip, self.port, self.protocol)

    @property
    def proto_number(self) -> int:
        return IPPROTO[self.protocol]

    @property
    def active_backends(self) -> tuple[Backend, ...]:
        """The backends that take new flows (the Maglev table's members)."""
        return tuple(b for b in self.backends if b.state == "active")

    @property
    def has_policy(self) -> bool:
        return self.allow is not None or bool(self.deny)

    @property
    def dsr(self) -> bool:
        """Direct server return: replies never cross the LB."""
        return self.forwarding != "nat"


class SnatPorts(_Model):
    # Below Linux's default ephemeral range (32768..60999), so SNAT ports do
    # not collide with the host's own outgoing connections.
    min: Port = 10000
    max: Port = 32767

    @model_validator(mode="after")
    def _ordered(self) -> SnatPorts:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    @property
    def count(self) -> int:
        return self.max - self.min + 1


class Limits(_Model):
    """Overrides for the sizable map capacities (constants.h defaults)."""

    maglev_slots: Positive = 262144 * 16
    conntrack: Positive = 262144
    nat: Positive = 262144


class Monitor(_Model):
    """Flow events for `xdplb monitor`, limited in the kernel (monitor.h).
    Limits are per CPU (each CPU has its own token bucket): past them
    events are dropped and counted as `events_lost`, never queued.
    `events_per_second: 0` turns events off."""

    events_per_second: Annotated[int, Strict(), _int_range(0, 1_000_000)] = 1000
    burst: Annotated[int, Strict(), _int_range(1, 1_000_000)] = 200
    # Drops are never sampled (only rate-limited); new forwarded flows are
    # reported one in `sample_forwarded`.
    sample_forwarded: Annotated[int, Strict(), _int_range(1, 1_000_000)] = 1


class FloodGuard(_Model):
    """The data plane's per-CPU bound on new flows that write state
    (bpf/xdp/guard.h). Over it, in gateway mode, packets without state (new
    TCP and UDP flows, TCP that lost its entry) are forwarded to the backend
    a new flow would get without writing state, and their replies are
    recognised by picking again (bpf/xdp/reply.h); in SNAT mode, and for a
    service whose replies need a reverse-NAT entry, they are dropped as
    `new_flow_rate` and their clients retry. Per CPU: the total is this
    times the CPUs that receive traffic. `new_flows_per_second: 0` turns it
    off."""

    # 50k/s per CPU kept an established stream whole under a SYN flood in
    # the lab, 200k/s did not (python -m bench.flood, README "Robustness").
    new_flows_per_second: Annotated[int, Strict(), _int_range(0, 100_000_000)] = 50_000
    burst: Annotated[int, Strict(), _int_range(1, 100_000_000)] = 5_000


class NoBackendReject(_Model):
    """New flows to a service without an active backend are dropped (reason
    `no_backend`) and answered with ICMP port unreachable, as kube-proxy's
    REJECT does, so clients fail at once (bpf/xdp/reject.h). Per CPU:
    `icmp_per_second`, `burst` back to back; beyond, or with 0, the packet
    is only dropped."""

    icmp_per_second: Annotated[int, Strict(), _int_range(0, 1_000_000)] = 1000
    burst: Annotated[int, Strict(), _int_range(1, 1_000_000)] = 100


class KubernetesSource(_Model):
    """`kubernetes:`: services and identities come from a cluster's API
    (lb.sources.kubernetes) instead of `services:`/`identities:`."""

    # None: in-cluster service-account files, else $KUBECONFIG / ~/.kube/config.
    kubeconfig: AbsPath | None = None
    # This node: its addresses serve NodePorts; `*TrafficPolicy: Local` keeps
    # only endpoints whose nodeName is this. None: no NodePorts, Local = none.
    node_name: Annotated[str, Strict()] | None = None
    # kube-proxy's service.kubernetes.io/service-proxy-name: services that
    # carry it are served only if it equals this (None: only unlabelled ones).
    proxy_name: Annotated[str, Strict()] | None = None
    # Watch Pods, Namespaces and NetworkPolicies and enforce ingress rules.
    network_policy: bool = True
    # Events that arrive within this window are applied together.
    batch_ms: Annotated[int, Strict(), _int_range(0, 1000)] = 5
    # List page size (the `limit` query parameter).
    page_size: Annotated[int, Strict(), _int_range(1, 100000)] = 500


class BgpPeer(_Model):
    """One BGP neighbour of this node (the upstream router)."""

    address: Address
    asn: Annotated[int, Strict(), _int_range(1, 2**32 - 1)]


class Bgp(_Model):
    """`bgp:`: announce the VIPs over BGP through a BIRD 2 instance the
    daemon configures (lb.announce; README "Scale-out"). A VIP is announced
    while the program is attached with the running config and its service
    has an active, healthy backend."""

    local_asn: Annotated[int, Strict(), _int_range(1, 2**32 - 1)]
    router_id: Address | None = None     # None: BIRD picks the lowest address
    peers: tuple[BgpPeer, ...]
    # The BIRD config the daemon writes (and its VIP routes beside it, in
    # <stem>-vips.conf) and the control socket it reconfigures BIRD through.
    bird_config: AbsPath = Path("/etc/xdplb/bird.conf")
    bird_socket: AbsPath = Path("/run/xdplb/bird.ctl")
    bfd: bool = True
    bfd_interval_ms: Annotated[int, Strict(), _int_range(10, 10_000)] = 100
    bfd_multiplier: Annotated[int, Strict(), _int_range(1, 255)] = 3
    # RFC 4271: 0 (no keepalives) or at least 3 s; keepalives every third.
    hold_time: Annotated[int, Strict(), _int_range(3, 65535)] = 3

    @field_validator("peers")
    @classmethod
    def _some_peer(cls, v: tuple[BgpPeer, ...]) -> tuple[BgpPeer, ...]:
        if not v:
            raise ValueError("must name at least one peer")
        return v


class Config(_Model):
    """The whole desired state of one load balancer."""

    def encap_families(self) -> frozenset[int]:
        """The IP versions an encap_source is configured for."""
        return frozenset(n.version for n in self.encap_source or ())

    def encap_source_of(self, version: int) -> IPv4Network | IPv6Network | None:
        """The DSR outer source for backends of IP `version` (4 or 6)."""
        return next((n for n in self.encap_source or () if n.version == version), None)

    interfaces: tuple[IfName, ...]
    xdp_mode: Annotated[Literal["native", "generic"], BeforeValidator(_lower)] = "native"
    # None: DNAT-only gateway mode (NAT services only). One address, or a
    # list of one per family: SNAT applies to the NAT services of the
    # families given, the others stay in gateway mode.
    snat_address: SnatAddresses | None = None
    # Outer source of DSR tunnels (ipip/gue services): an address of this
    # LB, or a prefix routed to it whose host bits vary with the flow; one
    # per family (a list) when backends are of both.
    encap_source: EncapSources | None = None
    # GUE's UDP destination port: the backends' decapsulation port.
    gue_port: Port = GUE_PORT_DEFAULT
    snat_ports: SnatPorts = Field(default_factory=SnatPorts)
    hash_seed: Uint32 = DEFAULT_HASH_SEED
    bpffs: AbsPath = Path("/sys/fs/bpf/xdplb")
    api_socket: AbsPath = Path("/run/xdplb/api.sock")
    netns: Annotated[str, Strict(), AfterValidator(_netns_name)] | None = None
    # Prometheus endpoint (lb.metrics); loopback by default, false: none.
    metrics_address: MetricsAddress = DEFAULT_METRICS_ADDRESS
    limits: Limits = Field(default_factory=Limits)
    health_check_limits: HealthCheckLimits = Field(default_factory=HealthCheckLimits)
    monitor: Monitor = Field(default_factory=Monitor)
    # How long the data plane reuses a next hop (MACs, egress) it got from
    # bpf_fib_lookup() for a destination; 0 looks the FIB up on every packet.
    nexthop_cache_ms: Annotated[int, Strict(), _int_range(0, 60_000)] = 1000
    flood_guard: FloodGuard = Field(default_factory=FloodGuard)
    no_backend_reject: NoBackendReject = Field(default_factory=NoBackendReject)
    identities: dict[IdentityName, tuple[Network, ...]] = Field(default_factory=dict)
    services: tuple[Service, ...] = ()
    # Kubernetes mode: the cluster supplies services and identities.
    kubernetes: KubernetesSource | None = None
    # Announce the VIPs over BGP (scale-out behind ECMP); None: off.
    bgp: Bgp | None = None

    @field_validator("interfaces")
    @classmethod
    def _some_interface(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must name at least one interface")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        problems = _cross_checks(self)
        if problems:
            raise _Problems(problems)
        return self

    @property
    def snat(self) -> bool:
        return self.snat_address is not None

    def snat_for(self, version: int) -> IPv4Address | IPv6Address | None:
        """The SNAT address of IP `version` (4 or 6); None: gateway mode."""
        return next((ip for ip in self.snat_address or () if ip.version == version), None)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def identity_ids(self, user_min: int | None = None, world: int | None = None) -> dict[str, int]:
        """Name -> numeric identity, `world` included. Raises ConfigError if
        two names hash to the same id under these constants."""
        ids, problems = _identity_ids(self.identities, user_min, world)
        if problems:
            raise ConfigError(problems)
        return ids


def identity_id(name: str, user_min: int | None = None) -> int:
    """The numeric identity of `name`: a hash, so no state has to be kept."""
    lo = IDENTITY_USER_MIN if user_min is None else user_min
    if not 0 <= lo < IDENTITY_ID_LIMIT:
        raise ValueError(f"user_min {lo} is outside [0, 2**31)")
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
    return lo + h % (IDENTITY_ID_LIMIT - lo)


def _identity_ids(
    names: Mapping[str, Any], user_min: int | None, world: int | None
) -> tuple[dict[str, int], list[str]]:
    world_id = IDENTITY_WORLD if world is None else world
    lo = IDENTITY_USER_MIN if user_min is None else user_min
    ids = {WORLD: world_id}
    owner: dict[int, str] = {world_id: WORLD}
    problems = []
    if world_id >= lo:
        problems.append(f"identity constants: world ({world_id}) must be below user_min ({lo})")
    for name in names:
        i = identity_id(name, lo)
        if i in owner:
            problems.append(
                f"identities[{name!r}]: its id {i} collides with identities[{owner[i]!r}]; rename one"
            )
        owner.setdefault(i, name)
        ids[name] = i
    return ids, problems


def _table_size_problems(svc: Service) -> list[str]:
    m = svc.maglev_table_size
    if m is None:
        return []
    from .maglev import PRIMES        # numba's import only for configs that use it

    if m not in PRIMES:
        return [f"maglev_table_size {m}: must be one of the table sizes {', '.join(map(str, PRIMES))}"]
    active = len(svc.active_backends)
    if m < 100 * active and m != PRIMES[-1]:
        return [f"maglev_table_size {m}: too small for {active} active backends "
                f"(at least 100 slots each, or {PRIMES[-1]})"]
    return []


def _service_problems(svc: Service) -> list[str]:
    """Rules between the entries of one service (messages relative to it)."""
    problems: list[str] = []
    keys = [(b.address._ip << 16) | b.port for b in svc.backends]   # b.key formats strings
    if len(set(keys)) != len(keys):          # the rare case: say which ones
        seen: dict[int, int] = {}
        for i, (b, k) in enumerate(zip(svc.backends, keys)):
            if k in seen:
                problems.append(f"backends[{i}] '{b.key}': duplicate of backends[{seen[k]}]")
            seen.setdefault(k, i)
    for field in ("allow", "deny"):
        names = getattr(svc, field) or ()
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(f"{field}[{i}] '{name}': listed twice")
    for name in dict.fromkeys(svc.allow or ()):
        if name in svc.deny:
            problems.append(f"identity '{name}' is in both allow and deny")
    hc = svc.health_check
    if hc is not None and svc.protocol == "udp" and hc.port is None:
        # Probes are TCP or HTTP: the backends' UDP port cannot answer them.
        problems.append("health_check: a udp service needs health_check.port (a TCP port to probe)")
    problems += _table_size_problems(svc)
    if svc.dsr:
        problems += _dsr_problems(svc)
    else:
        # NAT rewrites addresses in place: one family end to end (no NAT64).
        problems += [f"backends[{i}] '{b.key}': an IPv{b.address.version} backend of an "
                     f"IPv{svc.vip.version} VIP (a service's VIP and its backends are of one family)"
                     for i, b in enumerate(svc.backends) if b.address.version != svc.vip.version]
    return problems


def _dsr_problems(svc: Service) -> list[str]:
    """A DSR service's packet reaches its backend unchanged: addressed to
    the VIP and the service's port."""
    problems = [f"backends[{i}] '{b.key}': forwarding {svc.forwarding} does not rewrite the port: "
                f"the backend must serve the service's port {svc.port}"
                for i, b in enumerate(svc.backends) if b.port != svc.port]
    hc = svc.health_check
    if hc is not None and hc.type != "tcp":
        # DSR probes go through the tunnel as a bare SYN (lb/tunnel_probe.py).
        problems.append(f"health_check: forwarding {svc.forwarding} is checked with type tcp "
                        f"(a SYN through the tunnel), not {hc.type}")
    return problems


def encap_problems(svc: Service, families: frozenset[int]) -> list[str]:
    """What a DSR service lacks among the tunnels' outer sources: the outer
    header is of the backend's family, whatever the inner one."""
    if not families:
        return [f"forwarding {svc.forwarding} needs encap_source "
                f"(an address of this LB for the tunnels' outer source)"]
    return [f"backends[{k}] '{b.key}': forwarding {svc.forwarding} to an IPv{b.address.version} "
            f"backend needs an IPv{b.address.version} encap_source"
            for k, b in enumerate(svc.backends) if b.address.version not in families]


def _svc(i: int, s: Service) -> str:
    return f"services[{i}] '{s.name}'"


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that span entries; each message names every entry involved."""
    problems: list[str] = []
    if cfg.kubernetes is not None:
        problems += [f"{f}: must be empty with kubernetes: (the cluster supplies them)"
                     for f in ("services", "identities") if getattr(cfg, f)]

    first_if: dict[str, int] = {}
    for i, name in enumerate(cfg.interfaces):
        if name in first_if:
            problems.append(f"interfaces[{i}] '{name}': listed twice (also interfaces[{first_if[name]}])")
        first_if.setdefault(name, i)

    cidr_owner: dict[IPv4Network | IPv6Network, tuple[str, int]] = {}
    for ident, nets in cfg.identities.items():
        for j, net in enumerate(nets):
            where = f"identities[{ident!r}][{j}] '{net}'"
            if net in cidr_owner:
                other, k = cidr_owner[net]
                if other == ident:
                    problems.append(f"{where}: listed twice")
                else:
                    problems.append(f"{where}: also in identities[{other!r}]; a CIDR can have one identity")
            else:
                cidr_owner[net] = (ident, j)
    problems += _identity_ids(cfg.identities, None, None)[1]

    names: dict[str, int] = {}
    keys: dict[tuple[int, int, str], int] = {}
    known = set(cfg.identities) | {WORLD}
    for i, s in enumerate(cfg.services):
        problems += [f"{_svc(i, s)}: {m}" for m in _service_problems(s)]
        if s.dsr:
            problems += [f"{_svc(i, s)}: {m}" for m in encap_problems(s, cfg.encap_families())]
        if s.name in names:
            j = names[s.name]
            problems.append(f"{_svc(i, s)}: name already used by services[{j}]")
        names.setdefault(s.name, i)
        key = (s.vip._ip, s.port, s.protocol)      # s.key: IPv4Address hashes in Python
        if key in keys:
            j = keys[key]
            problems.append(
                f"{_svc(i, s)}: {s.vip}:{s.port}/{s.protocol} is already used by {_svc(j, cfg.services[j])}"
            )
        keys.setdefault(key, i)
        for field in ("allow", "deny"):
            for k, ref in enumerate(getattr(s, field) or ()):
                if ref not in known:
                    defined = ", ".join(sorted(known))
                    problems.append(
                        f"{_svc(i, s)}: {field}[{k}] '{ref}': unknown identity '{ref}' (defined: {defined})"
                    )
    if cfg.bgp is not None:
        problems += _bgp_family_problems(cfg)
    return problems


def _bgp_family_problems(cfg: Config) -> list[str]:
    """A VIP is announced to the peers of its family only (lb.announce): a
    family of VIPs without a peer would never be announced."""
    peer_versions = {p.address.version for p in cfg.bgp.peers}
    problems = []
    for version in (4, 6):
        first = next(((i, s) for i, s in enumerate(cfg.services) if s.vip.version == version), None)
        if first is not None and version not in peer_versions:
            problems.append(f"bgp.peers: no IPv{version} peer to announce the IPv{version} VIPs "
                            f"(first: {_svc(*first)}); BGP sessions carry their own family only")
    return problems


# ---- loading and error translation --------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one),
    on libyaml's parser where PyYAML has it (its wheels do): a 20k-service
    config loads ~3 times faster than with the pure-Python parser."""


def _mapping_no_dups(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            dup = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_dups)


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read: {getattr(e, 'strerror', None) or e}"], str(path)) from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError([f"YAML syntax error at {at}{what}"], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML error: {e}"], source) from None
    return config_from_dict(data, source=source)


def config_from_dict(d: Any, source: str | None = None) -> Config:
    if not isinstance(d, Mapping):
        what = "empty" if d is None else f"a {type(d).__name__}"
        raise ConfigError([f"the config must be a mapping, not {what}"], source)
    try:
        with gcpause.paused():
            return Config.model_validate(d, context={_COLLECT: True})
    except ValidationError as e:
        raise ConfigError(_translate(e, d), source) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (YAML/JSON-safe) that config_from_dict() turns back into
    an equal Config. Backends with default weight and state are written in
    the short "ip:port" form."""
    d = cfg.model_dump(mode="json", exclude_none=True)
    for svc, out in zip(cfg.services, d["services"]):
        out["backends"] = [
            b.key if (b.weight, b.state) == (1, "active") else {**bm}
            for b, bm in zip(svc.backends, out["backends"])
        ]
    return d


# Messages from pydantic's own checks, reworded to match ours.
_MESSAGES = {
    "missing": "is required",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "string_type": "must be a string",
    "float_type": "must be a number",
}


def _translate(e: ValidationError, raw: Any) -> list[str]:
    out: list[str] = []
    for err in e.errors():
        loc = list(err["loc"])
        if loc and loc[-1] == "[key]":  # an identity name: the dict key is the entry
            loc.pop()
        exc = (err.get("ctx") or {}).get("error")
        if err["type"] == "extra_forbidden":
            where = _where(loc[:-1], raw)
            msg = f"unknown key {loc[-1]!r}"
            out.append(f"{where}: {msg}" if where else msg)
            continue
        if isinstance(exc, _Problems):
            where = _where(loc, raw)
            out += [f"{where}: {m}" if where else m for m in exc.messages]
            continue
        if isinstance(exc, Exception):
            msg = str(exc)
        else:
            msg = _MESSAGES.get(err["type"]) or err["msg"].replace("Input should be", "must be")
        out.append(_join(_where(loc, raw), loc, msg))
    return out


def _join(where: str, loc: list, msg: str) -> str:
    if not where:
        return msg
    # "port must be in 1..65535" reads better than "port: must be ..."
    if loc and isinstance(loc[-1], str) and msg.startswith(("must ", "is ", "has ")):
        return f"{where} {msg}"
    return f"{where}: {msg}"


def _label(field: str | None, item: Any) -> str:
    """How an entry of a list is named in messages: the service's name, the
    backend as written, the CIDR, ..."""
    if field == "services" and isinstance(item, Mapping):
        name = item.get("name")
        return f" '{name}'" if isinstance(name, str) and name else ""
    if field == "backends" and isinstance(item, Mapping):
        a, p = item.get("address"), item.get("port")
        return f" '{a}:{p}'" if a is not None and p is not None else ""
    if isinstance(item, (str, int)) and not isinstance(item, bool):
        return f" '{item}'"
    return ""


def _where(loc: list, raw: Any) -> str:
    """Render a pydantic location against the raw input, e.g.
    ('services', 2, 'backends', 1) -> "services[2] 'api': backends[1] '...'"."""
    out = ""
    node: Any = raw
    field: str | None = None  # the list or dict being indexed
    after_item = False  # the last segment named a labelled entry
    for seg in loc:
        if isinstance(seg, int):
            item = node[seg] if isinstance(node, (list, tuple)) and seg < len(node) else None
            out += f"[{seg}]{_label(field, item)}"
            node, after_item = item, True
        elif field == "identities" and isinstance(node, Mapping):
            # A key of the free-form identities mapping, not a model field.
            out += f"[{seg!r}]"
            node, field, after_item = node.get(seg), seg, True
        else:
            sep = ": " if after_item else "."
            out += (sep if out else "") + str(seg)
            node = node.get(seg) if isinstance(node, Mapping) else None
            field, after_item = str(seg), False
    return out
