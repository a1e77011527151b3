"""Interface name <-> index lookups over rtnetlink (pyroute2), optionally in a netns."""
from __future__ import annotations

import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import InterfaceNotFound

NETNS_RUN_DIR = "/var/run/netns"


def _iproute(interface: str | int, netns: str | None) -> IPRoute:
    if netns is None:
        return IPRoute()
    # flags=0: a lookup must never create the netns as a side effect.
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
        raise InterfaceNotFound(interface, netns, " (the netns does not exist)")
    return IPRoute(netns=netns, flags=0)


def ifindex(name: str, netns: str | None = None) -> int:
    with _iproute(name, netns) as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        raise InterfaceNotFound(name, netns)
    return found[0]


def _link(index: int, netns: str | None):
    with _iproute(f"ifindex {index}", netns) as ipr:
        try:
            links = ipr.get_links(index) if index > 0 else []
        except NetlinkError:  # ENODEV
            links = []
    if not links:
        raise InterfaceNotFound(f"ifindex {index}", netns)
    return links[0]


def mac(index: int, netns: str | None = None) -> bytes:
    """The hardware address of interface `index` (6 bytes for Ethernet;
    empty for a link without one)."""
    return bytes.fromhex((_link(index, netns).get("IFLA_ADDRESS") or "").replace(":", ""))


def ifname(index: int, netns: str | None = None) -> str:
    return _link(index, netns).get("ifname")
