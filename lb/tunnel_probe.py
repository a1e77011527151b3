"""Health probes of DSR backends, through the tunnel the data plane uses.

A DSR backend answers from the VIP, and only if it decapsulates: a plain
TCP connect to its own address would pass on a backend that black-holes
every client. So the probe is a TCP SYN from this host to VIP:port,
carried to the backend in the service's encapsulation (bpf/xdp/encap.h):

- ipip: a raw IPPROTO_IPIP socket; the kernel adds the outer IPv4 header
  (protocol 4) to our inner IPv4 header + SYN. No tunnel driver needed.
- gue: a UDP socket to backend:gue_port whose payload is the inner packet
  (GUE variant 1: no GUE header).

The backend answers directly, from the VIP to our address; a raw TCP
socket, filtered in the kernel (classic BPF) down to that VIP and port and
our address and port, reads the answer. A SYN-ACK acknowledging our SYN
passes, and is reset through the tunnel at once (the kernel's own reset
goes towards the VIP, which is not always routed back to the backend: its
half-open connection would retransmit SYN-ACKs for half a minute); an RST
acknowledging it is "connection refused". Any other segment (a stray
SYN-ACK of another probe's connection, from another backend: they all
answer from the VIP) is not ours. An ICMP error on the tunnel socket
(protocol or port unreachable: nothing decapsulates) is a failure at once;
silence is a timeout.

Both families, each the address's: the outer header is the backend's
family (a raw AF_INET6 socket of protocol 4 or 41 for ipip: IPv4 or IPv6
in IPv6; GUE over UDP/IPv6), the inner one the VIP's. An IPv6 raw socket
delivers the TCP segment without its IPv6 header: its filter matches the
ports, and the VIP is checked on the sender's address.

Raw sockets need CAP_NET_RAW.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import random
import socket
import struct

__all__ = ["syn_through_tunnel", "inner_segment", "answer_filter"]

SO_ATTACH_FILTER = 26
IPPROTO_IPIP, IPPROTO_IPV6 = 4, 41        # ipip: the inner header's protocol (IPv4, IPv6)
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
# Source ports of probes: the Linux default ephemeral range. One per probe
# in flight (two probes to one VIP:port differ only by it).
PORT_RANGE = (32768, 60999)
_ports_in_use: set[int] = set()
# Errors the tunnel socket reports for an ICMP error from the backend.
# ICMPv6 has no protocol unreachable: an unknown next header is a parameter
# problem (code 1), which the kernel reports as EPROTO.
_UNREACHABLE = {errno.ECONNREFUSED: "port unreachable", errno.ENOPROTOOPT: "protocol unreachable",
                errno.EPROTO: "protocol unreachable",
                errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable"}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def inner_segment(src: str, sport: int, vip: str, port: int, seq: int, ident: int,
                  flags: int = TCP_SYN) -> bytes:
    """An IP header (the VIP's family) and a TCP segment without options or
    data (a SYN, or the RST that ends a probe) from src:sport to vip:port,
    checksums set: what a client would send to the VIP."""
    af = _family(vip)
    saddr, daddr = socket.inet_pton(af, src), socket.inet_pton(af, vip)
    tcp = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 5 << 4, flags, 64240 if flags & TCP_SYN else 0, 0, 0)
    length = struct.pack("!I", len(tcp)) if af == socket.AF_INET6 else struct.pack("!H", len(tcp))
    pseudo = (saddr + daddr + length + b"\0\0\0" + bytes([socket.IPPROTO_TCP]) if af == socket.AF_INET6
              else saddr + daddr + b"\0" + bytes([socket.IPPROTO_TCP]) + length)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if af == socket.AF_INET6:             # flow label: the ident, so probes differ
        return struct.pack("!IHBB16s16s", 6 << 28 | ident, len(tcp), socket.IPPROTO_TCP, 64,
                           saddr, daddr) + tcp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def answer_filter(vip: str, port: int, src: str, sport: int) -> bytes:
    """Classic BPF for a raw TCP socket: only segments from vip:port to
    src:sport (the socket sees every TCP segment the host receives). An
    IPv6 raw socket's filter sees the segment without the IPv6 header:
    there it matches the ports (the caller checks the sender)."""
    if _family(vip) == socket.AF_INET6:
        prog = [
            (0x28, 0, 0, 0),            # 0 ldh [0]: TCP source port
            (0x15, 0, 3, port),         # 1 jeq port, else to 5
            (0x28, 0, 0, 2),            # 2 ldh [2]: TCP destination port
            (0x15, 0, 1, sport),        # 3 jeq sport, else to 5
            (0x06, 0, 0, 0xFFFF),       # 4 ret: accept
            (0x06, 0, 0, 0),            # 5 ret 0: drop
        ]
        return b"".join(struct.pack("HBBI", *ins) for ins in prog)

    def word(addr: str) -> int:
        return struct.unpack("!I", socket.inet_aton(addr))[0]

    prog = [                            # (code, jump if true, jump if false, k)
        (0xB1, 0, 0, 0),                # 0 ldxb 4*([0]&0xf): X = the IP header's length
        (0x48, 0, 0, 0),                # 1 ldh [x+0]: TCP source port
        (0x15, 0, 6, port),             # 2 jeq port, else to 9
        (0x48, 0, 0, 2),                # 3 ldh [x+2]: TCP destination port
        (0x15, 0, 4, sport),            # 4 jeq sport, else to 9
        (0x20, 0, 0, 12),               # 5 ld [12]: IP source address
        (0x15, 0, 2, word(vip)),        # 6 jeq vip, else to 9
        (0x20, 0, 0, 16),               # 7 ld [16]: IP destination address
        (0x15, 1, 0, word(src)),        # 8 jeq src: to 10
        (0x06, 0, 0, 0),                # 9 ret 0: drop
        (0x06, 0, 0, 0xFFFF),           # 10 ret: accept
    ]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _attach_filter(sock: socket.socket, code: bytes) -> None:
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _source_towards(host: str) -> str:
    """The address this host sends from towards `host` (a route lookup;
    connecting a UDP socket sends nothing)."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _take_port() -> int:
    for _ in range(64):
        port = random.randint(*PORT_RANGE)
        if port not in _ports_in_use:
            _ports_in_use.add(port)
            return port
    raise OSError(errno.EADDRINUSE, "no free probe source port")


def _tunnel_socket(mode: str, backend: str, vip: str, gue_port: int) -> socket.socket:
    """Connected, so that an ICMP error from the backend is reported on it."""
    if mode == "ipip":
        inner = IPPROTO_IPV6 if _family(vip) == socket.AF_INET6 else IPPROTO_IPIP
        s = socket.socket(_family(backend), socket.SOCK_RAW, inner)
        s.connect((backend, 0))
    elif mode == "gue":
        s = socket.socket(_family(backend), socket.SOCK_DGRAM)
        s.connect((backend, gue_port))
    else:
        raise ValueError(f"not a tunnel: {mode!r}")
    s.setblocking(False)
    return s


def _verdict(segment: bytes, seq: int, ip_header: bool = True) -> str | None | bool:
    """None: the SYN-ACK we wait for; a string: why the probe failed; False:
    not an answer to our SYN (keep waiting). `segment` starts with its IPv4
    header, or (ip_header False: an IPv6 raw socket) with the TCP header."""
    ihl = (segment[0] & 0x0F) * 4 if ip_header else 0
    if len(segment) < ihl + 14:
        return False
    ack, flags = struct.unpack_from("!I", segment, ihl + 8)[0], segment[ihl + 13]
    if not flags & TCP_ACK or ack != (seq + 1) & 0xFFFFFFFF:
        return False
    if flags & TCP_RST:
        return "connection refused"
    return None if flags & TCP_SYN else False


async def _answer(rx: socket.socket, seq: int, vip: str) -> str | None:
    loop = asyncio.get_running_loop()
    if rx.family == socket.AF_INET:
        while True:
            verdict = _verdict(await loop.sock_recv(rx, 256), seq)
            if verdict is not False:
                return verdict
    want = socket.inet_pton(socket.AF_INET6, vip)
    while True:
        segment, sender = await loop.sock_recvfrom(rx, 256)
        if socket.inet_pton(socket.AF_INET6, sender[0].split("%")[0]) != want:
            continue
        verdict = _verdict(segment, seq, ip_header=False)
        if verdict is not False:
            return verdict


async def _tunnel_error(tx: socket.socket, mode: str) -> str:
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.sock_recv(tx, 1)        # nothing comes: only errors end this
        except OSError as e:
            what = _UNREACHABLE.get(e.errno, (e.strerror or str(e)).lower())
            return f"{mode} tunnel: {what} (no decapsulation on the backend?)"


async def syn_through_tunnel(backend: str, vip: str, port: int, mode: str, gue_port: int,
                             timeout: float, inner_source: str | None = None) -> str | None:
    """Probe `vip`:`port` on `backend` through its `mode` tunnel (ipip or
    gue). None if the backend answered with a SYN-ACK, else why not. The
    probe's source is this host's address towards the backend, or, when
    the VIP is of the other family (4in6, 6in4), `inner_source` (an address
    of this host of the VIP's family that the backend routes back to: the
    encap_source), else this host's address towards the VIP."""
    sport = _take_port()
    seq, ident = random.getrandbits(32), random.getrandbits(16)
    rx = tx = None
    tasks: list[asyncio.Task] = []
    try:
        if _family(backend) == _family(vip):
            src = _source_towards(backend)
        else:
            src = inner_source or _source_towards(vip)
        try:
            rx = socket.socket(_family(vip), socket.SOCK_RAW, socket.IPPROTO_TCP)
            _attach_filter(rx, answer_filter(vip, port, src, sport))
            rx.setblocking(False)
            tx = _tunnel_socket(mode, backend, vip, gue_port)
        except PermissionError:
            return "raw sockets not permitted (DSR health checks need CAP_NET_RAW)"
        tx.send(inner_segment(src, sport, vip, port, seq, ident))
        tasks = [asyncio.ensure_future(_answer(rx, seq, vip)), asyncio.ensure_future(_tunnel_error(tx, mode))]
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return "SYN timeout"
        error = done.pop().result()
        if error is None:       # end the backend's half-open connection
            tx.send(inner_segment(src, sport, vip, port, (seq + 1) & 0xFFFFFFFF, (ident + 1) & 0xFFFF,
                                  TCP_RST))
        return error
    except OSError as e:
        return f"probe error: {(e.strerror or str(e)).lower()}"
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in (rx, tx):
            if s is not None:
                s.close()
        _ports_in_use.discard(sport)
