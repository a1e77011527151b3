"""End to end over IPv6: the real daemon, XDP on the lab's veths, real
`curl -6` from the client and real servers on the backends, through the VIP
fd00:96::10 in gateway mode. Nothing is warmed: the client resolves its
gateway, the LB's kernel resolves the backends for the first packets that
XDP hands it (gateway mode keeps the client's source)."""

from __future__ import annotations

import collections
import json
import re

from lb.config import SnatPorts
from lb.demo import curl_many
from lbtest import daemons, stats, xdplb

VIP6 = "fd00:96::10"


def with_ipv6_service(cfg: dict, topo) -> dict:
    cfg["identities"]["clients6"] = ["fd00:1::/64"]
    cfg["services"].append({
        "name": "web6", "vip": VIP6, "port": 80, "protocol": "tcp",
        "backends": [f"[{b.ip6}]:{topo.backend_port}" for b in topo.backends],
        "allow": ["clients6"]})
    return cfg


def test_curl6_balanced_through_gateway_vip_and_denied_identity(lab6, bpf_object, tmp_path):
    lab, topo = lab6
    with daemons(topo, tmp_path) as start:
        d = start(edit=lambda cfg: with_ipv6_service(cfg, topo))
        answers = curl_many(lab, topo, f"http://[{VIP6}]/", 300, topo.client_ip6)
        assert len(answers) == 300
        counts = collections.Counter(answers)
        for b in topo.backends:                  # binomial, sd 2.7%: +-10% is > 3.5 sd
            assert 0.233 <= counts[b.name] / 300 <= 0.433, counts
        # A denied identity (fd00:2::/64 is in no identity: world) gets nothing.
        assert curl_many(lab, topo, f"http://[{VIP6}]/", 5, topo.denied_client_ip6, timeout=1.0) == []
        st = stats(d)
        web6 = next(s for s in st["services"] if s["name"] == "web6")
        assert web6["packets"] > 300
        drops = [x for x in st["drop_detail"] if x["service"] == "web6" and x["reason"] == "policy"]
        assert drops and drops[0]["packets"] >= 5
        # IPv4 beside it, in the same daemon, unchanged.
        assert len(curl_many(lab, topo, "http://10.96.0.10/", 5, topo.client_ip)) == 5


def test_dual_stack_snat_one_address_per_family(lab6, bpf_object, tmp_path):
    """`snat_address: [IPv4, IPv6]`: one daemon SNATs both families at once.
    Real curls over IPv4 and IPv6 each reach every backend from the SNAT
    address of their own family, on a port of the SNAT range."""
    lab, topo = lab6

    def dual_snat(cfg: dict) -> dict:
        cfg["snat_address"] = [topo.snat_ip, topo.snat_ip6]
        return with_ipv6_service(cfg, topo)

    with daemons(topo, tmp_path) as start:
        d = start(edit=dual_snat)
        ports = SnatPorts()
        for url, source, snat_ip in ((f"http://[{VIP6}]/", topo.client_ip6, topo.snat_ip6),
                                     ("http://10.96.0.10/", topo.client_ip, topo.snat_ip)):
            argv = ["curl", "-s", "--interface", source, "--max-time", "2", "-H", "Connection: close"]
            out = lab.run(topo.client_ns, argv + [url] * 30, timeout=90, check=False).stdout
            seen = re.findall(r"backend=(\w+) client=(\S+):(\d+)", out)
            assert len(seen) == 30, out
            assert {b for b, _, _ in seen} == {b.name for b in topo.backends}, seen
            # The backends' servers are dual-stack: IPv4 peers come v4-mapped.
            assert {ip.removeprefix("::ffff:") for _, ip, _ in seen} == {snat_ip}, seen
            assert all(ports.min <= int(port) <= ports.max for _, _, port in seen), seen
        status = json.loads(xdplb(d, "status", "--json").stdout)
        assert status["snat_address"] == f"{topo.snat_ip}, {topo.snat_ip6}"
