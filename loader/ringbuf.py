"""Consume a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF) through libbpf.

    with RingBuffer(maps["events"], on_event, record_type=layouts.struct("flow_event")) as rb:
        while running:
            rb.poll(200)

libbpf mmap()s the ring and calls our callback once per record from inside
ring_buffer__poll(); the record is copied out before the callback returns,
since libbpf releases its space right after. A ring buffer has one consumer
position: two readers of the same map split the records between them.
"""
from __future__ import annotations

import ctypes
import errno
from ctypes import CFUNCTYPE, POINTER, Structure, c_int, c_size_t, c_void_p
from typing import Any, Callable

from . import libbpf as L
from .errors import BpfError, check_errno, error_for, last_errno
from .maps import Map


class RingBufferOpts(Structure):
    _fields_ = [("sz", c_size_t)]


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)

_lib = L.lib
_lib.ring_buffer__new.restype = c_void_p
_lib.ring_buffer__new.argtypes = [c_int, SAMPLE_FN, c_void_p, POINTER(RingBufferOpts)]
_lib.ring_buffer__poll.restype = c_int
_lib.ring_buffer__poll.argtypes = [c_void_p, c_int]
_lib.ring_buffer__consume.restype = c_int
_lib.ring_buffer__consume.argtypes = [c_void_p]
_lib.ring_buffer__epoll_fd.restype = c_int
_lib.ring_buffer__epoll_fd.argtypes = [c_void_p]
_lib.ring_buffer__free.restype = None
_lib.ring_buffer__free.argtypes = [c_void_p]


class RingBuffer:
    """Calls `callback(record)` for each record of a ring buffer map, where
    record is a `record_type` instance (e.g. a struct from the object's BTF)
    or, without one, the raw bytes. A record whose size differs from
    `record_type` raises BpfError: the map was written by another build."""

    def __init__(self, ring: Map | int, callback: Callable[[Any], None],
                 record_type: Any = None):
        fd = ring.fd if isinstance(ring, Map) else int(ring)
        self.name = ring.name if isinstance(ring, Map) else f"fd {fd}"
        if isinstance(ring, Map) and ring.map_type != L.MapType.RINGBUF:
            raise BpfError(f"map {self.name} is not a ring buffer (type {ring.map_type})")
        self.callback = callback
        self.record_type = record_type
        self._size = ctypes.sizeof(record_type) if record_type is not None else None
        self._error: BaseException | None = None
        # libbpf keeps the function pointer: it must live as long as the ring.
        self._cb = SAMPLE_FN(self._on_sample)
        rb = _lib.ring_buffer__new(fd, self._cb, None, ctypes.byref(RingBufferOpts(
            sz=ctypes.sizeof(RingBufferOpts))))
        if not rb:
            raise error_for(last_errno(), f"ring buffer {self.name}: ring_buffer__new")
        self._rb: int | None = rb

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            if self._size is not None:
                if size < self._size:
                    raise BpfError(f"ring buffer {self.name}: record of {size} bytes, expected "
                                   f"{self._size} (the program was built from another maps.h)")
                record = self.record_type.from_buffer_copy(ctypes.string_at(data, self._size))
            else:
                record = ctypes.string_at(data, size)
            self.callback(record)
            return 0
        except BaseException as e:   # never unwind into C: stop polling, re-raise after
            self._error = e
            return -1

    def _rb_ptr(self) -> int:
        if self._rb is None:
            raise BpfError(f"ring buffer {self.name} is closed")
        return self._rb

    def _check(self, rc: int, what: str) -> int:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc < 0 and last_errno(rc) == errno.EINTR:
            return 0                  # a signal: the caller decides whether to go on
        return check_errno(rc, f"ring buffer {self.name}: {what}")

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms for records and consume all that are ready;
        returns how many the callback got."""
        return self._check(_lib.ring_buffer__poll(self._rb_ptr(), int(timeout_ms)), "poll")

    def consume(self) -> int:
        """Consume the records already in the ring, without waiting."""
        return self._check(_lib.ring_buffer__consume(self._rb_ptr()), "consume")

    def fileno(self) -> int:
        """An epoll fd that is readable when records are ready (for select())."""
        return _lib.ring_buffer__epoll_fd(self._rb_ptr())

    def close(self) -> None:
        if self._rb is not None:
            _lib.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

