"""Allocators for map space and ids, with deferred (RCU-safe) reclaim.

The data plane reads maps without locks, under RCU: an XDP program that
looked up a service record may keep using the ring_offset/ring_size and the
backend ids it found until it returns. So when the control plane retires a
Maglev region or an id, that region/id may still be read by packets in
flight, and must not be handed out again (and overwritten) yet.

Invariant: an id or region is reused only after a full grace period that
began after it was retired. `Reclaimer` enforces it: retiring queues the
item, and `synchronize()` waits a grace period and only then frees what was
queued before the wait began.

The grace period comes from membarrier(MEMBARRIER_CMD_GLOBAL): when more
than one CPU is online the kernel runs synchronize_rcu(), which waits for
every RCU read-side section in progress, and XDP programs (native or
generic) run in one (softirq / NAPI context with preemption off). On a
single CPU, the calling thread running at all means no XDP program is in
the middle of a run. No root is needed.

The allocators themselves are plain bookkeeping with `copy()`, so a planned
change can be tried on a copy (dry run) before anything is written.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import heapq
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "IdAllocator",
    "MEMBARRIER_CMD_GLOBAL",
    "Reclaimer",
    "RegionAllocator",
    "membarrier_grace",
]


class RegionAllocator:
    """First-fit allocation of runs in [0, total), e.g. Maglev pool slots.

    Free space is a sorted list of disjoint, non-adjacent (start, end)
    intervals; freeing merges with both neighbours so fragments coalesce."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"negative size {total}")
        self.total = total
        self._starts: list[int] = [0] if total else []
        self._ends: list[int] = [total] if total else []
        self._free = total

    def alloc(self, size: int) -> int | None:
        """Offset of a new run of `size`, or None if no free run is that big."""
        _check_size(size)
        for i, (start, end) in enumerate(zip(self._starts, self._ends)):
            if end - start >= size:
                if end - start == size:
                    del self._starts[i], self._ends[i]
                else:
                    self._starts[i] = start + size
                self._free -= size
                return start
        return None

    def free(self, offset: int, size: int) -> None:
        """Return a run. Raises ValueError if any part of it is free already
        (double free) or outside [0, total)."""
        _check_size(size)
        end = offset + size
        if offset < 0 or end > self.total:
            raise ValueError(f"[{offset}, {end}) is outside [0, {self.total})")
        if not self.is_used(offset, size):
            raise ValueError(f"[{offset}, {end}) is (partly) free already")
        i = bisect.bisect_right(self._starts, offset)  # first free run after offset
        self._free += size
        merge_left = i > 0 and self._ends[i - 1] == offset
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = offset
        else:
            self._starts.insert(i, offset)
            self._ends.insert(i, end)

    def reserve(self, offset: int, size: int) -> None:
        """Mark a specific run used (state recovered from pinned maps).
        Raises ValueError unless all of it is free."""
        _check_size(size)
        end = offset + size
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or self._ends[i] < end:
            raise ValueError(f"[{offset}, {end}) overlaps a used run or is outside [0, {self.total})")
        start, fend = self._starts[i], self._ends[i]
        self._free -= size
        # Split the free run around [offset, end): zero, one or two pieces.
        pieces = [(s, e) for s, e in ((start, offset), (end, fend)) if e > s]
        self._starts[i : i + 1] = [s for s, _ in pieces]
        self._ends[i : i + 1] = [e for _, e in pieces]

    def is_used(self, offset: int, size: int) -> bool:
        """True if all of [offset, offset + size) is allocated."""
        end = offset + size
        if size <= 0 or offset < 0 or end > self.total:
            return False
        i = bisect.bisect_right(self._starts, offset)
        return not ((i > 0 and self._ends[i - 1] > offset) or (i < len(self._starts) and self._starts[i] < end))

    @property
    def free_total(self) -> int:
        return self._free

    @property
    def used(self) -> int:
        return self.total - self.free_total

    @property
    def largest_free(self) -> int:
        return max((e - s for s, e in zip(self._starts, self._ends)), default=0)

    def free_runs(self) -> list[tuple[int, int]]:
        """(offset, size) of each free run, in order."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]

    def copy(self) -> RegionAllocator:
        new = RegionAllocator.__new__(RegionAllocator)
        new.total, new._free = self.total, self._free
        new._starts, new._ends = self._starts.copy(), self._ends.copy()
        return new

    def __repr__(self) -> str:
        return f"RegionAllocator(total={self.total}, used={self.used}, runs={len(self._starts)})"


def _check_size(size: int) -> None:
    if size <= 0:
        raise ValueError(f"size must be positive, not {size}")


class IdAllocator:
    """Ids in [lo, hi), lowest free first (keeps ids, and so the touched
    parts of arrays indexed by them, dense)."""

    def __init__(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi:
            raise ValueError(f"bad id range [{lo}, {hi})")
        self.lo, self.hi = lo, hi
        self._used: set[int] = set()
        self._next = lo  # every id >= _next not in _used is free
        self._freed: list[int] = []  # heap of released ids below _next (may hold stale ones)

    def alloc(self) -> int | None:
        while self._freed and self._freed[0] < self._next:
            i = heapq.heappop(self._freed)
            if i not in self._used:  # else stale: reserved or handed out again
                self._used.add(i)
                return i
        while self._next < self.hi and self._next in self._used:
            self._next += 1  # skip ids reserved ahead of the watermark
        if self._next >= self.hi:
            return None
        self._used.add(self._next)
        self._next += 1
        return self._next - 1

    def alloc_many(self, n: int) -> list[int] | None:
        """The n ids that n alloc() calls would hand out, or None (and
        nothing allocated) if fewer are free. Ids above the watermark go in
        one step: a full sync allocates 200k of them."""
        if n < 0:
            raise ValueError(f"negative count {n}")
        if self.capacity - self.count < n:
            return None
        out: list[int] = []
        while len(out) < n and self._freed and self._freed[0] < self._next:
            i = self.alloc()
            assert i is not None
            out.append(i)
        fresh = range(self._next, self._next + n - len(out))
        if fresh.stop <= self.hi and self._used.isdisjoint(fresh):
            self._used.update(fresh)
            self._next = fresh.stop
            out.extend(fresh)
        while len(out) < n:      # ids reserved above the watermark: one by one
            i = self.alloc()
            assert i is not None
            out.append(i)
        return out

    def release(self, id: int) -> None:
        if id not in self._used:
            raise ValueError(f"id {id} is not allocated")
        self._used.remove(id)
        if id < self._next:
            heapq.heappush(self._freed, id)

    def reserve(self, id: int) -> None:
        """Mark an id used (recovered from pinned maps)."""
        self._check(id)
        if id in self._used:
            raise ValueError(f"id {id} is already in use")
        self._used.add(id)

    def in_use(self, id: int) -> bool:
        return id in self._used

    @property
    def count(self) -> int:
        """Ids in use."""
        return len(self._used)

    @property
    def capacity(self) -> int:
        return self.hi - self.lo

    def copy(self) -> IdAllocator:
        new = IdAllocator(self.lo, self.hi)
        new._used, new._next, new._freed = set(self._used), self._next, self._freed.copy()
        return new

    def _check(self, id: int) -> None:
        if not self.lo <= id < self.hi:
            raise ValueError(f"id {id} is outside [{self.lo}, {self.hi})")

    def __repr__(self) -> str:
        return f"IdAllocator([{self.lo}, {self.hi}), in use={self.count})"


# ---- grace periods ------------------------------------------------------

MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1  # formerly MEMBARRIER_CMD_SHARED

# __NR_membarrier; the generic table (arm64, riscv, loongarch) uses 283.
_NR_MEMBARRIER = {
    "x86_64": 324,
    "amd64": 324,
    "i386": 375,
    "i686": 375,
    "aarch64": 283,
    "arm64": 283,
    "riscv64": 283,
    "loongarch64": 283,
    "armv7l": 389,
    "armv6l": 389,
    "ppc64le": 365,
    "ppc64": 365,
    "s390x": 356,
}


def _membarrier_nr() -> int:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and ctypes.sizeof(ctypes.c_void_p) == 4:
        machine = "i386"  # 32-bit userland on a 64-bit kernel: i386 numbers
    try:
        return _NR_MEMBARRIER[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"membarrier syscall number unknown for {machine}") from None


_libc: ctypes.CDLL | None = None


def _membarrier(cmd: int, flags: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(ctypes.c_long(_membarrier_nr()), ctypes.c_int(cmd), ctypes.c_uint(flags), ctypes.c_int(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"membarrier({cmd}): {os.strerror(err)}")
    return ret


def membarrier_grace() -> int:
    """Wait for an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL, 0, 0).

    Returns the syscall's result (0). Raises OSError where it is
    unavailable (e.g. EINVAL on nohz_full kernels, ENOSYS on old ones)."""
    return _membarrier(MEMBARRIER_CMD_GLOBAL)


@dataclass
class _Retired:
    release: Callable[[], None]
    key: tuple | None = None  # what it frees, to refuse retiring it twice


@dataclass
class Reclaimer:
    """Queues retired regions, ids and callbacks until a grace period has
    passed. `grace` waits one; tests inject a fake."""

    grace: Callable[[], object] = membarrier_grace
    _queue: list[_Retired] = field(default_factory=list, repr=False)
    _queued: set[tuple] = field(default_factory=set, repr=False)
    # begin()..finish(): retired before begin(), waiting for a grace period
    # that a caller runs without holding its own lock.
    _inflight: list[_Retired] = field(default_factory=list, repr=False)

    def retire_region(self, allocator: RegionAllocator, offset: int, size: int) -> None:
        # Errors are caught here, where the caller can see them, not after
        # the wait.
        if not allocator.is_used(offset, size):
            raise ValueError(f"region [{offset}, +{size}) is not allocated")
        self._push(_Retired(lambda: allocator.free(offset, size), (allocator, offset, size)))

    def retire_id(self, allocator: IdAllocator, id: int) -> None:
        if not allocator.in_use(id):
            raise ValueError(f"id {id} is not allocated")
        self._push(_Retired(lambda: allocator.release(id), (allocator, id)))

    def retire_callback(self, fn: Callable[[], object]) -> None:
        """Run `fn` after the next grace period (e.g. delete map entries that
        no live record points at any more)."""
        self._push(_Retired(fn))

    def _push(self, item: _Retired) -> None:
        if item.key is not None:
            if item.key in self._queued:
                raise ValueError("retired twice")
            self._queued.add(item.key)
        self._queue.append(item)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._inflight)

    def begin(self) -> int:
        """Split synchronize() for a caller that waits for the grace period
        without holding the lock that guards this reclaimer: under the lock,
        begin(); then grace() unlocked; then, under the lock again, finish()
        releases what was retired before begin(). A synchronize() in between
        releases those items too (its own grace period started later).
        Returns how many items the next finish() will release."""
        self._inflight += self._queue
        self._queue = []
        return len(self._inflight)

    def finish(self) -> int:
        """Release what begin() set aside; call only after a grace period
        that started after begin() returned."""
        batch, self._inflight = self._inflight, []
        return self._release(batch)

    def synchronize(self) -> int:
        """Wait a grace period, then release everything retired before the
        wait began, in retirement order. Returns how many items were
        released. If the wait fails, nothing is released."""
        batch = self._inflight + self._queue
        self._inflight, self._queue = [], []
        if not batch:
            return 0
        try:
            self.grace()
        except BaseException:
            self._queue[:0] = batch  # still pending, still in order
            raise
        return self._release(batch)

    def _release(self, batch: list[_Retired]) -> int:
        for i, item in enumerate(batch):
            self._queued.discard(item.key)
            try:
                item.release()
            except BaseException:
                # The rest is past its grace period too; keep it queued.
                self._queue[:0] = batch[i + 1 :]
                raise
        return len(batch)
