"""Long-lived TCP streams and bursts of new connections, from a lab client.

The servers are lb.backend_server's echo port: a line naming the backend on
connect, then every byte echoed. A stream sends a numbered line every
`interval` and expects it back in order; it is broken when the connection
is reset or closed, answers out of order, or stays silent for `stall`
seconds (TCP's retransmissions ride out a shorter outage).

    with Streams(lab, ns, sources, vip, port) as s:
        ...                                   # take a node away
    assert s.broken == {}
"""

from __future__ import annotations

import collections
import contextlib
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from .lab import Lab

IDENTITY = re.compile(rb"backend=(\w+) client=[\d.]+:\d+\n")


@dataclass
class Stream:
    sock: socket.socket
    source: str
    backend: str = ""
    sent: int = 0
    echoed: int = 0
    buf: bytes = b""
    last_progress: float = field(default_factory=time.monotonic)
    longest_stall: float = 0.0


def _connect(lab: Lab, ns: str, source: str, dst: str, port: int) -> socket.socket:
    with lab.inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.setblocking(False)
    s.connect_ex((dst, port))
    return s


def _read_identity(socks: dict[socket.socket, str], timeout: float) -> dict[socket.socket, str]:
    """The backend named by each connected socket's first line, for those
    that gave it within `timeout` (connect included)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    bufs: dict[socket.socket, bytes] = collections.defaultdict(bytes)
    named: dict[socket.socket, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(named) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(s)
                    continue
                bufs[s] += chunk
                if m := IDENTITY.match(bufs[s]):
                    named[s] = m.group(1).decode()
                    sel.unregister(s)
    finally:
        sel.close()
    return named


def connect_burst(lab: Lab, ns: str, sources: list[str], dst: str, port: int,
                  timeout: float = 0.25) -> dict[str, str | None]:
    """One new connection from each source at once: source -> the backend
    that answered, or None (no answer within `timeout`)."""
    socks = {_connect(lab, ns, src, dst, port): src for src in sources}
    try:
        named = _read_identity(socks, timeout)
        return {src: named.get(s) for s, src in socks.items()}
    finally:
        for s in socks:
            s.close()


def time_to_answer(lab: Lab, ns: str, sources: list[str], dst: str, port: int,
                   since: float, limit: float = 20.0, timeout: float = 0.25) -> float:
    """Seconds from `since` (time.monotonic()) to the start of the first
    burst of new connections, one per source, that were all answered."""
    while time.monotonic() - since < limit:
        start = time.monotonic()
        if all(connect_burst(lab, ns, sources, dst, port, timeout).values()):
            return start - since
        time.sleep(max(0.0, timeout - (time.monotonic() - start)))
    raise TimeoutError(f"new connections to {dst}:{port} not all answered after {limit}s")


class Streams:
    """`sources` streams to dst:port, one per source address, kept busy by a thread."""

    def __init__(self, lab: Lab, ns: str, sources: list[str], dst: str, port: int, *,
                 interval: float = 0.1, stall: float = 5.0) -> None:
        self.interval, self.stall = interval, stall
        socks = {_connect(lab, ns, src, dst, port): src for src in sources}
        named = _read_identity(socks, 10.0)
        if len(named) != len(socks):
            for s in socks:
                s.close()
            raise RuntimeError(f"{len(socks) - len(named)} of {len(socks)} streams not answered")
        self.streams = [Stream(s, src, named[s]) for s, src in socks.items()]
        self.broken: dict[str, str] = {}            # source -> why
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streams", daemon=True)
        self._thread.start()

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def backends(self) -> collections.Counter:
        return collections.Counter(s.backend for s in self.streams)

    def alive(self) -> int:
        return len(self.streams) - len(self.broken)

    def longest_stall(self) -> float:
        return max(s.longest_stall for s in self.streams)

    def settle(self, seconds: float) -> None:
        """Wait `seconds`, then until every stream's echoes are caught up
        (a stream that is only retransmitting has not been judged yet)."""
        time.sleep(seconds)
        deadline = time.monotonic() + self.stall + 1
        while time.monotonic() < deadline and any(
                s.echoed < s.sent for s in self.streams if s.source not in self.broken):
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.streams:
            with contextlib.suppress(OSError):
                s.sock.close()

    def _fail(self, st: Stream, why: str) -> None:
        self.broken.setdefault(st.source, f"{st.backend}: {why}")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for st in self.streams:
            sel.register(st.sock, selectors.EVENT_READ, st)
        next_send = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                next_send = now + self.interval
                for st in self.streams:
                    if st.source in self.broken:
                        continue
                    try:
                        st.sock.send(f"{st.sent}\n".encode())
                        st.sent += 1
                    except BlockingIOError:
                        pass                # the send buffer is full: TCP is retrying
                    except OSError as e:
                        self._fail(st, f"send: {e}")
                    if st.echoed < st.sent:
                        stalled = now - st.last_progress
                        st.longest_stall = max(st.longest_stall, stalled)
                        if stalled > self.stall:
                            self._fail(st, f"no echo for {stalled:.1f}s")
            for key, _ in sel.select(max(0.0, next_send - time.monotonic())):
                self._receive(key.data, sel)
        sel.close()

    def _receive(self, st: Stream, sel: selectors.BaseSelector) -> None:
        try:
            chunk = st.sock.recv(65536)
        except OSError as e:
            chunk, why = b"", f"recv: {e}"
        else:
            why = "closed by the peer"
        if not chunk:
            sel.unregister(st.sock)
            if st.source not in self.broken:
                self._fail(st, why)
            return
        st.buf += chunk
        *lines, st.buf = st.buf.split(b"\n")
        for line in lines:
            if line != str(st.echoed).encode():
                self._fail(st, f"echo {line!r}, expected {st.echoed}")
                return
            st.echoed += 1
        if lines:
            st.last_progress = time.monotonic()
