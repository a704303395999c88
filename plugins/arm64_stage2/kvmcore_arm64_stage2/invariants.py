"""The arm64 invariants of shared/reference/arm64_stage2.md §10 that a model state can show.

Page-table ones (1 leaf encoding, 2 block legality, 3 no executable device memory, 6 no LOCKED
entry outside a BBM window, 16 page counts, 17/18 geometry and IPA bounds) are in
``Stage2PageTable.check``; the VM-level ones are here: 11 (a logging slot has no writable
leaf larger than a base page unless manual-protect + initially-set defers the protection), 14
(a block lies inside its memslot; gmem slots map base pages only) and device leaves only over
VM_PFNMAP memory. That every leaf's output address is the host's page (or huge page) for its
IPA is the core's leaf check: a stage-2 page is one host page, a block a contiguous run.
"""

from __future__ import annotations

from .pgtable import (KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, memattr_value, pte_memattr)


def check_vm(backend, vm) -> list[str]:
    problems = backend.pgt.check()
    g = backend.geom
    init_set = vm.dirty_log_manual_protect_and_init_set()
    device = memattr_value("device", backend.fwb)
    for ipa, level, pte in backend.pgt.valid_leaves(0, g.phys_size):
        size = g.size(level)
        gfn = ipa >> 12
        slot = vm.leaf_memslot(gfn)
        where = f"stage-2 leaf IPA {ipa:#x} level {level}"
        if slot is None:
            continue    # the core reports leaves outside memslots
        if size > g.granule:
            if not (slot.base_gfn <= gfn and gfn + (size >> 12) <= slot.end_gfn):
                problems.append(f"{where}: block crosses its memslot")
            if slot.has_gmem:
                problems.append(f"{where}: gmem_abort maps only PAGE_SIZE, found a block")
            # Not while slots_lock is held: a memslot update publishes the logging slot
            # before kvm_arch_commit_memory_region write-protects it.
            if (pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W and slot.logging and not init_set
                    and not vm.slots_lock.held):
                problems.append(f"{where}: writable block in a dirty-logging slot")
        if pte_memattr(pte) == device and not slot.has_gmem:
            vma = vm.host.find_vma(slot.gfn_to_hva(gfn))
            if vma is not None and not vma.io_pfnmap:
                problems.append(f"{where}: Device memory type over ordinary RAM")
    return problems
