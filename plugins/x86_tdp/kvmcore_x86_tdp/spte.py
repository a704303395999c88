"""The EPT entry as KVM builds it (arch/x86/kvm/mmu/spte.h, spte.c, arch/x86/include/asm/vmx.h).

Hardware bits follow the SDM's EPT format; KVM's software bits follow
``kvm_mmu_set_ept_masks``. The model host has 52 physical-address bits, execute-only EPT
(so ``shadow_present_mask`` is only the suppress-#VE bit) and no L1TF
(``shadow_nonpresent_or_rsvd_mask`` = 0).
"""

from __future__ import annotations

import functools
from array import array

from kvmcore.pgtable import Geometry
from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X, RadixFormat

# --------------------------------------------------------------------------- hardware bits
VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = 0x7
PT_PRESENT_MASK = VMX_EPT_READABLE_MASK
PT_WRITABLE_MASK = VMX_EPT_WRITABLE_MASK
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_MT_MASK = 0x7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
VMX_EPT_USER_EXECUTABLE_MASK = 1 << 10
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK

MTRR_TYPE_UNCACHABLE = 0
MTRR_TYPE_WRBACK = 6
#: EPT memory types the SDM reserves (__reset_rsvds_bits_mask_ept).
EPT_ILLEGAL_MEMTYPES = frozenset({2, 3, 7})

# --------------------------------------------------------------------------- KVM's masks
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT

SHADOW_ACC_TRACK_SAVED_BITS_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
SHADOW_ACC_TRACK_SAVED_MASK = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT

EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
shadow_host_writable_mask = EPT_SPTE_HOST_WRITABLE
shadow_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE
shadow_user_mask = VMX_EPT_READABLE_MASK
shadow_accessed_mask = VMX_EPT_ACCESS_BIT
shadow_dirty_mask = VMX_EPT_DIRTY_BIT
shadow_x_mask = VMX_EPT_EXECUTABLE_MASK
shadow_present_mask = VMX_EPT_SUPPRESS_VE_BIT
shadow_acc_track_mask = VMX_EPT_RWX_MASK
shadow_nonpresent_or_rsvd_mask = 0

SHADOW_NONPRESENT_VALUE = 1 << 63
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0

PHYSICAL_ADDRESS_BITS = 52
SPTE_BASE_ADDR_MASK = ((1 << PHYSICAL_ADDRESS_BITS) - 1) & ~0xFFF

# MMIO SPTEs (kvm_mmu_set_mmio_spte_mask(VMX_EPT_MISCONFIG_WX_VALUE, RWX | SVE, 0)).
shadow_mmio_value = VMX_EPT_MISCONFIG_WX_VALUE
shadow_mmio_mask = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1   # 8
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1  # 11
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
MMIO_SPTE_GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_MASK = ((1 << MMIO_SPTE_GEN_HIGH_BITS) - 1) << MMIO_SPTE_GEN_HIGH_START
SPTE_MMIO_ALLOWED_MASK = (1 << 63) | SPTE_BASE_ADDR_MASK | 0x7

# --------------------------------------------------------------------------- levels
PG_LEVEL_NONE, PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, PG_LEVEL_512G = 0, 1, 2, 3, 4
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
PT64_ROOT_4LEVEL = 4
PT64_ROOT_5LEVEL = 5
PT64_ROOT_MAX_LEVEL = 5
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 512


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def KVM_HPAGE_SIZE(level: int) -> int:
    return 4096 << (SPTE_LEVEL_BITS * (level - 1))


def level_for_size(size: int) -> int:
    """The largest level whose page fits in ``size`` bytes (at least 4K)."""
    if size >= 1 << 30:
        return PG_LEVEL_1G
    if size >= 1 << 21:
        return PG_LEVEL_2M
    return PG_LEVEL_4K


# ACC_* (mmu.h): TDP faults always pass ACC_ALL.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = 1 << 2
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

#: A fresh page-table page: every entry SHADOW_NONPRESENT_VALUE (mmu_shadow_page_cache.init_value).
NONPRESENT_TABLE = array("Q", [SHADOW_NONPRESENT_VALUE]) * SPTE_ENT_PER_PAGE


# --------------------------------------------------------------------------- predicates
def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE_MASK)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & shadow_mmu_writable_mask)


def is_host_writable_spte(spte: int) -> bool:
    return bool(spte & shadow_host_writable_mask)


def spte_ad_enabled(spte: int) -> bool:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def spte_ad_need_write_protect(spte: int) -> bool:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED


def spte_shadow_accessed_mask(spte: int) -> int:
    return shadow_accessed_mask if spte_ad_enabled(spte) else 0


def spte_shadow_dirty_mask(spte: int) -> int:
    return shadow_dirty_mask if spte_ad_enabled(spte) else 0


def is_access_track_spte(spte: int) -> bool:
    return not spte_ad_enabled(spte) and not (spte & shadow_acc_track_mask)


def is_accessed_spte(spte: int) -> bool:
    if spte_ad_enabled(spte):
        return bool(spte & shadow_accessed_mask)
    return not is_access_track_spte(spte)


def is_dirty_spte(spte: int) -> bool:
    if spte_ad_enabled(spte):
        return bool(spte & shadow_dirty_mask)
    return bool(spte & PT_WRITABLE_MASK)


def is_executable_pte(spte: int) -> bool:
    return bool(spte & shadow_x_mask)


def is_mmio_spte(spte: int, mmio_value: int = shadow_mmio_value,
                 enable_mmio_caching: bool = True) -> bool:
    return enable_mmio_caching and (spte & shadow_mmio_mask) == mmio_value


def is_frozen_spte(spte: int) -> bool:
    return spte == FROZEN_SPTE


def is_ept_ve_possible(spte: int) -> bool:
    """#VE is only raised for an EPT violation on an entry with suppress-#VE clear; XWR=110b
    is a misconfig, never a violation."""
    return (not (spte & VMX_EPT_SUPPRESS_VE_BIT)
            and (spte & VMX_EPT_RWX_MASK) != VMX_EPT_MISCONFIG_WX_VALUE)


def leaf_spte_change_needs_tlb_flush(old_spte: int, new_spte: int) -> bool:
    """Only losing MMU-writable requires an immediate flush: clearing W for dirty logging, A or
    D is safe because the fast path may restore W without the MMU lock."""
    return is_mmu_writable_spte(old_spte) and not is_mmu_writable_spte(new_spte)


def spte_needs_atomic_update(spte: int) -> bool:
    """Whether hardware or the lockless fast path may change ``spte`` behind the MMU lock's
    back (spte.c), i.e. whether Linux must use xchg/cmpxchg to write it. The model has no
    concurrency, so this only documents which writes Linux makes atomic."""
    if is_mmu_writable_spte(spte) and not is_writable_pte(spte):
        return True
    if not spte_ad_enabled(spte):
        return True
    return is_writable_pte(spte) and not (spte & shadow_dirty_mask)


def check_spte_writable_invariants(spte: int) -> str | None:
    """The writable triad (spte.h): W => MMU-writable => Host-writable."""
    if spte & shadow_mmu_writable_mask:
        if not spte & shadow_host_writable_mask:
            return f"MMU-writable SPTE {spte:#x} is not Host-writable"
    elif spte & PT_WRITABLE_MASK:
        return f"writable SPTE {spte:#x} is not MMU-writable"
    return None


# --------------------------------------------------------------------------- builders
def vmx_get_mt_mask(is_mmio: bool, noncoherent_dma: bool = False) -> int:
    """vmx_get_mt_mask: host MMIO is UC without IPAT; RAM is WB with IPAT (the guest PAT is
    ignored) unless non-coherent DMA is assigned."""
    if is_mmio:
        return MTRR_TYPE_UNCACHABLE << VMX_EPT_MT_EPTE_SHIFT
    if noncoherent_dma:
        return MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT
    return (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT


def mark_spte_for_access_track(spte: int) -> int:
    """spte.c mark_spte_for_access_track: with A/D, clear Accessed; without, park R/X in bits
    54/56 and clear RWX so the next access faults."""
    if spte_ad_enabled(spte):
        return spte & ~shadow_accessed_mask
    if is_access_track_spte(spte):
        return spte
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    spte &= ~(shadow_acc_track_mask | shadow_accessed_mask)
    return spte


def restore_acc_track_spte(spte: int) -> int:
    """spte.h restore_acc_track_spte."""
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~SHADOW_ACC_TRACK_SAVED_MASK
    return spte | saved


def make_spte(*, level: int, pfn: int, host_writable: bool, prefetch: bool = False,
              ad_disabled: bool = False, wrprot_only: bool = False, is_host_mmio: bool = False,
              nx_huge_pages: bool = False, pte_access: int = ACC_ALL,
              old_spte: int = SHADOW_NONPRESENT_VALUE, write_tracked: bool = False,
              ) -> tuple[int, bool]:
    """spte.c make_spte for a TDP MMU leaf. Returns ``(spte, wrprot)``; marking the gfn dirty
    in a logging slot is the caller's (it owns the slot), done when the result is writable.

    ``write_tracked`` stands for mmu_try_to_unsync_pages failing (a write-tracked gfn), which
    this model never produces without shadow paging, but keeps for the WRITE_PROTECTED path.
    """
    wrprot = False
    spte = SPTE_MMU_PRESENT_MASK
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    elif wrprot_only:
        spte |= SPTE_TDP_AD_WRPROT_ONLY
    spte |= shadow_present_mask
    if not prefetch:
        spte |= spte_shadow_accessed_mask(spte)
    if level > PG_LEVEL_4K and (pte_access & ACC_EXEC_MASK) and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= shadow_x_mask
    if pte_access & ACC_USER_MASK:
        spte |= shadow_user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    spte |= vmx_get_mt_mask(is_host_mmio)
    if host_writable:
        spte |= shadow_host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << 12
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | shadow_mmu_writable_mask
        already_writable = (is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level)
                            and is_writable_pte(old_spte))
        if not already_writable and write_tracked:
            wrprot = True
            pte_access &= ~ACC_WRITE_MASK
            spte &= ~(PT_WRITABLE_MASK | shadow_mmu_writable_mask)
    if pte_access & ACC_WRITE_MASK:
        spte |= spte_shadow_dirty_mask(spte)
    if prefetch:
        spte = mark_spte_for_access_track(spte)
    return spte, wrprot


def make_nonleaf_spte(child_pa: int, ad_disabled: bool = False) -> int:
    """spte.c make_nonleaf_spte: full RWX, Accessed (or the A/D-disabled marker)."""
    spte = SPTE_MMU_PRESENT_MASK | (child_pa & SPTE_BASE_ADDR_MASK) | shadow_present_mask
    spte |= PT_WRITABLE_MASK | shadow_user_mask | shadow_x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= shadow_accessed_mask
    return spte


def make_small_spte(huge_spte: int, role_level: int, index: int, nx_huge_pages: bool = False,
                    ) -> int:
    """spte.c make_small_spte: the ``index``-th child of a huge leaf being split into a table
    of level ``role_level``; same permissions and A/D state, PFN offset by the child's size.
    X was stripped from the huge leaf by the NX workaround and is granted back at 4K."""
    child = huge_spte
    child += (index * KVM_PAGES_PER_HPAGE(role_level)) << 12
    if role_level == PG_LEVEL_4K:
        child &= ~PT_PAGE_SIZE_MASK
        if nx_huge_pages:
            child |= shadow_x_mask
    return child


def make_huge_spte(small_spte: int, level: int) -> int:
    """spte.c make_huge_spte: a huge leaf of ``level`` from any child leaf (huge-page
    recovery). The NX workaround clears ``shadow_nx_mask`` here, which is 0 for EPT, so an
    executable child stays executable."""
    huge = small_spte | PT_PAGE_SIZE_MASK
    huge &= ~((KVM_HPAGE_SIZE(level) - 1) & SPTE_BASE_ADDR_MASK)
    return huge


def generation_mmio_spte_mask(gen: int) -> int:
    mask = (gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK
    mask |= ((gen >> MMIO_SPTE_GEN_LOW_BITS) << MMIO_SPTE_GEN_HIGH_START) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


def get_mmio_spte_generation(spte: int) -> int:
    gen = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
    gen |= ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_START) << MMIO_SPTE_GEN_LOW_BITS
    return gen


def make_mmio_spte(gfn: int, generation: int, mmio_value: int = shadow_mmio_value,
                   access: int = 0) -> int:
    """spte.c make_mmio_spte: generation bits | per-VM MMIO value | GPA (access bits are
    masked away on EPT: the access mask is 0)."""
    gen = generation & MMIO_SPTE_GEN_MASK
    gpa = gfn << 12
    return generation_mmio_spte_mask(gen) | mmio_value | gpa | shadow_nonpresent_or_rsvd_mask


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


@functools.cache
def tdp_geometry(root_level: int) -> Geometry:
    """9 index bits per level, 4K at level 1 (tdp_iter.h SPTE_INDEX); ia_bits is what the
    root can index (48 bits for a 4-level root, 57 for 5-level)."""
    levels = tuple(range(root_level, 0, -1))
    return Geometry(shifts=tuple(12 + 9 * (lvl - 1) for lvl in levels),
                    bits=(9,) * root_level, level_ids=levels, ia_bits=12 + 9 * root_level)


class EptFormat(RadixFormat):
    """KVM's EPT entries declared for the core's walks: "valid" is KVM's shadow-present bit
    (the hardware's is RWX; ``ept.ept_translate`` says why the two agree), a table is a
    present entry above 4K without the large-page bit, leaves live at 4K, 2M and 1G. New
    tables are filled with SHADOW_NONPRESENT_VALUE (mmu_shadow_page_cache.init_value), the
    empty entry; MMIO SPTEs (per VM, ``mmio_value``) and FROZEN_SPTE are neither empty nor
    present. One instance per VM: the root level, A/D bits and the NX workaround are per
    VM."""

    leaf_levels = frozenset({PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G})
    empty = SHADOW_NONPRESENT_VALUE
    #: is_valid and is_table above 4K, and table_address, for PageTable.lookup.
    table_bits = (SPTE_MMU_PRESENT_MASK | PT_PAGE_SIZE_MASK, SPTE_MMU_PRESENT_MASK,
                  SPTE_BASE_ADDR_MASK)
    R, W, X = VMX_EPT_READABLE_MASK, PT_WRITABLE_MASK, VMX_EPT_EXECUTABLE_MASK
    A, D = shadow_accessed_mask, shadow_dirty_mask

    def __init__(self, root_level: int = PT64_ROOT_4LEVEL, ad_disabled: bool = False,
                 nx_huge_pages: bool = False, mmio_value: int | None = shadow_mmio_value):
        self.geometry = tdp_geometry(root_level)
        self.ad_disabled = ad_disabled
        self.nx_huge_pages = nx_huge_pages
        self.mmio_value = mmio_value

    @staticmethod
    def is_valid(pte: int, level: int) -> bool:
        return bool(pte & SPTE_MMU_PRESENT_MASK)

    @staticmethod
    def is_table(pte: int, level: int) -> bool:
        return level > PG_LEVEL_4K and not pte & PT_PAGE_SIZE_MASK

    @staticmethod
    def table_address(pte: int, level: int) -> int:
        return pte & SPTE_BASE_ADDR_MASK

    output_address = table_address

    def is_placeholder(self, pte: int, level: int) -> bool:
        return pte == FROZEN_SPTE or (self.mmio_value is not None
                                      and is_mmio_spte(pte, self.mmio_value))

    def make_table(self, pa: int, level: int) -> int:
        return make_nonleaf_spte(pa, self.ad_disabled)

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        """make_spte: R is ACC_USER, W needs a host-writable page, no PERM_A is a prefetch."""
        access = (ACC_USER_MASK if perms & PERM_R else 0) | (
            ACC_WRITE_MASK if perms & PERM_W else 0) | (ACC_EXEC_MASK if perms & PERM_X else 0)
        return make_spte(level=level, pfn=pa >> 12, host_writable=bool(perms & PERM_W),
                         prefetch=not perms & PERM_A, ad_disabled=self.ad_disabled,
                         nx_huge_pages=self.nx_huge_pages, pte_access=access)[0]

    def split_child(self, pte: int, level: int, child_level: int, index: int) -> int:
        return make_small_spte(pte, child_level, index, self.nx_huge_pages)

    def perms(self, pte: int) -> int:
        """R/W/X, young and dirty as KVM reads them (is_accessed_spte, is_dirty_spte): without
        A/D bits a leaf is young unless access-tracked (its parked R/X count) and dirty when
        writable."""
        if spte_ad_enabled(pte):
            return (pte & VMX_EPT_RWX_MASK) | (PERM_A if pte & shadow_accessed_mask else 0) | (
                PERM_D if pte & shadow_dirty_mask else 0)
        if is_access_track_spte(pte):
            return restore_acc_track_spte(pte) & VMX_EPT_RWX_MASK
        return (pte & VMX_EPT_RWX_MASK) | PERM_A | (PERM_D if pte & PT_WRITABLE_MASK else 0)
