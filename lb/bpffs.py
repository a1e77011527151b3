"""The BPF filesystem the pins live on: make sure the pin directory is on one.

`ip netns exec NS cmd` runs `cmd` in a mount namespace of its own, with a
fresh /sys in which bpffs is not mounted. The pins must not go to a fresh
bpffs mounted there: that instance dies with the namespace, and with it
the pinned links that keep XDP attached after the daemon exits, and the
next start would find none of the maps. So in a mount namespace other than
the host's (PID 1's) the host's bpffs is bound in: the same superblock, so
the pins are the host's, shared with every other `ip netns exec`. A new
bpffs is mounted only in the host's namespace (what Cilium's agent does).

A bind mount(2) cannot take its source from another mount namespace
(EINVAL), so the host's bpffs is cloned with open_tree(OPEN_TREE_CLONE)
from a thread that has joined the host's namespace alone, and attached here
with move_mount().
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path

from loader import BpfError

BPF_FS_MAGIC = 0xCAFE4A11
BPFFS_ROOT = Path("/sys/fs/bpf")
MOUNT_HINT = f"mount -t bpf bpf {BPFFS_ROOT}"
NETNS_HINT = "run xdplb without `ip netns exec` (`xdplb run --netns NS` keeps /sys)"

# statfs(2) f_type of the filesystems an error message is likely to name.
_FS_NAMES = {0x62656572: "sysfs", 0x9FA0: "proc", 0x01021994: "tmpfs", 0xEF53: "ext4",
             0x58465342: "xfs", 0x9123683E: "btrfs", 0x794C7630: "overlayfs"}

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429      # the same on every architecture
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, 4
_CLONE_FS, _CLONE_NEWNS = 0x200, 0x20000
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger("xdplb")


class BpffsError(BpfError):
    """The pin directory is not on a bpffs and none could be mounted."""


class _Statfs(ctypes.Structure):
    # f_type comes first; the rest (at most 15 more words) is not read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 31)]


def fs_type(path: str | Path) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type & 0xFFFFFFFF


def fs_name(magic: int) -> str:
    return "bpffs" if magic == BPF_FS_MAGIC else _FS_NAMES.get(magic, f"filesystem type {magic:#x}")


def is_bpffs(path: str | Path) -> bool:
    try:
        return fs_type(path) == BPF_FS_MAGIC
    except OSError:
        return False


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where its pins would go."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mnt_ns(pid: int | str) -> tuple[int, int] | None:
    """A process's mount namespace, or None if it cannot be inspected."""
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestors() -> list[int]:
    """Our parent, its parent, ... up to PID 1."""
    out, pid = [], os.getppid()
    while pid > 1 and pid not in out:
        out.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])
    return out


def host_process() -> int | None:
    """A process in the host's mount namespace: PID 1, or where /proc/1 may
    not be inspected (some sandboxes forbid it), our outermost ancestor that
    may, or (a daemon whose parent exited is PID 1's child) the oldest
    process that may; None if there is none."""
    for pid in [1, *reversed(_ancestors())]:
        if _mnt_ns(pid) is not None:
            return pid
    for pid in sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        if pid != os.getpid() and _mnt_ns(pid) is not None:
            return pid
    return None


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
    return rc


def _clone_from(pid: int, path: Path) -> int:
    """A detached copy of the mount at `path` in `pid`'s mount namespace.

    setns(CLONE_NEWNS) is refused to a thread that shares its filesystem
    context, so a helper thread unshares that first: only it joins the
    other namespace, and it ends right after."""
    out: dict = {}

    def work() -> None:
        try:
            _check(_libc.unshare(_CLONE_FS), "unshare(CLONE_FS)")
            src = os.open(f"/proc/{pid}/root{path}", os.O_PATH | os.O_CLOEXEC)
            try:
                ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _check(_libc.setns(ns, _CLONE_NEWNS), "setns(CLONE_NEWNS)")
                finally:
                    os.close(ns)
                out["fd"] = _check(_libc.syscall(
                    ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(src), ctypes.c_char_p(b""),
                    ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH)), "open_tree")
            finally:
                os.close(src)
        except OSError as e:
            out["error"] = e

    t = threading.Thread(target=work, name="xdplb-bpffs")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["fd"]


def _bind_host(pid: int, target: Path) -> None:
    fd = _clone_from(pid, BPFFS_ROOT)
    try:
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), ctypes.c_char_p(b""),
                             ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                             ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), "move_mount")
    finally:
        os.close(fd)


def _mount_new(target: Path) -> None:
    _check(_libc.mount(b"bpf", os.fsencode(target), b"bpf", ctypes.c_ulong(0), b"mode=0700"),
           "mount")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def ensure_bpffs(pin_dir: str | Path, *, create: bool = True) -> str | None:
    """Make sure the pins under `pin_dir` go to a bpffs that outlives us.

    Returns None if nothing had to be done, else what was done (also
    logged, at INFO, for every caller: daemon, CLI, backend).
    Binds the host's bpffs at /sys/fs/bpf in a mount namespace of our own
    (`ip netns exec`); mounts a new one in the host's namespace, unless
    `create` is false (for commands that only read or remove pins: a new
    bpffs holds none). Raises BpffsError, with what to run, if it cannot."""
    pin_dir = Path(os.path.abspath(pin_dir))
    where = nearest_existing(pin_dir)
    try:
        magic = fs_type(where)
    except OSError as e:
        raise BpffsError(f"cannot check the pin directory {pin_dir}: {where}: {_reason(e)}") from None
    if magic == BPF_FS_MAGIC:
        return None
    if not pin_dir.is_relative_to(BPFFS_ROOT):
        if not create:
            return None
        raise BpffsError(f"the pin directory {pin_dir} is not on a BPF filesystem ({where} is on "
                         f"{fs_name(magic)}): use one under {BPFFS_ROOT}, or mount bpffs there first: "
                         f"`mkdir -p {pin_dir} && mount -t bpf bpf {pin_dir}`")
    if is_bpffs(BPFFS_ROOT):     # bpffs is there, but something else is mounted below it
        raise BpffsError(f"the pin directory {pin_dir} is not on a BPF filesystem: {where} is on "
                         f"{fs_name(magic)}, mounted over {BPFFS_ROOT}; unmount it or set another `bpffs:`")

    host = host_process()
    if host is not None and _mnt_ns(host) != _mnt_ns("self"):
        # A mount namespace of our own: only the host's bpffs keeps the pins.
        if not is_bpffs(f"/proc/{host}/root{BPFFS_ROOT}"):
            raise BpffsError(f"bpffs is mounted neither at {BPFFS_ROOT} in this mount namespace nor "
                             f"on the host (pid {host}'s); mount it on the host: `{MOUNT_HINT}` (one "
                             f"mounted only here would vanish with this namespace, and the pinned "
                             f"XDP links with it)")
        try:
            _bind_host(host, BPFFS_ROOT)
        except OSError as e:
            raise BpffsError(f"bpffs is not mounted at {BPFFS_ROOT} in this mount namespace (`ip netns "
                             f"exec` gives its command a fresh /sys) and binding the host's there failed: "
                             f"{_reason(e)}; {NETNS_HINT}") from None
        done = (f"bpffs was not mounted at {BPFFS_ROOT} in this mount namespace (`ip netns exec`?): "
                f"bound the host's bpffs there (from the mount namespace of pid {host}); the pins "
                f"are the host's")
    else:
        if not create:
            return None
        try:
            _mount_new(BPFFS_ROOT)
        except OSError as e:
            raise BpffsError(f"bpffs is not mounted at {BPFFS_ROOT} and mounting it failed: "
                             f"{_reason(e)}; mount it: `{MOUNT_HINT}`") from None
        done = f"bpffs was not mounted: mounted it at {BPFFS_ROOT}"
    if not is_bpffs(nearest_existing(pin_dir)):
        raise BpffsError(f"the pin directory {pin_dir} is still not on a BPF filesystem after "
                         f"mounting one at {BPFFS_ROOT}")
    log.info(done)
    return done
