"""BTF types -> ctypes types and numpy dtypes with the exact C layout.

Structs are built packed with explicit padding, so every member sits at the
offset the BTF says, whatever ctypes' own alignment rules would do.
"""
from __future__ import annotations

import ctypes
import enum
import weakref
from typing import Any

import numpy as np

from .btf import INT_SIGNED, Btf, Kind

_INTS = {(1, False): ctypes.c_uint8, (1, True): ctypes.c_int8,
         (2, False): ctypes.c_uint16, (2, True): ctypes.c_int16,
         (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
         (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64}
_FLOATS = {4: ctypes.c_float, 8: ctypes.c_double}


class _Record:
    """Mixin for generated structs/unions: readable repr, equality by bytes."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={_show(getattr(self, n))}" for n, *_ in self._fields_
                           if not n.startswith("_pad"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and bytes(self) == bytes(other)  # type: ignore

    __hash__ = None  # type: ignore[assignment]  # mutable


class Struct(_Record, ctypes.Structure):
    pass


class Union(_Record, ctypes.Union):
    pass


def _show(v: Any) -> str:
    return repr(list(v)) if isinstance(v, ctypes.Array) else repr(v)


_ctype_cache: weakref.WeakKeyDictionary[Btf, dict[int, Any]] = weakref.WeakKeyDictionary()


def _int_ctype(size: int, signed: bool) -> Any:
    # __int128 and other odd sizes have no ctypes integer: keep them as bytes.
    return _INTS.get((size, signed), ctypes.c_uint8 * size)


def _enum_signed(btf: Btf, type_id: int) -> bool:
    t = btf.type(type_id)
    return t.kind_flag or any(v < 0 for _, v in t.members)


def ctype_for(btf: Btf, type_id: int) -> Any:
    """The ctypes type for a BTF type (cached per Btf and type id)."""
    cache = _ctype_cache.setdefault(btf, {})
    tid = btf.resolve(type_id)
    if tid not in cache:
        cache[tid] = _build_ctype(btf, tid)
    return cache[tid]


def _build_ctype(btf: Btf, tid: int) -> Any:
    t = btf.type(tid)
    if t.kind == Kind.INT:
        return _int_ctype(t.size, bool(t.extra >> 24 & INT_SIGNED))
    if t.kind in (Kind.ENUM, Kind.ENUM64):
        return _int_ctype(t.size, _enum_signed(btf, tid))
    if t.kind == Kind.PTR:
        return ctypes.c_uint64  # a kernel pointer is an opaque 64-bit value here
    if t.kind == Kind.FLOAT:
        return _FLOATS.get(t.size, ctypes.c_uint8 * t.size)
    if t.kind == Kind.ARRAY:
        elem, _index, nelems = t.extra
        return ctype_for(btf, elem) * nelems
    if t.kind in (Kind.STRUCT, Kind.UNION):
        return _build_record(btf, tid)
    raise TypeError(f"BTF type {tid} ({t.kind.name} {t.name!r}) has no ctypes equivalent")


def _build_record(btf: Btf, tid: int) -> Any:
    t = btf.type(tid)
    name = t.name or f"anon_{tid}"
    fields: list[tuple[str, Any]] = []
    anonymous: list[str] = []
    pos, npad = 0, 0
    members = t.members if t.kind == Kind.UNION else sorted(t.members, key=lambda m: m.bit_offset)
    for i, m in enumerate(members):
        if m.bitfield_size or m.bit_offset % 8:
            raise TypeError(f"{name}.{m.name}: bitfields are not supported")
        off = m.bit_offset // 8
        if t.kind == Kind.STRUCT and off > pos:
            fields.append((f"_pad{npad}", ctypes.c_uint8 * (off - pos)))
            npad += 1
        mname = m.name or f"_anon{i}"
        if not m.name:
            anonymous.append(mname)
        ctype = ctype_for(btf, m.type)
        fields.append((mname, ctype))
        pos = max(pos, off + ctypes.sizeof(ctype)) if t.kind == Kind.STRUCT else max(
            pos, ctypes.sizeof(ctype))
    if t.kind == Kind.STRUCT and t.size > pos:
        fields.append((f"_pad{npad}", ctypes.c_uint8 * (t.size - pos)))
    base = Struct if t.kind == Kind.STRUCT else Union
    attrs: dict[str, Any] = {"_pack_": 1, "_layout_": "ms", "_fields_": fields}
    if anonymous:
        attrs["_anonymous_"] = anonymous
    cls = type(name, (base,), attrs)
    if t.kind == Kind.UNION and ctypes.sizeof(cls) < t.size:  # union padded at the end
        attrs["_fields_"] = fields + [("_pad0", ctypes.c_uint8 * t.size)]
        cls = type(name, (base,), attrs)
    assert ctypes.sizeof(cls) == t.size, f"{name}: ctypes size {ctypes.sizeof(cls)} != BTF {t.size}"
    for m in members:
        if m.name and t.kind == Kind.STRUCT:
            assert getattr(cls, m.name).offset == m.bit_offset // 8, f"{name}.{m.name} offset"
    return cls


def dtype_for(btf: Btf, type_id: int) -> np.dtype:
    """A numpy dtype with the same offsets and itemsize as the C type."""
    tid = btf.resolve(type_id)
    t = btf.type(tid)
    if t.kind in (Kind.INT, Kind.ENUM, Kind.ENUM64):
        signed = (bool(t.extra >> 24 & INT_SIGNED) if t.kind == Kind.INT
                  else _enum_signed(btf, tid))
        if t.size in (1, 2, 4, 8):
            return np.dtype(f"<{'i' if signed else 'u'}{t.size}")
        return np.dtype((np.void, t.size))
    if t.kind == Kind.PTR:
        return np.dtype("<u8")
    if t.kind == Kind.FLOAT:
        return np.dtype(f"<f{t.size}")
    if t.kind == Kind.ARRAY:
        elem, _index, nelems = t.extra
        return np.dtype((dtype_for(btf, elem), (nelems,)))
    if t.kind in (Kind.STRUCT, Kind.UNION):
        names, formats, offsets = [], [], []
        for m in t.members:
            if m.bitfield_size or m.bit_offset % 8:
                raise TypeError(f"{t.name}.{m.name}: bitfields are not supported")
            sub = dtype_for(btf, m.type)
            if m.name:
                names.append(m.name), formats.append(sub), offsets.append(m.bit_offset // 8)
            else:  # anonymous struct/union: lift its fields, as C does
                for n, (f, o) in sub.fields.items():
                    names.append(n), formats.append(f), offsets.append(m.bit_offset // 8 + o)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": t.size})
    raise TypeError(f"BTF type {tid} ({t.kind.name} {t.name!r}) has no dtype")


class Layouts:
    """Named access to the types, enums and map layouts of one object."""

    def __init__(self, btf: Btf):
        self.btf = btf
        self._enums: dict[str, type[enum.IntEnum]] = {}
        self._constants: dict[str, int] | None = None
        self._map_defs = btf.map_defs()

    def _record(self, name: str) -> int:
        for kind in (Kind.STRUCT, Kind.UNION, Kind.TYPEDEF):
            try:
                return self.btf.find(name, kind)
            except KeyError:
                pass
        raise KeyError(f"no struct, union or typedef named {name!r} in BTF")

    def struct(self, name: str) -> Any:
        return ctype_for(self.btf, self._record(name))

    def dtype(self, name: str) -> np.dtype:
        return dtype_for(self.btf, self._record(name))

    def enum(self, name: str) -> type[enum.IntEnum]:
        if name not in self._enums:
            self._enums[name] = enum.IntEnum(name, self.btf.enum(name))
        return self._enums[name]

    def constant(self, name: str) -> int:
        if self._constants is None:
            self._constants = {k: v for members in self.btf.enums().values()
                               for k, v in members.items()}
        if name not in self._constants:
            raise KeyError(f"no enum constant named {name!r} in BTF")
        return self._constants[name]

    def _map_def(self, map_name: str):
        if map_name not in self._map_defs:
            raise KeyError(f"no map named {map_name!r} in .maps (have: {sorted(self._map_defs)})")
        return self._map_defs[map_name]

    def map_key_type(self, map_name: str) -> Any:
        d = self._map_def(map_name)
        return ctype_for(self.btf, d.key_type_id) if d.key_type_id else ctypes.c_uint8 * d.key_size

    def map_value_type(self, map_name: str) -> Any:
        d = self._map_def(map_name)
        if d.value_type_id:
            return ctype_for(self.btf, d.value_type_id)
        return ctypes.c_uint8 * d.value_size
