"""The stage-2 abort path, after ``arch/arm64/kvm/mmu.c`` (6.17) with 6.18's ``gmem_abort``:
``kvm_handle_guest_abort`` -> ``handle_access_fault`` / ``user_mem_abort`` / ``gmem_abort``
(shared/reference/arm64_stage2.md §3).

The core runs the generic order (slot lookup, seq snapshot, pfn lookup, MMU lock, staleness
check); this module supplies what arm64 decides inside it:

* ``early_abort_checks`` (from the ``fast_page_fault`` hook, before the slot lookup): an
  instruction abort on an IPA without a memslot is injected into the guest
  (``GuestAbort("instruction_abort")``), never MMIO; an access-flag fault goes to
  ``handle_access_fault``.
* ``adjust_faultin`` (a ``faultin_pfn`` wrapper, after the core's __kvm_faultin_pfn): the
  device / PFNMAP decision (``s2_force_noncacheable``), the exec-on-device -ENOEXEC, the
  cacheable-PFNMAP -EFAULT, and the dirty-logging read-only trick.
* ``stage2_mapping_size``: user_mem_abort's size choice (force_pte, vma page shift, the
  fault_supports_stage2_huge_mapping clamps, THP promotion to PMD only, keeping the faulting
  block on a permission fault).
* ``relax_or_none`` / ``map_fault``: the relax-vs-map selection and the call into the page table,
  with mark_page_dirty_in_slot only for a writable, successful fault (commit 509552e65ae8),
  after kvm->mmu_lock is dropped (``PageFault.after_unlock``, at ``arm64_pf_mark_dirty``).
  In a stepped flow (``kvmcore.locks.stepping()``) both return the page-table walk as a
  generator, so the fault stops at its race points (``arm64_pte_break``, ``arm64_pte_make``,
  ``arm64_relax_cmpxchg``: see pgtable.py); a flow run to its end walks without them, since
  nothing could run at them.
* A fault whose walk met another walker's LOCKED entry gets -EAGAIN and the vCPU re-faults
  until that walker's make: Linux's vCPU re-enters the guest and faults again and again, each
  time changing nothing, so the model makes its next fault wait once
  (``arm64_pte_locked_wait``, as the core's ``pf_retry_wait``) until the entry is no longer
  LOCKED, then re-enter the guest.
* ``relax_perms_only`` (the explorer's mutant ``arm64_relax_perms_only``): user_mem_abort's
  choice before commit 7d894834a305 (2020). Linux relaxes only a permission fault
  taken at the level it would map (``vma_pagesize == fault_granule``) and sends every other
  fault to the map walker; before the fix every permission fault relaxed except a write to a
  dirty-logged slot (``!(logging_active && writable)``), which went to the map walker. Since
  the map walker leaves a permission-only change alone (694d071f8d85, same series), such a
  write on a page another vCPU's read fault mapped read-only is -EAGAIN for ever: the vCPU
  livelocks, which the explorer finds when a read and a write fault race on one gfn.

Not modelled: nested virtualization, MTE, pKVM, S1PTW and cache-maintenance aborts,
VM_ALLOW_ANY_UNCACHED (the host model's VMAs have no such flag, so an uncached PFNMAP is always
mapped Device-nGnRE, never Normal-NC).
"""

from __future__ import annotations

import errno
import weakref

import structlog
from kvmcore.errors import KvmError
from kvmcore.exits import GuestAbort
from kvmcore.locks import stepping, wait_until
from kvmcore.records import ACCESS_FLAG, PERMISSION, PageFault
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, RET_PF_FIXED, RET_PF_SPURIOUS

from .pgtable import (FAULT_WALK_FLAGS, PROT_DEVICE, PROT_R, PROT_W, PROT_X,
                      stage2_pte_is_locked)

logger = structlog.get_logger(__name__)

#: ESR_ELx fault status codes [ARM]: translation 0b0001LL, access flag 0b0010LL,
#: permission 0b0011LL.
ESR_ELx_FSC_FAULT = 0x04
ESR_ELx_FSC_ACCESS = 0x08
ESR_ELx_FSC_PERM = 0x0C

#: A vCPU whose last fault met another walker's LOCKED entry waits here, at its next fault,
#: until that walker's stage2_make_pte (see the module docstring).
ARM64_PTE_LOCKED_WAIT = "arm64_pte_locked_wait"
#: user_mem_abort has dropped kvm->mmu_lock (kvm_fault_unlock) and has not yet marked the
#: page it mapped writable dirty (mark_page_dirty_in_slot).
ARM64_PF_MARK_DIRTY = "arm64_pf_mark_dirty"


class FaultState:
    """What user_mem_abort keeps in locals between the pfn lookup and the install, for one
    ``PageFault`` (its ``arch`` field)."""

    __slots__ = ("gmem", "logging_active", "noncacheable", "writable", "vma_pagesize")

    def __init__(self, slot):
        #: kvm_handle_guest_abort's choice of gmem_abort (kvm_slot_has_gmem), and
        #: user_mem_abort's ``logging_active`` (memslot_is_logging): read once per fault.
        self.gmem = slot.has_gmem
        self.logging_active = slot.logging
        self.noncacheable = False
        self.writable = True
        #: vma_pagesize before transparent_hugepage_adjust: a PMD/PUD here rounded the ipa
        #: (and so the gfn that is marked dirty) down to the block.
        self.vma_pagesize = 0


class AbortPath:
    """The arm64 abort-path decisions for one VM's backend."""

    def __init__(self, backend):
        self.b = backend
        #: What every fault reads, bound once (the geometry and the page table never change).
        self.geom = backend.geom
        self.granule = backend.geom.granule
        self.pmd_size = backend.geom.pmd_size
        self.pgt = backend.pgt
        #: vCPU -> (table, index, gfn): the LOCKED entry its last fault backed off from.
        self._locked_refault: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: False while ``_locked_refault`` is known to be empty (its len is a Python call,
        #: and every fault would ask it).
        self._refault_pending = False

    @staticmethod
    def state(fault: PageFault) -> FaultState:
        st = fault.arch
        if st is None:
            st = fault.arch = FaultState(fault.slot)
        return st

    # ------------------------------------------------------------------ kvm_handle_guest_abort

    def early_abort_checks(self, vm, fault: PageFault):
        """kvm_handle_guest_abort, the part before user_mem_abort: exec from no memslot is an
        injected instruction abort; an access-flag fault is handle_access_fault. First, a
        vCPU that backed off from a LOCKED entry waits for its make (``locked_refault``)."""
        if self._refault_pending:
            if self._locked_refault:
                rec = self._locked_refault.pop(fault.vcpu, None)
                if (rec is not None and rec[2] == fault.gfn
                        and stage2_pte_is_locked(rec[0][rec[1]])):
                    return self.locked_refault(vm, rec[0], rec[1])
            else:
                self._refault_pending = False
        if fault.exec and vm.gfn_to_memslot(fault.gfn, fault.as_id) is None:
            vm.stats["arm64_inject_iabt"] += 1
            raise GuestAbort("instruction_abort", fault.addr)
        if fault.kind == ACCESS_FLAG:
            return self.handle_access_fault(vm, fault)
        return None

    def locked_refault(self, vm, table, index: int):
        """The re-faults of a vCPU whose fault met a LOCKED entry (stage2_pte_is_locked:
        -EAGAIN, back to the guest, the same fault again) until the walker that holds it
        stores the new entry: one wait instead of the spin, since every re-fault in between
        changes nothing; then the vCPU re-enters the guest and walks again."""
        yield from wait_until(lambda: not stage2_pte_is_locked(table[index]),
                              "another walker's break-before-make to end (stage2_make_pte)",
                              ARM64_PTE_LOCKED_WAIT)
        vm.stats["arm64_locked_refault_wait"] += 1
        return RET_PF_SPURIOUS

    def handle_access_fault(self, vm, fault: PageFault):
        """handle_access_fault, a flow: mkyoung under the read lock (waited for at
        ``arm64_af_lock_wait``); the guest retries either way."""
        lock = vm.mmu_lock
        yield from lock.read_lock("arm64_af_lock_wait")
        try:
            ret = self.b.pgt.mkyoung(fault.addr, FAULT_WALK_FLAGS)
        finally:
            lock.read_unlock()
        vm.stats["arm64_access_flag_fault"] += 1
        return RET_PF_FIXED if ret == 0 else RET_PF_SPURIOUS

    # ------------------------------------------------------------------ after __kvm_faultin_pfn

    def adjust_faultin(self, vm, fault: PageFault) -> None:
        """user_mem_abort steps 10-11 (and gmem_abort's writability), after the core resolved
        the pfn."""
        st = fault.arch
        if st is None:
            st = fault.arch = FaultState(fault.slot)
        if st.gmem:
            # gmem_abort: writable iff the slot is not read-only; no VMA, no logging trick.
            st.writable = fault.map_writable
        else:
            if fault.pfnmap:
                if fault.cacheable:
                    if not (self.b.fwb and self.b.cache_dic):
                        raise KvmError(errno.EFAULT, f"gpa={fault.gpa:#x}: cacheable PFNMAP "
                                       "needs FWB and CTR_EL0.DIC (kvm_supports_cacheable_pfnmap)")
                else:
                    st.noncacheable = True      # s2_force_noncacheable
            elif st.logging_active and not fault.write:
                # Map read-only so that the first write is trapped and logged.
                fault.map_writable = False
            if fault.exec and st.noncacheable:
                vm.stats["arm64_inject_iabt"] += 1
                raise GuestAbort("instruction_abort", fault.addr)
            st.writable = fault.map_writable

    # ------------------------------------------------------------------ size and prot

    def vma_page_size(self, vm, fault: PageFault) -> int:
        """get_vma_page_shift: hugetlb's size; PFNMAP's PUD/PMD when hva and PA share the
        offset and the block fits the VMA; PAGE_SIZE for everything else (THP comes later)."""
        vma = fault.host_vma
        if vma is None:
            return self.granule
        if vma.kind.startswith("hugetlb"):
            return vma.page_size
        if vma.io_pfnmap:
            g = self.geom
            pa = vma.pfn << 12
            for lvl in (1, 2):
                if not g.level_supports_block(lvl):
                    continue
                size = g.size(lvl)
                hva = fault.hva
                if ((vma.start & (size - 1)) == (pa & (size - 1))
                        and hva & ~(size - 1) >= vma.start
                        and (hva & ~(size - 1)) + size <= vma.end):
                    return size
        return self.granule

    def vma_shift_at(self, vm, fault: PageFault, hva: int) -> int:
        """user_mem_abort's vma_shift before the pfn lookup: PAGE_SHIFT while logging, else
        get_vma_page_shift clamped by fault_supports_stage2_huge_mapping."""
        g = self.b.geom
        vma = vm.host.find_vma(hva)
        size = g.granule
        if vma is not None and not fault.slot.logging and not fault.slot.has_gmem:
            fault.host_vma, fault.hva = vma, hva
            size = self._clamp_block(fault, self.vma_page_size(vm, fault))[0]
        return size.bit_length() - 1

    def _clamp_block(self, fault: PageFault, size: int) -> tuple[int, bool]:
        """The PUD -> PMD -> PAGE fallthrough of user_mem_abort's vma_shift switch; sizes that
        are no stage-2 block (contiguous-hint hugetlb) fall to the next block size below."""
        g = self.b.geom
        page = g.granule
        if size <= page:
            return page, False
        for lvl in (1, 2):
            bs = g.size(lvl)
            if bs <= size and g.level_supports_block(lvl) \
                    and fault.slot.supports_huge_mapping(fault.gfn, bs):
                return bs, False
        return page, True

    def stage2_mapping_size(self, vm, fault: PageFault) -> tuple[int, bool]:
        """user_mem_abort steps 4-6 and 15: (vma_pagesize, force_pte). gmem_abort: always
        PAGE_SIZE."""
        page = self.granule
        st = fault.arch or self.state(fault)
        if st.gmem:
            return page, False
        if st.logging_active:
            return page, True
        size = self.vma_page_size(vm, fault)
        if size <= page:
            size, force_pte = page, False       # _clamp_block's first case, inline
        else:
            size, force_pte = self._clamp_block(fault, size)
        st.vma_pagesize = size
        if size == page and not force_pte and not st.noncacheable:
            if fault.kind == PERMISSION and fault.fault_size > page:
                size = fault.fault_size           # keep the block that faulted
            else:
                size = self.transparent_hugepage_adjust(vm, fault)
        return size, force_pte

    def transparent_hugepage_adjust(self, vm, fault: PageFault) -> int:
        """transparent_hugepage_adjust: PMD only, when the host maps at least a PMD and the
        slot allows it."""
        pmd = self.pmd_size
        if (fault.max_size >= pmd and self.geom.level_supports_block(2)
                and fault.slot.supports_huge_mapping(fault.gfn, pmd)):
            vm.stats["arm64_thp_adjust"] += 1
            return pmd
        return self.granule

    def stage2_prot(self, vm, fault: PageFault) -> int:
        """user_mem_abort step 17 / gmem_abort: R, W iff writable, X on exec; noncacheable ->
        DEVICE (never executable); otherwise X always with CTR_EL0.DIC."""
        st = fault.arch or self.state(fault)
        prot = PROT_R
        if st.writable:
            prot |= PROT_W
        if fault.exec:
            prot |= PROT_X
        if st.noncacheable:
            prot |= PROT_DEVICE
        elif self.b.cache_dic:
            prot |= PROT_X
        return prot

    # ------------------------------------------------------------------ install

    def relax_or_none(self, vm, fault: PageFault):
        """user_mem_abort step 18, first half: relax_perms iff the fault is a permission fault
        and the mapping size equals the faulting leaf's size (with ``relax_perms_only``, the
        pre-7d894834a305 choice: any permission fault but a write to a logging slot);
        gmem_abort never relaxes. None, or a RET_PF_* code (a generator returning it in a
        stepped flow, with the race point ``arm64_relax_cmpxchg``)."""
        if fault.slot.has_gmem or fault.kind != PERMISSION:
            return None
        size, _force = self.stage2_mapping_size(vm, fault)
        if self.b.relax_perms_only:
            if fault.slot.logging and self.state(fault).writable:
                return None
        elif size != fault.fault_size:
            return None
        prot = self.stage2_prot(vm, fault) & (PROT_R | PROT_W | PROT_X)
        if stepping():
            return self._relax_steps(vm, fault, prot, size)
        ret, locked = self.b.pgt.relax_perms_walk(fault.addr, prot, FAULT_WALK_FLAGS)
        return self._installed(vm, fault, ret, locked, "relax_perms", size)

    def _relax_steps(self, vm, fault: PageFault, prot: int, size: int):
        ret, locked = yield from self.b.pgt.relax_perms_steps(fault.addr, prot,
                                                              FAULT_WALK_FLAGS)
        return self._installed(vm, fault, ret, locked, "relax_perms", size)

    def _installed(self, vm, fault: PageFault, ret: int, locked, how: str, size: int) -> int:
        """After the walk: remember a LOCKED entry it backed off from for the vCPU's next
        fault (``locked_refault``); then the tail of user_mem_abort: mark dirty only when
        writable and ret == 0; -EAGAIN (nothing to change, a LOCKED entry, a lost race) is
        success for the guest, which re-enters and faults again if it still lacks something
        (RET_PF_SPURIOUS).

        The gfn marked is user_mem_abort's ``gfn = ipa >> PAGE_SHIFT``, taken after the ipa
        was rounded down to a PMD/PUD vma_pagesize (hugetlb, PFNMAP blocks): a write mapped
        as such a block marks the block's first page, not the written one. With a bitmap the
        slot logs and maps pages, so this shows with a dirty ring alone. A THP block
        (transparent_hugepage_adjust, after gfn was taken) marks the written page."""
        if locked is not None and fault.vcpu is not None:
            self._locked_refault[fault.vcpu] = (locked[0], locked[1], fault.gfn)
            self._refault_pending = True
        st = fault.arch or self.state(fault)
        if st.writable and ret == 0:
            gfn = fault.gfn
            if st.vma_pagesize > self.granule:
                gfn &= ~((st.vma_pagesize >> 12) - 1)
            slot = fault.slot
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                # After kvm_fault_unlock: a dirty-log ioctl may run between the install and
                # the mark (``arm64_pf_mark_dirty``); the gfn is pending until then.
                self.b.dirty_marks_in_flight.add((slot, gfn))
                fault.after_unlock = (ARM64_PF_MARK_DIRTY, self.b.mark_dirty_after_unlock,
                                      (vm, slot, gfn))
        if vm.events is not None:
            vm.trace(f"arm64.{how}", gpa=fault.gpa, size=size, ret=ret, write=fault.write,
                     exec=fault.exec)
        if ret == 0:
            return RET_PF_FIXED
        if ret == -errno.EAGAIN:
            vm.stats["arm64_fault_eagain"] += 1
            return RET_PF_SPURIOUS
        raise KvmError(-ret, f"gpa={fault.gpa:#x}: stage-2 update failed ({ret})")

    def map_fault(self, vm, fault: PageFault):
        """user_mem_abort step 18, second half (and gmem_abort): kvm_pgtable_stage2_map at the
        chosen size, IPA and PA aligned down to it: a RET_PF_* code (a generator returning it
        in a stepped flow, with the race points ``arm64_pte_break`` and ``arm64_pte_make`` of
        every entry it replaces).

        ``fault.pfn`` is the 4 KiB frame of the faulting gfn, inside one host page (PAGE_SIZE =
        granule, aligned and contiguous), so Linux's pfn of the IPA's page is that frame
        aligned down to the granule. A block (hugetlb or PFNMAP vma_pagesize, THP's PMD) is
        the pfn of its first page: fault_supports_stage2_huge_mapping made IPA and hva
        congruent modulo the block size and the host maps it physically contiguous, so the
        faulting frame minus the IPA's offset in the block (transparent_hugepage_adjust's
        ``pfn &= ~(PTRS_PER_PMD - 1)``)."""
        granule = self.granule
        size, force_pte = self.stage2_mapping_size(vm, fault)
        prot = self.stage2_prot(vm, fault)
        gpa = fault.gpa
        ipa = gpa & ~(size - 1)
        phys = (fault.pfn << 12) & ~(granule - 1)             # the IPA's page
        if size > granule:
            phys -= (gpa - ipa) & ~(granule - 1)              # the block's first page
            vm.stats[f"arm64_map_block_{size >> 10}k"] += 1
        if stepping():
            return self._map_steps(vm, fault, ipa, size, phys, prot)
        ret, locked = self.pgt.map_walk(ipa, size, phys, prot, FAULT_WALK_FLAGS)
        return self._installed(vm, fault, ret, locked, "map", size)

    def _map_steps(self, vm, fault: PageFault, ipa: int, size: int, phys: int, prot: int):
        ret, locked = yield from self.b.pgt.map_steps(ipa, size, phys, prot, FAULT_WALK_FLAGS)
        return self._installed(vm, fault, ret, locked, "map", size)
