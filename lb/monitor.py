"""`xdplb monitor`: flow events from the data plane, one line each.

    (frontend) 10.1.0.5:40211 => web 10.96.0.10:80 -> 10.244.1.2:8080 tcp FORWARDED
    (world) 203.0.113.9:5511 => web 10.96.0.10:80 tcp DROPPED policy

The XDP program writes a `struct flow_event` into the pinned `events` ring
buffer for every drop and for the first packet of each new forwarded flow,
sampled and rate-limited per CPU in the kernel (bpf/xdp/monitor.h, config
`monitor:`). This module reads the ring straight from its pin, decodes it
with the object's BTF, and asks the daemon only for names (service and
identity), which it refreshes as they change. Filters run here: they do not
save kernel budget.

A ring buffer has a single consumer position, so only one monitor at a time
sees every event; two would split them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TextIO

from elftools.common.exceptions import ELFError

from loader import BpfError, Btf, Layouts, Map, RingBuffer

from . import api
from .bpffs import ensure_bpffs
from .dataplane import Constants, default_object_path
from .endpoint import host_port

EVENTS_MAP = "events"
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
NAMES_REFRESH_S = 5.0       # names change with applies; ids may be reused
NAMES_RETRY_S = 1.0         # an unknown id triggers a refresh at most this often


# -- daemon side ---------------------------------------------------------------


def names(cfg, rec) -> dict[str, Any]:
    """The `names` API command: what the monitor needs to label events."""
    return {
        "bpffs": str(cfg.bpffs),
        "services": {str(s.svc_id): s.name for s in rec.services.values() if s.name},
        "identities": {str(v): k for k, v in rec.identity_ids().items()},
    }


# -- decoding ------------------------------------------------------------------


@dataclass
class Names:
    services: dict[int, str] = field(default_factory=dict)
    identities: dict[int, str] = field(default_factory=dict)
    bpffs: str | None = None
    fetched: float = 0.0          # time.monotonic() of the last answer; 0 = never

    @classmethod
    def from_api(cls, res: dict) -> Names:
        return cls({int(k): v for k, v in res["services"].items()},
                   {int(k): v for k, v in res["identities"].items()},
                   res.get("bpffs"), time.monotonic())


@dataclass(frozen=True)
class FlowEvent:
    time: str                     # wall clock, ISO 8601 UTC
    verdict: str                  # FORWARDED or DROPPED
    reason: str | None            # drop reason, e.g. "policy"
    identity: str
    identity_id: int
    service: str | None
    svc_id: int
    src: str
    sport: int
    dst: str
    dport: int
    proto: str
    backend: str | None           # the rewritten destination "ip:port" or "[ipv6]:port"
    backend_id: int
    ifindex: int
    len: int

    def line(self) -> str:
        ports = self.proto in ("tcp", "udp")
        src = host_port(self.src, self.sport) if ports else self.src
        dst = host_port(self.dst, self.dport) if ports else self.dst
        svc = f"{self.service} " if self.service else ""
        target = f" -> {self.backend}" if self.backend else ""
        why = f" {self.reason}" if self.reason else ""
        return f"({self.identity}) {src} => {svc}{dst}{target} {self.proto} {self.verdict}{why}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _addr(words, family: int, c: Constants) -> str:
    raw = bytes(words)
    if family == c.FAMILY_IPV6:
        return str(ipaddress.IPv6Address(raw))
    return str(ipaddress.IPv4Address(raw[:4]))


def _port(net_order: int) -> int:
    return int.from_bytes(int(net_order).to_bytes(2, "little"), "big")


class Decoder:
    """flow_event records -> FlowEvent, with constants from the object's BTF."""

    def __init__(self, consts: Constants):
        self.c = consts
        self.reasons = {k: n.removeprefix("DROP_").lower()
                        for k, n in consts.names("drop_reason").items()}
        self.verdicts = {k: n.removeprefix("EVENT_")
                         for k, n in consts.names("event_verdict").items()}
        # Monotonic (bpf_ktime_get_ns) -> wall clock: both clocks read now.
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def identity(self, ident: int, names: Names) -> str:
        if ident in names.identities:
            return names.identities[ident]
        if ident == self.c.IDENTITY_WORLD:
            return "world"
        if ident == self.c.IDENTITY_UNKNOWN:
            return "unknown"
        return str(ident)

    def service(self, svc_id: int, names: Names) -> str | None:
        if svc_id == self.c.ID_NONE:
            return None
        return names.services.get(svc_id, f"svc#{svc_id}")

    def decode(self, e, names: Names) -> FlowEvent:
        c = self.c
        wall = (e.timestamp_ns + self.wall_offset_ns) / 1e9
        dropped = e.verdict == c.EVENT_DROPPED
        forwarded = e.verdict == c.EVENT_FORWARDED
        return FlowEvent(
            time=datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="microseconds"),
            verdict=self.verdicts.get(int(e.verdict), str(e.verdict)),
            reason=self.reasons.get(int(e.reason), str(e.reason)) if dropped else None,
            identity=self.identity(e.identity, names), identity_id=e.identity,
            service=self.service(e.svc_id, names), svc_id=e.svc_id,
            src=_addr(e.src, e.family, c), sport=_port(e.sport),
            dst=_addr(e.dst, e.family, c), dport=_port(e.dport),
            proto=PROTO_NAMES.get(e.proto, str(e.proto)),
            backend=(host_port(_addr(e.backend_addr, e.family, c), _port(e.backend_port))
                     if forwarded else None),
            backend_id=e.backend_id, ifindex=e.ifindex, len=e.len)


# -- reading the ring ----------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    service: str | None = None
    identity: str | None = None
    verdict: str | None = None    # "forwarded" or "dropped"

    def match(self, ev: FlowEvent) -> bool:
        return ((self.service is None or ev.service == self.service)
                and (self.identity is None or ev.identity == self.identity)
                and (self.verdict is None or ev.verdict.lower() == self.verdict))


class EventStream:
    """The pinned `events` ring of a running data plane, decoded."""

    def __init__(self, bpffs: str | Path, object_path: Path | None = None,
                 names: Callable[[], Names | None] | None = None):
        self.object_path = Path(object_path or default_object_path())
        try:
            btf = Btf.from_elf(self.object_path)
        except (OSError, ValueError, ELFError) as e:
            raise BpfError(f"cannot read BTF from {self.object_path}: {e}") from None
        layouts = Layouts(btf)
        self.consts = Constants(btf.enums())
        self.decoder = Decoder(self.consts)
        self.record_type = layouts.struct("flow_event")
        self.path = Path(bpffs) / "maps" / EVENTS_MAP
        if not self.path.exists():
            raise BpfError(f"no flow-event ring at {self.path}: is `xdplb run` running with "
                           f"this bpffs, and built with the monitor (make bpf)?")
        self.map = Map.open_pinned(self.path, name=EVENTS_MAP)
        self._counters_path = Path(bpffs) / "maps" / "global_stats"
        self._fetch_names = names
        self.names = (names() if names else None) or Names()
        self._last_try = time.monotonic()
        self._raw: list[Any] = []
        # Events older than this were queued before we started (nobody
        # reading): skip them rather than show stale flows as new.
        self.start_ns = time.monotonic_ns()
        self.ring = RingBuffer(self.map, self._on_record, record_type=self.record_type)

    def _on_record(self, rec) -> None:
        # Called from inside ring_buffer__poll(): just keep the copy.
        if rec.timestamp_ns >= self.start_ns:
            self._raw.append(rec)

    def _unknown(self, rec) -> bool:
        c = self.consts
        return ((rec.svc_id != c.ID_NONE and rec.svc_id not in self.names.services)
                or (rec.identity >= c.IDENTITY_USER_MIN
                    and rec.identity not in self.names.identities))

    def refresh_names(self, force: bool = False) -> None:
        if self._fetch_names is None:
            return
        now = time.monotonic()
        due = NAMES_RETRY_S if force else NAMES_REFRESH_S
        if now - max(self._last_try, self.names.fetched) < due:
            return
        self._last_try = now
        fresh = self._fetch_names()
        if fresh is not None:
            self.names = fresh

    def poll(self, timeout_ms: int) -> list[FlowEvent]:
        """Events that arrived within timeout_ms, oldest first."""
        self.ring.poll(timeout_ms)
        raw, self._raw = self._raw, []
        self.refresh_names(force=any(self._unknown(r) for r in raw))
        return [self.decoder.decode(r, self.names) for r in raw]

    def lost(self) -> int:
        """The kernel's CNT_EVENTS_LOST, summed over CPUs (0 if unreadable)."""
        try:
            with Map.open_pinned(self._counters_path) as m:
                vals = m.lookup(self.consts.CNT_EVENTS_LOST)
        except BpfError:
            return 0
        # struct counter { __u64 packets; __u64 bytes; } per CPU, raw bytes here.
        return sum(int.from_bytes(bytes(v)[:8], "little") for v in vals or [])

    def close(self) -> None:
        self.ring.close()
        self.map.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the command ---------------------------------------------------------------


def _api_names(socket: str) -> Callable[[], Names | None]:
    def fetch() -> Names | None:
        try:
            return Names.from_api(api.call(socket, "names", timeout=5))
        except (api.ApiError, OSError):
            return None           # daemon restarting: keep the names we have
    return fetch


def _check_filter(kind: str, value: str | None, known: set[str], have_names: bool) -> None:
    if value is None or not have_names or value in known:
        return
    shown = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
    raise ValueError(f"--{kind} {value!r}: no such {kind} in the running config (have: {shown})")


def run(socket: str, *, bpffs: str | None = None, object_path: str | None = None,
        filters: Filters = Filters(), as_json: bool = False, count: int | None = None,
        duration: float | None = None, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    fetch = _api_names(socket)
    first = fetch()
    if first is None and bpffs is None:
        raise api.ApiError(f"no daemon answers on {socket}: pass --bpffs to read the events "
                           f"without names")
    if first is None:
        print(f"warning: no daemon on {socket}; showing numeric ids", file=err)
    have = first is not None
    _check_filter("service", filters.service, set(first.services.values()) if have else set(), have)
    _check_filter("identity", filters.identity,
                  (set(first.identities.values()) | {"world"}) if have else set(), have)
    pin = bpffs or first.bpffs
    ensure_bpffs(pin, create=False)             # under `ip netns exec`: the host's pins
    stream = EventStream(pin, Path(object_path) if object_path else None,
                         fetch if have else None)
    shown, lost0 = 0, stream.lost()
    deadline = time.monotonic() + duration if duration is not None else None
    try:
        print(f"monitoring flow events from {stream.path} (Ctrl-C to stop)", file=err, flush=True)
        while count is None or shown < count:
            wait = 200
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = max(1, min(wait, int(left * 1000)))
            for ev in stream.poll(wait):
                if not filters.match(ev):
                    continue
                out.write((json.dumps(ev.as_dict()) if as_json else ev.line()) + "\n")
                shown += 1
                if count is not None and shown >= count:
                    break
            out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:       # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        lost = stream.lost() - lost0
        stream.close()
    print(f"{shown} events shown; {lost} lost in the kernel meanwhile (rate limit or ring full)",
          file=err, flush=True)
    return 0
