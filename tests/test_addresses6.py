"""IPv6 encodings of the control plane, without a kernel: the 16-byte
address words, backend keys of both families, reply-index keys, Maglev
keys. The map layouts are the ones maps.h declares (checked against BTF by
the root tests that write them: test_packets6.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from types import SimpleNamespace

import numpy as np

from lb.config import Backend
from lb.dataplane import addr_words, is_ipv6_int, words_addr
from lb.reconcile import _backend_addrs, _backend_key, _int_array, bkey
from lb.replies import ReplyIndex, addr_key

C = SimpleNamespace(FAMILY_IPV4=2, FAMILY_IPV6=10)
# struct backend_addr (maps.h): __u32 addr[4]; __u16 port; __u8 proto; __u8 family.
BACKEND_ADDR = np.dtype([("addr", "<u4", (4,)), ("port", "<u2"), ("proto", "u1"), ("family", "u1")])


def test_words_are_network_order_bytes_and_round_trip():
    v6 = IPv6Address("2001:db8::1:2")
    words = addr_words(v6)
    assert np.array(words, "<u4").tobytes() == v6.packed
    assert words_addr(words, C.FAMILY_IPV6, C) == v6
    v4 = IPv4Address("10.244.1.2")
    assert addr_words(v4) == [int.from_bytes(v4.packed, "little"), 0, 0, 0]
    assert words_addr(addr_words(v4), C.FAMILY_IPV4, C) == v4


def test_backend_keys_never_collide_across_families():
    v4, v6 = IPv4Address("10.0.0.1"), IPv6Address("fd00::a00:1")
    assert not is_ipv6_int(v4._ip) and is_ipv6_int(v6._ip)
    assert bkey(v4, 80) != bkey(v6, 80)
    assert _int_array([v4._ip, v6._ip]).dtype == object
    assert _int_array([v4._ip]).dtype == np.int64


def test_reply_index_keys_of_both_families():
    v4, v6 = IPv4Address("10.244.1.2"), IPv6Address("fd00:244:1::2")
    keys = np.array([addr_key(bkey(v4, 8080), 6), addr_key(bkey(v6, 8080), 6)], dtype=object)
    out = _backend_addrs(BACKEND_ADDR, keys, C)
    assert out[0]["addr"].tobytes() == v4.packed + bytes(12) and out[0]["family"] == C.FAMILY_IPV4
    assert out[1]["addr"].tobytes() == v6.packed and out[1]["family"] == C.FAMILY_IPV6
    assert out["port"].tolist() == [int.from_bytes((8080).to_bytes(2, "big"), "little")] * 2
    assert out["proto"].tolist() == [6, 6]
    # IPv4 alone: the numpy path gives the same bytes as the struct path.
    many = np.array([addr_key(bkey(IPv4Address(f"10.0.{i}.2"), 80), 17) for i in range(20)], np.int64)
    assert _backend_addrs(BACKEND_ADDR, many, C).tobytes() == b"".join(
        _backend_addrs(BACKEND_ADDR, many[i:i + 1], C).tobytes() for i in range(20))


def test_reply_index_takes_ipv6_keys_in_bulk():
    idx = ReplyIndex(8)
    keys = _int_array([addr_key(bkey(IPv6Address(f"fd00::{i}:2"), 80), 6) for i in range(1, 4)])
    idx.add_many(np.array([5, 5, 6], np.uint32), keys)
    d = idx.take_dirty()
    assert sorted(d.keys.tolist()) == sorted(keys.tolist()) and d.values[:, 0].tolist() == [5, 5, 6]
    idx.remove(5, keys.tolist()[0])
    assert idx.take_dirty().deletes.tolist() == [keys.tolist()[0]]


def test_maglev_key_is_the_backend_key():
    b = Backend.model_validate("[fd00:244:1::2]:8080")
    assert _backend_key(b.address._ip, b.port) == b.key == "[fd00:244:1::2]:8080"
    b4 = Backend.model_validate("10.0.0.2:80")
    assert _backend_key(b4.address._ip, b4.port) == b4.key
