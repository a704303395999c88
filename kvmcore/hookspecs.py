"""The architecture contract: every hook a backend (or an extension) can implement.

Hooks are called with keyword arguments by the core, always with ``vm`` first. The core registers
its own default implementations ``trylast`` (``kvmcore.defaults``), so a backend overrides a
default by implementing the hook, or adjusts it with a ``wrapper=True`` implementation that
yields to the default. Hooks marked *firstresult* stop at the first implementation that returns
something other than ``None``.

A backend must implement ``translate``, ``map_leaf``, ``unmap_gfn_range``, ``age_gfn``,
``test_age_gfn`` and ``leaves``; everything else has a default. The Linux function each hook
stands for is named in its docstring.

Concurrency in this model: the core's flows are steppable (docs/races.md). A hook runs inside
one stretch of its caller's flow; "under the MMU lock" means that flow holds ``vm.mmu_lock``
(for read or write, as the section says). A hook whose Linux counterpart drops a lock, waits, or
installs an entry with a compare-and-exchange under the read lock is written as a generator (or
returns one): it yields its race points' names and takes locks with ``yield from
vm.mmu_lock.read_lock(point)``; the core runs it with ``yield from`` (fast_page_fault,
faultin_pfn's result, relax_perms, map_leaf, unmap_gfn_range, flush_shadow_memslot,
pre/post_set_memory_attributes). A hot hook may return a plain result instead when
``kvmcore.locks.stepping()`` is False (its flow runs to its end, so no other flow could run at
a point that waits for nothing). There is no SMP memory ordering: between two race points a
stretch runs atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .arch import Mapping
    from .records import Access, PageFault, Translation, Violation
    from .records import GfnRange
    from .memslots import Memslot
    from .kvm import Kvm, KvmVcpu


#: A memslot DELETE or MOVE's flush (``flush_shadow_memslot``) waits here for kvm->mmu_lock.
SLOT_FLUSH_LOCK_WAIT = "slot_flush_lock_wait"

hookspec = pluggy.HookspecMarker("kvmcore")


# --------------------------------------------------------------------------- life cycle


@hookspec
def init_vm(vm: Kvm) -> None:
    """Called once, when ``vm`` has been created and before it is returned to the user
    (kvm_arch_init_vm). A backend allocates its roots here. Every implementation runs."""


@hookspec
def vcpu_create(vm: Kvm, vcpu: KvmVcpu) -> None:
    """Called when ``vcpu`` has been created (kvm_arch_vcpu_create), e.g. to give it a PML
    buffer. Every implementation runs."""


@hookspec(firstresult=True)
def set_vcpu_events(vm: Kvm, vcpu: KvmVcpu, smm: bool | None) -> bool | None:
    """KVM_SET_VCPU_EVENTS, the part the MMU sees: ``smm`` is the new System Management Mode
    state (KVM_VCPUEVENT_VALID_SMM with ``smi.smm``), or None to leave it. Called after the
    core checked the arguments, before it reads ``vcpu_memslots_id`` again. Raise KvmError
    (EINVAL) for a state the VM cannot have. Returns True when handled. Default: EINVAL for
    ``smm=True`` (a kernel without CONFIG_KVM_SMM), nothing else."""


@hookspec(firstresult=True)
def vcpu_memslots_id(vm: Kvm, vcpu: KvmVcpu) -> int:
    """kvm_arch_vcpu_memslots_id: the memslot address space ``vcpu`` accesses now (x86: 1 in
    SMM). The core asks after ``set_vcpu_events`` and keeps the answer in ``vcpu.as_id``;
    its faults look up that address space's memslots. Default: 0."""


@hookspec(firstresult=True)
def flush_shadow_all(vm: Kvm) -> bool | None:
    """Zap every mapping of ``vm``: the MMU notifier's ``release`` and VM teardown
    (kvm_arch_flush_shadow_all). No vCPU runs any more, so no TLB flush is needed.
    Default: ``unmap_gfn_range`` over every memslot with both filters."""


# --------------------------------------------------------------------------- fault path


@hookspec(firstresult=True)
def translate(vm: Kvm, vcpu: KvmVcpu, gpa: int, access: Access) -> Translation | Violation:
    """The hardware page walk for one guest access (the MMU's walk of the EPT / stage-2 /
    partition-scoped table).

    ``gpa`` is the guest-physical address as the guest issued it (with TDX's shared bit, for
    example); ``access`` says read, write or fetch and the explicit private intent
    (``access.private``: ``None`` means "as the VM type decides").

    Returns a ``Translation`` when the walk succeeds (and sets accessed/dirty bits the way the
    hardware does, e.g. EPT A/D or Power R/C), or a ``Violation`` describing the fault exactly
    as the hardware reports it: its kind (not present, permission, access flag, misconfig), the
    level and size of the entry that faulted, the gfn without alias bits, and ``private`` (the
    fault's ``is_private``: TDX shared bit, SNP encryption bit, or the gfn's attribute for
    software-protected VMs). The walk uses the root of ``vcpu.as_id`` (x86 SMM has its own).
    It may raise a ``VcpuExit`` for what the hardware reports outside the fault path (e.g. an
    arm64 address-size fault). Required of every backend.
    """


@hookspec(firstresult=True)
def fault_retries_locally(vm: Kvm, fault: PageFault) -> bool:
    """Whether a vCPU's ``fault`` that returned RET_PF_RETRY, and can only retry until an
    invalidation of its gfn or an update of its memslot ends, is retried inside the exit
    handler with kvm->srcu still held (x86 TDX: tdx_handle_ept_violation's local retry of a
    private gpa), instead of re-entering the guest, which leaves kvm->srcu. Called on such
    a retry only. Default: False."""


@hookspec
def mmu_reload(vm: Kvm, vcpu: KvmVcpu) -> None:
    """kvm_mmu_reload outside a guest entry: KVM_PRE_FAULT_MEMORY calls it before each range
    it maps (kvm_arch_vcpu_pre_fault_memory), since no vcpu_enter_guest runs there. The
    backend drops the roots a memslot update made obsolete and loads the current one (x86,
    20a6cff3b283: else every fault of the pre-fault finds its root obsolete and retries for
    ever). A guest access needs no call: the backend's ``translate`` enters the guest.
    Default: nothing."""


@hookspec(firstresult=True)
def fast_page_fault(vm: Kvm, fault: PageFault) -> int | None:
    """Try to resolve ``fault`` without the slow path, after the memslot lookup
    (``fault.slot``, None outside memslots) and before the core snapshots
    ``mmu_invalidate_seq`` (x86 fast_page_fault: restore W or access-tracked bits in place;
    arm64 handle_access_fault: set AF; ppc kvmppc_hv_handle_set_rc: OR in R/C).

    Must never change a pfn or a leaf size. Returns ``RET_PF_FIXED`` / ``RET_PF_SPURIOUS`` when
    done, ``RET_PF_EMULATE`` for an MMIO access recognised from a cached MMIO entry, or
    ``None`` to continue with the slow path. Default: ``None``.
    """


@hookspec(firstresult=True)
def handle_noslot_fault(vm: Kvm, fault: PageFault) -> int | None:
    """A shared fault on a gfn with no visible memslot (kvm_handle_noslot_fault), under the
    MMU lock. A backend may cache an MMIO entry (x86 MMIO SPTE with the memslot generation).
    ``RET_PF_RETRY``: the fault is stale (x86: its root is obsolete, is_page_fault_stale,
    whose invalidation-sequence test applies only to a fault with a memslot) and cached
    nothing, so the vCPU faults again; for anything else the core exits to userspace with
    ``MmioExit``. Default: nothing.
    """


@hookspec(firstresult=True)
def faultin_pfn(vm: Kvm, fault: PageFault) -> int | None:
    """Resolve the pfn behind ``fault`` (kvm_mmu_faultin_pfn / __kvm_faultin_pfn /
    kvm_gmem_get_pfn), after the seq snapshot and the private/shared check, without the MMU
    lock.

    Fills ``fault.pfn``, ``fault.map_writable``, ``fault.hva``, ``fault.max_size`` (the largest
    mapping the backing allows: host PTE level, hugetlb size, or guest_memfd folio order,
    capped by the slot's alignment is *not* applied here) and ``fault.pfnmap`` /
    ``fault.cacheable``. The core default does guest_memfd for private faults and
    gmem-only slots, and hva -> pfn otherwise (VM_IO|VM_PFNMAP with its retry, hwpoison,
    read-only slots), so a backend normally wraps it (``wrapper=True``) to apply its own caps,
    e.g. TDX's private 4 KiB limit.

    Returns ``RET_PF_CONTINUE`` to go on, or ``RET_PF_RETRY``; raises ``MemoryFaultExit``,
    ``MmioExit`` (write to a read-only slot) or ``HwPoisonSignal`` for the exits Linux takes.
    """


@hookspec(firstresult=True)
def relax_perms(vm: Kvm, fault: PageFault) -> int | None:
    """A permission fault on a present leaf, under the MMU lock, after the staleness check
    (arm64 kvm_pgtable_stage2_relax_perms). Add the permissions ``fault`` needs (and the
    backing allows: ``fault.map_writable``) to the existing leaf in place, without
    break-before-make; never remove any; touch exactly one leaf.

    Returns a ``RET_PF_*`` code when handled, or ``None`` for "not handled here", and the core
    then calls ``map_leaf``. Default: ``None``.
    """


@hookspec(firstresult=True)
def map_leaf(vm: Kvm, fault: PageFault) -> int:
    """Install the leaf for ``fault`` under the MMU lock, after the staleness check
    (kvm_tdp_mmu_map, kvm_pgtable_stage2_map, kvmppc_create_pte).

    The backend chooses the level (from ``fault.max_size``, the slot's alignment, dirty
    logging, mixed attributes), splits or replaces tables as its hardware requires (with the
    TLB flushes that requires), sets permissions from the access and ``fault.map_writable``,
    and marks the gfn dirty (``vm.mark_page_dirty_in_slot``) when it maps a writable leaf in a
    dirty-logged slot. Returns ``RET_PF_FIXED``, ``RET_PF_SPURIOUS`` (already mapped), or
    ``RET_PF_RETRY``. Required of every backend.
    """


# --------------------------------------------------------------------------- zapping


@hookspec(firstresult=True)
def unmap_gfn_range(vm: Kvm, range: GfnRange) -> bool:
    """Zap every leaf that maps a gfn of ``range`` (kvm_unmap_gfn_range), under the MMU lock,
    inside an invalidation. A huge leaf that only partly overlaps the range is zapped whole.

    ``range.attr_filter`` (KVM_FILTER_SHARED / KVM_FILTER_PRIVATE) says which alias: a backend
    with separate private and shared tables (TDX mirror / direct roots) zaps only those; a
    backend with one table zaps its leaves whatever the filter. Returns True when the caller
    must flush TLBs (the core then calls ``vm.flush_remote_tlbs``); a backend that invalidates
    each leaf itself (arm64) returns False. Required of every backend.
    """


@hookspec(firstresult=True)
def flush_shadow_memslot(vm: Kvm, slot: Memslot) -> bool | None:
    """Zap ``slot``'s mappings before a DELETE or MOVE commits
    (kvm_arch_flush_shadow_memslot), under the slots lock, after the slot's INVALID copy was
    published and the faults that still used the old one have ended. As in Linux, the arch
    takes ``vm.mmu_lock`` itself, waiting at ``SLOT_FLUSH_LOCK_WAIT`` (a flow: a generator
    whose race points the core yields). Default: for write, ``unmap_gfn_range`` over the
    whole slot with ``KVM_FILTER_PRIVATE | KVM_FILTER_SHARED`` and a flush
    (kvm_mmu_zap_memslot)."""


# --------------------------------------------------------------------------- memslots


@hookspec
def prepare_memory_region(vm: Kvm, old: Memslot | None, new: Memslot | None,
                          change: int) -> None:
    """Arch checks before a memslot change is committed (kvm_arch_prepare_memory_region).
    ``change`` is KVM_MR_CREATE / DELETE / MOVE / FLAGS_ONLY; ``new`` is None for DELETE.
    Raise ``KvmError`` to refuse (e.g. arm64: dirty logging on a VM_PFNMAP range, EINVAL);
    nothing has changed yet. Every implementation runs."""


@hookspec
def commit_memory_region(vm: Kvm, old: Memslot | None, new: Memslot | None,
                         change: int) -> None:
    """After a memslot change is visible (kvm_arch_commit_memory_region): e.g. enabling dirty
    logging write-protects the slot (or clears D bits for PML, or flushes for Power's C-bit
    harvesting) and eagerly splits huge leaves; disabling it may recover huge pages. A
    backend flushes TLBs itself (``vm.flush_remote_tlbs_memslot``). Every implementation
    runs; one may be a generator (a flow whose race points the core yields: arm64's
    write protection drops kvm->mmu_lock between chunks)."""


# --------------------------------------------------------------------------- attributes


@hookspec(firstresult=True)
def pre_set_memory_attributes(vm: Kvm, range: GfnRange) -> bool:
    """Before new attributes ``range.arg`` are stored for ``range`` (one memslot's part of the
    conversion), inside the invalidation, under the MMU lock
    (kvm_arch_pre_set_memory_attributes). Choose the alias to zap, i.e. the *old* kind:
    converting to private zaps the shared alias (``KVM_FILTER_SHARED``), converting to shared
    the private one, zap it, and return "flush needed". The core has already added ``range`` to
    the invalidation; a backend may widen it (``vm.mmu_invalidate_range_add``), as x86 does
    for huge pages that straddle the range. Default: exactly that, without the widening."""


@hookspec(firstresult=True)
def post_set_memory_attributes(vm: Kvm, range: GfnRange) -> bool:
    """After the attributes of ``range`` were stored, under the MMU lock, before the
    invalidation ends (kvm_arch_post_set_memory_attributes), e.g. x86's huge-page "mixed"
    tracking. Returns "flush needed" (Linux never flushes here). Default: False."""


# --------------------------------------------------------------------------- aging


@hookspec(firstresult=True)
def age_gfn(vm: Kvm, range: GfnRange) -> bool:
    """Clear the accessed state (A / AF / R) of every leaf in ``range`` and return whether
    any was young (kvm_age_gfn). No TLB flush: the core's notifier decides. Required.
    The host asks one host mapping at a time (a page, or a huge page whole: reclaim's
    folio_referenced_one), and a backend may rely on it as Linux's does: RISC-V looks only
    at the leaf at ``range.start``."""


@hookspec(firstresult=True)
def test_age_gfn(vm: Kvm, range: GfnRange) -> bool:
    """Whether any leaf in ``range`` is young, changing nothing (kvm_test_age_gfn).
    Required."""


# --------------------------------------------------------------------------- dirty logging


@hookspec
def sync_dirty_log(vm: Kvm, slot: Memslot) -> None:
    """Before GET_DIRTY_LOG / CLEAR_DIRTY_LOG read ``slot``'s bitmap, move dirty state the
    hardware keeps elsewhere into it with ``vm.mark_page_dirty_in_slot``
    (kvm_arch_sync_dirty_log: x86 drains PML buffers; Power harvests and clears C bits).
    Every implementation runs."""


@hookspec(firstresult=True)
def enable_log_dirty_pt_masked(vm: Kvm, slot: Memslot, gfn_offset: int, mask: int) -> None:
    """Re-arm dirty tracking for ``slot.base_gfn + gfn_offset + i`` for each bit ``i`` set in
    the 64-bit ``mask``, under the MMU lock (kvm_arch_mmu_enable_log_dirty_pt_masked): write
    protect, or clear D for PML. The generic caller flushes TLBs afterwards. The answer may
    be a generator instead of None: a flow, run by the caller, that drops and takes the write
    lock again at its own race points (x86's eager split allocates page tables unlocked).
    Default: nothing (a backend that harvests hardware dirty bits needs no re-arming)."""


@hookspec
def dirty_pending_gfns(vm: Kvm, slot: Memslot) -> list[int]:
    """Gfns of ``slot`` that the guest wrote and whose dirty state still sits in the hardware
    (x86 PML buffer entries, Power C bits), i.e. what ``sync_dirty_log`` would log now, or
    that a fault in flight marks once it has dropped mmu_lock (arm64). Used by
    the invariant "a dirty writable leaf in a logging slot is logged or pending". Must not
    change anything. Every implementation runs; default: none."""


# --------------------------------------------------------------------------- introspection


@hookspec(firstresult=True)
def leaves(vm: Kvm, start: int, end: int, as_id: int) -> Iterator[Mapping]:
    """Every present leaf of address space ``as_id`` (already checked to be below
    ``vm.nr_address_spaces``) that maps a gfn in ``[start, end)``, ascending by gfn (the
    private alias after the shared one for the same gfn), as uniform ``Mapping`` records.
    Costs what is mapped, not the range size. Required."""


@hookspec(firstresult=True)
def stale_leaves(vm: Kvm) -> Iterable[Mapping]:
    """The present leaves of page tables no vCPU walks any more but KVM still holds until a
    zap reaches them (x86: the roots kvm_mmu_zap_all_fast made invalid, until
    kvm_tdp_mmu_zap_invalidated_roots has zapped them), as ``Mapping`` records. Called by
    checks only (the explorer's use-after-free oracle): an MMU notifier's invalidation zaps
    these too, since KVM may hold no reference to a page once the invalidation of its range
    has returned. Default: none."""


@hookspec(firstresult=True)
def page_table_bytes(vm: Kvm) -> int:
    """Bytes of page-table memory the backend holds now (tables, not leaves' data).
    Default: 0."""


@hookspec
def check_invariants(vm: Kvm) -> list[str]:
    """Architecture invariants of the current state (entry formats, alignment, table links,
    ...). Returns the problems found, each as one sentence; every implementation runs and the
    results are concatenated."""
