"""VMs with private memory: SW-protected, SNP (RMP) and TDX (mirror roots, S-EPT removal)."""

from __future__ import annotations

import pytest
from kvmcore.locks import drive
from kvmcore import MemoryFaultExit
from kvmcore.records import Access, PERMISSION
from kvmcore.uapi import KVM_MEMORY_EXIT_FLAG_PRIVATE

from conftest import PAGE, SZ_2M, TDX_SHARED
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.ept import PFERR_GUEST_RMP_MASK, PFERR_PRIVATE_ACCESS
from kvmcore_x86_tdp.tdx import (KICK, REMOVAL_ORDER, TDH_MEM_PAGE_AUG, TDH_MEM_RANGE_BLOCK)


# --------------------------------------------------------------------------- SW-protected
def test_sw_protected_private_from_attribute(make):
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    g.vcpu.write(0x1000, b"p")
    m = g.leaf(0x1000, private=True)
    assert m is not None and m.private
    # 16: converting back zaps the private mapping of the range (one table, any filter).
    g.make_shared(0, SZ_2M)
    assert list(g.vm.mappings()) == []
    g.vcpu.write(0x1000, b"s")
    assert not g.leaf(0x1000).private


def test_a_cached_mmio_spte_answers_before_the_private_check(make):
    """A gfn with no memslot gets an MMIO SPTE on its first access. Converting it to private
    zaps nothing (kvm_vm_set_mem_attributes walks memslots only), and the next access meets
    that SPTE: the EPT misconfiguration goes to handle_mmio_page_fault, before
    kvm_mmu_faultin_pfn's private/shared check, so it is MMIO again, not
    KVM_EXIT_MEMORY_FAULT. A gfn never accessed exits for the mismatch."""
    from kvmcore import MmioExit

    g = make("sw_protected")
    g.gmem_slot(0, SZ_2M, SZ_2M)
    with pytest.raises(MmioExit):
        g.vcpu.read(0x3000, 8, private=False)
    g.make_private(0, SZ_2M)
    with pytest.raises(MmioExit):
        g.vcpu.read(0x3000, 8, private=False)
    with pytest.raises(MemoryFaultExit):
        g.vcpu.read(0x5000, 8, private=False)


def test_invariant_13_sw_protected_private_is_the_attribute(make):
    """SW-protected: is_private comes from the attribute, whatever intent the access states;
    SNP: from the C-bit, so a shared access to a private gfn exits (flags 0)."""
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    g.vcpu.read(0x3000, 4, private=False)
    assert g.leaf(0x3000, private=True) is not None
    s = make("snp")
    s.gmem_slot(0, 0, SZ_2M)
    s.make_private(0, SZ_2M)
    with pytest.raises(MemoryFaultExit) as e:
        s.vcpu.read(0x3000, 4, private=False)
    assert (e.value.flags, e.value.gpa, e.value.size) == (0, 0x3000, PAGE)


def test_private_on_non_gmem_slot_exits(make):
    g = make("sw_protected")
    g.slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    with pytest.raises(MemoryFaultExit) as e:
        g.vcpu.read(0x3000, 4)
    assert e.value.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


def test_private_huge_from_gmem_order(make):
    """10: private level = gmem folio order for SW-protected (no vendor cap)."""
    g = make("sw_protected")
    g.gmem_slot(0, 0, 4 << 20, folio_order=9)
    g.make_private(0, 4 << 20)
    g.vcpu.write(SZ_2M + 0x3000, b"h")
    assert g.leaf(SZ_2M + 0x3000, private=True).size == SZ_2M


# --------------------------------------------------------------------------- SNP
def test_snp_private_comes_from_cbit_and_rmp(make):
    g = make("snp")
    g.gmem_slot(0, 0, 4 << 20, folio_order=9)
    g.make_private(0, SZ_2M)
    g.vcpu.write(0x1000, b"e", private=True)
    m = g.leaf(0x1000, private=True)
    assert m.private and g.b.rmp.is_private(m.pfn)
    # SNP: the RMP entry's size caps the private mapping; a fresh 2M folio is assigned 2M.
    assert m.size == SZ_2M
    # A shared (C-bit clear) access to the guest-owned page is an RMP #NPF and then a
    # private/shared mismatch exit.
    g.vcpu.tlb.clear()
    v = g.b.translate(vm=g.vm, vcpu=g.vcpu, gpa=0x1000, access=Access("read", False))
    assert v.kind == PERMISSION and v.error_code & PFERR_GUEST_RMP_MASK
    with pytest.raises(MemoryFaultExit) as e:
        g.vcpu.read(0x1000, 1, private=False)
    assert e.value.flags == 0
    # Default intent for SNP is shared (C-bit clear).
    with pytest.raises(MemoryFaultExit):
        g.vcpu.read(0x1000, 1)


def test_snp_rmp_4k_caps_level(make):
    g = make("snp")
    g.gmem_slot(0, 0, 4 << 20, folio_order=9)
    g.make_private(0, 4 << 20)
    pfn_probe = g.vm.backend
    # Pre-assign one 4K page inside the second 2M pfn range, as if prepared earlier.
    g.vcpu.write(0x0, b"a", private=True)
    first = g.leaf(0, private=True)
    g.b.rmp.rmp_make_shared(first.pfn)        # host reclaimed it, RMP back to shared
    g.vm.set_memory_attributes(0, SZ_2M, 0)
    g.make_private(0, SZ_2M)
    base = first.pfn
    g.b.rmp.assigned[base + 7] = S.PG_LEVEL_4K
    g.vcpu.write(0x9000, b"b", private=True)
    assert g.leaf(0x9000, private=True).size == PAGE
    assert pfn_probe is g.b


# --------------------------------------------------------------------------- TDX
def tdx(make, **kw):
    g = make("tdx", **kw)
    gmem = g.gmem_slot(0, 0, 4 << 20)
    return g, gmem


def test_tdx_shared_bit_and_roots(make):
    g, _ = tdx(make)
    assert g.b.tdx.shared_bit == 47
    assert make("tdx", tdp_level=5).b.tdx.shared_bit == 51
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    m = g.leaf(0x1000)
    assert m.gfn == 1 and not m.private   # 14: gfn without the shared bit
    direct = g.b.direct_roots[0]
    assert direct.table[256] & S.SPTE_MMU_PRESENT_MASK   # walked with bit 47 in the index
    assert direct.table[0] == S.SHADOW_NONPRESENT_VALUE


def test_tdx_private_fault_on_shared_gfn_exits_private(make):
    """Acceptance: a private fault on a shared gfn exits with the PRIVATE flag."""
    g, _ = tdx(make)
    with pytest.raises(MemoryFaultExit) as e:
        g.vcpu.read(0x5000, 4)           # no shared bit: private
    assert e.value.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE and e.value.gpa == 0x5000
    assert list(g.vm.mappings()) == []


def test_tdx_private_is_4k_in_mirror(make):
    g = make("tdx")
    g.gmem_slot(0, 0, 4 << 20, folio_order=9)
    g.make_private(0, 4 << 20)
    g.vcpu.write(0x2000, b"p")
    m = g.leaf(0x2000, private=True)
    assert m.private and m.size == PAGE   # 10: TDX private <= 4K
    assert g.b.tdx.sept == {2: m.pfn}     # 20: S-EPT agrees
    assert [r.op for r in g.b.tdx.records][-1] == TDH_MEM_PAGE_AUG
    v = g.b.translate(vm=g.vm, vcpu=g.vcpu, gpa=0x3000, access=Access("read"))
    assert v.private and v.error_code & PFERR_PRIVATE_ACCESS


def test_tdx_conversions_zap_only_the_old_root(make):
    """Acceptance: shared->private zaps only the direct root; private->shared only the mirror,
    in BLOCK -> TRACK -> kick -> REMOVE -> WBINVD order."""
    g, _ = tdx(make)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")       # shared gfn 1
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")                    # private gfn 2
    shared_before = g.leaf(0x1000)
    nrec = len(g.b.tdx.records)
    g.make_private(0x1000, PAGE)                  # shared -> private
    assert g.leaf(0x1000) is None and g.leaf(0x2000, private=True) is not None
    assert len(g.b.tdx.records) == nrec            # the mirror root was not touched
    assert shared_before is not None
    g.make_shared(0x2000, PAGE)                   # private -> shared
    assert g.leaf(0x2000, private=True) is None
    ops = [(r.op, r.gfn) for r in g.b.tdx.records[nrec:]]
    assert ops == [(op, 2) for op in REMOVAL_ORDER]
    names = [e["event"] for e in g.events("tdx.")][-5:]
    assert names == ["tdx.block", "tdx.track", "tdx.kick", "tdx.remove", "tdx.wbinvd"]
    assert g.b.tdx.sept == {}


def test_invariant_17_tdx_memslot_delete_zaps_both_aliases(make):
    g, _ = tdx(make)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    g.vm.set_user_memory_region(0, 0, 0, 0)
    assert list(g.vm.mappings()) == []
    assert g.b.tdx.sept == {} and g.b.tdx.records[-1].op != TDH_MEM_PAGE_AUG


def test_invariant_18_flush_shadow_all_keeps_mirror(make):
    g, _ = tdx(make)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    g.b.flush_shadow_all(vm=g.vm)
    g.vm.flush_remote_tlbs()                   # no vCPU runs after kvm_flush_shadow_all
    assert [m.private for m in g.vm.mappings()] == [True]


def test_invariant_19_busy_block_retries_in_order(make):
    g, _ = tdx(make)
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    g.b.tdx.fail_next.add(TDH_MEM_RANGE_BLOCK)
    g.make_shared(0x2000, PAGE)
    assert g.vm.stats["x86_tdp.tdx_no_vcpus_enter"] == 1
    assert not g.b.tdx.removal_order_problems()
    # A removal out of order is reported.
    g.b.tdx.records.append(type(g.b.tdx.records[0])(KICK, 9))
    assert g.b.tdx.removal_order_problems()
    g.b.tdx.records.pop()


def test_invariant_20_failed_seamcall_restores_old(make):
    g, _ = tdx(make)
    g.make_private(0x2000, PAGE)
    g.b.tdx.fail_next.add(TDH_MEM_PAGE_AUG)
    g.vcpu.write(0x2000, b"p")      # first attempt: AUG busy -> restore, RET_PF_RETRY
    assert g.vm.stats["x86_tdp.tdx_busy"] == 1 and g.vm.stats["fault_retry"] >= 1
    assert g.b.tdx.sept == {2: g.leaf(0x2000, private=True).pfn}


def test_tdx_memslot_may_not_cover_shared_bit(make):
    import errno

    from kvmcore import KvmError
    g = make("tdx")
    with pytest.raises(KvmError) as e:
        g.slot(0, TDX_SHARED - SZ_2M, 2 * SZ_2M)
    assert e.value.errno == errno.EINVAL


def test_tdx_fast_zap_never_touches_mirror(make):
    """18: zap-all-fast invalidates direct roots only."""
    g, _ = tdx(make)
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    mirror = g.b.mirror_roots[0]
    drive(g.b.kvm_mmu_zap_all_fast(g.vm))
    assert g.b.mirror_roots[0] is mirror
    assert [m.private for m in g.vm.mappings()] == [True]


def test_tdx_gmem_punch_hole_removes_private_page_in_order(make):
    """guest_memfd invalidation uses KVM_FILTER_PRIVATE: only the mirror root is zapped."""
    from kvmcore.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    g, gmem = tdx(make)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    nrec = len(g.b.tdx.records)
    gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, SZ_2M)
    assert [r.op for r in g.b.tdx.records[nrec:]] == list(REMOVAL_ORDER)
    assert [(m.gfn, m.private) for m in g.vm.mappings()] == [(1, False)]


def test_tdx_pre_fault_private_and_shared(make):
    g, _ = tdx(make)
    g.make_private(0, PAGE)
    g.vcpu.pre_fault_memory(0, 2 * PAGE)
    ms = [(m.gfn, m.private, m.young) for m in g.vm.mappings()]
    assert ms == [(0, True, False), (1, False, False)]
    assert g.b.tdx.sept.keys() == {0}
