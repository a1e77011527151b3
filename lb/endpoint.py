"""Addresses and `address:port` in text, for either family.

One spelling everywhere xdplb prints or reads an endpoint: IPv4 as
`10.0.0.1:80`, IPv6 in brackets as `[2001:db8::1]:80` (RFC 3986), the
address itself in its compressed form (str() of ipaddress).
"""

from __future__ import annotations

import ipaddress
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_text(addr: Any) -> str:
    """An address as it stands before `:port`: in brackets if IPv6."""
    text = str(addr)
    return f"[{text}]" if ":" in text else text


def host_port(addr: Any, port: int | str) -> str:
    return f"{host_text(addr)}:{port}"


def parse_address(text: str) -> IPAddress:
    """An address of either family; brackets around IPv6 are accepted."""
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]")
                                    if text.startswith("[") else text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """`a.b.c.d:port` or `[v6]:port` -> (address, port)."""
    if text.startswith("["):
        host, sep, port = text.partition("]:")
        host += "]"
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: an IPv6 address takes brackets before its port, as [2001:db8::1]:80")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT ([ADDRESS]:PORT for IPv6)")
    try:
        addr = parse_address(host)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port must be in 1..65535")
    return addr, int(port)
