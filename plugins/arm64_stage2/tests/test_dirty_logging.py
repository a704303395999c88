"""Dirty logging on stage-2 (arm64_stage2.md §7; invariants 10, 11, 12, 20)."""

from __future__ import annotations

import pytest
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import GPA, SZ_2M, backend_of
from kvmcore_arm64_stage2.pgtable import KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W

PAGE = 4096


def _thp_slot(vm, host, size=2 * SZ_2M, flags=0):
    hva = host.mmap(size, thp=True)
    vm.set_user_memory_region(0, GPA, size, hva, flags)
    return hva


def test_enable_logging_write_protects_then_flushes(vm, host):
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    vcpu.write(GPA + SZ_2M + PAGE, b"b")
    assert all(m.writable for m in vm.mappings())
    flushes = vm.stats["tlb_flush_range"]
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    ms = list(vm.mappings())
    assert ms and not any(m.writable for m in ms), "every leaf write-protected"
    assert [m.size for m in ms] == [SZ_2M, SZ_2M], "no eager split by default (chunk 0)"
    assert vm.stats["tlb_flush_range"] == flushes + 1, "kvm_flush_remote_tlbs_memslot"
    assert vcpu.tlb == {}


def test_write_inside_intact_block_while_logging_splits_and_maps_one_page(vm, host):
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA + 3 * PAGE, 1)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    b = backend_of(vm)
    b.tlbi_log.clear()
    vcpu.write(GPA + 7 * PAGE, b"w")
    leaves = [m for m in vm.mappings() if m.gfn < (GPA + SZ_2M) >> 12]
    assert [(m.gfn, m.size, m.writable) for m in leaves] == [((GPA >> 12) + 7, PAGE, True)]
    assert [(t.op, t.ipa, t.level) for t in b.tlbi_log] == [("vmid_ipa", GPA, 2)], \
        "the block is broken with a TLBI at its level"
    assert vm.get_dirty_log(0) == [7]
    # The rest of the old block re-faults lazily, read-only, as 4K pages.
    vcpu.read(GPA + 100 * PAGE, 1)
    m = vm.lookup(GPA + 100 * PAGE)
    assert m.size == PAGE and not m.writable


def test_read_fault_maps_ro_and_write_relaxes_and_logs(vm, host):
    hva = host.mmap(16 * PAGE)
    host.write(hva, bytes(16 * PAGE))
    vm.set_user_memory_region(0, GPA, 16 * PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA + 2 * PAGE, 1)
    assert not vm.lookup(GPA + 2 * PAGE).writable
    assert vm.get_dirty_log(0) == []
    vcpu.write(GPA + 2 * PAGE, b"x")
    assert vm.lookup(GPA + 2 * PAGE).writable and vm.stats["relax_perms"] == 1
    assert vm.get_dirty_log(0) == [2]


def test_get_dirty_log_reprotects_the_masked_span_including_gaps(vm, host):
    """kvm_arch_mmu_enable_log_dirty_pt_masked write-protects [first set bit, last set bit]."""
    hva = host.mmap(16 * PAGE)
    host.write(hva, bytes(16 * PAGE))
    vm.enable_dirty_log_manual_protect()
    vm.set_user_memory_region(0, GPA, 16 * PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    for i in (0, 1, 3, 5, 6):
        vcpu.write(GPA + i * PAGE, b"x")
    assert vm.get_dirty_log(0) == [0, 1, 3, 5, 6]
    vm.clear_dirty_log(0, 0, 16, [1, 5])
    writable = {(m.gfn - (GPA >> 12)) for m in vm.mappings() if m.writable}
    assert writable == {0, 6}, "pages 1..5 (3 included) are write-protected, 0 and 6 not"


def test_masked_reprotect_alone_changes_only_w(vm, host):
    hva = host.mmap(8 * PAGE)
    host.write(hva, bytes(8 * PAGE))
    vm.set_user_memory_region(0, GPA, 8 * PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + PAGE, b"x")
    before = vm.lookup(GPA + PAGE).raw
    s = vm.gfn_to_memslot(GPA >> 12)
    with vm.mmu_lock:
        vm.hook.enable_log_dirty_pt_masked(vm=vm, slot=s, gfn_offset=0, mask=0b10)
    vm.flush_remote_tlbs()                     # what kvm_clear_dirty_log_protect does next
    assert vm.lookup(GPA + PAGE).raw == before & ~KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W


def test_eager_split_after_write_protect(make_vm, host):
    vm = make_vm(eager_split_chunk_size=SZ_2M)
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    ms = list(vm.mappings())
    assert len(ms) == 512 and {m.size for m in ms} == {PAGE}
    assert not any(m.writable for m in ms), "split keeps the write protection"
    assert all(m.young for m in ms)


def test_initially_set_defers_protection(vm, host):
    vm.enable_dirty_log_manual_protect(initially_set=True)
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.lookup(GPA).writable and vm.lookup(GPA).size == SZ_2M


def test_64k_write_logs_every_4k_gfn_of_the_base_page(make_vm):
    vm = make_vm(granule=65536)
    host = vm.host
    hva = host.mmap(4 * 65536)
    vm.set_user_memory_region(0, GPA, 4 * 65536, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 65536 + 5 * PAGE, b"q")
    m = vm.lookup(GPA + 65536)
    assert (m.size, m.writable) == (65536, True)
    assert vm.get_dirty_log(0) == list(range(16, 32))
    assert host.read(hva + 65536 + 5 * PAGE, 1) == b"q"
    assert not vm.lookup(GPA + 65536).writable, "GET_DIRTY_LOG re-protected the base page"


def test_64k_dirty_ring_pushes_16_entries(make_vm):
    vm = make_vm(granule=65536)
    host = vm.host
    vm.enable_dirty_ring(1 << 16)
    hva = host.mmap(2 * 65536)
    vm.set_user_memory_region(0, GPA, 2 * 65536, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 3 * PAGE, b"r")
    assert vcpu.harvest_dirty_ring() == [(0, i) for i in range(16)]


@pytest.mark.parametrize("granule", [4096, 65536])
def test_dirty_marking_only_on_success(make_vm, granule):
    """Commit 509552e65ae8: a fault that installs nothing (a permission-only map attempt that
    returns -EAGAIN) marks nothing."""
    vm = make_vm(granule=granule)
    host = vm.host
    hva = host.mmap(4 * granule)
    host.write(hva, bytes(4 * granule))
    vm.set_user_memory_region(0, GPA, 4 * granule, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"1")
    vm.get_dirty_log(0)             # clears and re-protects
    b = backend_of(vm)
    from kvmcore.records import PageFault
    from kvmcore.fault import run_to_completion, kvm_page_fault

    f = PageFault(addr=GPA, gfn=GPA >> 12, write=True, vcpu=vcpu)   # a stale translation fault
    run_to_completion(kvm_page_fault(vm, f))
    assert vm.stats["arm64_fault_eagain"] == 1
    assert vm.get_dirty_log(0) == []
    assert not vm.lookup(GPA).writable
    del b


def test_after_logging_stops_a_fault_collapses_the_table_into_a_block(vm, host):
    """TABLE_PRE collapse: with logging off again, THP promotion maps a PMD over the level-3
    table left by logging; the table entry is broken with a range TLBI (whole VMID without
    FEAT_TLBIRANGE) and the detached table freed."""
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 1)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu.write(GPA + 7 * PAGE, b"w")
    assert vm.lookup(GPA + 7 * PAGE).size == PAGE
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    b = backend_of(vm)
    b.tlbi_log.clear()
    tables = len(b.pgt.store)
    vcpu.read(GPA + 300 * PAGE, 1)
    m = vm.lookup(GPA + 7 * PAGE)
    assert (m.size, m.gfn) == (SZ_2M, GPA >> 12)
    assert [(t.op, t.why) for t in b.tlbi_log] == [("vmid", "bbm_table")]
    assert len(b.pgt.store) == tables - 1


def test_clear_with_initially_set_write_protects_and_splits_the_span(make_vm, host):
    """Invariant 12: with manual-protect + initially-all-set, re-arming a span write-protects
    it and eager-splits it (chunk size set); the rest of the slot keeps its writable block."""
    vm = make_vm(eager_split_chunk_size=SZ_2M)
    vm.enable_dirty_log_manual_protect(initially_set=True)
    hva = _thp_slot(vm, host)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 5 * PAGE, b"a")
    vcpu.write(GPA + SZ_2M, b"b")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.lookup(GPA).size == SZ_2M and vm.lookup(GPA).writable
    vm.clear_dirty_log(0, 0, 64, [5])
    first = [m for m in vm.mappings() if m.gfn < (GPA + SZ_2M) >> 12]
    assert len(first) == 512 and not any(m.writable for m in first)
    second = vm.lookup(GPA + SZ_2M)
    assert second.size == SZ_2M and second.writable


def test_ring_only_write_into_a_hugetlb_block_marks_the_blocks_first_page(vm, host):
    """With a dirty ring and no bitmap the slot does not log (memslot_is_logging needs a
    bitmap), so a write maps a 2M block; user_mem_abort rounded the ipa down to the block
    before gfn = ipa >> PAGE_SHIFT, so that gfn is what mark_page_dirty_in_slot pushes."""
    vm.enable_dirty_ring(1 << 16)
    vcpu = vm.create_vcpu(0)
    hva = host.mmap(2 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu.write(GPA + 517 * PAGE, b"x")      # page 5 of the second 2M block
    assert vm.lookup(GPA + SZ_2M).size == SZ_2M
    assert vcpu.harvest_dirty_ring() == [(0, 512)]


def test_ring_only_write_into_a_thp_block_marks_the_written_page(vm, host):
    """A THP block comes from transparent_hugepage_adjust, after gfn was taken: the written
    page is marked."""
    vm.enable_dirty_ring(1 << 16)
    vcpu = vm.create_vcpu(0)
    _thp_slot(vm, host, flags=KVM_MEM_LOG_DIRTY_PAGES)
    vcpu.write(GPA + 517 * PAGE, b"x")      # page 5 of the second 2M block
    assert vm.lookup(GPA + SZ_2M).size == SZ_2M
    assert vcpu.harvest_dirty_ring() == [(0, 517)]
