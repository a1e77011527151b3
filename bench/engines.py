"""The engines under test, all driven the same way on the same lab:

- `xdplb`: the real program and control plane (lb.dataplane.Dataplane +
  lb.reconcile.Reconciler) on l0 and l1;
- `iptables-legacy`, `iptables-nft`: kube-proxy's nat-table layout through
  iptables-restore --noflush, forwarding by the kernel;
- `nftables`: kube-proxy's nftables layout through `nft -f`;
- `forwarder`: a bare XDP redirect (no load balancing), the lab's limit;
- beside Katran (bench/versus.py): `xdplb-ipip`/`xdplb-gue` (DSR, once
  xdplb has it) and `katran:PATH` (bench/katran.py).

The kernel-path engines get an XDP_PASS program on l0: a veth receives
frames that its peer XDP_TX'd only when it has NAPI, i.e. an XDP program.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .kubeproxy import (KService, iptables_chains, iptables_full, iptables_update, nft_full,
                        nft_update, sep_chain)
from .lab import CLUSTER_CIDR, SERVICE_PORT, BenchLab, backend_ip, backend_port, vip
from .memcg import KmemCgroup
from .progs import Forwarder

ENGINES = ("xdplb", "iptables-legacy", "iptables-nft", "nftables")
GUE_PORT = 6080                 # the default GUE port of xdplb's decap and of Katran
# xdplb by the services' forwarding mode (the DSR ones are issue 12's): name -> mode.
XDPLB_VARIANTS = {"xdplb": "nat", "xdplb-ipip": "ipip", "xdplb-gue": "gue"}
_seq = itertools.count()


@dataclass(frozen=True)
class BService:
    index: int
    proto: str
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return f"svc-{self.index}"

    @property
    def stamp(self) -> int:
        """What the generator writes in the payload for this service."""
        return self.index + 1

    def kube(self) -> KService:
        return KService("bench", self.name, f"p{self.port}", self.proto, self.vip, self.port,
                        self.endpoints)

    def xdplb(self) -> dict:
        return {"name": self.name, "vip": self.vip, "port": self.port, "protocol": self.proto,
                "backends": [f"{a}:{p}" for a, p in self.endpoints]}


def make_service(i: int, endpoints: int, proto: str) -> BService:
    eps = tuple((backend_ip(i, j), backend_port(j)) for j in range(endpoints))
    return BService(i, proto, vip(i), SERVICE_PORT, eps)


def make_services(n: int, endpoints: int, proto: str) -> list[BService]:
    return [make_service(i, endpoints, proto) for i in range(n)]


def replace_endpoint(s: BService, k: int) -> BService:
    """The same service with endpoint 0 moved to another address (one pod
    replaced), different for every k."""
    eps = list(s.endpoints)
    eps[0] = (backend_ip(s.index, 16 + k % 16), eps[0][1])
    return replace(s, endpoints=tuple(eps))


@dataclass
class SyncResult:
    seconds: float
    detail: dict = field(default_factory=dict)


class Engine:
    name = ""
    kernel_path = True          # packets are forwarded by the kernel stack
    encapsulates = False        # DSR: the client's packet goes to the backend inside an outer header
    gue_port = 0                # ... a GUE one to this UDP port (0: IPIP)
    transmits_back = False      # XDP_TX: its frames leave by l0, back to g0 (the sink is there too)

    def __init__(self, bl: BenchLab) -> None:
        self.bl = bl
        self.services: list[BService] = []
        self.memcg: KmemCgroup | None = None

    @property
    def label(self) -> str:
        """What the engine is, for tables."""
        return self.name

    def deliveries(self, s: BService) -> list[tuple]:
        """Where the sink may see service s's packets (Sink.allow entries):
        at a backend's address and port after NAT; for DSR, at a backend's
        address with the client's packet unchanged inside (the service's
        port, its VIP)."""
        if self.encapsulates:
            return [(a, s.port, s.proto, s.stamp, s.vip) for a, _ in s.endpoints]
        return [(a, p, s.proto, s.stamp) for a, p in s.endpoints]

    # -- lifecycle ------------------------------------------------------

    def attach(self) -> None:
        """Put the engine's program on l0 (and l1)."""

    def detach(self) -> None:
        pass

    def full_sync(self, services: list[BService]) -> SyncResult:
        raise NotImplementedError

    def add(self, s: BService) -> float:
        raise NotImplementedError

    def update(self, old: BService, new: BService) -> float:
        raise NotImplementedError

    def delete(self, s: BService) -> float:
        raise NotImplementedError

    def clear(self) -> None:
        """Remove every service and rule (between sweep points)."""

    def memory(self) -> dict:
        return {}

    def program_fd(self) -> int | None:
        """The XDP program whose run statistics are the engine's cost."""
        return None

    def close(self) -> None:
        self.clear()
        self.detach()
        if self.memcg:
            self.memcg.close()

    def _new_memcg(self) -> KmemCgroup:
        if self.memcg:
            self.memcg.close()
        self.memcg = KmemCgroup(f"{self.name}-{next(_seq)}")
        return self.memcg


class _PassOnL0(Engine):
    """Kernel-path engines: XDP_PASS on l0 so that the veth gets frames."""

    def __init__(self, bl: BenchLab) -> None:
        super().__init__(bl)
        self.pass_prog: Forwarder | None = None

    def attach(self) -> None:
        self.pass_prog = Forwarder("pass_main")
        with self.bl.inside(self.bl.lb_ns):
            self.pass_prog.attach(self.bl.l0)

    def detach(self) -> None:
        if self.pass_prog:
            with self.bl.inside(self.bl.lb_ns):
                self.pass_prog.close()
            self.pass_prog = None

    def _run(self, argv: list[str], text: str, cgroup: bool = False) -> float:
        """Run a rule loader in the lb namespace; wall-clock seconds."""
        prefix = self.memcg.shell_prefix() if cgroup and self.memcg else []
        t0 = time.perf_counter()
        r = self.bl.lab.run(self.bl.lb_ns, prefix + argv, input=text, timeout=600, check=False)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[:2000]}")
        return dt


class IptablesEngine(_PassOnL0):
    """kube-proxy's iptables mode; `variant` is legacy or nft."""

    def __init__(self, bl: BenchLab, variant: str) -> None:
        super().__init__(bl)
        self.variant = variant
        self.name = f"iptables-{variant}"
        # Syncs use --noflush as kube-proxy does. The full sync into the
        # empty table does not: with the nft backend, --noflush makes every
        # chain declaration cost a pass over the table (10k services: 132 s
        # against 3.5 s), and on an empty table both give the same rules.
        self.restore = [f"iptables-{variant}-restore", "--noflush"]
        self.restore_full = [f"iptables-{variant}-restore"]
        self.kernel_bytes: int | None = None

    def full_sync(self, services: list[BService]) -> SyncResult:
        self.services = list(services)
        memcg = self._new_memcg()
        t0 = time.perf_counter()
        text = iptables_full([s.kube() for s in services], CLUSTER_CIDR)
        gen = time.perf_counter() - t0
        run = self._run(self.restore_full, text, cgroup=True)
        self.kernel_bytes = memcg.kernel_bytes()
        rules = sum(1 for line in text.splitlines() if line.startswith("-A "))
        return SyncResult(gen + run, {"generate_s": gen, "restore_s": run, "rules": rules,
                                      "chains": sum(1 for line in text.splitlines() if line.startswith(":"))})

    def _sync(self, changed: list[BService], stale: list[str]) -> float:
        t0 = time.perf_counter()
        text = iptables_update([s.kube() for s in self.services], [s.kube() for s in changed],
                               stale, CLUSTER_CIDR)
        gen = time.perf_counter() - t0
        return gen + self._run(self.restore, text)

    def add(self, s: BService) -> float:
        self.services.append(s)
        return self._sync([s], [])

    def update(self, old: BService, new: BService) -> float:
        self.services[self._pos(old)] = new
        k_old = old.kube()
        stale = [sep_chain(k_old, ep) for ep in old.endpoints if ep not in new.endpoints]
        return self._sync([new], stale)

    def delete(self, s: BService) -> float:
        self.services.pop(self._pos(s))
        return self._sync([], iptables_chains(s.kube()))

    def _pos(self, s: BService) -> int:
        return next(i for i, x in enumerate(self.services) if x.index == s.index)

    def clear(self) -> None:
        binary = f"iptables-{self.variant}"
        for argv in ([binary, "-t", "nat", "-F"], [binary, "-t", "nat", "-X"]):
            self.bl.lab.run(self.bl.lb_ns, argv, check=False, timeout=600)
        self.services = []

    def memory(self) -> dict:
        return {"kernel_bytes": self.kernel_bytes, "source": "memcg kmem of iptables-restore"}


class NftEngine(_PassOnL0):
    name = "nftables"

    def __init__(self, bl: BenchLab) -> None:
        super().__init__(bl)
        self.kernel_bytes: int | None = None

    def full_sync(self, services: list[BService]) -> SyncResult:
        self.services = list(services)
        memcg = self._new_memcg()
        t0 = time.perf_counter()
        text = nft_full([s.kube() for s in services], CLUSTER_CIDR)
        gen = time.perf_counter() - t0
        run = self._run(["nft", "-f", "-"], text, cgroup=True)
        self.kernel_bytes = memcg.kernel_bytes()
        return SyncResult(gen + run, {"generate_s": gen, "restore_s": run,
                                      "rules": sum(1 for line in text.splitlines() if line.startswith("add rule")),
                                      "chains": sum(1 for line in text.splitlines() if line.startswith("add chain"))})

    def _sync(self, changed: list[BService], removed: list[BService], old: dict) -> float:
        t0 = time.perf_counter()
        text = nft_update([s.kube() for s in changed], [s.kube() for s in removed], old, CLUSTER_CIDR)
        gen = time.perf_counter() - t0
        return gen + self._run(["nft", "-f", "-"], text)

    def add(self, s: BService) -> float:
        self.services.append(s)
        return self._sync([s], [], {})

    def update(self, old: BService, new: BService) -> float:
        self.services[next(i for i, x in enumerate(self.services) if x.index == old.index)] = new
        return self._sync([new], [], {old.kube().port_id: old.kube()})

    def delete(self, s: BService) -> float:
        self.services = [x for x in self.services if x.index != s.index]
        return self._sync([], [s], {})

    def clear(self) -> None:
        self.bl.lab.run(self.bl.lb_ns, ["nft", "delete", "table", "ip", "kube-proxy"], check=False,
                        timeout=600)
        self.services = []

    def memory(self) -> dict:
        return {"kernel_bytes": self.kernel_bytes, "source": "memcg kmem of nft -f"}


class ForwarderEngine(Engine):
    """Bare XDP forwarder on l0: MAC rewrite + bpf_redirect into l1
    (`forwarder`), or the same plus one LRU conntrack lookup and insert on a
    miss (`state-floor`, bench/bpf/fwd.c). Neither balances."""

    kernel_path = False
    PROGRAMS = {"forwarder": "fwd_main", "state-floor": "state_main"}

    def __init__(self, bl: BenchLab, name: str = "forwarder") -> None:
        super().__init__(bl)
        self.name = name
        self.fwd: Forwarder | None = None

    def attach(self) -> None:
        self.fwd = Forwarder(self.PROGRAMS[self.name])
        self.fwd.configure(self.bl.l1, self.bl.l1_mac, self.bl.s0_mac)
        with self.bl.inside(self.bl.lb_ns):
            self.fwd.attach(self.bl.l0)

    def detach(self) -> None:
        if self.fwd:
            with self.bl.inside(self.bl.lb_ns):
                self.fwd.close()
            self.fwd = None

    def full_sync(self, services: list[BService]) -> SyncResult:
        self.services = list(services)
        return SyncResult(0.0)

    def program_fd(self) -> int | None:
        return self.fwd.prog.fd if self.fwd else None


def xdplb_config(services: list[BService], bpffs: str, capacity: int, endpoints: int) -> dict:
    """xdplb's config for `services` on the bench lab's l0 and l1, with
    Maglev slots for `capacity` services of `endpoints` backends."""
    # The new-flow sweep is a flood by construction: the flood guard is
    # off, so every packet pays for the state it writes (the stateful
    # path is what is measured; bench/flood.py measures the guard).
    return {"interfaces": ["l0", "l1"], "bpffs": bpffs,
            "limits": {"maglev_slots": maglev_slots(capacity, endpoints)},
            "flood_guard": {"new_flows_per_second": 0},
            "services": [s.xdplb() for s in services]}


class XdplbEngine(Engine):
    """The product: a fresh Dataplane (own pins) per sweep point.

    `forwarding`: the services' mode, nat (gateway NAT) or a DSR mode
    (ipip, gue: issue 12), or a tuple of modes the services take in turn
    by index (bench.core --interleaved: one program, every mode)."""

    kernel_path = False

    def __init__(self, bl: BenchLab, object_path: Path | None = None,
                 forwarding: str | tuple[str, ...] = "nat", settings: dict | None = None) -> None:
        super().__init__(bl)
        names = {v: k for k, v in XDPLB_VARIANTS.items()}
        self.modes = (forwarding,) if isinstance(forwarding, str) else tuple(forwarding)
        for mode in self.modes:
            if mode not in names:
                raise ValueError(f"forwarding {mode!r}: one of {', '.join(names)}")
            if mode != "nat" and not dsr_supported():
                raise NotImplementedError(f"{names[mode]}: this xdplb has no per-service `forwarding` "
                                          "(issue 12's DSR modes)")
        self.forwarding = self.modes[0]
        self.name = "+".join(names[m] for m in self.modes)
        # What the sink checks (Engine.deliveries): meaningful for one mode.
        self.encapsulates = self.forwarding != "nat"
        self.gue_port = GUE_PORT if self.forwarding == "gue" else 0
        self.object_path = object_path
        # Top-level config entries over the sweep's (bench/overflow.py: the guard, SNAT).
        self.settings = settings or {}
        self.dp = None
        self.rec = None
        self.cfg = None
        self.bpffs: str | None = None
        self.kernel_bytes: int | None = None
        self.kernel_bytes_empty: int | None = None

    def _service(self, s: BService) -> dict:
        d = s.xdplb()
        mode = self.modes[s.index % len(self.modes)]
        if mode != "nat":
            # DSR does not rewrite the port: each endpoint serves the
            # service's (where Engine.deliveries() expects the packets).
            d["forwarding"] = mode
            d["backends"] = [f"{a}:{s.port}" for a, _ in s.endpoints]
        return d

    def _config(self, services: list[BService], capacity: int, endpoints: int) -> dict:
        cfg = xdplb_config(services, self.bpffs, capacity, endpoints)
        cfg["services"] = [self._service(s) for s in services]
        return {**cfg, **self._encap(), **self.settings}

    def _encap(self) -> dict:
        """What DSR services need in the config: the tunnels' outer source."""
        from .lab import LB_SINK_IP

        return {"encap_source": LB_SINK_IP} if set(self.modes) != {"nat"} else {}

    def full_sync(self, services: list[BService]) -> SyncResult:
        from lb.config import config_from_dict
        from lb.dataplane import Dataplane
        from lb.reconcile import Reconciler

        self.clear()
        self.bpffs = f"/sys/fs/bpf/xdplb-bench-{os.getpid()}-{next(_seq)}"
        endpoints = max((len(s.endpoints) for s in services), default=3)
        d = self._config(services, max(len(services), 1), endpoints)
        memcg = self._new_memcg()
        with memcg.thread_inside():
            self.dp = Dataplane.open(config_from_dict(d), self.object_path)
            self.rec = Reconciler(self.dp)
            with self.bl.inside(self.bl.lb_ns):
                self.dp.attach(["l0", "l1"])
            self.kernel_bytes_empty = memcg.kernel_bytes()
            t0 = time.perf_counter()
            self.cfg = config_from_dict(d)
            t1 = time.perf_counter()
            res = self.rec.apply(self.cfg)
            t2 = time.perf_counter()
        self.kernel_bytes = memcg.kernel_bytes()
        self.services = list(services)
        return SyncResult(t2 - t0, {"validate_s": t1 - t0, "apply_s": t2 - t1,
                                    "rings_written": res.rings_written})

    def _one(self, s: BService):
        from lb.config import config_from_dict

        # As the daemon's upsert_service API does: validate the one service.
        return config_from_dict({"interfaces": ["l0", "l1"], **self._encap(),
                                 "services": [self._service(s)]}, source="<bench>").services[0]

    def add(self, s: BService) -> float:
        t0 = time.perf_counter()
        self.rec.upsert_service(self.cfg, self._one(s))
        dt = time.perf_counter() - t0
        self.services.append(s)
        return dt

    def update(self, old: BService, new: BService) -> float:
        t0 = time.perf_counter()
        self.rec.upsert_service(self.cfg, self._one(new))
        return time.perf_counter() - t0

    def delete(self, s: BService) -> float:
        from ipaddress import IPv4Address

        t0 = time.perf_counter()
        self.rec.delete_service(self.cfg, (IPv4Address(s.vip), s.port, s.proto))
        dt = time.perf_counter() - t0
        self.services = [x for x in self.services if x.index != s.index]
        return dt

    def program_fd(self) -> int | None:
        return self.dp.prog.fd if self.dp else None

    def clear(self) -> None:
        from lb.dataplane import Dataplane

        if self.dp is not None:
            self.dp.close()
            self.dp = self.rec = self.cfg = None
        if self.bpffs:
            with self.bl.inside(self.bl.lb_ns):
                Dataplane.detach(Path(self.bpffs), purge=True)
            self.bpffs = None
        self.services = []

    def memory(self) -> dict:
        """memlock of every map (what map info reports), the kernel memory
        of the maps (memcg), and per service: what applying the services
        added to that kernel memory (hash elements, ...) plus the share of
        the preallocated arrays they use (backend records, Maglev slots)."""
        dp, rec = self.dp, self.rec
        out: dict = {"map_memlock_bytes": sum(m.memlock() for m in dp.maps.values()),
                     "kernel_bytes": self.kernel_bytes, "source": "Map.memlock() and memcg kmem"}
        n = len(rec.services)
        if not n:
            return out
        backends = sum(len(s.backends) for s in rec.services.values())
        slots = sum(s.ring_size for s in rec.services.values())
        added = (self.kernel_bytes or 0) - (self.kernel_bytes_empty or 0)
        used = added + backends * dp.maps["backends"].value_size + slots * 4
        out.update({"services": n, "backends": backends, "maglev_slots_used": slots,
                    "kernel_bytes_added_by_apply": added,
                    "bytes_per_service": used / n,
                    "maglev_imbalance": maglev_imbalance(dp, rec)})
        return out


def maglev_slots(capacity: int, endpoints: int) -> int:
    """`limits.maglev_slots` for `capacity` services of `endpoints`: room for
    every table plus the updates' new tables (written before the old ones
    are released), 10% and a few hundred spare tables."""
    from lb.maglev import table_size

    return int(capacity * table_size(max(1, endpoints)) * 1.1) + 256 * table_size(16)


def maglev_imbalance(dp, rec) -> dict:
    """max slots of a backend / mean slots per backend - 1, over services."""
    pool = dp.view("maglev_pool")
    worst, total = 0.0, 0.0
    for s in rec.services.values():
        if not s.ring_size:
            continue
        ring = pool[s.ring_offset:s.ring_offset + s.ring_size]
        counts = np.unique(ring, return_counts=True)[1]
        imb = counts.max() / (s.ring_size / len(counts)) - 1
        worst = max(worst, imb)
        total += imb
    return {"max": worst, "mean": total / max(1, len(rec.services))}


def dsr_supported() -> bool:
    """Whether this xdplb's config takes a service's `forwarding` (ipip, gue)."""
    from lb.config import Service

    return "forwarding" in Service.model_fields


def make_engine(name: str, bl: BenchLab) -> Engine:
    """An engine by name; `katran:PATH` is Katran's balancer built from its
    tree (bench/katran.py)."""
    if name.startswith("katran:"):
        from .katran import KatranEngine

        return KatranEngine(bl, Path(name.split(":", 1)[1]))
    if name in XDPLB_VARIANTS:
        return XdplbEngine(bl, forwarding=XDPLB_VARIANTS[name])
    if name in ("iptables-legacy", "iptables-nft"):
        return IptablesEngine(bl, name.split("-", 1)[1])
    if name == "nftables":
        return NftEngine(bl)
    if name in ForwarderEngine.PROGRAMS:
        return ForwarderEngine(bl, name)
    raise ValueError(f"unknown engine {name!r} (have: "
                     f"{', '.join(ENGINES + tuple(XDPLB_VARIANTS) + tuple(ForwarderEngine.PROGRAMS))}, katran:PATH)")
