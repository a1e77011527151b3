"""The benchmark harness itself: kube-proxy layouts as the real tools load
them, the profile compiler against the in-kernel generator's real output,
the sink's misroute check, and a tiny end-to-end sweep of every engine.

Timings are the benchmark's business (`xdplb bench`); these tests assert
only what must hold on any machine.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bench import engines as E
from bench import gate, kubeproxy as kp, profile as prof, report, sweep
from bench import lab as blab
from bench.progs import Forwarder, Generator, Sink, build
from lb.lab import Lab

pytestmark = pytest.mark.root
CIDR = blab.CLUSTER_CIDR


@pytest.fixture(scope="module", autouse=True)
def bench_objects(bpf_object):
    build()


def services(n: int, endpoints: int = 3, proto: str = "udp") -> list[E.BService]:
    return E.make_services(n, endpoints, proto)


@pytest.fixture
def netns():
    """A throwaway namespace (nothing else in it) for loading rules."""
    with Lab(prefix="xbt") as lab:
        yield lab, lab.netns("rules")


# --------------------------------------------------------------------------
# kube-proxy layouts


def test_kube_proxy_hash_matches_the_published_example():
    # REFERENCE.md: "ns1/svc1" + "tcp" -> AQI2S6QIMU7PVVRP (kube-proxy's own test value)
    assert kp.port_proto_hash("ns1/svc1", "tcp") == "AQI2S6QIMU7PVVRP"
    s = kp.KService("ns1", "svc1", "", "tcp", "172.30.0.41", 80, (("10.180.0.1", 80),))
    assert kp.svc_chain(s) == "KUBE-SVC-AQI2S6QIMU7PVVRP"
    assert kp.sep_chain(s, ("10.180.0.1", 80)).startswith("KUBE-SEP-")
    assert kp.sep_chain(s, ("10.180.0.1", 80)) != kp.sep_chain(s, ("10.180.0.2", 80))


def test_iptables_layout_has_kube_proxy_probabilities():
    text = kp.iptables_full([s.kube() for s in services(1, endpoints=3)], CIDR)
    probs = [line.split("--probability ")[1].split()[0] for line in text.splitlines() if "--probability" in line]
    assert probs == ["0.3333333333", "0.5000000000"]     # 1/3, 1/2, then unconditional
    assert text.count("-j DNAT --to-destination") == 3


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_iptables_restore_loads_full_sync_and_updates(netns, variant):
    lab, ns = netns
    svcs = services(50)
    restore = [f"iptables-{variant}-restore", "--noflush"]
    lab.run(ns, restore, input=kp.iptables_full([s.kube() for s in svcs], CIDR))
    # add, update (endpoint replaced, its old KUBE-SEP deleted), delete
    new = E.make_service(50, 3, "udp")
    lab.run(ns, restore, input=kp.iptables_update([s.kube() for s in svcs + [new]], [new.kube()], [], CIDR))
    old, upd = svcs[7], E.replace_endpoint(svcs[7], 1)
    svcs[7] = upd
    stale = [kp.sep_chain(old.kube(), ep) for ep in old.endpoints if ep not in upd.endpoints]
    lab.run(ns, restore, input=kp.iptables_update([s.kube() for s in svcs + [new]], [upd.kube()], stale, CIDR))
    lab.run(ns, restore, input=kp.iptables_update([s.kube() for s in svcs], [], kp.iptables_chains(new.kube()), CIDR))
    saved = lab.run(ns, [f"iptables-{variant}-save", "-t", "nat"]).stdout
    assert saved.count(":KUBE-SVC-") == 50
    assert saved.count(":KUBE-SEP-") == 150
    assert kp.svc_chain(new.kube()) not in saved
    assert stale[0] not in saved
    assert f"--to-destination {upd.endpoints[0][0]}:{upd.endpoints[0][1]}" in saved
    kube_services = [line for line in saved.splitlines() if line.startswith("-A KUBE-SERVICES")]
    assert len(kube_services) == 51          # one per service + the nodeports rule, last
    assert "KUBE-NODEPORTS" in kube_services[-1]


def test_nft_layout_checks_and_loads(netns, tmp_path):
    lab, ns = netns
    svcs = services(50)
    full = tmp_path / "full.nft"
    full.write_text(kp.nft_full([s.kube() for s in svcs], CIDR))
    lab.run(ns, ["nft", "-c", "-f", str(full)])
    lab.run(ns, ["nft", "-f", str(full)])
    new = E.make_service(50, 3, "udp")
    upd = E.replace_endpoint(svcs[3], 1)
    lab.run(ns, ["nft", "-f", "-"], input=kp.nft_update([new.kube()], [], {}, CIDR))
    lab.run(ns, ["nft", "-f", "-"], input=kp.nft_update([upd.kube()], [], {svcs[3].kube().port_id: svcs[3].kube()}, CIDR))
    lab.run(ns, ["nft", "-f", "-"], input=kp.nft_update([], [svcs[0].kube()], {}, CIDR))
    listing = lab.run(ns, ["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert "ip daddr . meta l4proto . th dport vmap @service-ips" in listing
    assert listing.count("numgen random mod 3 vmap") == 50         # 50 - 1 deleted + 1 added
    assert f"dnat to {upd.endpoints[0][0]}:{upd.endpoints[0][1]}" in listing
    assert f"dnat to {svcs[3].endpoints[0][0]}:" not in listing     # the replaced endpoint's chain is gone
    assert svcs[0].vip + " . udp . 80" not in listing
    assert new.vip + " . udp . 80" in listing


# --------------------------------------------------------------------------
# profiles and the generator


TUNABLES = {"vip": "10.96.0.9", "port": 80, "stamp": 9}


@pytest.mark.parametrize("name", ["udp_flows", "tcp_syn_flows"])
def test_stand_in_api_matches_the_trex_client(name):
    # lbr-trex-client is in the test extra: the real client is always there.
    a, api_a = prof.evaluate(name, TUNABLES, client="trex")
    b, api_b = prof.evaluate(name, TUNABLES, client="stand-in")
    assert (api_a, api_b) == ("trex", "stand-in")
    assert prof.compile_stream(a[0]) == prof.compile_stream(b[0])
    assert a[0]["packet"]["binary"] == b[0]["packet"]["binary"]


def test_profile_the_generator_cannot_run_is_rejected_clearly(tmp_path):
    p = tmp_path / "wide.py"
    p.write_text(textwrap.dedent("""
        from trex.stl.api import *
        class S:
            def get_streams(self, tunables=(), **kw):
                vm = STLVM()
                vm.var(name="x", min_value=0, max_value=10, size=8, op="inc")
                vm.write(fv_name="x", pkt_offset="IP.src")
                return [STLStream(packet=STLPktBuilder(pkt=Ether()/IP()/UDP()/Raw(bytes(20)), vm=vm))]
        def register():
            return S()
    """))
    with pytest.raises(prof.ProfileError, match="flow var 'x': size 8"):
        prof.load(str(p), {}, client="stand-in")


@pytest.fixture(scope="module")
def fwd_lab():
    """gen -> bare forwarder -> sink, the sink keeping samples."""
    with Lab(prefix="xbt") as lab:
        bl = blab.build(lab)
        with Generator() as gen, Sink(gen) as sink, Forwarder("fwd_main") as fwd:
            with bl.inside(bl.sink_ns):
                sink.attach(bl.s0)
            fwd.configure(bl.l1, bl.l1_mac, bl.s0_mac)
            with bl.inside(bl.lb_ns):
                fwd.attach(bl.l0)
            yield bl, gen, sink, fwd
            with bl.inside(bl.lb_ns):
                fwd.detach()


def _emit(bl, gen, sink, spec, count: int) -> list[bytes]:
    sink.configure(check=False, sample_max=count)
    gen.reset()
    gen.configure(spec)
    gen.set_window(0)
    with bl.inside(bl.gen_ns):
        assert gen.send(bl.g0, count, batch_size=16) == count
    deadline = time.monotonic() + 5
    while len(sink.samples()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return [data for _, data in sink.samples()]


@pytest.mark.parametrize("name,flows", [("udp_flows", 0), ("tcp_syn_flows", 0), ("udp_flows", 5)])
def test_generator_emits_what_the_profile_describes(fwd_lab, name, flows):
    bl, gen, sink, _ = fwd_lab
    spec, _, _ = prof.load(name, {**TUNABLES, "src_mac": bl.g0_mac, "dst_mac": bl.l0_mac,
                                  "flows": flows, "src_min": "10.2.255.250"})
    got = _emit(bl, gen, sink, spec, 24)
    assert len(got) == 24
    for k, frame in enumerate(got):
        want = spec.expected(k)
        # The forwarder rewrote the MACs; everything from the EtherType on is
        # the generator's, checksums included.
        assert frame[12:len(want)] == want[12:], f"packet {k}"
        pkt = Ether(frame[:len(want)])
        l4 = pkt[UDP] if UDP in pkt else pkt[TCP]
        i = k % flows if flows else k
        # the tuple generator: the address steps every packet, the port when it wraps
        assert pkt[IP].src == str(ipaddress.IPv4Address("10.2.255.250") + i % 5)
        assert l4.sport == 1025 + i // 5
        assert pkt[IP].dst == TUNABLES["vip"] and l4.dport == 80
        chk_ip, chk_l4 = pkt[IP].chksum, l4.chksum
        del pkt[IP].chksum, l4.chksum
        again = Ether(bytes(pkt))
        assert (again[IP].chksum, (again[UDP] if UDP in again else again[TCP]).chksum) == (chk_ip, chk_l4)


def test_generator_random_and_chained_variables(fwd_lab, tmp_path):
    bl, gen, sink, _ = fwd_lab
    p = tmp_path / "vars.py"
    p.write_text(textwrap.dedent(f"""
        from trex.stl.api import *
        class S:
            def get_streams(self, tunables=(), **kw):
                vm = STLVM()
                vm.var(name="id", min_value=5, max_value=9, size=2, op="random")
                vm.var(name="lo", min_value=1, max_value=3, size=1, op="dec", next_var="hi")
                vm.var(name="hi", min_value=100, max_value=101, size=2, op="inc")
                vm.write(fv_name="id", pkt_offset="IP.id")
                vm.write(fv_name="lo", pkt_offset="IP.ttl")
                vm.write(fv_name="hi", pkt_offset="UDP.dport", add_val=1000)
                vm.fix_chksum_hw(l3_offset="IP", l4_offset="UDP", l4_type=CTRexVmInsFixHwCs.L4_TYPE_UDP)
                pkt = Ether(src="{bl.g0_mac}", dst="{bl.l0_mac}")/IP(src="10.2.0.1", dst="10.96.0.9")/UDP(sport=7)/Raw(b"XLB1" + bytes(16))
                return [STLStream(packet=STLPktBuilder(pkt=pkt, vm=vm))]
        def register():
            return S()
    """))
    spec, _, _ = prof.load(str(p), {}, client="stand-in")
    got = [Ether(f[:len(spec.template)]) for f in _emit(bl, gen, sink, spec, 12)]
    assert {g[IP].id for g in got} <= set(range(5, 10)) and len({g[IP].id for g in got}) > 1
    assert [g[IP].ttl for g in got[:6]] == [3, 2, 1, 3, 2, 1]
    assert [g[UDP].dport for g in got[:6]] == [1100, 1100, 1100, 1101, 1101, 1101]
    for g in got:
        c = g[UDP].chksum
        del g[IP].chksum, g[UDP].chksum
        assert Ether(bytes(g))[UDP].chksum == c


# --------------------------------------------------------------------------
# the sink


def test_sink_counts_wrong_backends_as_misrouted():
    with Lab(prefix="xbt") as lab:
        bl = blab.build(lab)
        with Sink() as sink:
            with bl.inside(bl.sink_ns):
                sink.attach(bl.s0)
            sink.configure(check=True)
            sink.allow([("10.128.0.1", 8080, "udp", 1), ("10.128.0.2", 8081, "udp", 1),
                        ("10.128.0.33", 8080, "udp", 2)])

            def frame(dst: str, dport: int, stamp: int, proto=UDP) -> bytes:
                payload = (0x584C4231).to_bytes(4, "big") + stamp.to_bytes(4, "big") + bytes(10)
                return bytes(Ether(src=bl.l1_mac, dst=bl.s0_mac) / IP(src="10.2.0.1", dst=dst) /
                             proto(sport=1025, dport=dport) / payload)

            with bl.inside(bl.lb_ns):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            with s:
                s.bind(("l1", 0))
                for f in [frame("10.128.0.1", 8080, 1), frame("10.128.0.2", 8081, 1),   # good
                          frame("10.128.0.33", 8080, 1),      # another service's backend
                          frame("10.128.0.1", 8081, 1),       # right address, wrong port
                          frame("10.128.0.9", 8080, 1),       # no backend at all
                          frame("10.128.0.1", 8080, 1, TCP),  # wrong protocol
                          bytes(Ether(src=bl.l1_mac, dst=bl.s0_mac) / IP(dst="10.128.0.1") / UDP(dport=8080) / bytes(8))]:
                    s.send(f)
            deadline = time.monotonic() + 5
            while sink.counts().good + sink.counts().misrouted + sink.counts().unstamped < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
            c = sink.counts()
            assert (c.good, c.misrouted, c.unstamped) == (2, 4, 1)


def test_sink_counts_encapsulated_frames_only_where_they_are_due():
    """DSR engines' frames (IPIP, GUE variant 1) are delivered when the outer
    destination is a backend of the stamped service and the inner one its
    VIP; for a NAT engine the same frames are misrouted, and plain frames
    are misrouted where encapsulated ones are due."""
    vip, port = "10.96.0.1", 80
    with Lab(prefix="xbt") as lab:
        bl = blab.build(lab)
        with Sink() as sink:
            with bl.inside(bl.sink_ns):
                sink.attach(bl.s0)
            sink.allow([("10.128.0.1", port, "udp", 1, vip), ("10.128.0.2", port, "udp", 1, vip),
                        ("10.128.0.33", port, "udp", 2, "10.96.0.2")])
            payload = lambda stamp: (0x584C4231).to_bytes(4, "big") + stamp.to_bytes(4, "big") + bytes(10)  # noqa: E731
            client = lambda dst, stamp: IP(src="10.2.0.1", dst=dst) / UDP(sport=1025, dport=port) / payload(stamp)  # noqa: E731

            def ipip(outer: str, inner_dst: str = vip, stamp: int = 1) -> bytes:
                return bytes(Ether(src=bl.l1_mac, dst=bl.s0_mac) / IP(src="172.16.0.1", dst=outer, proto=4) /
                             client(inner_dst, stamp))

            def gue(outer: str, dport: int = 6080) -> bytes:
                return bytes(Ether(src=bl.l1_mac, dst=bl.s0_mac) / IP(src="10.3.0.1", dst=outer) /
                             UDP(sport=40000, dport=dport) / client(vip, 1))

            due = [ipip("10.128.0.1"), ipip("10.128.0.2"), gue("10.128.0.1"),                # good
                   ipip("10.128.0.33"),                       # another service's backend
                   ipip("10.128.0.1", inner_dst="10.96.0.9"),  # inner packet not to the VIP
                   ipip("10.128.0.9"),                        # no backend at all
                   bytes(Ether(src=bl.l1_mac, dst=bl.s0_mac) / client("10.128.0.1", 1))]    # not encapsulated

            def send(frames: list[bytes]) -> tuple[int, int, int]:
                before = sink.counts()
                with bl.inside(bl.lb_ns):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                with s:
                    s.bind(("l1", 0))
                    for f in frames:
                        s.send(f)
                deadline = time.monotonic() + 5
                while True:
                    c = sink.counts() - before
                    if c.good + c.misrouted + c.unstamped >= len(frames) or time.monotonic() > deadline:
                        return c.good, c.misrouted, c.unstamped

            sink.configure(check=True, encapsulated=True, gue_port=6080)
            assert send(due) == (3, 4, 0)
            sink.configure(check=True, encapsulated=True)           # no GUE port: UDP to 6080 is plain
            assert send([gue("10.128.0.1")]) == (0, 0, 1)
            sink.configure(check=True)                               # a NAT engine's sink
            assert send([ipip("10.128.0.1"), gue("10.128.0.1")]) == (0, 1, 1)


# --------------------------------------------------------------------------
# end to end


def test_tiny_sweep_every_engine_delivers_without_misroutes(tmp_path):
    settings = sweep.Settings(services=[1], engines=list(sweep.ALL_ENGINES), seconds=0.3,
                              load_seconds=0.2, testrun_calls=50, ops=3, ops_budget_s=20,
                              first_packet_reps=1, targets=("last",), big_sync=None)
    doc = sweep.run(settings)
    assert [r["engine"] for r in doc["results"]] == sweep.ALL_ENGINES
    assert "versus" not in doc          # no Katran object: no comparison with it
    for r in [*doc["results"], {"engine": "forwarder", "targets": {"last": doc["lab_limit"]}}]:
        for kind in ("new", "established"):
            run = r["targets"]["last"][kind]
            assert run["delivered"] > 0, (r["engine"], kind, run)
            assert run["misrouted"] == 0, (r["engine"], kind, run)
    for r in doc["results"]:
        assert r["first_packet"][0]["first_packet_ms"] is not None, r["engine"]
        assert r["operations"]["update"]["count"] == 3
        if r["engine"] != "xdplb":
            assert r["targets"]["last"]["new"]["conntrack"]["count"] >= 0
    x = report.point(doc, "xdplb", 1)
    assert x["targets"]["last"]["new_load_ns"] > 0 and x["memory"]["map_memlock_bytes"] > 0
    paths = report.write(doc, tmp_path)
    assert json.loads(paths["json"].read_text())["results"]
    assert "| xdplb | 1 |" in paths["table"].read_text()
    assert all(p.stat().st_size > 1000 for k, p in paths.items() if k.startswith("plot"))
    # The gate passes against its own ratios and fails against better ones.
    base = gate.baseline_from(doc)
    assert gate.check(doc, base).ok
    assert base["ratios"]
    assert not gate.check(doc, {"ratios": {k: 10 * v for k, v in base["ratios"].items()}}).ok


def test_gate_fails_on_a_regressed_ratio():
    doc = {"results": [
        _fake_point("xdplb", 1, 1.0), _fake_point("xdplb", 5000, 0.5),
        _fake_point("iptables-legacy", 5000, 0.01)]}
    v = gate.check(doc, {"ratios": {"xdplb_scale_new_mpps": 1.0, "xdplb_vs_iptables_legacy_new_mpps": 40}})
    assert not v.ok
    assert any(line.startswith("FAIL xdplb_scale_new_mpps") for line in v.lines)
    assert any(line.startswith("ok") and "vs_iptables" in line for line in v.lines)


def _micro_doc(times: dict[str, tuple[float, str, float | None]]) -> dict:
    """A pytest-benchmark document: name -> (median s, reference, reference median s)."""
    out = []
    for name, (median, ref, ref_s) in times.items():
        info = {"reference": ref} | ({"reference_median_s": ref_s} if ref_s is not None else {})
        out.append({"name": name, "stats": {"median": median, "rounds": 100}, "extra_info": info})
    return {"benchmarks": out}


def test_micro_gate_judges_ratios_not_times():
    """bench/microgate.py: a machine 3x slower (or busier) in every absolute
    time passes; the same benchmark 3x slower against its reference in one
    run fails; a ratio against another benchmark and a ceiling work too."""
    from bench import microgate

    here = {"build": (30e-6, "python", 100e-6), "sync": (20e-3, "native", 4e-3),
            "sync_parallel": (12e-3, "sync", None)}
    base = {"benchmarks": {k: {"reference": v["reference"], "ratio": v["ratio"], "tolerance": 1.0}
                           for k, v in microgate.ratios(_micro_doc(here)).items()}}
    base["benchmarks"]["sync_parallel"]["tolerance"] = 4.0 / 0.6 - 1          # the ceiling: 4 x serial
    slow_machine = {k: (m * 3, r, s * 3 if s else None) for k, (m, r, s) in here.items()}
    assert microgate.judge(microgate.ratios(_micro_doc(slow_machine)), base)[0] == []
    regressed = dict(here, build=(90e-6, "python", 100e-6))
    failed, lines = microgate.judge(microgate.ratios(_micro_doc(regressed)), base)
    assert failed == ["build"] and any(line.startswith("FAIL build: 0.9") for line in lines)
    stalled = dict(here, sync_parallel=(100e-3, "sync", None))                  # 5 x serial
    assert microgate.judge(microgate.ratios(_micro_doc(stalled)), base)[0] == ["sync_parallel"]
    busy = dict(here, sync_parallel=(40e-3, "sync", None))                      # 2 x serial: the other core busy
    assert microgate.judge(microgate.ratios(_micro_doc(busy)), base)[0] == []
    missing = {k: v for k, v in here.items() if k != "sync"}                    # its reference gone too
    assert microgate.judge(microgate.ratios(_micro_doc(missing)), base)[0] == ["sync", "sync_parallel"]


def _fake_point(engine: str, n: int, new_mpps: float) -> dict:
    run = {"delivered_mpps": new_mpps, "delivered": 1, "misrouted": 0}
    return {"engine": engine, "services": n, "operations": {"update": {}},
            "targets": {"last": {"new": run, "established": run}}}


def test_trex_generator_fails_clearly_without_a_server():
    from bench import trexrun

    # Nothing outside the machine is contacted: a namespace with only lo.
    with Lab(prefix="xbt") as lab:
        ns = lab.netns("trex")
        with lab.inside(ns), pytest.raises(trexrun.TrexError, match="not reachable"):
            trexrun.check_server("127.0.0.1", timeout=1)
    r = subprocess.run([str(Path(__file__).resolve().parent.parent / ".venv/bin/xdplb"), "bench",
                        "--generator", "trex"], capture_output=True, text=True)
    assert r.returncode == 2 and "--trex-server" in r.stderr


def test_state_floor_keeps_one_entry_per_flow_and_forwards():
    """The state floor (bench/bpf/fwd.c state_main) is the forwarder plus one
    LRU conntrack lookup, and an insert per new flow: what every packet of a
    new flow costs any design that keeps per-flow state."""
    from loader import test_run
    with Forwarder("state_main") as fwd:
        fwd.configure(1, "02:00:00:00:00:01", "02:00:00:00:00:02")   # lo: test-run only
        frames = [bytes(Ether() / IP(src="10.2.0.1", dst="10.96.0.1") / UDP(sport=p, dport=80) / b"x")
                  for p in (1000, 1000, 1001, 1002, 1001)]
        verdicts = [test_run(fwd.prog.fd, f).retval for f in frames]
        assert verdicts == [4] * 5                                    # XDP_REDIRECT
        assert len(fwd.maps["flow_state"].lookup_batch()) == 3


# --------------------------------------------------------------------------
# Katran beside xdplb (bench/versus.py, bench/katran.py). Katran's object is
# the user's build from Katran's tree: CI has none, so the run with it is a
# manual command (README, "Katran's balancer beside xdplb").


def test_without_a_katran_object_the_comparison_has_no_katran_row():
    settings = sweep.Settings(sweep=False, versus=True, versus_rounds=1, versus_seconds=0.3,
                              established_flows=64)
    from bench import versus

    assert versus.plan(settings) == list(versus.XDPLB_ROWS)
    doc = sweep.run(settings)
    assert doc["results"] == [] and not doc["lab_limit"]           # --versus-only: no sweep
    rows = doc["versus"]["rows"]
    assert [r["engine"] for r in rows] == list(versus.XDPLB_ROWS)
    x = rows[0]
    for kind in ("new", "established"):
        assert x[kind]["ns_median"] > 0 and x[kind]["misrouted"] == 0
        assert x[kind]["delivered_share"] > 0.5, x[kind]
    ipip = rows[1]
    assert "skipped" in ipip if not E.dsr_supported() else ipip["new"]["misrouted"] == 0
    assert "| xdplb |" in report.markdown(doc)


@pytest.mark.parametrize("what", ["missing", "not-bpf", "not-katran"])
def test_a_bad_katran_object_is_refused_in_one_line(tmp_path, what):
    path = {"missing": tmp_path / "balancer.bpf.o",
            "not-bpf": Path(__file__),
            "not-katran": Path(sweep.__file__).parent / "bpf" / "sink.o"}[what]
    r = subprocess.run([sys.executable, "-m", "lb.cli", "bench", "--versus-only", "--katran-object", str(path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --katran-object"), r.stderr
    assert {"missing": "no such file", "not-bpf": "not a BPF object",
            "not-katran": "not Katran's balancer (no map vip_map"}[what] in lines[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# The real kube-proxy beside xdplb in Kubernetes mode (bench/kubeproxy_versus.py):
# `make k8s-bins`'s binaries, one real API server, 10 Services.


def test_real_kube_proxy_and_xdplb_follow_one_api_server():
    from bench import kubeproxy_versus as kv

    settings = sweep.Settings(sweep=False, kube_proxy=["iptables", "nftables"], kube_services=[10],
                              kube_changes=12, kube_change_rate=20, seconds=0.3, established_flows=64)
    doc = sweep.run(settings)
    section = doc["kube_proxy"]
    assert section["kubernetes"].startswith("v1.")
    rows = {r["engine"]: r for r in section["rows"]}
    assert list(rows) == ["xdplb-k8s", "kube-proxy-iptables", "kube-proxy-nftables"]
    for name, r in rows.items():
        assert "error" not in r, r.get("error")
        # Read back from the kernel (iptables-save, nft list, the pinned maps):
        # every Service with exactly its endpoints, before and after the changes.
        for when in ("served_before", "served_after"):
            assert r[when] == {"services": 10, "missing": 0, "wrong": 0, "examples": []}, (name, when)
        assert r["ready_s"] > 0
        c = r["changes"]
        assert c["observed"] == 12 and 0 < c["p50_ms"] <= c["p99_ms"], (name, c)
        assert c["kernel_writes"]["count"] >= 1
        for target, kinds in (("last", ("new", "established")), ("random", ("new",))):
            for kind in kinds:
                run = r["targets"][target][kind]
                assert run["delivered"] > 0 and run["misrouted"] == 0, (name, target, kind, run)
    md = report.markdown(doc)
    assert "| kube-proxy nftables | 10 |" in md and "| xdplb (Kubernetes mode) | 10 |" in md
    assert any(t["target"].startswith("#15: API write") for t in kv.targets(section))
    shutil.rmtree(section["workdir"])          # the engines' logs, kept for a look after a real run


@pytest.mark.parametrize("args, message", [
    (["--kube-proxy-only"], "--kube-proxy-only needs --kube-proxy"),
    (["--kube-proxy", "--changes", "0"], "--changes must be ≥ 1"),
])
def test_kube_proxy_options_are_checked_in_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "lb.cli", "bench", *args, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
