"""kvmcore.pgtable's stepped walker (``PageTable.walk_steps``), which arm64's shared walks run
and the plain ``walk`` drives: visits that yield race points, the stop rule, the empty range."""

import pytest
from test_pgtable import ADDR, GEO, Toy

from kvmcore.pgtable import LEAF, TABLE_PRE, PageTable, TableStore

EAGAIN = -11


def make():
    store = TableStore()
    pt = PageTable(store, GEO, Toy())
    child = store.alloc(512)
    store[pt.root][1] = child | 3
    for i in (3, 4):
        store[child][i] = (0x1000 + i) << 12 | 1
    return store, pt


def run(walk):
    """Drive a stepped walk, collecting what it yields, to its result."""
    points = []
    try:
        while True:
            points.append(next(walk))
    except StopIteration as done:
        return points, done.value


def test_a_visit_may_yield_its_race_points():
    store, pt = make()

    def cmpxchg(ctx, new):
        yield ("point", ctx.addr)
        ctx.set(new)
        return None

    def visitor(ctx):
        return cmpxchg(ctx, ctx.pte | 4)

    points, result = run(pt.walk_steps(2 << 20, 4 << 20, visitor, LEAF))
    base = 2 << 20
    assert points == [("point", base + 3 * 4096), ("point", base + 4 * 4096)]
    assert result is None
    child = store[pt.root][1] & ADDR
    assert store[child][3] & 4 and store[child][4] & 4


def test_the_stop_rule_and_the_plain_walk():
    """A result stops the walk when ``stop`` says so (arm64: -EAGAIN only in a fault's walk);
    ``walk`` is the same walk run to its end, and refuses a visit that yields."""
    _store, pt = make()
    seen = []

    def visitor(ctx):
        seen.append(ctx.addr)
        return EAGAIN

    points, result = run(pt.walk_steps(0, 1 << 30, visitor, LEAF,
                                       stop=lambda r: r != EAGAIN))
    assert (points, result, len(seen)) == ([], None, 2)
    seen.clear()
    assert run(pt.walk_steps(0, 1 << 30, visitor, LEAF))[1] == EAGAIN and len(seen) == 1
    seen.clear()
    assert pt.walk(0, 1 << 30, visitor, LEAF) == EAGAIN and len(seen) == 1

    def yields(ctx):
        yield "point"

    with pytest.raises(RuntimeError, match="walk_steps"):
        pt.walk(0, 1 << 30, yields, LEAF)


def test_visits_match_the_plain_walk_and_an_empty_range_visits_nothing():
    _store, pt = make()
    plain, stepped = [], []
    pt.walk(0, 1 << 30, lambda c: plain.append((c.flags, c.addr, c.pte)), LEAF | TABLE_PRE,
            visit_invalid=True)
    run(pt.walk_steps(0, 1 << 30, lambda c: stepped.append((c.flags, c.addr, c.pte)),
                      LEAF | TABLE_PRE, visit_invalid=True))
    assert plain == stepped and len(plain) == 512 + 512   # the root's and the child's
    assert run(pt.walk_steps(4096, 4096, stepped.append, LEAF)) == ([], None)
