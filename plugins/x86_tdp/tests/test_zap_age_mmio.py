"""Zapping (invariants 15, 17, 22), aging (23), MMIO SPTEs (26), memslot deletion."""

from __future__ import annotations

import pytest
from kvmcore import MmioExit
from kvmcore.records import GfnRange
from kvmcore.uapi import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED, RET_PF_EMULATE

from conftest import PAGE, SZ_2M, TDX_SHARED
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.backend import kvm_gfn_range_filter_to_root_types
from kvmcore_x86_tdp.tdp_mmu import KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS


def test_invariant_15_filter_to_root_types():
    for f in (KVM_FILTER_SHARED, KVM_FILTER_PRIVATE, KVM_FILTER_SHARED | KVM_FILTER_PRIVATE):
        assert kvm_gfn_range_filter_to_root_types(False, f) == KVM_DIRECT_ROOTS
    assert kvm_gfn_range_filter_to_root_types(True, KVM_FILTER_PRIVATE) == KVM_MIRROR_ROOTS
    assert kvm_gfn_range_filter_to_root_types(True, KVM_FILTER_SHARED) == KVM_DIRECT_ROOTS


def test_zap_writes_nonpresent_value_and_requests_flush(make):
    """22: zapping a leaf in a valid root asks for a flush and writes bit 63, not 0; tables
    stay."""
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"z")
    slot = g.vm.memslots()[0]
    tables = g.vm.page_table_bytes()
    with g.vm.mmu_lock:
        flush = g.b.unmap_gfn_range(vm=g.vm, range=GfnRange(slot, 0, 512))
    assert flush is True
    table, idx, level, spte = g.b.tdp.get_last_spte(g.b.direct_roots[0], 1)
    assert level == 1 and spte == S.SHADOW_NONPRESENT_VALUE
    assert g.vm.page_table_bytes() == tables
    with g.vm.mmu_lock:
        assert g.b.unmap_gfn_range(vm=g.vm, range=GfnRange(slot, 0, 512)) is False
    g.vm.flush_remote_tlbs()                   # the flush the first zap asked for


def test_host_munmap_zaps_shared_only_in_tdx(make):
    g = make("tdx")
    g.gmem_slot(0, 0, 4 << 20)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    hva = g.vm.memslots()[0].userspace_addr
    g.host.madvise_dontneed(hva, 4 << 20)
    assert [m.private for m in g.vm.mappings()] == [True]


def test_invariant_17_default_vm_delete_zaps_all_fast(make):
    """DEFAULT_VM with KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting a slot zaps every slot's mappings
    through new roots (kvm_mmu_zap_all_fast)."""
    g = make()
    g.slot(0, 0, SZ_2M)
    g.slot(1, SZ_2M, SZ_2M)
    g.vcpu.write(0, b"a")
    g.vcpu.write(SZ_2M, b"b")
    old_root = g.b.direct_roots[0]
    g.vm.set_user_memory_region(0, 0, 0, 0)
    assert list(g.vm.mappings()) == []
    assert g.b.direct_roots[0] is not old_root
    assert g.vm.stats["x86_tdp.zap_all_fast"] == 1
    assert g.vcpu.read(SZ_2M, 1) == b"b"
    with pytest.raises(MmioExit):
        g.vcpu.read(0, 1)


def test_invariant_17_quirk_off_zaps_only_the_slot(make):
    g = make(slot_zap_all_quirk=False)
    g.slot(0, 0, SZ_2M)
    g.slot(1, SZ_2M, SZ_2M)
    g.vcpu.write(0, b"a")
    g.vcpu.write(SZ_2M, b"b")
    g.vm.set_user_memory_region(0, 0, 0, 0)
    assert [m.gfn for m in g.vm.mappings()] == [512]


def test_invariant_23_aging_clears_a_without_flush(make):
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"a")
    before = g.leaf(0x1000)
    flushes = (g.vm.stats["tlb_flush"], g.vm.stats["tlb_flush_range"])
    slot = g.vm.memslots()[0]
    rng = GfnRange(slot, 0, 512)
    assert g.b.test_age_gfn(vm=g.vm, range=rng) is True
    assert g.b.age_gfn(vm=g.vm, range=rng) is True
    after = g.leaf(0x1000)
    assert after.raw == before.raw & ~S.VMX_EPT_ACCESS_BIT      # only A changed
    assert g.b.test_age_gfn(vm=g.vm, range=rng) is False
    assert (g.vm.stats["tlb_flush"], g.vm.stats["tlb_flush_range"]) == flushes
    assert hva


def test_invariant_23_aging_ad_disabled_access_tracks(make):
    g = make(ad_disabled=True)
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"a")
    before = g.leaf(0x1000)
    slot = g.vm.memslots()[0]
    assert g.b.age_gfn(vm=g.vm, range=GfnRange(slot, 0, 512)) is True
    after = g.leaf(0x1000)
    assert S.is_access_track_spte(after.raw) and not after.young
    assert after.raw == S.mark_spte_for_access_track(before.raw)
    assert after.pfn == before.pfn
    assert g.b.age_gfn(vm=g.vm, range=GfnRange(slot, 0, 512)) is False


def test_invariant_26_mmio_spte_cached_and_stale_generation(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    with pytest.raises(MmioExit):
        g.vcpu.read(0x4000_0000, 4)
    table, idx, level, spte = g.b.tdp.get_last_spte(g.b.direct_roots[0], 0x40000)
    assert S.is_mmio_spte(spte) and S.get_mmio_spte_gfn(spte) == 0x40000
    gen = g.vm.memslot_generation(0)
    assert S.get_mmio_spte_generation(spte) == gen & S.MMIO_SPTE_GEN_MASK
    with pytest.raises(MmioExit):
        g.vcpu.read(0x4000_0000, 4)
    assert g.vm.stats["x86_tdp.mmio_spte_hit"] == 1
    # A new memslot there makes the generation stale: the slow path maps RAM.
    g.slot(1, 0x4000_0000, SZ_2M)
    assert g.vcpu.read(0x4000_0000, 4) == bytes(4)
    assert g.vm.stats["x86_tdp.mmio_spte_stale"] == 1
    assert g.leaf(0x4000_0000) is not None


def test_mmio_generation_wrap_zaps_all(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0, b"a")
    slots = g.vm.memslot_sets[0]
    slots.generation = (1 << 19) - 2 + (slots.generation & 1)
    g.slot(1, SZ_2M, SZ_2M)
    if g.vm.memslot_generation(0) & S.MMIO_SPTE_GEN_MASK == 0:
        assert g.vm.stats["x86_tdp.mmio_gen_wrap"] == 1
        assert list(g.vm.mappings()) == []
    else:
        pytest.fail(f"generation step did not wrap: {g.vm.memslot_generation(0):#x}")


def test_tdx_no_mmio_caching(make):
    g = make("tdx")
    with pytest.raises(MmioExit):
        g.vcpu.read(TDX_SHARED | 0x4000_0000, 4)
    assert g.b.handle_noslot_fault is not None
    spte = g.b.tdp.get_last_spte(g.b.direct_roots[0], 0x40000)[3]
    assert spte == S.SHADOW_NONPRESENT_VALUE
    assert RET_PF_EMULATE == 2


def _aged_under_a_writable_tlb_entry(g, gpa):
    """vCPU 0 writes ``gpa``; reclaim ages it (clear_flush_young, no flush: x86 selects
    CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG); vCPU 1's read restores the access-tracked leaf
    without W (fast_page_fault). vCPU 0's TLB still holds the writable translation."""
    v0 = g.vcpu
    v0.write(gpa, b"a")
    v1 = g.vm.create_vcpu(1)
    flushes = (g.vm.stats["tlb_flush"], g.vm.stats["tlb_flush_range"])
    assert g.host.age(g.vm.memslots()[0].userspace_addr + gpa, PAGE) is True
    assert (g.vm.stats["tlb_flush"], g.vm.stats["tlb_flush_range"]) == flushes
    assert S.is_access_track_spte(g.leaf(gpa).raw)
    assert v1.read(gpa, 1) == b"a"
    leaf = g.leaf(gpa)
    assert leaf.young and not leaf.writable and leaf.mmu_writable
    assert any(e[2] for e in v0.tlb.values())
    return v0, v1


def test_clear_flush_young_elides_the_flush(make):
    """A writable TLB entry over an MMU-writable leaf is what Linux allows (the comment in
    kvm_mmu_slot_apply_flags): the write goes through it without a fault."""
    g = make(ad_disabled=True)
    g.slot(0, 0, SZ_2M)
    v0, v1 = _aged_under_a_writable_tlb_entry(g, 0x1000)
    g.vm.check_invariants()
    faults = g.vm.stats["faults"]
    v0.write(0x1000, b"b")
    assert g.vm.stats["faults"] == faults
    assert v1.read(0x1000, 1) == b"b"
    g.vm.check_invariants()


def test_stale_writable_entry_needs_its_write_recorded(make):
    """In a dirty-logged slot the stale writable entry is allowed only while the write it
    lets through is still recorded: the dirty-log ioctl that un-records the gfn flushes
    (kvm_clear_dirty_log_protect / kvm_get_dirty_log_protect). Clearing the bit without that
    flush is caught."""
    from kvmcore.errors import InvariantError
    from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

    g = make(ad_disabled=True)
    g.slot(0, 0, SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    _aged_under_a_writable_tlb_entry(g, 0x1000)
    g.vm.check_invariants()
    bitmap = g.vm.memslot_sets[0].search(1).dirty_bitmap
    assert bitmap.fetch_andnot(0, 1 << 1) == 1 << 1
    with pytest.raises(InvariantError, match="TLB entry gfn 0x1 "):
        g.vm.check_invariants()
    bitmap.set(1)
    assert g.vm.get_dirty_log(0) == [1]      # write-protects and flushes
    g.vm.check_invariants()
