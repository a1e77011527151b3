"""Read the per-CPU counters and sum them over CPUs."""

from __future__ import annotations

from typing import Any

from loader.stats import prog_info

from .dataplane import Dataplane
from .metrics import counter_sums
from .reconcile import forwarding_name


def _sum(values) -> tuple[int, int]:
    return sum(v.packets for v in values), sum(v.bytes for v in values)


def _counter_table(dp: Dataplane, name: str, ids) -> dict[int, tuple[int, int]]:
    """Counters of `ids`, read in batches up to the highest id (one
    syscall per chunk, not one lookup per id: 220k ids at 20k services)."""
    ids = list(ids)
    if not ids:
        return {}
    sums = counter_sums(dp.maps[name], dp.obj.layouts.dtype("counter"), max(ids) + 1)
    return {i: (int(sums[i, 0]), int(sums[i, 1])) for i in ids}


def collect(dp: Dataplane, rec) -> dict[str, Any]:
    """Counters per service, per backend, per drop reason and per
    (identity, service, reason), plus the global verdict counters."""
    c = dp.consts
    maps = dp.maps
    reasons = c.names("drop_reason")
    counters = c.names("xdplb_counter")
    identity_names = {v: k for k, v in rec.identity_ids().items()}
    identity_names[c.IDENTITY_WORLD] = "world"
    identity_names[c.IDENTITY_UNKNOWN] = "-"
    by_id = {s.svc_id: s for s in rec.services.values()}

    svc_counts = _counter_table(dp, "svc_stats", by_id)
    bstats = _counter_table(dp, "backend_stats", [b.id for s in by_id.values() for b in s.backends.values()])
    services = []
    for svc_id, live in sorted(by_id.items()):
        vip, port, proto = live.key
        pk, by = svc_counts[svc_id]
        backends = []
        for b in sorted(live.backends.values(), key=lambda b: (b.address, b.port)):
            bp, bb = bstats[b.id]
            backends.append({"address": str(b.address), "port": b.port, "id": b.id,
                             "state": c.names("backend_state")[b.state].removeprefix("BACKEND_").lower(),
                             "packets": bp, "bytes": bb})
        services.append({"name": live.name, "vip": str(vip), "port": port, "protocol": proto,
                         "forwarding": forwarding_name(live.flags, c), "svc_id": svc_id, "packets": pk, "bytes": by, "backends": backends})

    drops = {}
    for r, name in reasons.items():
        if name in ("DROP_NONE", "DROP_REASON_MAX"):
            continue
        p, b = _sum(maps["drop_stats"].lookup(r))
        drops[name.removeprefix("DROP_").lower()] = {"packets": p, "bytes": b}

    detail = []
    for key, values in maps["drop_detail"].items():
        p, b = _sum(values)
        svc = by_id.get(key.svc_id)
        detail.append({"identity": identity_names.get(key.identity, str(key.identity)),
                       "identity_id": key.identity,
                       "service": svc.name if svc else None, "svc_id": key.svc_id,
                       "reason": reasons.get(int(key.reason), str(key.reason)).removeprefix("DROP_").lower(),
                       "packets": p, "bytes": b})
    detail.sort(key=lambda d: (-d["packets"], d["identity"], d["reason"]))

    glob = {}
    for i, name in counters.items():
        if name == "CNT_MAX":
            continue
        p, b = _sum(maps["global_stats"].lookup(i))
        glob[name.removeprefix("CNT_").lower()] = {"packets": p, "bytes": b}

    info = prog_info(dp.prog.fd)
    return {"services": services, "drops": drops, "drop_detail": detail, "global": glob,
            "program": {"id": info.id, "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns,
                        "ns_per_packet": (info.run_time_ns / info.run_cnt) if info.run_cnt else None}}
