"""IPv6 in what the operator sees: `[addr]:port` wherever a port follows an
address (flow, monitor, stats, metrics, status), addresses read back from
the data plane's `addr[4]` words. Pure: no root, no kernel; the flow
event's layout and constants come from the built object's BTF."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.endpoint import host_port, host_text, parse_address, parse_endpoint
from lb.flow import craft
from lb.metrics import Snapshot, families
from lb.monitor import Decoder, Names

ROOT = Path(__file__).resolve().parent.parent
OBJECT = ROOT / "bpf" / "xdp" / "xdplb.o"


def test_endpoints_are_bracketed_only_for_ipv6():
    assert host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert host_port(ipaddress.ip_address("2001:db8::2"), 8080) == "[2001:db8::2]:8080"
    assert host_text("fe80::1") == "[fe80::1]" and host_text("192.0.2.1") == "192.0.2.1"
    assert parse_endpoint("[2001:DB8::0002]:443") == (ipaddress.IPv6Address("2001:db8::2"), 443)
    assert parse_endpoint("10.1.0.10:50000") == (ipaddress.IPv4Address("10.1.0.10"), 50000)
    assert parse_address("[::1]") == ipaddress.IPv6Address("::1")


@pytest.mark.parametrize("text, message", [
    ("2001:db8::2:80", "takes brackets"),           # ambiguous without them
    ("[2001:db8::2]", "expected ADDRESS:PORT"),
    ("[2001:db8::zz]:80", "not an IPv4 or IPv6 address"),
    ("[2001:db8::2]:0", "port must be in 1..65535"),
    ("10.0.0.1:http", "port must be in 1..65535"),
])
def test_bad_endpoints_get_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_endpoint(text)
    assert "\n" not in str(e.value) and text in str(e.value)


def test_flow_crafts_either_family_and_refuses_a_mix():
    v6 = Ether(craft("2001:db8:1::10", 40000, "2001:db8:96::a", 80, "tcp"))
    assert v6[IPv6].src == "2001:db8:1::10" and v6[IPv6].dst == "2001:db8:96::a" and v6[TCP].flags == "S"
    v4 = Ether(craft("10.1.0.10", 40000, "10.96.0.10", 53, "udp"))
    assert v4[IP].dst == "10.96.0.10" and v4[UDP].dport == 53
    with pytest.raises(ValueError, match="not of one address family"):
        craft("10.1.0.10", 1, "2001:db8::1", 80, "tcp")


@pytest.fixture(scope="module")
def decoder():
    from loader import Btf, Layouts

    from lb.dataplane import Constants

    if not OBJECT.exists():
        pytest.fail(f"{OBJECT} missing: run `make bpf`")
    btf = Btf.from_elf(OBJECT)
    return Decoder(Constants(btf.enums())), Layouts(btf).struct("flow_event")


def _words(addr: str) -> list[int]:
    raw = ipaddress.ip_address(addr).packed.ljust(16, b"\0")
    return list(np.frombuffer(raw, dtype="<u4"))


def test_monitor_decodes_an_ipv6_flow_event(decoder):
    dec, record = decoder
    c = dec.c
    e = record()
    e.family = c.FAMILY_IPV6
    e.proto = socket.IPPROTO_TCP
    for field, addr in (("src", "2001:db8:1::10"), ("dst", "2001:db8:96::a"), ("backend_addr", "fd00:244::2")):
        getattr(e, field)[:] = _words(addr)
    e.sport, e.dport, e.backend_port = (socket.htons(p) for p in (40000, 80, 8080))
    e.verdict = c.EVENT_FORWARDED
    e.svc_id, e.identity = 7, c.IDENTITY_WORLD
    ev = dec.decode(e, Names(services={7: "web6"}))
    assert (ev.src, ev.dst, ev.backend) == ("2001:db8:1::10", "2001:db8:96::a", "[fd00:244::2]:8080")
    assert ev.line() == "(world) [2001:db8:1::10]:40000 => web6 [2001:db8:96::a]:80 -> [fd00:244::2]:8080 tcp FORWARDED"
    e.family, e.proto = c.FAMILY_IPV4, socket.IPPROTO_UDP                  # IPv4 unchanged
    e.src[:] = _words("10.1.0.10")
    e.dst[:] = _words("10.96.0.10")
    e.backend_addr[:] = _words("10.244.1.2")
    ev = dec.decode(e, Names(services={7: "dns"}))
    assert ev.line() == "(world) 10.1.0.10:40000 => dns 10.96.0.10:80 -> 10.244.1.2:8080 udp FORWARDED"


def test_prometheus_backend_labels_bracket_ipv6():
    s = Snapshot()
    v6, v4 = ipaddress.ip_address("2001:db8:96::a"), ipaddress.ip_address("10.96.0.10")
    s.services = [(0, "web6", v6, 80, "tcp", [(0, ipaddress.ip_address("fd00:244::2"), 8080, 1)]),
                  (1, "web", v4, 80, "tcp", [(1, ipaddress.ip_address("10.244.1.2"), 8080, 1)])]
    s.backend_states = {1: "active"}
    s.svc_counts = np.array([[5, 500], [6, 600]])
    s.backend_counts = np.array([[5, 500], [6, 600]])
    got = {m.name: [sample.labels for sample in m.samples] for m in families(s, None)}
    assert {"service": "web6", "vip": "2001:db8:96::a", "port": "80", "protocol": "tcp"} in \
        got["xdplb_service_packets"]
    backends = {lab["backend"] for lab in got["xdplb_backend_packets"]}
    assert backends == {"[fd00:244::2]:8080", "10.244.1.2:8080"}
