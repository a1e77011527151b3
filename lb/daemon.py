"""`xdplb run`: attach, apply, serve the API, re-apply on SIGHUP.

Stopping the daemon (SIGTERM, SIGINT, kill -9) leaves the XDP links and
maps pinned, so traffic keeps flowing; the next start reconciles against
them without touching established flows. `xdplb down` detaches on purpose.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from . import api, flow, stats
from .config import Config, ConfigError, config_from_dict, config_to_dict, load_config, parse_config
from .dataplane import Dataplane
from .reconcile import PROTOCOLS, Reconciler

log = logging.getLogger("xdplb")


def sd_notify(message: str) -> None:
    """The sd_notify(3) datagram protocol: a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


def enter_netns(name: str) -> None:
    """Move this process (before any thread starts) into a named netns.
    Unlike `ip netns exec`, this keeps /sys, so bpffs pins stay visible."""
    from pyroute2 import netns

    netns.setns(name)


class Daemon:
    def __init__(self, config_path: str | None, cfg: Config, object_path: Path | None = None):
        self.config_path = config_path
        self.cfg = cfg
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.dp = Dataplane.open(cfg, object_path)
        self.object_path = object_path
        self.rec = Reconciler(self.dp)
        self._dry: Dataplane | None = None
        self.started = time.time()
        self.last_apply: dict[str, Any] = {}
        self.errors = 0
        self._idx: dict | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        res = self.rec.apply(self.cfg)
        self.last_apply = res.as_dict()
        self.ifindexes = self.dp.attach(self.cfg.interfaces, self.cfg.xdp_mode)
        self.dp.detach_others(self.cfg.interfaces)   # left pinned by an older config
        log.info("applied %d services (%s) and attached to %s in %s mode",
                 len(self.cfg.services), res.as_dict(), ",".join(self.cfg.interfaces), self.cfg.xdp_mode)
        self.api = api.ApiServer(self.cfg.api_socket, self.handlers()).start()
        sd_notify("READY=1\nSTATUS=serving")

    def serve_forever(self) -> None:
        while not self.stop.is_set():
            if self.reload_requested.wait(1.0):
                self.reload_requested.clear()
                self.reload()
            with self.lock:
                if self.rec.reclaimer.pending:
                    self.rec.reclaimer.synchronize()
            sd_notify("WATCHDOG=1")

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        try:
            self.api.close()
        except Exception:
            pass
        with self.lock:
            if self._dry:
                self._dry.close()
            self.dp.close()       # links and maps stay pinned: traffic continues
        log.info("stopped; XDP stays attached (use `xdplb down` to detach)")

    def reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            cfg = load_config(self.config_path)
            self.apply(cfg)
            log.info("reloaded %s", self.config_path)
        except ConfigError as e:
            self.errors += 1
            log.error("reload rejected, keeping the running state: %s", e)
        finally:
            sd_notify("READY=1")

    def apply(self, cfg: Config) -> dict:
        if cfg.bpffs != self.cfg.bpffs or cfg.limits != self.cfg.limits:
            raise ConfigError(["bpffs and limits cannot change while running: restart the daemon"])
        with self.lock:
            res = self.rec.apply(cfg)
            self.dp.attach(cfg.interfaces, cfg.xdp_mode)
            self.dp.detach_others(cfg.interfaces)
            self._set_config(cfg)
            self.last_apply = res.as_dict()
        return res.as_dict()

    # -- API ----------------------------------------------------------------

    def handlers(self) -> dict:
        return {
            "status": lambda req: self.status(),
            "stats": lambda req: self._locked(stats.collect, self.dp, self.rec),
            "apply": self._api_apply,
            "flow": self._api_flow,
            "upsert_service": self._api_upsert,
            "delete_service": self._api_delete,
            "shutdown": self._api_shutdown,
            "upgrade": self._api_upgrade,
        }

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    def status(self) -> dict:
        with self.lock:
            m = self.dp.maps
            return {
                "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                "config": self.config_path, "generation": self.rec.generation,
                "interfaces": self.dp.attached(), "xdp_mode": self.cfg.xdp_mode,
                "snat_address": str(self.cfg.snat_address) if self.cfg.snat_address else None,
                "services": len(self.rec.services),
                "backends": sum(len(s.backends) for s in self.rec.services.values()),
                "identities": len(self.rec.identities), "last_apply": self.last_apply,
                "errors": self.errors, "pending_reclaim": self.rec.reclaimer.pending,
                "maps": {name: {"max_entries": mp.max_entries} for name, mp in m.items()},
                "maglev_pool": {"slots": self.rec.pool.total if hasattr(self.rec.pool, "total") else None,
                                "free": self.rec.pool.free_total},
            }

    def _api_apply(self, req: dict) -> dict:
        try:
            cfg = parse_config(req["config"], source=req.get("source", "<api>")) if "config" in req \
                else config_from_dict(req["config_dict"])
            return self.apply(cfg)
        except ConfigError as e:
            raise api.ApiError(f"config rejected, nothing changed: {e}", e.errors) from None

    def _api_upsert(self, req: dict) -> dict:
        """Add or replace one service. Validated against the identities of the
        running config and the other services' keys in O(1), so an update
        costs the same at 20k services as at 1."""
        with self.lock:
            cfg = self.cfg
            mini = {"interfaces": list(cfg.interfaces), "services": [req["service"]],
                    "identities": {k: [str(n) for n in v] for k, v in cfg.identities.items()}}
            try:
                svc = config_from_dict(mini, source="<api>").services[0]
            except ConfigError as e:
                raise api.ApiError(f"service rejected, nothing changed: {e}", e.errors) from None
            index = self._index()
            holder = index["by_key"].get(svc.key)
            if holder is not None and holder != svc.name:
                raise api.ApiError(f"service rejected, nothing changed: {svc.vip}:{svc.port}/"
                                   f"{svc.protocol} is already service {holder!r}")
            services = list(cfg.services)
            pos = index["by_name"].get(svc.name)
            old = services[pos] if pos is not None else None
            if pos is None:
                services.append(svc)
            else:
                services[pos] = svc
            new_cfg = cfg.model_copy(update={"services": tuple(services)})
            if old is not None and old.key != svc.key:
                self.rec.delete_service(new_cfg, old.key)
            res = self.rec.upsert_service(new_cfg, svc)
            self._set_config(new_cfg)
            return res.as_dict()

    def _api_delete(self, req: dict) -> dict:
        with self.lock:
            pos = self._index()["by_name"].get(req["name"])
            if pos is None:
                raise api.ApiError(f"no service named {req['name']!r}")
            services = list(self.cfg.services)
            old = services.pop(pos)
            new_cfg = self.cfg.model_copy(update={"services": tuple(services)})
            res = self.rec.delete_service(new_cfg, old.key)
            self._set_config(new_cfg)
            return res.as_dict()

    def _index(self) -> dict:
        if self._idx is None:
            self._idx = {"by_name": {s.name: i for i, s in enumerate(self.cfg.services)},
                         "by_key": {s.key: s.name for s in self.cfg.services}}
        return self._idx

    def _set_config(self, cfg: Config) -> None:
        self.cfg = cfg
        self._idx = None

    def _api_flow(self, req: dict) -> dict:
        proto = req["proto"].lower()
        if proto not in PROTOCOLS:
            raise api.ApiError(f"protocol must be one of {sorted(PROTOCOLS)}, not {proto!r}")
        with self.lock:
            if self._dry is None:
                self._dry = Dataplane.open(self.cfg, self.object_path, dry_run=True, share_with=self.dp)
            ifindex = req.get("ifindex") or self.ifindexes[0]
            return flow.probe(self._dry, self.rec, req["src"], int(req["sport"]), req["dst"],
                              int(req["dport"]), proto, ingress_ifindex=ifindex)

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


def run(config_path: str, netns: str | None = None, object_path: Path | None = None) -> int:
    cfg = load_config(config_path)
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
    return 0
