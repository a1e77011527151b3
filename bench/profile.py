"""TRex STL profiles: evaluate one, and compile its stream for the in-kernel
generator (bench/bpf/gen.c).

A profile is evaluated to TRex's stream JSON (the packet as bytes plus the
field-engine instructions) either by the real TRex client, when PyPI
`lbr-trex-client` is installed (in a subprocess: that package swaps in its
own scapy 2.4 for the whole interpreter), or by the stand-in API in
bench/stl.py. The JSON is then compiled to a template packet, flow
variables and writes: `GenSpec`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent / "profiles"
TEMPLATE_MAX = 256      # GEN_TEMPLATE_MAX in bench/bpf/bench.h (checked against BTF in progs.py)
MAX_VARS = 8
MAX_WRITES = 8
OPS = {"inc": 0, "dec": 1, "random": 2}
L4_UDP, L4_TCP = 11, 13


class ProfileError(ValueError):
    """A profile that cannot be loaded or that the in-kernel generator cannot run."""


def profile_path(name: str) -> Path:
    """A profile by path, or by name in bench/profiles/ ("udp_flows")."""
    p = Path(name)
    if p.suffix == ".py" and p.is_file():
        return p
    q = PROFILES / f"{name.removesuffix('.py')}.py"
    if q.is_file():
        return q
    have = ", ".join(sorted(x.stem for x in PROFILES.glob("*.py")))
    raise ProfileError(f"no profile {name!r} (a .py file, or one of: {have})")


def trex_client_available() -> bool:
    return importlib.util.find_spec("lbr_trex_client") is not None


def tunable_args(tunables: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in tunables.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


_TREX_EVAL = r"""
import json, sys
import lbr_trex_client  # noqa: F401  (puts trex.* on sys.path)
from trex.stl.api import STLProfile
path, tunables = sys.argv[1], json.loads(sys.argv[2])
profile = STLProfile.load_py(path, direction=0, port_id=0, tunables=tunables)
print(json.dumps(profile.to_json()))
"""


def evaluate(path: str | Path, tunables: dict[str, Any], client: str = "auto") -> tuple[list[dict], str]:
    """The profile's streams as TRex stream JSON, and which API built them
    ("trex" or "stand-in"). client: auto | trex | stand-in."""
    path = profile_path(str(path))
    args = tunable_args(tunables)
    use_trex = client == "trex" or (client == "auto" and trex_client_available())
    if client == "trex" and not trex_client_available():
        raise ProfileError("the TRex client is not installed: pip install 'xdplb[trex]' "
                           "(PyPI lbr-trex-client)")
    if use_trex:
        r = subprocess.run([sys.executable, "-c", _TREX_EVAL, str(path), json.dumps(args)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ProfileError(f"{path}: the TRex client failed:\n{r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1]), "trex"
    return _evaluate_standin(path, args), "stand-in"


def _evaluate_standin(path: Path, args: list[str]) -> list[dict]:
    from . import stl

    # `from trex.stl.api import *` in the profile resolves to the stand-ins.
    fake = {name: types.ModuleType(name) for name in ("trex", "trex.stl")}
    saved = {name: sys.modules.get(name) for name in ("trex", "trex.stl", "trex.stl.api")}
    sys.modules.update(fake)
    sys.modules["trex.stl.api"] = stl
    try:
        spec = importlib.util.spec_from_file_location(f"xdplb_profile_{path.stem}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            streams = module.register().get_streams(tunables=args, direction=0, port_id=0)
        except NotImplementedError as e:
            raise ProfileError(f"{path}: {e}; run it with the TRex client (--generator trex)") from e
        except SystemExit as e:
            raise ProfileError(f"{path}: bad tunables {args}") from e
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return stl.STLProfile(streams).to_json()


# --------------------------------------------------------------------------
# compilation for bench/bpf/gen.c


@dataclass
class GenVar:
    name: str
    min: int
    range: int
    init: int = 0
    step: int = 1
    div: int = 1
    limit: int = 0          # flows before the sequence repeats (0 = never)
    op: str = "inc"
    size: int = 4

    def cycle(self) -> int:
        """Packets before this variable repeats (for chaining)."""
        return self.range // math.gcd(self.range, self.step) if self.op != "random" else 1

    def value(self, k: int) -> int | None:
        """The value for packet number k (None for random: any in range)."""
        if self.op == "random":
            return None
        if self.limit:
            k %= self.limit
        n = (self.init + (k // self.div) * self.step) % self.range
        return self.min + (self.range - 1 - n if self.op == "dec" else n)


@dataclass
class GenWrite:
    var: int
    offset: int
    size: int
    add: int = 0
    fix_ip: bool = False
    fix_l4: bool = False


@dataclass
class GenSpec:
    template: bytes
    vars: list[GenVar] = field(default_factory=list)
    writes: list[GenWrite] = field(default_factory=list)
    ip_csum_off: int = 0
    l4_csum_off: int = 0
    l4_is_udp: bool = False
    pps: float | None = None

    def expected(self, k: int) -> bytes | None:
        """Packet number k as the generator must emit it, checksums
        included (None if it has a random variable)."""
        pkt = bytearray(self.template)
        for w in self.writes:
            v = self.vars[w.var].value(k)
            if v is None:
                return None
            pkt[w.offset:w.offset + w.size] = ((v + w.add) & ((1 << 8 * w.size) - 1)).to_bytes(w.size, "big")
        if self.ip_csum_off:
            ip = self.ip_csum_off - 10
            pkt[ip + 10:ip + 12] = b"\0\0"
            pkt[ip + 10:ip + 12] = _csum(pkt[ip:ip + (pkt[ip] & 0x0F) * 4]).to_bytes(2, "big")
        if self.l4_csum_off and (not self.l4_is_udp or self.template[self.l4_csum_off:self.l4_csum_off + 2] != b"\0\0"):
            ip = self.ip_csum_off - 10
            l4 = self.l4_csum_off - (6 if self.l4_is_udp else 16)
            l4_len = int.from_bytes(pkt[ip + 2:ip + 4], "big") - (l4 - ip)
            pkt[self.l4_csum_off:self.l4_csum_off + 2] = b"\0\0"
            pseudo = bytes(pkt[ip + 12:ip + 20]) + bytes([0, pkt[ip + 9]]) + l4_len.to_bytes(2, "big")
            c = _csum(pseudo + bytes(pkt[l4:l4 + l4_len]))
            if self.l4_is_udp and c == 0:
                c = 0xFFFF
            pkt[self.l4_csum_off:self.l4_csum_off + 2] = c.to_bytes(2, "big")
        return bytes(pkt)


def _csum(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def compile_stream(stream: dict) -> GenSpec:
    """TRex stream JSON -> GenSpec, or ProfileError naming what does not fit."""
    template = base64.b64decode(stream["packet"]["binary"])
    if not 14 + 20 + 8 <= len(template) <= TEMPLATE_MAX:
        raise ProfileError(f"packet of {len(template)} bytes: the generator takes 42..{TEMPLATE_MAX}")
    spec = GenSpec(template=template)
    rate = stream.get("mode", {}).get("rate", {})
    if rate.get("type") == "pps":
        spec.pps = float(rate["value"])
    index: dict[str, tuple[int, int]] = {}       # var name -> (var index, size)
    flow_vars: list[tuple[dict, GenVar]] = []
    instructions = stream.get("vm", {}).get("instructions", [])
    fixes = []
    for ins in instructions:
        t = ins["type"]
        if t == "flow_var":
            if ins["size"] not in (1, 2, 4):
                raise ProfileError(f"flow var {ins['name']!r}: size {ins['size']} (1, 2 or 4 only)")
            if ins["op"] not in OPS:
                raise ProfileError(f"flow var {ins['name']!r}: op {ins['op']!r} (inc, dec, random)")
            lo, hi = ins["min_value"], ins["max_value"]
            init = ins.get("init_value", lo)
            v = GenVar(ins["name"], lo, hi - lo + 1, step=ins.get("step", 1), op=ins["op"],
                       size=ins["size"], init=((hi - init) if ins["op"] == "dec" else (init - lo)))
            index[v.name] = (len(spec.vars), v.size)
            spec.vars.append(v)
            flow_vars.append((ins, v))
        elif t == "tuple_flow_var":
            limit = ins.get("limit_flows", 0) or 0
            ip = GenVar(ins["name"] + ".ip", ins["ip_min"], ins["ip_max"] - ins["ip_min"] + 1,
                        limit=limit, size=4)
            port = GenVar(ins["name"] + ".port", ins["port_min"], ins["port_max"] - ins["port_min"] + 1,
                          div=ip.range, limit=limit, size=2)
            for v in (ip, port):
                index[v.name] = (len(spec.vars), v.size)
                spec.vars.append(v)
        elif t == "write_flow_var":
            if ins["name"] not in index:
                raise ProfileError(f"write of unknown flow var {ins['name']!r}")
            if not ins.get("is_big_endian", True):
                raise ProfileError(f"write of {ins['name']!r}: little-endian writes are not supported")
            vi, size = index[ins["name"]]
            if not 0 <= ins["pkt_offset"] <= len(template) - size:
                raise ProfileError(f"write of {ins['name']!r} at {ins['pkt_offset']}: outside the packet")
            spec.writes.append(GenWrite(vi, ins["pkt_offset"], size, ins.get("add_value", 0)))
        elif t in ("fix_checksum_ipv4", "fix_checksum_hw"):
            fixes.append(ins)
        else:
            raise ProfileError(f"field-engine instruction {t!r} is not supported by the in-kernel "
                               "generator; run the profile on a TRex server")
    # TRex's next_var: the named variable steps once per cycle of this one.
    for ins, v in flow_vars:
        nxt = ins.get("next_var")
        if nxt:
            if nxt not in index:
                raise ProfileError(f"flow var {v.name!r}: next_var {nxt!r} is not defined")
            spec.vars[index[nxt][0]].div = v.div * v.cycle()
    if len(spec.vars) > MAX_VARS or len(spec.writes) > MAX_WRITES:
        raise ProfileError(f"{len(spec.vars)} flow vars / {len(spec.writes)} writes: the generator "
                           f"takes at most {MAX_VARS} / {MAX_WRITES}")
    _checksums(spec, fixes)
    return spec


def _checksums(spec: GenSpec, fixes: list[dict]) -> None:
    t = spec.template
    ip_ranges: list[tuple[int, int]] = []
    l4_ranges: list[tuple[int, int]] = []
    for f in fixes:
        if f["type"] == "fix_checksum_ipv4":
            ip = f["pkt_offset"]
            spec.ip_csum_off = ip + 10
            ip_ranges.append((ip, ip + (t[ip] & 0x0F) * 4))
        else:
            ip, l4 = f["l2_len"], f["l2_len"] + f["l3_len"]
            spec.ip_csum_off = ip + 10
            ip_ranges.append((ip, l4))
            if f["l4_type"] in (L4_UDP, L4_TCP):
                spec.l4_is_udp = f["l4_type"] == L4_UDP
                spec.l4_csum_off = l4 + (6 if spec.l4_is_udp else 16)
                # pseudo-header addresses, and the whole L4 segment
                l4_ranges += [(ip + 12, ip + 20), (l4, len(t))]
    for w in spec.writes:
        span = range(w.offset, w.offset + w.size)
        w.fix_ip = any(a <= i < b for i in span for a, b in ip_ranges)
        w.fix_l4 = any(a <= i < b for i in span for a, b in l4_ranges)
        for csum in (spec.ip_csum_off, spec.l4_csum_off):
            if csum and (csum in span or csum + 1 in span):
                raise ProfileError(f"a flow var is written over the checksum at offset {csum}")


def load(name: str, tunables: dict[str, Any], client: str = "auto") -> tuple[GenSpec, str, list[dict]]:
    """Evaluate and compile a one-stream profile: (spec, api used, stream JSON)."""
    streams, api = evaluate(name, tunables, client)
    streams = [s for s in streams if s.get("enabled", True)]
    if len(streams) != 1:
        raise ProfileError(f"{name}: {len(streams)} enabled streams; the in-kernel generator "
                           "runs one stream per profile")
    return compile_stream(streams[0]), api, streams
