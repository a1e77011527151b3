"""Path MTU discovery through the LB, end to end: a client behind a router
whose link to it has a smaller MTU (1280) downloads several MiB from a
backend through the VIP. The backend's full-size segments are too big for
that link; the router answers each with ICMP fragmentation needed (ICMPv6
packet too big) addressed to the VIP, which the LB must translate and pass
to the backend (icmp_error.h) or the download stalls.

    far client f0 (MTU 1500) -- r0 (MTU 1280) router r1 -- l9 LB l<i> -- backends

Real kernels on every hop, real TCP, nothing warmed."""

from __future__ import annotations

import pytest

from lbtest import Harness, pin_dir

FAR4, FAR6 = "10.4.0.10", "fd00:4::10"
VIP4, VIP6 = "10.96.0.40", "fd00:96::40"
SMALL_MTU = 1280
SIZE = 8 * 2**20


@pytest.fixture(scope="module")
def pmtu_lab():
    from lb.lab import Lab, build_lb_lab, start_backends

    with Lab(ipv6=True) as lab:
        topo = build_lb_lab(lab, 2)
        start_backends(lab, topo)
        lb_ns, r_ns, far_ns = topo.lb_ns, lab.netns("r"), lab.netns("far")
        lab.veth(lb_ns, "l9", r_ns, "r1")
        lab.veth(r_ns, "r0", far_ns, "f0")
        for ns, ifname, cidrs in ((lb_ns, "l9", ("10.3.0.1/24", "fd00:3::1/64")),
                                  (r_ns, "r1", ("10.3.0.2/24", "fd00:3::2/64")),
                                  (r_ns, "r0", ("10.4.0.1/24", "fd00:4::1/64")),
                                  (far_ns, "f0", (f"{FAR4}/24", f"{FAR6}/64"))):
            for cidr in cidrs:
                lab.addr(ns, ifname, cidr)
        # The router's side of the client's link is the small one; the
        # client's own MTU is 1500, so its TCP announces a 1460-byte MSS.
        lab.ipr(r_ns).link("set", index=lab.ifindex(r_ns, "r0"), mtu=SMALL_MTU)
        lab.sysctl(r_ns, "net.ipv4.ip_forward", 1)
        lab.sysctl(r_ns, "net.ipv6.conf.all.forwarding", 1)
        for ns, gw4, gw6 in ((r_ns, "10.3.0.1", "fd00:3::1"), (far_ns, "10.4.0.1", "fd00:4::1")):
            lab.route(ns, "default", gateway=gw4)
            lab.route(ns, "default", gateway=gw6)
        lab.route(lb_ns, "10.4.0.0/24", gateway="10.3.0.2")
        lab.route(lb_ns, "fd00:4::/64", gateway="fd00:3::2")
        lab.sysctl(lb_ns, "net.ipv4.conf.l9.rp_filter", 0)
        # XDP redirects into l9 land in r1's queue: it needs NAPI (GRO).
        lab.offload(r_ns, "r1", tx_checksum=False, gro=True)
        lab.offload(far_ns, "f0", tx_checksum=False, gro=True)
        yield lab, topo, far_ns


def pmtu_config(topo, snat: bool) -> dict:
    port = topo.backend_port
    cfg = {
        "interfaces": [i.name for i in topo.lb_ifaces] + ["l9"],
        "bpffs": pin_dir(),
        "services": [
            {"name": "bulk", "vip": VIP4, "port": 80, "protocol": "tcp",
             "backends": [f"{b.ip}:{port}" for b in topo.backends]},
            {"name": "bulk6", "vip": VIP6, "port": 80, "protocol": "tcp",
             "backends": [f"[{b.ip6}]:{port}" for b in topo.backends]},
        ],
    }
    return cfg


def learnt_mtu(lab, ns: str, dst: str) -> int | None:
    route = lab.ipr(ns).route("get", dst=dst)[0]
    metrics = route.get_attr("RTA_METRICS")
    return metrics.get_attr("RTAX_MTU") if metrics is not None else None


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["gateway", "snat"])
def test_download_through_a_smaller_mtu_completes(pmtu_lab, bpf_object, family, mode):
    lab, topo, far_ns = pmtu_lab
    cfg = pmtu_config(topo, mode == "snat")
    if mode == "snat":
        cfg["snat_address"] = topo.snat_ip if family == 4 else topo.snat_ip6
    with Harness(lab, topo, cfg) as h:
        before = h.counters("global_stats", h.dp.consts.CNT_ICMP_ERROR_TO_BACKEND)[0]
        host = VIP4 if family == 4 else f"[{VIP6}]"
        p = lab.run(far_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
                             "--max-time", "30", f"http://{host}/bytes?n={SIZE}"], timeout=45, check=False)
        assert p.stdout == f"{SIZE} 200", (p.returncode, p.stdout, p.stderr)
        assert h.counters("global_stats", h.dp.consts.CNT_ICMP_ERROR_TO_BACKEND)[0] > before
        # A backend learnt the path MTU towards the address it answers:
        # the client's (gateway mode) or the SNAT address.
        peer = (FAR4 if family == 4 else FAR6) if mode == "gateway" else \
            (topo.snat_ip if family == 4 else topo.snat_ip6)
        mtus = {b.name: learnt_mtu(lab, b.ns, peer) for b in topo.backends}
        assert SMALL_MTU in mtus.values(), mtus
