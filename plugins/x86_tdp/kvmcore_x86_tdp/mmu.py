"""The x86 MMU's fault-path policy (arch/x86/kvm/mmu/mmu.c, x86.c): lpage_info with the slot
alignment rule and the MIXED attribute flag, the mapping-level computation,
kvm_mmu_hugepage_adjust, and the private max level per VM type.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from .spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    level_for_size,
)

if TYPE_CHECKING:
    from kvmcore.kvm import Kvm

KVM_LPAGE_MIXED_FLAG = 1 << 31
HUGE_LEVELS = (PG_LEVEL_2M, PG_LEVEL_1G)


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    shift = 9 * (level - 1)
    return (gfn >> shift) - (base_gfn >> shift)


def kvm_mmu_slot_lpages(base_gfn: int, npages: int, level: int) -> int:
    return gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1)


# --------------------------------------------------------------------------- lpage_info
def kvm_alloc_memslot_metadata(slot) -> dict[int, array]:
    """x86.c kvm_alloc_memslot_metadata: per huge level a disallow_lpage counter per huge
    page; the first/last entry count 1 if the slot's start/end is misaligned, and every entry
    if gfn and userspace_addr are not congruent at that level."""
    info = {}
    ugfn = slot.userspace_addr >> 12
    for level in HUGE_LEVELS:
        n = kvm_mmu_slot_lpages(slot.base_gfn, slot.npages, level)
        mask = KVM_PAGES_PER_HPAGE(level) - 1
        if (slot.base_gfn ^ ugfn) & mask:
            linfo = array("I", [1]) * n
        else:
            linfo = array("I", bytes(4 * n))
            if slot.base_gfn & mask:
                linfo[0] = 1
            if (slot.base_gfn + slot.npages) & mask:
                linfo[n - 1] = 1
        info[level] = linfo
    slot.arch["lpage_info"] = info
    return info


def lpage_info(slot) -> dict[int, array]:
    info = slot.arch.get("lpage_info")
    if info is None:
        info = kvm_alloc_memslot_metadata(slot)
    return info


def lpage_info_slot(slot, gfn: int, level: int) -> tuple[array, int]:
    return lpage_info(slot)[level], gfn_to_index(gfn, slot.base_gfn, level)


def hugepage_test_mixed(slot, gfn: int, level: int) -> bool:
    linfo, i = lpage_info_slot(slot, gfn, level)
    return bool(linfo[i] & KVM_LPAGE_MIXED_FLAG)


def hugepage_set_mixed(slot, gfn: int, level: int) -> None:
    linfo, i = lpage_info_slot(slot, gfn, level)
    linfo[i] |= KVM_LPAGE_MIXED_FLAG


def hugepage_clear_mixed(slot, gfn: int, level: int) -> None:
    linfo, i = lpage_info_slot(slot, gfn, level)
    linfo[i] &= ~KVM_LPAGE_MIXED_FLAG


def update_gfn_disallow_lpage_count(slot, gfn: int, count: int) -> None:
    """mmu.c update_gfn_disallow_lpage_count (kvm_mmu_gfn_disallow_lpage/allow_lpage): the
    counter never touches the MIXED flag."""
    for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
        linfo, i = lpage_info_slot(slot, gfn, level)
        old = linfo[i]
        linfo[i] = (old & KVM_LPAGE_MIXED_FLAG) | ((old & ~KVM_LPAGE_MIXED_FLAG) + count)
        if (old ^ linfo[i]) & KVM_LPAGE_MIXED_FLAG:
            raise AssertionError("disallow_lpage count flipped the MIXED flag")


def hugepage_has_attrs(vm: Kvm, slot, gfn: int, level: int, attrs: int) -> bool:
    """mmu.c hugepage_has_attrs: 2M asks the attribute store for the whole range; 1G asks
    each 2M sub-page's MIXED flag and first gfn (so 2M must be computed first)."""
    start = gfn
    end = start + KVM_PAGES_PER_HPAGE(level)
    if level == PG_LEVEL_2M:
        return vm.range_has_memory_attributes(start, end, ~0, attrs)
    step = KVM_PAGES_PER_HPAGE(level - 1)
    for g in range(start, end, step):
        if hugepage_test_mixed(slot, g, level - 1) or attrs != vm.get_memory_attributes(g):
            return False
    return True


def kvm_arch_post_set_memory_attributes(vm: Kvm, slot, start: int, end: int,
                                        attrs: int) -> None:
    """mmu.c kvm_arch_post_set_memory_attributes: for 2M then 1G, recompute the head and
    tail huge pages straddling the range (when fully inside the slot) and clear MIXED on the
    ones fully inside it."""
    slot_end = slot.base_gfn + slot.npages
    for level in HUGE_LEVELS:
        nr = KVM_PAGES_PER_HPAGE(level)
        gfn = gfn_round_for_level(start, level)
        if gfn != start or gfn + nr > end:
            if gfn >= slot.base_gfn and gfn + nr <= slot_end:
                if hugepage_has_attrs(vm, slot, gfn, level, attrs):
                    hugepage_clear_mixed(slot, gfn, level)
                else:
                    hugepage_set_mixed(slot, gfn, level)
            gfn += nr
        if gfn + nr <= end:
            linfo = lpage_info(slot)[level]
            first = gfn_to_index(gfn, slot.base_gfn, level)
            count = (end - gfn) // nr
            for i in range(first, first + count):
                linfo[i] &= ~KVM_LPAGE_MIXED_FLAG
            gfn += count * nr
        if gfn < end and gfn + nr <= slot_end:
            if hugepage_has_attrs(vm, slot, gfn, level, attrs):
                hugepage_clear_mixed(slot, gfn, level)
            else:
                hugepage_set_mixed(slot, gfn, level)


def kvm_mmu_init_memslot_memory_attributes(vm: Kvm, slot) -> None:
    """mmu.c kvm_mmu_init_memslot_memory_attributes: compute MIXED for every huge page fully
    inside a new slot (2M first). A slot whose attributes are uniform has no mixed page, which
    the range-based attribute store answers in one query."""
    base, end = slot.base_gfn, slot.base_gfn + slot.npages
    attrs0 = vm.get_memory_attributes(base)
    if vm.range_has_memory_attributes(base, end, ~0, attrs0):
        return
    for level in HUGE_LEVELS:
        nr = KVM_PAGES_PER_HPAGE(level)
        start = (base + nr - 1) & ~(nr - 1)
        for gfn in range(start, end - nr + 1, nr):
            attrs = vm.get_memory_attributes(gfn)
            if hugepage_has_attrs(vm, slot, gfn, level, attrs):
                hugepage_clear_mixed(slot, gfn, level)
            else:
                hugepage_set_mixed(slot, gfn, level)


def expected_mixed(vm: Kvm, slot, gfn: int, level: int) -> bool:
    """What MIXED must be for a huge page fully inside ``slot`` (invariant 12)."""
    nr = KVM_PAGES_PER_HPAGE(level)
    return not vm.range_has_memory_attributes(gfn, gfn + nr, ~0, vm.get_memory_attributes(gfn))


# --------------------------------------------------------------------------- levels
def host_pfn_mapping_level(vm: Kvm, slot, gfn: int) -> int:
    """mmu.c host_pfn_mapping_level: the level of the host mapping of the gfn's hva."""
    hva = slot.gfn_to_hva(gfn)
    return level_for_size(vm.host.host_mapping_size(hva))


def kvm_max_level_for_order(order: int) -> int:
    if order >= 18:
        return PG_LEVEL_1G
    if order >= 9:
        return PG_LEVEL_2M
    return PG_LEVEL_4K


def kvm_mmu_max_mapping_level_(vm: Kvm, slot, gfn: int, max_level: int, is_private: bool,
                                max_huge_page_level: int, host_level: int | None = None) -> int:
    """mmu.c __kvm_mmu_max_mapping_level: cap at max_huge_page_level, walk down past levels
    whose lpage_info disallows a huge page, then (shared only) the host mapping level."""
    max_level = min(max_level, max_huge_page_level)
    info = lpage_info(slot)
    while max_level > PG_LEVEL_4K:
        if not info[max_level][gfn_to_index(gfn, slot.base_gfn, max_level)]:
            break
        max_level -= 1
    if is_private or max_level == PG_LEVEL_4K:
        return max_level
    if host_level is None:
        host_level = host_pfn_mapping_level(vm, slot, gfn)
    return min(host_level, max_level)
