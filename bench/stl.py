"""A small stand-in for TRex's stateless API (`trex.stl.api`), enough to
evaluate the profiles in bench/profiles/ without the TRex client.

It covers what the in-kernel generator can reproduce: one packet built with
scapy, flow variables (`var`, `tuple_var`), writes of them into the packet and
checksum fixes, in continuous or burst mode. Each object's `to_json()` has
the shape TRex's own client produces (the stream JSON its server receives),
so bench/profile.py compiles either one the same way; a test checks that both
agree when the real client (PyPI `lbr-trex-client`) is installed.

Anything else raises `NotImplementedError` naming the missing piece: a
profile that needs more runs only on a real TRex server.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from scapy.all import Ether, IP, TCP, UDP, Raw  # noqa: F401  (profiles import them from here)
from scapy.fields import _BitField as BitField  # FlagsField is one too
from scapy.packet import Packet

__all__ = [
    "CTRexVmInsFixHwCs", "Ether", "IP", "Raw", "STLPktBuilder", "STLStream", "STLTXCont",
    "STLTXSingleBurst", "STLVM", "TCP", "UDP", "STLProfile",
]


class CTRexVmInsFixHwCs:
    L4_TYPE_UDP = 11
    L4_TYPE_TCP = 13
    L4_TYPE_IP = 17


def _int_value(v: Any) -> int:
    """TRex accepts ints and dotted IPv4 strings for variable bounds."""
    if isinstance(v, str):
        return int(ipaddress.IPv4Address(v))
    return int(v)


def _layer_offset(pkt: Packet, name: str) -> int:
    """Byte offset of layer `name` ("IP", "UDP", "IP:1" for the second IP)."""
    layer, _, nth = name.partition(":")
    want, seen, off = int(nth or 0), 0, 0
    p: Any = pkt
    while p is not None and not isinstance(p, (bytes, type(None))) and p.name != "NoPayload":
        if type(p).__name__ == layer:
            if seen == want:
                return off
            seen += 1
        off += len(p) - len(p.payload)
        p = p.payload
    raise ValueError(f"packet has no layer {name!r}")


def _field_offset(pkt: Packet, spec: str | int) -> int:
    """TRex's pkt_offset: an int, "IP.src", or "UDP" (the layer start)."""
    if isinstance(spec, int):
        return spec
    layer, _, fname = spec.partition(".")
    start = _layer_offset(pkt, layer)
    if not fname:
        return start
    layer_pkt = pkt.getlayer(layer.partition(":")[0], int(layer.partition(":")[2] or 0) + 1)
    bits = 0
    for f in layer_pkt.fields_desc:
        if f.name == fname:
            if bits % 8:
                raise ValueError(f"{spec}: field does not start on a byte")
            return start + bits // 8
        if isinstance(f, BitField):
            bits += f.size
        else:
            bits += 8 * len(f.addfield(layer_pkt, b"", layer_pkt.getfieldval(f.name)))
    raise ValueError(f"layer {layer} has no field {fname!r}")


class STLVM:
    """Flow variables and the instructions that use them."""

    def __init__(self) -> None:
        self._vars: list[dict] = []
        self._writes: list[dict] = []
        self._fixes: list[dict] = []

    def var(self, name: str, min_value: Any, max_value: Any, size: int, op: str,
            step: int = 1, init_value: Any = None, next_var: str | None = None,
            split_to_cores: bool = True) -> None:
        if op not in ("inc", "dec", "random"):
            raise NotImplementedError(f"flow var {name!r}: op {op!r} (inc, dec, random only)")
        lo, hi = _int_value(min_value), _int_value(max_value)
        if (hi - lo + 1) % step:
            raise ValueError(f"flow var {name!r}: (max_value - min_value + 1) % step must be 0")
        init = _int_value(init_value) if init_value is not None else (hi if op == "dec" else lo)
        self._vars.append({"type": "flow_var", "name": name, "size": size, "op": op,
                           "next_var": next_var, "split_to_cores": split_to_cores and op != "random",
                           "init_value": init, "min_value": lo, "max_value": hi, "step": step})

    def tuple_var(self, name: str, ip_min: Any = "0.0.0.1", ip_max: Any = "0.0.0.10",
                  port_min: int = 1025, port_max: int = 65535, limit_flows: int = 100000,
                  flags: int = 0) -> None:
        self._vars.append({"type": "tuple_flow_var", "name": name, "ip_min": _int_value(ip_min),
                           "ip_max": _int_value(ip_max), "port_min": port_min,
                           "port_max": port_max, "limit_flows": limit_flows, "flags": flags})

    def write(self, fv_name: str, pkt_offset: str | int, offset_fixup: int = 0,
              add_val: int = 0, byte_order: str = "big") -> None:
        if byte_order != "big":
            raise NotImplementedError(f"write {fv_name!r}: byte_order {byte_order!r}")
        self._writes.append({"fv_name": fv_name, "pkt_offset": pkt_offset,
                             "offset_fixup": offset_fixup, "add_val": add_val})

    def fix_chksum(self, offset: str | int = "IP") -> None:
        self._fixes.append({"kind": "ipv4", "offset": offset})

    def fix_chksum_hw(self, l3_offset: str | int, l4_offset: str | int, l4_type: int) -> None:
        self._fixes.append({"kind": "hw", "l3": l3_offset, "l4": l4_offset, "l4_type": l4_type})

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(f"STLVM.{name} is not supported by the bench's stand-in STL API")

    def instructions(self, pkt: Packet) -> list[dict]:
        out = list(self._vars)
        for w in self._writes:
            out.append({"type": "write_flow_var", "name": w["fv_name"],
                        "pkt_offset": _field_offset(pkt, w["pkt_offset"]) + w["offset_fixup"],
                        "add_value": w["add_val"], "is_big_endian": True})
        for f in self._fixes:
            if f["kind"] == "ipv4":
                out.append({"type": "fix_checksum_ipv4", "pkt_offset": _field_offset(pkt, f["offset"])})
            else:
                l3, l4 = _field_offset(pkt, f["l3"]), _field_offset(pkt, f["l4"])
                out.append({"type": "fix_checksum_hw", "l2_len": l3, "l3_len": l4 - l3,
                            "l4_type": f["l4_type"]})
        return out


class STLPktBuilder:
    def __init__(self, pkt: Packet | None = None, vm: STLVM | None = None, pkt_buffer: bytes | None = None,
                 **kw: Any) -> None:
        if kw:
            raise NotImplementedError(f"STLPktBuilder({', '.join(kw)}) is not supported")
        if pkt is None and pkt_buffer is None:
            raise ValueError("STLPktBuilder needs pkt=")
        self.pkt = pkt if pkt is not None else Ether(pkt_buffer)
        self.vm = vm or STLVM()

    def to_json(self) -> dict:
        raw = bytes(self.pkt)
        return {"packet": {"binary": base64.b64encode(raw).decode(), "meta": ""},
                "vm": {"instructions": self.vm.instructions(self.pkt)}}


@dataclass
class STLTXCont:
    pps: float | None = None
    percentage: float | None = None

    def to_json(self) -> dict:
        rate = {"type": "percentage", "value": self.percentage} if self.percentage else \
            {"type": "pps", "value": self.pps or 1}
        return {"rate": rate, "type": "continuous"}


@dataclass
class STLTXSingleBurst:
    total_pkts: int = 1
    pps: float | None = None

    def to_json(self) -> dict:
        return {"rate": {"type": "pps", "value": self.pps or 1}, "type": "single_burst",
                "total_pkts": self.total_pkts}


@dataclass
class STLStream:
    packet: STLPktBuilder
    mode: Any = field(default_factory=STLTXCont)
    name: str | None = None
    isg: float = 0.0
    enabled: bool = True

    def to_json(self) -> dict:
        built = self.packet.to_json()
        return {"flags": 0, "enabled": self.enabled, "isg": self.isg, "mode": self.mode.to_json(),
                "packet": built["packet"], "vm": built["vm"], "name": self.name}


class STLProfile:
    def __init__(self, streams: list[STLStream]) -> None:
        self.streams = streams if isinstance(streams, list) else [streams]

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.streams]
