"""lb.alloc: region/id allocators and deferred reclaim."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import stateful
from hypothesis import strategies as st

from lb.alloc import IdAllocator, Reclaimer, RegionAllocator, membarrier_grace

# ---- RegionAllocator ----------------------------------------------------


def test_region_first_fit_and_coalescing():
    r = RegionAllocator(100)
    a, b, c = r.alloc(10), r.alloc(20), r.alloc(30)
    assert (a, b, c) == (0, 10, 30)
    assert r.used == 60 and r.free_total == 40 and r.largest_free == 40
    r.free(a, 10)
    r.free(c, 30)
    assert r.free_runs() == [(0, 10), (30, 70)]
    assert r.alloc(5) == 0  # first fit
    r.free(0, 5)
    r.free(b, 20)  # merges with both neighbours
    assert r.free_runs() == [(0, 100)]
    assert r.used == 0


def test_region_alloc_failure():
    r = RegionAllocator(10)
    assert r.alloc(11) is None
    assert r.alloc(10) == 0
    assert r.alloc(1) is None
    with pytest.raises(ValueError):
        r.alloc(0)
    assert RegionAllocator(0).alloc(1) is None


def test_region_fragmentation_is_reported():
    r = RegionAllocator(30)
    offs = [r.alloc(10) for _ in range(3)]
    r.free(offs[0], 10)
    r.free(offs[2], 10)
    assert r.free_total == 20 and r.largest_free == 10
    assert r.alloc(20) is None


def test_region_double_free_and_bounds():
    r = RegionAllocator(100)
    off = r.alloc(10)
    r.free(off, 10)
    with pytest.raises(ValueError, match="free already"):
        r.free(off, 10)
    r.alloc(50)
    with pytest.raises(ValueError, match="free already"):
        r.free(40, 20)  # straddles the end of the used run
    with pytest.raises(ValueError, match="outside"):
        r.free(90, 20)


def test_region_reserve():
    r = RegionAllocator(100)
    r.reserve(40, 10)
    r.reserve(0, 5)
    r.reserve(95, 5)
    assert r.free_runs() == [(5, 35), (50, 45)]
    for off, size in [(45, 10), (35, 10), (0, 1), (99, 1), (98, 5), (-1, 2)]:
        with pytest.raises(ValueError, match="overlaps"):
            r.reserve(off, size)
    assert r.alloc(36) == 50  # first fit skips the reserved hole
    r.free(40, 10)
    assert r.free_runs() == [(5, 45), (86, 9)]


def test_region_copy_is_independent():
    r = RegionAllocator(100)
    r.alloc(10)
    dry = r.copy()
    dry.alloc(50)
    dry.free(0, 10)
    assert r.used == 10 and r.free_runs() == [(10, 90)]
    assert dry.used == 50


class RegionMachine(stateful.RuleBasedStateMachine):
    """Random alloc/free/reserve against a model: a set of used cells."""

    TOTAL = 64

    def __init__(self) -> None:
        super().__init__()
        self.r = RegionAllocator(self.TOTAL)
        self.live: list[tuple[int, int]] = []
        self.cells: set[int] = set()
        self.snapshot: tuple[RegionAllocator, set[int]] | None = None

    @stateful.rule(size=st.integers(1, 20))
    def alloc(self, size):
        off = self.r.alloc(size)
        free = [i for i in range(self.TOTAL) if i not in self.cells]
        fits = [o for o in free if all(o + k in free for k in range(size)) and o + size <= self.TOTAL]
        if off is None:
            assert not fits
            return
        assert off == min(fits)  # first fit, and never over a used cell
        self.live.append((off, size))
        self.cells |= set(range(off, off + size))

    @stateful.rule(data=st.data())
    def free(self, data):
        if self.live:
            off, size = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
            self.r.free(off, size)
            self.cells -= set(range(off, off + size))

    @stateful.rule(off=st.integers(0, 63), size=st.integers(1, 8))
    def reserve(self, off, size):
        span = set(range(off, off + size))
        if off + size <= self.TOTAL and not span & self.cells:
            self.r.reserve(off, size)
            self.live.append((off, size))
            self.cells |= span
        else:
            with pytest.raises(ValueError):
                self.r.reserve(off, size)

    @stateful.rule(off=st.integers(0, 63), size=st.integers(1, 8))
    def bad_free(self, off, size):
        span = set(range(off, off + size))
        if span - self.cells or off + size > self.TOTAL:
            with pytest.raises(ValueError):
                self.r.free(off, size)

    @stateful.rule()
    def take_snapshot(self):
        self.snapshot = (self.r.copy(), set(self.cells))

    @stateful.invariant()
    def consistent(self):
        runs = self.r.free_runs()
        free_cells = {o + k for o, s in runs for k in range(s)}
        assert free_cells == set(range(self.TOTAL)) - self.cells
        # Coalesced: runs are sorted, disjoint and never touch.
        assert all(o1 + s1 < o2 for (o1, s1), (o2, _) in zip(runs, runs[1:]))
        assert self.r.used == len(self.cells)
        assert self.r.largest_free == max((s for _, s in runs), default=0)
        if self.snapshot:  # copies never see later changes
            snap, cells = self.snapshot
            assert snap.used == len(cells)


TestRegionMachine = RegionMachine.TestCase
TestRegionMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40))
def test_region_no_overlap(sizes):
    r = RegionAllocator(500)
    got = [(off, s) for s in sizes if (off := r.alloc(s)) is not None]
    spans = sorted(got)
    assert all(o1 + s1 <= o2 for (o1, s1), (o2, _) in zip(spans, spans[1:]))
    for off, s in got:
        r.free(off, s)
    assert r.free_runs() == [(0, 500)]  # everything coalesced back


# ---- IdAllocator ----------------------------------------------------------


def test_id_lowest_first_and_exhaustion():
    ids = IdAllocator(1, 5)
    assert [ids.alloc() for _ in range(4)] == [1, 2, 3, 4]
    assert ids.alloc() is None
    ids.release(3)
    ids.release(2)
    assert ids.alloc() == 2 and ids.alloc() == 3
    assert ids.count == 4 and ids.capacity == 4


def test_id_reserve_and_errors():
    ids = IdAllocator(1, 10)
    ids.reserve(1)
    ids.reserve(3)
    assert [ids.alloc(), ids.alloc()] == [2, 4]
    with pytest.raises(ValueError, match="already in use"):
        ids.reserve(3)
    with pytest.raises(ValueError, match="outside"):
        ids.reserve(10)
    with pytest.raises(ValueError, match="not allocated"):
        ids.release(7)
    ids.release(3)
    with pytest.raises(ValueError, match="not allocated"):
        ids.release(3)
    assert ids.in_use(4) and not ids.in_use(3)


def test_id_copy_is_independent():
    ids = IdAllocator(0, 4)
    ids.alloc()
    dry = ids.copy()
    dry.alloc()
    dry.release(0)
    assert ids.in_use(0) and not ids.in_use(1) and ids.count == 1
    assert dry.count == 1 and dry.in_use(1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "reserve"]), st.integers(0, 15)), max_size=60))
def test_id_model(ops):
    ids = IdAllocator(2, 14)
    used: set[int] = set()
    for op, x in ops:
        if op == "alloc":
            got = ids.alloc()
            free = set(range(2, 14)) - used
            assert got == (min(free) if free else None)
            if got is not None:
                used.add(got)
        elif op == "release":
            if x in used:
                ids.release(x)
                used.remove(x)
            else:
                with pytest.raises(ValueError):
                    ids.release(x)
        else:
            if 2 <= x < 14 and x not in used:
                ids.reserve(x)
                used.add(x)
            else:
                with pytest.raises(ValueError):
                    ids.reserve(x)
        assert ids.count == len(used)
        assert all(ids.in_use(i) == (i in used) for i in range(0, 16))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "reserve"]), st.integers(0, 15)), max_size=40),
       st.integers(0, 14))
def test_id_alloc_many_is_n_allocs(ops, n):
    ids = IdAllocator(2, 14)
    for op, x in ops:
        if op == "alloc":
            ids.alloc()
        elif op == "release" and ids.in_use(x):
            ids.release(x)
        elif op == "reserve" and 2 <= x < 14 and not ids.in_use(x):
            ids.reserve(x)
    one_by_one = ids.copy()
    want = [one_by_one.alloc() for _ in range(n)]
    got = ids.alloc_many(n)
    if None in want:
        assert got is None and ids.count == one_by_one.count - sum(w is not None for w in want)
    else:
        assert got == want and ids.count == one_by_one.count
        assert ids.alloc() == one_by_one.alloc()     # the same state afterwards


# ---- Reclaimer ------------------------------------------------------------


class FakeGrace:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise OSError("no grace period today")


def test_nothing_released_before_synchronize():
    grace = FakeGrace()
    rec = Reclaimer(grace=grace)
    regions, ids = RegionAllocator(10), IdAllocator(1, 3)
    off, i = regions.alloc(10), ids.alloc()
    ran: list[str] = []
    rec.retire_region(regions, off, 10)
    rec.retire_id(ids, i)
    rec.retire_callback(lambda: ran.append("cb"))
    assert rec.pending == 3
    # Still owned: nobody can be handed the retired region or id yet.
    assert regions.alloc(1) is None
    assert ids.alloc() == 2 and ids.alloc() is None
    assert ran == [] and grace.calls == 0

    assert rec.synchronize() == 3
    assert grace.calls == 1 and rec.pending == 0
    assert ran == ["cb"]
    assert regions.alloc(10) == 0 and ids.alloc() == 1


def test_synchronize_empty_skips_the_wait():
    grace = FakeGrace()
    rec = Reclaimer(grace=grace)
    assert rec.synchronize() == 0 and grace.calls == 0


def test_release_order_is_retirement_order():
    rec = Reclaimer(grace=FakeGrace())
    ran: list[int] = []
    for k in range(5):
        rec.retire_callback(lambda k=k: ran.append(k))
    rec.synchronize()
    assert ran == [0, 1, 2, 3, 4]


def test_items_retired_during_the_wait_wait_for_the_next():
    ids = IdAllocator(0, 2)
    a, b = ids.alloc(), ids.alloc()
    rec: Reclaimer
    waits: list[int] = []

    def grace() -> None:
        # Retired while this grace period is already running: a packet that
        # started just before might still see it.
        waits.append(1)
        if len(waits) == 1:
            rec.retire_id(ids, b)

    rec = Reclaimer(grace=grace)
    rec.retire_id(ids, a)
    assert rec.synchronize() == 1
    assert not ids.in_use(a) and ids.in_use(b) and rec.pending == 1
    rec.synchronize()
    assert not ids.in_use(b)


def test_failed_wait_releases_nothing():
    grace = FakeGrace()
    grace.fail = True
    rec = Reclaimer(grace=grace)
    ids = IdAllocator(0, 1)
    rec.retire_id(ids, ids.alloc())
    with pytest.raises(OSError):
        rec.synchronize()
    assert rec.pending == 1 and ids.in_use(0)
    grace.fail = False
    rec.synchronize()
    assert not ids.in_use(0)


def test_retiring_what_is_not_allocated_fails_early():
    rec = Reclaimer(grace=FakeGrace())
    with pytest.raises(ValueError):
        rec.retire_id(IdAllocator(0, 4), 1)
    with pytest.raises(ValueError):
        rec.retire_region(RegionAllocator(10), 0, 5)
    assert rec.pending == 0


def test_membarrier_grace_for_real():
    # Needs no privileges; waits for synchronize_rcu() on a multi-CPU box.
    assert membarrier_grace() == 0
    rec = Reclaimer()  # the default grace is membarrier
    ids = IdAllocator(0, 1)
    rec.retire_id(ids, ids.alloc())
    assert rec.synchronize() == 1 and not ids.in_use(0)


def test_retiring_twice_fails_early():
    rec = Reclaimer(grace=FakeGrace())
    ids, regions = IdAllocator(0, 4), RegionAllocator(10)
    i, off = ids.alloc(), regions.alloc(5)
    rec.retire_id(ids, i)
    rec.retire_region(regions, off, 5)
    with pytest.raises(ValueError, match="twice"):
        rec.retire_id(ids, i)
    with pytest.raises(ValueError, match="twice"):
        rec.retire_region(regions, off, 5)
    assert rec.synchronize() == 2
    # Reused after the grace period: may be retired again.
    i = ids.alloc()
    rec.retire_id(ids, i)
    assert rec.pending == 1


def test_reclaimer_begin_finish_waits_outside_the_lock():
    """begin() sets aside what is retired now; finish() after a grace period
    releases exactly that; a synchronize() in between releases it too, and
    what is retired after begin() waits for the next grace period."""
    graces = []
    r = Reclaimer(grace=lambda: graces.append(1))
    ids = IdAllocator(1, 10)
    a, b, c = ids.alloc(), ids.alloc(), ids.alloc()
    r.retire_id(ids, a)
    assert r.begin() == 1 and r.pending == 1
    r.retire_id(ids, b)                     # after begin(): not covered by this grace period
    r.grace()
    assert r.finish() == 1
    assert not ids.in_use(a) and ids.in_use(b) and r.pending == 1
    assert r.begin() == 1
    r.retire_id(ids, c)
    assert r.synchronize() == 2             # its own grace period covers the set-aside item
    assert r.finish() == 0 and r.pending == 0
    assert not ids.in_use(b) and not ids.in_use(c) and len(graces) == 2
