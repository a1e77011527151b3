"""Raw ctypes binding of the parts of libbpf 1.1 the loader uses.

Layouts of the opts/info structs are copied from /usr/include/bpf/bpf.h,
libbpf.h and linux/bpf.h; every opts struct carries its own `sz` so libbpf
can tell which fields we know about.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char, c_char_p, c_int, c_size_t,
                    c_uint8, c_uint32, c_uint64, c_void_p, sizeof)
from enum import IntEnum

log = logging.getLogger(__name__)

lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
libc = ctypes.CDLL("libc.so.6", use_errno=True)

# ---- constants -------------------------------------------------------------


class MapType(IntEnum):
    """enum bpf_map_type, in header order."""
    (HASH, ARRAY, PROG_ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY, STACK_TRACE,
     CGROUP_ARRAY, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, ARRAY_OF_MAPS, HASH_OF_MAPS, DEVMAP,
     SOCKMAP, CPUMAP, XSKMAP, SOCKHASH, CGROUP_STORAGE, REUSEPORT_SOCKARRAY,
     PERCPU_CGROUP_STORAGE, QUEUE, STACK, SK_STORAGE, DEVMAP_HASH, STRUCT_OPS, RINGBUF,
     INODE_STORAGE, TASK_STORAGE, BLOOM_FILTER, USER_RINGBUF, CGRP_STORAGE) = range(1, 33)


PERCPU_MAP_TYPES = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY,
                              MapType.LRU_PERCPU_HASH, MapType.PERCPU_CGROUP_STORAGE})

BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4
BPF_F_NO_PREALLOC = 1
BPF_F_RDONLY_PROG = 128
BPF_F_MMAPABLE = 1024
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_FLAGS_HW_MODE = 8
BPF_F_TEST_XDP_LIVE_FRAMES = 2
BPF_XDP = 37                 # enum bpf_attach_type
BPF_STATS_RUN_TIME = 0       # enum bpf_stats_type
BPF_OBJ_NAME_LEN = 16
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

# ---- structs ---------------------------------------------------------------


class BpfMapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfTestRunOpts(Structure):
    _fields_ = [("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
                ("data_size_in", c_uint32), ("data_size_out", c_uint32),
                ("ctx_in", c_void_p), ("ctx_out", c_void_p),
                ("ctx_size_in", c_uint32), ("ctx_size_out", c_uint32),
                ("retval", c_uint32), ("repeat", c_int), ("duration", c_uint32),
                ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32)]


class BpfLinkCreateOpts(Structure):
    # The trailing union (perf_event/kprobe_multi/tracing) is unused for XDP;
    # it is kept as opaque words so that sz matches the header.
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("iter_info", c_void_p),
                ("iter_info_len", c_uint32), ("target_btf_id", c_uint32),
                ("_union", c_uint64 * 4)]


class BpfLinkUpdateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class XdpMd(Structure):
    _fields_ = [("data", c_uint32), ("data_end", c_uint32), ("data_meta", c_uint32),
                ("ingress_ifindex", c_uint32), ("rx_queue_index", c_uint32),
                ("egress_ifindex", c_uint32)]


class BpfMapInfo(Structure):
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32),
                ("value_size", c_uint32), ("max_entries", c_uint32), ("map_flags", c_uint32),
                ("name", c_char * BPF_OBJ_NAME_LEN), ("ifindex", c_uint32),
                ("btf_vmlinux_value_type_id", c_uint32), ("netns_dev", c_uint64),
                ("netns_ino", c_uint64), ("btf_id", c_uint32), ("btf_key_type_id", c_uint32),
                ("btf_value_type_id", c_uint32), ("_pad", c_uint32), ("map_extra", c_uint64)]


class BpfProgInfo(Structure):
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("tag", c_uint8 * 8),
                ("jited_prog_len", c_uint32), ("xlated_prog_len", c_uint32),
                ("jited_prog_insns", c_uint64), ("xlated_prog_insns", c_uint64),
                ("load_time", c_uint64), ("created_by_uid", c_uint32), ("nr_map_ids", c_uint32),
                ("map_ids", c_uint64), ("name", c_char * BPF_OBJ_NAME_LEN),
                ("ifindex", c_uint32), ("gpl_compatible", c_uint32),  # bitfield :1 + pad
                ("netns_dev", c_uint64), ("netns_ino", c_uint64),
                ("nr_jited_ksyms", c_uint32), ("nr_jited_func_lens", c_uint32),
                ("jited_ksyms", c_uint64), ("jited_func_lens", c_uint64),
                ("btf_id", c_uint32), ("func_info_rec_size", c_uint32), ("func_info", c_uint64),
                ("nr_func_info", c_uint32), ("nr_line_info", c_uint32),
                ("line_info", c_uint64), ("jited_line_info", c_uint64),
                ("nr_jited_line_info", c_uint32), ("line_info_rec_size", c_uint32),
                ("jited_line_info_rec_size", c_uint32), ("nr_prog_tags", c_uint32),
                ("prog_tags", c_uint64), ("run_time_ns", c_uint64), ("run_cnt", c_uint64),
                ("recursion_misses", c_uint64), ("verified_insns", c_uint32),
                ("attach_btf_obj_id", c_uint32), ("attach_btf_id", c_uint32),
                ("_pad", c_uint32)]


class BpfLinkInfo(Structure):
    # Only the xdp member of the per-type union is named; the kernel copies
    # min(our size, its size), so the tail just has to be large enough.
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("prog_id", c_uint32),
                ("_pad", c_uint32), ("xdp_ifindex", c_uint32), ("_union", c_uint8 * 60)]


def opts(cls: type[Structure], **fields) -> Structure:
    """An opts struct with `sz` filled in."""
    return cls(sz=sizeof(cls), **fields)


# ---- functions -------------------------------------------------------------

_PROTOS: dict[str, tuple] = {
    "libbpf_num_possible_cpus": (c_int,),
    "bpf_object__open_file": (c_void_p, c_char_p, c_void_p),
    "bpf_object__load": (c_int, c_void_p),
    "bpf_object__close": (None, c_void_p),
    "bpf_object__next_map": (c_void_p, c_void_p, c_void_p),
    "bpf_object__next_program": (c_void_p, c_void_p, c_void_p),
    "bpf_object__find_program_by_name": (c_void_p, c_void_p, c_char_p),
    "bpf_program__fd": (c_int, c_void_p),
    "bpf_program__name": (c_char_p, c_void_p),
    "bpf_map__name": (c_char_p, c_void_p),
    "bpf_map__fd": (c_int, c_void_p),
    "bpf_map__type": (c_int, c_void_p),
    "bpf_map__key_size": (c_uint32, c_void_p),
    "bpf_map__value_size": (c_uint32, c_void_p),
    "bpf_map__max_entries": (c_uint32, c_void_p),
    "bpf_map__map_flags": (c_uint32, c_void_p),
    "bpf_map__is_internal": (c_bool, c_void_p),
    "bpf_map__set_max_entries": (c_int, c_void_p, c_uint32),
    "bpf_map__initial_value": (c_void_p, c_void_p, POINTER(c_size_t)),
    "bpf_map__set_initial_value": (c_int, c_void_p, c_void_p, c_size_t),
    "bpf_map__reuse_fd": (c_int, c_void_p, c_int),
    "bpf_map_lookup_elem": (c_int, c_int, c_void_p, c_void_p),
    "bpf_map_update_elem": (c_int, c_int, c_void_p, c_void_p, c_uint64),
    "bpf_map_delete_elem": (c_int, c_int, c_void_p),
    "bpf_map_get_next_key": (c_int, c_int, c_void_p, c_void_p),
    "bpf_map_lookup_batch": (c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                             POINTER(c_uint32), POINTER(BpfMapBatchOpts)),
    "bpf_map_update_batch": (c_int, c_int, c_void_p, c_void_p, POINTER(c_uint32),
                             POINTER(BpfMapBatchOpts)),
    "bpf_map_delete_batch": (c_int, c_int, c_void_p, POINTER(c_uint32),
                             POINTER(BpfMapBatchOpts)),
    "bpf_obj_pin": (c_int, c_int, c_char_p),
    "bpf_obj_get": (c_int, c_char_p),
    "bpf_obj_get_info_by_fd": (c_int, c_int, c_void_p, POINTER(c_uint32)),
    "bpf_link_create": (c_int, c_int, c_int, c_int, POINTER(BpfLinkCreateOpts)),
    "bpf_link_update": (c_int, c_int, c_int, POINTER(BpfLinkUpdateOpts)),
    "bpf_link_detach": (c_int, c_int),
    "bpf_xdp_query_id": (c_int, c_int, c_int, POINTER(c_uint32)),
    "bpf_prog_test_run_opts": (c_int, c_int, POINTER(BpfTestRunOpts)),
    "bpf_enable_stats": (c_int, c_int),
}
for _name, (_res, *_args) in _PROTOS.items():
    _fn = getattr(lib, _name)
    _fn.restype, _fn.argtypes = _res, _args

libc.vsnprintf.restype = c_int
libc.vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]


def num_possible_cpus() -> int:
    n = lib.libbpf_num_possible_cpus()
    if n <= 0:
        raise OSError(-n, "libbpf_num_possible_cpus failed")
    return n


def obj_info(fd: int, info: Structure) -> Structure:
    """Fill a bpf_{map,prog,link}_info struct for fd (bpf_obj_get_info_by_fd)."""
    from .errors import check_errno
    size = c_uint32(sizeof(info))
    check_errno(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
                f"bpf_obj_get_info_by_fd({fd})")
    return info


# ---- libbpf log capture ----------------------------------------------------
# libbpf reports everything (including the verifier log of a failed load)
# through its print callback. We format each message with libc's vsnprintf
# and keep it per thread, so a failed load can quote the log tail.

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_VA_LIST_TAG_SIZE = 24          # x86_64 SysV: va_list is a pointer to one 24-byte tag
_MAX_KEEP = 4 << 20             # keep at most this many characters of log per thread
_tls = threading.local()


def _format(fmt: bytes, ap: int) -> str:
    if platform.machine() == "x86_64":
        # vsnprintf consumes the va_list: measure on a copy (what va_copy does
        # on x86_64), then format the original into a buffer of the right size.
        copy = (c_char * _VA_LIST_TAG_SIZE)()
        ctypes.memmove(copy, ap, _VA_LIST_TAG_SIZE)
        size = libc.vsnprintf(None, 0, fmt, ctypes.addressof(copy)) + 1
    else:
        size = 1 << 20
    buf = ctypes.create_string_buffer(size)
    libc.vsnprintf(buf, size, fmt, ap)
    return buf.value.decode(errors="replace")


def _on_print(level: int, fmt: bytes, ap: int) -> int:
    try:
        text = _format(fmt, ap)
        parts: list[str] = _tls.__dict__.setdefault("parts", [])
        parts.append(text)
        _tls.size = getattr(_tls, "size", 0) + len(text)
        while _tls.size > _MAX_KEEP and len(parts) > 1:
            _tls.size -= len(parts.pop(0))
        log.debug("libbpf[%d]: %s", level, text.rstrip())
    except Exception:  # never let an exception unwind into C
        pass
    return 0


_print_cb = _PRINT_FN(_on_print)    # module-level: must outlive every libbpf call
lib.libbpf_set_print.restype = _PRINT_FN
lib.libbpf_set_print.argtypes = [_PRINT_FN]
lib.libbpf_set_print(_print_cb)


def log_reset() -> None:
    _tls.parts, _tls.size = [], 0


def log_text() -> str:
    """Everything libbpf printed in this thread since the last log_reset()."""
    return "".join(getattr(_tls, "parts", []))


def log_tail(lines: int = 40) -> str:
    """The last lines of the verifier log if there is one, else of the libbpf log."""
    text = log_text()
    begin, end = text.rfind("-- BEGIN PROG LOAD LOG --"), text.rfind("-- END PROG LOAD LOG --")
    if begin >= 0 and end > begin:
        text = text[text.index("\n", begin) + 1:end]
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])
