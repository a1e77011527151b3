"""The scale-out lab: N xdplb nodes behind a BIRD 2 router doing ECMP.

    client (10.1.0.10 + 10.1.0.100..) --c0-- router --br0 10.0.0.0/24-- lb1..lbN (u0)
                                             router --br1 10.244.0.0/24-- lb1..lbN (d0), b1..bM

In a Lab(ipv6=True) br0 and br1 also carry IPv6 (fd00:10::/64 and
fd00:244::/64): each node then peers with the router over IPv6 too, for its
IPv6 VIPs (a BGP session carries its own family).

The router namespace runs BIRD 2 with one eBGP session per LB node (BFD on
them), installs the VIP as one multipath route (`merge paths`) and hashes
flows on their 4-tuple (fib_multipath_hash_policy=1). Each LB node runs
its own BIRD that the xdplb daemon drives (lb.announce). The LB nodes hang
off bridges in the router namespace, as off a switch: a node whose links go
down is noticed by BFD, not by a link event on the router. The backends
decapsulate DSR (ipip) themselves and answer through the router, never
through an LB. Nothing is pre-resolved: ARP happens as traffic needs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Iterator

from .announce import bgp_sessions, write_bird_files
from .config import config_from_dict
from .dataplane import Dataplane
from .demo import DaemonProcess
from .lab import REPO_ROOT, Lab, _forwarding_sysctls, _wait_ready

ROUTER_ASN, NODE_ASN = 65000, 65001
ROUTER_UPLINK_IP = "10.0.0.1"
ROUTER_BACKEND_IP = "10.244.0.254"
ROUTER_UPLINK_IP6 = "fd00:10::1"
ROUTER_BACKEND_IP6 = "fd00:244::fe"
CLIENT_GATEWAY = "10.1.0.1"
VIP = "10.96.0.20"
ECHO_PORT, HTTP_PORT = 7000, 8080
NAT_PORT = 7001                 # with_snat(): the echo servers through SNAT
HASH_SEED = 0x5CA1E0           # the same on every node: same flow, same backend
BFD_INTERVAL_MS = 100


@dataclass(frozen=True)
class Node:
    name: str          # lb1
    index: int
    ns: str
    uplink_ip: str     # u0, on br0: BGP and the VIP's traffic come in here
    backend_ip: str    # d0, on br1: the tunnels leave here (and their outer source)
    workdir: Path
    uplink_ip6: str | None = None      # u0's IPv6 address in a Lab(ipv6=True)

    @property
    def snat_ip(self) -> str:
        return f"10.244.0.{100 + self.index}"

    @property
    def bird_config(self) -> Path:
        return self.workdir / "bird.conf"

    @property
    def bird_socket(self) -> Path:
        return self.workdir / "bird.ctl"


@dataclass(frozen=True)
class BackendHost:
    name: str
    ns: str
    ip: str
    ip6: str | None = None


@dataclass
class ScaleoutTopology:
    router_ns: str
    client_ns: str
    client_ips: list[str]
    nodes: list[Node]
    backends: list[BackendHost]
    workdir: Path
    birds: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def router_socket(self) -> Path:
        return self.workdir / "router-bird.ctl"


def _bridge(lab: Lab, ns: str, name: str, cidr: str) -> None:
    lab.ipr(ns).link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
    lab.link_up(ns, name)
    lab.addr(ns, name, cidr)


def _port(lab: Lab, ns: str, ifname: str, bridge: str) -> None:
    lab.ipr(ns).link("set", index=lab.ifindex(ns, ifname), master=lab.ifindex(ns, bridge))


def build_scaleout_lab(lab: Lab, workdir: Path, *, nodes: int = 3, backends: int = 3,
                       sources: int = 100) -> ScaleoutTopology:
    if not 1 <= nodes <= 50 or not 1 <= backends <= 50 or not 1 <= sources <= 150:
        raise ValueError("nodes and backends 1..50, sources 1..150")
    router, client = lab.netns("router"), lab.netns("client")
    _forwarding_sysctls(lab, router)
    # ECMP on the 4-tuple: flows of one client spread over the nodes.
    lab.sysctl(router, "net.ipv4.fib_multipath_hash_policy", 1)
    _bridge(lab, router, "br0", f"{ROUTER_UPLINK_IP}/24")
    _bridge(lab, router, "br1", f"{ROUTER_BACKEND_IP}/24")
    if lab.ipv6:
        lab.addr(router, "br0", f"{ROUTER_UPLINK_IP6}/64")
        lab.addr(router, "br1", f"{ROUTER_BACKEND_IP6}/64")

    lab.veth(client, "c0", router, "c0r")
    lab.addr(router, "c0r", f"{CLIENT_GATEWAY}/24")
    client_ips = [f"10.1.0.{100 + i}" for i in range(sources)]
    for ip in ["10.1.0.10", *client_ips]:
        lab.addr(client, "c0", f"{ip}/24")
    lab.route(client, "default", gateway=CLIENT_GATEWAY)
    # Local sockets' CHECKSUM_PARTIAL would reach the backends inside a
    # tunnel, where nothing completes it.
    lab.offload(client, "c0", tx_checksum=False)

    topo_nodes = []
    for n in range(1, nodes + 1):
        ns = lab.netns(f"lb{n}")
        _forwarding_sysctls(lab, ns)      # bpf_fib_lookup() needs ip_forward
        if lab.ipv6:
            # A node's links go down and up in the tests: Linux drops IPv6
            # addresses on link down unless told to keep them (as a node's
            # network configuration would put them back).
            for scope in ("all", "default"):
                lab.sysctl(ns, f"net.ipv6.conf.{scope}.keep_addr_on_down", 1)
        node = Node(f"lb{n}", n, ns, f"10.0.0.{10 + n}", f"10.244.0.{n}", workdir / f"lb{n}",
                    f"fd00:10::{10 + n:x}" if lab.ipv6 else None)
        node.workdir.mkdir(parents=True, exist_ok=True)
        for mine, theirs, bridge, ip in (("u0", f"u{n}", "br0", node.uplink_ip),
                                         ("d0", f"d{n}", "br1", node.backend_ip)):
            lab.veth(ns, mine, router, theirs)
            lab.addr(ns, mine, f"{ip}/24")
            if lab.ipv6:
                lab.addr(ns, mine, f"{node.uplink_ip6}/64" if mine == "u0" else f"fd00:244::{n:x}/64")
            _port(lab, router, theirs, bridge)
            # The node's XDP redirects/transmits into this veth: its peer
            # needs NAPI (GRO) to take the frames.
            lab.offload(router, theirs, gro=True)
        # No flooding of unknown unicast to the nodes: once a dead node's
        # MAC is forgotten, the others would get its flows as copies (their
        # XDP passes frames for another MAC, bpf/xdp/dmac.h, but the copies
        # would still load them), as on a switch that learned every port.
        lab.run(router, ["bridge", "link", "set", "dev", f"u{n}", "flood", "off"])
        # NAT services: the node's SNAT address, on the backends' network,
        # and a way back to the clients for the translated replies.
        lab.addr(ns, "d0", f"{node.snat_ip}/24")
        lab.route(ns, "default", gateway=ROUTER_UPLINK_IP)
        topo_nodes.append(node)

    hosts = []
    for i in range(1, backends + 1):
        ns = lab.netns(f"b{i}")
        b = BackendHost(f"b{i}", ns, f"10.244.0.{10 + i}", f"fd00:244::{10 + i:x}" if lab.ipv6 else None)
        lab.veth(ns, "eth0", router, f"e{i}")
        lab.addr(ns, "eth0", f"{b.ip}/24")
        if b.ip6:
            lab.addr(ns, "eth0", f"{b.ip6}/64")
        _port(lab, router, f"e{i}", "br1")
        # Answers go to the router, never through an LB node (DSR).
        lab.route(ns, "default", gateway=ROUTER_BACKEND_IP)
        lab.offload(ns, "eth0", tx_checksum=False, gro=True)
        hosts.append(b)
    return ScaleoutTopology(router, client, client_ips, topo_nodes, hosts, workdir)


# -- processes ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_backends(lab: Lab, topo: ScaleoutTopology, pins: Path) -> None:
    """HTTP and a TCP echo in every backend, and the ipip decapsulation
    for the VIP (`xdplb backend attach`, pins under `pins`)."""
    procs = []
    for b in topo.backends:
        lab.run(b.ns, [sys.executable, "-m", "lb.cli", "backend", "attach", "eth0", f"--vip={VIP}",
                       "--bpffs", str(pins / b.name)], timeout=60, cwd=REPO_ROOT, env=_env())
        procs.append(lab.popen(b.ns, [sys.executable, "-m", "lb.backend_server", "--name", b.name,
                                      "--port", str(HTTP_PORT), "--echo-port", str(ECHO_PORT)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, env=_env(), cwd=REPO_ROOT))
    _wait_ready(procs, 20)


def detach_backends(lab: Lab, topo: ScaleoutTopology, pins: Path) -> None:
    for b in topo.backends:
        lab.run(b.ns, [sys.executable, "-m", "lb.cli", "backend", "detach", "eth0", "--purge",
                       "--bpffs", str(pins / b.name)], timeout=60, cwd=REPO_ROOT, env=_env(),
                check=False)


def router_bird_config(topo: ScaleoutTopology) -> str:
    """The upstream router: learns the VIPs from every node, exports them
    to its kernel as one multipath route, announces nothing."""
    peers = "".join(f"protocol bgp {n.name} from lbs {{ neighbor {n.uplink_ip} as {NODE_ASN}; }}\n"
                    for n in topo.nodes)
    peers += "".join(f"protocol bgp {n.name}_6 from lbs6 {{ neighbor {n.uplink_ip6} as {NODE_ASN}; }}\n"
                     for n in topo.nodes if n.uplink_ip6)
    return f"""log stderr all;
router id {ROUTER_UPLINK_IP};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths on; }}
protocol bfd {{ interface "br0" {{ min rx interval {BFD_INTERVAL_MS} ms;
  min tx interval {BFD_INTERVAL_MS} ms; multiplier 3; }}; }}
template bgp lbs {{
  local as {ROUTER_ASN};
  hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5;
  bfd on;
  ipv4 {{ import all; export none; }};
}}
template bgp lbs6 from lbs {{
  ipv6 {{ import all; export none; next hop prefer global; }};
}}
{peers}"""


def _bird(lab: Lab, ns: str, config: Path, sock: Path, log: Path) -> subprocess.Popen:
    return lab.popen(ns, ["bird", "-f", "-c", str(config), "-s", str(sock)],
                     stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def start_router(lab: Lab, topo: ScaleoutTopology) -> None:
    conf = topo.workdir / "router-bird.conf"
    conf.write_text(router_bird_config(topo))
    topo.birds["router"] = _bird(lab, topo.router_ns, conf, topo.router_socket,
                                 topo.workdir / "router-bird.log")


def bgp_section(node: Node) -> dict:
    peers = [{"address": ROUTER_UPLINK_IP, "asn": ROUTER_ASN}]
    if node.uplink_ip6:
        peers.append({"address": ROUTER_UPLINK_IP6, "asn": ROUTER_ASN})
    return {"local_asn": NODE_ASN, "router_id": node.uplink_ip, "peers": peers,
            "bird_config": str(node.bird_config), "bird_socket": str(node.bird_socket),
            "bfd": True, "bfd_interval_ms": BFD_INTERVAL_MS, "hold_time": 3}


def start_node_bird(lab: Lab, node: Node) -> None:
    """BIRD on a node, from the files xdplb writes (before the daemon runs:
    it announces nothing until the daemon says so)."""
    write_bird_files(config_from_dict({"interfaces": ["u0"], "bgp": bgp_section(node)}).bgp)
    return _bird(lab, node.ns, node.bird_config, node.bird_socket, node.workdir / "bird.log")


def node_config(topo: ScaleoutTopology, node: Node, *, bpffs: str, socket: str,
                backends: list[BackendHost] | None = None) -> dict:
    """The config every node runs: the same services, seed and backends;
    only the node's own addresses and paths differ."""
    hosts = topo.backends if backends is None else backends
    return {
        "interfaces": ["u0", "d0"], "bpffs": bpffs, "api_socket": socket,
        "metrics_address": False, "encap_source": node.backend_ip, "hash_seed": HASH_SEED,
        "services": [
            {"name": "echo", "vip": VIP, "port": ECHO_PORT, "protocol": "tcp", "forwarding": "ipip",
             "backends": [f"{b.ip}:{ECHO_PORT}" for b in hosts]},
            {"name": "web", "vip": VIP, "port": HTTP_PORT, "protocol": "tcp", "forwarding": "ipip",
             "backends": [f"{b.ip}:{HTTP_PORT}" for b in hosts]},
        ],
        "bgp": bgp_section(node),
    }


def with_snat(cfg: dict, node: Node) -> dict:
    """`cfg` plus SNAT mode with the node's own address and a NAT service
    on NAT_PORT to the same echo servers."""
    echo = next(s for s in cfg["services"] if s["name"] == "echo")
    return {**cfg, "snat_address": node.snat_ip, "services": cfg["services"] + [
        {**echo, "name": "echo-nat", "port": NAT_PORT, "forwarding": "nat"}]}


# -- what the router sees ------------------------------------------------------------


def multipath_nexthops(lab: Lab, topo: ScaleoutTopology, vip: str = VIP) -> list[str]:
    """The gateways of the router's kernel route to `vip` (sorted)."""
    out = []
    ip = ip_address(vip)
    # A dump, filtered here: get_routes(dst=...) would be a FIB lookup,
    # which answers with the one path it picked.
    for r in lab.ipr(topo.router_ns).get_routes(family=10 if ip.version == 6 else 2, table=254):
        if r.get("dst_len") != ip.max_prefixlen or ip_address(r.get_attr("RTA_DST") or "::") != ip:
            continue
        mp = r.get_attr("RTA_MULTIPATH")
        if mp:
            out += [h.get_attr("RTA_GATEWAY") for h in mp]
        elif r.get_attr("RTA_GATEWAY"):
            out.append(r.get_attr("RTA_GATEWAY"))
    return sorted(out)


def wait_nexthops(lab: Lab, topo: ScaleoutTopology, want: list[Node], timeout: float = 30.0,
                  vip: str = VIP) -> float:
    """Wait until the router's route to `vip` goes to exactly `want` (by
    their uplink address of its family); return how long it took."""
    v6 = ip_address(vip).version == 6
    goal, start = sorted(n.uplink_ip6 if v6 else n.uplink_ip for n in want), time.monotonic()
    while (hops := multipath_nexthops(lab, topo, vip)) != goal:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"router's next hops for {vip}: {hops}, want {goal}; "
                               f"sessions {bgp_sessions(topo.router_socket)}")
        time.sleep(0.01)
    return time.monotonic() - start


def set_node_links(lab: Lab, node: Node, up: bool) -> None:
    """The node's two links, both at once (a node that dies)."""
    for ifname in ("u0", "d0"):
        lab.ipr(node.ns).link("set", index=lab.ifindex(node.ns, ifname), state="up" if up else "down")


# -- the whole cluster ---------------------------------------------------------------


@contextlib.contextmanager
def running_cluster(lab: Lab, topo: ScaleoutTopology, pins: Path,
                    config_backends: int | None = None) -> Iterator[dict[str, DaemonProcess]]:
    """Backends (decapsulating), the router's BIRD, every node's BIRD and
    `xdplb run` (its config with the first `config_backends` backends),
    until the router has every node in its route. Yields the daemons by
    node name (a test may replace one); stops and detaches them all."""
    daemons: dict[str, DaemonProcess] = {}
    hosts = topo.backends[:config_backends]
    try:
        start_backends(lab, topo, pins)
        start_router(lab, topo)
        for node in topo.nodes:
            start_node_bird(lab, node)
            cfg = node_config(topo, node, bpffs=f"{pins}-{node.name}",
                              socket=f"/run/xdplb/{pins.name}-{node.name}.sock", backends=hosts)
            daemons[node.name] = DaemonProcess(cfg, node.workdir, node.ns).start()
        wait_nexthops(lab, topo, topo.nodes)
        yield daemons
    finally:
        for d in daemons.values():
            d.kill(signal.SIGKILL)
            Dataplane.detach(Path(d.config["bpffs"]), purge=True)
        detach_backends(lab, topo, pins)
        with contextlib.suppress(FileNotFoundError):
            pins.rmdir()            # the backends' pin directories were in it
