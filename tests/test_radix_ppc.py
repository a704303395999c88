"""The core additions the Power backend's migration onto kvmcore.radix needs: a format's own view
of stored entries (``RadixFormat.stored``), ``Mapping.raw`` as stored, ``check`` and ``tables``
surviving a link to no table, ``check`` reading only the non-empty entries, the walk of an
unlinked subtree (``PageTable.walk_subtree``) and ``lookup`` over precomputed masks and a
format's declared ``table_bits``."""

from __future__ import annotations

import pytest

from kvmcore.pgtable import LEAF, TABLE_POST
from kvmcore.radix import RadixTable, _Stored, bswap64
from test_radix import RWXAD, T, V
from test_radix import BigToy as Big


class InPlace:
    """A view that tests stored words without swapping them (as Power's does), counting."""

    empty = 0

    def __init__(self):
        self.calls = 0

    def is_valid(self, raw, level):
        self.calls += 1
        return raw & bswap64(V)

    def is_table(self, raw, level):
        return level > 0 and raw & bswap64(T)

    def table_address(self, raw, level):
        return Big().table_address(bswap64(raw), level)


class BigInPlace(Big):
    def __init__(self):
        self.view = InPlace()

    def stored(self):
        return self.view


def test_stored_view_default_and_own():
    assert isinstance(Big().stored(), _Stored)
    little = type("Little", (Big,), {"big_endian": False})()
    assert little.stored() is little
    fmt = BigInPlace()
    t = RadixTable(fmt)
    assert t.pt.fmt is fmt.view
    t.map(0x4020_3000, 0, fmt.make_leaf(0x9000_0000, 0, RWXAD))
    assert t.lookup(0x4020_3000)[3] == fmt.make_leaf(0x9000_0000, 0, RWXAD) and fmt.view.calls
    assert [(a, lvl) for a, lvl, _ in t.leaves(0, 1 << 40)] == [(0x4020_3000, 0)]


def test_mapping_raw_is_the_stored_entry():
    fmt = Big()
    t = RadixTable(fmt)
    leaf = fmt.make_leaf(0x8000_0000, 1, RWXAD)
    t.map(0x20_0000, 1, leaf)
    (m,) = t.mappings(0, 1 << 28)
    assert m.raw == bswap64(leaf) and m.pfn == 0x8000_0000 >> 12 and m.size == 1 << 21


def test_check_reports_a_link_to_no_table_without_raising():
    fmt = Big()
    t = RadixTable(fmt)
    t.map(0x4000_0000, 0, fmt.make_leaf(0x5000, 0, RWXAD))
    root = t.store[t.pt.root]
    root[1] = bswap64(fmt.make_table(0x7_0000_0000, 2))        # no table there
    assert (0x7_0000_0000, 1) not in list(t.pt.tables())
    problems = t.check("big")
    assert any("links 0x700000000, not a table of the next level" in p for p in problems)
    assert any("not reachable" in p for p in problems)        # the unlinked 2M table


def test_check_reads_only_entries_that_are_not_empty():
    """A format whose non-present value is not 0 (x86's SHADOW_NONPRESENT_VALUE): the empty
    entries are skipped, a corrupt one is still reported."""
    class Filled(Big):
        empty = 1 << 63

    fmt = Filled()
    t = RadixTable(fmt)
    t.map(0x4020_3000, 0, fmt.make_leaf(0x9000_0000, 0, RWXAD))
    assert t.check("filled") == []
    level, table, idx, _pte = t.lookup(0x4020_4000)
    table[idx] = bswap64(fmt.empty | 0x10)                    # not valid, not empty
    assert t.check("filled") == [f"filled: entry {idx} of the level-0 table at "
                                 f"{t.pt.path(0x4020_4000)[-1][1]:#x} is invalid but not "
                                 f"empty ({fmt.empty | 0x10:#x})"]


def test_walk_subtree_visits_an_unlinked_table():
    fmt = Big()
    t = RadixTable(fmt)
    for gpa in (0x4020_0000, 0x4020_5000, 0x4040_0000):
        t.map(gpa, 0, fmt.make_leaf(gpa, 0, RWXAD))
    _pos, root_pa, idx = t.pt.path(0x4000_0000)[0]
    root = t.store[root_pa]
    pde = bswap64(root[idx])
    root[idx] = 0                                              # unlinked first, as Power
    seen = []
    t.pt.walk_subtree(fmt.table_address(pde, 2), 1, 0x4000_0000,
                      lambda c: seen.append((c.flags, c.level, c.addr)), LEAF | TABLE_POST)
    assert seen == [(LEAF, 0, 0x4020_0000), (LEAF, 0, 0x4020_5000), (TABLE_POST, 1, 0x4020_0000),
                    (LEAF, 0, 0x4040_0000), (TABLE_POST, 1, 0x4040_0000)]
    assert list(t.leaves(0, 1 << 40)) == []


class Declared(InPlace):
    """The same tests, the table test declared as bits (V and T set, stored order)."""

    table_bits = (bswap64(V | T), bswap64(V | T))


@pytest.mark.parametrize("view", [InPlace, Declared])
def test_lookup_stops_where_the_hardware_does(view):
    fmt = BigInPlace()
    fmt.view = view()
    t = RadixTable(fmt)
    t.map(0x4020_0000, 1, fmt.make_leaf(0x8000_0000, 1, RWXAD))
    t.map(0x8000_3000, 0, fmt.make_leaf(0x5000, 0, RWXAD))
    fmt.view.calls = 0
    pos, _table, idx, raw = t.pt.lookup(0x4021_2345)
    assert (pos, idx, bswap64(raw)) == (1, 1, fmt.make_leaf(0x8000_0000, 1, RWXAD))
    pos, _table, idx, raw = t.pt.lookup(0x8000_3008)
    assert (pos, idx, bswap64(raw)) == (2, 3, fmt.make_leaf(0x5000, 0, RWXAD))
    pos, _table, idx, raw = t.pt.lookup(0xC000_0000)
    assert (pos, idx, raw) == (0, 3, 0)
    # Declared table bits are tested inline: is_valid is not called.
    assert (fmt.view.calls == 0) == (view is Declared)
