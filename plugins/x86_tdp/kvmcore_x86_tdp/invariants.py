"""The x86 invariants of shared/reference/x86_tdp.md that a state check can see (numbers are
the reference's). Transition invariants (4, 5, 11's WARN, 19, 20) are checked when each SPTE
changes (``TdpMmu.handle_changed_spte``) and reported from ``TdpMmu.bugs``; 3's "Host-writable
is immutable" is not checked (Linux does not, and a write fault after a read fault of a
MAP_SHARED page changes it). Flow invariants (8, 13, 16-18, 21-24) have tests in ``tests/``.
"""

from __future__ import annotations

from kvmcore.pgtable import present_indices
from kvmcore.radix import check_entries
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from . import mmu
from .spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_RWX_MASK,
    check_spte_writable_invariants,
    get_mmio_spte_gfn,
    spte_to_pfn,
)


def check_invariants(backend, vm) -> list[str]:
    """The core's format invariants over every root at once (``radix.check_entries``: 1, a
    non-present SPTE is SHADOW_NONPRESENT_VALUE, MMIO or FROZEN; table links, tables linked
    twice or leaked from all roots; 11, leaves at 4K-1G aligned to their size), then the
    x86 ones on each entry it yields."""
    tdp = backend.tdp
    tdx = backend.tdx
    problems: list[str] = list(tdp.bugs)
    init_set = vm.dirty_log_manual_protect_and_init_set()

    # 15: root kinds per VM type.
    mirrors = False
    for root in tdp.roots:
        mirrors = mirrors or root.is_mirror
        if root.level not in (4, 5):  # 25
            problems.append(f"root level {root.level} is neither 4 nor 5")
        if root.zapped and any(present_indices(root.table, SHADOW_NONPRESENT_VALUE)):
            problems.append(f"{root}: kvm_tdp_mmu_zap_invalidated_roots zapped it, yet it has "
                            "present entries")
    if tdx is None and mirrors:
        problems.append("a non-TDX VM has mirror roots")
    if tdx is not None and not mirrors:
        problems.append("a TDX VM has no mirror root")

    mirror_leaves: dict[int, int] = {}
    for root, level, addr, spte, leaf in check_entries([(r, r.rt) for r in tdp.roots],
                                                       problems):
        if root.invalid:
            continue
        key = addr >> 12
        gfn = key - root.gfn_bits
        found = []
        if not spte & SPTE_MMU_PRESENT_MASK:
            # 2, 26: FROZEN only inside a flow; an MMIO SPTE is a 4K entry of its own gfn.
            if spte == FROZEN_SPTE:
                found.append("FROZEN_SPTE left behind")
            elif level != PG_LEVEL_4K:
                found.append("MMIO SPTE above 4K")
            elif get_mmio_spte_gfn(spte) != gfn:
                found.append(f"MMIO SPTE encodes gfn {get_mmio_spte_gfn(spte):#x}")
        elif not leaf:
            # 6: non-leaf is RWX, Accessed with A/D on.
            if spte & VMX_EPT_RWX_MASK != VMX_EPT_RWX_MASK:
                found.append(f"non-leaf SPTE {spte:#x} is not RWX")
            if (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED and \
                    not spte & VMX_EPT_ACCESS_BIT:
                found.append(f"non-leaf SPTE {spte:#x} lacks Accessed")
        else:
            p = check_spte_writable_invariants(spte)  # 3: writable triad.
            if p:
                found.append(p)
            # 7: bit 7 per level; NX workaround.
            if level > PG_LEVEL_4K and backend.nx_huge_pages and spte & 0x4:
                found.append("executable huge leaf with NX huge pages on")
            if level > backend.max_huge_page_level:
                found.append("leaf above max_huge_page_level")
            pfn = spte_to_pfn(spte)
            if root.is_mirror:
                mirror_leaves[gfn] = pfn
                if level != PG_LEVEL_4K:  # 10
                    found.append("TDX private leaf above 4K")
            if tdx is not None and not root.is_mirror and not key & tdx.shared_gfn_bit:
                found.append("shared-EPT leaf below the shared bit")  # 14
            slot = vm.leaf_memslot(gfn, root.as_id)
            if slot is None:  # 17
                found.append("leaf maps a gfn outside every memslot")
            else:
                _slot_leaf_problems(backend, vm, root, slot, level, gfn, spte, pfn, init_set,
                                    found)
        if found:
            where = f"{root.name} level {level} gfn {gfn:#x}"
            problems.extend(f"{where}: {p}" for p in found)

    # 20: the mirror and the TDX module's S-EPT agree -- except for the pages a flow paused
    # between zapping the mirror SPTE and PAGE.REMOVE is removing (it holds kvm->mmu_lock).
    if tdx is not None:
        in_flight = tdx.removing if vm.mmu_lock.held else set()
        sept = {g: p for g, p in tdx.sept.items() if g not in in_flight}
        if mirror_leaves != sept:
            diff = set(mirror_leaves.items()) ^ set(sept.items())
            problems.append(f"mirror root and S-EPT differ at gfns "
                            f"{sorted(g for g, _ in diff)[:8]}")
        blocked = tdx.blocked - in_flight
        if blocked:
            problems.append(f"S-EPT entries left BLOCKED: {sorted(blocked)[:8]}")
        problems.extend(tdx.removal_order_problems(in_flight))  # 19

    # 12: MIXED flags.
    if backend.has_private_mem:
        for slot in vm.all_memslots():
            info = slot.arch.get("lpage_info")
            if info is not None:
                problems.extend(_mixed_problems(vm, slot, info))
    return problems


#: Base pages per 2M page.
_NR_2M = KVM_PAGES_PER_HPAGE(mmu.HUGE_LEVELS[0])


def _slot_leaf_problems(backend, vm, root, slot, level, gfn, spte, pfn, init_set, found):
    """The x86 invariants of a present leaf that depend on its memslot."""
    # 9: no writable huge leaf in a dirty-logged slot -- unless manual protect with
    # INITIALLY_SET: kvm_mmu_slot_apply_flags then neither write-protects nor splits (every
    # page is reported dirty anyway); CLEAR does it lazily. Nor while slots_lock is held: a
    # memslot update publishes the logging slot before kvm_mmu_slot_apply_flags protects it.
    if slot.flags & KVM_MEM_LOG_DIRTY_PAGES and level > PG_LEVEL_4K and \
            spte & PT_WRITABLE_MASK and not init_set and not vm.slots_lock.held:
        found.append("writable huge leaf in a dirty-logged slot")
    # 10: level allowed by lpage_info.
    if level > PG_LEVEL_4K:
        info = mmu.lpage_info(slot)
        idx = mmu.gfn_to_index(gfn, slot.base_gfn, level)
        if idx >= len(info[level]) or info[level][idx]:
            found.append("huge leaf where disallow_lpage is set")
    # 13/16: private-ness of the mapping matches the attribute.
    if backend.has_private_mem:
        attr_private = vm.kvm_mem_is_private(gfn)
        if backend.tdx is not None:
            if root.is_mirror and not attr_private:
                found.append("private leaf for a shared gfn")
            if not root.is_mirror and attr_private:
                found.append("shared leaf for a private gfn")
        elif backend.rmp is not None and backend.rmp.is_private(pfn) != attr_private:
            found.append(f"RMP state of pfn {pfn:#x} does not match the gfn's attribute")


def _mixed_problems(vm, slot, info) -> list[str]:
    out = []
    base, end = slot.base_gfn, slot.base_gfn + slot.npages
    if end - ((base + _NR_2M - 1) & ~(_NR_2M - 1)) < _NR_2M:
        return out          # no whole 2M page inside (nor a larger one): no flag to check
    uniform = vm.range_has_memory_attributes(base, end, ~0, vm.get_memory_attributes(base))
    # A conversion stores the attributes before its post-set updates the flags, both inside
    # its invalidation: the flags of the huge pages that invalidation covers are not due yet.
    inv = vm.mmu_invalidate
    lo, hi = (inv.range_start, inv.range_end) if inv.in_progress else (0, 0)
    for level in mmu.HUGE_LEVELS:
        nr = KVM_PAGES_PER_HPAGE(level)
        linfo = info[level]
        first = (base + nr - 1) & ~(nr - 1)
        for gfn in range(first, end - nr + 1, nr):
            if gfn < hi and lo < gfn + nr:
                continue
            idx = mmu.gfn_to_index(gfn, base, level)
            flag = bool(linfo[idx] & mmu.KVM_LPAGE_MIXED_FLAG)
            want = False if uniform else mmu.expected_mixed(vm, slot, gfn, level)
            if flag != want:
                out.append(f"slot {slot.id} level {level} huge page at gfn {gfn:#x}: MIXED is "
                           f"{flag}, attributes say {want}")
                if len(out) > 8:
                    return out
    return out
