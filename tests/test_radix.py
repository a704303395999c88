"""kvmcore.radix: the generic operations over a declared format, in both byte orders, and the
mapping-size policy."""

from __future__ import annotations

import pytest

from kvmcore import VM, HostMemory
from kvmcore.pgtable import Geometry
from kvmcore.radix import (PERM_A, PERM_D, PERM_R, PERM_W, PERM_X, RadixFormat, RadixTable,
                           bswap64, mapping_size)
from kvmcore.records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Access, Translation
from kvmcore.scaffold.backend import RadixBackend
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, SZ_1G, SZ_2M, SZ_4K

V, T, W, X, A, D, XN = 1, 2, 4, 8, 32, 64, 1 << 54


class Toy(RadixFormat):
    """Three levels (1G, 2M, 4K), leaves at every level; XN instead of X; no R bit (every
    valid leaf readable)."""

    geometry = Geometry(shifts=(30, 21, 12), bits=(10, 9, 9), level_ids=(2, 1, 0), ia_bits=40)
    leaf_levels = frozenset({0, 1, 2})
    R, W, XN, A, D = V, W, XN, A, D

    def is_valid(self, pte, level):
        return bool(pte & V)

    def is_table(self, pte, level):
        return level > 0 and bool(pte & T)

    def table_address(self, pte, level):
        return pte & ((1 << 52) - 1) & ~0xFFF

    output_address = table_address

    def make_table(self, pa, level):
        return pa | V | T

    def make_leaf(self, pa, level, perms):
        return pa | V | self.perm_bits(perms)


class BigToy(Toy):
    big_endian = True


RWXAD = PERM_R | PERM_W | PERM_X | PERM_A | PERM_D


@pytest.fixture(params=[Toy, BigToy], ids=["le", "be"])
def table(request):
    return RadixTable(request.param())


def test_map_split_wrprotect_unmap(table):
    fmt = table.fmt
    span = table.map(0x4000_0000, 2, fmt.make_leaf(0x8000_0000, 2, RWXAD))
    assert not span                                   # nothing was mapped before
    assert [(a, lvl) for a, lvl, _ in table.leaves(0, 1 << 40)] == [(0x4000_0000, 2)]
    raw = table.store[table.pt.root][1]
    assert (bswap64(raw) if fmt.big_endian else raw) & V
    # A 4K leaf inside the block, splitting it: the rest keeps mapping the block's frames.
    span = table.map(0x4000_3000, 0, fmt.make_leaf(0x9000_0000, 0, PERM_R | PERM_A), split=True)
    assert (span.lo, span.hi) == (0x4000_0000, 0x8000_0000)
    leaves = list(table.leaves(0x4000_0000, 0x4020_0000))
    assert len(leaves) == 512 and all(lvl == 0 for _a, lvl, _p in leaves)
    assert fmt.output_address(leaves[2][2], 0) == 0x8000_2000
    assert fmt.output_address(leaves[3][2], 0) == 0x9000_0000
    assert table.check("toy") == []
    # wrprotect clears W only, and reports the span of the leaves it changed.
    span = table.wrprotect(0x4000_0000, 0x4000_2000)
    assert (span.lo, span.hi) == (0x4000_0000, 0x4000_2000)
    p = fmt.perms(next(table.leaves(0x4000_0000, 0x4000_1000))[2])
    assert p & PERM_D and not p & PERM_W
    # unmap of one byte zaps a whole 2M leaf and frees the emptied tables.
    table.map(0x8000_0000, 1, fmt.make_leaf(0x1_0000_0000, 1, RWXAD))
    before = table.page_table_bytes()
    span = table.unmap_range(0x8010_0000, 0x8010_0001)
    assert (span.lo, span.hi) == (0x8000_0000, 0x8020_0000)
    assert table.page_table_bytes() < before
    assert table.check("toy") == []


def test_a_table_replaced_by_a_block_is_freed(table):
    fmt = table.fmt
    table.map(0x20_0000, 0, fmt.make_leaf(0x5000, 0, RWXAD))
    tables = len(table.store)
    span = table.map(0x20_0000, 1, fmt.make_leaf(0x40_0000, 1, RWXAD))
    assert (span.lo, span.hi) == (0x20_0000, 0x40_0000) and len(table.store) == tables - 1
    assert table.check("toy") == []


def test_translate_hardware_or_fault_ad(table):
    fmt = table.fmt
    table.map(0x1000, 0, fmt.make_leaf(0x7000, 0, PERM_R))      # no A, no D, no X
    read, write = Access("read"), Access("write")
    assert table.translate(0x1000, read, hw_ad=False).kind == ACCESS_FLAG
    t = table.translate(0x1008, read, hw_ad=True)
    assert isinstance(t, Translation) and t.pfn == 7 and not t.executable
    assert table.translate(0x1000, write, hw_ad=True).kind == PERMISSION
    assert table.translate(0x2000, read, hw_ad=True).kind == NOT_PRESENT
    assert table.test_clear_young(0, 0x2000, clear=True)
    assert not table.test_clear_young(0, 0x2000, clear=False)


def test_wrprotect_mask_covers_a_huge_leaf_once(table):
    fmt = table.fmt
    table.map(0x20_0000, 1, fmt.make_leaf(0x40_0000, 1, RWXAD))
    span = table.wrprotect_mask(0x200, 0b1011)
    assert (span.lo, span.hi) == (0x20_0000, 0x40_0000)
    assert not fmt.perms(next(table.leaves(0x20_0000, 0x20_1000))[2]) & PERM_W


def test_check_finds_a_misaligned_leaf_and_a_leaked_table(table):
    fmt = table.fmt
    table.map(0x20_0000, 1, fmt.make_leaf(0x40_1000, 1, RWXAD))
    table.store.alloc(512)
    problems = table.check("toy")
    assert any("not aligned" in p for p in problems)
    assert any("not reachable" in p for p in problems)


def test_mapping_size_policy():
    """hugetlb 1G falls to 2M where the slot is not 1G-congruent; THP stops at the PMD;
    logging and PFNMAP map base pages."""
    host = HostMemory()
    vm = VM(arch=RadixBackend, host=host)
    sizes = (SZ_4K, SZ_2M, SZ_1G)
    hva = host.mmap(2 * SZ_1G, kind="hugetlb_1g")
    vm.set_user_memory_region(0, SZ_1G + SZ_2M, SZ_1G - SZ_2M, hva + SZ_2M)
    vcpu = vm.create_vcpu(0)
    vcpu.read(SZ_1G + SZ_2M, 1)
    fault = _fault(vm, SZ_1G + SZ_2M)
    assert mapping_size(vm, fault, sizes, logging=False) == SZ_2M
    assert mapping_size(vm, fault, sizes, logging=True) == SZ_4K
    thp = host.mmap(4 * SZ_2M, thp=True)
    vm.set_user_memory_region(1, 8 * SZ_1G, 4 * SZ_2M, thp, KVM_MEM_LOG_DIRTY_PAGES)
    vm.set_user_memory_region(1, 8 * SZ_1G, 4 * SZ_2M, thp)
    vcpu.write(8 * SZ_1G, b"x")
    assert mapping_size(vm, _fault(vm, 8 * SZ_1G), sizes, logging=False) == SZ_2M
    fault.pfnmap = True
    assert mapping_size(vm, fault, sizes, logging=False) == SZ_4K
    assert mapping_size(vm, fault, sizes, logging=False, pfnmap_blocks=True) == SZ_2M


def _fault(vm, gpa):
    """A PageFault as faultin_pfn leaves it, for a gpa the VM already maps."""
    from kvmcore.records import PageFault

    fault = PageFault(gpa, gpa >> 12)
    fault.slot = vm.gfn_to_memslot(gpa >> 12)
    fault.hva = fault.slot.gfn_to_hva(gpa >> 12)
    fault.host_vma = vm.host.find_vma(fault.hva)
    fault.pfn = vm.lookup(gpa).pfn + ((gpa >> 12) - vm.lookup(gpa).gfn)
    fault.max_size = vm.host.host_mapping_size(fault.hva)
    return fault


def test_scaffold_leaves_carry_the_format_bits():
    host = HostMemory()
    vm = VM(arch=RadixBackend, host=host)
    vm.set_user_memory_region(0, 0, 4 * SZ_2M, host.mmap(4 * SZ_2M, thp=True))
    vcpu = vm.create_vcpu(0)
    vcpu.write(SZ_2M + 8, b"x")
    m = vm.lookup(SZ_2M)
    assert m.size == SZ_2M and m.raw & (V | W | X | A | D) == V | W | X | A | D
    assert m.raw & T == 0
    vm.check_invariants()
    assert vm.page_table_bytes() == 3 * 4096


def test_vm_factory_checks_and_closes_its_vms():
    from kvmcore.testing import VmFactory

    make = VmFactory(RadixBackend, HostMemory())
    vm = make()
    vm.set_user_memory_region(0, 0, SZ_2M, make.host.mmap(SZ_2M))
    vm.create_vcpu(0).write(0x1000, b"x")
    make.close()
    assert vm.closed and list(vm.mappings()) == []
