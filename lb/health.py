"""Active health checks: TCP connect or HTTP GET probes of the backends of
every service that has a `health_check`, with rise/fall hysteresis.

State machine, per (service, backend):

- a backend starts **up**, so a fresh start or a new backend never
  black-holes traffic while the first probes are in flight (and a backend
  without a check is always up); a dead one is out after `fall` probes;
- **up -> down** after `fall` consecutive failures, **down -> up** after
  `rise` consecutive passes; any result of the other kind resets the streak.
  So a backend that dies is out within fall x interval (+ timeout when its
  probes time out rather than get refused), plus one per-service apply
  (~1 ms); a recovered one is back within rise x interval.

The checker only keeps this state; the daemon turns it into data-plane
changes through `effective_service()`: the down backends of a service are
marked `draining` (kept in the backends map, so conntrack finds them and
their flows drain; left out of the Maglev table, so no new flow picks them).
If *every* active backend of a service is down, none is taken out (fail
open, as cloud load balancers do): a broken check then cannot take the
whole service down, and a real outage fails the same either way.

Scheduling: one asyncio loop in its own thread. Each target has a timer;
the first fires at a random point of its interval, so N targets spread
evenly instead of firing together, and later ones keep that phase (fixed
rate, not fixed delay). At most `max_in_flight` probes run at once and at
most `max_rate` start per second (a token bucket); a due probe beyond that
waits in a FIFO backlog, so when the config asks for more than the node
should spend, the effective interval stretches (reported as `lag_s`)
instead of sockets and CPU piling up. Measured (bench/health.py, 2 cores):
a probe costs ~140 us of CPU, so 2000 probes/s take ~0.3 of a core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import gcpause
from .config import GUE_PORT_DEFAULT, Config, HealthCheck, HealthCheckLimits, Service
from .endpoint import host_port
from .tunnel_probe import syn_through_tunnel

__all__ = ["BackendHealth", "HealthChecker", "MAX_IN_FLIGHT", "Target", "Transition", "probe"]

log = logging.getLogger("xdplb.health")

# Defaults of the config's health_check_limits (probes at once; started per second).
MAX_IN_FLIGHT: int = HealthCheckLimits.model_fields["max_in_flight"].default
MAX_RATE: float = HealthCheckLimits.model_fields["max_probes_per_s"].default
Key = tuple[str, str]                   # (service name, "ip:port")
# Close probe sockets with RST: no TIME_WAIT left behind per probe.
_LINGER_RST = struct.pack("ii", 1, 0)
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})")


@dataclass(frozen=True, slots=True)
class Target:
    """What to probe for one backend of one service."""

    service: str
    backend: str            # the config's "ip:port" (IPv6: "[ip]:port")
    host: str               # the address alone
    port: int               # the probed port: health_check.port or the backend's
    check: HealthCheck
    # DSR services (ipip, gue): the probe is a SYN to vip:port through the
    # tunnel (lb/tunnel_probe.py), so a backend that cannot decapsulate fails.
    forwarding: str = "nat"
    vip: str = ""
    gue_port: int = GUE_PORT_DEFAULT
    # The probe's inner source when the VIP's family is not the backend's
    # (4in6, 6in4): the encap_source of the VIP's family, if configured.
    inner_source: str = ""

    @property
    def key(self) -> Key:
        return (self.service, self.backend)


@dataclass(slots=True)
class BackendHealth:
    up: bool = True
    successes: int = 0      # consecutive
    failures: int = 0       # consecutive
    last_error: str | None = None   # the latest failure's reason (kept after recovery)
    last_change: float = field(default_factory=time.time)
    last_probe: float | None = None
    probes: int = 0

    def record(self, error: str | None, rise: int, fall: int) -> bool:
        """One probe result (None: passed). True if up/down flipped."""
        self.probes += 1
        self.last_probe = time.time()
        if error is None:
            self.successes += 1
            self.failures = 0
            flip = not self.up and self.successes >= rise
        else:
            self.failures += 1
            self.successes = 0
            self.last_error = error
            flip = self.up and self.failures >= fall
        if flip:
            self.up = not self.up
            self.last_change = self.last_probe
        return flip

    def as_dict(self) -> dict[str, Any]:
        return {"up": self.up, "successes": self.successes, "failures": self.failures,
                "last_error": self.last_error, "last_change": round(self.last_change, 3),
                "last_probe": round(self.last_probe, 3) if self.last_probe else None,
                "probes": self.probes}


@dataclass(frozen=True)
class Transition:
    service: str
    backend: str
    up: bool
    reason: str | None          # the failure that took it down
    streak: int                 # consecutive passes (up) or failures (down)
    after_s: float              # time spent in the previous state


ProbeFn = Callable[[Target], Awaitable[str | None]]


async def probe(target: Target) -> str | None:
    """Probe once. None if it passed, else why not ("connect timeout",
    "connection refused", "HTTP 503, want 200", ...)."""
    check = target.check
    if target.forwarding != "nat":
        return await syn_through_tunnel(target.host, target.vip, target.port, target.forwarding,
                                        target.gue_port, check.timeout, target.inner_source or None)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    stage = "connect"
    try:
        async with asyncio.timeout(check.timeout):
            await loop.sock_connect(sock, (target.host, target.port))
            if check.type == "tcp":
                return None
            stage = "http"
            request = (f"GET {check.path} HTTP/1.0\r\nHost: {host_port(target.host, target.port)}\r\n"
                       f"User-Agent: xdplb-health\r\nConnection: close\r\n\r\n")
            await loop.sock_sendall(sock, request.encode())
            head = b""
            while b"\r\n" not in head and len(head) < 512:
                chunk = await loop.sock_recv(sock, 512)
                if not chunk:
                    break
                head += chunk
        m = _STATUS_LINE.match(head)
        if not m:
            return "no HTTP status line" if not head else f"bad HTTP status line {head[:40]!r}"
        status = int(m.group(1))
        return None if status == check.expect_status else f"HTTP {status}, want {check.expect_status}"
    except TimeoutError:
        return f"{stage} timeout"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as e:
        return f"{stage} error: {(e.strerror or str(e)).lower()}"
    finally:
        sock.close()


class HealthChecker:
    """Probes targets derived from the config; thread-safe for readers.

    `update(cfg)`/`set_service()`/`drop_service()` may be called from any
    thread, before or after `start()`. `on_transition` runs in the checker's
    thread: keep it short (the daemon only queues the service for an apply).
    """

    def __init__(self, on_transition: Callable[[Transition], None] | None = None, *,
                 max_in_flight: int = MAX_IN_FLIGHT, max_rate: float | None = MAX_RATE,
                 probe_fn: ProbeFn = probe, rng: random.Random | None = None) -> None:
        self.on_transition = on_transition
        self.set_limits(max_in_flight, max_rate)
        self._tokens = self._burst
        self._tokens_at = 0.0
        self._refill: asyncio.TimerHandle | None = None
        self._probe = probe_fn
        self._rng = rng or random.Random()
        # Shared with other threads, under _lock.
        self._lock = threading.Lock()
        self._sources: dict[str, tuple] = {}                       # name -> what its targets follow from
        self._gue_port = GUE_PORT_DEFAULT                          # the config's, for DSR probes
        self._inner_sources: dict[int, str] = {}                   # IP version -> encap_source
        self._services: dict[str, dict[str, Target]] = {}          # name -> backend -> target
        self._states: dict[Key, BackendHealth] = {}
        self._down: dict[str, set[str]] = {}
        self._fail_open: set[str] = set()
        self._pending: dict[Key, Target | None] = {}               # for the loop; None: stop
        # The loop thread's own.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._targets: dict[Key, Target] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._backlog: deque[tuple[Key, Target, float]] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.in_flight = 0
        self.peak_in_flight = 0
        self.probes = 0
        self.rate = 0.0                 # probes/s over the last second
        self.lag = 0.0                  # worst lateness of a probe start over the last second
        self._lag_max = 0.0
        self._tick_at = (0.0, 0)

    def set_limits(self, max_in_flight: int, max_rate: float | None) -> None:
        """Change the bounds (any thread; a running checker follows at once)."""
        if max_in_flight < 1 or (max_rate is not None and max_rate <= 0):
            raise ValueError("max_in_flight must be >= 1 and max_rate > 0 (or None: no cap)")
        self.max_in_flight = max_in_flight
        self.max_rate = max_rate
        # Burst: 50 ms worth, so a cap is a rate, not a stop-and-go.
        self._burst = max(1.0, max_rate / 20) if max_rate else 1.0
        self._kick()

    # -- targets (any thread) ---------------------------------------------

    def update(self, cfg: Config) -> None:
        """Probe exactly the backends of `cfg`'s checked services. Known
        backends keep their state; new ones start up; gone ones stop."""
        # 200k new targets: generational GC passes over the whole config
        # would cost twice the work itself (as in Reconciler._apply).
        with gcpause.paused(), self._lock:
            self._gue_port = cfg.gue_port
            self._inner_sources = {n.version: str(n.network_address) for n in cfg.encap_source or ()}
            names = set()
            for svc in cfg.services:
                names.add(svc.name)
                self._set_locked(svc)
            for name in [n for n in self._services if n not in names]:
                self._drop_locked(name)
        self._kick()

    def set_service(self, svc: Service) -> None:
        with self._lock:
            self._set_locked(svc)
            changed = bool(self._pending)
        if changed:     # else nothing for the loop to do: an API call need not wake it
            self._kick()

    def drop_service(self, name: str) -> None:
        with self._lock:
            self._drop_locked(name)
            changed = bool(self._pending)
        if changed:
            self._kick()

    def _set_locked(self, svc: Service) -> None:
        hc = svc.health_check
        if hc is None:
            if svc.name in self._services:
                self._drop_locked(svc.name)
            return
        tunnel = ((svc.forwarding, str(svc.vip), self._gue_port, self._inner_sources.get(svc.vip.version, ""))
                  if svc.dsr else ("nat", "", GUE_PORT_DEFAULT, ""))
        src = (hc, svc.backends, tunnel)
        if self._sources.get(svc.name) == src:
            return
        self._sources[svc.name] = src
        old = self._services.get(svc.name, {})
        new = {}
        for b in svc.backends:
            k = b.key                   # formats the address: once, not three times
            host = k.rpartition(":")[0]
            if host.startswith("["):    # "[2001:db8::2]:8080"
                host = host[1:-1]
            new[k] = Target(svc.name, k, host, hc.port or b.port, hc, *tunnel)
        for bk, t in new.items():
            if old.get(bk) != t:
                self._pending[(svc.name, bk)] = t
                self._states.setdefault((svc.name, bk), BackendHealth())
        for bk in old.keys() - new.keys():
            self._forget_locked(svc.name, bk)
        self._services[svc.name] = new

    def _drop_locked(self, name: str) -> None:
        for bk in self._services.pop(name, {}):
            self._forget_locked(name, bk)
        self._sources.pop(name, None)
        self._down.pop(name, None)
        self._fail_open.discard(name)

    def _forget_locked(self, name: str, bk: str) -> None:
        self._pending[(name, bk)] = None
        self._states.pop((name, bk), None)
        down = self._down.get(name)
        if down:
            down.discard(bk)
            if not down:
                del self._down[name]

    def seed_down(self, service: str, backend: str, reason: str) -> None:
        """Start a known backend down (the daemon's restart path: it was out
        before, so it has to rise before it takes new flows again)."""
        with self._lock:
            st = self._states.get((service, backend))
            if st is None or not st.up:
                return
            st.up, st.last_error, st.last_change = False, reason, time.time()
            self._down.setdefault(service, set()).add(backend)
        log.warning("backend down service=%s backend=%s reason=%s failures=0",
                    service, backend, json.dumps(reason))

    # -- what the data plane should hold (any thread) ------------------------

    def effective_service(self, svc: Service) -> Service:
        """`svc` with its down backends marked draining (unless all are down)."""
        with self._lock:
            down = self._down.get(svc.name)
            if not down or svc.health_check is None:
                self._set_fail_open(svc.name, False)
                return svc
            down = set(down)
        active = [b for b in svc.backends if b.state == "active"]
        if all(b.key in down for b in active):
            with self._lock:
                self._set_fail_open(svc.name, True)
            return svc
        with self._lock:
            self._set_fail_open(svc.name, False)
        return svc.model_copy(update={"backends": tuple(
            b.model_copy(update={"state": "draining"}) if b.state == "active" and b.key in down else b
            for b in svc.backends)})

    def effective_config(self, cfg: Config) -> Config:
        """`cfg` with effective_service() applied: O(services), and `cfg`
        itself when nothing is down."""
        with self._lock:
            if not self._down:
                return cfg
            names = set(self._down)
        services = tuple(self.effective_service(s) if s.name in names else s for s in cfg.services)
        return cfg.model_copy(update={"services": services})

    def _set_fail_open(self, name: str, on: bool) -> None:
        if on and name not in self._fail_open:
            self._fail_open.add(name)
            log.warning("every backend of service=%s is down: keeping them all in rotation "
                        "(fail open)", name)
        elif not on and name in self._fail_open:
            self._fail_open.discard(name)
            log.info("service=%s has healthy backends again: fail open ended", name)

    # -- observability (any thread) -------------------------------------------

    def states(self) -> dict[Key, bool]:
        """{(service name, "ip:port"): up} for every checked backend."""
        with self._lock:
            return {k: s.up for k, s in self._states.items()}

    def snapshot(self, unhealthy_only: bool = False) -> list[dict[str, Any]]:
        """Every checked backend's state (or only those down or failing)."""
        with self._lock:
            items = [(k, s.as_dict()) for k, s in self._states.items()
                     if not unhealthy_only or not s.up or s.failures]
        return [{"service": k[0], "backend": k[1], **d} for k, d in sorted(items)]

    def summary(self) -> dict[str, Any]:
        with self._lock:
            up = sum(s.up for s in self._states.values())
            return {"checked": len(self._states), "up": up, "down": len(self._states) - up,
                    "fail_open": sorted(self._fail_open), "probes": self.probes,
                    "probes_per_s": round(self.rate, 1), "in_flight": self.in_flight,
                    "max_in_flight": self.max_in_flight, "peak_in_flight": self.peak_in_flight,
                    "max_rate": self.max_rate,
                    "backlog": len(self._backlog), "lag_s": round(self.lag, 3),
                    "running": self.alive()}

    # -- thread and loop ---------------------------------------------------

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> HealthChecker:
        self._stopping = False
        with self._lock:            # (re)schedule every known target
            self._targets.clear()
            for name, targets in self._services.items():
                for bk, t in targets.items():
                    self._pending[(name, bk)] = t
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="xdplb-health",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._tick_at = (loop.time(), 0)
        loop.call_soon(self._sync)
        loop.call_soon(self._tick)
        ready.set()
        try:
            loop.run_forever()
            self._stopping = True       # finishing probes start no new ones
            self._backlog.clear()
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:      # let cancelled probes close their sockets
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        finally:
            self._loop = None
            loop.close()

    def _kick(self) -> None:
        loop = getattr(self, "_loop", None)     # None: not started (or __init__ still running)
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._sync)
            except RuntimeError:        # stopping: nothing left to schedule
                pass

    # -- scheduling (loop thread only) ---------------------------------------

    def _sync(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        loop = self._loop
        now = loop.time()
        self._fill()                     # limits may have been raised
        for key, t in pending.items():
            timer = self._timers.pop(key, None)
            if timer:
                timer.cancel()
            if t is None:
                self._targets.pop(key, None)
                continue
            self._targets[key] = t
            # A random phase spreads N targets over the interval.
            due = now + self._rng.uniform(0, t.check.interval)
            self._timers[key] = loop.call_at(due, self._due, key, t, due)

    def _due(self, key: Key, t: Target, due: float) -> None:
        self._timers.pop(key, None)
        if self._targets.get(key) is not t or self._stopping:
            return
        self._backlog.append((key, t, due))       # behind any that waits already: FIFO
        self._fill()

    def _launch(self, key: Key, t: Target, due: float) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._lag_max = max(self._lag_max, self._loop.time() - due)
        task = self._loop.create_task(self._run(key, t, due))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key, t: Target, due: float) -> None:
        try:
            try:
                error = await self._probe(t)
            except asyncio.CancelledError:
                raise
            except Exception as e:     # a bug in a probe must not stop the checker
                log.exception("probe of %s failed", t.key)
                error = f"probe error: {e!r}"
        finally:
            self.in_flight -= 1
            self.probes += 1
            if not self._stopping:
                self._fill()
        if self._targets.get(key) is not t or self._stopping:
            return                      # removed or changed while in flight
        self._record(t, error)
        # Fixed rate keeps the phase spread; when behind, go to the back of
        # the queue instead of bursting to catch up.
        loop = self._loop
        nxt = max(due + t.check.interval, loop.time())
        self._timers[key] = loop.call_at(nxt, self._due, key, t, nxt)

    def _fill(self) -> None:
        """Start backlogged probes while the in-flight and rate bounds allow."""
        backlog = self._backlog
        while backlog and self.in_flight < self.max_in_flight:
            key, t, due = backlog[0]
            if self._targets.get(key) is not t:
                backlog.popleft()               # removed or changed since it was due
                continue
            if not self._take_token():
                return
            backlog.popleft()
            self._launch(key, t, due)

    def _take_token(self) -> bool:
        if self.max_rate is None:
            return True
        now = self._loop.time()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.max_rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if self._refill is None:
            self._refill = self._loop.call_later((1 - self._tokens) / self.max_rate, self._refilled)
        return False

    def _refilled(self) -> None:
        self._refill = None
        if not self._stopping:
            self._fill()

    def _record(self, t: Target, error: str | None) -> None:
        with self._lock:
            st = self._states.get(t.key)
            if st is None:
                return
            before = st.last_change
            if not st.record(error, t.check.rise, t.check.fall):
                return
            if st.up:
                down = self._down.get(t.service)
                if down:
                    down.discard(t.backend)
                    if not down:
                        del self._down[t.service]
            else:
                self._down.setdefault(t.service, set()).add(t.backend)
            tr = Transition(t.service, t.backend, st.up, st.last_error,
                            st.successes if st.up else st.failures, st.last_change - before)
        if tr.up:
            log.info("backend up service=%s backend=%s successes=%d down_for=%.1fs",
                     tr.service, tr.backend, tr.streak, tr.after_s)
        else:
            log.warning("backend down service=%s backend=%s reason=%s failures=%d",
                        tr.service, tr.backend, json.dumps(tr.reason), tr.streak)
        if self.on_transition:
            try:
                self.on_transition(tr)
            except Exception:
                log.exception("health transition handler failed")

    def _tick(self) -> None:
        loop = self._loop
        now = loop.time()
        t0, n0 = self._tick_at
        if now > t0:
            self.rate = (self.probes - n0) / (now - t0)
        self._tick_at = (now, self.probes)
        self.lag, self._lag_max = self._lag_max, 0.0
        loop.call_later(1.0, self._tick)
