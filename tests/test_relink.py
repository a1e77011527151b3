"""A pinned XDP link whose interface was deleted and made again under the
same name (new ifindex) while the daemon was down: the next start replaces
the dead link and keeps the maps, flows included; a pinned link still
running on another interface (the old one, renamed) is refused by name."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lb.demo import WEB_VIP
from lbtest import ROOT, download
from loader import LinkInfo, Map, XdpLink, xdp_query

N, RATE = 4_000_000, 800_000          # a download of ~5 s
ONLY_B3 = "10.96.3.33"


def link(pins: Path, ifname: str) -> LinkInfo:
    with XdpLink.from_pin(pins / "links" / ifname) as lk:
        return lk.info()


def map_ids(pins: Path) -> dict[str, int]:
    out = {}
    for p in sorted((pins / "maps").iterdir()):
        with Map.open_pinned(p) as m:
            out[p.name] = m.info().id
    return out


def conntrack_keys(pins: Path) -> set[bytes]:
    with Map.open_pinned(pins / "maps" / "conntrack") as m:
        return {bytes(k) for k in m.keys()}


def recreate_backend_veth(lab_, topo, b) -> int:
    """Delete b's veth (both ends) and make it again with the same names and
    addresses, as re-creating the lab would: a new ifindex on the LB side."""
    name = b.lb_iface.name
    lab_.ipr(topo.lb_ns).link("del", index=lab_.ifindex(topo.lb_ns, name))
    lab_.veth(topo.lb_ns, name, b.ns, "eth0")
    lab_.addr(topo.lb_ns, name, f"{b.gateway}/24")
    lab_.addr(b.ns, "eth0", f"{b.ip}/24")
    lab_.route(b.ns, "default", gateway=b.gateway)
    lab_.sysctl(topo.lb_ns, f"net.ipv4.conf.{name}.rp_filter", 0)
    lab_.offload(b.ns, "eth0", tx_checksum=False, gro=True)
    return lab_.ifindex(topo.lb_ns, name)


def rename(lab_, ns: str, old: str, new: str) -> None:
    ipr = lab_.ipr(ns)
    idx = lab_.ifindex(ns, old)
    ipr.link("set", index=idx, state="down")       # a name changes only while down
    ipr.link("set", index=idx, ifname=new)
    ipr.link("set", index=idx, state="up")


def test_restart_replaces_the_dead_link_of_a_recreated_interface(lab, daemon_factory):
    lab_, topo = lab
    b1, b3 = topo.backends[0], topo.backends[2]
    # The download's flow crosses l0 and l1 only; l3 (b3's) is re-created.
    d = daemon_factory(web_backends=[f"{b1.ip}:{topo.backend_port}"])
    pins = Path(d.config["bpffs"])
    ids = map_ids(pins)
    old = link(pins, "l3")
    assert old.ifindex == lab_.ifindex(topo.lb_ns, "l3")

    result: dict = {}
    t = download(lab_, topo, f"http://{WEB_VIP}/bytes?n={N}&rate={RATE}", result)
    time.sleep(0.8)
    flows = conntrack_keys(pins)
    assert flows, "the download's flow is not in conntrack"

    d.kill(signal.SIGKILL)
    new_ifindex = recreate_backend_veth(lab_, topo, b3)
    assert new_ifindex != old.ifindex and link(pins, "l3").ifindex == 0     # the pinned link is dead
    cfg = yaml.safe_load(d.path.read_text())            # and a service only b3 serves, through the new l3
    cfg["services"].append({"name": "only-b3", "vip": ONLY_B3, "port": 80, "protocol": "tcp",
                            "backends": [f"{b3.ip}:{topo.backend_port}"]})
    d.path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    d.start()

    log = d.log.read_text()
    assert re.search(rf"WARNING xdplb.dataplane: replaced a dead pinned XDP link .* interface=l3 "
                     rf"ifindex={new_ifindex} old_ifindex=0 old_link_id={old.id} pin={pins}/links/l3\n",
                     log), log[-3000:]
    new = link(pins, "l3")
    assert new.ifindex == new_ifindex and new.id != old.id
    status = d.call("status")
    assert status["interfaces"] == {i.name: new.prog_id for i in topo.lb_ifaces}

    # The same maps (none re-created): the established download did not notice.
    assert map_ids(pins) == ids
    assert flows <= conntrack_keys(pins)
    t.join(60)
    assert result["out"] == f"{N} 200", result

    # Traffic through the new interface, both ways (the daemon resolves b3's
    # next hop on it: nobody warmed it).
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{ONLY_B3}/"]).stdout
    assert out.startswith("backend=b3"), out


def test_a_link_still_running_on_the_renamed_interface_is_refused(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    pins = Path(d.config["bpffs"])
    prog = d.call("status")["interfaces"]["l3"]
    old_ifindex = lab_.ifindex(topo.lb_ns, "l3")
    d.kill(signal.SIGKILL)
    rename(lab_, topo.lb_ns, "l3", "l3old")                  # keeps its XDP link
    try:
        lab_.veth(topo.lb_ns, "l3", topo.lb_ns, "l3peer")    # and a new l3
        new_ifindex = lab_.ifindex(topo.lb_ns, "l3")
        mark = len(d.log.read_text())
        with pytest.raises(RuntimeError):
            d.start()
        assert d.proc.returncode != 0
        log = d.log.read_text()[mark:]
        assert "Traceback" not in log, log
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, log
        path = pins / "links" / "l3"
        assert (f"pinned link {path} runs on l3old (ifindex {old_ifindex}), not on l3 (ifindex "
                f"{new_ifindex})") in errors[0], errors[0]
        assert f"`rm {path}` detaches it from l3old" in errors[0], errors[0]

        # Nothing was changed: l3old still runs the program through the pin,
        # the new l3 got nothing, and the others still run the old program.
        still = link(pins, "l3")
        assert (still.prog_id, still.ifindex) == (prog, old_ifindex)
        with lab_.inside(topo.lb_ns):
            assert xdp_query(old_ifindex) == prog and xdp_query(new_ifindex) is None
        assert {i.name: link(pins, i.name).prog_id for i in topo.lb_ifaces} == \
            {i.name: prog for i in topo.lb_ifaces}

        # `xdplb down` removes it, from l3old too.
        p = subprocess.run([sys.executable, "-m", "lb.cli", "--socket", d.socket, "down", "--bpffs",
                            str(pins)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "detached from l0, l1, l2, l3", p.stdout + p.stderr
        with lab_.inside(topo.lb_ns):
            assert xdp_query(old_ifindex) is None
    finally:
        if lab_.ipr(topo.lb_ns).link_lookup(ifname="l3peer"):
            lab_.ipr(topo.lb_ns).link("del", index=lab_.ifindex(topo.lb_ns, "l3peer"))
        rename(lab_, topo.lb_ns, "l3old", "l3")
