"""Maglev lookup tables (Eisenbud et al., NSDI 2016), weighted.

Each service gets a table of M slots (M prime, M >= 100 x backends where
possible) holding backend indices; the data plane picks slot
``flow_hash % M`` (bpf/xdp/maglev.h). Maglev keeps the load even (slot
counts differ by at most one for equal weights) and disruption small: for a
fixed M, a backend that leaves gives up its own slots and only a few others
move (a few percent on average).

Determinism matters more than anything: two load balancers, or one after a
restart, must build the same table from the same backends, or flows that
lost their conntrack entry would land on other backends. So:

* a backend's permutation comes from blake2b of its key ("10.244.1.2:8080"),
  never from Python's salted hash();
* backends are put in a canonical order (by that digest) before filling, so
  the caller's order does not matter; results are mapped back to it.

Changing M re-hashes every flow, so `table_size(n, current=M)` keeps the
size in use while it is still big enough and not wastefully big (a
backend that flaps does not reshuffle the whole service).

The fill loop is compiled with numba (cache=True: compiled once, then loaded
from __pycache__). `build_tables` does many services in one parallel call
over flat arrays: Python only hashes the keys.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

__all__ = [
    "KEEP_STEPS",
    "MAX_BACKENDS_PER_SERVICE",
    "PRIMES",
    "build_table",
    "build_tables",
    "permutation",
    "table_size",
]

# Table sizes: steps of x1.2..1.25 (a table is at most ~25% bigger than
# 100 x N), up to the largest prime below 2**16. Few distinct sizes also let
# regions freed in the slot pool be reused by other services.
PRIMES: tuple[int, ...] = (
    101, 251, 307, 401, 503, 599, 719, 853, 1009, 1213,
    1439, 1721, 2039, 2437, 2897, 3449, 4093, 4871, 5791, 6899,
    8191, 9743, 11587, 13781, 16381, 19483, 23167, 27541, 32749, 38953,
    46327, 55103, 65521,
)  # fmt: skip

_PRIMES = np.array(PRIMES, np.int64)

# Above this, M >= 100 x N cannot hold even with the largest size: tables
# still build, but the load spread gets coarser.
MAX_BACKENDS_PER_SERVICE = PRIMES[-1] // 100  # 655

# How many sizes above the minimum a table may stay at when it shrinks.
KEEP_STEPS = 2

_DIGEST = 16  # blake2b bytes: two 64-bit halves, for offset and skip


def table_size(n_backends: int, current: int = 0) -> int:
    """Smallest size in PRIMES >= 100 x n (0 for no backends); the largest
    size beyond MAX_BACKENDS_PER_SERVICE backends.

    With `current` (the size in use), that size is kept if it is still at
    least the minimum and at most KEEP_STEPS sizes above it: removing a
    backend then moves only the flows Maglev has to move."""
    if n_backends < 0:
        raise ValueError(f"negative backend count {n_backends}")
    if n_backends == 0:
        return 0
    i = min(bisect.bisect_left(PRIMES, 100 * n_backends), len(PRIMES) - 1)
    if current in PRIMES[i : i + KEEP_STEPS + 1]:
        return current
    return PRIMES[i]


def _digests(keys: Sequence[str]) -> np.ndarray:
    """(n, 2) uint64: the two 64-bit halves of each key's blake2b digest."""
    blake = hashlib.blake2b
    raw = b"".join([blake(k.encode(), digest_size=_DIGEST).digest() for k in keys])
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def permutation(key: str, m: int) -> tuple[int, int]:
    """(offset, skip) of a backend in a table of size m: it prefers slots
    offset, offset + skip, offset + 2 skip, ... (mod m)."""
    h0, h1 = (int(x) for x in _digests([key])[0])
    return h0 % m, h1 % (m - 1) + 1


# ---- native part --------------------------------------------------------


@njit(cache=True, nogil=True)
def _fill_into(out, offsets, skips, weights):  # pragma: no cover - numba
    """Fill all of `out` with backend indices 0..N-1.

    Round-robin over backends as in Maglev, except that each backend earns
    `weight` credit per round and takes one slot per `max weight` of credit,
    so slot counts follow the weights (equal weights: plain Maglev). A
    permutation visits every slot (M prime, 0 < skip < M), so a backend's
    walk always ends on a free slot while any is left."""
    m = out.shape[0]
    n = offsets.shape[0]
    if m == 0 or n == 0:
        return
    out[:] = -1
    pos = offsets.copy()  # next preferred slot of each backend
    credit = np.zeros(n, np.int64)
    wmax = weights.max()
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < wmax:
                continue
            credit[i] -= wmax
            p = pos[i]
            s = skips[i]
            while out[p] >= 0:
                p += s
                if p >= m:
                    p -= m
            out[p] = i
            p += s
            if p >= m:
                p -= m
            pos[i] = p
            filled += 1
            if filled == m:
                return


@njit(cache=True, nogil=True)
def _fill(offsets, skips, weights, m):  # pragma: no cover - numba
    """The core: int32[m], slot -> index into offsets/skips/weights."""
    out = np.empty(m, np.int32)
    _fill_into(out, offsets, skips, weights)
    return out


@njit(cache=True, nogil=True)
def _canonical(h0, h1):  # pragma: no cover - numba
    """Indices that sort backends by digest (h0, h1), and whether two
    digests are equal (a duplicate backend)."""
    idx = np.argsort(h0, kind="mergesort")
    # Equal h0 is (astronomically) rare: an insertion pass orders ties by h1
    # and costs O(n) when there are none.
    for i in range(1, idx.shape[0]):
        j = i
        while j > 0:
            a, b = idx[j - 1], idx[j]
            if h0[a] < h0[b] or (h0[a] == h0[b] and h1[a] <= h1[b]):
                break
            idx[j - 1], idx[j] = b, a
            j -= 1
    dup = False
    for i in range(1, idx.shape[0]):
        if h0[idx[i - 1]] == h0[idx[i]] and h1[idx[i - 1]] == h1[idx[i]]:
            dup = True
    return idx, dup


@njit(cache=True, nogil=True)
def _build_into(table, h0, h1, weights):  # pragma: no cover - numba
    """One service's table, in the caller's index space. Returns False
    (table unspecified) if two backends are the same."""
    m = table.shape[0]
    idx, dup = _canonical(h0, h1)
    if dup:
        return False
    n = idx.shape[0]
    offsets = np.empty(n, np.int64)
    skips = np.empty(n, np.int64)
    w = np.empty(n, np.int64)
    um, um1 = np.uint64(m), np.uint64(m - 1)  # uint64 op int64 would be float
    for i in range(n):
        offsets[i] = np.int64(h0[idx[i]] % um)
        skips[i] = np.int64(h1[idx[i]] % um1) + 1
        w[i] = weights[idx[i]]
    _fill_into(table, offsets, skips, w)
    for k in range(m):
        table[k] = idx[table[k]]
    return True


@njit(cache=True, parallel=True)
def _build_many(h0, h1, weights, bstart, tstart):  # pragma: no cover - numba
    """All services, in parallel. Service s owns backends bstart[s]:bstart[s+1]
    and slots tstart[s]:tstart[s+1]; ok[s] is False on a duplicate backend."""
    n_svc = bstart.shape[0] - 1
    out = np.empty(tstart[n_svc], np.int32)
    ok = np.ones(n_svc, np.bool_)
    for s in prange(n_svc):
        b0, b1 = bstart[s], bstart[s + 1]
        t0, t1 = tstart[s], tstart[s + 1]
        if t1 > t0:
            ok[s] = _build_into(out[t0:t1], h0[b0:b1], h1[b0:b1], weights[b0:b1])
    return out, ok


# ---- Python entry points ------------------------------------------------

Backends = Sequence[tuple[str, int]]  # (key, weight) of the active backends


def _flatten(services: Sequence[Backends], sizes: Sequence[int] | None):
    counts = np.fromiter((len(s) for s in services), np.int64, len(services))
    flat = [b for svc in services for b in svc]
    weights = np.fromiter((w for _, w in flat), np.int64, len(flat))
    if len(flat) and weights.min() < 1:
        bad = flat[int(np.argmin(weights))]
        raise ValueError(f"backend {bad[0]!r}: weight must be >= 1, not {bad[1]}")
    if sizes is None:  # table_size(), vectorised
        i = np.minimum(np.searchsorted(_PRIMES, 100 * counts), len(PRIMES) - 1)
        m = np.where(counts > 0, _PRIMES[i], 0)
    else:
        m = np.asarray(sizes, np.int64)
        if m.shape != counts.shape:
            raise ValueError(f"{len(m)} sizes for {len(counts)} services")
        wrong = [s for s, (c, size) in enumerate(zip(counts, m)) if (c == 0) != (size == 0)]
        wrong += [s for s, size in enumerate(m) if size and int(size) not in PRIMES]
        if wrong:
            s = wrong[0]
            raise ValueError(f"service #{s}: size {m[s]} for {counts[s]} backends (want one of PRIMES, 0 iff none)")
    h = _digests([k for k, _ in flat])
    bstart = np.zeros(len(services) + 1, np.int64)
    np.cumsum(counts, out=bstart[1:])
    tstart = np.zeros(len(services) + 1, np.int64)
    np.cumsum(m, out=tstart[1:])
    return np.ascontiguousarray(h[:, 0]), np.ascontiguousarray(h[:, 1]), weights, bstart, tstart


def _duplicates(services: Sequence[Backends], s: int) -> ValueError:
    keys = [k for k, _ in services[s]]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    return ValueError(f"service #{s}: duplicate backend {', '.join(map(repr, dups))}")


def build_tables(
    services: Sequence[Backends], sizes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables for many services in one native, parallel call.

    `services[s]` lists (key, weight) of service s's active backends;
    `sizes[s]` (default: table_size of its count) its table size.
    Returns (slots, offsets, sizes), all flat arrays: service s's table is
    ``slots[offsets[s]:offsets[s] + sizes[s]]``, int32 indices into
    services[s] (size 0 for a service without backends)."""
    h0, h1, weights, bstart, tstart = _flatten(services, sizes)
    slots, ok = _build_many(h0, h1, weights, bstart, tstart)
    if not ok.all():
        raise _duplicates(services, int(np.argmin(ok)))
    return slots, tstart[:-1].copy(), np.diff(tstart)


def build_table(backends: Backends, size: int | None = None) -> np.ndarray:
    """One service's table: int32[size] (default table_size(len(backends)))
    of indices into `backends`. Same as build_tables([backends])."""
    h0, h1, weights, _, tstart = _flatten([backends], None if size is None else [size])
    table = np.empty(int(tstart[1]), np.int32)
    if table.size and not _build_into(table, h0, h1, weights):
        raise _duplicates([backends], 0)
    return table
