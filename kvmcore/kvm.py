"""struct kvm and struct kvm_vcpu: the state every flow works on, and the services flows and
backends call back into (include/linux/kvm_host.h, virt/kvm/kvm_main.c).

``Kvm`` holds the VM's fields (memslot sets, invalidation state, attributes, locks, dirty-log
configuration, statistics, trace, the bound hooks) and the small primitives Linux keeps beside
them: memslot lookup, mmu_invalidate_begin/range_add/end, kvm_flush_remote_tlbs*,
mark_page_dirty_in_slot. It runs no flow itself: the flows (notifiers, attributes, guest_memfd,
memslot updates, faults, dirty logging) are modules of their own over a ``Kvm``, and the
ioctl-shaped facade ``kvmcore.vm.VM`` is a ``Kvm`` that ties them together.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator

import structlog

from .arch import ArchInfo
from .args import integer
from .attributes import AttributeRanges, supported_mem_attributes
from .dirty_log import DirtyRing
from .errors import KvmError
from .host import HostMemory
from .invalidate import InvalidateState
from .locks import Mutex, RwLock, Srcu, current
from .memslots import Memslot, MemslotSet
from .uapi import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

logger = structlog.get_logger(__name__)


class Kvm:
    """struct kvm: one VM's state. Built by the facade (``kvmcore.vm.VM``), which chooses the
    backend and binds the hooks (``hook``, ``translate``, ``faultin_pfn``, ``map_leaf``,
    ``fast_page_fault``, ``relax_perms``, ``unmap_gfn_range``, ``leaves``,
    ``arch_check_invariants``)."""

    def __init__(self, backend, arch_info: ArchInfo, vm_type: str, host: HostMemory,
                 options: dict, trace: bool = False):
        self.backend = backend
        self.arch_info = arch_info
        self.vm_type = vm_type
        self.options = dict(options)
        self.capabilities: frozenset[str] = arch_info.capabilities_of(vm_type)
        self.arch_capabilities: frozenset[str] = arch_info.capabilities
        self.host = host
        #: PAGE_SIZE: the base page of this VM (its host's); gfns stay 4 KiB frames.
        self.page_size: int = host.page_size
        self.nr_address_spaces = arch_info.nr_address_spaces
        self.memslot_sets = [MemslotSet(i) for i in range(self.nr_address_spaces)]
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.mmu_invalidate = InvalidateState(arch_info.fault_retry_gfn)
        #: The fault path's arch choices (ArchInfo), read once per fault.
        self.invalid_slot_retry = arch_info.invalid_slot_retry
        self.faultin_retry_unsafe = arch_info.faultin_retry_unsafe
        self.mn_active_invalidate_count = 0
        #: Flows paused after dropping every lock but before their TLB flush (the dirty-ring
        #: reset): stale entries are legitimate meanwhile. Model bookkeeping, not Linux's.
        self.flushes_owed = 0
        #: The address span (log2) of one root table entry, set by a backend's init_vm: the
        #: tables under one entry may be linked by any fault under it, so faults under
        #: different entries touch no table in common (the explorer's reduction). None:
        #: unknown, every two gfns may share a table.
        self.root_entry_shift: int | None = None
        #: kvm->mmu_lock: an rwlock where Linux has KVM_HAVE_MMU_RWLOCK, else a spinlock.
        self.mmu_lock = RwLock("mmu_lock", exclusive=not arch_info.mmu_rwlock)
        #: kvm->slots_lock: memslot updates, dirty-log ioctls, attribute updates.
        self.slots_lock = Mutex("slots_lock")
        #: kvm->srcu: readers of the memslot sets (a vCPU's fault).
        self.srcu = Srcu("srcu")
        self.attributes = AttributeRanges()
        self.gmem_files: list = []
        #: What used a memslot after kvm_free_memslot freed it (a use after free in Linux),
        #: for the invariants to report.
        self.freed_slot_uses: list[str] = []
        #: kvm->gpc_list: the active gfn_to_pfn_caches (kvmcore.pfncache).
        self.gpc_list: list = []
        self.vcpus: list[KvmVcpu] = []
        self.stats: Counter = Counter()
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False
        self.manual_dirty_log_protect = 0
        #: Entries the hardware may log before KVM sees them (PML: 512); reserved in rings.
        self.cpu_dirty_log_size = 0
        self.events: list[dict] | None = [] if trace else None
        # Bound at the first traced event: binding a structlog logger costs a fifth of this
        # set-up, and an untraced VM (the explorer makes one per schedule) logs nothing.
        self._log = None
        self.closed = False

    def trace(self, event: str, **fields) -> None:
        """A structured event with a stable dotted name. When the VM was created with
        ``trace=True`` it is kept in ``events`` and logged (structlog, level info); otherwise
        it costs one test."""
        if self.events is not None:
            self.events.append({"event": event, **fields})
            if self._log is None:
                self._log = logger.bind(arch=self.arch_info.name, vm_type=self.vm_type)
            self._log.info(event, **fields)

    def _check_as_id(self, as_id: int) -> None:
        integer("as_id", as_id)
        if not 0 <= as_id < self.nr_address_spaces:
            raise KvmError(errno.EINVAL, f"as_id={as_id!r}: this VM has "
                                         f"{self.nr_address_spaces} address space(s)")

    def memslot_generation(self, as_id: int = 0) -> int:
        return self.memslot_sets[as_id].generation

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """The visible slot containing ``gfn`` (kvm_is_visible_memslot)."""
        slot = self.memslot_sets[as_id].search(gfn)
        return None if slot is None or slot.invalid else slot

    def leaf_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """The slot a present leaf of ``gfn`` may belong to: the visible one, or, while a
        memslot update holds slots_lock, the INVALID copy it published (its leaves stay
        until the update's flush, and faults that looked up the old slot may still add
        some before synchronize_srcu returns). For invariant checks."""
        slot = self.memslot_sets[as_id].search(gfn)
        if slot is None or (slot.invalid and not self.slots_lock.held):
            return None
        return slot

    def all_memslots(self) -> Iterator[Memslot]:
        for slots in self.memslot_sets:
            yield from slots

    def memslots(self, as_id: int = 0) -> list[Memslot]:
        """The live slots of an address space, ascending by guest address (EINVAL unless
        0 <= as_id < nr_address_spaces)."""
        self._check_as_id(as_id)
        return [s for s in self.memslot_sets[as_id] if not s.invalid]

    def kvm_mem_is_private(self, gfn: int) -> bool:
        return bool(self.attributes.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def range_has_memory_attributes(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """kvm_range_has_memory_attributes."""
        supported = supported_mem_attributes(self.capabilities)
        return self.attributes.has(start, end, mask & supported, attrs)

    @property
    def running_vcpu(self) -> KvmVcpu | None:
        """kvm_get_running_vcpu: the vCPU whose flow is running now, if it is one of this
        VM's."""
        vcpu = current().vcpu
        return vcpu if vcpu is not None and vcpu.vm is self else None

    def mark_page_dirty_in_slot(self, slot: Memslot | None, gfn: int,
                                vcpu: KvmVcpu | None = None) -> None:
        """mark_page_dirty_in_slot: the running vCPU's ring if rings are on, else the
        bitmap. ``vcpu`` names the vCPU explicitly (kvm_vcpu_mark_page_dirty)."""
        if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return
        rel = gfn - slot.base_gfn
        if vcpu is None:
            vcpu = self.running_vcpu
        if self.dirty_ring_size and vcpu is not None:
            vcpu.dirty_ring.push(slot.slot_id, rel)
        elif slot.dirty_bitmap is not None:
            slot.dirty_bitmap.set(rel)
        else:
            # Linux WARNs: a write with rings on and no running vCPU is lost.
            self.stats["dirty_lost"] += 1

    def dirty_log_manual_protect_and_init_set(self) -> bool:
        return bool(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def mmu_invalidate_begin(self) -> None:
        self.mmu_invalidate.begin()

    def mmu_invalidate_range_add(self, start: int, end: int) -> None:
        self.mmu_invalidate.range_add(start, end)

    def mmu_invalidate_end(self) -> None:
        self.mmu_invalidate.end()

    def mmu_invalidate_seq_bump(self) -> None:
        """A bare ``kvm->mmu_invalidate_seq++`` under kvm->mmu_lock, outside any
        begin/end bracket: in_progress and the range stay as they are. ppc's
        kvmppc_radix_flush_memslot does it so that a fault which looked up the memslot
        before the flush fails mmu_invalidate_retry and installs nothing."""
        self.mmu_invalidate.seq_bump()

    @property
    def mmu_invalidate_seq(self) -> int:
        return self.mmu_invalidate.seq

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return self.mmu_invalidate.in_progress

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs: every vCPU's TLB. x86 makes KVM_REQ_TLB_FLUSH on every vCPU
        and waits until those in guest mode have taken it; arm64 flushes the VMID at once.
        In the model no vCPU is in guest mode while another flow runs, so both come to the
        TLBs being empty when this returns. Until a flow calls this, every vCPU keeps its
        entries: a flow paused between a zap and its flush, or one that forgets the flush,
        leaves vCPUs reading through stale translations."""
        self.stats["tlb_flush"] += 1
        for vcpu in self.vcpus:
            vcpu.tlb.clear()
            vcpu.tlb_aliased = False

    def flush_remote_tlbs_range(self, start_gfn: int, npages: int) -> None:
        """kvm_flush_remote_tlbs_range."""
        self.stats["tlb_flush_range"] += 1
        end = start_gfn + npages
        for vcpu in self.vcpus:
            tlb = vcpu.tlb
            if not tlb:
                continue
            if vcpu.tlb_aliased or 3 * npages > len(tlb):
                for key in [k for k, e in tlb.items() if start_gfn <= e[0] < end]:
                    del tlb[key]
                continue
            # Every key is (gfn, private intent) when no access went through an alias: the
            # range's entries are found by key, not by scanning the TLB.
            pop = tlb.pop
            for gfn in range(start_gfn, end):
                pop((gfn, None), None)
                pop((gfn, False), None)
                pop((gfn, True), None)

    def flush_remote_tlbs_memslot(self, slot: Memslot) -> None:
        """kvm_flush_remote_tlbs_memslot."""
        self.flush_remote_tlbs_range(slot.base_gfn, slot.npages)

    def _check_open(self) -> None:
        if self.closed:
            raise KvmError(errno.EBADF, "the VM was closed")


class KvmVcpu:
    """struct kvm_vcpu: its TLB (what the hardware cached from the backend's walks), its dirty
    ring, its address space (kvm_arch_vcpu_memslots_id) and the backend's per-vCPU data."""

    def __init__(self, vm: Kvm, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        #: (gpa page with alias bits, private intent) -> (gfn, pfn, writable, executable, dirty)
        self.tlb: dict = {}
        #: Some entry's gpa page carries alias bits (is not its gfn): a ranged flush scans.
        self.tlb_aliased = False
        self.arch: dict = {}
        self.dirty_ring = (DirtyRing(vm.dirty_ring_size, vm.cpu_dirty_log_size)
                           if vm.dirty_ring_size else None)
        #: kvm_arch_vcpu_memslots_id: the address space its accesses use (x86 SMM: 1).
        self.as_id = 0

    def __repr__(self) -> str:
        return f"Vcpu({self.id})"
