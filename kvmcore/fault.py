"""Guest page faults: the access and walk records, PageFault, and the generic fault path.

The flow (``kvm_page_fault``) mirrors x86's kvm_mmu_page_fault -> kvm_tdp_page_fault ->
kvm_mmu_faultin_pfn -> is_page_fault_stale -> kvm_tdp_mmu_map and arm64's
kvm_handle_guest_abort -> user_mem_abort / gmem_abort, which share its order: slot lookup,
seq snapshot, private/shared check, pfn lookup, MMU lock, staleness check, install; they
differ in where a missing or INVALID slot is decided (``kvm_page_fault``). See
shared/reference/core.md §2.5 and §4, races.md §1.
"""

from __future__ import annotations

import errno
from types import GeneratorType

from .errors import KvmError
from .exits import memory_fault_exit
from .host import MMAP_LOCK_WAIT
from .locks import READ, stepping
from .records import PERMISSION, PageFault
from .uapi import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_RETRY

# --------------------------------------------------------------------------- the flow

#: Race points of the generic fault path, named after Linux's boundaries (reference/races.md
#: §1): the mmu_invalidate_seq snapshot has been read (x86 kvm_mmu_faultin_pfn, arm64
#: user_mem_abort, ppc kvmppc_book3s_instantiate_page), and the pfn is held while the fault
#: waits for kvm->mmu_lock. Backends add their own inside the install (the compare-and-exchange
#: of an entry under the read lock).
PF_SEQ_SNAPSHOT = "pf_seq_snapshot"
PF_LOCK_WAIT = "pf_lock_wait"
RACE_POINTS = (PF_SEQ_SNAPSHOT, PF_LOCK_WAIT)
#: The names these points had before they were named after Linux's boundaries.
AFTER_SNAPSHOT, BEFORE_LOCK = PF_SEQ_SNAPSHOT, PF_LOCK_WAIT


def is_page_fault_stale(vm, fault: PageFault) -> bool:
    """is_page_fault_stale (x86) / user_mem_abort's and kvmppc_create_pte's retry check:
    an invalidation completed since the snapshot, or one in progress — of this gfn for x86
    (mmu_invalidate_retry_gfn), of anything for arm64 and ppc (mmu_invalidate_retry); the
    backend chooses with ArchInfo.fault_retry_gfn.

    A memslot update does not make a fault stale: the fault holds kvm->srcu from its slot
    lookup to its end, so kvm_swap_active_memslots' synchronize_srcu waits for it, and the
    update's flush then zaps whatever it installed in the old slot."""
    return vm.mmu_invalidate.fault_retry(fault.mmu_seq, fault.gfn)


def kvm_page_fault(vm, fault: PageFault):
    """The generic fault path, as a generator that yields at its race points and returns a
    RET_PF_* code (or raises a VcpuExit / KvmError). The caller holds kvm->srcu.

    Order, after the memslot lookup and the fast path, where the backend's ArchInfo says
    ``invalid_slot_retry`` (x86 kvm_tdp_page_fault -> kvm_mmu_faultin_pfn): the
    mmu_invalidate_seq snapshot; the private/shared check (a memory-fault exit); no slot (MMIO,
    kvm_handle_noslot_fault); a slot being deleted or moved (KVM_MEMSLOT_INVALID) -> retry;
    mmu_invalidate_retry_gfn_unsafe (``faultin_retry_unsafe``) -> retry; faultin_pfn; the same
    lockless check again. Otherwise (arm64 kvm_handle_guest_abort, ppc
    kvmppc_book3s_radix_page_fault, riscv gstage_page_fault) the gfn's hva is looked
    up first, and a missing or INVALID slot has none (__gfn_to_hva_many): the access is MMIO,
    decided before any snapshot; then the snapshot and faultin_pfn. Then, on every arch:
    mmu_lock (for read where it is an rwlock); staleness check; relax_perms or map_leaf,
    which may yield at their own compare-and-exchange points (a backend's hook written as a
    generator); unlock; then what the backend left for after the unlock
    (``fault.after_unlock``: arm64 marks the page dirty there), at its own point.

    The snapshot's point waits for nothing and the lock's only for the lock: a flow that is
    not stepped (``stepping()`` False: a plain call, which no other flow can interleave)
    passes them without yielding when the lock is free, as every plain fault does."""
    # The slot is known before the fast path, as in kvm_mmu_do_page_fault.
    fault.slot = slot = vm.memslot_sets[fault.as_id].search(fault.gfn)
    r = vm.fast_page_fault(vm=vm, fault=fault)
    if type(r) is GeneratorType:
        r = yield from r
    if r is not None:
        vm.stats["fast_page_fault"] += 1
        return r
    if (slot is None or slot.invalid) and not vm.invalid_slot_retry:
        # No hva for the gfn (arm64, ppc, riscv): MMIO, before any snapshot.
        fault.slot = None
        return (yield from kvm_handle_noslot_fault(vm, fault))
    fault.mmu_seq = vm.mmu_invalidate.seq
    if stepping():
        yield PF_SEQ_SNAPSHOT
    kvm_mem_check_private(vm, fault)
    if slot is None:
        return (yield from kvm_handle_noslot_fault(vm, fault))
    if slot.invalid:
        return kvm_faultin_invalid_slot(fault)
    # mmu_invalidate_retry_gfn_unsafe, whose answer is no unless an invalidation is in
    # progress or the seq moved: those two reads first.
    inv = vm.mmu_invalidate
    unsafe = vm.faultin_retry_unsafe
    if unsafe and (inv.in_progress or inv.seq != fault.mmu_seq) and \
            inv.retry_gfn(fault.mmu_seq, fault.gfn):
        vm.stats["fault_retry_unsafe"] += 1
        return RET_PF_RETRY
    r = fault_faultin(vm, fault)
    if type(r) is GeneratorType:
        r = yield from r
    if r != RET_PF_CONTINUE:
        return r
    if unsafe and (inv.in_progress or inv.seq != fault.mmu_seq) and \
            inv.retry_gfn(fault.mmu_seq, fault.gfn):
        # The pfn is let go (kvm_release_faultin_page): nothing is refcounted in the model.
        vm.stats["fault_retry_unsafe"] += 1
        return RET_PF_RETRY
    lock = vm.mmu_lock
    if stepping() or not lock.try_lock(READ):
        yield from lock.read_lock(PF_LOCK_WAIT)
    try:
        if is_page_fault_stale(vm, fault):
            vm.stats["fault_retry_stale"] += 1
            if vm.events is not None:
                vm.trace("fault.retry", gfn=fault.gfn, seq=fault.mmu_seq)
            return RET_PF_RETRY
        r = None
        if fault.kind == PERMISSION:
            r = vm.relax_perms(vm=vm, fault=fault)
            if type(r) is GeneratorType:
                r = yield from r
            if r is not None:
                vm.stats["relax_perms"] += 1
        if r is None:
            r = vm.map_leaf(vm=vm, fault=fault)
            if type(r) is GeneratorType:
                r = yield from r
    finally:
        lock.read_unlock()
    after = fault.after_unlock
    if after is not None:
        if stepping():
            yield after[0]
        after[1](*after[2])
    return r


def kvm_faultin_invalid_slot(fault: PageFault) -> int:
    """kvm_mmu_faultin_pfn on a slot being deleted or moved (KVM_MEMSLOT_INVALID): a vCPU's
    fault retries until the update is done, which zaps the old slot's SPTEs first; a
    pre-fault fails with -EAGAIN instead (3ccbf6f47098, 6.18): it holds kvm->srcu across its
    loop, so retrying would wait for the update while the update's synchronize_srcu waits
    for it."""
    if fault.prefetch:
        raise KvmError(errno.EAGAIN, "pre_fault_memory: the memslot is being updated")
    return RET_PF_RETRY


def kvm_mem_check_private(vm, fault: PageFault) -> None:
    """kvm_mmu_faultin_pfn's private/shared check, after the snapshot: a fault whose intent
    differs from the gfn's attribute exits to userspace (KVM_EXIT_MEMORY_FAULT)."""
    if fault.is_private != (bool(vm.attributes) and vm.kvm_mem_is_private(fault.gfn)):
        vm.stats["exit_private_mismatch"] += 1
        raise memory_fault_exit(vm, fault)


def kvm_handle_noslot_fault(vm, fault: PageFault):
    """kvm_handle_noslot_fault, a flow: a private access exits (KVM_EXIT_MEMORY_FAULT); a
    shared one is MMIO, which the backend may cache (x86's MMIO SPTE, installed under the
    read lock): RET_PF_EMULATE, or RET_PF_RETRY where the backend found the fault stale
    before caching (x86: an obsolete root, is_page_fault_stale's test for every fault)."""
    if fault.is_private:
        raise memory_fault_exit(vm, fault)
    lock = vm.mmu_lock
    if stepping() or not lock.try_lock(READ):
        yield from lock.read_lock(PF_LOCK_WAIT)
    try:
        r = vm.hook.handle_noslot_fault(vm=vm, fault=fault)
    finally:
        lock.read_unlock()
    return RET_PF_RETRY if r == RET_PF_RETRY else RET_PF_EMULATE


def fault_faultin(vm, fault: PageFault) -> int:
    """After the snapshot and the checks, without the MMU lock: the pfn (faultin_pfn).
    RET_PF_CONTINUE to go on, or a generator returning it when it must wait for the host's
    mmap lock or a shared write meets the host's zero page.

    A page of the host mm comes from get_user_pages, under mm->mmap_lock for read: while a
    paused host operation holds it for write (mprotect, munmap's detach) the fault waits at
    ``mmap_lock_wait``. A shared write to the zero page breaks COW there (hva_to_pfn_slow ->
    handle_mm_fault -> do_wp_page), whose MMU-notifier invalidation takes kvm->mmu_lock for
    write and so may wait for a paused fault holding it for read. The model runs that COW
    break in the fault's own flow, first thing in faultin (nothing KVM does is observable
    before GUP there), with the mmap lock held, so it pauses at the notifier's points; the
    GUP that follows finds the new page writable. guest_memfd pages take no mmap lock."""
    host = vm.host
    # The lock's writer, inline: every fault passes here.
    if host.mmap_lock._writer is not None:
        if not fault.is_private and not fault.slot.gmem_only:
            return _faultin_gup(vm, fault, None)
    elif fault.write and not fault.is_private:
        slot = fault.slot
        if not slot.readonly and not slot.gmem_only:
            cow = host.wp_fault(slot.gfn_to_hva(fault.gfn))
            if cow is not None:
                return _faultin_gup(vm, fault, cow)
    return vm.faultin_pfn(vm=vm, fault=fault)


def _faultin_gup(vm, fault: PageFault, cow):
    """faultin_pfn under mm->mmap_lock for read, taken at once when free (with ``cow``, the
    COW break already found), else waited for at ``mmap_lock_wait``, after which the COW
    break is looked for again."""
    host = vm.host
    lock = host.mmap_lock
    # A flow that is not stepped runs to its end before another can look at the lock: it
    # waits for a writer (or cannot run: WouldBlock) but need not hold it.
    hold = lock._writer is not None or stepping()
    if hold and not lock.try_lock(READ):
        yield from lock.read_lock(MMAP_LOCK_WAIT)
        slot = fault.slot
        cow = (host.wp_fault(slot.gfn_to_hva(fault.gfn))
               if fault.write and not slot.readonly else None)
    try:
        if cow is not None:
            yield from cow
        r = vm.faultin_pfn(vm=vm, fault=fault)
        if type(r) is GeneratorType:
            r = yield from r
    finally:
        if hold:
            lock.read_unlock()
    return r


def run_to_completion(steps):
    """Drive a flow (or a bare generator) to its end and return its result."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value
