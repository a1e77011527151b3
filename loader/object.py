"""Open, configure and load a BPF ELF object with libbpf."""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError

from . import libbpf as L
from .btf import Btf
from .errors import (BpfError, MapLayoutMismatch, VerifierError, check_errno, error_for,
                     last_errno, strerror)
from .layout import Layouts
from .maps import Map


@dataclass(frozen=True)
class Program:
    fd: int      # owned by the BpfObject: valid until it is closed
    name: str
    id: int


class BpfObject:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BpfError(f"BPF object {self.path} not found: build it with `make bpf`",
                           errno.ENOENT)
        try:
            self.btf = Btf.from_elf(self.path)
        except (ValueError, ELFError) as e:
            raise BpfError(f"{self.path} is not a BPF object with BTF: {e}") from e
        self.layouts = Layouts(self.btf)
        L.log_reset()
        ptr = L.lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not ptr:
            err = error_for(last_errno(), f"open BPF object {self.path}")
            raise BpfError(f"{err}\n{L.log_tail(10)}", err.errno)
        self._obj: int | None = ptr
        self._map_ptrs: dict[str, int] = {}
        m = None
        while m := L.lib.bpf_object__next_map(ptr, m):
            self._map_ptrs[L.lib.bpf_map__name(m).decode()] = m
        self.loaded = False
        self.maps: dict[str, Map] = {}

    def __repr__(self) -> str:
        return f"<BpfObject {self.path} loaded={self.loaded}>"

    # ---- helpers -----------------------------------------------------------

    def _ptr(self) -> int:
        if self._obj is None:
            raise BpfError(f"BPF object {self.path} is closed")
        return self._obj

    def _map(self, name: str) -> int:
        self._ptr()
        if name not in self._map_ptrs:
            raise BpfError(f"{self.path}: no map named {name!r} (have: {sorted(self._map_ptrs)})")
        return self._map_ptrs[name]

    def _before_load(self, what: str) -> None:
        if self.loaded:
            raise BpfError(f"{what}: must be called before load()")

    def map_names(self, internal: bool = False) -> list[str]:
        """Maps in object order; internal ones (.rodata, .bss...) only if asked."""
        return [n for n, m in self._map_ptrs.items()
                if internal or not L.lib.bpf_map__is_internal(m)]

    def _internal_name(self, section: str) -> str:
        # libbpf names internal maps "<object name prefix><section>", e.g. xdplb.rodata
        for n, m in self._map_ptrs.items():
            if L.lib.bpf_map__is_internal(m) and n.endswith(section):
                return n
        raise BpfError(f"{self.path}: no {section} section (no const volatile globals?)")

    def _definition(self, name: str) -> dict[str, int]:
        """The map as the kernel will report it once created."""
        m = self._map(name)
        map_type, flags = L.lib.bpf_map__type(m), L.lib.bpf_map__map_flags(m)
        if map_type in (L.MapType.DEVMAP, L.MapType.DEVMAP_HASH):
            flags |= L.BPF_F_RDONLY_PROG  # the kernel forces it on devmaps
        return {"map_type": map_type, "key_size": L.lib.bpf_map__key_size(m),
                "value_size": L.lib.bpf_map__value_size(m),
                "max_entries": L.lib.bpf_map__max_entries(m), "map_flags": flags}

    # ---- before load -------------------------------------------------------

    def set_max_entries(self, map_name: str, n: int) -> None:
        self._before_load("set_max_entries")
        check_errno(L.lib.bpf_map__set_max_entries(self._map(map_name), n),
                    f"map {map_name}: set_max_entries({n})")

    def _rodata(self, var_name: str) -> tuple[int, bytearray, int, int]:
        m = self._map(self._internal_name(".rodata"))
        size = ctypes.c_size_t()
        ptr = L.lib.bpf_map__initial_value(m, ctypes.byref(size))
        if not ptr:
            raise BpfError(f"{self.path}: .rodata has no initial value")
        variables = self.btf.datasec_vars(".rodata")
        if var_name not in variables:
            raise BpfError(f"{self.path}: no .rodata variable {var_name!r} (have: {sorted(variables)})")
        offset, vsize, _ = variables[var_name]
        return m, bytearray(ctypes.string_at(ptr, size.value)), offset, vsize

    def set_rodata(self, var_name: str, value: int) -> None:
        """Set a `const volatile` global; the verifier sees it as a constant."""
        self._before_load("set_rodata")
        m, data, offset, size = self._rodata(var_name)
        try:
            data[offset:offset + size] = value.to_bytes(size, "little", signed=value < 0)
        except OverflowError:
            raise ValueError(f".rodata {var_name}: {value} does not fit in {size} bytes") from None
        buf = (ctypes.c_char * len(data)).from_buffer(data)
        check_errno(L.lib.bpf_map__set_initial_value(m, buf, len(data)), f"set_rodata({var_name})")

    def get_rodata(self, var_name: str, signed: bool = False) -> int:
        """Read a .rodata variable: the initial value before load, the kernel's after."""
        _m, data, offset, size = self._rodata(var_name)
        if self.loaded:
            with self.internal_map(".rodata") as m:
                data = bytearray(bytes(m.lookup(0)))
        return int.from_bytes(data[offset:offset + size], "little", signed=signed)

    def reuse_map_fd(self, map_name: str, fd: int) -> None:
        """Make the object use an existing map (libbpf dups fd)."""
        self._before_load("reuse_map_fd")
        check_errno(L.lib.bpf_map__reuse_fd(self._map(map_name), fd), f"map {map_name}: reuse fd")

    def reuse_pinned(self, pin_dir: str | Path) -> list[str]:
        """Reuse every map pinned as pin_dir/<name>. All pins are checked before
        any is reused; a pin whose layout differs raises MapLayoutMismatch."""
        self._before_load("reuse_pinned")
        found: list[tuple[str, Map]] = []
        try:
            for name in self.map_names():
                path = Path(pin_dir) / name
                if not path.exists():
                    continue
                pinned = Map.open_pinned(path, name=name)
                found.append((name, pinned))
                diffs = {k: (getattr(pinned, k), v) for k, v in self._definition(name).items()
                         if getattr(pinned, k) != v}
                if diffs:
                    raise MapLayoutMismatch(name, diffs, str(path))
            for name, pinned in found:
                self.reuse_map_fd(name, pinned.fd)
        finally:
            for _, pinned in found:
                pinned.close()
        return [name for name, _ in found]

    # ---- load --------------------------------------------------------------

    def load(self) -> None:
        self._before_load("load")
        L.log_reset()
        rc = L.lib.bpf_object__load(self._ptr())
        if rc < 0:
            err = last_errno(rc)
            what = f"loading {self.path} failed"
            if err == errno.EPERM:
                raise error_for(err, what)
            raise VerifierError(f"{what}: {strerror(err)}", L.log_tail(40), err, L.log_text())
        self.loaded = True
        for name in self.map_names():
            self.maps[name] = self._open_map(name, self.layouts.map_key_type(name),
                                             self.layouts.map_value_type(name))

    def _open_map(self, name: str, key_type: Any, value_type: Any) -> Map:
        fd = check_errno(L.lib.bpf_map__fd(self._map(name)), f"map {name}: fd")
        # Our own fd: the Map stays usable after the object is closed.
        return Map.from_fd(os.dup(fd), key_type, value_type, name=name)

    def internal_map(self, section: str = ".rodata") -> Map:
        """The loaded map behind a data section, with raw byte values."""
        if not self.loaded:
            raise BpfError("internal_map: call load() first")
        name = self._internal_name(section)
        return self._open_map(name, ctypes.c_uint32, None)

    def program_names(self) -> list[str]:
        out, p = [], None
        while p := L.lib.bpf_object__next_program(self._ptr(), p):
            out.append(L.lib.bpf_program__name(p).decode())
        return out

    def program(self, name: str) -> Program:
        p = L.lib.bpf_object__find_program_by_name(self._ptr(), name.encode())
        if not p:
            raise BpfError(f"{self.path}: no program {name!r} (have: {self.program_names()})")
        fd = L.lib.bpf_program__fd(p)
        if fd < 0:
            raise BpfError(f"program {name}: not loaded; call load() first")
        return Program(fd, name, L.obj_info(fd, L.BpfProgInfo()).id)

    def pin_maps(self, pin_dir: str | Path, names: list[str] | None = None) -> list[str]:
        """Pin maps as pin_dir/<name>; returns the names newly pinned. A pin of
        this very map (e.g. reused with reuse_pinned) is left alone."""
        if not self.loaded:
            raise BpfError("pin_maps: call load() first")
        pin_dir = Path(pin_dir)
        pin_dir.mkdir(parents=True, exist_ok=True)
        pinned = []
        for name in names if names is not None else list(self.maps):
            path, m = pin_dir / name, self.maps[name]
            if path.exists():
                with Map.open_pinned(path) as other:
                    if other.info().id != m.info().id:
                        raise BpfError(f"map {name}: {path} pins a different map; remove it "
                                       "or reuse it with reuse_pinned()")
                continue
            m.pin(path)
            pinned.append(name)
        return pinned

    # ---- lifetime ----------------------------------------------------------

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self._obj is not None:
            L.lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_obj", None) is not None:
            L.lib.bpf_object__close(self._obj)
