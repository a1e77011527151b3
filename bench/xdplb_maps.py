"""A running xdplb seen from outside: its pinned maps, read from their pins
(what `iptables-save` is to kube-proxy), and the Kubernetes mode's record
of applied batches. Shared by the tests and the bench."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import numpy as np

from lb.dataplane import Constants, _struct_of, default_object_path
from loader import BpfObject, Map


def open_pinned_maps(bpffs: str) -> dict[str, Map]:
    """The daemon's maps, opened from their pins with types from BTF."""
    obj = BpfObject(default_object_path())
    try:
        maps = {}
        for p in sorted((Path(bpffs) / "maps").iterdir()):
            maps[p.name] = Map.open_pinned(p, obj.layouts.map_key_type(p.name),
                                           obj.layouts.map_value_type(p.name), name=p.name)
        return maps
    finally:
        obj.close()


def map_state(bpffs: str) -> dict[tuple[str, int, str], set[tuple[str, int, str]]]:
    """(vip, port, proto) -> {(backend, port, active|draining)}, read from
    the pinned maps themselves (not from the daemon)."""
    obj = BpfObject(default_object_path())
    maps = open_pinned_maps(bpffs)
    try:
        c = Constants(obj.btf.enums())
        bm = maps["backends"]
        dt = obj.layouts.dtype(_struct_of(obj, "backends"))
        view = np.frombuffer(bm.mmap(writable=False), dtype=dt, count=bm.max_entries)
        used = np.nonzero(view["state"] != c.BACKEND_FREE)[0]
        by_svc: dict[int, set] = {}
        for bid in used:
            rec = view[bid]
            addr = str(IPv4Address(int(np.uint32(rec["addr"][0]).byteswap())))
            port = int(np.uint16(rec["port"]).byteswap())
            state = "active" if rec["state"] == c.BACKEND_ACTIVE else "draining"
            by_svc.setdefault(int(rec["svc_id"]), set()).add((addr, port, state))
        out = {}
        proto = {6: "tcp", 17: "udp"}
        for k, v in maps["services"].lookup_batch():
            vip = str(IPv4Address(int(np.uint32(k.vip[0]).byteswap())))
            port = int(np.uint16(k.port).byteswap())
            out[(vip, port, proto[k.proto])] = by_svc.get(v.svc_id, set())
        del view
        return out
    finally:
        for m in maps.values():
            m.close()
        obj.close()


def applied_at(applied: list, kind: str, rv: int) -> int | None:
    """When the daemon's maps first held resourceVersion `rv` of `kind`
    (`xdplb kubernetes`'s `applied`: (CLOCK_MONOTONIC ns, {kind: highest
    rv}) per batch; events of one kind arrive in order, so the first batch
    whose highest rv is >= rv has it)."""
    for t, rvs in applied:
        if rvs.get(kind, 0) >= rv:
            return t
    return None
