"""Cold neighbours: nothing warms the LB's neighbour table, as on a real
gateway. The daemon keeps every backend's next hop resolved with managed
entries (lb/neighbours.py), also after `ip neigh flush all`, and the data
plane never hands the kernel a packet it would drop as a martian."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from scapy.layers.inet import IP

from lb.demo import WEB_VIP, curl_many, lab_config
from lb.lab import Lab, build_lb_lab, start_backends
from lb.neighbours import (IPV4, IPV6, NEIGH_PROTOCOL, NTF_EXT_MANAGED, NextHop, RouteTable,
                          backend_addresses, drain_requests, recent_destinations)
from lbtest import XDP_DROP, XDP_REDIRECT, Harness, ipv6_pair, pin_dir, stats, tcp, wait_for

CLIENT = "10.1.0.10"
CLIENT_AS_INT = 0x0A01000A


def lb_neighbours(lab: Lab, ns: str, family: int = 2) -> dict[str, tuple[int, bool, int]]:
    """address -> (state, managed, protocol) in the LB's neighbour table."""
    out = {}
    for n in lab.ipr(ns).get_neighbours(family=family):
        dst = n.get_attr("NDA_DST")
        if dst:
            out[dst] = (n["state"], bool((n.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED),
                        n.get_attr("NDA_PROTOCOL") or 0)
    return out


def resolved_and_managed(lab: Lab, topo) -> bool:
    table = lb_neighbours(lab, topo.lb_ns)
    return all(b.ip in table and table[b.ip][1] and table[b.ip][0] & 0x1E for b in topo.backends)


@pytest.fixture
def cold_lab():
    """A lab of its own: no earlier test has resolved anything in it."""
    with Lab() as lab:
        topo = build_lb_lab(lab, 3)
        start_backends(lab, topo)
        yield lab, topo


@pytest.mark.parametrize("snat", [False, True], ids=["gateway", "snat"])
def test_cold_backends_answered_then_after_a_flush(cold_lab, bpf_object, tmp_path, snat):
    """300 curls, each a new flow, through a LB whose neighbour table nobody
    warmed: all answered. Then `ip neigh flush all` on the LB: 300 more, all
    answered. (On the old data plane SNAT answered none: the rewritten packet,
    sourced from the LB's own address, was handed to the kernel, which drops
    it as a martian and never resolves the neighbour.)"""
    import signal

    from lb.dataplane import Dataplane
    from lb.demo import DaemonProcess

    lab, topo = cold_lab
    assert not any(b.ip in lb_neighbours(lab, topo.lb_ns) for b in topo.backends)
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket=f"/run/xdplb/neigh-{snat}.sock", snat=snat)
    d = DaemonProcess(cfg, tmp_path, topo.lb_ns)
    try:
        d.start()
        # The daemon resolved them before READY, as managed entries of its own.
        table = lb_neighbours(lab, topo.lb_ns)
        for b in topo.backends:
            state, managed, proto = table[b.ip]
            assert managed and proto == NEIGH_PROTOCOL and state & 0x1E, (b.ip, table[b.ip])
        answers = curl_many(lab, topo, f"http://{WEB_VIP}/", 300, CLIENT)
        assert len(answers) == 300
        assert set(answers) == {b.name for b in topo.backends}

        lab.run(topo.lb_ns, ["ip", "neigh", "flush", "all"])
        # Re-created at once (a netlink event), not at the next periodic pass.
        wait_for(lambda: resolved_and_managed(lab, topo), timeout=1.0, what="managed entries back")
        answers = curl_many(lab, topo, f"http://{WEB_VIP}/", 300, CLIENT)
        assert len(answers) == 300

        st = stats(d)
        # Toward the backends nothing waited: their entries were kept. The
        # flush also took the client's entry (the client, with the LB's MAC
        # cached, does not ARP again): a reply or two waited for it.
        toward_backends = [r for r in st["drop_detail"]
                           if r["reason"] == "no_neigh" and r["identity"] == "frontend"]
        assert toward_backends == []
        status = d.call("status")
        assert status["neighbours"]["readded"] >= 3 and status["neighbours"]["unresolved"] == []
        assert st["drops"]["no_neigh"]["packets"] <= status["neighbours"]["requested"] * 4
    finally:
        d.kill(signal.SIGKILL)
        Dataplane.detach(__import__("pathlib").Path(cfg["bpffs"]), purge=True)


def test_snat_never_hands_the_kernel_a_martian(lab, bpf_object):
    """A SNAT packet whose next hop is unresolved is dropped and counted
    (`no_neigh`), not passed to the kernel, which would drop it as a martian
    (its source is the LB's own address) and resolve nothing. A gateway-mode
    packet (the client's source) still goes to the kernel, which resolves."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock", snat=True)
    cfg["nexthop_cache_ms"] = 0
    with Harness(lab_, topo, cfg, attach=False) as h:
        _, out = h.run(tcp(CLIENT, 50100, WEB_VIP, 80))
        b = next(b for b in topo.backends if b.ip == out[IP].dst)
        lab_.ipr(topo.lb_ns).neigh("del", dst=b.ip, ifindex=b.lb_iface.ifindex)
        before = h.drop_count("no_neigh")
        rc, _ = h.run(tcp(CLIENT, 50100, WEB_VIP, 80, flags="A"))
        assert rc == XDP_DROP
        assert h.drop_count("no_neigh") == before + 1
        # The program asked the control plane for that next hop.
        assert drain_requests(h.dp) == [NextHop(b.lb_iface.ifindex, b.ip)]
        h.neighbours.sync(wait=2.0)                     # the keeper puts it back
        rc, _ = h.run(tcp(CLIENT, 50100, WEB_VIP, 80, flags="A"))
        assert rc == XDP_REDIRECT


def test_reply_to_an_unresolved_client_is_resolved_on_demand(lab, bpf_object):
    """Nobody can list the clients in advance. A reply whose client next hop
    is unresolved (here: deleted; a client with the LB's MAC cached does
    not ARP again) leaves from the VIP, which the kernel may refuse: it is
    dropped, the program asks for the next hop, the keeper has the kernel
    resolve it, and the retransmitted reply goes out by XDP."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["nexthop_cache_ms"] = 0
    with Harness(lab_, topo, cfg, attach=False) as h:
        _, out = h.run(tcp(CLIENT, 50300, WEB_VIP, 80))
        b = next(b for b in topo.backends if b.ip == out[IP].dst)
        reply = tcp(b.ip, topo.backend_port, CLIENT, 50300, flags="SA")
        assert h.run(reply, ifname=b.lb_iface.name)[0] == XDP_REDIRECT
        lab_.ipr(topo.lb_ns).neigh("del", dst=CLIENT, ifindex=topo.lb_client.ifindex)
        rc, _ = h.run(reply, ifname=b.lb_iface.name)
        assert rc == XDP_DROP and h.drop_count("no_neigh") == 1
        assert h.neighbours.resolve_requested() == 1
        wait_for(lambda: h.run(reply, ifname=b.lb_iface.name)[0] == XDP_REDIRECT, timeout=2.0,
                 what="the client's next hop resolved")
        assert lb_neighbours(lab_, topo.lb_ns)[CLIENT][1] is False   # a plain entry, not kept


def test_keeper_follows_backends_and_routes(lab, bpf_object):
    """Next hops of backends behind a gateway are the gateway; an entry the
    keeper made is removed once no backend needs it."""
    lab_, topo = lab
    b1 = topo.backends[0]
    ipr = lab_.ipr(topo.lb_ns)
    # 10.250.0.0/24 lives behind b1 (its address is the gateway).
    ipr.route("add", dst="10.250.0.0/24", gateway=b1.ip)
    try:
        cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock",
                         web_backends=["10.250.0.7:8080", "10.250.0.8:8080"])
        with Harness(lab_, topo, cfg, attach=False) as h:
            routes = RouteTable.dump(h.neighbours.ipr)
            hops = routes.lookup(np.array([0x0AFA0007, 0x0AF40102], dtype=np.uint32))
            assert hops[0] == (NextHop(b1.lb_iface.ifindex, b1.ip),)
            assert hops[1] == (NextHop(b1.lb_iface.ifindex, "10.244.1.2"),)   # on-link: itself
            addrs = backend_addresses(h.dp)[IPV4]
            assert 0x0AFA0007 in addrs.tolist() and 0x0AFA0008 in addrs.tolist()
            table = lb_neighbours(lab_, topo.lb_ns)
            assert table[b1.ip][1]                       # the gateway is managed
            assert "10.250.0.7" not in table             # not on-link: never an entry of its own
            # Without the echo service's backends b2, b3 lose their entries.
            edited = h.edit()
            edited["services"] = [s for s in edited["services"] if s["name"] == "web"]
            h.apply(edited)
            table = lb_neighbours(lab_, topo.lb_ns)
            assert table[b1.ip][1]
            for b in topo.backends[1:]:
                assert not (b.ip in table and table[b.ip][2] == NEIGH_PROTOCOL), table.get(b.ip)
    finally:
        ipr.route("del", dst="10.250.0.0/24", gateway=b1.ip)


def test_a_flushed_client_is_resolved_again_before_its_cached_next_hop_expires(lab, bpf_object):
    """After a deletion (a flush, the kernel's garbage collection), the
    keeper re-resolves at once the on-link destinations that XDP's next-hop
    cache still holds, so the replies after the cache expires find the
    client without a drop."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket="/run/xdplb/unused.sock")
    cfg["nexthop_cache_ms"] = 1500
    with Harness(lab_, topo, cfg, attach=False) as h:
        h.neighbours.start()
        _, out = h.run(tcp(CLIENT, 50400, WEB_VIP, 80))
        b = next(b for b in topo.backends if b.ip == out[IP].dst)
        reply = tcp(b.ip, topo.backend_port, CLIENT, 50400, flags="SA")
        assert h.run(reply, ifname=b.lb_iface.name)[0] == XDP_REDIRECT     # the client is cached now
        assert CLIENT_AS_INT in recent_destinations(h.dp)[IPV4].tolist()
        lab_.ipr(topo.lb_ns).neigh("del", dst=CLIENT, ifindex=topo.lb_client.ifindex)
        wait_for(lambda: CLIENT in lb_neighbours(lab_, topo.lb_ns)
                 and lb_neighbours(lab_, topo.lb_ns)[CLIENT][0] & 0x1E,
                 timeout=1.0, what="the client re-resolved by the keeper")
        import time
        time.sleep(1.6)                                  # every CPU's cached copy has expired
        assert h.run(reply, ifname=b.lb_iface.name)[0] == XDP_REDIRECT
        assert h.drop_count("no_neigh") == 0
        assert h.neighbours.status.refreshed >= 1



def test_multipath_routes_keep_every_path_resolved():
    """An ECMP route to the backends: every path's gateway is a next hop the
    FIB may pick, so every one is kept; the default route's gateway on an
    attached interface too."""
    from lb.neighbours import NeighbourKeeper

    with Lab(prefix="xnm") as lab:
        ns = lab.netns("m")
        lab.veth(ns, "a0", ns, "a1")
        lab.veth(ns, "b0", ns, "b1")
        lab.addr(ns, "a0", "10.50.1.1/24")
        lab.addr(ns, "b0", "10.50.2.1/24")
        ipr = lab.ipr(ns)
        a0, b0 = lab.ifindex(ns, "a0"), lab.ifindex(ns, "b0")
        ipr.route("add", dst="10.60.0.0/16", multipath=[{"gateway": "10.50.1.2", "oif": a0},
                                                         {"gateway": "10.50.2.2", "oif": b0}])
        ipr.route("add", dst="0.0.0.0/0", gateway="10.50.1.9")
        with lab.inside(ns):
            keeper = NeighbourKeeper(lambda: {IPV4: np.array([0x0A3C0101], dtype=np.uint32)}, lambda: [a0])
        try:
            routes = RouteTable.dump(keeper.ipr)
            assert routes.lookup(np.array([0x0A3C0101], dtype=np.uint32)) == \
                [(NextHop(a0, "10.50.1.2"), NextHop(b0, "10.50.2.2"))]
            st = keeper.sync()
            assert st.managed == 3
        finally:
            keeper.close()
        table = lb_neighbours(lab, ns)
        for gw in ("10.50.1.2", "10.50.2.2", "10.50.1.9"):
            assert table[gw][1] and table[gw][2] == NEIGH_PROTOCOL, (gw, table.get(gw))


def test_route_table_prefers_main_then_metric_then_longest_prefix():
    """As the FIB with the default rules: the longest prefix; for one prefix
    the main table before the default table, whatever the metrics; within
    a table the lowest metric."""
    from lb.neighbours import DEFAULT_TABLE, Route

    net = 0x0A000000                                   # 10.0.0.0
    routes = RouteTable([
        Route(net, 8, 100, (NextHop(2, "192.0.2.1"),)),
        Route(net, 8, 10, (NextHop(3, "192.0.2.9"),), DEFAULT_TABLE),   # lower metric, later table
        Route(net, 8, 50, (NextHop(4, "192.0.2.5"),)),                  # main, lower metric: wins
        Route(0x0A010000, 16, 500, (NextHop(5, ""),)),                   # longer prefix, on-link
    ])
    assert routes.lookup(np.array([0x0A020304, 0x0A010203, 0x0B000001], dtype=np.uint32)) == \
        [(NextHop(4, "192.0.2.5"),), (NextHop(5, "10.1.2.3"),), ()]


def _v6_lab(lab: Lab) -> tuple[str, str, int]:
    """ipv6_pair(), and 2001:db8:99::/64 behind p, reached by its link-local address."""
    m, p = ipv6_pair(lab)
    a0 = lab.ifindex(m, "a0")
    lab.ipr(m).route("add", dst="2001:db8:99::/64", gateway="fe80::2", oif=a0, family=socket.AF_INET6)
    return m, p, a0


def test_ipv6_next_hops_resolved_by_ndp_and_kept():
    """IPv6 backends, on-link and behind a link-local gateway, beside an
    IPv4 one: the keeper makes managed entries for 2001:db8:1::2 and
    fe80::2 (the gateway, never the remote backend itself), the kernel
    resolves them by NDP to p's MAC; after `ip -6 neigh flush all` the
    running keeper re-creates them at once; a backend gone takes its next
    hop's entry with it."""
    from lb.neighbours import NeighbourKeeper

    with Lab(prefix="xn6", ipv6=True) as lab:
        m, p, a0 = _v6_lab(lab)
        assert not any(a.startswith(("2001:", "fe80:")) for a in lb_neighbours(lab, m, socket.AF_INET6))
        backends = {IPV4: IPV4.array([IPV4.value("10.70.0.2")]),
                    IPV6: IPV6.array(sorted(IPV6.value(a) for a in ("2001:db8:1::2", "2001:db8:99::7")))}
        with lab.inside(m):
            keeper = NeighbourKeeper(lambda: backends, lambda: [])
        try:
            hops = keeper._backends[IPV6].routes or RouteTable.dump(keeper.ipr, IPV6)
            assert hops.lookup(backends[IPV6]) == [(NextHop(a0, "2001:db8:1::2"),), (NextHop(a0, "fe80::2"),)]
            st = keeper.sync(wait=2.0)
            assert st.managed == 3 and st.unresolved == [] and st.no_route == 0
            mac = lab.mac(p, "a1")
            table6 = lb_neighbours(lab, m, socket.AF_INET6)
            for addr in ("2001:db8:1::2", "fe80::2"):
                state, managed, proto = table6[addr]
                assert managed and proto == NEIGH_PROTOCOL and state & 0x1E, (addr, table6[addr])
            assert "2001:db8:99::7" not in table6
            assert {n.get_attr("NDA_LLADDR") for n in lab.ipr(m).get_neighbours(family=socket.AF_INET6)
                    if n.get_attr("NDA_DST") in ("2001:db8:1::2", "fe80::2")} == {mac}
            assert lb_neighbours(lab, m)["10.70.0.2"][1]

            keeper.start()
            lab.run(m, ["ip", "-6", "neigh", "flush", "all"])
            wait_for(lambda: all(a in (t := lb_neighbours(lab, m, socket.AF_INET6)) and t[a][1] and t[a][0] & 0x1E
                                 for a in ("2001:db8:1::2", "fe80::2")),
                     timeout=1.0, what="IPv6 managed entries back after a flush")
            assert keeper.status.readded >= 2

            backends[IPV6] = IPV6.array([IPV6.value("2001:db8:1::2")])
            keeper.kick()
            wait_for(lambda: "fe80::2" not in lb_neighbours(lab, m, socket.AF_INET6),
                     timeout=2.0, what="the gateway's entry removed with its last backend")
            assert lb_neighbours(lab, m, socket.AF_INET6)["2001:db8:1::2"][1]
        finally:
            keeper.close()


def test_ipv6_route_table_longest_prefix_and_map_words():
    """The same longest-prefix match for IPv6 (128-bit prefixes, a
    link-local gateway kept as the next hop), and the data plane's
    network-order `addr[4]` words read back as addresses of either family."""
    from lb.neighbours import Route, words_to_values

    routes = RouteTable([
        Route(IPV6.value("2001:db8::"), 32, 100, (NextHop(2, "fe80::1"),)),
        Route(IPV6.value("2001:db8:5::"), 64, 100, (NextHop(3, ""),)),
        Route(0, 0, 1024, (NextHop(4, "fe80::9"),)),
    ], IPV6)
    addrs = IPV6.array(IPV6.value(a) for a in ("2001:db8:7::1", "2001:db8:5::20", "2a00::1"))
    assert routes.lookup(addrs) == [(NextHop(2, "fe80::1"),), (NextHop(3, "2001:db8:5::20"),),
                                    (NextHop(4, "fe80::9"),)]
    assert routes.gateways([2, 3]) == {NextHop(2, "fe80::1")}
    raw = np.frombuffer(bytes(range(16)) + bytes([10, 0, 0, 7]) + bytes(12), dtype="<u4").reshape(2, 4)
    assert words_to_values(raw[:1], IPV6).tolist() == [IPV6.value("1:203:405:607:809:a0b:c0d:e0f")]
    assert words_to_values(raw[1:], IPV4).tolist() == [IPV4.value("10.0.0.7")]


def test_a_one_service_change_keeps_its_next_hops_without_a_full_pass():
    """added(): the new backends' next hops get their managed entries at
    once, and the keeper makes no pass over every backend for it (at 20k
    services such a pass cost ~30 ms of the API's GIL share per update). A
    next hop already kept costs no netlink request; one that the change
    left unused goes at the next full pass."""
    from lb.neighbours import NeighbourKeeper

    with Lab(prefix="xna") as lab:
        ns = lab.netns("m")
        peer = lab.netns("p")
        lab.veth(ns, "a0", peer, "a1")
        lab.addr(ns, "a0", "10.51.0.1/24")
        lab.addr(peer, "a1", "10.51.0.2/24")
        for extra in ("10.51.0.3/24", "10.51.0.4/24"):
            lab.addr(peer, "a1", extra)
        lab.ipr(ns).route("add", dst="10.61.0.0/16", gateway="10.51.0.2")
        backends = {IPV4: IPV4.array([IPV4.value("10.51.0.3")])}
        with lab.inside(ns):
            keeper = NeighbourKeeper(lambda: backends, lambda: [], interval=3600.0)
        try:
            keeper.start()
            wait_for(lambda: keeper.status.passes >= 1 and "10.51.0.3" in lb_neighbours(lab, ns),
                     timeout=2.0, what="the first full pass")
            passes = keeper.status.passes
            # A service now also sends to 10.51.0.4 (on-link) and 10.61.0.9 (behind 10.51.0.2).
            backends[IPV4] = IPV4.array(sorted(IPV4.value(a) for a in ("10.51.0.3", "10.51.0.4", "10.61.0.9")))
            keeper.added(["10.51.0.4", "10.61.0.9", "10.51.0.3"])
            wait_for(lambda: all(a in (t := lb_neighbours(lab, ns)) and t[a][1] and t[a][0] & 0x1E
                                 for a in ("10.51.0.4", "10.51.0.2")),
                     timeout=2.0, what="the new next hops managed and resolved")
            assert "10.61.0.9" not in lb_neighbours(lab, ns)         # behind a gateway: no entry of its own
            assert keeper.status.passes == passes                     # no full pass for it
            assert keeper.status.managed == 3
            # The change is undone: the entries stay until a full pass, which removes them.
            backends[IPV4] = IPV4.array([IPV4.value("10.51.0.3")])
            keeper.added(["10.51.0.3"])
            wait_for(lambda: not keeper._added, timeout=2.0, what="the keeper to take the addresses")
            assert lb_neighbours(lab, ns)["10.51.0.4"][1]
            keeper.kick()
            wait_for(lambda: "10.51.0.4" not in lb_neighbours(lab, ns) and "10.51.0.2" not in lb_neighbours(lab, ns),
                     timeout=2.0, what="unused entries removed by the full pass")
            assert keeper.status.passes == passes + 1 and keeper.status.managed == 1
            assert lb_neighbours(lab, ns)["10.51.0.3"][1]
        finally:
            keeper.close()


def test_an_unresolved_hop_is_logged_once_whatever_its_state(caplog):
    """A next hop that never resolves turns INCOMPLETE -> FAILED ->
    INCOMPLETE: one warning, and no "resolved again" until it does."""
    import logging

    from lb.neighbours import NeighbourKeeper

    keeper = NeighbourKeeper.__new__(NeighbourKeeper)      # no netlink needed for the log
    keeper._unresolved_logged = set()
    with caplog.at_level(logging.INFO, logger="xdplb.neighbours"):
        for state in ("INCOMPLETE", "FAILED", "INCOMPLETE", "FAILED"):
            keeper._log_unresolved([f"10.9.0.2 dev nu0 ({state})"])
        keeper._log_unresolved([])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["next hop not resolved: 10.9.0.2 dev nu0 (INCOMPLETE)",
                     "next hop resolved again: 10.9.0.2 dev nu0"], lines
