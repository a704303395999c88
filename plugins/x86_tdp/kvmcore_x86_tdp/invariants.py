"""The x86 invariants of shared/reference/x86_tdp.md that a state check can see (numbers are
the reference's). Transition invariants (4, 5, 11's WARN, 19, 20) are checked when each SPTE
changes (``TdpMmu.handle_changed_spte``) and reported from ``TdpMmu.bugs``; 3's "Host-writable
is immutable" is not checked (Linux does not, and a write fault after a read fault of a
MAP_SHARED page changes it). Flow invariants (8, 13, 16-18, 21-24) have tests in ``tests/``.
"""

from __future__ import annotations

from kvmcore.pgtable import present_indices
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from . import mmu
from .spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_BASE_ADDR_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_RWX_MASK,
    check_spte_writable_invariants,
    get_mmio_spte_gfn,
    is_mmio_spte,
    spte_to_pfn,
)


def check_invariants(backend, vm) -> list[str]:
    problems: list[str] = list(backend.tdp.bugs)
    tdp = backend.tdp
    tdx = backend.tdx
    mmio_value = backend.shadow_mmio_value
    seen_tables: set[int] = set()
    init_set = vm.dirty_log_manual_protect_and_init_set()

    # 15: root kinds per VM type.
    mirrors = [r for r in tdp.roots if r.is_mirror]
    if tdx is None and mirrors:
        problems.append("a non-TDX VM has mirror roots")
    if tdx is not None and not mirrors:
        problems.append("a TDX VM has no mirror root")

    mirror_leaves: dict[int, int] = {}
    for root in tdp.roots:
        if root.level not in (4, 5):  # 25
            problems.append(f"root level {root.level} is neither 4 nor 5")
        if root.invalid:
            continue
        stack = [(root.pt.root, root.level, 0)]
        while stack:
            pa, level, base = stack.pop()
            if pa in seen_tables:
                problems.append(f"page table {pa:#x} is linked twice")
                continue
            seen_tables.add(pa)
            table = tdp.store[pa]
            step = KVM_PAGES_PER_HPAGE(level)
            # Most of every table is SHADOW_NONPRESENT_VALUE: skip it at C speed.
            for i in present_indices(table, SHADOW_NONPRESENT_VALUE):
                spte = table[i]
                key = base + i * step
                gfn = key - root.gfn_bits
                where = (f"{'mirror' if root.is_mirror else 'direct'} root as{root.as_id} "
                         f"level {level} gfn {gfn:#x}")
                present = bool(spte & SPTE_MMU_PRESENT_MASK)
                if not present:
                    # 1, 2, 5: a non-present SPTE is the non-present value or an MMIO SPTE.
                    if spte == FROZEN_SPTE:
                        problems.append(f"{where}: FROZEN_SPTE left behind")
                    elif spte == SHADOW_NONPRESENT_VALUE:
                        pass
                    elif mmio_value is not None and is_mmio_spte(spte, mmio_value):
                        if level != PG_LEVEL_4K:
                            problems.append(f"{where}: MMIO SPTE above 4K")
                        elif get_mmio_spte_gfn(spte) != gfn:  # 26
                            problems.append(f"{where}: MMIO SPTE encodes gfn "
                                            f"{get_mmio_spte_gfn(spte):#x}")
                    else:
                        problems.append(f"{where}: non-present SPTE {spte:#x} is neither "
                                        "SHADOW_NONPRESENT_VALUE nor MMIO")
                    continue
                leaf = level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE_MASK)
                ad_disabled = (spte & SPTE_TDP_AD_MASK) == SPTE_TDP_AD_DISABLED
                if not leaf:
                    # 6: non-leaf is RWX, Accessed with A/D on, and links a live table.
                    if spte & VMX_EPT_RWX_MASK != VMX_EPT_RWX_MASK:
                        problems.append(f"{where}: non-leaf SPTE {spte:#x} is not RWX")
                    if not ad_disabled and not spte & VMX_EPT_ACCESS_BIT:
                        problems.append(f"{where}: non-leaf SPTE {spte:#x} lacks Accessed")
                    child = spte & SPTE_BASE_ADDR_MASK
                    if child not in tdp.store:
                        problems.append(f"{where}: non-leaf SPTE points at no table")
                        continue
                    stack.append((child, level - 1, key))
                    continue
                # 3: writable triad.
                p = check_spte_writable_invariants(spte)
                if p:
                    problems.append(f"{where}: {p}")
                # 7: bit 7 per level; NX workaround.
                if level > PG_LEVEL_4K and backend.nx_huge_pages and spte & 0x4:
                    problems.append(f"{where}: executable huge leaf with NX huge pages on")
                if level > backend.max_huge_page_level:
                    problems.append(f"{where}: leaf above max_huge_page_level")
                pfn = spte_to_pfn(spte)
                # 11: alignment.
                if level > PG_LEVEL_4K and (gfn & (step - 1) or pfn & (step - 1)):
                    problems.append(f"{where}: huge leaf gfn/pfn {pfn:#x} not aligned")
                if root.is_mirror:
                    mirror_leaves[gfn] = pfn
                    if level != PG_LEVEL_4K:  # 10
                        problems.append(f"{where}: TDX private leaf above 4K")
                if tdx is not None and not root.is_mirror and not key & tdx.shared_gfn_bit:
                    problems.append(f"{where}: shared-EPT leaf below the shared bit")  # 14
                slot = vm.leaf_memslot(gfn, root.as_id)
                if slot is None:  # 17
                    problems.append(f"{where}: leaf maps a gfn outside every memslot")
                    continue
                # 9: no writable huge leaf in a dirty-logged slot -- unless manual protect
                # with INITIALLY_SET: kvm_mmu_slot_apply_flags then neither write-protects
                # nor splits (every page is reported dirty anyway); CLEAR does it lazily.
                if slot.flags & KVM_MEM_LOG_DIRTY_PAGES and level > PG_LEVEL_4K and \
                        spte & PT_WRITABLE_MASK and not init_set:
                    problems.append(f"{where}: writable huge leaf in a dirty-logged slot")
                # 10: level allowed by lpage_info.
                if level > PG_LEVEL_4K:
                    info = mmu.lpage_info(slot)
                    idx = mmu.gfn_to_index(gfn, slot.base_gfn, level)
                    if idx >= len(info[level]) or info[level][idx]:
                        problems.append(f"{where}: huge leaf where disallow_lpage is set")
                # 13/16: private-ness of the mapping matches the attribute.
                if backend.has_private_mem:
                    attr_private = vm.kvm_mem_is_private(gfn)
                    if tdx is not None:
                        if root.is_mirror and not attr_private:
                            problems.append(f"{where}: private leaf for a shared gfn")
                        if not root.is_mirror and attr_private:
                            problems.append(f"{where}: shared leaf for a private gfn")
                    elif backend.rmp is not None and backend.rmp.is_private(pfn) != \
                            attr_private:
                        problems.append(f"{where}: RMP state of pfn {pfn:#x} does not match "
                                        "the gfn's attribute")

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
            if info is None:
                continue
            problems.extend(_mixed_problems(vm, slot, info))

    # Table accounting: every table in the store is reachable from a root.
    if len(tdp.store) != len(seen_tables):
        problems.append(f"{len(tdp.store) - len(seen_tables)} page tables are leaked")
    return problems


def _mixed_problems(vm, slot, info) -> list[str]:
    out = []
    base, end = slot.base_gfn, slot.base_gfn + slot.npages
    uniform = vm.range_has_memory_attributes(base, end, ~0, vm.get_memory_attributes(base))
    for level in mmu.HUGE_LEVELS:
        nr = KVM_PAGES_PER_HPAGE(level)
        linfo = info[level]
        first = (base + nr - 1) & ~(nr - 1)
        for gfn in range(first, end - nr + 1, nr):
            idx = mmu.gfn_to_index(gfn, base, level)
            flag = bool(linfo[idx] & mmu.KVM_LPAGE_MIXED_FLAG)
            want = False if uniform else mmu.expected_mixed(vm, slot, gfn, level)
            if flag != want:
                out.append(f"slot {slot.id} level {level} huge page at gfn {gfn:#x}: MIXED is "
                           f"{flag}, attributes say {want}")
                if len(out) > 8:
                    return out
    return out
