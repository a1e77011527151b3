"""A BPF map behind a file descriptor, with typed keys and values."""
from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import libbpf as L
from .errors import ENOTSUPP, BpfError, check_errno, error_for, last_errno


@dataclass(frozen=True)
class MapInfo:
    id: int
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def map_info(fd: int) -> MapInfo:
    i = L.obj_info(fd, L.BpfMapInfo())
    return MapInfo(i.id, i.name.decode(), i.type, i.key_size, i.value_size, i.max_entries,
                   i.map_flags)


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _as_ctype(obj: Any, size: int, ctype: Any, what: str) -> Any:
    """ctypes instance / bytes-like / int / numpy record -> a ctypes object of `size` bytes."""
    if isinstance(obj, ctypes._SimpleCData | ctypes.Structure | ctypes.Union | ctypes.Array):
        data = obj
    elif isinstance(obj, int) and not isinstance(obj, bool):
        if ctypes.sizeof(ctype) == size and issubclass(ctype, ctypes._SimpleCData):
            return ctype(obj)
        if size not in (1, 2, 4, 8):
            raise TypeError(f"{what}: an int only fits a 1/2/4/8-byte field, not {size} bytes")
        data = obj.to_bytes(size, sys.byteorder, signed=obj < 0)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
    elif hasattr(obj, "tobytes"):  # numpy scalar/record/array
        data = obj.tobytes()
    else:
        raise TypeError(f"{what}: expected a ctypes object, bytes or int, got {type(obj).__name__}")
    n = ctypes.sizeof(data) if not isinstance(data, bytes) else len(data)
    if n != size:
        raise ValueError(f"{what}: is {n} bytes, the map wants {size}")
    return data if not isinstance(data, bytes) else (ctypes.c_char * size).from_buffer_copy(data)


def _plain(obj: Any) -> Any:
    """Simple ctypes scalars come back as Python ints; records stay ctypes."""
    return obj.value if isinstance(obj, ctypes._SimpleCData) else obj


def _batch_buffer(obj: Any, item_size: int, what: str) -> tuple[int, int]:
    """(address, count) of a ctypes array or contiguous numpy array of items."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError(f"{what}: numpy array must be C-contiguous")
        count, nbytes, addr = len(obj), obj.nbytes, obj.ctypes.data
    elif isinstance(obj, ctypes.Array):
        count, nbytes, addr = len(obj), ctypes.sizeof(obj), ctypes.addressof(obj)
    else:
        raise TypeError(f"{what}: expected a ctypes array or numpy array, got {type(obj).__name__}")
    if nbytes != count * item_size:
        raise ValueError(f"{what}: {nbytes} bytes for {count} items of {item_size} bytes")
    return addr, count


class Map:
    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, map_flags: int, key_type: Any = None, value_type: Any = None):
        """Takes ownership of fd."""
        self.fd, self.name = fd, name
        self.map_type, self.key_size, self.value_size = map_type, key_size, value_size
        self.max_entries, self.map_flags = max_entries, map_flags
        self.key_type = key_type or (ctypes.c_uint32 if key_size == 4 else ctypes.c_uint8 * key_size)
        self.value_type = value_type or ctypes.c_uint8 * value_size
        for kind, t, size in (("key", self.key_type, key_size), ("value", self.value_type, value_size)):
            if ctypes.sizeof(t) != size:
                raise BpfError(f"map {name}: {kind} type {t.__name__} is {ctypes.sizeof(t)} "
                               f"bytes, the map has {size}")
        self.percpu = map_type in L.PERCPU_MAP_TYPES
        self.ncpus = L.num_possible_cpus() if self.percpu else 1
        # Per-CPU values are copied as ncpus slots of value_size rounded up to 8.
        self._stride = _round8(value_size) if self.percpu else value_size
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def from_fd(cls, fd: int, key_type: Any = None, value_type: Any = None,
                name: str | None = None) -> Map:
        i = map_info(fd)
        return cls(fd, name or i.name, i.map_type, i.key_size, i.value_size, i.max_entries,
                   i.map_flags, key_type, value_type)

    @classmethod
    def open_pinned(cls, path: str | Path, key_type: Any = None, value_type: Any = None,
                    name: str | None = None) -> Map:
        fd = check_errno(L.lib.bpf_obj_get(os.fsencode(path)), f"open pinned map {path}")
        try:
            return cls.from_fd(fd, key_type, value_type, name)
        except BaseException:
            os.close(fd)
            raise

    def __repr__(self) -> str:
        return (f"<Map {self.name} type={self.map_type} key={self.key_size} "
                f"value={self.value_size} max_entries={self.max_entries} fd={self.fd}>")

    # ---- conversions -------------------------------------------------------

    def _key(self, key: Any) -> Any:
        return _as_ctype(key, self.key_size, self.key_type, f"map {self.name}: key")

    def _value_buf(self) -> Any:
        return (ctypes.c_char * (self._stride * self.ncpus))()

    def _decode_value(self, buf: Any, offset: int = 0) -> Any:
        if not self.percpu:
            return _plain(self.value_type.from_buffer_copy(buf, offset))
        return [_plain(self.value_type.from_buffer_copy(buf, offset + i * self._stride))
                for i in range(self.ncpus)]

    def _encode_value(self, value: Any) -> Any:
        what = f"map {self.name}: value"
        if not self.percpu:
            return _as_ctype(value, self.value_size, self.value_type, what)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * self.ncpus
        if len(values) != self.ncpus:
            raise ValueError(f"{what}: per-CPU map needs {self.ncpus} values, got {len(values)}")
        buf = self._value_buf()
        for i, v in enumerate(values):
            ctypes.memmove(ctypes.addressof(buf) + i * self._stride,
                           ctypes.addressof(_as_ctype(v, self.value_size, self.value_type, what)),
                           self.value_size)
        return buf

    def _err(self, rc: int, op: str) -> int:
        return check_errno(rc, f"map {self.name}: {op}")

    # ---- single elements ---------------------------------------------------

    def lookup(self, key: Any) -> Any | None:
        """The value (a list of ncpus values for per-CPU maps), or None."""
        buf = self._value_buf()
        rc = L.lib.bpf_map_lookup_elem(self.fd, ctypes.byref(self._key(key)), buf)
        if rc < 0 and last_errno(rc) == errno.ENOENT:
            return None
        self._err(rc, "lookup")
        return self._decode_value(buf)

    def update(self, key: Any, value: Any, flags: int = L.BPF_ANY) -> None:
        """Per-CPU maps take a list of ncpus values, or one value for every CPU."""
        k, v = self._key(key), self._encode_value(value)
        self._err(L.lib.bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), flags),
                  "update")

    def delete(self, key: Any) -> bool:
        rc = L.lib.bpf_map_delete_elem(self.fd, ctypes.byref(self._key(key)))
        if rc < 0 and last_errno(rc) == errno.ENOENT:
            return False
        self._err(rc, "delete")
        return True

    def keys(self) -> Iterator[Any]:
        if self.map_type in (L.MapType.RINGBUF, L.MapType.USER_RINGBUF):
            return          # records are consumed (loader.ringbuf), not looked up by key
        prev, cur = self.key_type(), self.key_type()
        prev_ref = None  # NULL: start from the first key
        while True:
            rc = L.lib.bpf_map_get_next_key(self.fd, prev_ref, ctypes.byref(cur))
            if rc < 0 and last_errno(rc) == errno.ENOENT:
                return
            self._err(rc, "get_next_key")
            yield _plain(self.key_type.from_buffer_copy(cur))
            prev, cur = cur, prev
            prev_ref = ctypes.byref(prev)

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted while we iterated
                yield k, v

    # ---- batches -----------------------------------------------------------

    def lookup_batch(self, chunk: int = 4096) -> list[tuple[Any, Any]]:
        """All entries via BPF_MAP_LOOKUP_BATCH; falls back to iteration for
        map types without batch support (e.g. LPM tries)."""
        chunk = max(1, min(chunk, self.max_entries))
        vsize = self._stride * self.ncpus
        # The kernel's resume token: out_batch of one call is in_batch of the next.
        tokens = [(ctypes.c_char * max(self.key_size, 8))() for _ in range(2)]
        token_in: Any = None
        out: list[tuple[Any, Any]] = []
        opts = L.opts(L.BpfMapBatchOpts)
        while True:
            keys = (ctypes.c_char * (self.key_size * chunk))()
            values = (ctypes.c_char * (vsize * chunk))()
            count = ctypes.c_uint32(chunk)
            token_out = tokens[0] if token_in is not tokens[0] else tokens[1]
            rc = L.lib.bpf_map_lookup_batch(self.fd, token_in, token_out, keys, values,
                                            ctypes.byref(count), ctypes.byref(opts))
            err = last_errno(rc) if rc < 0 else 0
            if err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP) and token_in is None:
                return list(self.items())
            if err == errno.ENOSPC:  # one hash bucket holds more than `chunk` entries
                chunk *= 2
                continue
            if err and err != errno.ENOENT:
                raise error_for(err, f"map {self.name}: lookup_batch")
            out.extend((_plain(self.key_type.from_buffer_copy(keys, i * self.key_size)),
                        self._decode_value(values, i * vsize)) for i in range(count.value))
            if err == errno.ENOENT:  # no more entries
                return out
            token_in = token_out

    def update_batch(self, keys: Any, values: Any, elem_flags: int = 0) -> int:
        """keys/values: ctypes arrays or C-contiguous numpy arrays of equal length.
        For per-CPU maps each value item holds ncpus slots (8-byte aligned)."""
        kaddr, n = _batch_buffer(keys, self.key_size, f"map {self.name}: keys")
        vaddr, nv = _batch_buffer(values, self._stride * self.ncpus, f"map {self.name}: values")
        if n != nv:
            raise ValueError(f"map {self.name}: {n} keys but {nv} values")
        count = ctypes.c_uint32(n)
        opts = L.opts(L.BpfMapBatchOpts, elem_flags=elem_flags)
        rc = L.lib.bpf_map_update_batch(self.fd, kaddr, vaddr, ctypes.byref(count),
                                        ctypes.byref(opts))
        self._err(rc, f"update_batch ({count.value} of {n} written)")
        return count.value

    def delete_batch(self, keys: Any) -> int:
        """Delete the keys that exist; returns how many were deleted."""
        addr, n = _batch_buffer(keys, self.key_size, f"map {self.name}: keys")
        opts, done, deleted = L.opts(L.BpfMapBatchOpts), 0, 0
        while done < n:
            count = ctypes.c_uint32(n - done)
            rc = L.lib.bpf_map_delete_batch(self.fd, addr + done * self.key_size,
                                            ctypes.byref(count), ctypes.byref(opts))
            deleted += count.value
            if rc >= 0:
                break
            if last_errno(rc) != errno.ENOENT:  # the kernel stops at a missing key: skip it
                self._err(rc, "delete_batch")
            done += count.value + 1
        return deleted

    # ---- memory mapping ----------------------------------------------------

    def mmap(self, writable: bool = True) -> _mmap.mmap:
        """Map the values of a BPF_F_MMAPABLE array into our address space."""
        if self.map_type != L.MapType.ARRAY or not self.map_flags & L.BPF_F_MMAPABLE:
            raise BpfError(f"map {self.name}: only BPF_F_MMAPABLE arrays can be mmap()ed")
        page = _mmap.PAGESIZE
        length = (self.max_entries * _round8(self.value_size) + page - 1) // page * page
        prot = _mmap.PROT_READ | (_mmap.PROT_WRITE if writable else 0)
        try:
            return _mmap.mmap(self.fd, length, _mmap.MAP_SHARED, prot)
        except OSError as e:
            raise error_for(e.errno or errno.EIO, f"map {self.name}: mmap") from e

    def numpy_view(self, dtype: Any = None, writable: bool = True) -> np.ndarray:
        """A live ndarray over the mmap()ed values (elements are 8-byte aligned)."""
        dt = np.dtype(dtype if dtype is not None else (np.void, self.value_size))
        if dt.itemsize != self.value_size:
            raise ValueError(f"map {self.name}: dtype is {dt.itemsize} bytes, value is "
                             f"{self.value_size}")
        return np.ndarray((self.max_entries,), dtype=dt, buffer=self.mmap(writable),
                          strides=(_round8(self.value_size),))

    # ---- misc --------------------------------------------------------------

    def info(self) -> MapInfo:
        return map_info(self.fd)

    def memlock(self) -> int:
        """Bytes of memory the kernel charges for this map."""
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        raise BpfError(f"map {self.name}: no memlock in /proc/self/fdinfo/{self.fd}")

    def pin(self, path: str | Path) -> None:
        self._err(L.lib.bpf_obj_pin(self.fd, os.fsencode(path)), f"pin at {path}")

    def close(self) -> None:
        self._finalizer()
        self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
