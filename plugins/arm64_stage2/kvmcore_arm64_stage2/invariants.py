"""The arm64 invariants of shared/reference/arm64_stage2.md §10 that a model state can show.

Page-table ones (1 leaf encoding, 2 block legality, 3 no executable device memory, 6 no LOCKED
entry outside a BBM window, 16 page counts, 17/18 geometry and IPA bounds) are in
``Stage2PageTable.check``; the VM-level ones are here: 11 (a logging slot has no writable
leaf larger than a base page unless manual-protect + initially-set defers the protection), 14
(a block lies inside its memslot; gmem slots map base pages only), device leaves only over
VM_PFNMAP memory, and the granule frames' reference counts.
"""

from __future__ import annotations

from .pgtable import (KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, memattr_value, pte_memattr)


def check_vm(backend, vm) -> list[str]:
    problems = backend.pgt.check()
    g = backend.geom
    fmt = backend.pgt.fmt
    frames = backend.frames
    init_set = vm.dirty_log_manual_protect_and_init_set()
    device = memattr_value("device", backend.fwb)
    uses: dict[int, int] = {}
    for ipa, level, pte in backend.pgt.valid_leaves(0, g.phys_size):
        size = g.size(level)
        pa = fmt.pte_to_phys(pte)
        if frames.is_frame(pa):
            uses[pa] = uses.get(pa, 0) + 1
            if size != g.granule:
                problems.append(f"IPA {ipa:#x}: a granule frame used by a {size:#x} block")
        gfn = ipa >> 12
        slot = vm.gfn_to_memslot(gfn)
        where = f"stage-2 leaf IPA {ipa:#x} level {level}"
        if slot is None:
            continue    # the core reports leaves outside memslots
        if size > g.granule:
            if not (slot.base_gfn <= gfn and gfn + (size >> 12) <= slot.end_gfn):
                problems.append(f"{where}: block crosses its memslot")
            if slot.has_gmem:
                problems.append(f"{where}: gmem_abort maps only PAGE_SIZE, found a block")
            if (pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W and slot.logging and not init_set):
                problems.append(f"{where}: writable block in a dirty-logging slot")
        if pte_memattr(pte) == device and not slot.has_gmem:
            vma = vm.host.find_vma(slot.gfn_to_hva(gfn))
            if vma is not None and not vma.io_pfnmap:
                problems.append(f"{where}: Device memory type over ordinary RAM")
    for pa, n in frames.refs.items():
        if uses.get(pa, 0) != n:
            problems.append(f"granule frame {pa:#x}: {n} references but {uses.get(pa, 0)} "
                            "leaves use it")
    for pa in uses:
        if pa not in frames.refs:
            problems.append(f"granule frame {pa:#x}: used by a leaf but unknown")
    return problems
