"""The real kube-proxy and xdplb in Kubernetes mode as bench engines, each
following one real API server (bench/k8s_cluster.py) from the bench's lb
namespace.

- `kube-proxy-iptables`: kube-proxy (`make k8s-bins`) in iptables mode with
  the nf_tables backend of iptables (what kube-proxy's image picks on a host
  without legacy rules); `kube-proxy-iptables-legacy`: the legacy backend.
  Which one kube-proxy runs is decided by the `iptables*` commands it finds
  first on its PATH: a directory of links to one backend's commands.
- `kube-proxy-nftables`: its nftables mode (knftables runs `nft`).
- `xdplb-k8s`: `xdplb run` with a `kubernetes:` block, as a real daemon.

Each engine reaches the API server through a veth from its lb namespace into
the cluster's namespace (`ApiLink`). What every engine reports the same way:
- `full_sync`: process start -> every Service in the API forwarded (kube-proxy:
  its first sync done, `kubeproxy_sync_proxy_rules_last_timestamp_seconds`;
  xdplb: READY, which it reaches once the first lists are in its maps);
- `programmed(mark, writes)`: per change, API write -> the engine's write
  to the kernel returned (kube-proxy: its "Network programming" log line,
  now - the slice's `endpoints.kubernetes.io/last-change-trigger-time`,
  which the bench sets to the write's time; xdplb: its applied batch holding
  the write's resourceVersion);
- `served()`: what the kernel holds (iptables-save, nft list, xdplb's
  pinned maps): (vip, port, proto) -> {(endpoint, port)}.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lb.lab import Lab

from .engines import BService, Engine, SyncResult, _PassOnL0, maglev_slots
from .k8s_cluster import BIN_DIR
from .lab import CLUSTER_CIDR, BenchLab
from .memcg import rss_mb
from .xdplb_maps import applied_at, map_state

API_ADDRESS = "10.254.0.1"      # the API server's address, on its namespace's loopback
NODE = "node-a"
NODE_IP = "10.1.0.1"            # the lb's l0 address: kube-proxy's node IP
METRICS = ("127.0.0.1", 10249)  # kube-proxy's metrics, inside the lb namespace
NAMESPACE = "bench"
# kube-proxy's iptables mode with the nf_tables backend took 5 m 45 s for its
# first sync of 10,000 Services here (iptables-restore --noflush), and it grows
# faster than linearly.
FIRST_SYNC_TIMEOUT_S = 3 * 3600
# engine -> (kube-proxy's --proxy-mode, iptables backend or None)
KUBE_PROXY = {"kube-proxy-iptables": ("iptables", "nft"), "kube-proxy-iptables-legacy": ("iptables", "legacy"),
              "kube-proxy-nftables": ("nftables", None)}
IPTABLES_COMMANDS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
                     "ip6tables-restore")
_NETPROG = re.compile(r'"Network programming".*?endpoint="([^"]+)" elapsed=([0-9.e+-]+)')
_SYNCED = re.compile(r'"SyncProxyRules complete".*? elapsed="([^"]+)"')
_APPLIED = re.compile(r"applied config .* seconds=([0-9.]+)")


@dataclass
class ApiLink:
    """The cluster's namespace (in its own lab, outliving the engines') and
    how an engine's lb namespace reaches it."""
    lab: Lab
    ns: str
    kubeconfig: Path
    workdir: Path
    _links: itertools.count = field(default_factory=lambda: itertools.count(1))

    def connect(self, bl: BenchLab) -> None:
        """A veth k0 (lb) <-> a<k> (cluster), made by the engine's lab: it
        goes with the lb namespace when that lab closes."""
        k = next(self._links)
        if k > 250:
            raise RuntimeError("too many engine labs for one cluster")
        bl.lab.veth(bl.lb_ns, "k0", self.ns, f"a{k}")
        bl.lab.addr(self.ns, f"a{k}", f"10.253.{k}.1/30")
        bl.lab.addr(bl.lb_ns, "k0", f"10.253.{k}.2/30")
        bl.lab.route(bl.lb_ns, f"{API_ADDRESS}/32", gateway=f"10.253.{k}.1")


def served_key(s: BService) -> tuple[str, int, str]:
    return s.vip, s.port, s.proto


class KubeProxyEngine(_PassOnL0):
    """The real kube-proxy in the lb namespace (an XDP_PASS program on l0,
    as for the rebuilt layouts: a veth receives XDP_TX'd frames only then)."""

    def __init__(self, bl: BenchLab, link: ApiLink, name: str) -> None:
        super().__init__(bl)
        if name not in KUBE_PROXY:
            raise ValueError(f"unknown kube-proxy engine {name!r} (have: {', '.join(KUBE_PROXY)})")
        self.name, self.link = name, link
        self.mode, self.backend = KUBE_PROXY[name]
        self.proc: subprocess.Popen | None = None
        self.log = link.workdir / f"{name}-{os.getpid()}-{id(self)}.log"

    @property
    def label(self) -> str:
        return f"kube-proxy {self.mode}" + (f" ({self.backend} backend)" if self.backend else "")

    def attach(self) -> None:
        super().attach()
        self.link.connect(self.bl)

    def argv(self) -> list[str]:
        return [str(BIN_DIR / "kube-proxy"), "--kubeconfig", str(self.link.kubeconfig),
                "--proxy-mode", self.mode, "--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR,
                # In a network namespace: leave the global conntrack table
                # (nf_conntrack_max is not the namespace's to set) and its
                # timeouts (the bench pins them) alone.
                "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--metrics-bind-address", f"{METRICS[0]}:{METRICS[1]}",
                "--healthz-bind-address", "127.0.0.1:10256",
                # proxier.go at V(4) logs each change's programming latency.
                "--v=2", "--vmodule=proxier=4"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.backend:
            shim = self.link.workdir / f"iptables-{self.backend}"
            shim.mkdir(exist_ok=True)
            for cmd in IPTABLES_COMMANDS:
                link = shim / cmd
                if not link.is_symlink():
                    base, _, tail = cmd.partition("-")
                    link.symlink_to(f"/usr/sbin/{base}-{self.backend}" + (f"-{tail}" if tail else ""))
            env["PATH"] = f"{shim}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def full_sync(self, services: list[BService]) -> SyncResult:
        """Start kube-proxy; done when its first sync (every Service in the
        API) is in the kernel."""
        self.services = list(services)
        t0 = time.time()
        with open(self.log, "ab") as log:
            self.proc = self.bl.lab.popen(self.bl.lb_ns, self.argv(), stdout=log,
                                          stderr=subprocess.STDOUT, env=self._env())
        deadline = time.monotonic() + FIRST_SYNC_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kube-proxy exited ({self.proc.returncode}): {self.log_tail()}")
            m = self.metrics()
            done = m.get('kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}', 0.0)
            if done > 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-proxy: no first sync in {FIRST_SYNC_TIMEOUT_S} s: {self.log_tail()}")
            # The metric holds the sync's own end time: polling only has to
            # notice it (and each scrape costs kube-proxy, and logs, a little).
            time.sleep(0.5)
        first = m.get('kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family="IPv4"}')
        return SyncResult(done - t0, {"first_sync_s": first, "log": str(self.log)})

    def metrics(self) -> dict[str, float]:
        """kube-proxy's /metrics, `name{labels}` -> value ({} until it serves)."""
        try:
            with self.bl.inside(self.bl.lb_ns):
                conn = http.client.HTTPConnection(*METRICS, timeout=5)
                conn.connect()
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
            finally:
                conn.close()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    # -- changes --------------------------------------------------------------

    def mark(self) -> int:
        return self.log.stat().st_size

    def programmed(self, mark: int, writes: list, timeout: float = 120.0) -> list[float]:
        """Seconds from each write to the end of the sync that put it in the
        kernel, as kube-proxy logs them; waits until every write is there or
        nothing new came for `timeout` s."""
        want = len(writes)
        got: list[float] = []
        last, t_last = -1, time.monotonic()
        while time.monotonic() - t_last < timeout:
            got = [float(e) for name, e in _NETPROG.findall(self._log_since(mark))
                   if name.startswith(NAMESPACE + "/")]
            if len(got) >= want:
                break
            if len(got) != last:
                last, t_last = len(got), time.monotonic()
            time.sleep(0.2)
        return got

    def kernel_writes(self, mark: int) -> dict:
        """The syncs since `mark`: how many, and their durations (s)."""
        took = [_go_duration(d) for d in _SYNCED.findall(self._log_since(mark))]
        return {"count": len(took), "seconds_median": sorted(took)[len(took) // 2] if took else None,
                "seconds_max": max(took, default=None)}

    def _log_since(self, mark: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    # -- what the kernel holds ------------------------------------------------

    def served(self) -> dict[tuple[str, int, str], set[tuple[str, int]]]:
        if self.mode == "nftables":
            text = self._run(["nft", "list", "table", "ip", "kube-proxy"])
            return nft_served(text)
        return iptables_served(self._run([f"iptables-{self.backend}-save", "-t", "nat"]))

    def _run(self, argv: list[str]) -> str:
        r = self.bl.lab.run(self.bl.lb_ns, argv, timeout=600)
        return r.stdout

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc and self.proc.poll() is None else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def clear(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.services = []


class XdplbK8sEngine(Engine):
    """`xdplb run` in Kubernetes mode in the lb namespace, gateway NAT, the
    flood guard off (as the sweep's `xdplb`: every new flow writes its state)."""

    name = "xdplb-k8s"
    kernel_path = False

    def __init__(self, bl: BenchLab, link: ApiLink, capacity: int, endpoints: int = 3) -> None:
        super().__init__(bl)
        self.link, self.capacity, self.endpoints = link, capacity, endpoints
        self.daemon = None
        self.bpffs = f"/sys/fs/bpf/xdplb-bench-{os.getpid()}-{id(self)}"

    @property
    def label(self) -> str:
        return "xdplb (Kubernetes mode)"

    def attach(self) -> None:
        self.link.connect(self.bl)

    def config(self) -> dict:
        return {"interfaces": ["l0", "l1"], "bpffs": self.bpffs,
                "api_socket": f"/run/xdplb/bench-k8s-{os.getpid()}-{id(self)}.sock",
                "metrics_address": False,
                "limits": {"maglev_slots": maglev_slots(self.capacity, self.endpoints)},
                "flood_guard": {"new_flows_per_second": 0},
                "kubernetes": {"kubeconfig": str(self.link.kubeconfig), "node_name": NODE}}

    def full_sync(self, services: list[BService]) -> SyncResult:
        """Start the daemon; done at READY (its first lists are in the maps
        and the program is attached)."""
        from lb.demo import DaemonProcess

        self.services = list(services)
        workdir = self.link.workdir / f"xdplb-{os.getpid()}-{id(self)}"
        workdir.mkdir(exist_ok=True)
        t0 = time.monotonic()
        self.daemon = DaemonProcess(self.config(), workdir, self.bl.lb_ns).start(timeout=1800)
        while not self.daemon.call("kubernetes", brief=True)["synced"]:
            time.sleep(0.02)
        ready = time.monotonic() - t0
        applied = _APPLIED.search(self.daemon.log.read_text(errors="replace"))
        return SyncResult(ready, {"first_sync_s": float(applied[1]) if applied else None,
                                  "log": str(self.daemon.log)})

    def mark(self) -> int:
        """Where the changes start in the applied batches (and the daemon's
        own receive -> map latencies restart)."""
        return self.daemon.call("kubernetes", since=10**9, reset_latency=True)["applied_total"]

    def programmed(self, mark: int, writes: list, timeout: float = 120.0) -> list[float]:
        """Seconds from each write (CLOCK_MONOTONIC) to the daemon's batch
        holding its resourceVersion written to the maps."""
        last = max(w.rv for w in writes)
        deadline = time.monotonic() + timeout
        while (self.daemon.call("kubernetes", brief=True)["applied_rv"].get("EndpointSlice", 0) < last
               and time.monotonic() < deadline):
            time.sleep(0.05)
        applied = self.daemon.call("kubernetes", since=mark)["applied"]
        out = []
        for w in writes:
            t = applied_at(applied, "EndpointSlice", w.rv)
            if t is not None:
                out.append((t - w.mono_ns) / 1e9)
        return out

    def kernel_writes(self, mark: int) -> dict:
        """The batches applied since `mark` (each one pass of map writes), and
        the daemon's share of the latency: event received -> maps written."""
        st = self.daemon.call("kubernetes", since=10**9)
        return {"count": st["applied_total"] - mark, "receive_to_map_ms": st["receive_to_map_ms"]}

    def served(self) -> dict[tuple[str, int, str], set[tuple[str, int]]]:
        return {k: {(a, p) for a, p, _ in v} for k, v in map_state(self.bpffs).items()}

    def rss_mb(self) -> float | None:
        d = self.daemon
        return rss_mb(d.proc.pid) if d and d.proc and d.proc.poll() is None else None

    def clear(self) -> None:
        from lb.dataplane import Dataplane

        if self.daemon is not None:
            self.daemon.kill(signal.SIGTERM)
            self.daemon = None
        with self.bl.inside(self.bl.lb_ns):
            Dataplane.detach(Path(self.bpffs), purge=True)
        self.services = []


def _go_duration(text: str) -> float:
    """Go's time.Duration text (1.5s, 362.1ms, 850µs, 1m2.5s) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    return sum(float(v) * units[u] for v, u in re.findall(r"([0-9.]+)(h|ms|m|s|us|µs|ns)", text))


def make_real_engine(name: str, bl: BenchLab, link: ApiLink, capacity: int) -> Engine:
    if name == XdplbK8sEngine.name:
        return XdplbK8sEngine(bl, link, capacity)
    return KubeProxyEngine(bl, link, name)


# --------------------------------------------------------------------------
# reading the rules back


_SVC_RULE = re.compile(r"^-A KUBE-SERVICES -d (\S+)/32 -p (\w+) .*--dport (\d+) -j (KUBE-SVC-\w+)")
_SVC_JUMP = re.compile(r"^-A (KUBE-SVC-\w+) .*-j (KUBE-SEP-\w+)")
_SEP_DNAT = re.compile(r"^-A (KUBE-SEP-\w+) .*--to-destination ([\d.]+):(\d+)")


def iptables_served(saved: str) -> dict[tuple[str, int, str], set[tuple[str, int]]]:
    """(vip, port, proto) -> endpoints, from `iptables-save -t nat` of
    kube-proxy's rules (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP DNAT)."""
    services, seps, dnat = {}, {}, {}
    for line in saved.splitlines():
        if m := _SVC_RULE.match(line):
            services[m[4]] = (m[1], int(m[3]), m[2])
        elif m := _SVC_JUMP.match(line):
            seps.setdefault(m[1], []).append(m[2])
        elif m := _SEP_DNAT.match(line):
            dnat[m[1]] = (m[2], int(m[3]))
    return {key: {dnat[s] for s in seps.get(chain, []) if s in dnat} for chain, key in services.items()}


_ELEMENT = re.compile(r"([\d.]+) \. (tcp|udp|sctp) \. (\d+) : goto ([^\s,}]+)")
_CHAIN = re.compile(r"^\tchain (\S+) \{$(.*?)^\t\}$", re.M | re.S)
_DNAT_MAP = re.compile(r"dnat ip to numgen random mod \d+ map \{([^}]*)\}")
_MAP_ARM = re.compile(r"\d+ : ([\d.]+) \. (\d+)")


def nft_served(listing: str) -> dict[tuple[str, int, str], set[tuple[str, int]]]:
    """(vip, port, proto) -> endpoints, from `nft list table ip kube-proxy`:
    the service-ips verdict map, then each service chain's `numgen random
    mod N map` DNAT (kube-proxy's form without session affinity)."""
    chains = {m[1]: m[2] for m in _CHAIN.finditer(listing)}
    out = {}
    start = listing.find("map service-ips {")
    body = listing[start:listing.find("\n\t}", start)] if start >= 0 else ""
    for vip, proto, port, chain in _ELEMENT.findall(body):
        eps: set[tuple[str, int]] = set()
        for arms in _DNAT_MAP.findall(chains.get(chain, "")):
            eps |= {(a, int(p)) for a, p in _MAP_ARM.findall(arms)}
        out[(vip, int(port), proto)] = eps
    return out
