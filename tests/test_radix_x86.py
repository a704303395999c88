"""kvmcore.radix additions the x86 migration needs: ``RadixFormat.is_placeholder`` and
``check_entries``, the walk of ``RadixTable.check`` over several trees sharing one store (x86's
direct and mirror roots)."""

from __future__ import annotations

import pytest

from kvmcore.pgtable import TableStore
from kvmcore.radix import PERM_R, PERM_W, RadixFormat, RadixTable, check_entries

from test_radix import BigToy, Toy

#: A non-empty, invalid value a format may declare legitimate (x86: an MMIO SPTE).
MMIO = 0x6


class Placeholders(Toy):
    def is_placeholder(self, pte, level):
        return level == 0 and pte == MMIO


@pytest.fixture(params=[Toy, BigToy], ids=["le", "be"])
def trees(request):
    """Two trees of one format in one store, each with a 4K leaf."""
    store = TableStore()
    a, b = RadixTable(request.param(), store), RadixTable(request.param(), store)
    for t, addr in ((a, 0x20_1000), (b, 0x4000_0000)):
        t.map(addr, 0, t.fmt.make_leaf(0x7000, 0, PERM_R | PERM_W))
    return a, b


def test_is_placeholder_defaults_to_false():
    assert not RadixFormat().is_placeholder(MMIO, 0)


def test_a_placeholder_is_yielded_not_flagged():
    t = RadixTable(Placeholders())
    t.map(0x5000, 0, t.fmt.make_leaf(0x9000, 0, PERM_R))
    _level, table, idx, _pte = t.lookup(0x6000)
    table[idx] = MMIO
    problems = []
    entries = list(check_entries([("t", t)], problems))
    assert problems == []
    assert ("t", 0, 0x6000, MMIO, False) in entries
    assert ("t", 0, 0x5000, t.fmt.make_leaf(0x9000, 0, PERM_R), True) in entries
    table[idx] = MMIO | 0x100                      # not declared: invalid but not empty
    assert any("invalid but not empty" in p for p in t.check("t"))


def test_trees_sharing_a_store(trees):
    a, b = trees
    problems = []
    entries = list(check_entries([("a", a), ("b", b)], problems))
    assert problems == []
    # Each tree's tables and its leaf, with the address each entry maps, under its label.
    assert {(label, addr) for label, level, addr, pte, leaf in entries if leaf} == {
        ("a", 0x20_1000), ("b", 0x4000_0000)}
    # Alone, a tree calls the other's tables leaked.
    assert any("leaked, not reachable from the root" in p for p in a.check("a"))
    a.store.alloc(512)
    problems = []
    list(check_entries([("a", a), ("b", b)], problems))
    assert problems == ["a, b: 1 table(s) are leaked, not reachable from any "
                                      "root"]


def test_a_table_linked_twice_and_a_bad_link(trees):
    a, b = trees
    root_a, root_b = a.store[a.pt.root], b.store[b.pt.root]
    root_b[3] = root_a[0]                           # b links a's level-1 table too
    problems = []
    list(check_entries([("a", a), ("b", b)], problems))
    assert any("is linked twice" in p for p in problems)
    root_b[3] = a.st(a.fmt.make_table(0x1234_5000, 2))  # a link to no table: no crash
    problems = []
    list(check_entries([("a", a), ("b", b)], problems))
    assert any("links 0x12345000, not a table of the next level" in p for p in problems)
