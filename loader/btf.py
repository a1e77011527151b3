"""A reader for the `.BTF` section of a BPF ELF object.

The format is documented in the kernel's Documentation/bpf/btf.rst: a
header, then a type section of variable-length records, then a string
section. Type ids start at 1 (0 is void) in record order.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

BTF_MAGIC = 0xEB9F


class Kind(IntEnum):
    """BTF_KIND_*, in uapi/linux/btf.h order."""
    (VOID, INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC,
     FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(20)


SIZED = {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.DATASEC}
MODIFIERS = {Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG}
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4


@dataclass(frozen=True)
class Member:
    """A struct/union member. bit_offset is from the start of the struct."""
    name: str
    type: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True)
class VarSecinfo:
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class Type:
    id: int
    kind: Kind
    name: str
    size_or_type: int
    kind_flag: bool = False
    # STRUCT/UNION: Member; ENUM/ENUM64: (name, value); FUNC_PROTO: (name, type);
    # DATASEC: VarSecinfo
    members: tuple = ()
    # INT: encoding word; ARRAY: (elem_type, index_type, nelems); VAR: linkage;
    # DECL_TAG: component_idx
    extra: Any = None

    @property
    def size(self) -> int:
        return self.size_or_type if self.kind in SIZED else 0

    @property
    def ref(self) -> int:
        return 0 if self.kind in SIZED else self.size_or_type


@dataclass(frozen=True)
class MapDef:
    name: str
    map_type: int
    key_type_id: int
    value_type_id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


class Btf:
    def __init__(self, data: bytes, symbols: dict[tuple[str, str], tuple[int, int]] | None = None):
        """data: the raw .BTF section. symbols: (section, name) -> (offset, size)
        from the ELF symbol table, used when DATASEC offsets are not filled in."""
        self.symbols = symbols or {}
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise ValueError(f"bad BTF magic {magic:#x} (big-endian objects are not supported)")
        if version != 1:
            raise ValueError(f"unsupported BTF version {version}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self.types: list[Type] = [Type(0, Kind.VOID, "", 0)]
        self._parse(data[hdr_len + type_off:hdr_len + type_off + type_len])
        self._by_name: dict[str, list[int]] = {}
        for t in self.types[1:]:
            if t.name:
                self._by_name.setdefault(t.name, []).append(t.id)

    @classmethod
    def from_elf(cls, path: str | Path) -> Btf:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            sec = elf.get_section_by_name(".BTF")
            if sec is None:
                raise ValueError(f"{path}: no .BTF section (compile with clang -g)")
            symbols: dict[tuple[str, str], tuple[int, int]] = {}
            symtab = elf.get_section_by_name(".symtab")
            for sym in symtab.iter_symbols() if symtab else ():
                shndx = sym["st_shndx"]
                if sym["st_info"]["type"] == "STT_OBJECT" and isinstance(shndx, int):
                    secname = elf.get_section(shndx).name
                    symbols[(secname, sym.name)] = (sym["st_value"], sym["st_size"])
            return cls(sec.data(), symbols)

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, buf: bytes) -> None:
        pos = 0
        while pos < len(buf):
            name_off, info, size_or_type = struct.unpack_from("<III", buf, pos)
            pos += 12
            kind, vlen, kflag = Kind((info >> 24) & 0x1F), info & 0xFFFF, bool(info >> 31)
            members: list = []
            extra: Any = None
            if kind == Kind.INT:
                (extra,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            elif kind == Kind.ARRAY:
                extra, pos = struct.unpack_from("<III", buf, pos), pos + 12
            elif kind in (Kind.STRUCT, Kind.UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", buf, pos)
                    pos += 12
                    bits, off = (m_off >> 24, m_off & 0xFFFFFF) if kflag else (0, m_off)
                    members.append(Member(self._str(m_name), m_type, off, bits))
            elif kind == Kind.ENUM:
                fmt = "<Ii" if kflag else "<II"
                for _ in range(vlen):
                    m_name, val = struct.unpack_from(fmt, buf, pos)
                    pos += 8
                    members.append((self._str(m_name), val))
            elif kind == Kind.ENUM64:
                for _ in range(vlen):
                    m_name, lo, hi = struct.unpack_from("<III", buf, pos)
                    pos += 12
                    val = (hi << 32) | lo
                    if kflag and val >= 1 << 63:
                        val -= 1 << 64
                    members.append((self._str(m_name), val))
            elif kind == Kind.FUNC_PROTO:
                for _ in range(vlen):
                    p_name, p_type = struct.unpack_from("<II", buf, pos)
                    pos += 8
                    members.append((self._str(p_name), p_type))
            elif kind == Kind.VAR:
                (extra,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            elif kind == Kind.DATASEC:
                for _ in range(vlen):
                    members.append(VarSecinfo(*struct.unpack_from("<III", buf, pos)))
                    pos += 12
            elif kind == Kind.DECL_TAG:
                (extra,), pos = struct.unpack_from("<i", buf, pos), pos + 4
            self.types.append(Type(len(self.types), kind, self._str(name_off), size_or_type,
                                   kflag, tuple(members), extra))

    # ---- queries -----------------------------------------------------------

    def type(self, type_id: int) -> Type:
        return self.types[type_id]

    def find(self, name: str, kind: Kind | None = None) -> int:
        for tid in self._by_name.get(name, ()):
            if kind is None or self.types[tid].kind == kind:
                return tid
        what = f"{kind.name} " if kind is not None else ""
        raise KeyError(f"no BTF {what}type named {name!r}")

    def resolve(self, type_id: int) -> int:
        """Skip typedef/const/volatile/restrict/type_tag down to the real type."""
        while self.types[type_id].kind in MODIFIERS:
            type_id = self.types[type_id].ref
        return type_id

    def sizeof(self, type_id: int) -> int:
        t = self.types[self.resolve(type_id)]
        if t.kind in SIZED:
            return t.size
        if t.kind == Kind.PTR:
            return 8  # BPF is a 64-bit target
        if t.kind == Kind.ARRAY:
            return t.extra[2] * self.sizeof(t.extra[0])
        if t.kind == Kind.VAR:
            return self.sizeof(t.ref)
        raise ValueError(f"BTF type {type_id} ({t.kind.name} {t.name!r}) has no size")

    def enum(self, name: str) -> dict[str, int]:
        t = self.types[self._find_enum(name)]
        return dict(t.members)

    def _find_enum(self, name: str) -> int:
        for tid in self._by_name.get(name, ()):
            if self.types[tid].kind in (Kind.ENUM, Kind.ENUM64):
                return tid
        raise KeyError(f"no BTF enum named {name!r}")

    def enums(self) -> dict[str, dict[str, int]]:
        return {t.name: dict(t.members) for t in self.types
                if t.kind in (Kind.ENUM, Kind.ENUM64) and t.name}

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int, int]]:
        """name -> (offset, size, type_id) of the variables of a DATASEC.
        Offsets come from the ELF symbol table when present: in a clang-built
        object the DATASEC offsets are all 0 until libbpf fixes them up."""
        try:
            sec = self.types[self.find(section, Kind.DATASEC)]
        except KeyError:
            return {}
        out = {}
        for si in sec.members:
            var = self.types[si.type]
            offset, size = self.symbols.get((section, var.name), (si.offset, si.size))
            out[var.name] = (offset, size or self.sizeof(var.ref), var.ref)
        return out

    def map_defs(self) -> dict[str, MapDef]:
        """Decode the BTF-defined maps of the `.maps` section."""
        try:
            sec = self.types[self.find(".maps", Kind.DATASEC)]
        except KeyError:
            return {}
        defs = {}
        for si in sec.members:
            var = self.types[si.type]
            fields: dict[str, int] = {}
            for m in self.types[self.resolve(var.ref)].members:
                target = self.types[self.resolve(m.type)]
                if m.name == "values":      # __array(values, ...): program or map ids, 4 bytes
                    fields["value_size"] = 4
                if target.kind != Kind.PTR:
                    continue
                pointee = self.resolve(target.ref)
                if m.name in ("key", "value"):
                    fields[m.name + "_type_id"] = pointee
                    fields[m.name + "_size"] = self.sizeof(pointee)
                elif self.types[pointee].kind == Kind.ARRAY:  # __uint(x, N): int (*x)[N]
                    fields[m.name] = self.types[pointee].extra[2]
            defs[var.name] = MapDef(
                name=var.name, map_type=fields.get("type", 0),
                key_type_id=fields.get("key_type_id", 0),
                value_type_id=fields.get("value_type_id", 0),
                key_size=fields.get("key_size", 0), value_size=fields.get("value_size", 0),
                max_entries=fields.get("max_entries", 0), map_flags=fields.get("map_flags", 0))
        return defs
