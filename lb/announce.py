"""Announcing the VIPs over BGP through a BIRD 2 instance (README "Scale-out").

The daemon owns two files: the BIRD config (`bgp.bird_config`: BGP sessions
to the peers, BFD, export of the VIP routes only) and, beside it, the VIP
routes as a `protocol static` (`<stem>-vips.conf`, included by the first).
It rewrites them when they would change and makes BIRD re-read them with
`configure` on its control socket. BIRD runs on its own (systemd, the lab):
a restart of xdplb leaves the routes announced, since BIRD keeps running with
the same files and the XDP program keeps forwarding.

    announcer = Announcer(cfg.bgp)
    announcer.announce({"10.96.0.20"})       # exactly these VIPs, no others
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from .config import Bgp
from .reconcile import LiveService

log = logging.getLogger("xdplb.announce")

# The static protocols' names, one per family (a BIRD 2 static protocol
# has one channel): the BGP export filters take their routes only.
VIPS_PROTOCOL = {4: "xdplb_vips", 6: "xdplb_vips6"}
HOST_PREFIX = {4: 32, 6: 128}


class BirdError(RuntimeError):
    """BIRD is unreachable or refused a command."""


# -- what to announce -------------------------------------------------------------


def announceable_vips(services: Iterable[LiveService], active: int) -> set[str]:
    """The VIPs of the services as the maps hold them (a backend that
    failed its health checks is draining there) with at least one backend
    in state `active`. A VIP of several services is announced while any of
    them can serve."""
    return {str(s.applied.vip) for s in services
            if s.applied is not None and any(b.state == active for b in s.backends.values())}


# -- the files --------------------------------------------------------------------


def vips_path(bgp: Bgp) -> Path:
    return bgp.bird_config.with_name(bgp.bird_config.stem + "-vips.conf")


def render_vips(vips: Iterable[str]) -> str:
    """Two static protocols, IPv4 and IPv6, holding one host route per VIP
    of their family (blackhole: the routes exist to be exported, never to
    be used by this node's kernel)."""
    ips = sorted((ip_address(v) for v in vips), key=lambda ip: (ip.version, ip))
    text = ""
    for version in (4, 6):
        routes = "".join(f"  route {ip}/{HOST_PREFIX[version]} blackhole;\n"
                         for ip in ips if ip.version == version)
        text += f"protocol static {VIPS_PROTOCOL[version]} {{\n  ipv{version};\n{routes}}}\n"
    return text


def render_bird_config(bgp: Bgp) -> str:
    """BIRD 2's config for this node: one eBGP session per peer exporting
    the VIP routes of the peer's family only and importing nothing (the
    node's own routing stays the kernel's), BFD on the sessions if asked."""
    lines = ["# Written by xdplb from the bgp: section of its config: edits are overwritten.",
             "log stderr all;"]
    if bgp.router_id is not None:
        lines.append(f"router id {bgp.router_id};")
    lines += ["protocol device { scan time 10; }", f'include "{vips_path(bgp)}";']
    if bgp.bfd:
        ms = bgp.bfd_interval_ms
        lines.append(f'protocol bfd {{ interface "*" {{ min rx interval {ms} ms; '
                     f"min tx interval {ms} ms; multiplier {bgp.bfd_multiplier}; }}; }}")
    keepalive = max(1, bgp.hold_time // 3)
    for i, peer in enumerate(bgp.peers, 1):
        lines += [
            f"protocol bgp peer{i} {{",
            f"  local as {bgp.local_asn};",
            f"  neighbor {peer.address} as {peer.asn};",
            f"  hold time {bgp.hold_time}; keepalive time {keepalive};",
            # A peer that comes back is met again within a second or two.
            "  connect retry time 1; error wait time 1, 5;",
            f"  bfd {'on' if bgp.bfd else 'off'};",
            f"  ipv{peer.address.version} {{ import none; "
            f'export where proto = "{VIPS_PROTOCOL[peer.address.version]}"; next hop self; }};',
            "}",
        ]
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` atomically (rename) if its content differs."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def write_bird_files(bgp: Bgp) -> None:
    """The BIRD config, and an empty VIP list if there is none yet (BIRD
    can then be started before xdplb; an existing list is kept, so that
    writing the files again withdraws nothing)."""
    write_if_changed(bgp.bird_config, render_bird_config(bgp))
    if not vips_path(bgp).exists():
        write_if_changed(vips_path(bgp), render_vips(()))


# -- BIRD's control socket -------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int            # of the last line: 0xxx done, 8xxx/9xxx error
    lines: list[str]     # every line's text, without its code


def bird_command(path: Path | str, command: str, timeout: float = 5.0) -> Reply:
    """One command on BIRD's control socket (what birdc sends): lines are
    `CCCC-text` (more follow), ` text` (same code) or `CCCC text` (last)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            f = s.makefile("rwb")
            _read_reply(f)                        # the "0001 BIRD x.y ready." greeting
            f.write(command.encode() + b"\n")
            f.flush()
            reply = _read_reply(f)
    except OSError as e:
        raise BirdError(f"BIRD control socket {path}: {e.strerror or e}") from None
    if reply.code >= 8000:
        raise BirdError(f"BIRD refused {command!r}: {' '.join(reply.lines).strip()}")
    return reply


def _read_reply(f) -> Reply:
    lines: list[str] = []
    while True:
        raw = f.readline()
        if not raw:
            raise OSError("connection closed by BIRD")
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith(" "):
            lines.append(line[1:])
            continue
        code, sep, text = int(line[:4]), line[4:5], line[5:]
        lines.append(text)
        if sep == " ":
            return Reply(code, lines)


def bgp_sessions(path: Path | str) -> dict[str, str]:
    """BGP protocol name -> BIRD's state (`Established`, `Active`, ...)."""
    out = {}
    for line in bird_command(path, "show protocols").lines:
        cols = line.split()
        if len(cols) >= 6 and cols[1] == "BGP":
            out[cols[0]] = cols[5]
    return out


# -- the announcer ------------------------------------------------------------------


class Announcer:
    """Keeps BIRD announcing exactly the VIPs it is given.

    announce() writes the files and reconfigures BIRD only when something
    changes; if BIRD cannot be reached it says so once and tries again at
    the next call (the daemon calls it every second)."""

    def __init__(self, bgp: Bgp) -> None:
        self.bgp = bgp
        self.draining = False
        self.announced: set[str] | None = None     # as BIRD last accepted them
        self.error: str | None = None
        # Files written that BIRD has not re-read (its socket failed): the
        # retry must `configure` although the files no longer change.
        self._unread = False
        self._mu = threading.Lock()

    def reconfigure(self, bgp: Bgp) -> None:
        with self._mu:
            if bgp != self.bgp:
                self.bgp, self.announced = bgp, None

    def drain(self, on: bool = True) -> None:
        with self._mu:
            self.draining = on

    def announce(self, vips: set[str]) -> None:
        with self._mu:
            want = set() if self.draining else set(vips)
            if want == self.announced:
                return
            try:
                changed = write_if_changed(self.bgp.bird_config, render_bird_config(self.bgp))
                changed |= write_if_changed(vips_path(self.bgp), render_vips(want))
                self._unread |= changed
                if self._unread or self.announced is None:
                    bird_command(self.bgp.bird_socket, "configure")
                self._unread = False
            except (BirdError, OSError) as e:
                if str(e) != self.error:
                    log.error("bgp: announcing failed, retrying every second: %s", e)
                self.error = str(e)
                return
            log.info("bgp: announcing vips=%s (withdrawn %s)", sorted(want),
                     sorted((self.announced or set()) - want))
            self.announced, self.error = want, None

    def status(self) -> dict:
        with self._mu:
            st: dict = {"draining": self.draining, "error": self.error,
                        "announced": sorted(self.announced) if self.announced is not None else None}
            try:
                st["sessions"] = bgp_sessions(self.bgp.bird_socket)
            except BirdError as e:
                st["sessions"] = None
                st["error"] = st["error"] or str(e)
            return st
