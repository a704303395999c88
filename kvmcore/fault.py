"""Guest page faults: the access and walk records, PageFault, and the generic fault path.

The flow (``kvm_page_fault``) mirrors x86's kvm_mmu_page_fault -> kvm_tdp_page_fault ->
kvm_mmu_faultin_pfn -> is_page_fault_stale -> kvm_tdp_mmu_map and arm64's user_mem_abort /
gmem_abort, which share its order: slot lookup, seq snapshot, private/shared check, pfn
lookup, MMU lock, staleness check, install. See shared/reference/core.md §2.5 and §4.
"""

from __future__ import annotations

import errno

import attrs

from .defaults import memory_fault_exit
from .errors import KvmError
from .uapi import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_RETRY

# Violation kinds: how the hardware reports a failed walk.
NOT_PRESENT = "not_present"     # EPT violation on a non-present entry, stage-2 translation fault
PERMISSION = "permission"       # present leaf without the needed permission
ACCESS_FLAG = "access_flag"     # arm64 AF=0 / x86 access-tracked / Power R=0 (or C=0 on write)
MISCONFIG = "misconfig"         # x86 EPT misconfiguration (MMIO SPTE); RSVD in PFERR terms
VIOLATION_KINDS = (NOT_PRESENT, PERMISSION, ACCESS_FLAG, MISCONFIG)

READ, WRITE, FETCH = "read", "write", "fetch"


@attrs.frozen(slots=True)
class Access:
    """One guest access: ``kind`` is read, write or fetch; ``private`` the explicit private
    intent (SNP C-bit, TDX alias) or None for "as the VM type decides"."""

    kind: str
    private: bool | None = None

    @property
    def write(self) -> bool:
        return self.kind == WRITE

    @property
    def exec(self) -> bool:
        return self.kind == FETCH


@attrs.frozen(slots=True)
class Translation:
    """A successful hardware walk: the 4 KiB page at ``gfn`` is host frame ``pfn``, through a
    leaf of ``size`` bytes with these permissions; ``dirty`` is the leaf's dirty state after
    the access (a TLB entry filled by a read cannot serve a write that must set D)."""

    gfn: int
    pfn: int
    size: int
    readable: bool
    writable: bool
    executable: bool
    dirty: bool = False
    private: bool = False


@attrs.frozen(slots=True)
class Violation:
    """A failed walk, as the hardware reports it. ``gfn`` excludes alias bits; ``private`` is
    the fault's is_private; ``level``/``size`` are those of the entry that faulted (the leaf for
    a permission or access-flag fault: arm64's fault granule) or None/0; ``error_code`` the
    hardware's raw syndrome where it has one (x86 PFERR bits, arm64 ESR FSC, Power DSISR)."""

    kind: str
    gfn: int
    private: bool = False
    level: int | None = None
    size: int = 0
    error_code: int = 0

    @property
    def present(self) -> bool:
        return self.kind in (PERMISSION, ACCESS_FLAG)


@attrs.define(slots=True, eq=False)
class PageFault:
    """The fault being handled (x86 struct kvm_page_fault; arm64 keeps the same facts in
    user_mem_abort's locals).

    Set once by whoever builds it: ``addr`` (the gpa as the guest issued it), ``gfn`` (without
    alias bits), ``write``/``exec``, ``is_private``, ``prefetch``, ``kind``/``level``/
    ``fault_size`` (from the violation). Set by the flow: ``slot``, ``mmu_seq``; by
    ``faultin_pfn``: ``hva``, ``pfn``, ``map_writable``, ``max_size`` (the backing's largest
    mapping in bytes), ``pfnmap``, ``cacheable``; by the backend: ``max_level``, ``goal_level``
    (its own level numbers) and ``goal_size``.
    """

    addr: int
    gfn: int
    write: bool = False
    exec: bool = False
    is_private: bool = False
    prefetch: bool = False
    kind: str = NOT_PRESENT
    level: int | None = None
    fault_size: int = 0
    error_code: int = 0
    as_id: int = 0
    vcpu: object = None
    slot: object = None
    mmu_seq: int = 0
    memslot_gen: int = 0
    hva: int = 0
    pfn: int = 0
    map_writable: bool = False
    max_size: int = 4096
    pfnmap: bool = False
    cacheable: bool = True
    max_level: int = 0
    goal_level: int = 0
    goal_size: int = 4096
    host_vma: object = None

    @property
    def read(self) -> bool:
        return not (self.write or self.exec)

    @property
    def gpa(self) -> int:
        return self.gfn << 12

    @property
    def present(self) -> bool:
        return self.kind in (PERMISSION, ACCESS_FLAG)


# --------------------------------------------------------------------------- the flow

#: Where the fault path yields: Linux runs these stretches without the MMU lock, so another
#: flow (an invalidation, a conversion, another vCPU's fault) may run here.
AFTER_SNAPSHOT = "after_snapshot"   # mmu_invalidate_seq read; attributes and pfn not yet
BEFORE_LOCK = "before_lock"         # pfn resolved; MMU lock not yet taken
RACE_POINTS = (AFTER_SNAPSHOT, BEFORE_LOCK)


def is_page_fault_stale(vm, fault: PageFault) -> bool:
    """is_page_fault_stale (x86) / user_mem_abort's and kvmppc_create_pte's retry check:
    an invalidation completed since the snapshot, or one in progress — of this gfn for x86
    (mmu_invalidate_retry_gfn), of anything for arm64 and ppc (mmu_invalidate_retry); the
    backend chooses with ArchInfo.fault_retry_gfn. Also stale: a memslot update since the
    fault started — Linux's updater waits for the fault's SRCU read side (synchronize_srcu)
    instead; a single-threaded model cannot wait, so the fault retries."""
    if vm.memslot_sets[fault.as_id].generation != fault.memslot_gen:
        return True
    return vm.mmu_invalidate.fault_retry(fault.mmu_seq, fault.gfn)


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
