"""XDP attachment through BPF links.

A link (unlike the legacy netlink attach) belongs to whoever holds its fd or
pin: it cannot be replaced by accident, survives our process when pinned, and
its program can be swapped atomically with bpf_link_update.

Interfaces are resolved in the network namespace of the calling thread.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import libbpf as L
from .errors import BpfError, InterfaceNotFound, check_errno, error_for, last_errno, strerror

MODES = {"native": L.XDP_FLAGS_DRV_MODE, "generic": L.XDP_FLAGS_SKB_MODE}


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    ifindex: int   # 0 once the link is detached or its interface is gone


def _ifname(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


class XdpLink:
    def __init__(self, fd: int, ifname: str | None = None):
        """Takes ownership of a link fd (closed on close() or garbage collection)."""
        self.fd = fd
        self.ifname = ifname
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def attach(cls, prog_fd: int, ifindex: int, mode: str = "native",
               ifname: str | None = None) -> XdpLink:
        if mode not in MODES:
            raise ValueError(f"xdp mode must be one of {sorted(MODES)}, not {mode!r}")
        opts = L.opts(L.BpfLinkCreateOpts, flags=MODES[mode])
        rc = L.lib.bpf_link_create(prog_fd, ifindex, L.BPF_XDP, ctypes.byref(opts))
        if rc >= 0:
            return cls(rc, ifname or _ifname(ifindex))
        err = last_errno(rc)
        name = ifname or _ifname(ifindex)
        if name is None:  # the kernel says EINVAL for an unknown ifindex
            raise InterfaceNotFound(ifname or f"ifindex {ifindex}")
        where = f"interface {name} (ifindex {ifindex})"
        if err in (errno.EBUSY, errno.EEXIST):
            raise BpfError(f"another XDP program is already attached to {where}; "
                           "detach it first (or update its link)", err)
        if mode == "native" and err in (errno.EOPNOTSUPP, errno.EINVAL):
            raise BpfError(f"native XDP is not supported on {where}: {strerror(err)}; "
                           "set `xdp_mode: generic` explicitly to use the slower generic mode",
                           err)
        raise error_for(err, f"attach XDP ({mode}) to {where}")

    @classmethod
    def from_pin(cls, path: str | Path) -> XdpLink:
        fd = check_errno(L.lib.bpf_obj_get(os.fsencode(path)), f"open pinned link {path}")
        link = cls(fd)
        link.ifname = _ifname(link.info().ifindex)
        return link

    def _what(self, op: str) -> str:
        return f"XDP link on {self.ifname or '?'}: {op}"

    def pin(self, path: str | Path) -> None:
        check_errno(L.lib.bpf_obj_pin(self.fd, os.fsencode(path)), self._what(f"pin at {path}"))

    def update(self, prog_fd: int) -> None:
        """Atomically replace the program: no packet goes unprocessed."""
        check_errno(L.lib.bpf_link_update(self.fd, prog_fd, None), self._what("update"))

    def detach(self) -> None:
        """Detach from the interface even if the link is pinned elsewhere."""
        check_errno(L.lib.bpf_link_detach(self.fd), self._what("detach"))

    def info(self) -> LinkInfo:
        i = L.obj_info(self.fd, L.BpfLinkInfo())
        return LinkInfo(i.id, i.type, i.prog_id, i.xdp_ifindex)

    def close(self) -> None:
        """Drop our fd; the program stays attached while a pin holds the link."""
        self._finalizer()
        self.fd = -1

    def __enter__(self) -> XdpLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def xdp_query(ifindex: int, mode: str | None = None) -> int | None:
    """Id of the XDP program attached to ifindex (in `mode` if given), or None."""
    prog_id = ctypes.c_uint32()
    flags = MODES[mode] if mode else 0
    rc = L.lib.bpf_xdp_query_id(ifindex, flags, ctypes.byref(prog_id))
    if rc < 0 and last_errno(rc) in (errno.ENODEV, errno.EINVAL) and _ifname(ifindex) is None:
        raise InterfaceNotFound(f"ifindex {ifindex}")
    check_errno(rc, f"query XDP on ifindex {ifindex}")
    return prog_id.value or None
