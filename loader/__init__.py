"""xdplb loader: a small ctypes binding of libbpf plus a BTF reader.

    from loader import BpfObject, XdpLink
    with BpfObject("bpf/xdp/xdplb.o") as obj:
        obj.load()
        obj.maps["services"].update(key, value)
"""
from .btf import Btf, Kind, MapDef
from .errors import (BpfError, BpfPermissionError, InterfaceNotFound, MapLayoutMismatch,
                     VerifierError, check_errno)
from .layout import Layouts, ctype_for, dtype_for
from .libbpf import (BPF_ANY, BPF_EXIST, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
                     BPF_F_TEST_XDP_LIVE_FRAMES, BPF_NOEXIST, XDP_ABORTED, XDP_DROP, XDP_PASS,
                     XDP_REDIRECT, XDP_TX, MapType)
from .maps import Map, MapInfo
from .netlink import ifindex, ifname
from .object import BpfObject, Program
from .ringbuf import RingBuffer
from .stats import ProgInfo, enable_run_stats, prog_info
from .testrun import TestRunResult, test_run
from .xdp import LinkInfo, XdpLink, xdp_query

__all__ = [
    "BPF_ANY", "BPF_EXIST", "BPF_F_MMAPABLE", "BPF_F_NO_PREALLOC", "BPF_F_TEST_XDP_LIVE_FRAMES",
    "BPF_NOEXIST", "BpfError", "BpfObject", "BpfPermissionError", "Btf", "InterfaceNotFound",
    "Kind", "Layouts", "LinkInfo", "Map", "MapDef", "MapInfo", "MapLayoutMismatch", "MapType",
    "ProgInfo", "Program", "RingBuffer", "TestRunResult", "VerifierError", "XDP_ABORTED", "XDP_DROP",
    "XDP_PASS", "XDP_REDIRECT", "XDP_TX", "XdpLink", "check_errno", "ctype_for", "dtype_for",
    "enable_run_stats", "ifindex", "ifname", "prog_info", "test_run", "xdp_query",
]
