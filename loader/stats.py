"""Program introspection and the kernel's run-time statistics."""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from . import libbpf as L
from .errors import check_errno


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    prog_type: int
    tag: str
    run_time_ns: int       # only counted while run stats are enabled
    run_cnt: int
    recursion_misses: int
    xlated_prog_len: int
    jited_prog_len: int
    verified_insns: int
    map_ids: tuple[int, ...]


def prog_info(fd: int) -> ProgInfo:
    # First call learns how many maps the program uses, the second fetches their ids.
    nr = L.obj_info(fd, L.BpfProgInfo()).nr_map_ids
    ids = (ctypes.c_uint32 * max(nr, 1))()
    i = L.obj_info(fd, L.BpfProgInfo(nr_map_ids=nr, map_ids=ctypes.addressof(ids)))
    return ProgInfo(i.id, i.name.decode(), i.type, bytes(i.tag).hex(), i.run_time_ns, i.run_cnt,
                    i.recursion_misses, i.xlated_prog_len, i.jited_prog_len, i.verified_insns,
                    tuple(ids[:min(nr, i.nr_map_ids)]))


@contextmanager
def enable_run_stats() -> Iterator[None]:
    """Count run_cnt/run_time_ns for all programs while the block runs (the
    kernel keeps stats on as long as the returned fd is open; it costs a
    little per packet, so it is off by default)."""
    fd = check_errno(L.lib.bpf_enable_stats(L.BPF_STATS_RUN_TIME), "bpf_enable_stats(RUN_TIME)")
    try:
        yield
    finally:
        os.close(fd)
