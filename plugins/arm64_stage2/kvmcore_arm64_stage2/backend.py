"""``Arm64Stage2Backend``: the kvmcore backend for the arm64 stage-2 MMU.

VM options (``VM(arch="arm64_stage2", granule=..., ...)``), each a fact about the modelled host
CPU or a KVM capability, raising EINVAL when bad:

* ``granule`` 4096 / 16384 / 65536: the host PAGE_SIZE, hence the stage-2 granule, as in Linux
  (``ArchInfo.base_page_option``): ``VM(arch="arm64_stage2", granule=65536)`` gets a host with
  64 KiB pages (``kvmcore.vm.host_for``), a VM on a given host takes its PAGE_SIZE when the
  option is omitted, and a granule other than the host's PAGE_SIZE is EINVAL.
* ``ipa_bits`` 32..48, or 0 for KVM_PHYS_SHIFT (40): KVM_VM_TYPE_ARM_IPA_SIZE.
* ``fwb`` (default True): ARM64_HAS_STAGE2_FWB (MemAttr encodings, D-cache maintenance).
* ``cache_dic`` (default True): CTR_EL0.DIC — every Normal mapping gets X, no I-cache work.
* ``tlbirange`` (default False): FEAT_TLBIRANGE (with FWB, unmap defers to one range TLBI).
* ``hw_af`` (default False): VTCR_EL2.HA — the walker sets AF itself, no access-flag faults.
* ``eager_split_chunk_size`` (default 0 = off): KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, 0 or a
  supported block size (the capability can only change while no memslot exists; as a VM
  option it is set before any).

Capabilities: arm64 has no KVM_SET_MEMORY_ATTRIBUTES and no private memory (6.18 guest_memfd is
mmap-able, shared-only: ``gmem`` and ``gmem_mmap``, never ``private_mem``). KVM_PRE_FAULT_MEMORY
is not claimed: the reference lists it for no arm64 tree (arm64 support exists as posted patches
only). ``hugepage_2m``/``hugepage_1g`` are claimed for the 4K granule only (16K: 32 MiB blocks,
64K: 512 MiB blocks). A guest_memfd is bound only as a gmem-only slot (GUEST_MEMFD_FLAG_MMAP),
as 6.18's kvm_arch_prepare_memory_region requires; binding any other guest_memfd is EINVAL.

Model notes:

* TLB maintenance: every TLBI the page-table code issues is recorded in ``tlbi_log`` and
  empties the vCPU TLBs of its range (``vm.flush_remote_tlbs_range``; whole-VMID ones
  ``vm.flush_remote_tlbs``). Within one walk under the MMU lock the vCPU-TLB work of adjacent
  TLBIs is merged (no vCPU runs meanwhile); the records stay one per TLBI.
* Stage-2 keeps no dirty state (DBM unused): ``Mapping.dirty`` and ``Translation.dirty`` are
  the leaf's write permission.
* A stage-2 page maps exactly one host page (PAGE_SIZE = granule, physically contiguous), and
  a block a physically contiguous, aligned run of host memory: every output address is the real
  ``pfn << 12`` of the first 4 KiB frame of that page or block (the host numbers frames in
  4 KiB units whatever its PAGE_SIZE). Memslot, guest_memfd and attribute alignment to
  PAGE_SIZE is the core's check (EINVAL), as in Linux's generic code. Dirty logging marks
  every 4 KiB gfn of a written base page.
"""

from __future__ import annotations

import errno

import kvmcore
import structlog
from kvmcore.arch import ArchInfo, VmOption, vm_options
from kvmcore.errors import KvmError
from kvmcore.exits import GuestAbort, HwPoisonSignal
from kvmcore.locks import WRITE
from kvmcore.memslots import dirty_logging_toggled
from kvmcore.records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Translation, Violation
from kvmcore.uapi import (KVM_MEM_LOG_DIRTY_PAGES, KVM_MR_CREATE, KVM_MR_DELETE,
                          KVM_MR_FLAGS_ONLY, KVM_MR_MOVE, RET_PF_CONTINUE)

from .geometry import KVM_IPA_LIMIT, KVM_PGTABLE_LAST_LEVEL, Stage2Geometry
from .mmu import ESR_ELx_FSC_ACCESS, ESR_ELx_FSC_FAULT, ESR_ELx_FSC_PERM, AbortPath
from .invariants import check_vm
from .pgtable import (KVM_PTE_LEAF_ATTR_HI_S2_XN, KVM_PTE_LEAF_ATTR_LO_S2_AF,
                      KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
                      KVM_PTE_TYPE, KVM_PTE_VALID, BBM_BLOCK_TO_TABLE, BBM_TABLE,
                      Stage2PageTable, Tlbi)

logger = structlog.get_logger(__name__)

hookimpl = kvmcore.hookimpl

#: stage2_apply_range's cond_resched_rwlock_write between two chunks of a may_block unmap
#: (reference/races.md §8): the write lock is dropped and taken again.
S2_UNMAP_RESCHED = "s2_unmap_resched"
#: kvm_stage2_wp_range (stage2_apply_range_resched) between two chunks of the write
#: protection that dirty logging starts with: the write lock is dropped and taken again.
S2_WP_RESCHED = "s2_wp_resched"
#: kvm_mmu_split_huge_pages before each chunk: need_split_memcache_topup_or_resched drops the
#: write lock to refill the split page cache or to reschedule, and takes it again.
S2_SPLIT_TOPUP = "s2_split_topup"

#: kvm_handle_guest_abort's PARange limit (1 << KVM_IPA_LIMIT): beyond it, an address-size fault.
_IPA_LIMIT_SIZE = 1 << KVM_IPA_LIMIT

_COMMON_CAPS = {"gmem", "gmem_mmap", "readonly_mem", "dirty_log", "manual_dirty_protect",
                "initially_set", "dirty_ring", "relax_perms", "aging"}


def _arch_info(g: Stage2Geometry) -> ArchInfo:
    granule = g.granule
    caps = set(_COMMON_CAPS)
    if granule == 4096:
        caps |= {"hugepage_2m", "hugepage_1g"}
    return ArchInfo(
        name="arm64_stage2",
        page_sizes=tuple(reversed(g.supported_block_sizes())),
        levels=g.levels,
        vm_types={"default": frozenset(caps)},
        description=f"arm64 stage-2 ({granule // 1024}K granule): VMSAv8-64 descriptors, "
                    "break-before-make, relax_perms, FWB, AF aging",
        base_page_option="granule",
        # arch/arm64/kvm/arm.c: kvm_arch_vm_ioctl and kvm_arch_vcpu_ioctl default to -EINVAL.
        vm_ioctl_errno=errno.EINVAL,
        vcpu_ioctl_errno=errno.EINVAL,
        # user_mem_abort checks mmu_invalidate_retry: any invalidation in progress retries.
        fault_retry_gfn=False,
        # kvm_handle_guest_abort: a missing or INVALID slot has no hva, the abort is MMIO
        invalid_slot_retry=False,
        faultin_retry_unsafe=False,
        # An error pfn is -EFAULT out of KVM_RUN, without KVM_EXIT_MEMORY_FAULT.
        error_pfn_memory_fault=False,
    )


OPTIONS = {
    "granule": VmOption(4096, (4096, 16384, 65536), "stage-2 translation granule"),
    "ipa_bits": VmOption(0, doc="KVM_VM_TYPE_ARM_IPA_SIZE (0: 40 bits)"),
    "fwb": VmOption(True, doc="ARM64_HAS_STAGE2_FWB"),
    "cache_dic": VmOption(True, doc="CTR_EL0.DIC"),
    "tlbirange": VmOption(False, doc="ARM64_HAS_TLB_RANGE"),
    "hw_af": VmOption(False, doc="hardware access-flag updates (VTCR_EL2.HA)"),
    "eager_split_chunk_size": VmOption(0, doc="KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE"),
}


class Arm64Stage2Backend:
    """One VM's stage-2 (struct kvm_s2_mmu + struct kvm_pgtable) and its hook
    implementations."""

    arch_info = _arch_info(Stage2Geometry(4096, 40))

    #: user_mem_abort's relax-vs-map choice before commit 7d894834a305 (mmu.py), switched on
    #: only by the race explorer's mutant ``arm64_relax_perms_only`` (mutants.py).
    relax_perms_only = False
    OPTIONS = OPTIONS

    def __init__(self, vm_type: str = "default", **options):
        if vm_type != "default":
            raise KvmError(errno.EINVAL, f"vm_type={vm_type!r}: arm64_stage2 has only "
                           "'default' (protected VMs are not modelled)")
        opts = vm_options("arm64_stage2", OPTIONS, options)
        fwb, cache_dic, hw_af = opts["fwb"], opts["cache_dic"], opts["hw_af"]
        eager_split_chunk_size = opts["eager_split_chunk_size"]
        self.geom = Stage2Geometry.from_options(granule=opts["granule"],
                                                ipa_bits=opts["ipa_bits"], hw_af=hw_af)
        if eager_split_chunk_size and not self.geom.is_block_size_supported(
                eager_split_chunk_size):
            raise KvmError(errno.EINVAL, f"eager_split_chunk_size={eager_split_chunk_size!r}:"
                           " 0 or a supported block size (kvm_is_block_size_supported)")
        self.vm_type = vm_type
        self.fwb, self.cache_dic, self.hw_af = fwb, cache_dic, hw_af
        self.eager_split_chunk_size = eager_split_chunk_size
        self.arch_info = _arch_info(self.geom)
        self.vm = None
        self.pgt = Stage2PageTable(self.geom, fwb=fwb, cache_dic=cache_dic,
                                   tlbirange=opts["tlbirange"],
                                   on_tlbi=self._on_tlbi)
        self.abort = AbortPath(self)
        self._tlb_batch: list[Tlbi] | None = None
        #: What ``translate`` reads on every access, bound once: the hardware walk, the
        #: output-address mask, the leaf size of each walk position, the VM's IPA limit.
        self._lookup = self.pgt.pt.lookup
        self._addr_mask = self.pgt.fmt.addr_mask
        self._size_at = tuple(self.geom.size(lvl) for lvl in range(self.geom.start_level,
                                                                   KVM_PGTABLE_LAST_LEVEL + 1))
        self._phys_size = self.geom.phys_size
        self._start_level = self.geom.start_level
        #: 4 KiB gfns per base page (mark_base_page_dirty).
        self._gfns_per_page = self.geom.granule >> 12
        #: (slot, gfn) a fault has mapped writable and marks dirty after dropping mmu_lock.
        self.dirty_marks_in_flight: set = set()
        #: stage2_apply_range's chunk (stage2_range_addr_end).
        self._apply_chunk = self.geom.size(self.geom.min_block_level)

    # Hook objects must stay hashable: identity hash/eq.
    __hash__ = object.__hash__

    @property
    def tlbi_log(self):
        """Every TLB invalidation issued, in order (``pgtable.Tlbi`` records)."""
        return self.pgt.tlbi_log

    def _on_tlbi(self, rec: Tlbi) -> None:
        """Only a TLBI empties the vCPUs' TLBs: a local (nsh) one too, since the model cannot
        say which physical CPU a vCPU last ran on. Inside a batch (one walk under the MMU lock,
        when no vCPU can run) the vCPU-TLB work of adjacent TLBIs is merged; the TLBIs
        themselves are all recorded."""
        if self.vm is None:
            return
        if rec.why == BBM_BLOCK_TO_TABLE or rec.why == BBM_TABLE:
            # The rest of the block is gone until it refaults, or the table's leaves until
            # the block is made: allowed to take away what a completed access used (the
            # explorer's downgrade oracle counts it).
            self.vm.stats["fault_block_unmapped"] += 1
        if self.vm.events is not None:
            self.vm.trace("arm64.tlbi", op=rec.op, ipa=rec.ipa, size=rec.size,
                          level=rec.level, why=rec.why)
        if self._tlb_batch is not None:
            self._tlb_batch.append(rec)
            return
        self._flush_vcpu_tlbs([rec])

    def _flush_vcpu_tlbs(self, recs) -> None:
        vm = self.vm
        ranges: list[list[int]] = []
        for rec in recs:
            if rec.op == "vmid":
                vm.flush_remote_tlbs()
                return
            start, end = rec.ipa >> 12, (rec.ipa + max(rec.size, 4096)) >> 12
            if ranges and ranges[-1][0] <= start <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        for start, end in ranges:
            vm.flush_remote_tlbs_range(start, end - start)

    def tlb_batch(self) -> _TlbBatch:
        """Merge the vCPU-TLB flushes of the TLBIs issued inside (see _on_tlbi)."""
        return _TlbBatch(self)

    # ------------------------------------------------------------------ life cycle

    @hookimpl
    def init_vm(self, vm):
        """kvm_init_stage2_mmu: the root was allocated with the backend; remember the VM."""
        self.vm = vm
        vm.root_entry_shift = self.pgt.pt.geometry.shifts[0]
        vm.trace("arm64.init_stage2", vtcr=self.geom.vtcr, levels=self.geom.levels,
                 start_level=self.geom.start_level, root_pages=self.geom.root_pages)

    # ------------------------------------------------------------------ hardware walk

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        """The stage-2 walk of one access: translation / access-flag / permission faults (in
        that priority) with the ESR FSC and the level, or the output page. The IPA checks of
        kvm_handle_guest_abort come first: beyond the PARange limit an address-size fault,
        beyond the VM's IPA size an external abort, both injected into the guest."""
        if gpa >= _IPA_LIMIT_SIZE:
            raise GuestAbort("address_size", gpa)
        if gpa >= self._phys_size:
            raise GuestAbort("external_abort", gpa)
        pos, table, idx, pte = self._lookup(gpa)
        level = self._start_level + pos
        gfn = gpa >> 12
        size = self._size_at[pos]
        if not pte & KVM_PTE_VALID or (level == KVM_PGTABLE_LAST_LEVEL
                                       and not pte & KVM_PTE_TYPE):
            return Violation(NOT_PRESENT, gfn, False, level, size, ESR_ELx_FSC_FAULT | level)
        if not pte & KVM_PTE_LEAF_ATTR_LO_S2_AF:
            if not self.hw_af:
                return Violation(ACCESS_FLAG, gfn, False, level, size,
                                 ESR_ELx_FSC_ACCESS | level)
            pte |= KVM_PTE_LEAF_ATTR_LO_S2_AF
            table[idx] = pte
        readable = pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R != 0
        writable = pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W != 0
        executable = not pte & KVM_PTE_LEAF_ATTR_HI_S2_XN
        kind = access.kind
        if ((kind == "read" and not readable) or (kind == "write" and not writable)
                or (kind == "fetch" and not executable)):
            return Violation(PERMISSION, gfn, False, level, size, ESR_ELx_FSC_PERM | level)
        pfn = ((pte & self._addr_mask) + (gpa & (size - 1))) >> 12
        # No DBM: a writable leaf takes writes without a state change, so it counts as dirty.
        return Translation(gfn, pfn, size, readable, writable, executable, writable)

    # ------------------------------------------------------------------ the abort path

    @hookimpl
    def fast_page_fault(self, vm, fault):
        return self.abort.early_abort_checks(vm, fault)

    @hookimpl(wrapper=True)
    def faultin_pfn(self, vm, fault):
        """The core's __kvm_faultin_pfn, then user_mem_abort's decisions on its result; a
        hwpoisoned page is signalled with user_mem_abort's vma_shift as si_addr_lsb, at the hva
        of the base page (gfn_to_hva_memslot_prot of ipa >> PAGE_SHIFT: with a 16K/64K
        granule the hva of the faulting 4 KiB aligned down to the page)."""
        try:
            r = yield
        except HwPoisonSignal as e:
            hva = e.hva & ~(self.geom.granule - 1)
            raise HwPoisonSignal(hva, self.abort.vma_shift_at(vm, fault, hva)) from None
        if r == RET_PF_CONTINUE:
            self.abort.adjust_faultin(vm, fault)
        return r

    @hookimpl
    def relax_perms(self, vm, fault):
        return self.abort.relax_or_none(vm, fault)

    @hookimpl
    def map_leaf(self, vm, fault):
        return self.abort.map_fault(vm, fault)

    def mark_dirty_after_unlock(self, vm, slot, gfn: int) -> None:
        """user_mem_abort's mark_page_dirty_in_slot, after kvm_fault_unlock."""
        self.dirty_marks_in_flight.discard((slot, gfn))
        self.mark_base_page_dirty(vm, slot, gfn)

    @hookimpl
    def dirty_pending_gfns(self, vm, slot):
        """The pages of ``slot`` that a fault has mapped writable and will mark dirty once it
        has dropped mmu_lock (``arm64_pf_mark_dirty``)."""
        n = self._gfns_per_page
        return [g for s, gfn in self.dirty_marks_in_flight if s is slot
                for g in range(gfn & ~(n - 1), (gfn & ~(n - 1)) + n)]

    def mark_base_page_dirty(self, vm, slot, gfn: int) -> None:
        """mark_page_dirty_in_slot for every 4 KiB gfn of the base page holding ``gfn``."""
        if not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return          # its kvm_slot_dirty_track_enabled test, once for the base page
        n = self._gfns_per_page
        first = gfn & ~(n - 1)
        base = slot.base_gfn
        end = base + slot.npages
        last = first + n
        for g in range(first if first > base else base, last if last < end else end):
            vm.mark_page_dirty_in_slot(slot, g)

    # ------------------------------------------------------------------ unmap and aging

    def stage2_range_addr_end(self, addr: int, end: int) -> int:
        """stage2_range_addr_end: the end of ``addr``'s chunk, a block of
        KVM_PGTABLE_MIN_BLOCK_LEVEL (1 GiB with 4K pages, 32 MiB with 16K, 512 MiB with
        64K), or ``end``."""
        chunk = self._apply_chunk
        nxt = (addr & ~(chunk - 1)) + chunk
        return nxt if nxt < end else end

    def unmap_stage2_range(self, start: int, size: int) -> None:
        """__unmap_stage2_range without rescheduling: stage2_apply_range's chunks, one after
        the other under the write lock."""
        end = start + size
        addr = start
        with self.tlb_batch():
            while addr < end:
                nxt = self.stage2_range_addr_end(addr, end)
                self.pgt.unmap(addr, nxt - addr)
                addr = nxt

    def unmap_stage2_range_resched(self, vm, start: int, size: int):
        """__unmap_stage2_range with may_block, a flow: stage2_apply_range with resched, so
        cond_resched_rwlock_write between two chunks (``s2_unmap_resched``, the write lock
        dropped: faults may take the read lock there). The vCPU TLBs of a chunk's TLBIs are
        emptied before the lock is dropped, as Linux's TLBIs complete inside the walk."""
        end = start + size
        addr = start
        while True:
            nxt = self.stage2_range_addr_end(addr, end)
            with self.tlb_batch():
                self.pgt.unmap(addr, nxt - addr)
            if nxt == end:
                return False
            vm.stats["arm64_s2_unmap_resched"] += 1
            yield from vm.mmu_lock.cond_resched(WRITE, S2_UNMAP_RESCHED)
            addr = nxt

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        """kvm_unmap_gfn_range: every TLBI is done inside, so no flush is asked of the caller.
        With ``range.may_block`` (notifiers that may sleep, memslot flushes, guest_memfd) a
        range of more than one chunk is a flow that yields between chunks."""
        start, size = range.start << 12, (range.end - range.start) << 12
        if range.may_block and self.stage2_range_addr_end(start, start + size) < start + size:
            return self.unmap_stage2_range_resched(vm, start, size)
        self.unmap_stage2_range(start, size)
        return False

    @hookimpl
    def age_gfn(self, vm, range):
        """kvm_age_gfn: test_clear_young(mkold=True); no TLBI."""
        return self.pgt.test_clear_young(range.start << 12, range.npages << 12, mkold=True)

    @hookimpl
    def test_age_gfn(self, vm, range):
        return self.pgt.test_clear_young(range.start << 12, range.npages << 12, mkold=False)

    # ------------------------------------------------------------------ memslots

    @hookimpl
    def prepare_memory_region(self, vm, old, new, change):
        """kvm_arch_prepare_memory_region: the IPA bound (-EFAULT), gmem-only guest_memfd
        slots (-EINVAL), and for each VMA: no dirty logging on VM_PFNMAP (-EINVAL; the
        model's PFNMAP is never cacheable, so the FWB + DIC check has nothing to refuse).
        PAGE_SIZE alignment of the addresses, size and guest_memfd offset (EINVAL) is the
        core's generic check: PAGE_SIZE is the granule."""
        if change not in (KVM_MR_CREATE, KVM_MR_MOVE, KVM_MR_FLAGS_ONLY) or new is None:
            return
        g = self.geom
        if (new.base_gfn + new.npages) << 12 > g.phys_size:
            raise KvmError(errno.EFAULT, f"guest_phys_addr+memory_size="
                           f"{(new.base_gfn + new.npages) << 12:#x}: beyond the VM's "
                           f"{g.ipa_bits}-bit IPA space")
        if new.has_gmem and not new.gmem_only:
            raise KvmError(errno.EINVAL, "guest_memfd: arm64 accepts only gmem-only slots "
                           "(GUEST_MEMFD_FLAG_MMAP); there is no private memory on arm64")
        if new.has_gmem:
            return
        start = new.userspace_addr
        end = start + (new.npages << 12)
        for vma in vm.host.vmas_in(start, end):
            if not vma.io_pfnmap:
                continue
            if new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                raise KvmError(errno.EINVAL, f"flags: KVM_MEM_LOG_DIRTY_PAGES on a VM_PFNMAP "
                               f"range (hva {vma.start:#x})")

    @hookimpl
    def commit_memory_region(self, vm, old, new, change):
        """kvm_arch_commit_memory_region: when logging is switched on (and not manual-protect
        with initially-all-set), write-protect the slot, flush its TLBs, then eager-split."""
        if change == KVM_MR_DELETE or new is None:
            return
        if dirty_logging_toggled(old, new) <= 0:
            return
        if vm.dirty_log_manual_protect_and_init_set():
            return
        return self._start_logging(vm, new)

    def _start_logging(self, vm, new):
        yield from self.kvm_mmu_wp_memory_region(vm, new)
        if self.eager_split_chunk_size:
            # kvm_mmu_split_memory_region
            lock = vm.mmu_lock
            yield from lock.take(WRITE, S2_SPLIT_TOPUP)
            try:
                yield from self.kvm_mmu_split_huge_pages(
                    vm, new.base_gfn << 12, (new.base_gfn + new.npages) << 12)
            finally:
                lock.write_unlock()

    def kvm_mmu_wp_memory_region(self, vm, slot):
        """kvm_mmu_wp_memory_region, a flow: under kvm->mmu_lock for write, kvm_stage2_wp_range
        over the slot, stage2_apply_range with resched: between two chunks
        (stage2_range_addr_end) the lock is dropped and taken again (``s2_wp_resched``),
        where a vCPU may still write, unfaulted and unlogged, to a chunk not yet protected;
        then the slot's TLBs are flushed."""
        lock = vm.mmu_lock
        yield from lock.take(WRITE, S2_WP_RESCHED)
        try:
            addr = slot.base_gfn << 12
            end = addr + (slot.npages << 12)
            while True:
                nxt = self.stage2_range_addr_end(addr, end)
                self.pgt.wrprotect(addr, nxt - addr)
                if nxt == end:
                    break
                yield from lock.cond_resched(WRITE, S2_WP_RESCHED)
                addr = nxt
        finally:
            lock.write_unlock()
        vm.flush_remote_tlbs_memslot(slot)

    def kvm_mmu_split_huge_pages(self, vm, start: int, end: int):
        """kvm_mmu_split_huge_pages, a flow under kvm->mmu_lock for write (the caller's): in
        chunk-aligned steps, each preceded by need_split_memcache_topup_or_resched, which
        drops the lock to refill the split page cache or to reschedule
        (``s2_split_topup``). The model has no page cache and may stop before every chunk, as
        Linux may when it must reschedule; a chunk's TLBIs complete within it."""
        chunk = self.eager_split_chunk_size
        lock = vm.mmu_lock
        addr = start
        while addr < end:
            yield from lock.cond_resched(WRITE, S2_SPLIT_TOPUP)
            nxt = min((addr & ~(chunk - 1)) + chunk, end)
            with self.tlb_batch():
                self.pgt.split(addr, nxt - addr)
            addr = nxt
        vm.stats["arm64_eager_split"] += 1

    @hookimpl
    def enable_log_dirty_pt_masked(self, vm, slot, gfn_offset, mask):
        """kvm_arch_mmu_enable_log_dirty_pt_masked: write-protect [first set bit, last set
        bit] (gaps included); eager-split it only with manual-protect + initially-all-set,
        a flow that may drop the write lock before each chunk (``s2_split_topup``)."""
        if not mask:
            return None
        base = slot.base_gfn + gfn_offset
        first = (mask & -mask).bit_length() - 1
        last = mask.bit_length() - 1
        start, end = (base + first) << 12, (base + last + 1) << 12
        self.pgt.wrprotect(start, end - start)
        if vm.dirty_log_manual_protect_and_init_set() and self.eager_split_chunk_size:
            return self.kvm_mmu_split_huge_pages(vm, start, end)
        return None

    # ------------------------------------------------------------------ introspection

    @hookimpl
    def leaves(self, vm, start, end):
        """Every valid leaf touching [start, end) (the core's ``RadixTable.mappings``).
        Stage-2 keeps no dirty bit (DBM is never used): a writable leaf counts as dirty, as
        kvm_release_faultin_page(dirty=writable) treats it, so the core can check that every
        writable leaf of a logging slot is logged."""
        return self.pgt.rt.mappings(start, end)

    def pfn_of(self, gpa: int) -> int | None:
        """The host frame a present leaf maps ``gpa`` to (for tests and dumps)."""
        m = next(self.pgt.rt.mappings(gpa >> 12, (gpa >> 12) + 1), None)
        return None if m is None else m.pfn + ((gpa - m.gpa) >> 12)

    @hookimpl
    def page_table_bytes(self, vm):
        return self.pgt.rt.page_table_bytes()

    @hookimpl
    def check_invariants(self, vm):

        return check_vm(self, vm)


class _TlbBatch:
    """``tlb_batch``'s context: the outermost one collects the TLBIs and flushes the vCPU
    TLBs once at its end; one inside it adds to the same batch."""

    __slots__ = ("be", "outer")

    def __init__(self, be: Arm64Stage2Backend):
        self.be = be

    def __enter__(self) -> None:
        be = self.be
        self.outer = be._tlb_batch is None
        if self.outer:
            be._tlb_batch = []

    def __exit__(self, *exc) -> bool:
        if self.outer:
            be = self.be
            recs, be._tlb_batch = be._tlb_batch, None
            if recs:
                be._flush_vcpu_tlbs(recs)
        return False
