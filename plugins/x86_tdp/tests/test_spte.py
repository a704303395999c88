"""The EPT entry format and KVM's SPTE builders, standalone (spte.h / spte.c)."""

from __future__ import annotations

import pytest

from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.tdp_mmu import tdp_geometry


def test_hardware_bit_positions():
    assert (S.VMX_EPT_READABLE_MASK, S.VMX_EPT_WRITABLE_MASK,
            S.VMX_EPT_EXECUTABLE_MASK) == (1, 2, 4)
    assert S.VMX_EPT_IPAT_BIT == 1 << 6 and S.PT_PAGE_SIZE_MASK == 1 << 7
    assert (S.VMX_EPT_ACCESS_BIT, S.VMX_EPT_DIRTY_BIT) == (1 << 8, 1 << 9)
    assert S.VMX_EPT_SUPPRESS_VE_BIT == 1 << 63
    assert S.VMX_EPT_MISCONFIG_WX_VALUE == 0x6


def test_software_bit_positions():
    assert S.SPTE_MMU_PRESENT_MASK == 1 << 11
    assert (S.SPTE_TDP_AD_ENABLED, S.SPTE_TDP_AD_DISABLED, S.SPTE_TDP_AD_WRPROT_ONLY) == (
        0, 1 << 52, 2 << 52)
    assert S.EPT_SPTE_HOST_WRITABLE == 1 << 57 and S.EPT_SPTE_MMU_WRITABLE == 1 << 58
    assert S.SHADOW_ACC_TRACK_SAVED_MASK == (1 << 54) | (1 << 56)


def test_invariant_1_2_special_values():
    """1, 2: SHADOW_NONPRESENT_VALUE is bit 63; FROZEN is bit63|0x5a0 with no RWX, no bit 11;
    neither, nor an MMIO SPTE, is shadow-present."""
    assert S.SHADOW_NONPRESENT_VALUE == 1 << 63
    assert S.FROZEN_SPTE == 0x80000000000005A0
    assert not S.FROZEN_SPTE & S.VMX_EPT_RWX_MASK
    mmio = S.make_mmio_spte(0x1234, S.MMIO_SPTE_GEN_MASK)
    for v in (S.SHADOW_NONPRESENT_VALUE, S.FROZEN_SPTE, mmio):
        assert not S.is_shadow_present_pte(v)
    assert all(v == S.SHADOW_NONPRESENT_VALUE for v in S.NONPRESENT_TABLE)
    assert len(S.NONPRESENT_TABLE) == 512


def test_make_spte_fault_writable():
    """8: a non-prefetch leaf has Accessed; a writable one Dirty and the writable triad 111;
    WB memory type with IPAT; present mask = suppress-#VE."""
    spte, wrprot = S.make_spte(level=1, pfn=0x1234, host_writable=True)
    assert not wrprot
    assert spte & 0x7 == 0x7
    assert spte & S.VMX_EPT_ACCESS_BIT and spte & S.VMX_EPT_DIRTY_BIT
    assert spte & S.EPT_SPTE_HOST_WRITABLE and spte & S.EPT_SPTE_MMU_WRITABLE
    assert (spte >> 3) & 7 == S.MTRR_TYPE_WRBACK and spte & S.VMX_EPT_IPAT_BIT
    assert spte & S.VMX_EPT_SUPPRESS_VE_BIT and spte & S.SPTE_MMU_PRESENT_MASK
    assert not spte & S.PT_PAGE_SIZE_MASK
    assert S.spte_to_pfn(spte) == 0x1234
    assert S.check_spte_writable_invariants(spte) is None


def test_make_spte_host_readonly_is_000():
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=False)
    assert not spte & (S.PT_WRITABLE_MASK | S.EPT_SPTE_MMU_WRITABLE | S.EPT_SPTE_HOST_WRITABLE)
    assert not spte & S.VMX_EPT_DIRTY_BIT


def test_make_spte_write_tracked_is_wrprot():
    spte, wrprot = S.make_spte(level=1, pfn=5, host_writable=True, write_tracked=True)
    assert wrprot
    assert spte & S.EPT_SPTE_HOST_WRITABLE and not spte & S.EPT_SPTE_MMU_WRITABLE
    assert not spte & S.PT_WRITABLE_MASK


def test_make_spte_prefetch_is_access_tracked():
    """8: a prefetched SPTE is access-tracked: A cleared (A/D on), RWX parked (A/D off)."""
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True, prefetch=True)
    assert not spte & S.VMX_EPT_ACCESS_BIT and spte & 0x7 == 0x7
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True, prefetch=True, ad_disabled=True)
    assert S.is_access_track_spte(spte)
    assert spte & S.SHADOW_ACC_TRACK_SAVED_MASK == S.SHADOW_ACC_TRACK_SAVED_MASK
    assert S.restore_acc_track_spte(spte) & 0x5 == 0x5


def test_make_spte_huge_and_nx():
    """7: bit 7 above 4K; with NX huge pages no huge leaf is executable; host MMIO is UC."""
    spte, _ = S.make_spte(level=2, pfn=512, host_writable=True)
    assert spte & S.PT_PAGE_SIZE_MASK and spte & 0x4
    spte, _ = S.make_spte(level=3, pfn=1 << 18, host_writable=True, nx_huge_pages=True)
    assert spte & S.PT_PAGE_SIZE_MASK and not spte & 0x4
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True, is_host_mmio=True)
    assert (spte >> 3) & 7 == S.MTRR_TYPE_UNCACHABLE and not spte & S.VMX_EPT_IPAT_BIT


def test_ad_disabled_spte_has_no_ad_bits():
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True, ad_disabled=True)
    assert spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED
    assert not spte & (S.VMX_EPT_ACCESS_BIT | S.VMX_EPT_DIRTY_BIT)
    assert S.is_accessed_spte(spte)
    tracked = S.mark_spte_for_access_track(spte)
    assert not S.is_accessed_spte(tracked) and not tracked & 0x7
    assert S.mark_spte_for_access_track(tracked) == tracked
    assert S.restore_acc_track_spte(tracked) & ~S.PT_WRITABLE_MASK == spte & ~S.PT_WRITABLE_MASK


def test_invariant_6_nonleaf():
    nl = S.make_nonleaf_spte(0x5000)
    assert nl & 0x7 == 0x7 and nl & S.VMX_EPT_ACCESS_BIT and nl & S.SPTE_MMU_PRESENT_MASK
    assert not nl & S.PT_PAGE_SIZE_MASK and nl & S.SPTE_BASE_ADDR_MASK == 0x5000
    nl = S.make_nonleaf_spte(0x5000, ad_disabled=True)
    assert not nl & S.VMX_EPT_ACCESS_BIT and nl & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED


def test_split_and_collapse():
    huge, _ = S.make_spte(level=2, pfn=0x200, host_writable=True)
    children = [S.make_small_spte(huge, 1, i) for i in range(512)]
    assert [S.spte_to_pfn(c) for c in children] == list(range(0x200, 0x400))
    assert not any(c & S.PT_PAGE_SIZE_MASK for c in children)
    assert all(c & ~(S.SPTE_BASE_ADDR_MASK | S.PT_PAGE_SIZE_MASK)
               == huge & ~(S.SPTE_BASE_ADDR_MASK | S.PT_PAGE_SIZE_MASK) for c in children)
    assert S.make_huge_spte(children[77], 2) == huge
    g1, _ = S.make_spte(level=3, pfn=1 << 18, host_writable=True)
    mid = [S.make_small_spte(g1, 2, i) for i in range(512)]
    assert all(m & S.PT_PAGE_SIZE_MASK for m in mid)
    assert S.spte_to_pfn(mid[3]) == (1 << 18) + 3 * 512


def test_mmio_spte_generation_layout():
    """26: generation bits 0-7 in SPTE bits 3-10, 8-18 in 52-62; gfn in the address bits;
    XWR = 110b (misconfig); the allowed mask holds everything but the generation."""
    gen = 0x5A5A5 & S.MMIO_SPTE_GEN_MASK
    spte = S.make_mmio_spte(0xABCDE, gen)
    assert S.get_mmio_spte_generation(spte) == gen
    assert S.get_mmio_spte_gfn(spte) == 0xABCDE
    assert spte & 0x7 == 0x6 and S.is_mmio_spte(spte)
    assert (spte >> 3) & 0xFF == gen & 0xFF
    assert (spte >> 52) & 0x7FF == gen >> 8
    assert S.MMIO_SPTE_GEN_MASK == (1 << 19) - 1
    assert not (spte & ~(S.MMIO_SPTE_GEN_LOW_MASK | S.MMIO_SPTE_GEN_HIGH_MASK)
                & ~S.SPTE_MMIO_ALLOWED_MASK)
    assert not S.is_mmio_spte(S.SHADOW_NONPRESENT_VALUE)
    assert not S.is_ept_ve_possible(spte)


def test_invariant_22_flush_rule():
    """22: only losing MMU-writable needs an immediate flush; W, A, D alone do not."""
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True)
    assert not S.leaf_spte_change_needs_tlb_flush(spte, spte & ~S.PT_WRITABLE_MASK)
    assert not S.leaf_spte_change_needs_tlb_flush(spte, spte & ~S.VMX_EPT_DIRTY_BIT)
    assert not S.leaf_spte_change_needs_tlb_flush(spte, spte & ~S.VMX_EPT_ACCESS_BIT)
    assert S.leaf_spte_change_needs_tlb_flush(
        spte, spte & ~(S.PT_WRITABLE_MASK | S.EPT_SPTE_MMU_WRITABLE))


def test_invariant_3_triad_checker():
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True)
    assert S.check_spte_writable_invariants(spte & ~S.EPT_SPTE_HOST_WRITABLE)
    assert S.check_spte_writable_invariants(spte & ~S.EPT_SPTE_MMU_WRITABLE)
    assert S.check_spte_writable_invariants(spte & ~S.PT_WRITABLE_MASK) is None


def test_needs_atomic_update():
    spte, _ = S.make_spte(level=1, pfn=5, host_writable=True)
    assert not S.spte_needs_atomic_update(spte)
    assert S.spte_needs_atomic_update(spte & ~S.PT_WRITABLE_MASK)
    assert S.spte_needs_atomic_update(spte & ~S.VMX_EPT_DIRTY_BIT)


@pytest.mark.parametrize("root_level,ia_bits", [(4, 48), (5, 57)])
def test_invariant_25_geometry(root_level, ia_bits):
    """25: 9 index bits per level, level sizes 512^(level-1) pages, root 4 or 5."""
    g = tdp_geometry(root_level)
    assert g.level_ids == tuple(range(root_level, 0, -1))
    assert g.ia_bits == ia_bits
    assert [1 << s for s in g.shifts][-3:] == [1 << 30, 1 << 21, 1 << 12]
    assert [S.KVM_PAGES_PER_HPAGE(lvl) for lvl in (1, 2, 3)] == [1, 512, 262144]
    gpa = 0x1234_5678_9000 & ((1 << ia_bits) - 1)
    for pos, lvl in enumerate(g.level_ids):
        assert g.index(pos, gpa) == (gpa >> (12 + 9 * (lvl - 1))) & 511


def test_ept_format_is_kvm_spte_builders():
    """EptFormat, the RadixFormat the core walks: KVM's shadow-present bit is "valid", leaves
    at 4K-1G; its builders are make_spte / make_nonleaf_spte / make_small_spte; MMIO and
    FROZEN SPTEs are placeholders; perms read A/D and access tracking as KVM does."""
    from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X
    rwx = PERM_R | PERM_W | PERM_X
    fmt = S.EptFormat(4, nx_huge_pages=True)
    assert fmt.geometry == tdp_geometry(4) and fmt.empty == S.SHADOW_NONPRESENT_VALUE
    huge = fmt.make_leaf(1 << 21, 2, rwx | PERM_A | PERM_D)
    assert huge == S.make_spte(level=2, pfn=0x200, host_writable=True, nx_huge_pages=True)[0]
    assert fmt.output_address(huge, 2) == 1 << 21 and fmt.is_leaf(huge, 2)
    assert fmt.split_child(huge, 2, 1, 3) == S.make_small_spte(huge, 1, 3, True)
    table = fmt.make_table(0x5000, 2)
    assert table == S.make_nonleaf_spte(0x5000) and not fmt.is_leaf(table, 2)
    assert fmt.table_address(table, 2) == 0x5000
    mmio = S.make_mmio_spte(5, 0)
    assert fmt.is_placeholder(S.FROZEN_SPTE, 1) and fmt.is_placeholder(mmio, 1)
    assert not fmt.is_placeholder(0, 1) and not fmt.is_valid(mmio, 1)
    assert not S.EptFormat(4, mmio_value=None).is_placeholder(mmio, 1)
    assert fmt.perms(huge) == PERM_R | PERM_W | PERM_A | PERM_D     # NX strips X from huge
    no_ad = S.make_spte(level=1, pfn=5, host_writable=True, ad_disabled=True)[0]
    assert fmt.perms(no_ad) == rwx | PERM_A | PERM_D                # dirty == writable
    assert fmt.perms(S.mark_spte_for_access_track(no_ad)) == PERM_R | PERM_X
