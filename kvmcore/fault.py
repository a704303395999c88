"""Guest page faults: the access and walk records, PageFault, and the generic fault path.

The flow (``kvm_page_fault``) mirrors x86's kvm_mmu_page_fault -> kvm_tdp_page_fault ->
kvm_mmu_faultin_pfn -> is_page_fault_stale -> kvm_tdp_mmu_map and arm64's user_mem_abort /
gmem_abort, which share its order: slot lookup, seq snapshot, private/shared check, pfn
lookup, MMU lock, staleness check, install. See shared/reference/core.md §2.5 and §4.
"""

from __future__ import annotations

import errno

from .errors import KvmError
from .exits import memory_fault_exit
from .records import PERMISSION, PageFault
from .uapi import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_RETRY

# --------------------------------------------------------------------------- the flow

#: Where the fault path yields: Linux runs these stretches without the MMU lock, so another
#: flow (an invalidation, a conversion, another vCPU's fault) may run here.
AFTER_SNAPSHOT = "after_snapshot"   # mmu_invalidate_seq read; attributes and pfn not yet
BEFORE_LOCK = "before_lock"         # pfn resolved; MMU lock not yet taken
RACE_POINTS = (AFTER_SNAPSHOT, BEFORE_LOCK)


def is_page_fault_stale(vm, fault: PageFault) -> bool:
    """is_page_fault_stale: an invalidation of this gfn in progress, or any completed since
    the snapshot. Also stale: a memslot update since the fault started — Linux's updater
    waits for the fault's SRCU read side (synchronize_srcu) instead; a single-threaded model
    cannot wait, so the fault retries."""
    if vm.memslot_sets[fault.as_id].generation != fault.memslot_gen:
        return True
    return vm.mmu_invalidate.retry_gfn(fault.mmu_seq, fault.gfn)


def kvm_page_fault(vm, fault: PageFault):
    """The generic fault path, as a generator that yields at ``RACE_POINTS`` and returns a
    RET_PF_* code (or raises a VcpuExit / KvmError).

    Order (x86 kvm_tdp_page_fault -> kvm_mmu_faultin_pfn -> kvm_tdp_mmu_map; arm64
    user_mem_abort / gmem_abort): memslot lookup; fast path; no slot (private -> memory-fault
    exit, shared -> MMIO); slot being deleted or moved -> retry; snapshot; private/shared
    check; faultin_pfn; MMU lock; staleness check; relax_perms or map_leaf.

    ``kvm_page_fault_direct`` runs the same three steps without the yields; both are built
    from ``fault_begin`` / ``fault_faultin`` / ``fault_install`` so they cannot drift.
    """
    r = fault_begin(vm, fault)
    if r is not None:
        return r
    yield AFTER_SNAPSHOT
    r = fault_faultin(vm, fault)
    if r != RET_PF_CONTINUE:
        return r
    yield BEFORE_LOCK
    return fault_install(vm, fault)


def kvm_page_fault_direct(vm, fault: PageFault) -> int:
    """``kvm_page_fault`` for a caller that runs nothing at the race points (every plain
    guest access): the same steps, without a generator to drive."""
    r = fault_begin(vm, fault)
    if r is not None:
        return r
    r = fault_faultin(vm, fault)
    if r != RET_PF_CONTINUE:
        return r
    return fault_install(vm, fault)


def fault_begin(vm, fault: PageFault) -> int | None:
    """Up to the snapshot (kvm_mmu_do_page_fault's slot lookup, fast_page_fault,
    kvm_handle_noslot_fault, the KVM_MEMSLOT_INVALID retry, then mmu_invalidate_seq):
    a RET_PF_* code when the fault ends here, None to go on."""
    # The slot is known before the fast path, as in kvm_mmu_do_page_fault.
    slots = vm.memslot_sets[fault.as_id]
    slot = fault.slot = slots.search(fault.gfn)
    r = vm.fast_page_fault(vm=vm, fault=fault)
    if r is not None:
        vm.stats["fast_page_fault"] += 1
        return r
    if slot is None:
        if fault.is_private:
            raise memory_fault_exit(vm, fault)
        with vm.mmu_lock:
            vm.hook.handle_noslot_fault(vm=vm, fault=fault)
        return RET_PF_EMULATE
    if slot.invalid:
        if fault.prefetch:
            raise KvmError(errno.EAGAIN, "pre_fault_memory: the memslot is being updated")
        return RET_PF_RETRY
    fault.memslot_gen = slots.generation
    fault.mmu_seq = vm.mmu_invalidate.seq
    return None


def fault_faultin(vm, fault: PageFault) -> int:
    """After the snapshot, without the MMU lock: the private/shared check against the
    attributes (kvm_mmu_faultin_pfn), then the pfn (faultin_pfn). RET_PF_CONTINUE to go on."""
    if fault.is_private != (bool(vm.attributes) and vm.kvm_mem_is_private(fault.gfn)):
        vm.stats["exit_private_mismatch"] += 1
        raise memory_fault_exit(vm, fault)
    return vm.faultin_pfn(vm=vm, fault=fault)


def fault_install(vm, fault: PageFault) -> int:
    """Under the MMU lock: is_page_fault_stale, then relax_perms for a permission fault
    (arm64's stage-2 relax) or map_leaf."""
    with vm.mmu_lock:
        if is_page_fault_stale(vm, fault):
            vm.stats["fault_retry_stale"] += 1
            vm.trace("fault.retry", gfn=fault.gfn, seq=fault.mmu_seq)
            return RET_PF_RETRY
        r = None
        if fault.kind == PERMISSION:
            r = vm.relax_perms(vm=vm, fault=fault)
            if r is not None:
                vm.stats["relax_perms"] += 1
        if r is None:
            r = vm.map_leaf(vm=vm, fault=fault)
    return r


def run_to_completion(steps) -> int:
    """Drive a fault generator to its end and return its result."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value
