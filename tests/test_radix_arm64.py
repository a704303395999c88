"""kvmcore.radix's hooks for a backend with entries of its own (arm64): ``RadixTable.check``
with a backend's ``entry`` judge and ``detached`` subtrees, and ``on_update`` for the
in-place updates of the generic operations."""

from __future__ import annotations

from test_radix import A, W, Toy

from kvmcore.radix import PERM_A, PERM_R, PERM_W, RadixTable

LOCKED = 1 << 10


def test_check_lets_the_backend_judge_its_entries():
    t = RadixTable(Toy())
    t.map(0x20_1000, 0, t.fmt.make_leaf(0x8000_1000, 0, PERM_R | PERM_A))
    _pos, table_pa, idx = t.pt.path(0x20_0000)[1]           # the level-1 entry: a table
    table = t.store[table_pa]
    pte = table[idx]
    assert t.check("toy") == []
    table[idx] = LOCKED                                     # a walker holds it in a BBM
    plain = t.check("toy")
    assert any("invalid but not empty" in p for p in plain)
    assert any("1 table(s) are leaked, not reachable from the root" in p for p in plain)
    seen = []

    def entry(table_pa, pos, index, addr, value):
        seen.append((pos, addr, value))
        if value == LOCKED:
            return [], pte
        return [f"leaf at {addr:#x}"] if pos == 2 else [], value

    problems = t.check("toy", entry)
    assert problems == ["leaf at 0x201000"], "the LOCKED entry stands for the table it replaced"
    assert (1, 0x20_0000, LOCKED) in seen
    table[idx] = pte


def test_check_walks_detached_subtrees():
    t = RadixTable(Toy())
    t.map(0x20_1000, 0, t.fmt.make_leaf(0x8000_1000, 0, PERM_R | PERM_A))
    _pos, table_pa, idx = t.pt.path(0x20_0000)[1]
    table = t.store[table_pa]
    pte, table[idx] = table[idx], 0                        # unlinked, not freed yet
    assert any("not reachable" in p for p in t.check("toy"))
    child = t.fmt.table_address(pte, 1)
    assert t.check("toy", detached=[(child, 2, 0x20_0000)]) == []


def test_on_update_sees_each_in_place_change():
    t = RadixTable(Toy())
    for gpa in (0x1000, 0x2000):
        t.map(gpa, 0, t.fmt.make_leaf(gpa + 0x8000_0000, 0, PERM_R | PERM_W | PERM_A))
    seen = []
    t.on_update = lambda addr, level, old, new: seen.append((addr, level, old ^ new))
    t.wrprotect(0, 0x3000)
    assert t.test_clear_young(0, 0x3000, clear=True)
    assert seen == [(0x1000, 0, W), (0x2000, 0, W), (0x1000, 0, A), (0x2000, 0, A)]
