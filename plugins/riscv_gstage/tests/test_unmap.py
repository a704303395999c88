"""kvm_riscv_gstage_unmap_range (arch/riscv/kvm/gstage.c): a leaf is cleared only when the
walk reaches it at its start and it ends inside the range; one the range cuts is skipped
(silently in 6.18, WARN_ONCE in later kernels), and the walk goes on by its size from where
it was. No Linux caller cuts a huge leaf: the host notifies a huge page's whole range,
memslots hold their leaves whole. Past an empty entry 6.18 steps by the entry's size,
unaligned; later kernels align up (the VM option ``unmap_aligned_steps``; docs/arch/
riscv_gstage.md §5)."""

from __future__ import annotations

import pytest
from kvmcore import InvariantError
from kvmcore.records import GfnRange
from kvmcore.uapi import SZ_2M

from conftest import GPA


def _zap(vm, start, end):
    """kvm_unmap_gfn_range over gpas ``[start, end)``, as a notifier calls it."""
    rng = GfnRange(vm.gfn_to_memslot(start >> 12), start >> 12, end >> 12)
    with vm.mmu_lock:
        return vm.hook.unmap_gfn_range(vm=vm, range=rng)


def _sizes(vm):
    return [(m.gfn - (GPA >> 12), m.size) for m in vm.mappings()]


def _two_blocks(vm, host, thp=False):
    """Two 2 MiB blocks: hugetlb (6.18 maps THP with 4 KiB leaves), or THP with the VM's
    ``transparent_hugepage``."""
    hva = host.mmap(2 * SZ_2M, thp=True) if thp else host.mmap(2 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    cpu.write(GPA + SZ_2M, b"y")
    assert _sizes(vm) == [(0, SZ_2M), (512, SZ_2M)]
    return hva


def test_a_huge_leaf_the_range_cuts_is_skipped_not_split(vm, host):
    _two_blocks(vm, host)
    _zap(vm, GPA, GPA + SZ_2M + 0x1000)       # the first whole, the second cut at its end
    assert _sizes(vm) == [(512, SZ_2M)]
    assert vm.stats["riscv_unmap_skip"] == 1
    assert vm.backend.warnings == []                         # 6.18 skips silently


def test_a_walk_off_alignment_stays_off_and_skips_whole_leaves_too(vm, host):
    """Started inside the first block, the walk steps by 2 MiB from there: it reaches the
    second block 4 KiB past its start and skips it as well, though the range holds it."""
    _two_blocks(vm, host)
    _zap(vm, GPA + 0x1000, GPA + 2 * SZ_2M)
    assert _sizes(vm) == [(0, SZ_2M), (512, SZ_2M)]
    assert vm.stats["riscv_unmap_skip"] == 2


def test_small_leaves_behind_an_off_alignment_step_are_never_looked_at(vm, host):
    """A block, then 4 KiB leaves: stepping 2 MiB from 4 KiB into the block lands on the
    second small page; the first is passed over, the ones from there on are cleared."""
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    host.mmap(SZ_2M, addr=hva + SZ_2M)                       # 4 KiB pages
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    for off in (0, SZ_2M, SZ_2M + 0x1000, SZ_2M + 0x2000):
        cpu.write(GPA + off, b"x")
    assert _sizes(vm) == [(0, SZ_2M), (512, 4096), (513, 4096), (514, 4096)]
    _zap(vm, GPA + 0x1000, GPA + 2 * SZ_2M)
    assert _sizes(vm) == [(0, SZ_2M), (512, 4096)]
    assert vm.stats["riscv_unmap_skip"] == 1


def test_empty_entries_bring_the_walk_back_in_line_in_later_kernels(make_vm, host):
    """Past an empty entry later kernels align the walk again (ALIGN(addr + 1, page_size),
    the VM option ``unmap_aligned_steps``): a block after a gap is cleared."""
    vm = make_vm(unmap_aligned_steps=True)
    hva = host.mmap(3 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, 3 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    cpu.write(GPA + 2 * SZ_2M, b"z")
    _zap(vm, GPA + 0x1000, GPA + 3 * SZ_2M)
    assert _sizes(vm) == [(0, SZ_2M)]
    assert vm.stats["riscv_unmap_skip"] == 1


def test_618_steps_past_an_empty_entry_unaligned_and_leaves_leaves_mapped(make_vm, host):
    """6.18 adds an empty entry's size to an unaligned ``addr``: an unmap of gpas
    [1 MiB, 4 MiB) in a slot whose first 2 MiB region has no table steps from 1 MiB to
    3 MiB and never looks at the 4 KiB leaves of [2 MiB, 3 MiB). munmap of that range
    leaves them mapped over pages the host frees: the guest reads freed memory, and the
    core's invariants report the stale leaves (a use after free)."""
    vm = make_vm()
    hva = host.mmap(2 * SZ_2M)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA + SZ_2M + 0x1000, b"a")              # [2 MiB, 3 MiB): a leaf
    cpu.write(GPA + SZ_2M + SZ_2M // 2 + 0x1000, b"b")  # [3 MiB, 4 MiB): a leaf
    host.munmap(hva + SZ_2M // 2, SZ_2M + SZ_2M // 2)
    assert _sizes(vm) == [(512 + 1, 0x1000)]           # the first stayed, the second went
    assert cpu.read(GPA + SZ_2M + 0x1000, 1) == b"a"   # through the stale leaf
    with pytest.raises(InvariantError, match="the host has no page"):
        vm.check_invariants()
    vm.set_user_memory_region(0, GPA, 0, hva)          # the slot's flush walks it aligned
    assert _sizes(vm) == []


def test_the_host_never_cuts_a_huge_leaf(make_vm, host):
    """A change of one page of a THP splits its PMD with an invalidation of the whole
    2 MiB (__split_huge_pmd), so the block goes whole. MADV_DONTNEED notifies its own page
    first and splits when its zap meets the PMD, nested: the unmap of the page alone skips
    the block (a range smaller than the leaf), the split's takes it. memory_failure splits
    first, then unmaps the page: nothing left to skip. (THP blocks need
    ``transparent_hugepage``; a hugetlb page is never split.)"""
    vm = make_vm(transparent_hugepage=True)
    hva = _two_blocks(vm, host, thp=True)
    host.madvise_dontneed(hva + 0x3000, 0x1000)
    assert _sizes(vm) == [(512, SZ_2M)] and vm.stats["riscv_unmap_skip"] == 1
    host.poison(hva + SZ_2M + 0x5000)
    assert _sizes(vm) == [] and vm.stats["riscv_unmap_skip"] == 1
    vm.check_invariants()
