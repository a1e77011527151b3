"""The namespace lab without any XDP: plain kernel networking must work.

Needs root (network namespaces, raw sockets); skipped otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError

from lb.lab import (
    Lab,
    LbTopology,
    backend_argv,
    build_lb_lab,
    cleanup_stale,
    inside_ns,
    start_backends,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

BACKEND_PORT = 8080
UDP_PORT = 9090


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(prefix)]


def thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def curl(lab: Lab, ns: str, url: str, *extra: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    argv = ["curl", "-s", "--max-time", str(timeout), *extra, url]
    return lab.run(ns, argv, timeout=timeout + 2, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def topo(lab: Lab) -> LbTopology:
    start = time.monotonic()
    topo = build_lb_lab(lab, n_backends=3, backend_port=BACKEND_PORT, udp_port=UDP_PORT)
    built_in = time.monotonic() - start
    assert built_in < 2.0, f"building the 3-backend lab took {built_in:.2f}s"
    start_backends(lab, topo)
    return topo


# -- topology ---------------------------------------------------------------


def test_topology_names_and_addresses(lab: Lab, topo: LbTopology) -> None:
    assert sorted(lab_namespaces(lab.prefix)) == sorted(
        lab.prefix + n for n in ("client", "lb", "b1", "b2", "b3")
    )
    assert topo.client.name == "c0" and topo.client.ip == "10.1.0.10"
    assert topo.lb_client.name == "l0" and topo.lb_client.ip == "10.1.0.1"
    assert [b.ip for b in topo.backends] == ["10.244.1.2", "10.244.2.2", "10.244.3.2"]
    assert [b.lb_iface.name for b in topo.backends] == ["l1", "l2", "l3"]
    # Recorded ifindexes/MACs are the live ones.
    for iface in [topo.client, *topo.lb_ifaces, *(b.iface for b in topo.backends)]:
        assert lab.ifindex(iface.ns, iface.name) == iface.ifindex
        assert lab.mac(iface.ns, iface.name) == iface.mac


def test_addresses_on_interfaces(lab: Lab, topo: LbTopology) -> None:
    def addrs(ns: str, ifname: str) -> set[str]:
        ipr = lab.ipr(ns)
        return {
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(family=socket.AF_INET, index=lab.ifindex(ns, ifname))
        }

    assert addrs(topo.client_ns, "c0") == {"10.1.0.10/24", "192.0.2.10/24"}
    assert addrs(topo.lb_ns, "l0") == {"10.1.0.1/24", "192.0.2.1/24"}
    assert "10.255.0.1/32" in addrs(topo.lb_ns, "lo")
    assert addrs(topo.backend("b2").ns, "eth0") == {"10.244.2.2/24"}
    assert addrs(topo.lb_ns, "l2") == {"10.244.2.1/24"}


def test_routes(lab: Lab, topo: LbTopology) -> None:
    def gateway(ns: str, dst: str) -> str | None:
        return lab.ipr(ns).route("get", dst=dst)[0].get_attr("RTA_GATEWAY")

    assert gateway(topo.client_ns, "10.96.0.1") == "10.1.0.1"
    assert gateway(topo.client_ns, "10.111.255.254") == "10.1.0.1"
    # Outside the service range the client has no route at all.
    with pytest.raises(NetlinkError):
        lab.ipr(topo.client_ns).route("get", dst="10.244.1.2")
    for b in topo.backends:
        assert gateway(b.ns, "10.1.0.10") == b.gateway
        assert gateway(b.ns, "10.255.0.1") == b.gateway


def test_lb_sysctls(lab: Lab, topo: LbTopology) -> None:
    assert lab.read_sysctl(topo.lb_ns, "net.ipv4.ip_forward") == "1"
    for conf in ["all", "default", "lo", "l0", "l1", "l2", "l3"]:
        assert lab.read_sysctl(topo.lb_ns, f"net.ipv4.conf.{conf}.rp_filter") == "0", conf
    # The write went to the lab namespace, not to the host's.
    assert lab.read_sysctl(topo.client_ns, "net.ipv4.ip_forward") == "0"


def test_offloads_applied(lab: Lab, topo: LbTopology) -> None:
    for ns, ifname in [(topo.client_ns, "c0")] + [(b.ns, "eth0") for b in topo.backends]:
        feats = lab.features(ns, ifname)
        assert feats["tx-checksum-ip-generic"] is False, (ns, ifname)
        assert feats["rx-gro"] is True, (ns, ifname)
        assert feats["tx-tcp-segmentation"] is False  # kernel drops TSO without csum
        # Cross-check with the ethtool binary, an independent reader.
        out = lab.run(ns, ["ethtool", "-k", ifname], timeout=5).stdout
        assert "tx-checksumming: off" in out
        assert "generic-receive-offload: on" in out
    # The lb side keeps veth defaults: the setter only touched what it was asked.
    lb_feats = lab.features(topo.lb_ns, "l1")
    assert lb_feats["tx-checksum-ip-generic"] is True
    assert lb_feats["rx-gro"] is False


def test_offload_round_trip(lab: Lab, topo: LbTopology) -> None:
    ns = topo.lb_ns
    lab.offload(ns, "l3", tx_checksum=False, gro=True)
    feats = lab.features(ns, "l3")
    assert (feats["tx-checksum-ip-generic"], feats["rx-gro"]) == (False, True)
    lab.offload(ns, "l3", tx_checksum=True, gro=False)
    feats = lab.features(ns, "l3")
    assert (feats["tx-checksum-ip-generic"], feats["rx-gro"]) == (True, False)


# -- traffic, no XDP --------------------------------------------------------


@pytest.mark.parametrize("name", ["b1", "b2", "b3"])
def test_http_from_lb_to_each_backend(lab: Lab, topo: LbTopology, name: str) -> None:
    b = topo.backend(name)
    r = curl(lab, topo.lb_ns, f"http://{b.ip}:{BACKEND_PORT}/")
    assert r.returncode == 0, r.stderr
    ident, client = r.stdout.split()
    assert ident == f"backend={name}"
    # The server reports the real peer address: the LB's side of this veth.
    assert client.startswith(f"client={b.gateway}:")


def test_http_streams_bytes_with_rate(lab: Lab, topo: LbTopology) -> None:
    url = f"http://10.244.1.2:{BACKEND_PORT}/bytes?n=300000&rate=1000000"
    r = curl(lab, topo.lb_ns, url, "-o", "/dev/null", "-w", "%{size_download} %{time_total}")
    assert r.returncode == 0, r.stderr
    size, seconds = r.stdout.split()
    assert int(size) == 300000
    assert float(seconds) >= 0.25  # 300 kB at 1 MB/s is throttled, not instant


def test_http_unknown_path_is_404(lab: Lab, topo: LbTopology) -> None:
    r = curl(lab, topo.lb_ns, f"http://10.244.3.2:{BACKEND_PORT}/nope", "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "404"


def test_udp_echo_from_lb(lab: Lab, topo: LbTopology) -> None:
    with lab.inside(topo.lb_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(2)
        sock.sendto(b"hi", ("10.244.2.2", UDP_PORT))
        data, peer = sock.recvfrom(512)
    assert peer == ("10.244.2.2", UDP_PORT)
    assert data.decode().startswith("backend=b2 client=10.244.2.1:")


def test_client_pings_lb_from_both_sources(lab: Lab, topo: LbTopology) -> None:
    assert lab.ping(topo.client_ns, "10.1.0.1", src=topo.client_ip)
    assert lab.ping(topo.client_ns, "192.0.2.1", src=topo.denied_client_ip)
    assert lab.ping(topo.client_ns, "10.1.0.1", src=topo.denied_client_ip)
    # An address nobody owns does not answer: ping() can report failure.
    assert not lab.ping(topo.client_ns, "10.1.0.99", src=topo.client_ip, timeout=0.3)


def test_client_curl_to_lb_is_refused(lab: Lab, topo: LbTopology) -> None:
    # The lb ns runs no server: the connection is refused (RST), which also
    # proves the client reaches the LB. curl exit code 7 = couldn't connect.
    for src in (topo.client_ip, topo.denied_client_ip):
        r = curl(lab, topo.client_ns, f"http://10.1.0.1:{BACKEND_PORT}/", "--interface", src, timeout=3)
        assert r.returncode == 7, (src, r.returncode, r.stderr)


def test_client_cannot_reach_backends_directly(lab: Lab, topo: LbTopology) -> None:
    # Only service VIPs are routed via the LB; backends are not on the client's map.
    r = curl(lab, topo.client_ns, f"http://10.244.1.2:{BACKEND_PORT}/", timeout=2)
    assert r.returncode != 0


def test_permanent_neighbour(lab: Lab, topo: LbTopology) -> None:
    lab.neigh(topo.lb_ns, "l3", "10.244.3.77", "02:00:00:00:03:77")
    entries = lab.ipr(topo.lb_ns).get_neighbours(dst="10.244.3.77")
    assert entries and entries[0]["state"] == 0x80  # NUD_PERMANENT
    assert lab.neighbours(topo.lb_ns, "l3")["10.244.3.77"] == "02:00:00:00:03:77"


def test_popen_sees_host_bpffs(lab: Lab, topo: LbTopology) -> None:
    # No /sys remount (unlike `ip netns exec`): pinned BPF objects stay visible.
    r = lab.run(topo.lb_ns, ["stat", "-f", "-c", "%T", "/sys/fs/bpf"], timeout=5)
    assert r.stdout.strip() == "bpf_fs"
    # And the process really is in the lab namespace.
    r = lab.run(topo.lb_ns, ["cat", "/proc/sys/net/ipv4/ip_forward"], timeout=5)
    assert r.stdout.strip() == "1"


# -- inside() ---------------------------------------------------------------


def test_inside_enters_and_restores_even_on_error(lab: Lab, topo: LbTopology) -> None:
    host = thread_netns_inode()
    lb_inode = os.stat(f"/var/run/netns/{topo.lb_ns}").st_ino
    with pytest.raises(ZeroDivisionError):
        with lab.inside(topo.lb_ns):
            assert thread_netns_inode() == lb_inode
            assert socket.if_nametoindex("l0") == topo.lb_client.ifindex
            1 / 0
    assert thread_netns_inode() == host
    with pytest.raises(OSError):
        socket.if_nametoindex("l0")  # back home: no such device here


def test_inside_is_per_thread(lab: Lab, topo: LbTopology) -> None:
    host = thread_netns_inode()
    seen: list[int] = []
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with lab.inside(topo.client_ns):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(5)
    seen.append(thread_netns_inode())
    release.set()
    t.join(5)
    assert seen == [host]


def test_inside_unknown_namespace_leaves_thread_home() -> None:
    host = thread_netns_inode()
    with pytest.raises(FileNotFoundError):
        with inside_ns("xl-no-such-namespace"):
            pass
    assert thread_netns_inode() == host


# -- lifecycle --------------------------------------------------------------


def test_close_removes_namespaces_and_processes() -> None:
    with Lab() as lab:
        topo = build_lb_lab(lab, n_backends=2)
        procs = start_backends(lab, topo)
        stray = lab.popen(topo.lb_ns, ["sleep", "60"])
        assert len(lab_namespaces(lab.prefix)) == 4
    assert lab_namespaces(lab.prefix) == []
    assert all(p.poll() is not None for p in [*procs, stray])
    lab.close()  # idempotent
    assert lab_namespaces(lab.prefix) == []
    with pytest.raises(RuntimeError):
        lab.netns("again")  # a closed lab creates nothing more


def test_close_after_exception_in_with_block() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            topo = build_lb_lab(lab, n_backends=1)
            procs = start_backends(lab, topo)
            raise RuntimeError("boom")
    assert lab_namespaces(lab.prefix) == []
    assert procs[0].poll() is not None


def test_close_kills_processes_not_started_by_popen() -> None:
    lab = Lab()
    ns = lab.netns("x")
    with lab.inside(ns):
        outsider = subprocess.Popen(["sleep", "60"])
    lab.close()
    assert outsider.wait(5) is not None
    assert lab_namespaces(lab.prefix) == []


def test_concurrent_labs_do_not_clash() -> None:
    with Lab() as a, Lab() as b:
        ta, tb = build_lb_lab(a, n_backends=1), build_lb_lab(b, n_backends=1)
        assert a.prefix != b.prefix
        assert ta.lb_ns != tb.lb_ns
        b.close()
        # Closing one leaves the other working.
        assert a.ping(ta.client_ns, "10.1.0.1")
        assert len(lab_namespaces(a.prefix)) == 3


def test_cleanup_stale_removes_dead_labs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"xl{dead.pid}-1-client"
    netns.create(stale)
    try:
        with inside_ns(stale):
            squatter = subprocess.Popen(["sleep", "60"])
        with Lab() as live:
            live_ns = live.netns("client")
            removed = cleanup_stale()
            assert stale in removed
            assert live_ns not in removed
            assert stale not in netns.listnetns()
            assert live_ns in netns.listnetns()
            # A process left in the dead lab's namespace is killed too.
            assert squatter.wait(5) is not None
    finally:
        if stale in netns.listnetns():
            netns.remove(stale)


def test_backend_server_module_runs_standalone(lab: Lab, topo: LbTopology) -> None:
    # The documented command line, on another port, in a backend namespace.
    b = topo.backend("b3")
    proc = lab.popen(
        b.ns,
        backend_argv("solo", 8181, None),
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    r = curl(lab, topo.lb_ns, f"http://{b.ip}:8181/")
    assert r.stdout.startswith("backend=solo client=10.244.3.1:")


def test_sigterm_closes_the_labs(tmp_path: Path) -> None:
    """`kill` or `timeout` on a bench or a test run: its namespaces and the
    processes in them go too, as after a normal exit."""
    import signal
    import sys

    script = tmp_path / "lab_then_wait.py"
    # A forked child (as setns helpers are) that gets a SIGTERM dies as
    # before: it must not close the labs it inherited.
    script.write_text("import os, signal, sys, time\nfrom lb.lab import Lab\nlab = Lab(prefix='sigt')\n"
                      "name = lab.netns('a')\nr, w = os.pipe()\npid = os.fork()\n"
                      "if pid == 0:\n    os.write(w, b'x')\n    time.sleep(60)\n    os._exit(0)\n"
                      "os.read(r, 1)\nos.kill(pid, signal.SIGTERM)\n_, status = os.waitpid(pid, 0)\n"
                      "assert os.WIFSIGNALED(status), status\n"
                      "print(name, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    name = proc.stdout.readline().strip()
    try:
        assert name and name in netns.listnetns()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) != 0
        assert name not in netns.listnetns()
    finally:
        proc.kill()
        proc.wait()
        if name in netns.listnetns():         # the defect this test is for
            netns.remove(name)
