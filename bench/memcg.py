"""Kernel memory of rules and maps, measured with a memory cgroup (and a
process's resident memory, `rss_mb`).

Netfilter tables (x_tables blobs, nf_tables objects) and BPF maps are all
charged to the memory cgroup of the task that creates them (GFP_ACCOUNT).
So the kernel memory a ruleset or a map set holds is the cgroup's kernel
usage after loading it from inside a fresh cgroup, once the loading process
has exited: cgroup v1 `memory.kmem.usage_in_bytes`, or v2 `memory.stat`
`kernel`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")


def _v2_root() -> Path | None:
    for p in (Path("/sys/fs/cgroup"), V2):
        if (p / "cgroup.controllers").exists() and "memory" in (p / "cgroup.controllers").read_text():
            return p
    return None


class KmemCgroup:
    """A throwaway memory cgroup; `available` is False where there is none."""

    def __init__(self, name: str) -> None:
        self.v1 = (V1 / "memory.kmem.usage_in_bytes").exists()
        root = V1 if self.v1 else _v2_root()
        self.path: Path | None = None
        self._home = self._thread_home()
        if root is None:
            return
        path = root / f"xdplb-bench-{os.getpid()}-{name}"
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            return
        self.path = path

    @property
    def available(self) -> bool:
        return self.path is not None

    def _thread_home(self) -> Path | None:
        """The memory cgroup the calling thread is in now."""
        for line in Path("/proc/thread-self/cgroup").read_text().splitlines():
            _, ctrls, rel = line.split(":", 2)
            if self.v1 and "memory" in ctrls.split(","):
                return V1 / rel.lstrip("/")
            if not self.v1 and ctrls == "":
                root = _v2_root()
                return root / rel.lstrip("/") if root else None
        return None

    def kernel_bytes(self) -> int | None:
        if self.path is None:
            return None
        if self.v1:
            return int((self.path / "memory.kmem.usage_in_bytes").read_text())
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            if k == "kernel":
                return int(v)
        return None

    def shell_prefix(self) -> list[str]:
        """argv prefix that runs a command inside the cgroup."""
        if self.path is None:
            return []
        procs = self.path / ("tasks" if self.v1 else "cgroup.procs")
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    @contextlib.contextmanager
    def thread_inside(self) -> Iterator[None]:
        """Charge what the calling thread allocates (maps) to the cgroup.
        cgroup v1 moves one thread; v2 cannot, so then nothing moves."""
        if self.path is None or not self.v1:
            yield
            return
        home = self._thread_home()
        tid = str(threading.get_native_id())
        (self.path / "tasks").write_text(tid)
        try:
            yield
        finally:
            if home is not None:
                (home / "tasks").write_text(tid)

    def close(self) -> None:
        if self.path is None:
            return
        # Threads started while inside (numba's pool) stay there: move them
        # out, or the directory cannot be removed.
        procs = self.path / ("tasks" if self.v1 else "cgroup.procs")
        home = self._home
        if home is not None:
            with contextlib.suppress(OSError):
                for tid in procs.read_text().split():
                    with contextlib.suppress(OSError):
                        (home / procs.name).write_text(tid)
        with contextlib.suppress(OSError):
            self.path.rmdir()           # v1 and v2 reparent what is still charged
        self.path = None


def cleanup_stale() -> None:
    """Remove the cgroups of benchmark runs whose process is gone."""
    for root in (V1, _v2_root()):
        if root is None or not root.is_dir():
            continue
        for d in root.glob("xdplb-bench-*"):
            pid = d.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    d.rmdir()


def rss_mb(pid: int) -> float | None:
    """A process's resident memory (VmRSS), MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
