"""Network-namespace lab: a client, the load balancer and N backends on veths.

Everything is built with pyroute2 (netlink, ethtool ioctls, setns) so the lab
needs no `ip` binary and never remounts /sys (which `ip netns exec` does and
which would hide /sys/fs/bpf from processes started in the lab).

    with Lab() as lab:
        topo = build_lb_lab(lab, n_backends=3)
        start_backends(lab, topo)
        lab.run(topo.lb_ns, ["curl", "-s", "http://10.244.1.2:8080/"], timeout=5)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.rtnl.ndmsg import states as NUD_STATES

IFA_F_NODAD = 0x02  # <linux/if_addr.h>: no duplicate address detection

NETNS_DIR = Path("/var/run/netns")
DEFAULT_PREFIX = "xl"
REPO_ROOT = Path(__file__).resolve().parent.parent

_lab_counter = itertools.count(1)


# --------------------------------------------------------------------------
# namespace primitives


def _ns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _kill_ns_processes(ns_name: str) -> None:
    """SIGKILL every process whose netns is `ns_name`: a stray process would
    otherwise keep the namespace (and its veths) alive after the unmount."""
    ino = _ns_inode(_ns_path(ns_name))
    if ino is None:
        return
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        if _ns_inode(str(pid_dir / "ns" / "net")) == ino:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


def _exit_on_sigterm() -> None:
    """A SIGTERM (`kill`, `timeout`) acts as Ctrl-C does (KeyboardInterrupt:
    pytest ends the session with its teardowns, `finally` blocks and atexit
    close the labs); the default action would leave their namespaces and
    daemons behind. Only where nothing else handles it, and only from the
    main thread (where signals are set)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    owner = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # A forked child (a setns helper) inherits the handler: it must
            # die as before, not unwind its copy of the parent's stack and
            # close the parent's labs from its atexit.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def _remove_ns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


@contextlib.contextmanager
def inside_ns(ns: str) -> Iterator[None]:
    """Move the *current thread* into namespace `ns`; always move it back.

    Sockets, BPF links and ifindex lookups made in the body belong to `ns`.
    setns(CLONE_NEWNET) is per thread, so other threads are unaffected."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(_ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            netns.setns(target, flags=0)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # If this fails the thread is stranded in a lab namespace: let
            # that error propagate rather than carry on in the wrong netns.
            netns.setns(saved, flags=0)
    finally:
        os.close(saved)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces `<prefix><pid>-<n>-*` whose creating pid is dead.

    Returns the names removed. Labs of live processes (including our own) are
    left alone, so this is safe to call while other labs are running."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-\d+-")
    removed: list[str] = []
    for name in sorted(netns.listnetns()):
        m = pattern.match(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        _kill_ns_processes(name)
        _remove_ns(name)
        removed.append(name)
    return removed


# --------------------------------------------------------------------------
# the lab


class Lab:
    """Creates namespaces/veths/processes and tears all of them down on close().

    Namespace names are `<prefix><pid>-<n>-<name>`: unique per process and per
    lab, so concurrent labs never clash and cleanup_stale() can tell dead labs
    from live ones by the pid."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, ipv6: bool = False) -> None:
        self.prefix = f"{prefix}{os.getpid()}-{next(_lab_counter)}-"
        self.ipv6 = ipv6
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._ipr: dict[str, IPRoute] = {}
        self._lock = threading.RLock()
        self._closed = False
        atexit.register(self.close)
        _exit_on_sigterm()

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill processes, close netlink sockets, delete namespaces.

        Idempotent and resumable: items are popped as they are handled, so a
        second call (e.g. from atexit after a Ctrl-C inside the first one)
        finishes whatever is left. A failing step never skips the others."""
        with self._lock:
            self._closed = True
            while self.processes:
                _stop_process(self.processes.pop())
            while self._ipr:
                with contextlib.suppress(Exception):
                    self._ipr.popitem()[1].close()
            while self.namespaces:
                name = self.namespaces.pop()
                # Processes not started through popen() may still live there
                # and would keep the namespace and its veths alive.
                with contextlib.suppress(Exception):
                    _kill_ns_processes(name)
                with contextlib.suppress(Exception):
                    _remove_ns(name)
        atexit.unregister(self.close)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("lab is closed")

    # -- namespaces -------------------------------------------------------

    def netns(self, name: str) -> str:
        """Create namespace `name` (prefixed), bring lo up, return its full name."""
        with self._lock:
            self._check_open()
            full = self.prefix + name
            self.namespaces.append(full)  # tracked first: close() tolerates absence
            netns.create(full)
        ipr = self.ipr(full)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        if not self.ipv6:
            # Keep the lab IPv4-only: no DAD/MLD/router solicitations showing
            # up in XDP counters or packet captures.
            self.sysctl(full, "net.ipv6.conf.all.disable_ipv6", 1)
            self.sysctl(full, "net.ipv6.conf.default.disable_ipv6", 1)
        return full

    def ns_fd(self, ns: str) -> int:
        """An O_RDONLY fd on the namespace; the caller closes it."""
        return os.open(_ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)

    def inside(self, ns: str) -> contextlib.AbstractContextManager[None]:
        """Move the *current thread* into `ns` for the body; see inside_ns()."""
        return inside_ns(ns)

    def ipr(self, ns: str) -> IPRoute:
        """A cached IPRoute bound to `ns` (a netlink socket keeps the netns of
        the thread that opened it, so opening it inside() is enough)."""
        with self._lock:
            self._check_open()
            if ns not in self._ipr:
                with self.inside(ns):
                    self._ipr[ns] = IPRoute()
            return self._ipr[ns]

    # -- links and addresses ---------------------------------------------

    def ifindex(self, ns: str, ifname: str) -> int:
        found = self.ipr(ns).link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no interface {ifname!r} in {ns}")
        return found[0]

    def mac(self, ns: str, ifname: str) -> str:
        link = self.ipr(ns).get_links(self.ifindex(ns, ifname))[0]
        return link.get_attr("IFLA_ADDRESS")

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """Create a veth pair with one end in each namespace, both up."""
        fd_b = self.ns_fd(ns_b)
        try:
            self.ipr(ns_a).link(
                "add",
                ifname=if_a,
                kind="veth",
                peer={"ifname": if_b, "net_ns_fd": fd_b},
            )
        finally:
            os.close(fd_b)
        self.link_up(ns_a, if_a)
        self.link_up(ns_b, if_b)

    def dummy(self, ns: str, ifname: str) -> None:
        self.ipr(ns).link("add", ifname=ifname, kind="dummy")
        self.link_up(ns, ifname)

    def link_up(self, ns: str, ifname: str) -> None:
        self.ipr(ns).link("set", index=self.ifindex(ns, ifname), state="up")

    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        """Add an address; an IPv6 one without duplicate address detection
        (nodad), so that it is usable at once."""
        ip, plen = cidr.split("/")
        extra = {"flags": IFA_F_NODAD} if ":" in ip else {}
        self.ipr(ns).addr(
            "add", index=self.ifindex(ns, ifname), address=ip, prefixlen=int(plen), **extra
        )

    def route(
        self,
        ns: str,
        dst_cidr: str,
        gateway: str | None = None,
        dev: str | None = None,
        *,
        prefsrc: str | None = None,
    ) -> None:
        """Add/replace a route; dst_cidr may be "default"."""
        if dst_cidr == "default":
            dst_cidr = "::/0" if gateway and ":" in gateway else "0.0.0.0/0"
        spec: dict[str, Any] = {"dst": dst_cidr}
        if gateway:
            spec["gateway"] = gateway
        if dev:
            spec["oif"] = self.ifindex(ns, dev)
        if prefsrc:
            spec["prefsrc"] = prefsrc
        self.ipr(ns).route("replace", **spec)

    def neigh(self, ns: str, ifname: str, ip: str, mac: str) -> None:
        """A permanent neighbour entry (never expires, never re-resolved)."""
        self.ipr(ns).neigh(
            "replace",
            dst=ip,
            lladdr=mac,
            ifindex=self.ifindex(ns, ifname),
            state=NUD_STATES["permanent"],
        )

    def neighbours(self, ns: str, ifname: str | None = None) -> dict[str, str]:
        """IPv4 neighbour table of `ns` as {ip: mac} (entries with a MAC only)."""
        kw: dict[str, Any] = {"family": socket.AF_INET}
        if ifname:
            kw["ifindex"] = self.ifindex(ns, ifname)
        out: dict[str, str] = {}
        for n in self.ipr(ns).get_neighbours(**kw):
            mac = n.get_attr("NDA_LLADDR")
            if mac:
                out[n.get_attr("NDA_DST")] = mac
        return out

    # -- sysctl and offloads ---------------------------------------------

    def sysctl(self, ns: str, key: str, value: int | str) -> None:
        """Write net.* sysctl `key` in `ns`. /proc/sys/net resolves against
        the netns of the thread doing the open, hence inside()."""
        path = "/proc/sys/" + key.replace(".", "/")
        with self.inside(ns):
            with open(path, "w") as f:
                f.write(f"{value}\n")

    def read_sysctl(self, ns: str, key: str) -> str:
        with self.inside(ns):
            return Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()

    def offload(
        self,
        ns: str,
        ifname: str,
        tx_checksum: bool | None = None,
        gro: bool | None = None,
    ) -> None:
        """Set offloads like `ethtool -K dev tx on|off gro on|off`.

        pyroute2's Ethtool.set_features (SIOCETHTOOL/ETHTOOL_SFEATURES) can
        set features, so no ethtool binary is needed. `tx` maps to every
        tx-checksum-* feature, as in ethtool; the kernel then drops TSO by
        itself (TSO needs checksum offload)."""
        wanted: dict[str, bool] = {}
        with self.inside(ns), Ethtool() as et:
            feats = et.get_features(ifname)
            if tx_checksum is not None:
                for name, f in feats.features.items():
                    if name.startswith("tx-checksum-") and f.available:
                        wanted[name] = tx_checksum
            if gro is not None:
                wanted["rx-gro"] = gro
            for name, value in wanted.items():
                feats.features[name].enable = value
            et.set_features(ifname, feats)
        actual = self.features(ns, ifname)
        wrong = {k: v for k, v in wanted.items() if actual.get(k) != v}
        if wrong:
            raise RuntimeError(f"{ns}/{ifname}: offloads not applied: {wrong}")

    def features(self, ns: str, ifname: str) -> dict[str, bool]:
        """Active ethtool features of an interface, by ethtool's names."""
        with self.inside(ns), Ethtool() as et:
            return {n: f.enable for n, f in et.get_features(ifname).features.items()}

    # -- processes --------------------------------------------------------

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start `argv` inside `ns`; it is killed (with its process group) on close().

        The child inherits the forking thread's netns, so spawning from inside()
        needs no preexec_fn. The mount namespace is untouched: /sys/fs/bpf is
        the host's (but /sys/class/net also shows the host's devices)."""
        kw.setdefault("start_new_session", True)  # so close() can killpg()
        with self._lock:
            self._check_open()
            with self.inside(ns):
                proc = subprocess.Popen(list(argv), **kw)
            self.processes.append(proc)
        return proc

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        timeout: float = 10.0,
        check: bool = True,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run `argv` inside `ns` to completion (text output captured)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        with self.inside(ns):
            return subprocess.run(list(argv), timeout=timeout, check=check, **kw)

    # -- ICMP -------------------------------------------------------------

    def ping(
        self, ns: str, dst: str, *, src: str | None = None, timeout: float = 1.0
    ) -> bool:
        """One ICMP echo from `ns` (optionally from source `src`); True on reply.

        Done with a raw socket rather than the ping binary, which the project's
        machines do not install (iputils-ping is not in the Makefile's list)."""
        with self.inside(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with sock:
            if src:
                sock.bind((src, 0))
            return _icmp_echo(sock, dst, timeout)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _icmp_echo(sock: socket.socket, dst: str, timeout: float) -> bool:
    ident, seq = os.getpid() & 0xFFFF, next(_lab_counter) & 0xFFFF
    payload = b"xdplb-lab-ping"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = _icmp_checksum(header + payload)
    sock.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload, (dst, 0))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (peer, _) = sock.recvfrom(2048)
        except socket.timeout:
            return False
        ihl = (data[0] & 0x0F) * 4
        typ, _code, _c, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        # A raw socket sees every ICMP packet in the ns: match ours only.
        if typ == 0 and peer == dst and (rid, rseq) == (ident, seq):
            return True
    return False


def _stop_process(proc: subprocess.Popen, grace: float = 1.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` s."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)  # in case it is not a group leader
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            with contextlib.suppress(Exception):
                stream.close()


# --------------------------------------------------------------------------
# the load-balancer topology


@dataclass(frozen=True)
class Iface:
    """One end of a veth: where it lives and how XDP/BPF will see it."""

    ns: str
    name: str
    ifindex: int
    mac: str
    ip: str  # primary address, without prefix length


@dataclass(frozen=True)
class Backend:
    name: str  # "b1"
    index: int  # 1-based
    ns: str
    ip: str  # 10.244.<i>.2
    gateway: str  # 10.244.<i>.1, the LB side
    iface: Iface  # eth0 in the backend ns
    lb_iface: Iface  # l<i> in the lb ns
    ip6: str | None = None  # fd00:244:<i>::2 in a Lab(ipv6=True)
    gateway6: str | None = None  # fd00:244:<i>::1


@dataclass(frozen=True)
class LbTopology:
    client_ns: str
    lb_ns: str
    client: Iface  # c0, primary 10.1.0.10
    lb_client: Iface  # l0, primary 10.1.0.1
    backends: list[Backend]
    backend_port: int
    udp_port: int
    client_ip: str = "10.1.0.10"  # allowed source
    denied_client_ip: str = "192.0.2.10"  # denied source
    lb_client_ip: str = "10.1.0.1"
    lb_denied_ip: str = "192.0.2.1"
    vip_cidr: str = "10.96.0.0/12"
    snat_ip: str = "10.255.0.1"
    # A Lab(ipv6=True) also has a ULA /64 per link (see build_lb_lab).
    client_ip6: str = "fd00:1::10"
    denied_client_ip6: str = "fd00:2::10"
    lb_client_ip6: str = "fd00:1::1"
    vip6_cidr: str = "fd00:96::/64"
    snat_ip6: str = "fd00:255::1"
    namespaces: list[str] = field(default_factory=list)
    lab: Lab | None = field(default=None, repr=False, compare=False)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    @property
    def lb_ifaces(self) -> list[Iface]:
        """Where the LB's XDP program gets attached: l0, l1..lN."""
        return [self.lb_client] + [b.lb_iface for b in self.backends]


def _iface(lab: Lab, ns: str, name: str, ip: str) -> Iface:
    return Iface(ns=ns, name=name, ifindex=lab.ifindex(ns, name), mac=lab.mac(ns, name), ip=ip)


def _forwarding_sysctls(lab: Lab, ns: str) -> None:
    lab.sysctl(ns, "net.ipv4.ip_forward", 1)
    if lab.ipv6:
        lab.sysctl(ns, "net.ipv6.conf.all.forwarding", 1)
    # A new netns copies the host's IPv4 conf (often rp_filter=2): reset it
    # before the veths exist so they inherit 0 from "default".
    for conf in ("all", "default"):
        lab.sysctl(ns, f"net.ipv4.conf.{conf}.rp_filter", 0)


def _rp_filter_off(lab: Lab, ns: str, ifnames: Sequence[str]) -> None:
    # The effective value is max(all, iface), so every iface must be 0 too.
    for name in ifnames:
        lab.sysctl(ns, f"net.ipv4.conf.{name}.rp_filter", 0)


def build_lb_lab(
    lab: Lab, n_backends: int = 3, *, backend_port: int = 8080, udp_port: int = 9090
) -> LbTopology:
    """Build client <-> lb <-> b1..bN:

    client c0 10.1.0.10/24 + 192.0.2.10/24  <->  lb l0 10.1.0.1/24 + 192.0.2.1/24
    lb l<i> 10.244.<i>.1/24                 <->  b<i> eth0 10.244.<i>.2/24
    lb lo 10.255.0.1/32 (SNAT); client routes 10.96.0.0/12 via 10.1.0.1;
    backends default-route via the lb (replies of DNAT-only mode come back).

    In a Lab(ipv6=True) the same links also carry IPv6 (nodad, no static
    neighbours: the LB's neighbour keeper resolves them):
    client c0 fd00:1::10/64 + fd00:2::10/64 <-> lb l0 fd00:1::1/64 + fd00:2::1/64,
    routes fd00:96::/64 via it;
    lb l<i> fd00:244:<i>::1/64 <-> b<i> eth0 fd00:244:<i>::2/64 (default via
    the lb); lb lo fd00:255::1/128 (SNAT).
    """
    if not 1 <= n_backends <= 250:
        raise ValueError("n_backends must be 1..250")
    client_ns, lb_ns = lab.netns("client"), lab.netns("lb")
    _forwarding_sysctls(lab, lb_ns)

    lab.veth(client_ns, "c0", lb_ns, "l0")
    lab.addr(client_ns, "c0", "10.1.0.10/24")
    lab.addr(client_ns, "c0", "192.0.2.10/24")
    lab.addr(lb_ns, "l0", "10.1.0.1/24")
    lab.addr(lb_ns, "l0", "192.0.2.1/24")
    lab.route(client_ns, "10.96.0.0/12", gateway="10.1.0.1", prefsrc="10.1.0.10")
    lab.addr(lb_ns, "lo", "10.255.0.1/32")
    if lab.ipv6:
        lab.addr(client_ns, "c0", "fd00:1::10/64")
        lab.addr(client_ns, "c0", "fd00:2::10/64")
        lab.addr(lb_ns, "l0", "fd00:1::1/64")
        lab.addr(lb_ns, "l0", "fd00:2::1/64")
        # From the allowed address, as the IPv4 route (curl --interface picks another).
        lab.route(client_ns, "fd00:96::/64", gateway="fd00:1::1", prefsrc="fd00:1::10")
        lab.addr(lb_ns, "lo", "fd00:255::1/128")

    backends = [_build_backend(lab, lb_ns, i) for i in range(1, n_backends + 1)]
    _rp_filter_off(lab, lb_ns, ["lo", "l0"] + [b.lb_iface.name for b in backends])

    # The LB's XDP redirects l0 -> l<i> (into b<i>'s eth0) and l<i> -> l0
    # (into c0). A frame redirected into a veth is delivered to the *peer*'s
    # rx queue, which must have NAPI (GRO on or an XDP prog) or it is dropped.
    # So GRO matters on c0 and eth0; the lb side gets NAPI from its own XDP.
    # tx checksum off: local sockets would send CHECKSUM_PARTIAL packets that
    # an XDP rewrite cannot complete.
    lab.offload(client_ns, "c0", tx_checksum=False, gro=True)
    for b in backends:
        lab.offload(b.ns, "eth0", tx_checksum=False, gro=True)

    return LbTopology(
        client_ns=client_ns,
        lb_ns=lb_ns,
        client=_iface(lab, client_ns, "c0", "10.1.0.10"),
        lb_client=_iface(lab, lb_ns, "l0", "10.1.0.1"),
        backends=backends,
        backend_port=backend_port,
        udp_port=udp_port,
        namespaces=list(lab.namespaces),
        lab=lab,
    )


def _build_backend(lab: Lab, lb_ns: str, i: int) -> Backend:
    ns = lab.netns(f"b{i}")
    ip, gw, lb_if = f"10.244.{i}.2", f"10.244.{i}.1", f"l{i}"
    lab.veth(ns, "eth0", lb_ns, lb_if)
    lab.addr(ns, "eth0", f"{ip}/24")
    lab.addr(lb_ns, lb_if, f"{gw}/24")
    lab.route(ns, "default", gateway=gw)
    ip6 = gw6 = None
    if lab.ipv6:
        ip6, gw6 = f"fd00:244:{i:x}::2", f"fd00:244:{i:x}::1"
        lab.addr(ns, "eth0", f"{ip6}/64")
        lab.addr(lb_ns, lb_if, f"{gw6}/64")
        lab.route(ns, "default", gateway=gw6)
    return Backend(
        name=f"b{i}",
        index=i,
        ns=ns,
        ip=ip,
        gateway=gw,
        iface=_iface(lab, ns, "eth0", ip),
        lb_iface=_iface(lab, lb_ns, lb_if, gw),
        ip6=ip6,
        gateway6=gw6,
    )


# --------------------------------------------------------------------------
# backend servers


def backend_argv(name: str, port: int, udp_port: int | None, host: str | None = None) -> list[str]:
    """host None: the server's default (IPv4); "::" serves both families."""
    argv = [sys.executable, "-m", "lb.backend_server", "--name", name, "--port", str(port)]
    if host:
        argv += ["--host", host]
    if udp_port:
        argv += ["--udp-port", str(udp_port)]
    return argv


def start_backends(
    lab: Lab, topo: LbTopology, *, timeout: float = 10.0
) -> list[subprocess.Popen]:
    """Start lb.backend_server in every backend ns; return once all print `ready`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    procs = [
        lab.popen(
            b.ns,
            backend_argv(b.name, topo.backend_port, topo.udp_port, "::" if lab.ipv6 else None),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
        )
        for b in topo.backends
    ]
    _wait_ready(procs, timeout)
    return procs


def _wait_ready(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """Wait for a `ready` line from every process (all at once, not in turn)."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytes] = {}
    for p in procs:
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, p)
        bufs[p.pid] = b""
    pending = set(bufs)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"backend servers not ready: pids {sorted(pending)}")
            for key, _ in sel.select(left):
                p = key.data
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    raise RuntimeError(f"backend server pid {p.pid} exited: rc={p.wait()}")
                bufs[p.pid] += chunk
                if b"ready\n" in bufs[p.pid]:
                    pending.discard(p.pid)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()


__all__ = [
    "Backend",
    "Iface",
    "Lab",
    "LbTopology",
    "build_lb_lab",
    "cleanup_stale",
    "start_backends",
]
