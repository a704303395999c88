"""check_invariants: each reference invariant that holds of a state is reported when broken
(reference §9: 1 geometry, 2 entry formats, 3 X on every leaf, 6 base pages while logging,
7 RPN alignment / 52 bits, 15 no leaked tables, 19 no leaf without a memslot)."""

import pytest

from fakevm import FakeSlot, FakeVM
from kvmcore_ppc_radix import PpcRadixBackend
from kvmcore_ppc_radix import book3s_64_mmu_radix as M
from kvmcore_ppc_radix import pte as P
from kvmcore_ppc_radix.backend import check_radix_invariants
from kvmcore_ppc_radix.radix import LEVEL_PMD, LEVEL_PTE

RAM = P._PAGE_PRESENT | P._PAGE_READ | P._PAGE_WRITE | P._PAGE_ACCESSED | P._PAGE_EXEC


@pytest.fixture(params=[4096, 65536], ids=["4K", "64K"])
def setup(request):
    be = PpcRadixBackend(page_size=request.param)
    slot = FakeSlot(0, 1 << 20)
    vm = FakeVM([slot])
    M.kvmppc_create_pte(be, vm, P.pfn_pte(0x40000000, RAM, 12), 0x10000, LEVEL_PTE, 0)
    M.kvmppc_create_pte(be, vm, P.pfn_pte(0x40200000, RAM, 12), 1 << 21, LEVEL_PMD, 0)
    assert check_radix_invariants(be, vm) == []
    return be, vm, slot


def _dir_slot(be, gpa, pos):
    _pos, table_pa, idx = be.table.pt.path(gpa)[pos]
    return be.table.store[table_pa], idx


def _poke(table, idx, fn):
    table[idx] = P.cpu_to_be64(fn(P.be64_to_cpu(table[idx])))


def _expect(be, vm, word):
    problems = check_radix_invariants(be, vm)
    assert any(word in p for p in problems), problems


def test_wrong_nls(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 1)
    _poke(t, i, lambda d: (d & ~0x1F) | 5)
    _expect(be, vm, "NLS")


def test_directory_bad_bits(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 0)
    _poke(t, i, lambda d: d | 0x40)
    _expect(be, vm, "bad bits")


def test_directory_to_non_table(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 2)
    _poke(t, i, lambda d: d + 0x100000)
    _expect(be, vm, "not a table of the next level")


def test_leaf_without_x(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 3)
    _poke(t, i, lambda e: e & ~P._PAGE_EXEC)
    _expect(be, vm, "lacks X")


def test_pgd_leaf(setup):
    be, vm, _ = setup
    root = be.table.store[be.table.pt.root]
    root[1] = P.cpu_to_be64(P.pfn_pte(1 << 39, RAM, 12))
    vm.slots.append(FakeSlot(1 << 27, 1 << 20, id=1))
    _expect(be, vm, "is a leaf at a level without leaves")


def test_rpn_beyond_52_bits(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 3)
    _poke(t, i, lambda e: e | (1 << 54))
    _expect(be, vm, "beyond 52 bits")


def test_misaligned_huge_rpn(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 1 << 21, 2)
    _poke(t, i, lambda e: e + be.fmt.page_size)
    _expect(be, vm, "not aligned")


def test_huge_leaf_in_logging_slot(setup):
    be, vm, slot = setup
    slot.flags |= 1
    _expect(be, vm, "only base pages while logging")


def test_leaf_without_memslot(setup):
    be, vm, _ = setup
    vm.slots.clear()
    _expect(be, vm, "no memslot")


def test_leaked_table(setup):
    be, vm, _ = setup
    be.table.store.alloc(512)
    _expect(be, vm, "not reachable from the root")


def test_table_linked_twice(setup):
    be, vm, _ = setup
    t, i = _dir_slot(be, 0x10000, 1)
    t[i + 1] = t[i]
    _expect(be, vm, "linked twice")
