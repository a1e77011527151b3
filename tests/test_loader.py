"""The loader against the real kernel and the real xdplb.o (run as root)."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pyroute2 import IPRoute, netns

from loader import (BPF_NOEXIST, BpfError, BpfObject, Btf, InterfaceNotFound,
                    Kind, Layouts, Map, MapLayoutMismatch, MapType, VerifierError, XdpLink,
                    XDP_PASS, ctype_for, dtype_for, enable_run_stats, ifindex, ifname, prog_info,
                    test_run, xdp_query)
from loader import libbpf

ROOT = Path(__file__).resolve().parent.parent
OBJ = ROOT / "bpf/xdp/xdplb.o"
PROG = "xdplb_main"
# A broadcast ARP-typed frame: not IPv4, so the program must pass it untouched.
ARP_FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06" + bytes(range(28))

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root (BPF, bpffs, network namespaces)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-C", str(ROOT), "bpf"], check=True, capture_output=True)
    assert OBJ.is_file()


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.from_elf(OBJ)


@pytest.fixture
def obj():
    with BpfObject(OBJ) as o:
        o.load()
        yield o


@pytest.fixture
def pin_dir():
    path = Path("/sys/fs/bpf") / f"xdplb-test-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        assert not path.exists()


def svc_key(layouts: Layouts, vip: int, port: int):
    k = layouts.struct("svc_key")(port=port, proto=6, family=2)
    k.vip[0] = vip
    return k


# ---- BTF and layouts ----------------------------------------------------------

# From maps.h: name -> (type, key_size, value_size, max_entries, flags)
EXPECTED_MAPS = {
    "services": (MapType.HASH, 20, 24, 65536, 1),
    "vips": (MapType.HASH, 20, 4, 65536, 1),
    "backends": (MapType.ARRAY, 4, 32, 262144, 1024),
    "maglev_pool": (MapType.ARRAY, 4, 64, 262144, 1024),
    "conntrack": (MapType.LRU_HASH, 40, 20, 262144, 0),
    "rev_nat": (MapType.LRU_HASH, 40, 48, 262144, 0),
    "reply_index": (MapType.HASH, 20, 32, 262144, 1),
    "svc_keys": (MapType.ARRAY, 4, 20, 65536, 0),
    "identities": (MapType.LPM_TRIE, 24, 4, 65536, 1),
    "policy": (MapType.HASH, 12, 4, 262144, 1),
    "svc_stats": (MapType.PERCPU_ARRAY, 4, 16, 65536, 0),
    "backend_stats": (MapType.PERCPU_ARRAY, 4, 16, 262144, 0),
    "drop_stats": (MapType.PERCPU_ARRAY, 4, 16, 32, 0),
    "drop_detail": (MapType.LRU_PERCPU_HASH, 12, 16, 65536, 0),
    "global_stats": (MapType.PERCPU_ARRAY, 4, 16, 32, 0),
    "config": (MapType.ARRAY, 4, 132, 2, 0),
    "meta": (MapType.ARRAY, 4, 8, 1, 0),
    "tx_ports": (MapType.DEVMAP_HASH, 4, 4, 256, 0),
    "if_macs": (MapType.HASH, 4, 8, 256, 0),
    "probe": (MapType.ARRAY, 4, 28, 1, 0),
    "events": (MapType.RINGBUF, 0, 0, 262144, 0),     # records are struct flow_event
    "monitor_bucket": (MapType.PERCPU_ARRAY, 4, 24, 1, 0),
    "flood_bucket": (MapType.PERCPU_ARRAY, 4, 16, 1, 0),
    "reject_bucket": (MapType.PERCPU_ARRAY, 4, 16, 1, 0),
    "nexthops": (MapType.LRU_PERCPU_HASH, 20, 32, 65536, 0),
    "neigh_requests": (MapType.LRU_HASH, 20, 4, 1024, 0),
    "affinity": (MapType.LRU_HASH, 24, 16, 262144, 0),
    "fib_scratch": (MapType.PERCPU_ARRAY, 4, 64, 1, 0),
    "nat_scratch": (MapType.PERCPU_ARRAY, 4, 48, 1, 0),
    "icmp_scratch": (MapType.PERCPU_ARRAY, 4, 196, 1, 0),
    "icmp_errors": (MapType.PROG_ARRAY, 4, 4, 1, 0),     # values: program ids (__array)
}


def test_btf_map_defs_match_maps_h(btf: Btf) -> None:
    defs = btf.map_defs()
    assert set(defs) == set(EXPECTED_MAPS)
    for name, (mtype, ksize, vsize, entries, flags) in EXPECTED_MAPS.items():
        d = defs[name]
        assert (d.map_type, d.key_size, d.value_size, d.max_entries, d.map_flags) == \
            (mtype, ksize, vsize, entries, flags), name
        if mtype not in (MapType.RINGBUF, MapType.PROG_ARRAY):   # no value type (nor key for a ring)
            assert btf.sizeof(d.key_type_id) == ksize and btf.sizeof(d.value_type_id) == vsize
    assert btf.type(defs["services"].key_type_id).name == "svc_key"
    assert btf.type(defs["backends"].value_type_id).name == "backend"


def test_every_struct_layout_matches_btf_and_bpftool(btf: Btf) -> None:
    structs = [t for t in btf.types if t.kind in (Kind.STRUCT, Kind.UNION)]
    assert len(structs) > 20
    for t in structs:
        c, d = ctype_for(btf, t.id), dtype_for(btf, t.id)
        assert ctypes.sizeof(c) == t.size == d.itemsize, t.name
        for m in t.members:
            if m.name and t.kind == Kind.STRUCT:
                assert getattr(c, m.name).offset == m.bit_offset // 8 == d.fields[m.name][1]
    # Independent decoder: bpftool's view of the same .BTF section.
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed")
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(OBJ)], check=True,
                          capture_output=True, text=True).stdout
    checked, current = 0, None
    for line in dump.splitlines():
        if m := re.match(r"\[(\d+)\] (STRUCT|UNION) '([^']*)' size=(\d+)", line):
            current = btf.type(int(m[1]))
            assert (current.kind.name, current.name or "(anon)", current.size) == \
                (m[2], m[3], int(m[4]))
            members = iter(current.members)
            checked += 1
        elif current and (m := re.match(r"\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)", line)):
            mem = next(members)
            assert (mem.name or "(anon)", mem.type, mem.bit_offset) == (m[1], int(m[2]), int(m[3]))
        elif not line.startswith(("\t", " ")):
            current = None
    assert checked == len(structs)


def test_layout_types(btf: Btf) -> None:
    lay = Layouts(btf)
    key = lay.struct("svc_key")
    assert [f[0] for f in key._fields_] == ["vip", "port", "proto", "family"]
    assert (key.port.offset, key.proto.offset, key.family.offset) == (16, 18, 19)
    assert lay.dtype("flow_key").fields["sport"][1] == 32
    assert lay.dtype("maglev_chunk")["slots"].shape == (16,)
    assert lay.map_key_type("backends") is ctypes.c_uint32
    assert lay.map_value_type("svc_stats") is lay.struct("counter")
    assert ctype_for(btf, btf.find("svc_key")) is key  # cached per type id


def test_enums(btf: Btf) -> None:
    assert btf.enum("drop_reason")["DROP_POLICY"] == 1
    assert btf.enums()["xdplb_counter"]["CNT_MAX"] == 21
    lay = Layouts(btf)
    reason = lay.enum("drop_reason")
    assert reason.DROP_POLICY == 1 and reason(13).name == "DROP_REDIRECT"
    assert lay.constant("MAX_BACKENDS") == 262144
    assert lay.constant("MAGLEV_CHUNK_SLOTS") == 16
    assert lay.constant("FAMILY_IPV6") == 10
    with pytest.raises(KeyError):
        lay.constant("NO_SUCH_CONSTANT")


def test_rodata_vars_come_from_symbol_table(btf: Btf) -> None:
    vars_ = btf.datasec_vars(".rodata")
    assert vars_["dry_run"][:2] == (0, 4)
    assert vars_["btf_anchor"][:2] == (8, 112)  # DATASEC says offset 0 in the .o
    assert btf.type(btf.resolve(vars_["dry_run"][2])).kind == Kind.INT


# ---- object and maps ----------------------------------------------------------------

def test_missing_object_suggests_make(tmp_path: Path) -> None:
    with pytest.raises(BpfError, match="make bpf"):
        BpfObject(tmp_path / "nope.o")
    (tmp_path / "junk.o").write_bytes(b"not an ELF file")
    with pytest.raises(BpfError, match="junk.o is not a BPF object"):
        BpfObject(tmp_path / "junk.o")


def test_loaded_maps_match_kernel_info(obj: BpfObject) -> None:
    assert set(obj.maps) == set(EXPECTED_MAPS)  # .rodata is internal, not listed
    for name, m in obj.maps.items():
        info = m.info()
        mtype, ksize, vsize, entries, flags = EXPECTED_MAPS[name]
        if mtype == MapType.DEVMAP_HASH:
            flags |= libbpf.BPF_F_RDONLY_PROG  # added by the kernel
        assert (info.map_type, info.key_size, info.value_size, info.max_entries,
                info.map_flags) == (mtype, ksize, vsize, entries, flags)
        assert (m.map_type, m.key_size, m.value_size, m.max_entries) == (mtype, ksize, vsize, entries)
        assert info.name == name[:15]
        assert m.memlock() >= 0
    assert obj.maps["backends"].memlock() > 262144 * 32  # preallocated array
    assert obj.program(PROG).id == prog_info(obj.program(PROG).fd).id > 0


def test_hash_map_update_lookup_delete_iterate(obj: BpfObject) -> None:
    lay, svc = obj.layouts, obj.maps["services"]
    value_t = lay.struct("svc_value")
    k = svc_key(lay, 0x0100000A, 80)
    assert svc.lookup(k) is None
    svc.update(k, value_t(svc_id=7, ring_size=13, flags=lay.constant("SVC_F_HAS_POLICY")))
    got = svc.lookup(k)
    assert (got.svc_id, got.ring_size, got.flags) == (7, 13, 1)
    with pytest.raises(BpfError, match="services") as e:
        svc.update(k, value_t(svc_id=8), BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST
    svc.update(bytes(svc_key(lay, 0x0200000A, 443)), bytes(value_t(svc_id=9)))  # raw bytes
    assert sorted(v.svc_id for _, v in svc.items()) == [7, 9]
    assert sorted(k.port for k in svc.keys()) == [80, 443]
    assert svc.delete(k) is True
    assert svc.delete(k) is False
    assert svc.lookup(k) is None
    with pytest.raises(ValueError, match="services"):
        svc.lookup(b"short")


def test_hash_map_batches(obj: BpfObject) -> None:
    lay, svc = obj.layouts, obj.maps["services"]
    n = 1000
    keys = np.zeros(n, dtype=lay.dtype("svc_key"))
    keys["vip"][:, 0] = np.arange(n) + 1
    keys["port"], keys["proto"], keys["family"] = 80, 6, 2
    values = np.zeros(n, dtype=lay.dtype("svc_value"))
    values["svc_id"] = np.arange(n) + 100
    assert svc.update_batch(keys, values) == n
    got = svc.lookup_batch(chunk=64)  # many round trips through the resume token
    assert len(got) == n
    assert {k.vip[0]: v.svc_id for k, v in got} == {i + 1: i + 100 for i in range(n)}
    # ctypes arrays work as well; deleting skips keys that are already gone
    ctypes_keys = (lay.struct("svc_key") * 3)(*(svc_key(lay, vip, 80) for vip in (1, 99999, 2)))
    assert svc.delete_batch(ctypes_keys) == 2
    assert svc.delete_batch(keys) == n - 2
    assert svc.lookup_batch() == []


def test_array_int_keys_and_mmap_view(obj: BpfObject) -> None:
    backends, lay = obj.maps["backends"], obj.layouts
    b = lay.struct("backend")(port=8080, family=2, state=1, gen=3, svc_id=7)
    b.addr[0] = 0x0300000A
    backends.update(42, b)
    view = backends.numpy_view(lay.dtype("backend"))
    assert view.shape == (262144,)
    assert (view[42]["port"], view[42]["gen"], view[42]["addr"][0]) == (8080, 3, 0x0300000A)
    view[43]["svc_id"] = 99          # written through the mapping...
    view[43]["state"] = 2
    got = backends.lookup(43)        # ...read back through the syscall
    assert (got.svc_id, got.state) == (99, 2)
    assert backends.lookup(ctypes.c_uint32(42)) == b
    assert backends.lookup((42).to_bytes(4, sys.byteorder)) == b
    with pytest.raises(BpfError, match="mmap"):
        obj.maps["config"].mmap()    # not BPF_F_MMAPABLE
    chunks = obj.maps["maglev_pool"].numpy_view(lay.dtype("maglev_chunk"))
    chunks[1]["slots"][:] = np.arange(16)
    assert list(obj.maps["maglev_pool"].lookup(1).slots) == list(range(16))


def test_percpu_array(obj: BpfObject) -> None:
    stats, counter = obj.maps["svc_stats"], obj.layouts.struct("counter")
    possible = open("/sys/devices/system/cpu/possible").read().strip()
    ncpus = int(possible.split("-")[-1]) + 1
    assert stats.percpu and stats.ncpus == ncpus
    assert [c.packets for c in stats.lookup(5)] == [0] * ncpus
    stats.update(5, [counter(packets=i + 1, bytes=100 * i) for i in range(ncpus)])
    got = stats.lookup(5)
    assert [(c.packets, c.bytes) for c in got] == [(i + 1, 100 * i) for i in range(ncpus)]
    batch = dict(stats.lookup_batch())
    assert len(batch) == 65536 and [c.packets for c in batch[5]] == list(range(1, ncpus + 1))
    with pytest.raises(ValueError, match="per-CPU"):
        stats.update(5, [counter()] * (ncpus + 1))


def test_lpm_trie_and_devmap_batches(obj: BpfObject) -> None:
    ids, lay = obj.maps["identities"], obj.layouts
    key_t, val_t = lay.struct("identity_key"), lay.struct("identity_value")
    for prefix, ident in ((56, 300), (64, 301)):
        k = key_t(prefixlen=prefix, family=2)
        k.addr[0] = 0x0000000A
        ids.update(k, val_t(identity=ident))
    assert sorted(v.identity for _, v in ids.lookup_batch()) == [300, 301]
    # A devmap hash has no batch op in the kernel (ENOTSUPP): iteration takes over.
    tx = obj.maps["tx_ports"]
    tx.update(1, 1)   # key -> ifindex of lo
    tx.update(7, 1)
    assert sorted(tx.lookup_batch()) == [(1, 1), (7, 1)]


def test_set_max_entries(tmp_path: Path) -> None:
    with BpfObject(OBJ) as o:
        o.set_max_entries("conntrack", 1024)
        o.load()
        assert o.maps["conntrack"].info().max_entries == 1024
        with pytest.raises(BpfError, match="before load"):
            o.set_max_entries("conntrack", 2048)


def test_set_rodata_dry_run(obj: BpfObject) -> None:
    passes = obj.maps["global_stats"]
    cnt_pass = obj.layouts.constant("CNT_PASS")
    assert obj.get_rodata("dry_run") == 0
    test_run(obj.program(PROG).fd, ARP_FRAME)
    assert sum(c.packets for c in passes.lookup(cnt_pass)) == 1
    with BpfObject(OBJ) as dry:
        dry.reuse_map_fd("global_stats", passes.fd)
        dry.set_rodata("dry_run", 1)
        assert dry.get_rodata("dry_run") == 1
        dry.load()
        assert dry.get_rodata("dry_run") == 1  # read back from the kernel's .rodata map
        assert test_run(dry.program(PROG).fd, ARP_FRAME).retval == XDP_PASS
        assert sum(c.packets for c in passes.lookup(cnt_pass)) == 1  # dry run did not count
    with BpfObject(OBJ) as other, pytest.raises(BpfError, match="no .rodata variable"):
        other.set_rodata("nope", 1)


def test_pin_and_reuse(obj: BpfObject, pin_dir: Path) -> None:
    assert sorted(obj.pin_maps(pin_dir)) == sorted(EXPECTED_MAPS)
    with BpfObject(OBJ) as second:
        assert sorted(second.reuse_pinned(pin_dir)) == sorted(EXPECTED_MAPS)
        second.load()
        assert second.pin_maps(pin_dir) == []  # same maps: nothing to pin
        lay = obj.layouts
        k = svc_key(lay, 0x0A0A0A0A, 53)
        obj.maps["services"].update(k, lay.struct("svc_value")(svc_id=42))
        assert second.maps["services"].lookup(k).svc_id == 42
        assert second.maps["services"].info().id == obj.maps["services"].info().id
    with Map.open_pinned(pin_dir / "services", lay.struct("svc_key"),
                         lay.struct("svc_value")) as m:
        assert (m.name, m.max_entries, m.lookup(k).svc_id) == ("services", 65536, 42)


def test_reuse_pinned_layout_mismatch(obj: BpfObject, pin_dir: Path) -> None:
    obj.pin_maps(pin_dir, names=["services", "conntrack"])
    with BpfObject(OBJ) as second:
        second.set_max_entries("services", 1024)
        with pytest.raises(MapLayoutMismatch, match="max_entries") as e:
            second.reuse_pinned(pin_dir)
        assert e.value.map_name == "services"
        assert e.value.diffs == {"max_entries": (65536, 1024)}
    # the program still loads on fresh maps when the pins are not reused
    with BpfObject(OBJ) as third:
        third.set_max_entries("services", 1024)
        third.load()
        with pytest.raises(BpfError, match="different map"):
            third.pin_maps(pin_dir, names=["services"])


# ---- programs --------------------------------------------------------------------------

def test_run_passes_non_ip_frame(obj: BpfObject) -> None:
    r = test_run(obj.program(PROG).fd, ARP_FRAME, repeat=3)
    assert r.retval == XDP_PASS == 2
    assert r.data_out == ARP_FRAME
    assert r.duration_ns >= 0


def test_run_stats(obj: BpfObject) -> None:
    fd = obj.program(PROG).fd
    before = prog_info(fd)
    assert before.name == PROG and before.xlated_prog_len > 0
    assert obj.maps["services"].info().id in before.map_ids
    with enable_run_stats():
        test_run(fd, ARP_FRAME, repeat=10)
    after = prog_info(fd)
    assert after.run_cnt >= before.run_cnt + 10
    assert after.run_time_ns > before.run_time_ns


BROKEN_C = textwrap.dedent("""
    #include <linux/bpf.h>
    #include <bpf/bpf_helpers.h>

    SEC("xdp")
    int broken(struct xdp_md *ctx)
    {
        unsigned char *data = (void *)(long)ctx->data;
        return data[0] == 1 ? XDP_DROP : XDP_PASS;   /* no bounds check */
    }

    char LICENSE[] SEC("license") = "GPL";
""")


def test_verifier_error_has_log_tail(tmp_path: Path) -> None:
    src, out = tmp_path / "broken.c", tmp_path / "broken.o"
    src.write_text(BROKEN_C)
    arch_inc = f"-I/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", arch_inc, "-c", str(src), "-o",
                    str(out)], check=True)
    with BpfObject(out) as o:
        assert o.btf.map_defs() == {}
        with pytest.raises(VerifierError) as e:
            o.load()
    assert e.value.log_tail.strip()
    assert "invalid access to packet" in e.value.log_tail
    assert len(e.value.log_tail.splitlines()) <= 40
    assert e.value.log_tail in str(e.value)
    assert "BEGIN PROG LOAD LOG" in e.value.log  # the whole libbpf output is kept too


def _drop_all_capabilities() -> None:
    # Still uid 0, but with an empty bounding set execve() grants no capability.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for cap in range(64):
        prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly past the last cap


def test_permission_error_without_capabilities() -> None:
    code = ("from loader import BpfObject, BpfPermissionError\n"
            f"o = BpfObject({str(OBJ)!r})\n"
            "try:\n    o.load()\nexcept BpfPermissionError as e:\n    print('PERM', e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, preexec_fn=_drop_all_capabilities,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("PERM"), r.stdout + r.stderr
    assert "CAP_BPF" in r.stdout


# ---- XDP attachment in a throwaway netns -----------------------------------------------

@contextmanager
def veth_netns():
    name = f"xdplbt-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="veth0", kind="veth", peer={"ifname": "veth1"})
            for dev in ("veth0", "veth1"):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
        yield name
    finally:
        netns.remove(name)


@contextmanager
def inside(name: str):
    """Move this thread into netns `name` (bpf link and netlink resolve ifindexes there)."""
    saved = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        yield
    finally:
        netns.setns(saved)
        os.close(saved)


def test_netlink_lookups() -> None:
    with veth_netns() as ns:
        idx = ifindex("veth0", netns=ns)
        assert idx > 1 and ifname(idx, netns=ns) == "veth0"
        with pytest.raises(InterfaceNotFound, match=f"nope.*{ns}"):
            ifindex("nope", netns=ns)
        with pytest.raises(InterfaceNotFound, match="does not exist"):
            ifindex("veth0", netns=ns + "-missing")
        assert not os.path.exists(f"/var/run/netns/{ns}-missing")
    assert ifindex("lo") == 1


def test_xdp_link_native_pin_update_detach(obj: BpfObject, pin_dir: Path) -> None:
    prog = obj.program(PROG)
    with veth_netns() as ns, inside(ns):
        idx = ifindex("veth0")
        link = XdpLink.attach(prog.fd, idx, mode="native", ifname="veth0")
        try:
            assert xdp_query(idx) == prog.id
            assert xdp_query(idx, "native") == prog.id
            info = link.info()
            assert (info.ifindex, info.prog_id) == (idx, prog.id)
            with pytest.raises(BpfError, match="already attached to interface veth0"):
                XdpLink.attach(prog.fd, idx, mode="native")
            pin_dir.mkdir()
            link.pin(pin_dir / "link")
        finally:
            link.close()
        assert xdp_query(idx) == prog.id  # the pin keeps it attached
        with XdpLink.from_pin(pin_dir / "link") as again:
            assert again.info().id == info.id and again.ifname == "veth0"
            again.update(prog.fd)
            assert again.info().prog_id == prog.id
            r = test_run(prog.fd, ARP_FRAME, ingress_ifindex=idx, rx_queue_index=0)
            assert (r.retval, r.data_out) == (XDP_PASS, ARP_FRAME)
            again.detach()
            assert xdp_query(idx) is None
            assert again.info().ifindex == 0


def test_xdp_link_generic_and_missing_interface(obj: BpfObject) -> None:
    prog = obj.program(PROG)
    with veth_netns() as ns, inside(ns):
        idx = ifindex("veth1")
        with XdpLink.attach(prog.fd, idx, mode="generic") as link:
            assert xdp_query(idx, "generic") == prog.id
            assert link.info().prog_id == prog.id
        assert xdp_query(idx) is None  # closing the only fd detaches
        with pytest.raises(InterfaceNotFound, match="9999"):
            XdpLink.attach(prog.fd, 9999, mode="native")
        with pytest.raises(ValueError, match="generic"):
            XdpLink.attach(prog.fd, idx, mode="offload")


def test_native_mode_unsupported_is_an_error_not_a_fallback(obj: BpfObject) -> None:
    prog = obj.program(PROG)
    with veth_netns() as ns, inside(ns):
        idx = ifindex("lo")  # loopback has no driver XDP support
        with pytest.raises(BpfError, match="native XDP is not supported on interface lo.*"
                                           "xdp_mode: generic"):
            XdpLink.attach(prog.fd, idx, mode="native")
        assert xdp_query(idx) is None
