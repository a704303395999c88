"""The fault path end to end: leaf sizes, hugepage adjust, split / replace, translate's A/D and
error codes, the fast path."""

from __future__ import annotations

import pytest
from kvmcore import MmioExit, VM
from kvmcore.records import ACCESS_FLAG, Access, MISCONFIG, NOT_PRESENT, PERMISSION, Violation
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, RET_PF_SPURIOUS

from conftest import PAGE, SZ_1G, SZ_2M
from kvmcore_x86_tdp import X86TdpBackend
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.ept import (PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK, PFERR_PRESENT_MASK,
                                 PFERR_RSVD_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK)


def test_entry_point_and_arch_info():
    vm = VM(arch="x86_tdp")
    assert isinstance(vm.backend, X86TdpBackend)
    assert vm.nr_address_spaces == 2
    assert VM(arch="x86_tdp", vm_type="sw_protected").nr_address_spaces == 1
    caps = vm.arch_info.vm_types
    assert "readonly_mem" not in caps["tdx"] and "readonly_mem" not in caps["snp"]
    assert "private_mem" not in caps["default"]
    assert all("memory_attributes" in c for c in caps.values())


def test_bad_options_einval():
    import errno

    from kvmcore import KvmError
    for kw in ({"bogus": 1}, {"tdp_level": 3}, {"pml": True, "ad_disabled": True}):
        with pytest.raises(KvmError) as e:
            VM(arch="x86_tdp", **kw)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        X86TdpBackend(vm_type="sev")


def test_4k_fault_real_format(make):
    """8: a write fault creates a 4K leaf with A, D, W, bit 7 clear; tables hold bit 63."""
    g = make()
    g.slot(0, 0, 4 << 20)
    g.vcpu.write(0x3000, b"x")
    m = g.leaf(0x3000)
    assert (m.gfn, m.size, m.level) == (3, PAGE, 1)
    raw = m.raw
    assert raw & S.SPTE_MMU_PRESENT_MASK and raw & 0x7 == 0x7
    assert raw & S.VMX_EPT_ACCESS_BIT and raw & S.VMX_EPT_DIRTY_BIT
    assert not raw & S.PT_PAGE_SIZE_MASK
    # Root with one link, rest SHADOW_NONPRESENT_VALUE (not 0).
    root = g.b.direct_roots[0]
    assert sum(1 for e in root.table if e != S.SHADOW_NONPRESENT_VALUE) == 1
    assert g.vm.page_table_bytes() == 4 * PAGE + PAGE  # 4 tables + the SMM root


def test_read_fault_on_readonly_host_mapping(make):
    g = make()
    g.slot(0, 0, SZ_2M, prot="r")
    g.vcpu.read(0, 8)
    m = g.leaf(0)
    assert not m.writable and not m.raw & (S.EPT_SPTE_HOST_WRITABLE | S.EPT_SPTE_MMU_WRITABLE)


def test_readonly_slot_write_is_mmio(make):
    g = make()
    g.slot(0, 0, SZ_2M, flags=KVM_MEM_READONLY)
    g.vcpu.read(0, 8)
    with pytest.raises(MmioExit):
        g.vcpu.write(0, b"z")
    assert not g.leaf(0).writable


def test_2m_leaf_from_thp(make):
    g = make()
    g.slot(0, 0, 8 << 20, thp=True)
    g.vcpu.write(SZ_2M + 0x5000, b"y")
    m = g.leaf(SZ_2M + 0x5000)
    assert (m.gfn, m.size, m.level) == (512, SZ_2M, 2)
    assert m.raw & S.PT_PAGE_SIZE_MASK and m.pfn % 512 == 0  # 11


def test_1g_leaf_from_hugetlb(make):
    g = make()
    g.slot(0, 0, SZ_1G, kind="hugetlb_1g")
    g.vcpu.read(0x1234_000, 8)
    m = g.leaf(0x1234_000)
    assert (m.size, m.level) == (SZ_1G, 3) and m.pfn % 262144 == 0


def test_hugepage_1g_option_caps_at_2m(make):
    g = make(hugepage_1g=False)
    g.slot(0, 0, SZ_1G, kind="hugetlb_1g")
    g.vcpu.read(0, 8)
    assert g.leaf(0).size == SZ_2M


@pytest.mark.parametrize("base,uoff,expect", [
    (0, 0, SZ_2M),                 # aligned: huge
    (0, PAGE, PAGE),               # gpa and hva not congruent: every entry disallowed
])
def test_invariant_10_slot_alignment(make, base, uoff, expect):
    g = make()
    hva = g.host.mmap(8 << 20, kind="hugetlb_2m")
    g.vm.set_user_memory_region(0, base + SZ_2M, 4 << 20, hva + uoff)
    g.vcpu.read(base + SZ_2M + 0x1000, 8)
    assert g.leaf(base + SZ_2M + 0x1000).size == expect


def test_lpage_info_edges():
    """kvm_alloc_memslot_metadata: misaligned start/end disallow the first/last huge page."""
    from kvmcore_x86_tdp import mmu

    class Slot:
        base_gfn, npages, userspace_addr = 256, 2048, 256 * PAGE
        arch = {}

    info = mmu.kvm_alloc_memslot_metadata(Slot)
    assert list(info[2]) == [1, 0, 0, 0, 1]
    assert list(info[3]) == [1]


def test_replace_table_by_huge_leaf_flushes(make):
    """3.7: a present non-leaf replaced by a huge leaf flushes that range; the old table is
    freed (invariant: no leaked tables)."""
    g = make()
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.host.write(hva, b"h")               # the host faults in a THP
    g.host.split_huge_page(hva)           # and maps it with 4K PTEs now
    g.vcpu.write(0x1000, b"a")
    assert g.leaf(0x1000).size == PAGE
    tables = g.vm.page_table_bytes()
    # Zap the 4K leaf through the notifier, collapse the host page, fault again.
    g.host.collapse_huge_page(hva)
    flushes = g.vm.stats["tlb_flush_range"]
    g.vcpu.read(0x1000, 1)
    m = g.leaf(0x1000)
    assert m.size == SZ_2M
    assert g.vm.page_table_bytes() == tables - PAGE
    assert g.vm.stats["tlb_flush_range"] == flushes + 1


def test_split_in_fault_path_for_dirty_logging(make):
    """A write to a huge leaf of a slot that started logging splits it (no flush), maps 4K
    writable and logs the gfn."""
    g = make(eager_page_split=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.read(0x5000, 1)
    assert g.leaf(0x5000).size == SZ_2M
    g.vm.set_user_memory_region(0, 0, 4 << 20, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert not g.leaf(0x5000).writable  # huge pages write-protected (PML mode)
    g.vcpu.write(0x5000, b"w")
    m = g.leaf(0x5000)
    assert m.size == PAGE and m.writable and m.pfn % 512 == 5
    assert g.vm.get_dirty_log(0) == [5]
    assert g.vm.stats["x86_tdp.split_huge_page"] == 1


def test_translate_sets_ad_and_error_codes(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    vm, vcpu, b = g.vm, g.vcpu, g.b
    v = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("read"))
    assert isinstance(v, Violation) and v.kind == NOT_PRESENT
    assert v.error_code == PFERR_USER_MASK | PFERR_GUEST_FINAL_MASK
    assert v.level == 4 and v.size == 512 << 30
    v = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("fetch"))
    assert v.error_code == PFERR_FETCH_MASK | PFERR_GUEST_FINAL_MASK
    vcpu.write(0x2000, b"q")
    m = g.leaf(0x2000)
    # Clear A and D by hand, then a read sets A, a write D.
    table, idx, level, spte = b.tdp.get_last_spte(b.direct_roots[0], 2)
    table[idx] = spte & ~(S.VMX_EPT_ACCESS_BIT | S.VMX_EPT_DIRTY_BIT)
    t = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("read"))
    assert t.pfn == m.pfn and table[idx] & S.VMX_EPT_ACCESS_BIT
    assert not table[idx] & S.VMX_EPT_DIRTY_BIT and not t.dirty
    t = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("write"))
    assert t.dirty and table[idx] & S.VMX_EPT_DIRTY_BIT
    # A permission violation reports PRESENT and the level of the leaf.
    table[idx] &= ~S.PT_WRITABLE_MASK
    v = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("write"))
    assert v.kind == PERMISSION and v.level == 1
    assert v.error_code == PFERR_WRITE_MASK | PFERR_PRESENT_MASK | PFERR_GUEST_FINAL_MASK
    # W without R is an EPT misconfiguration (RSVD).
    table[idx] = (table[idx] & ~0x7) | 0x2
    v = b.translate(vm=vm, vcpu=vcpu, gpa=0x2000, access=Access("read"))
    assert v.kind == MISCONFIG and v.error_code & PFERR_RSVD_MASK
    table[idx] = spte


def test_invariant_21_fast_pf_restores_w_and_logs(make):
    """21: with write-protect dirty logging, the write fault is fixed by the fast path: W set
    in place (same pfn and level), gfn logged, D not set by the fast path."""
    g = make(pml=False)
    hva = g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"1")
    before = g.leaf(0x1000)
    g.vm.set_user_memory_region(0, 0, SZ_2M, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    m = g.leaf(0x1000)
    assert not m.writable and m.raw & S.EPT_SPTE_MMU_WRITABLE
    g.vcpu.write(0x1000, b"2")
    m2 = g.leaf(0x1000)
    assert m2.writable and (m2.pfn, m2.level) == (before.pfn, before.level)
    assert g.vm.stats["x86_tdp.fast_pf_fixed"] == 1
    assert g.vm.get_dirty_log(0) == [1]


def test_fast_pf_refuses_huge_leaf_in_logging_slot(make):
    """21: the fast path never makes a >4K leaf writable in a dirty-logged slot."""
    g = make(pml=False, eager_page_split=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"1")
    g.vm.set_user_memory_region(0, 0, 4 << 20, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert g.leaf(0).size == SZ_2M and not g.leaf(0).writable
    g.vcpu.write(0x3000, b"2")
    assert g.vm.stats["x86_tdp.fast_pf_fixed"] == 0
    assert g.leaf(0x3000).size == PAGE and g.leaf(0x3000).writable


def test_fast_pf_spurious(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0, b"1")
    from kvmcore.records import PageFault
    f = PageFault(addr=0, gfn=0, write=True, kind=PERMISSION, error_code=PFERR_PRESENT_MASK)
    assert g.b.fast_page_fault(vm=g.vm, fault=f) == RET_PF_SPURIOUS


def test_fast_pf_restores_access_tracked(make):
    """A/D disabled: aging parks RWX; the next access is an ACCESS_FLAG violation that the
    fast path fixes by restoring R/X without a pfn change."""
    g = make(ad_disabled=True)
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"1")
    m = g.leaf(0x1000)
    assert g.vm.host.age(g.vm.memslots()[0].userspace_addr, SZ_2M)
    raw = g.b.tdp.get_last_spte(g.b.direct_roots[0], 1)[3]
    assert S.is_access_track_spte(raw)
    g.vcpu.tlb.clear()
    v = g.b.translate(vm=g.vm, vcpu=g.vcpu, gpa=0x1000, access=Access("read"))
    assert v.kind == ACCESS_FLAG and not v.error_code & PFERR_PRESENT_MASK
    assert g.vcpu.read(0x1000, 1) == b"1"
    assert g.leaf(0x1000).pfn == m.pfn and g.vm.stats["x86_tdp.fast_pf_fixed"] == 1


def test_prefetch_is_not_young(make):
    """8: KVM_PRE_FAULT_MEMORY maps without Accessed."""
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.pre_fault_memory(0, 4 * PAGE)
    ms = list(g.vm.mappings())
    assert len(ms) == 4 and not any(m.young for m in ms)


def test_5level_root(make):
    g = make(tdp_level=5)
    big = 1 << 50
    g.slot(0, big, SZ_2M)
    g.vcpu.write(big + 0x1000, b"5")
    m = g.leaf(big + 0x1000)
    assert m.gfn == (big >> 12) + 1
    assert g.b.direct_roots[0].level == 5
    table, idx, level, spte = g.b.tdp.get_last_spte(g.b.direct_roots[0], m.gfn)
    assert level == 1 and spte == m.raw


def test_4level_refuses_gpa_beyond_48_bits(make):
    import errno

    from kvmcore import KvmError
    g = make()
    with pytest.raises(KvmError) as e:
        g.slot(0, 1 << 48, SZ_2M)
    assert e.value.errno == errno.EINVAL


def test_nx_huge_pages_exec_fault_maps_4k(make):
    g = make(nx_huge_pages=True)
    g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.read(0, 1)
    assert g.leaf(0).size == SZ_2M and not g.leaf(0).executable
    g.vcpu.fetch(SZ_2M + 0x1000)
    assert g.leaf(SZ_2M + 0x1000).size == PAGE and g.leaf(SZ_2M + 0x1000).executable
