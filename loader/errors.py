"""Exceptions of the loader: every message says what failed and what to do."""
from __future__ import annotations

import ctypes
import errno as _errno
import os

ENOTSUPP = 524  # kernel-internal "not supported"; leaks out of the bpf() syscall


class BpfError(Exception):
    """Base class. `errno` is set when the failure came from a syscall."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class BpfPermissionError(BpfError):
    pass


class VerifierError(BpfError):
    """A failed load. `log_tail` is the end of the verifier log (where the
    reason is); `log` is everything libbpf printed during the load."""

    def __init__(self, message: str, log_tail: str, errno: int | None = None, log: str = ""):
        super().__init__(message, errno)
        self.log_tail = log_tail
        self.log = log or log_tail

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n--- verifier log (tail) ---\n{self.log_tail}" if self.log_tail else base


class InterfaceNotFound(BpfError):
    def __init__(self, interface: str | int, netns: str | None = None, detail: str = ""):
        where = f" in netns {netns!r}" if netns else ""
        super().__init__(f"interface {interface!r} not found{where}{detail}", _errno.ENODEV)
        self.interface = interface
        self.netns = netns


class MapLayoutMismatch(BpfError):
    """A pinned map differs from the object's definition: reusing it would
    make the program read garbage, so the caller must migrate or remove it."""

    def __init__(self, map_name: str, diffs: dict[str, tuple[int, int]], path: str | None = None):
        parts = ", ".join(f"{k}: pinned={p} expected={e}" for k, (p, e) in diffs.items())
        where = f" at {path}" if path else ""
        super().__init__(f"pinned map {map_name!r}{where} does not match the object ({parts}); "
                         "remove the pin or migrate it")
        self.map_name = map_name
        self.diffs = diffs


def strerror(err: int) -> str:
    if err == ENOTSUPP:
        return "Operation not supported by this map/program type (ENOTSUPP)"
    name = _errno.errorcode.get(err, str(err))
    return f"{os.strerror(err)} ({name})"


def error_for(err: int, what: str) -> BpfError:
    """Build the right exception for a positive errno value."""
    if err in (_errno.EPERM, _errno.EACCES):
        hint = "run as root or grant CAP_BPF, CAP_NET_ADMIN (and CAP_PERFMON)"
        if os.geteuid() == 0:  # root still gets EPERM on frozen maps or under a LSM
            hint += "; already root: the object may be read-only/frozen or blocked by a LSM"
        return BpfPermissionError(f"{what}: {strerror(err)}: {hint}", err)
    if err == _errno.ENODEV:
        return BpfError(f"{what}: {strerror(err)}: no such interface", err)
    return BpfError(f"{what}: {strerror(err)}", err)


def last_errno(rc: int | None = None) -> int:
    """libbpf 1.x returns -errno and also sets errno; prefer the return code."""
    if rc is not None and rc < 0:
        return -rc
    return ctypes.get_errno() or _errno.EIO


def check_errno(rc: int, what: str) -> int:
    """Return rc if it is >= 0, else raise the matching BpfError."""
    if rc >= 0:
        return rc
    raise error_for(last_errno(rc), what)
