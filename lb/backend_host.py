"""What a DSR backend's kernel needs besides the decap program.

- **The VIPs as local addresses.** The decapsulated packet is addressed to
  the VIP; the stack delivers it only if the VIP is local. Each VIP goes on
  `lo` as a /32 or /128, marked with our address protocol (IFA_PROTO,
  Linux >= 6.1), so that a later run removes exactly the addresses it added
  and never one an administrator configured.
- **No ARP for the VIPs.** Linux answers ARP for any local address on any
  interface (arp_ignore=0), so a backend on the same link as the router or
  clients would claim the VIP and draw the clients' traffic to itself,
  bypassing the balancer. arp_ignore=1 on the attached interface answers
  only for addresses configured on it; arp_announce=2 keeps the VIP out of
  the backend's own ARP requests. Raised only for IPv4 VIPs, only on the
  attached interface, and never lowered. IPv6 needs nothing: neighbour
  discovery answers only for addresses of the receiving interface.
- **rp_filter.** The inner packet's source is the client, and it arrives on
  the attached interface. Strict reverse-path filtering (1) drops it unless
  the route back to the client leaves through that interface; loose (2) or
  off (0) accept it. Reported, never changed.

Everything here acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from loader import InterfaceNotFound

from .backend import BackendError, IPAddress, address_order

# IFA_PROTO value that marks a VIP address this module added (0..3 are the
# kernel's own: unspec, kernel_lo, kernel_ra, kernel_ll). 0x78 is "x".
VIP_ADDR_PROTO = 0x78
VIP_DEVICE = "lo"
IFA_F_NODAD = 0x02
# The lowest values that keep the VIP out of ARP (see the module docstring).
ARP_SETTINGS = {"arp_ignore": 1, "arp_announce": 2}


def ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise InterfaceNotFound(ifname)
    return found[0]


def interface_addresses(ifname: str) -> list[IPAddress]:
    """The addresses a load balancer may tunnel to: every IPv4 and every
    non-link-local IPv6 address of the interface."""
    with IPRoute() as ipr:
        idx = ifindex(ipr, ifname)
        out = []
        for a in ipr.get_addr(index=idx):
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if not (ip.version == 6 and ip.is_link_local):
                out.append(ip)
    return sorted(set(out), key=address_order)


def _local_addresses(ipr: IPRoute, lo: int) -> dict[IPAddress, tuple[int, int | None]]:
    """Every local address -> (ifindex, IFA_PROTO or None); lo's entry wins
    for an address that is on several interfaces."""
    out: dict[IPAddress, tuple[int, int | None]] = {}
    for a in ipr.get_addr():
        ip = ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
        if ip not in out or a["index"] == lo:
            out[ip] = (a["index"], a.get_attr("IFA_PROTO"))
    return out


def vip_addresses() -> dict[IPAddress, str]:
    """VIP-like addresses on lo and who put them there: "xdplb" or "other"."""
    with IPRoute() as ipr:
        lo = ifindex(ipr, VIP_DEVICE)
        return {ip: "xdplb" if proto == VIP_ADDR_PROTO else "other"
                for ip, (idx, proto) in _local_addresses(ipr, lo).items()
                if idx == lo and not ip.is_loopback}


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def add_vip_addresses(vips: set[IPAddress]) -> list[IPAddress]:
    """Make every VIP a local address (on lo, marked as ours). A VIP that is
    already local, on any interface and put there by anyone, is left as it
    is. Returns the addresses added."""
    added = []
    with IPRoute() as ipr:
        lo = ifindex(ipr, VIP_DEVICE)
        for ip in sorted(vips - set(_local_addresses(ipr, lo)), key=address_order):
            try:
                ipr.addr("add", index=lo, address=str(ip), prefixlen=ip.max_prefixlen,
                         family=_family(ip), proto=VIP_ADDR_PROTO, flags=IFA_F_NODAD)
            except NetlinkError as e:
                hint = " (is IPv6 disabled?)" if ip.version == 6 else ""
                raise BackendError(f"cannot add VIP {ip} to {VIP_DEVICE}: "
                                   f"{os.strerror(e.code)}{hint}") from None
            added.append(ip)
    return added


def remove_vip_addresses(keep: set[IPAddress]) -> list[IPAddress]:
    """Remove the addresses we added on lo for VIPs not in `keep`."""
    removed = []
    with IPRoute() as ipr:
        lo = ifindex(ipr, VIP_DEVICE)
        for ip, (idx, proto) in sorted(_local_addresses(ipr, lo).items(), key=lambda i: address_order(i[0])):
            if idx == lo and proto == VIP_ADDR_PROTO and ip not in keep:
                ipr.addr("del", index=lo, address=str(ip), prefixlen=ip.max_prefixlen,
                         family=_family(ip))
                removed.append(ip)
    return removed


def ipv6_enabled(ifname: str = VIP_DEVICE) -> bool:
    """Whether `ifname` can hold IPv6 addresses (not disable_ipv6)."""
    conf = Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6"
    return conf.exists() and conf.read_text().strip() == "0"


def _conf(ifname: str, key: str) -> Path:
    return Path("/proc/sys/net/ipv4/conf") / ifname / key


def read_conf(ifname: str, key: str) -> int:
    return int(_conf(ifname, key).read_text())


def quiet_arp(ifname: str) -> dict[str, int]:
    """Raise arp_ignore/arp_announce on `ifname` to what keeps the VIPs out
    of ARP; returns the settings changed (name -> new value)."""
    changed = {}
    for key, want in ARP_SETTINGS.items():
        # The kernel uses max(all, interface): only the interface is ours to set.
        if max(read_conf("all", key), read_conf(ifname, key)) >= want:
            continue
        _conf(ifname, key).write_text(f"{want}\n")
        changed[f"net.ipv4.conf.{ifname}.{key}"] = want
    return changed


def rp_filter_note(ifname: str) -> str | None:
    """A warning when strict reverse-path filtering is on for `ifname`."""
    value = max(read_conf("all", "rp_filter"), read_conf(ifname, "rp_filter"))
    if value != 1:
        return None
    return (f"rp_filter is strict (1) on {ifname}: decapsulated packets from clients whose "
            f"route does not leave through {ifname} are dropped; set "
            f"net.ipv4.conf.{ifname}.rp_filter=2 (loose) if clients are routed elsewhere")
