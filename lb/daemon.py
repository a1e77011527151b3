"""`xdplb run`: attach, apply, serve the API, re-apply on SIGHUP.

Stopping the daemon (SIGTERM, SIGINT, kill -9) leaves the XDP links and
maps pinned, so traffic keeps flowing; the next start reconciles against
them without touching established flows. `xdplb down` detaches on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import api, flow, monitor, stats
from .config import Config, ConfigError, Service, config_from_dict, load_config, parse_config
from .announce import Announcer, announceable_vips
from .bpffs import ensure_bpffs
from .dataplane import UNPINNED_MAPS, Dataplane, default_object_path
from .endpoint import host_port
from .errors import describe, is_operational
from .health import HealthChecker, Transition
from .metrics import Metrics, map_fill
from .neighbours import NeighbourKeeper, backend_addresses, drain_requests, recent_destinations
from .reconcile import PROTOCOLS, Reconciler, bkey
from .servicetable import ServiceTable, parse_service
from loader import BpfError, XdpLink
from loader.netlink import ifindex as lookup_ifindex

log = logging.getLogger("xdplb")


def sd_notify(message: str) -> bool:
    """The sd_notify(3) datagram protocol: a no-op outside systemd. A
    notification that cannot be sent is logged, never fatal: the data
    plane does not depend on it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as e:
        log.warning(kv("sd_notify failed", socket=path, message=message.split("\n")[0], error=e))
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, as RELOADING=1 carries it (Type=notify-reload)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')     # what kv() quotes a value for


def kv(message: str, **fields: Any) -> str:
    """A log line: a short message, then key=value pairs (values with spaces,
    quotes or newlines are JSON-quoted, so a line stays one line)."""
    out = [message]
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:.3f}"
        elif isinstance(v, (list, tuple, set, frozenset)):
            v = ",".join(map(str, v)) or "-"
        v = str(v)
        if not v or _NEEDS_QUOTES.search(v):
            v = json.dumps(v)
        out.append(f"{k}={v}")
    return " ".join(out)


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: no timestamp (journald adds its
    own) and an sd-daemon(3) "<N>" priority on each line, so that
    `journalctl -p warning` works, tracebacks included."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def on_journal() -> bool:
    """True if stderr is the journal stream systemd set up (JOURNAL_STREAM
    names its device:inode; a child with stderr redirected elsewhere
    inherits the variable, hence the check)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    fmt = JournalFormatter() if on_journal() else \
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for h in root.handlers:
        h.setFormatter(fmt)
    logging.captureWarnings(True)     # warnings too, as log lines (with a priority)


def enter_netns(name: str) -> None:
    """Move this process (before any thread starts) into a named netns.
    Unlike `ip netns exec`, this keeps /sys, so bpffs pins stay visible."""
    from pyroute2 import netns

    if not (Path("/var/run/netns") / name).exists():     # setns() would create it
        raise ConfigError([f"network namespace {name!r} does not exist: create it "
                           f"(`ip netns add {name}`) or fix `netns:`/--netns"])
    netns.setns(name, flags=0)


class Daemon:
    def __init__(self, config_path: str | None, cfg: Config, object_path: Path | None = None):
        self.config_path = config_path
        self.lock = threading.RLock()
        # The running config: `_cfg`, whose services are `_table`'s once a
        # service API call changed them (the `cfg` property).
        self._cfg = cfg
        self._table: ServiceTable | None = None
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.dp = Dataplane.open(cfg, object_path)
        self.object_path = object_path
        self.rec = Reconciler(self.dp)
        self._dry: Dataplane | None = None
        self.started = time.time()
        self.last_apply: dict[str, Any] = {}
        self.errors = 0
        self.metrics = Metrics(self)
        self._unhealthy: tuple[str, ...] = ()
        # Health checks change only the *effective* config the maps hold:
        # a down backend is applied as draining. self.cfg stays the user's.
        hl = cfg.health_check_limits
        self.health = HealthChecker(on_transition=self._health_transition,
                                    max_in_flight=hl.max_in_flight, max_rate=hl.max_probes_per_s)
        self._health_dirty: set[str] = set()
        self._health_mu = threading.Lock()
        self._health_wake = threading.Event()
        self.k8s = None            # lb.sources.kubernetes.KubernetesWatcher in Kubernetes mode
        self.ifindexes: list[int] = []
        self.neighbours: NeighbourKeeper | None = None
        self.announcer = Announcer(cfg.bgp) if cfg.bgp is not None else None

    @property
    def cfg(self) -> Config:
        """The running config. A service API call changes one service of
        `_table` in O(1); the Config with the whole services tuple is made
        when something next reads it."""
        with self.lock:
            if self._table is not None and self._table.changed:
                self._cfg = self._cfg.model_copy(update={"services": self._table.services()})
            return self._cfg

    def _services(self) -> ServiceTable:
        """The running services by name and key (made on first use after a
        full apply: O(services) once, then O(1) per change)."""
        if self._table is None:
            self._table = ServiceTable(self._cfg.services)
        return self._table

    # -- lifecycle ------------------------------------------------------------

    def _start_kubernetes(self) -> None:
        """Kubernetes mode: wait for the first list of every kind, then the
        cluster's services and identities are the config (the pinned maps
        keep serving the previous state meanwhile)."""
        from .sources.kubernetes import KubernetesWatcher

        self.k8s = KubernetesWatcher(self.cfg.kubernetes, self._k8s_apply)
        self.k8s.syncer.identity_limit = self.dp.maps["identities"].max_entries
        # Services annotated ipip/gue are served so only with a tunnel source.
        self.k8s.syncer.encap_families = self.cfg.encap_families()
        self.k8s.start_reflectors()
        log.info(kv("kubernetes: listing", node=self.cfg.kubernetes.node_name))
        plan = self.k8s.initial(abort=self.stop)
        self._set_config(self.cfg.model_copy(update={
            "services": self.k8s.syncer.services(), "identities": plan.identities}))
        log.info(kv("kubernetes: first list done", services=len(self.k8s.syncer.state.services),
                    endpointslices=len(self.k8s.syncer.state.slices),
                    xdplb_services=len(self.cfg.services), identities=len(self.cfg.identities)))

    def _k8s_apply(self, plan) -> None:
        """One batch from the watcher: identities first, then each changed
        service with its own atomic upsert/delete (never the whole config)."""
        with self.lock, self._timed("service"):
            cfg = self.cfg
            if plan.identities is not None:
                cfg = cfg.model_copy(update={"identities": plan.identities})
                self.rec.write_identities(cfg)
            cfg = cfg.model_copy(update={"services": self.k8s.syncer.services()})
            failed = 0
            removed = [k for k in plan.deletes if k in self.rec.services]
            try:
                self.rec.apply_services(cfg, plan.upserts, removed)
            except ConfigError:
                # Something does not fit (nothing was written): apply one by
                # one, so that only the services that do not fit are left out.
                for key in removed:
                    self.rec.delete_service(cfg, key)
                for svc in plan.upserts:
                    try:
                        self.rec.upsert_service(cfg, svc)
                    except ConfigError as e:
                        failed += 1
                        self.errors += 1
                        log.error(kv("kubernetes: service not applied", service=svc.name, reason=e))
            if plan.identities is not None:
                self.rec.prune_identities(cfg)
            self._cfg, self._table = cfg, None
            for svc in plan.upserts:        # not a full keeper pass per batch
                self._backends_added(svc)
            log.debug(kv("kubernetes: batch applied", upserts=len(plan.upserts),
                         deletes=len(plan.deletes), failed=failed,
                         identities=plan.identities is not None))

    def start(self) -> None:
        if self.cfg.kubernetes is not None:
            self._start_kubernetes()
        self.health.update(self.cfg)          # every backend starts up...
        self._resume_health()                 # ...but one a previous run took out stays out
        _check_interfaces(self.cfg)
        with self._timed("full"):
            res = self.rec.apply(self.health.effective_config(self.cfg))
        self.last_apply = res.as_dict()
        log.info(kv("applied config", config=self.config_path, generation=self.rec.generation,
                    services=len(self.cfg.services), **_changes(res)))
        self.ifindexes = self.dp.attach(self.cfg.interfaces, self.cfg.xdp_mode)
        gone = self.dp.detach_others(self.cfg.interfaces)   # left pinned by an older config
        log.info(kv("attached", interfaces=self.cfg.interfaces, mode=self.cfg.xdp_mode,
                    prog_id=self.dp.prog.id, pins=self.dp.pin_dir, detached=gone))
        self._start_neighbours()
        self._start_metrics(self.cfg)
        self.api = api.ApiServer(self.cfg.api_socket, self.handlers()).start()
        log.info(kv("api listening", socket=self.cfg.api_socket))
        self.health.start()
        threading.Thread(target=self._health_apply_loop, name="xdplb-health-apply", daemon=True).start()
        if self.k8s is not None:
            self.k8s.run_forever()       # its thread freezes the first sync's objects (GC)
            self.k8s.synced.set()
        # Only now do the maps hold the config and the links run it.
        sd_notify(f"READY=1\nSTATUS={self._status_line()}")
        log.info(kv("ready", pid=os.getpid(), generation=self.rec.generation))
        self._announce()
        if self.k8s is None:            # Kubernetes mode freezes in its own thread
            threading.Thread(target=freeze_state, name="xdplb-gc-freeze", daemon=True).start()

    def _start_neighbours(self) -> None:
        """Managed neighbour entries for every backend's next hop, resolved
        (up to a second) before READY, so that the first flows find them."""
        self.neighbours = NeighbourKeeper(self._backend_addresses,
                                          lambda: self.ifindexes,
                                          lambda: self._locked(lambda: drain_requests(self.dp)),
                                          lambda: self._locked(lambda: recent_destinations(self.dp)))
        st = self.neighbours.sync(wait=1.0)
        log.info(kv("neighbours kept", managed=st.managed, unresolved=len(st.unresolved),
                    no_route=st.no_route))
        for u in st.unresolved:
            log.warning(kv("next hop not resolved yet", neighbour=u))
        self.neighbours.start()

    def _backend_addresses(self):
        """The neighbour keeper's backend addresses: the map is taken under
        the lock (an upgrade swaps the maps), the pass over its 256k records
        (3 ms) runs outside it, so that API calls do not wait for it. The
        view keeps the map's memory mapped; a record rewritten meanwhile is
        seen at the next pass."""
        with self.lock:
            dp = self.dp
            view = dp.view("backends")
        return backend_addresses(dp, view)

    def serve_forever(self) -> None:
        while not self.stop.is_set():
            if self.reload_requested.wait(1.0):
                self.reload_requested.clear()
                self.reload()
            self._reclaim()
            healthy = self._check_health()
            if healthy:
                sd_notify("WATCHDOG=1")
            self._announce(healthy)

    def _announce(self, healthy: bool = True) -> None:
        """BGP: the VIPs with an active backend, while the watchdog's checks
        pass (the program attached with this config, the daemon's threads
        alive); none while draining or unhealthy."""
        if self.announcer is None:
            return
        with self.lock:
            vips = announceable_vips(self.rec.services.values(), self.dp.consts.BACKEND_ACTIVE) \
                if healthy else set()
        self.announcer.announce(vips)

    def _reclaim(self) -> None:
        """Free what updates retired, after an RCU grace period. The wait
        (membarrier: 10-80 ms on a busy machine) runs without daemon.lock,
        so updates are not held up behind it (measured in Kubernetes mode:
        every batch above 50 ms event->map waited for it under the lock)."""
        rc = self.rec.reclaimer
        with self.lock:
            if not rc.pending or not rc.begin():
                return
        rc.grace()          # an OSError propagates as synchronize()'s did; items stay set aside
        with self.lock:
            rc.finish()

    def health_problems(self) -> list[str]:
        """What a WATCHDOG=1 ping vouches for: every map is still pinned,
        every configured interface's pinned link is attached and runs our
        program, and the API and metrics threads are alive. Empty = healthy."""
        problems = []
        with self.lock:
            dp = self.dp
            for name in dp.maps:
                if name not in UNPINNED_MAPS and not (dp.pin_dir / "maps" / name).exists():
                    problems.append(f"map {name} is no longer pinned in {dp.pin_dir / 'maps'}")
            for ifname in self._cfg.interfaces:     # not .cfg: that copies 20k services after a change
                path = dp.link_path(ifname)
                try:
                    link = XdpLink.from_pin(str(path))
                    try:
                        info = link.info()
                    finally:
                        link.close()
                except Exception as e:
                    problems.append(f"{ifname}: pinned link {path} is gone ({e})")
                    continue
                if info.ifindex == 0:
                    problems.append(f"{ifname}: XDP link is detached (interface removed?)")
                elif info.prog_id != dp.prog.id:
                    problems.append(f"{ifname}: runs program {info.prog_id}, not ours ({dp.prog.id})")
        server = getattr(self, "api", None)
        if server is None or not server.alive():
            problems.append("API threads are not running")
        if not self.metrics.alive():
            problems.append("metrics thread is not running")
        if not self.health.alive():
            problems.append("backend health-check thread is not running")
        if self.neighbours is not None and not self.neighbours.alive():
            problems.append("neighbour keeper thread is not running")
        if self.k8s is not None and not (self.k8s._thread and self.k8s._thread.is_alive()):
            problems.append("kubernetes sync thread is not running")
        return problems

    def _check_health(self) -> bool:
        """health_problems(), logging each change of verdict once."""
        problems = tuple(self.health_problems())
        if problems != self._unhealthy:
            if problems:
                log.error(kv("health check failed, not pinging the watchdog", problems="; ".join(problems)))
            else:
                log.info("health check passes again, pinging the watchdog")
            self._unhealthy = problems
        return not problems

    def _status_line(self) -> str:
        return f"serving generation={self.rec.generation} services={len(self.rec.services)}"

    def _start_metrics(self, cfg: Config) -> None:
        """(Re)start the endpoint if its address changed. A failure is
        logged, not fatal: the data plane does not depend on metrics."""
        want = cfg.metrics_address or None
        if want == self.metrics.address:
            return
        self.metrics.stop()
        if want is None:
            log.info("metrics endpoint off (metrics_address: false)")
            return
        try:
            self.metrics.start(want)
        except ConfigError as e:
            log.error(kv("metrics endpoint not started", address=want, reason=e))
            return
        log.info(kv("metrics listening", address=f"http://{want}/metrics"))

    @contextlib.contextmanager
    def _timed(self, kind: str):
        """Apply duration on success, an apply error on any exception."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.metrics.apply_errors.labels(kind).inc()
            raise
        self.metrics.apply_seconds.labels(kind).observe(time.perf_counter() - t0)

    def shutdown(self) -> None:
        sd_notify("STOPPING=1\nSTATUS=stopping; XDP stays attached")
        log.info(kv("stopping", pid=os.getpid()))
        try:
            self.api.close()
        except Exception:
            pass
        self.metrics.stop()
        self.health.stop()
        if self.neighbours is not None:
            self.neighbours.close()      # the managed entries stay: the kernel keeps them fresh
        if self.k8s is not None:
            self.k8s.close()
        with self.lock:
            if self._dry:
                self._dry.close()
            self.dp.close()       # links and maps stay pinned: traffic continues
        log.info(kv("stopped; XDP stays attached (`xdplb down` detaches)", pins=self.cfg.bpffs))

    def reload(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd >= 253) requires.
        sd_notify(f"RELOADING=1\nSTATUS=reloading {self.config_path}\nMONOTONIC_USEC={monotonic_usec()}")
        log.info(kv("reload requested", config=self.config_path))
        try:
            try:
                cfg = load_config(self.config_path)
            except ConfigError:
                self.metrics.apply_errors.labels("full").inc()
                raise
            res = self.apply(cfg)
            log.info(kv("reload ok", config=self.config_path, generation=self.rec.generation,
                        services=len(cfg.services), **_changes(res)))
            freeze_state()
        except Exception as e:
            if not is_operational(e):
                raise
            # A bad file, or one naming an interface that is not there:
            # nothing was written (interfaces are checked before any map).
            self.errors += 1
            log.error(kv("reload rejected, keeping the running state", config=self.config_path,
                         reason=describe(e)))
        finally:
            # READY=1 ends the reload for systemd, whether it took or not.
            sd_notify(f"READY=1\nSTATUS={self._status_line()}")

    def apply(self, cfg: Config) -> dict:
        with self._timed("full"):
            return self._apply(cfg)

    def _apply(self, cfg: Config) -> dict:
        if cfg.bpffs != self.cfg.bpffs or cfg.limits != self.cfg.limits:
            raise ConfigError(["bpffs and limits cannot change while running: restart the daemon"])
        if (cfg.kubernetes is None) != (self.k8s is None) or \
                (self.k8s is not None and cfg.kubernetes != self.cfg.kubernetes):
            raise ConfigError(["kubernetes cannot be turned on, off or changed while running: "
                               "restart the daemon"])
        if (cfg.bgp is None) != (self.announcer is None):
            raise ConfigError(["bgp cannot be turned on or off while running: restart the daemon"])
        if self.k8s is not None and cfg.encap_families() != self.cfg.encap_families():
            raise ConfigError(["encap_source families cannot change in Kubernetes mode while "
                               "running (annotated DSR services depend on it): restart the daemon"])
        if self.k8s is not None:
            with self.lock:      # the cluster's services stay; the rest of the file applies
                cfg = cfg.model_copy(update={"services": self.cfg.services,
                                             "identities": self.cfg.identities})
        with self.lock:
            # Down backends stay out (draining) across reloads until they rise.
            _check_interfaces(cfg)
            res = self.rec.apply(self.health.effective_config(cfg))
            self.health.update(cfg)
            hl = cfg.health_check_limits
            self.health.set_limits(hl.max_in_flight, hl.max_probes_per_s)
            self.ifindexes = self.dp.attach(cfg.interfaces, cfg.xdp_mode)
            self.dp.detach_others(cfg.interfaces)
            self._set_config(cfg)
            self.last_apply = res.as_dict()
            self._start_metrics(cfg)
            if self.announcer is not None:
                self.announcer.reconfigure(cfg.bgp)
        self._announce()
        return res.as_dict()

    # -- API ----------------------------------------------------------------

    def handlers(self) -> dict:
        return {
            "status": lambda req: self.status(health_backends=req.get("health_backends", "all")),
            "stats": lambda req: self._locked(self._stats),
            "apply": self._api_apply,
            "flow": self._api_flow,
            "upsert_service": self._api_upsert,
            "delete_service": self._api_delete,
            "shutdown": self._api_shutdown,
            "upgrade": self._api_upgrade,
            "names": lambda req: self._locked(monitor.names, self.cfg, self.rec),
            "kubernetes": self._api_kubernetes,
            "bgp": self._api_bgp,
        }

    def _api_bgp(self, req: dict) -> dict:
        """BGP state; `drain: true` withdraws every VIP (until `drain: false`)."""
        if self.announcer is None:
            raise api.ApiError("BGP is off (no bgp: in the config)")
        if "drain" in req:
            self.announcer.drain(bool(req["drain"]))
            self._announce(not self.health_problems())
        return self.announcer.status()

    def _api_kubernetes(self, req: dict) -> dict:
        if self.k8s is None:
            raise api.ApiError("not in Kubernetes mode (no kubernetes: in the config)")
        return self.k8s.status(since=int(req.get("since", 0)), reset_latency=bool(req.get("reset_latency")),
                               brief=bool(req.get("brief")))

    def _not_k8s(self, what: str) -> None:
        if self.k8s is not None:
            raise api.ApiError(f"{what} refused: in Kubernetes mode the cluster is the source "
                               f"of services (kubectl, not xdplb)")

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    def status(self, health_backends: str = "all") -> dict:
        with self.lock:
            return {
                "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                "config": self.config_path, "generation": self.rec.generation,
                "interfaces": self.dp.attached(), "xdp_mode": self.cfg.xdp_mode,
                "snat_address": ", ".join(map(str, self.cfg.snat_address or ())) or None,
                "services": len(self.rec.services),
                "backends": sum(len(s.backends) for s in self.rec.services.values()),
                "identities": len(self.rec.identities), "last_apply": self.last_apply,
                "errors": self.errors, "pending_reclaim": self.rec.reclaimer.pending,
                "maps": self._map_fill(),
                "maglev_pool": {"slots": self.rec.pool.total,
                                "free": self.rec.pool.free_total},
                "health": self._health_status(health_backends),
                "neighbours": asdict(self.neighbours.status) if self.neighbours else None,
            }

    def _map_fill(self) -> dict:
        """Every map's capacity and, where it has one, its fill level: a
        full conntrack, NAT table or pool shows here before it shows as
        drops (README "Resource exhaustion")."""
        entries, capacity = map_fill(self.dp, self.rec)
        out = {}
        for name, mp in self.dp.maps.items():
            d: dict = {"max_entries": mp.max_entries}
            if name in capacity:
                d.update(entries=entries[name], capacity=capacity[name],
                         fill=round(entries[name] / capacity[name], 4) if capacity[name] else None)
            out[name] = d
        return out

    def _api_apply(self, req: dict) -> dict:
        try:
            try:
                cfg = parse_config(req["config"], source=req.get("source", "<api>")) if "config" in req \
                    else config_from_dict(req["config_dict"])
            except ConfigError:
                self.metrics.apply_errors.labels("full").inc()   # apply() counts its own
                raise
            res = self.apply(cfg)
        except ConfigError as e:
            log.warning(kv("api apply rejected, nothing changed", reason=e))
            raise api.ApiError(f"config rejected, nothing changed: {e}", e.errors) from None
        log.info(kv("applied config via api", generation=self.rec.generation,
                    services=len(self.cfg.services), **_changes(res)))
        return res

    def _api_upsert(self, req: dict) -> dict:
        """Add or replace one service. Validated alone against the running
        config's identities, checked against the other services' keys, and
        applied without touching the rest: O(1) in the number of services,
        so an update costs the same at 20k services as at 1."""
        with self.lock, self._timed("service"), self._logged("upsert_service"):
            self._not_k8s("service put")
            try:
                svc = parse_service(req["service"], self._cfg)
            except ConfigError as e:
                raise api.ApiError(f"service rejected, nothing changed: {e}", e.errors) from None
            table = self._services()
            holder = table.holder(svc)
            if holder is not None and holder != svc.name:
                raise api.ApiError(f"service rejected, nothing changed: {host_port(svc.vip, svc.port)}/"
                                   f"{svc.protocol} is already service {holder!r}")
            old = table.get(svc.name)
            # A new key: the old record goes in the same apply (one capacity
            # check before any write).
            gone = [old.key] if old is not None and old.key != svc.key else []
            res = self.rec.apply_services(self._cfg, [self.health.effective_service(svc)], gone)
            table.put(svc)
            self.health.set_service(svc)
            self._backends_added(svc)
            log.info(kv("service applied via api", service=svc.name, generation=self.rec.generation,
                        **_changes(res)))
            return res.as_dict()

    def _api_delete(self, req: dict) -> dict:
        with self.lock, self._timed("service"), self._logged("delete_service"):
            self._not_k8s("service delete")
            table = self._services()
            old = table.get(req["name"])
            if old is None:
                raise api.ApiError(f"no service named {req['name']!r}")
            res = self.rec.delete_service(self._cfg, old.key)
            table.pop(old.name)
            self.health.drop_service(old.name)
            # Its next hops' entries go at the keeper's next full pass.
            log.info(kv("service deleted via api", service=old.name, generation=self.rec.generation,
                        **_changes(res)))
            return res.as_dict()

    @contextlib.contextmanager
    def _logged(self, what: str):
        try:
            yield
        except api.ApiError as e:
            log.warning(kv(f"api {what} rejected, nothing changed", reason=e))
            raise

    # -- health checks ---------------------------------------------------------

    def _health_transition(self, tr: Transition) -> None:
        """In the checker's thread: queue the service, apply elsewhere (an
        apply can wait for daemon.lock; probes must not)."""
        with self._health_mu:
            self._health_dirty.add(tr.service)
        self._health_wake.set()

    def _resume_health(self) -> None:
        """After a restart the pinned maps tell which backends the previous
        run had taken out (draining there, active in the config): they start
        down and need `rise` passes, so a restart does not put a dead backend
        back into rotation for fall x interval."""
        draining = self.dp.consts.BACKEND_DRAINING
        for svc in self.cfg.services:
            live = self.rec.services.get(svc.key)
            if svc.health_check is None or live is None:
                continue
            for b in svc.backends:
                held = live.backends.get(bkey(b.address, b.port))
                if b.state == "active" and held is not None and held.state == draining:
                    self.health.seed_down(svc.name, b.key, "out of rotation before the restart")

    def _health_apply_loop(self) -> None:
        """Re-apply services whose backends went down or up, each with one
        atomic upsert_service() (O(its backends), not O(config))."""
        while not self.stop.is_set():
            if not self._health_wake.wait(0.5):
                continue
            self._health_wake.clear()
            with self._health_mu:
                names, self._health_dirty = self._health_dirty, set()
            for name in sorted(names):
                with self.lock:         # per service: API calls interleave with a burst
                    self._health_apply(name)

    def _health_apply(self, name: str) -> None:
        svc = self._services().get(name)
        if svc is None:
            return                      # deleted meanwhile
        eff = self.health.effective_service(svc)
        live = self.rec.services.get(svc.key)
        if live is not None and live.applied == eff:
            return                      # e.g. a reload already applied it
        try:
            res = self.rec.upsert_service(self._cfg, eff)
        except Exception:
            self.errors += 1
            log.exception("health: applying service=%s failed", name)
            return
        self._backends_added(eff)
        log.info(kv("health: service re-applied", service=name,
                    draining=[b.key for b in eff.backends if b.state == "draining"],
                    seconds=res.seconds))

    def _health_status(self, which: str = "all") -> dict:
        """The checker's view, plus whether the maps give each backend new
        flows (in_rotation), which lags a transition by one apply. `which`:
        "all" backends, or only "unhealthy" ones (down or failing: what a
        table shows at 200k backends)."""
        if which not in ("all", "unhealthy"):
            raise api.ApiError(f"health_backends must be 'all' or 'unhealthy', not {which!r}")
        backends = self.health.snapshot(unhealthy_only=which == "unhealthy")
        active, rotation = self.dp.consts.BACKEND_ACTIVE, {}
        for name in {b["service"] for b in backends}:
            svc = self._services().get(name)
            live = self.rec.services.get(svc.key) if svc is not None else None
            for lb_ in (live.backends.values() if live else ()):
                rotation[(name, host_port(lb_.address, lb_.port))] = lb_.state == active
        for b in backends:
            b["in_rotation"] = rotation.get((b["service"], b["backend"]))
        return {**self.health.summary(), "backends": backends}

    def _stats(self) -> dict:
        res = stats.collect(self.dp, self.rec)
        states = self.health.states()
        for s in res["services"]:
            for b in s["backends"]:
                up = states.get((s["name"], host_port(b["address"], b["port"])))
                b["health"] = None if up is None else ("up" if up else "down")
        return res

    def _set_config(self, cfg: Config) -> None:
        """After every full apply: the new config."""
        self._cfg = cfg
        self._table = None
        self._services_changed()

    def _services_changed(self) -> None:
        """After every apply: the neighbour keeper told (backends may have
        new next hops)."""
        if self.neighbours is not None:
            self.neighbours.kick()

    def _backends_added(self, svc: Service) -> None:
        """After a one-service change: the keeper follows its backends'
        addresses at once, without a pass over every backend."""
        if self.neighbours is not None:
            self.neighbours.added([str(b.address) for b in svc.backends])

    def _api_flow(self, req: dict) -> dict:
        proto = req["proto"].lower()
        if proto not in PROTOCOLS:
            raise api.ApiError(f"protocol must be one of {sorted(PROTOCOLS)}, not {proto!r}")
        with self.lock:
            if self._dry is None:
                self._dry = Dataplane.open(self.cfg, self.object_path, dry_run=True, share_with=self.dp)
            ifindex = req.get("ifindex") or self.ifindexes[0]
            try:
                return flow.probe(self._dry, self.rec, req["src"], int(req["sport"]), req["dst"],
                                  int(req["dport"]), proto, ingress_ifindex=ifindex)
            except ValueError as e:            # an address of neither family, or of two
                raise api.ApiError(f"flow: {e}") from None

    def _api_upgrade(self, req: dict) -> dict:
        """Swap in a new build of the program: the new object reuses the
        pinned maps (refused with a clear error if their layout differs) and
        replaces the program in every pinned link with one bpf_link_update,
        so no packet is missed and no flow is forgotten."""
        path = Path(req["object"]).resolve()
        with self.lock:
            old = self.dp
            new = Dataplane.open(self.cfg, path)       # raises on an incompatible layout
            try:
                self.ifindexes = new.attach(self.cfg.interfaces, self.cfg.xdp_mode)
            except BaseException:
                new.close()
                raise
            if self._dry:
                self._dry.close()
                self._dry = None
            self.rec.reclaimer.synchronize()     # pending frees use the old map handles
            self.rec.dp = new
            self.dp, self.object_path = new, path
            old.close()
            log.info("upgraded program object=%s prog_id=%d", path, new.prog.id)
            return {"object": str(path), "prog_id": new.prog.id, "interfaces": new.attached()}

    def _api_shutdown(self, req: dict) -> dict:
        self.stop.set()
        return {"stopping": True}


def freeze_state() -> None:
    """Move the objects a full apply left (the config's models, the
    reconciler's records: ~1M at 20k services) out of the cyclic collector's
    sight. Otherwise a full pass walks them all (300 ms at 20k services,
    measured by bench.loaded_update) and lands on whatever update runs then.
    The state is acyclic: refcounting still frees it when it is replaced."""
    gc.collect()
    gc.freeze()


def _check_interfaces(cfg: Config) -> None:
    """Every interface must exist before a map is written: a typo in
    `interfaces:` must not leave the pinned maps holding a config that the
    start or reload then refuses."""
    for name in cfg.interfaces:
        lookup_ifindex(name)             # InterfaceNotFound names it


def _changes(res) -> dict:
    """The log fields of an ApplyResult (or its as_dict())."""
    d = res if isinstance(res, dict) else res.as_dict()
    return {k: d[k] for k in ("added", "updated", "removed", "unchanged", "seconds") if k in d}


def run(config_path: str, netns: str | None = None, object_path: Path | None = None) -> int:
    """The daemon's life; returns the exit status. An operational error (a
    bad config, a missing interface, a refused syscall, ...) ends it with
    one log line saying why; only a bug logs a traceback."""
    configure_logging()
    log.info(kv("starting", pid=os.getpid(), config=config_path,
                object=object_path or default_object_path()))
    try:
        path = object_path or default_object_path()
        if not Path(path).is_file():    # before a large config's parse, not after it
            raise BpfError(f"BPF object {path} not found: build it with `make bpf`", errno.ENOENT)
        cfg = load_config(config_path)
        # Before the maps or links are touched: a second daemon would
        # reconcile the live one's maps and swap its program into the links.
        api.check_not_served(cfg.api_socket)
        ensure_bpffs(cfg.bpffs)
        netns = netns or cfg.netns
        if netns:
            enter_netns(netns)
        d = Daemon(config_path, cfg, object_path)
        signal.signal(signal.SIGHUP, lambda *_: d.reload_requested.set())
        signal.signal(signal.SIGTERM, lambda *_: d.stop.set())
        signal.signal(signal.SIGINT, lambda *_: d.stop.set())
        try:
            d.start()
            d.serve_forever()
        finally:
            d.shutdown()
    except Exception as e:
        if not is_operational(e):
            log.exception(kv("exiting on an unexpected error (a bug in xdplb)",
                             error=f"{type(e).__name__}: {e}"))
            return 1
        log.error(kv("exiting on error", error=describe(e)))
        return 1
    return 0
