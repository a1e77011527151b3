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
from __pycache__). `build_tables` does many services in one native call
over flat arrays: Python only hashes the keys. `build_tables_ipv4` takes
the backends as arrays of addresses and ports and hashes their keys in
native code too (the same bytes, so the same tables): the reconciler's path,
with no Python object per backend.

Parallel regions (numba prange) are for big batches only: a full sync. A
parallel region needs a thread on every core, and when another core is busy
(softirq work from XDP on a gateway, another job on a CI machine) it waits
for the scheduler: one service's build took 0.015 ms serially and 14-30 ms
in a parallel region with the other core busy. So every entry point picks
serial by default unless the input is big (`use_parallel`), and the small
updates never enter a parallel region (tests/test_maglev.py and
tests/test_reconcile.py replace the parallel functions by ones that raise).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

__all__ = [
    "KEEP_STEPS",
    "MAX_BACKENDS_PER_SERVICE",
    "PRIMES",
    "build_table",
    "build_table_ipv4",
    "build_tables",
    "build_tables_ipv4",
    "ipv4_digests",
    "PARALLEL_FUNCTIONS",
    "SERIAL_MAX_SERVICES",
    "SERIAL_MAX_SLOTS",
    "permutation",
    "place_tables",
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

# Serial up to this many services, or this many table slots in all (a
# serial build costs ~15 ns a slot here: 131k slots ~ 2 ms, less than one
# stall of a parallel region on a busy machine).
SERIAL_MAX_SERVICES = 32
SERIAL_MAX_SLOTS = 1 << 17


def use_parallel(services: int, slots: int) -> bool:
    """Whether a batch of `services` tables, `slots` slots in all, is big
    enough for a parallel region (see the module's docstring)."""
    return services > SERIAL_MAX_SERVICES and slots > SERIAL_MAX_SLOTS


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

# BLAKE2b (RFC 7693), for the digests of IPv4 backend keys in native code:
# at 200k backends, formatting "a.b.c.d:port" and hashing it in Python cost
# more than building the tables. Same bytes, same digest as hashlib (tested).
_B2_IV = np.array([
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
], np.uint64)  # fmt: skip
_B2_SIGMA = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
], np.int64)  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _rotr(x, n):  # pragma: no cover - numba
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@njit(cache=True, nogil=True, inline="always")
def _g(v, a, b, c, d, x, y):  # pragma: no cover - numba
    v[a] = v[a] + v[b] + x
    v[d] = _rotr(v[d] ^ v[a], 32)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 24)
    v[a] = v[a] + v[b] + y
    v[d] = _rotr(v[d] ^ v[a], 16)
    v[c] = v[c] + v[d]
    v[b] = _rotr(v[b] ^ v[c], 63)


@njit(cache=True, nogil=True)
def _blake2b_16(block, length, iv, sigma, v, m):  # pragma: no cover - numba
    """(h0, h1): blake2b(digest_size=16) of block[:length], length <= 128,
    block zero-padded to 128 bytes. v and m are scratch (uint64[16])."""
    for i in range(16):
        w = np.uint64(0)
        for j in range(8):
            w |= np.uint64(block[8 * i + j]) << np.uint64(8 * j)
        m[i] = w
    h0 = iv[0] ^ np.uint64(0x01010000 | _DIGEST)  # depth 1, fanout 1, no key
    for i in range(8):
        v[i] = iv[i]
        v[i + 8] = iv[i]
    v[0] = h0
    v[12] ^= np.uint64(length)  # t (bytes), one and last block
    v[14] = ~v[14]
    for r in range(12):
        s = sigma[r % 10]
        _g(v, 0, 4, 8, 12, m[s[0]], m[s[1]])
        _g(v, 1, 5, 9, 13, m[s[2]], m[s[3]])
        _g(v, 2, 6, 10, 14, m[s[4]], m[s[5]])
        _g(v, 3, 7, 11, 15, m[s[6]], m[s[7]])
        _g(v, 0, 5, 10, 15, m[s[8]], m[s[9]])
        _g(v, 1, 6, 11, 12, m[s[10]], m[s[11]])
        _g(v, 2, 7, 8, 13, m[s[12]], m[s[13]])
        _g(v, 3, 4, 9, 14, m[s[14]], m[s[15]])
    return h0 ^ v[0] ^ v[8], iv[1] ^ v[1] ^ v[9]


@njit(cache=True, nogil=True, inline="always")
def _put_decimal(block, pos, x):  # pragma: no cover - numba
    """Write x >= 0 in decimal at block[pos:]; returns the position after."""
    n = 1
    t = x
    while t >= 10:
        t //= 10
        n += 1
    for i in range(n - 1, -1, -1):
        block[pos + i] = 48 + x % 10
        x //= 10
    return pos + n


@njit(cache=True, nogil=True)
def _ipv4_digest_range(addrs, ports, iv, sigma, h0, h1, lo, hi):  # pragma: no cover - numba
    """h0/h1[lo:hi]: the digests of "a.b.c.d:port" for host-order addrs and ports."""
    block = np.zeros(128, np.uint8)
    v = np.empty(16, np.uint64)
    m = np.empty(16, np.uint64)
    for k in range(lo, hi):
        a = addrs[k]
        pos = 0
        for shift in (24, 16, 8, 0):
            pos = _put_decimal(block, pos, (a >> shift) & 255)
            block[pos] = 46 if shift else 58  # '.' between octets, then ':'
            pos += 1
        pos = _put_decimal(block, pos, ports[k])
        h0[k], h1[k] = _blake2b_16(block, pos, iv, sigma, v, m)
        block[:pos] = 0


_DIGEST_CHUNK = 4096  # keys per parallel task


@njit(cache=True, parallel=True)
def _ipv4_digests_parallel(addrs, ports, iv, sigma, h0, h1):  # pragma: no cover - numba
    n = addrs.shape[0]
    for c in prange((n + _DIGEST_CHUNK - 1) // _DIGEST_CHUNK):
        _ipv4_digest_range(addrs, ports, iv, sigma, h0, h1, c * _DIGEST_CHUNK, min(n, (c + 1) * _DIGEST_CHUNK))


def ipv4_digests(addrs: np.ndarray, ports: np.ndarray,
                 parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(h0, h1) of each IPv4 backend, as _digests() gives for its key
    "a.b.c.d:port" (addrs: host-order ints, ports: ints). parallel=None
    or True: in parallel if there is more than one task's worth of keys
    (one task is never worth a region); False: never."""
    addrs = np.ascontiguousarray(addrs, np.int64)
    ports = np.ascontiguousarray(ports, np.int64)
    h0, h1 = np.empty(len(addrs), np.uint64), np.empty(len(addrs), np.uint64)
    if parallel is not False and len(addrs) > _DIGEST_CHUNK:
        _ipv4_digests_parallel(addrs, ports, _B2_IV, _B2_SIGMA, h0, h1)
    else:
        _ipv4_digest_range(addrs, ports, _B2_IV, _B2_SIGMA, h0, h1, 0, len(addrs))
    return h0, h1


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


@njit(cache=True, nogil=True, inline="always")
def _build_service(out, ok, h0, h1, weights, bstart, tstart, s):  # pragma: no cover - numba
    """Service s of a batch: backends bstart[s]:bstart[s+1], slots
    tstart[s]:tstart[s+1]; ok[s] is False on a duplicate backend."""
    b0, b1 = bstart[s], bstart[s + 1]
    t0, t1 = tstart[s], tstart[s + 1]
    if t1 > t0:
        ok[s] = _build_into(out[t0:t1], h0[b0:b1], h1[b0:b1], weights[b0:b1])


@njit(cache=True, parallel=True)
def _build_many(h0, h1, weights, bstart, tstart):  # pragma: no cover - numba
    """All services, in parallel (_build_service each)."""
    n_svc = bstart.shape[0] - 1
    out = np.empty(tstart[n_svc], np.int32)
    ok = np.ones(n_svc, np.bool_)
    for s in prange(n_svc):
        _build_service(out, ok, h0, h1, weights, bstart, tstart, s)
    return out, ok


@njit(cache=True, nogil=True)
def _build_serial(h0, h1, weights, bstart, tstart):  # pragma: no cover - numba
    """_build_many without a parallel region (a few services)."""
    n_svc = bstart.shape[0] - 1
    out = np.empty(tstart[n_svc], np.int32)
    ok = np.ones(n_svc, np.bool_)
    for s in range(n_svc):
        _build_service(out, ok, h0, h1, weights, bstart, tstart, s)
    return out, ok


# ---- Python entry points ------------------------------------------------

Backends = Sequence[tuple[str, int]]  # (key, weight) of the active backends


_PRIME_SET = frozenset(PRIMES)


def _bad_size(s: int, m: int, n: int) -> ValueError:
    return ValueError(f"service #{s}: size {m} for {n} backends (want one of PRIMES, 0 iff none)")


def _small_starts(counts: list[int], sizes: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(_starts(counts), _starts(_table_sizes(counts, sizes))) for a few
    services, in Python ints: a dozen numpy calls on one-element arrays
    cost more than the table they size (the one-service update's path)."""
    if sizes is None:
        m = [table_size(n) for n in counts]
    else:
        m = [int(x) for x in sizes]
        if len(m) != len(counts):
            raise ValueError(f"{len(m)} sizes for {len(counts)} services")
        for s, (n, x) in enumerate(zip(counts, m)):
            if (n == 0) != (x == 0) or (x and x not in _PRIME_SET):
                raise _bad_size(s, x, n)
    return (np.array([0, *itertools.accumulate(counts)], np.int64),
            np.array([0, *itertools.accumulate(m)], np.int64))


def _table_sizes(counts: np.ndarray, sizes: Sequence[int] | None) -> np.ndarray:
    """Each service's table size: `sizes` checked, or table_size() of its count."""
    if sizes is None:  # table_size(), vectorised
        i = np.minimum(np.searchsorted(_PRIMES, 100 * counts), len(PRIMES) - 1)
        return np.where(counts > 0, _PRIMES[i], 0)
    m = np.asarray(sizes, np.int64)
    if m.shape != counts.shape:
        raise ValueError(f"{len(m)} sizes for {len(counts)} services")
    known = _PRIMES[np.minimum(np.searchsorted(_PRIMES, m), len(PRIMES) - 1)] == m
    wrong = np.nonzero(((counts == 0) != (m == 0)) | ((m != 0) & ~known))[0].tolist()
    if wrong:
        s = min(wrong)
        raise _bad_size(s, m[s], counts[s])
    return m


def _starts(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _flatten(services: Sequence[Backends], sizes: Sequence[int] | None):
    counts = np.fromiter((len(s) for s in services), np.int64, len(services))
    flat = [b for svc in services for b in svc]
    weights = np.fromiter((w for _, w in flat), np.int64, len(flat))
    if len(flat) and weights.min() < 1:
        bad = flat[int(np.argmin(weights))]
        raise ValueError(f"backend {bad[0]!r}: weight must be >= 1, not {bad[1]}")
    m = _table_sizes(counts, sizes)
    h = _digests([k for k, _ in flat])
    return np.ascontiguousarray(h[:, 0]), np.ascontiguousarray(h[:, 1]), weights, _starts(counts), _starts(m)


def _duplicates(services: Sequence[Backends], s: int, number: int | None = None) -> ValueError:
    keys = [k for k, _ in services[s]]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    return ValueError(f"service #{s if number is None else number}: duplicate backend {', '.join(map(repr, dups))}")


def build_tables(
    services: Sequence[Backends], sizes: Sequence[int] | None = None, parallel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables for many services in one native call.

    `services[s]` lists (key, weight) of service s's active backends;
    `sizes[s]` (default: table_size of its count) its table size.
    Returns (slots, offsets, sizes), all flat arrays: service s's table is
    ``slots[offsets[s]:offsets[s] + sizes[s]]``, int32 indices into
    services[s] (size 0 for a service without backends). parallel=None:
    a parallel region only for a big batch (use_parallel)."""
    h0, h1, weights, bstart, tstart = _flatten(services, sizes)
    if parallel is None:
        parallel = use_parallel(len(services), int(tstart[-1]))
    slots, ok = (_build_many if parallel else _build_serial)(h0, h1, weights, bstart, tstart)
    if not ok.all():
        raise _duplicates(services, int(np.argmin(ok)))
    return slots, tstart[:-1].copy(), np.diff(tstart)


def build_tables_ipv4(
    addrs: np.ndarray, ports: np.ndarray, weights: np.ndarray, counts: np.ndarray,
    sizes: Sequence[int] | None = None, parallel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """build_tables() for IPv4 backends given as flat arrays, without a
    Python object per backend: service s has the next counts[s] entries of
    addrs (host-order ints), ports and weights. Its key is "a.b.c.d:port",
    so the tables are the ones build_tables() makes from those keys.
    parallel=None: a parallel region only for a big batch (use_parallel);
    False never enters one."""
    counts = np.asarray(counts, np.int64)
    weights = np.ascontiguousarray(weights, np.int64)
    if len(weights) != counts.sum():
        raise ValueError(f"{len(weights)} backends, the counts add up to {counts.sum()}")
    if len(weights) and weights.min() < 1:
        i = int(np.argmin(weights))
        raise ValueError(f"backend #{i}: weight must be >= 1, not {weights[i]}")
    if len(counts) <= SERIAL_MAX_SERVICES:
        bstart, tstart = _small_starts(counts.tolist(), sizes)
    else:
        bstart, tstart = _starts(counts), _starts(_table_sizes(counts, sizes))
    if parallel is None:
        parallel = use_parallel(len(counts), int(tstart[-1]))
    h0, h1 = ipv4_digests(addrs, ports, parallel)
    slots, ok = (_build_many if parallel else _build_serial)(h0, h1, weights, bstart, tstart)
    if not ok.all():
        s = int(np.argmin(ok))
        b0, b1 = bstart[s], bstart[s + 1]
        raise _duplicates([[(f"{ipaddress.IPv4Address(int(a))}:{int(p)}", 1)
                            for a, p in zip(addrs[b0:b1], ports[b0:b1])]], 0, s)
    return slots, tstart[:-1].copy(), np.diff(tstart)


@njit(cache=True, nogil=True)
def _build_one_ipv4(backends, m, iv, sigma):  # pragma: no cover - numba
    """One service's table (int32[m], indices into backends) from int64[n, 3]
    rows (host-order address, port, weight); ok is False on a duplicate."""
    n = backends.shape[0]
    h0, h1 = np.empty(n, np.uint64), np.empty(n, np.uint64)
    _ipv4_digest_range(backends[:, 0].copy(), backends[:, 1].copy(), iv, sigma, h0, h1, 0, n)
    table = np.empty(m, np.int32)
    ok = _build_into(table, h0, h1, backends[:, 2].copy())
    return table, ok


def build_table_ipv4(backends: Sequence[tuple[int, int, int]], size: int) -> np.ndarray:
    """build_tables_ipv4() for one service, from (host-order address, port,
    weight) of its active backends, in one native call and no parallel
    region: the one-service update's path, where a dozen numpy calls on
    arrays of a few elements cost more than the table. `size` is the table
    size (a PRIMES entry)."""
    if size not in _PRIME_SET or not backends:
        raise _bad_size(0, size, len(backends))
    for i, (_, _, w) in enumerate(backends):
        if w < 1:
            raise ValueError(f"backend #{i}: weight must be >= 1, not {w}")
    table, ok = _build_one_ipv4(np.array(backends, np.int64), size, _B2_IV, _B2_SIGMA)
    if not ok:
        raise _duplicates([[(f"{ipaddress.IPv4Address(a)}:{p}", 1) for a, p, _ in backends]], 0)
    return table


@njit(cache=True, nogil=True, inline="always")
def _place_table(out, out_offsets, slots, offsets, sizes, ids, id_offsets, s):  # pragma: no cover - numba
    o, t, base = out_offsets[s], offsets[s], id_offsets[s]
    for k in range(sizes[s]):
        out[o + k] = ids[base + slots[t + k]]


@njit(cache=True, parallel=True)
def _place(out, out_offsets, slots, offsets, sizes, ids, id_offsets):  # pragma: no cover - numba
    for s in prange(sizes.shape[0]):
        _place_table(out, out_offsets, slots, offsets, sizes, ids, id_offsets, s)


@njit(cache=True, nogil=True)
def _place_serial(out, out_offsets, slots, offsets, sizes, ids, id_offsets):  # pragma: no cover - numba
    """_place without a parallel region."""
    for s in range(sizes.shape[0]):
        _place_table(out, out_offsets, slots, offsets, sizes, ids, id_offsets, s)


def place_tables(out: np.ndarray, out_offsets: Sequence[int], slots: np.ndarray, offsets: Sequence[int],
                 sizes: Sequence[int], ids: np.ndarray, id_offsets: Sequence[int]) -> None:
    """Write tables as ids: table s (slots[offsets[s]:+sizes[s]], indices
    into its service's backends) goes to out[out_offsets[s]:], each index i
    written as ids[id_offsets[s] + i]. Many tables: one native pass,
    parallel only for a big batch (use_parallel)."""
    ids = np.ascontiguousarray(ids, out.dtype)
    if len(sizes) <= SERIAL_MAX_SERVICES:      # a few: numpy, no native call at all
        for o, t, n, base in zip(out_offsets, offsets, sizes, id_offsets):
            out[o:o + n] = ids[base + slots[t:t + n]]
        return
    sizes = np.asarray(sizes, np.int64)
    place = _place if use_parallel(len(sizes), int(sizes.sum())) else _place_serial
    place(out, np.asarray(out_offsets, np.int64), slots, np.asarray(offsets, np.int64),
          sizes, ids, np.asarray(id_offsets, np.int64))


# Every function above that opens a parallel region (numba parallel=True);
# tests check this list against the module and that small inputs call none.
PARALLEL_FUNCTIONS = ("_ipv4_digests_parallel", "_build_many", "_place")


def build_table(backends: Backends, size: int | None = None) -> np.ndarray:
    """One service's table: int32[size] (default table_size(len(backends)))
    of indices into `backends`. Same as build_tables([backends])."""
    h0, h1, weights, _, tstart = _flatten([backends], None if size is None else [size])
    table = np.empty(int(tstart[1]), np.int32)
    if table.size and not _build_into(table, h0, h1, weights):
        raise _duplicates([backends], 0)
    return table
