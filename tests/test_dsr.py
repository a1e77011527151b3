"""Direct server return end to end: the real daemon with ipip and gue
services, the real backend decapsulation (`xdplb backend attach`) on three
backends running HTTP servers, real curl.

The lab is the tests' usual one (client - lb - b1..b3) plus a return path:
each backend has a link of its own to the client (r0 <-> r<i>) and routes
the client's networks over it, as a backend on the client's side of a
router would. So the backends' answers, from the VIP, reach the client
without crossing the load balancer, and captures on both of the client's
sides show which way every packet came.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.demo import curl_many
from lb.lab import REPO_ROOT, Lab, build_lb_lab, start_backends
from lbtest import (ENCAP_SOURCE, ENCAP_SOURCE6, GUE_VIP, GUE_VIP6, IPIP_VIP, IPIP_VIP6, VIP_4IN6, VIP_6IN4, daemons,
                    download, pin_dir, stats, wait_for, with_dsr6_services, with_dsr_services, xdplb)

PORT = 8080
VIPS = (IPIP_VIP, GUE_VIP)
VIPS6 = (IPIP_VIP6, GUE_VIP6, VIP_4IN6, VIP_6IN4)
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


# -- the lab ----------------------------------------------------------------------


def backend_cli(lab: Lab, b, pins: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`xdplb backend ...` in backend `b`'s namespace."""
    return lab.run(b.ns, [sys.executable, "-m", "lb.cli", "backend", *args, "--bpffs", str(pins)],
                   timeout=60, check=check, cwd=REPO_ROOT)


def attach_decap(lab: Lab, b, pins: Path, vips=VIPS) -> None:
    backend_cli(lab, b, pins, "attach", "eth0", *(f"--vip={v}" for v in vips))


def add_return_paths(lab: Lab, topo) -> None:
    """b<i> r0 172.16.<i>.2/24 <-> client r<i> 172.16.<i>.1/24; the backend
    routes the client's networks (allowed and denied) there. The inner
    packet's source then arrives on eth0 and is routed back by r0: strict
    reverse-path filtering would drop it, so the backends use loose (README
    "DSR backends", rp_filter), and so does the client, whose answers come
    in by r<i> while its route to the VIPs leaves by c0. In a Lab(ipv6=True)
    the links carry IPv6 too (no reverse-path filter there)."""
    for conf in ("all", "default"):
        lab.sysctl(topo.client_ns, f"net.ipv4.conf.{conf}.rp_filter", 2)
    for b in topo.backends:
        lab.veth(b.ns, "r0", topo.client_ns, f"r{b.index}")
        lab.addr(b.ns, "r0", f"172.16.{b.index}.2/24")
        lab.addr(topo.client_ns, f"r{b.index}", f"172.16.{b.index}.1/24")
        for net in ("10.1.0.0/24", "192.0.2.0/24"):
            lab.route(b.ns, net, gateway=f"172.16.{b.index}.1")
        for conf in ("all", "eth0"):
            lab.sysctl(b.ns, f"net.ipv4.conf.{conf}.rp_filter", 2)
        lab.sysctl(topo.client_ns, f"net.ipv4.conf.r{b.index}.rp_filter", 2)
        if lab.ipv6:    # fd00:172:<i>::2/64 <-> ::1, the client's IPv6 networks over it
            lab.addr(b.ns, "r0", f"fd00:172:{b.index:x}::2/64")
            lab.addr(topo.client_ns, f"r{b.index}", f"fd00:172:{b.index:x}::1/64")
            for net in ("fd00:1::/64", "fd00:2::/64"):
                lab.route(b.ns, net, gateway=f"fd00:172:{b.index:x}::1")


@contextlib.contextmanager
def decap_lab(vips, *, ipv6: bool = False):
    """The lab, return paths, and every backend decapsulating `vips`."""
    with Lab(ipv6=ipv6) as lab:
        topo = build_lb_lab(lab, 3)
        start_backends(lab, topo)
        add_return_paths(lab, topo)
        pins = {b.name: Path(pin_dir()) for b in topo.backends}
        try:
            for b in topo.backends:
                attach_decap(lab, b, pins[b.name], vips)
            yield lab, topo, pins
        finally:
            for b in topo.backends:
                backend_cli(lab, b, pins[b.name], "detach", "eth0", "--purge", check=False)


@pytest.fixture(scope="module")
def dsr_lab(bpf_object):
    subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "bpf"], check=True)
    with decap_lab(VIPS) as lab:
        yield lab


@pytest.fixture(scope="module")
def dsr6_lab(bpf_object):
    """The same with IPv6 on every link: the backends decapsulate the IPv6
    VIPs and the IPv4 one of the 4in6 service."""
    with decap_lab(VIPS6, ipv6=True) as lab:
        yield lab


@pytest.fixture
def dsr6_daemon(dsr6_lab, tmp_path):
    topo = dsr6_lab[1]
    with daemons(topo, tmp_path) as start:
        yield lambda **kw: start(edit=lambda cfg: with_dsr6_services(cfg, topo, **kw))


@pytest.fixture
def dsr_daemon(dsr_lab, tmp_path):
    """Start `xdplb run` with the DSR services; always stop and detach."""
    topo = dsr_lab[1]
    with daemons(topo, tmp_path) as start:
        yield lambda **kw: start(edit=lambda cfg: with_dsr_services(cfg, topo, **kw))


# -- captures ---------------------------------------------------------------------


class Capture:
    """Every frame an interface receives (AF_PACKET), in a thread."""

    def __init__(self, lab: Lab, ns: str, ifname: str):
        with lab.inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            if addr[2] != PACKET_OUTGOING:
                self.frames.append(data)

    def stop(self) -> list[Ether]:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return [Ether(f) for f in self.frames]


def from_vips(frames: list[Ether], vips=VIPS) -> list[Ether]:
    return [f for f in frames if TCP in f and ((IP in f and f[IP].src in vips) or
                                               (IPv6 in f and f[IPv6].src in vips))]


def counter(st: dict, name: str) -> int:
    return st["global"][name]["packets"]


def service(st: dict, name: str) -> dict:
    return next(s for s in st["services"] if s["name"] == name)


def curls_with_captures(lab: Lab, topo, url: str, client: str, denied: str):
    """300 curls from `client` and 5 from `denied`, with captures on the
    client's side of the LB (c0) and on each backend's return link."""
    caps = {"c0": Capture(lab, topo.client_ns, "c0")}
    caps.update({f"r{b.index}": Capture(lab, topo.client_ns, f"r{b.index}") for b in topo.backends})
    try:
        answers = curl_many(lab, topo, url, 300, client)
        refused = curl_many(lab, topo, url, 5, denied, timeout=1.0)
    finally:
        frames = {k: c.stop() for k, c in caps.items()}
    return answers, refused, frames


def assert_balanced(answers: list[str], topo) -> None:
    assert len(answers) == 300
    counts = collections.Counter(answers)
    for b in topo.backends:
        assert abs(counts[b.name] / 300 - 1 / 3) <= 0.08, counts


def download_across_kill_9(lab: Lab, topo, d, url: str) -> None:
    """A 64 MiB download, the daemon killed (-9) a second in and restarted."""
    n = 64 * 2**20
    result: dict = {}
    t = download(lab, topo, f"{url}/bytes?n={n}&rate={16 * 2**20}", result, max_time=60)
    time.sleep(1.0)
    d.kill(signal.SIGKILL)
    time.sleep(0.5)
    d.start()
    t.join(90)
    assert result["out"] == f"{n} 200", result


def upload_through_pmtud(lab: Lab, topo, d, url: str, vip: str, overhead: int) -> None:
    """An 8 MiB upload completes; the LB answered too big packets and the
    client's kernel learnt the path MTU 1500 less the overhead."""
    n = 8 * 2**20
    before = stats(d)
    code = (f"import sys, urllib.request as u; r = u.urlopen(u.Request('{url}/sink', "
            f"data=b'x' * {n}, method='POST'), timeout=60); print(r.read().decode().strip())")
    out = lab.run(topo.client_ns, [sys.executable, "-c", code], timeout=90).stdout
    assert re.match(rf"backend=b\d received={n}$", out), out
    after = stats(d)
    assert counter(after, "frag_needed") > counter(before, "frag_needed")
    assert after["drops"]["encap_mtu"]["packets"] > before["drops"]["encap_mtu"]["packets"]
    with lab.inside(topo.client_ns):
        route = lab.ipr(topo.client_ns).route("get", dst=vip)[0]
    metrics = route.get_attr("RTA_METRICS")
    assert metrics is not None and metrics.get_attr("RTAX_MTU") == 1500 - overhead, route


# -- tests --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ipip", "gue"])
def test_balance_policy_and_replies_bypass_the_lb(dsr_lab, dsr_daemon, mode):
    """300 new connections through the VIP spread over the 3 backends
    within +-8 %, each answered directly with the client's own address seen
    by the server; a denied identity gets nothing; the LB's XDP counted
    every client packet of the service and not one answer, and the client
    received every answer on its return links, none from the LB."""
    lab, topo, _ = dsr_lab
    d = dsr_daemon()
    vip = IPIP_VIP if mode == "ipip" else GUE_VIP
    name = f"dsr-{mode}"
    out = lab.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{vip}:{PORT}/"]).stdout
    assert re.match(rf"backend=b\d client={topo.client_ip}:\d+", out), out
    before = stats(d)
    answers, denied, frames = curls_with_captures(lab, topo, f"http://{vip}:{PORT}/", topo.client_ip,
                                                  topo.denied_client_ip)
    after = stats(d)

    assert_balanced(answers, topo)
    assert denied == []
    drops = [x for x in after["drop_detail"]
             if x["identity"] == "blocked" and x["service"] == name and x["reason"] == "policy"]
    assert drops and drops[0]["packets"] >= 5

    # The LB: every packet of the service was a client's, sent in its tunnel;
    # nothing was reverse-translated, no reply state exists.
    svc_b, svc_a = service(before, name), service(after, name)
    sent = svc_a["packets"] - svc_b["packets"]
    assert svc_a["forwarding"] == mode
    assert counter(after, f"encap_{mode}") - counter(before, f"encap_{mode}") == sent > 300 * 4
    assert counter(after, "reply") == counter(before, "reply")
    status = json.loads(xdplb(d, "status", "--json").stdout)
    assert status["maps"]["rev_nat"]["entries"] == 0
    # `flow` asks the live program: the packet would leave in its tunnel.
    res = json.loads(xdplb(d, "flow", f"{topo.client_ip}:40000", f"{vip}:{PORT}", "tcp", "--json").stdout)
    assert res["verdict"] == "FORWARDED" and res["service"] == name and "rewritten" not in res
    assert res["encapsulated"] == {"forwarding": mode, "src": ENCAP_SOURCE,
                                   "dst": res["backend"].rpartition(":")[0]}
    assert f"FORWARDED in {mode}" in xdplb(d, "flow", f"{topo.client_ip}:40000", f"{vip}:{PORT}", "tcp").stdout

    # The client: answers from the VIP came in by the backends' links only.
    assert from_vips(frames["c0"]) == []
    direct = sum(len(from_vips(frames[f"r{b.index}"])) for b in topo.backends)
    assert direct >= 300 * 3, direct           # SYN-ACK, data, FIN at least, per connection
    for b in topo.backends:                    # each link carried its own backend's answers
        assert from_vips(frames[f"r{b.index}"]), b.name


def test_health_checks_go_through_the_tunnel(dsr_lab, dsr_daemon):
    """A backend whose decapsulation is detached still answers a plain TCP
    connect on its own address, but not a SYN through the tunnel: it goes
    down on both DSR services (and out of their Maglev tables), and comes
    back once it decapsulates again."""
    lab, topo, pins = dsr_lab
    d = dsr_daemon(health_check={"type": "tcp", "interval": 0.3, "timeout": 0.25, "fall": 2, "rise": 2})
    b3 = topo.backends[2]
    key = f"{b3.ip}:{PORT}"

    def health() -> dict:
        st = json.loads(xdplb(d, "status", "--json").stdout)["health"]
        return {(h["service"], h["backend"]): h for h in st["backends"]}

    wait_for(lambda: all(h["up"] and h["probes"] >= 2 for h in health().values()), 10,
             "the first probes to pass")
    assert len(health()) == 6
    # Each probe resets the connection it opened: no backend is left with
    # half-open ones retransmitting SYN-ACKs (at most a probe in flight).
    time.sleep(1.0)
    for b in topo.backends:
        half_open = [line for line in lab.run(b.ns, ["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]
                     if line.split()[3] == "03"]                     # TCP_SYN_RECV
        assert len(half_open) <= 2, (b.name, half_open)
    backend_cli(lab, b3, pins[b3.name], "detach", "eth0")
    try:
        down = wait_for(lambda: (lambda h: h if not h[("dsr-ipip", key)]["up"] and
                                 not h[("dsr-gue", key)]["up"] else None)(health()), 10,
                        "b3 to go down")
        # No decapsulation: the backend's kernel has no handler for protocol
        # 4 and nothing on UDP 6080; its ICMP error (or silence) fails the probe.
        errors = (down[("dsr-ipip", key)]["last_error"], down[("dsr-gue", key)]["last_error"])
        assert re.search(r"protocol unreachable|timeout", errors[0]), errors
        assert re.search(r"port unreachable|timeout", errors[1]), errors
        assert all(h["up"] for (s, b), h in down.items() if b != key)
        wait_for(lambda: all(h["in_rotation"] is False for (s, b), h in health().items()
                             if b == key), 5, "b3 out of rotation")
        answers = curl_many(lab, topo, f"http://{IPIP_VIP}:{PORT}/", 30, topo.client_ip)
        assert len(answers) == 30 and "b3" not in answers
    finally:
        attach_decap(lab, b3, pins[b3.name])
    wait_for(lambda: all(h["up"] for h in health().values()), 10, "b3 to come back")


def test_kill_9_during_a_64_mib_download_and_restart(dsr_lab, dsr_daemon, tmp_path):
    """ipip: the download's data goes straight from the backend; its ACKs
    keep crossing the LB, whose XDP program keeps running while the daemon
    is dead, and whose restart keeps the flow's conntrack entry."""
    lab, topo, _ = dsr_lab
    d = dsr_daemon()
    download_across_kill_9(lab, topo, d, f"http://{IPIP_VIP}:{PORT}")
    assert service(stats(d), "dsr-ipip")["packets"] > 0
    # One DSR service changed through the API (validated with the running
    # encap_source): b3 leaves it.
    svc = dict(next(x for x in d.config["services"] if x["name"] == "dsr-ipip"))
    svc["backends"] = svc["backends"][:2]
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(svc))
    xdplb(d, "service", "put", "-f", str(path))
    answers = curl_many(lab, topo, f"http://{IPIP_VIP}:{PORT}/", 30, topo.client_ip)
    assert len(answers) == 30 and set(answers) <= {"b1", "b2"}, answers


@pytest.mark.parametrize("mode,overhead", [("ipip", 20), ("gue", 28)])
def test_path_mtu_discovery_through_the_tunnel(dsr_lab, dsr_daemon, mode, overhead):
    """An upload is what crosses the tunnel in full-size packets (a
    download's data never does). The client (MTU 1500, all links 1500)
    sends 1500-byte segments; the LB answers fragmentation needed with
    1500 less the overhead, the client's TCP shrinks its segments, and the
    8 MiB arrive whole."""
    lab, topo, _ = dsr_lab
    d = dsr_daemon()
    vip = IPIP_VIP if mode == "ipip" else GUE_VIP
    upload_through_pmtud(lab, topo, d, f"http://{vip}:{PORT}", vip, overhead)


# -- IPv6: 6in6 (ipip, gue) and 4in6 --------------------------------------------------


def url(vip: str) -> str:
    return f"http://[{vip}]:{PORT}" if ":" in vip else f"http://{vip}:{PORT}"


@pytest.mark.parametrize("name,vip,mode", [("dsr6-ipip", IPIP_VIP6, "ipip"), ("dsr6-gue", GUE_VIP6, "gue"),
                                           ("dsr-4in6", VIP_4IN6, "ipip"), ("dsr-6in4", VIP_6IN4, "gue")])
def test_ipv6_balance_policy_and_replies_bypass_the_lb(dsr6_lab, dsr6_daemon, name, vip, mode):
    """As for IPv4: 300 connections over the 3 IPv6 backends within +-8 %,
    a denied identity answered 0 of 5 times, every client packet sent in
    its IPv6 tunnel and no answer through the LB (its counters and a
    capture on its client side); the 4in6 service carries IPv4 clients to
    IPv6 backends, the 6in4 one (gue) IPv6 clients to IPv4 backends."""
    lab, topo, _ = dsr6_lab
    d = dsr6_daemon()
    v6 = ":" in vip
    client, denied = (topo.client_ip6, topo.denied_client_ip6) if v6 else (topo.client_ip, topo.denied_client_ip)
    before = stats(d)
    answers, refused, frames = curls_with_captures(lab, topo, url(vip), client, denied)
    after = stats(d)

    assert_balanced(answers, topo)
    assert refused == []
    blocked = "blocked6" if v6 else "blocked"
    drops = [x for x in after["drop_detail"]
             if x["identity"] == blocked and x["service"] == name and x["reason"] == "policy"]
    assert drops and drops[0]["packets"] >= 5

    sent = service(after, name)["packets"] - service(before, name)["packets"]
    assert counter(after, f"encap_{mode}") - counter(before, f"encap_{mode}") == sent > 300 * 4
    assert counter(after, "reply") == counter(before, "reply")
    assert json.loads(xdplb(d, "status", "--json").stdout)["maps"]["rev_nat"]["entries"] == 0
    src = f"[{client}]:40000" if v6 else f"{client}:40000"
    dst = f"[{vip}]:{PORT}" if v6 else f"{vip}:{PORT}"
    res = json.loads(xdplb(d, "flow", src, dst, "tcp", "--json").stdout)
    outer_source = ENCAP_SOURCE if name == "dsr-6in4" else ENCAP_SOURCE6
    assert res["verdict"] == "FORWARDED" and res["encapsulated"]["src"] == outer_source

    assert from_vips(frames["c0"], (vip,)) == []
    for b in topo.backends:
        assert from_vips(frames[f"r{b.index}"], (vip,)), b.name
    assert sum(len(from_vips(frames[f"r{b.index}"], (vip,))) for b in topo.backends) >= 300 * 3


def test_ipv6_kill_9_during_a_64_mib_download_and_restart(dsr6_lab, dsr6_daemon):
    lab, topo, _ = dsr6_lab
    d = dsr6_daemon()
    download_across_kill_9(lab, topo, d, url(IPIP_VIP6))
    assert service(stats(d), "dsr6-ipip")["packets"] > 0


@pytest.mark.parametrize("vip,overhead", [(IPIP_VIP6, 40), (GUE_VIP6, 48), (VIP_4IN6, 40)],
                         ids=["6in6", "gue6", "4in6"])
def test_ipv6_path_mtu_discovery_through_the_tunnel(dsr6_lab, dsr6_daemon, vip, overhead):
    """An 8 MiB upload from a client of MTU 1500 over 1500-byte links: the
    LB answers packet too big (fragmentation needed for the IPv4 client of
    4in6) with 1500 less the overhead, and the client's TCP shrinks."""
    lab, topo, _ = dsr6_lab
    upload_through_pmtud(lab, topo, dsr6_daemon(), url(vip), vip, overhead)


def test_ipv6_health_checks_go_through_the_tunnel(dsr6_lab, dsr6_daemon):
    """The IPv6 tunnels' probes (lb/tunnel_probe.py: a SYN in 6in6, in GUE
    over IPv6, an IPv4 SYN in IPv6 and an IPv6 one in GUE over IPv4, those
    two from the encap_source of the VIP's family): a backend whose
    decapsulation is detached goes down on every DSR service and comes back
    once it decapsulates again."""
    lab, topo, pins = dsr6_lab
    d = dsr6_daemon(health_check={"type": "tcp", "interval": 0.3, "timeout": 0.25, "fall": 2, "rise": 2})
    b3 = topo.backends[2]
    keys = {"dsr6-ipip": f"[{b3.ip6}]:{PORT}", "dsr6-gue": f"[{b3.ip6}]:{PORT}",
            "dsr-4in6": f"[{b3.ip6}]:{PORT}", "dsr-6in4": f"{b3.ip}:{PORT}"}

    def health() -> dict:
        st = json.loads(xdplb(d, "status", "--json").stdout)["health"]
        return {(h["service"], h["backend"]): h for h in st["backends"] if h["service"] in keys}

    wait_for(lambda: len(health()) == 12 and all(h["up"] and h["probes"] >= 2 for h in health().values()),
             10, "the first probes to pass")
    backend_cli(lab, b3, pins[b3.name], "detach", "eth0")
    try:
        down = wait_for(lambda: (lambda h: h if not any(h[k]["up"] for k in keys.items()) else None)(health()),
                        10, "b3 to go down")
        assert all(h["up"] for k, h in down.items() if k not in keys.items())
        wait_for(lambda: all(health()[k]["in_rotation"] is False for k in keys.items()), 5,
                 f"b3 out of rotation: {health()}")
        answers = curl_many(lab, topo, url(IPIP_VIP6), 30, topo.client_ip6)
        assert len(answers) == 30 and "b3" not in answers
    finally:
        attach_decap(lab, b3, pins[b3.name], VIPS6)
    wait_for(lambda: all(h["up"] for h in health().values()), 10, "b3 to come back")
