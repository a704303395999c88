"""PageTable.iter_present as x86's TDP MMU uses it (for_each_tdp_pte): the same entries as the
walker in any range, over a format whose empty entry is not 0, and lazy: an entry is read
when the iteration gets to it."""

from __future__ import annotations

import random

import pytest

from kvmcore.pgtable import LEAF, TABLE_PRE, Geometry, PageTable, TableStore

EMPTY = 1 << 63
GEO = Geometry(shifts=(30, 21, 12), bits=(9, 9, 9), level_ids=(3, 2, 1), ia_bits=39)


class Fmt:
    """Bit 0 valid; bit 1 a table above the last level; bit 2 an invalid but non-empty
    marker (as an x86 MMIO SPTE); the empty entry is bit 63."""

    empty = EMPTY

    def is_valid(self, pte, level):
        return bool(pte & 1)

    def is_table(self, pte, level):
        return bool(pte & 2)

    def table_address(self, pte, level):
        return pte & ((1 << 52) - 1) & ~0xFFF


def _tree(seed: int):
    """Random tables of 512 entries: sparse, dense and runs, leaves, markers, sub-tables."""
    rng = random.Random(seed)
    store = TableStore()
    pt = PageTable(store, GEO, Fmt())

    def fill(pa, pos):
        table = store[pa]
        table[:] = table.__class__("Q", [EMPTY]) * 512
        density = rng.choice((0.002, 0.02, 0.3, 1.0))
        children = 0
        for i in range(512):
            if rng.random() >= density:
                continue
            kind = rng.random()
            if pos < 2 and kind < 0.1 and children < 6:
                children += 1
                child = store.alloc(512)
                table[i] = child | 3
                fill(child, pos + 1)
            elif kind < 0.2:
                table[i] = 4            # invalid, not empty
            else:
                table[i] = (i << 12) | 1

    fill(pt.root, 0)
    return pt


def _walked(pt, start, end, leaves_only):
    out = []

    def visit(ctx):
        out.append((ctx.table_pa, ctx.index, ctx.pos, ctx.addr, ctx.pte))

    pt.walk(start, end, visit, LEAF if leaves_only else LEAF | TABLE_PRE)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_iter_present_yields_what_the_walker_visits(seed):
    pt = _tree(seed)
    rng = random.Random(seed)
    by_id = {id(t): pa for pa, t in pt.store.tables.items()}
    for _ in range(20):
        start = rng.randrange(1 << 39) if rng.random() < 0.7 else 0
        end = start + rng.choice((1 << 12, 1 << 20, 1 << 21, 1 << 30, 1 << 39))
        leaves_only = rng.random() < 0.5
        got = [(by_id[id(t)], i, pos, addr, pte)
               for t, i, pos, addr, pte in pt.iter_present(start, end, leaves_only)]
        assert got == _walked(pt, start, end, leaves_only)


def test_iter_present_is_lazy():
    """An entry written ahead of the iteration (past a span it skips) is seen; one written
    behind it is not."""
    store = TableStore()
    pt = PageTable(store, GEO, Fmt())
    root = store[pt.root]
    root[:] = root.__class__("Q", [EMPTY]) * 512
    child = store.alloc(512)
    store[child][:] = root.__class__("Q", [EMPTY]) * 512
    root[1] = child | 3
    store[child][5] = (5 << 12) | 1
    it = pt.iter_present(0, 1 << 39, leaves_only=True)
    assert next(it)[1] == 5
    store[child][3] = 1         # behind: not seen
    store[child][300] = 1       # ahead, past empty spans of 8 and 64: seen
    root[400] = 1               # ahead in the parent: seen after the child
    assert [(i, pos) for _t, i, pos, _a, _p in it] == [(300, 1), (400, 0)]
