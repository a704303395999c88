"""PpcRadixBackend: the kvmcore hooks of a Book3S HV radix guest (arch/powerpc/kvm/book3s_hv.c,
book3s_64_mmu_hv.c's radix dispatch, book3s_64_mmu_radix.c).

VM options:

- ``page_size`` = 4096 or 65536: the base page, which is the host kernel's PAGE_SIZE as in
  Linux (``ArchInfo.base_page_option``), hence the PTE level's index size (9 or 5) and the
  size of a base-page leaf. Omitted, it follows the host (``VM(host=...)``); without a host,
  ``VM`` builds one of this PAGE_SIZE (a 64K radix host has a 2 MiB PMD:
  ``ArchInfo.host_pmd_sizes``); a host of another PAGE_SIZE is EINVAL.
- ``set_rc_faults`` (default False): the modelled MMU reports DSISR[SET_RC] instead of setting
  R/C itself, so the ``kvmppc_hv_handle_set_rc`` fallback runs (POWER9 sets them in hardware).
- ``huge_past_slot`` (default True, Linux): a 2M/1G leaf is chosen from the host PTE size and
  gpa/hva congruence only, so it may extend past the memslot (kvmppc_book3s_instantiate_page
  has no slot-bounds check) [quirk]; declared in ``ArchInfo.known_divergences`` against
  test_slot_smaller_than_block_maps_4k. False applies x86/arm64's whole-block-in-slot rule.
- ``unaligned_dirty_quirk`` (default True, Linux): dirty bits of a huge leaf unmapped through a
  gfn in its middle start at that gfn, as ``kvmppc_unmap_pte`` does [quirk]; False starts them
  at the leaf's first gfn.

``Mapping.raw`` (``vm.lookup`` / ``vm.mappings``) is the entry exactly as stored, i.e.
big-endian; ``pte.be64_to_cpu(m.raw)`` gives the CPU-order value the ``_PAGE_*`` names apply
to. ``tlbie_log`` records every TLB invalidation as (address, size, lpid) and ``pwc_flushes``
every page-walk-cache flush; ``warnings`` the WARNs Linux would print.

The partition PTE is built from the host Linux PTE (``host_pte.find_kvm_host_pte`` reads the
host page table), so a base-page leaf maps one host page and a 2M/1G leaf one host THP or
hugetlb block; memslot alignment to PAGE_SIZE is the core's (kvm_set_memory_region's EINVAL).

Not modelled: secure (Ultravisor) guests, nested (L2) guests and their rmap, the HPT MMU,
VPA/DTL dirty pages, DSISR BADACCESS / UNSUPP_MMU / PRTABLE_FAULT (the modelled walk never
reports them), the privileged EAA bit (decoded, not enforced: KVM copies host *user* PTEs, which
have it clear).
"""

from __future__ import annotations

import errno

import structlog
from kvmcore import ArchInfo, HwPoisonSignal, KvmError, VmOption, hookimpl
from kvmcore.arch import vm_options
from kvmcore.hookspecs import SLOT_FLUSH_LOCK_WAIT
from kvmcore.locks import WRITE, stepping
from kvmcore.memslots import dirty_logging_toggled
from kvmcore.pgtable import LEAF, STOP, TABLE_PRE, TableStore
from kvmcore.radix import RadixTable
from kvmcore.records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Translation, Violation
from kvmcore.uapi import (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MR_FLAGS_ONLY,
                          RET_PF_CONTINUE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS)

from . import book3s_64_mmu_radix as radix_mmu
from .host_pte import find_kvm_host_pte
from .pte import (_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_EXEC, _PAGE_PA_MAX, _PAGE_PRESENT, _PAGE_PTE,
                  _PAGE_READ, _PAGE_WRITE, _RPAGE_PA_MAX, DSISR_ISSTORE, DSISR_NOHPTE,
                  DSISR_PROTFAULT, DSISR_SET_RC, RADIX_DIR_BAD_BITS, be64_to_cpu, dir_nlb,
                  dir_nls, load_be64, store_be64)
from .radix import LEVEL_PGD, RADIX_PGD_INDEX_SIZE, PpcRadixFormat, partition_table_dw0

logger = structlog.get_logger(__name__)

SZ_2M = 1 << 21
SZ_1G = 1 << 30
_CAPS = frozenset({"dirty_log", "hugepage_2m", "hugepage_1g", "aging"})
_FAULT_GPA_TOP = 0xF000000000000000


_HUGE_PAST_SLOT_WHY = (
    "arch/powerpc/kvm/book3s_64_mmu_radix.c:kvmppc_book3s_instantiate_page — the leaf "
    "size comes from the host PTE size and gpa/hva congruence only, with no check that "
    "the block lies inside the memslot, so a 2M/1G leaf may map past the slot's end")
#: With ``huge_past_slot`` (Linux's behaviour, the default): the conformance test, and the
#: core's leaf check in a random race scenario (kvmcore swarm).
_HUGE_PAST_SLOT = {
    "test_slot_smaller_than_block_maps_4k": _HUGE_PAST_SLOT_WHY,
    "explore:invariant:crosses the end of slot": _HUGE_PAST_SLOT_WHY,
}


def _arch_info(page_size: int, huge_past_slot: bool = True) -> ArchInfo:
    return ArchInfo(
        name="ppc_radix",
        page_sizes=(page_size, SZ_2M, SZ_1G),
        levels=4,
        vm_types={"default": _CAPS},
        base_page_option="page_size",
        # radix-64k.h: PMD_SHIFT 21 whatever PAGE_SIZE is (4K: 2M is also PAGE_SIZE^2 / 8).
        host_pmd_sizes={65536: SZ_2M},
        # No KVM_HAVE_MMU_RWLOCK on powerpc: kvm->mmu_lock is a spinlock.
        mmu_rwlock=False,
        description="PowerPC Book3S HV partition-scoped radix (POWER9+): big-endian PTEs, "
                    "hardware R/C bits, dirty logging by C-bit harvesting",
        # arch/powerpc/kvm/powerpc.c: kvm_arch_vm_ioctl ends in -ENOTTY (Book3S HV's
        # arch_vm_ioctl too), kvm_arch_vcpu_ioctl defaults to -EINVAL.
        vm_ioctl_errno=errno.ENOTTY,
        vcpu_ioctl_errno=errno.EINVAL,
        # kvmppc_create_pte / find_kvm_host_pte check mmu_invalidate_retry (not the gfn form).
        fault_retry_gfn=False,
        # kvmppc_book3s_radix_page_fault: no slot or an INVALID one is emulated MMIO
        invalid_slot_retry=False,
        faultin_retry_unsafe=False,
        # An error pfn is -EFAULT out of KVM_RUN, without KVM_EXIT_MEMORY_FAULT.
        error_pfn_memory_fault=False,
        # kvmppc_book3s_instantiate_page: any error pfn is -EFAULT; no hwpoison signal.
        hwpoison_sigbus=False,
        known_divergences=_HUGE_PAST_SLOT if huge_past_slot else {},
    )


class PpcRadixBackend:
    """One Book3S HV radix guest's partition-scoped MMU (kvm->arch.pgtable and its lpid)."""

    arch_info = _arch_info(4096)

    OPTIONS = {
        "page_size": VmOption(4096, (4096, 65536), "the host's PAGE_SIZE (4K or 64K kernel)"),
        "set_rc_faults": VmOption(False, doc="R/C updates fault to KVM instead of hardware"),
        "huge_past_slot": VmOption(True, doc="False: the block must lie inside the memslot, "
                                   "as on x86 and arm64"),
        "unaligned_dirty_quirk": VmOption(True, doc="False: a huge leaf's dirty bits start "
                                          "at its first gfn"),
    }

    def __init__(self, vm_type: str = "default", **options):
        if vm_type != "default":
            raise KvmError(errno.EINVAL, f"vm_type {vm_type!r}: ppc_radix has only 'default'")
        opts = vm_options("ppc_radix", self.OPTIONS, options)
        page_size = opts["page_size"]
        self.fmt = PpcRadixFormat(page_size.bit_length() - 1)
        self.arch_info = _arch_info(page_size, opts["huge_past_slot"])
        self.set_rc_faults = opts["set_rc_faults"]
        self.huge_past_slot = opts["huge_past_slot"]
        self.unaligned_dirty_quirk = opts["unaligned_dirty_quirk"]
        # kvmppc_init_vm_radix: pgd_alloc; tables are aligned to their size (the NLB rule).
        self.table = RadixTable(self.fmt, TableStore(min_align=256))
        #: Stored directory entry -> the table it links (kvmppc_create_pte follows them).
        self.nlb_of = self.fmt.stored().nlb_of
        # The hardware walk of translate, bound once: every TLB miss runs it.
        self._lookup = self.table.pt.lookup
        self._shifts, self._levels = self.fmt.geometry.shifts, self.fmt.geometry.level_ids
        self.lpid = 1
        #: Every tlbie issued: (addr aligned to size, size, lpid).
        self.tlbie_log: list[tuple[int, int, int]] = []
        #: Every page-walk-cache flush (the lpid).
        self.pwc_flushes: list[int] = []
        #: WARN / WARN_ONCE messages Linux would print.
        self.warnings: list[str] = []
        #: While set, tlbies queue their vCPU-TLB flush here (book3s_64_mmu_radix.batched_tlbie).
        self.tlb_batch: list[tuple[int, int]] | None = None

    # ------------------------------------------------------------------ small services

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("ppc_radix.warn", message=message)

    @staticmethod
    def slot_logging(slot) -> bool:
        """``large_enable`` is off when the slot has KVM_MEM_LOG_DIRTY_PAGES."""
        return bool(slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @staticmethod
    def mmu_invalidate_retry(vm, mmu_seq: int) -> bool:
        """mmu_invalidate_retry(kvm, mmu_seq): an invalidation is in progress, or one
        completed since the snapshot."""
        return vm.mmu_invalidate.retry(mmu_seq)

    @property
    def partition_table_entry(self) -> tuple[int, int]:
        """(dw0, dw1) of kvmppc_setup_partition_table; dw1 (the guest process table) is 0."""
        return partition_table_dw0(self.table.pt.root), 0

    def entry(self, gpa: int) -> int:
        """The CPU-order value of the last entry a walk of ``gpa`` reads."""
        _pos, table, idx, _raw = self._lookup(gpa)
        return load_be64(table, idx << 3)[0]

    # ------------------------------------------------------------------ life cycle

    @hookimpl
    def init_vm(self, vm):
        """kvmppc_core_init_vm_hv, radix part: the tree was allocated with the backend. The
        race explorer's page-table regions are the root's entries."""
        vm.root_entry_shift = self._shifts[0]

    @hookimpl
    def flush_shadow_all(self, vm):
        """kvm_arch_flush_shadow_all is an empty inline on ppc; the tree is freed at
        kvmppc_core_destroy_vm_hv. Returning False stops the generic default."""
        return False

    # ------------------------------------------------------------------ fault path

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        """The partition-scoped walk of an H_DATA_STORAGE / H_INST_STORAGE candidate: a
        missing leaf is DSISR[NOHPTE], a permission miss DSISR[PROTFAULT], both with ISSTORE
        on stores. R and C are set by the hardware (or reported as SET_RC)."""
        gpa &= ~_FAULT_GPA_TOP
        gfn = gpa >> 12
        pos, table, idx, _raw = self._lookup(gpa)
        pte = load_be64(table, idx << 3)[0]
        write = access.write
        store = DSISR_ISSTORE if write else 0
        level = self._levels[pos]
        if (pte & (_PAGE_PRESENT | _PAGE_PTE)) != (_PAGE_PRESENT | _PAGE_PTE) or \
                level == LEVEL_PGD:
            return Violation(NOT_PRESENT, gfn, False, None, 0, DSISR_NOHPTE | store)
        size = 1 << self._shifts[pos]
        if write:
            allowed = pte & _PAGE_WRITE
        elif access.exec:
            allowed = pte & _PAGE_EXEC
        else:
            allowed = pte & (_PAGE_READ | _PAGE_WRITE)
        if not allowed:
            return Violation(PERMISSION, gfn, False, level, size, DSISR_PROTFAULT | store)
        need = _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
        if pte & need != need:
            if self.set_rc_faults:
                return Violation(ACCESS_FLAG, gfn, False, level, size, DSISR_SET_RC | store)
            pte |= need
            store_be64(table, idx << 3, pte)
        pfn = ((pte & self.fmt.rpn_mask) + (gpa & (size - 1))) >> 12      # pte_pa
        return Translation(gfn, pfn, size, True, bool(pte & _PAGE_WRITE),
                           bool(pte & _PAGE_EXEC), bool(pte & _PAGE_DIRTY))

    @hookimpl
    def fast_page_fault(self, vm, fault):
        """kvmppc_book3s_radix_page_fault step 8: with DSISR[SET_RC], OR R (and C) into a
        present leaf that allows the access, no flush, and resume without instantiating."""
        if not fault.error_code & DSISR_SET_RC:
            return None
        return self._handle_set_rc(vm, fault)

    def _handle_set_rc(self, vm, fault):
        """kvmppc_hv_handle_set_rc under kvm->mmu_lock (a flow: it waits for the lock at
        ``ppc_set_rc_lock_wait``); None when it did not fix the fault."""
        lock = vm.mmu_lock
        yield from lock.write_lock("ppc_set_rc_lock_wait")
        try:
            fixed = radix_mmu.kvmppc_hv_handle_set_rc(self, vm, fault.write, fault.gfn << 12)
        finally:
            lock.write_unlock()
        if fixed:
            vm.stats["ppc_set_rc_fixed"] += 1
            return RET_PF_FIXED
        return None

    @hookimpl(wrapper=True)
    def faultin_pfn(self, vm, fault):
        """kvmppc_book3s_instantiate_page steps 3-5: the generic __kvm_faultin_pfn (the
        core's hva -> pfn, VM_IO|VM_PFNMAP included) only faults the host page in and decides
        upgrade_write; the partition PTE is then built from the host Linux PTE, read under
        kvm->mmu_lock (a lock section of its own, before kvmppc_create_pte's).

        Any error pfn, hwpoison included, is -EFAULT (is_error_noslot_pfn): ppc sends no
        SIGBUS, unlike x86 and arm64 (kvm_send_hwpoison_signal)."""
        try:
            result = yield
        except HwPoisonSignal:
            vm.stats["hwpoison_signal"] -= 1        # counted by the core; no signal on ppc
            vm.stats["ppc_error_pfn"] += 1
            raise KvmError(errno.EFAULT, f"gpa={fault.gpa:#x}: the host page is "
                           "hardware-poisoned (an error pfn: -EFAULT)") from None
        if result not in (None, RET_PF_CONTINUE):
            return result
        return self._find_host_pte(vm, fault)

    def _find_host_pte(self, vm, fault):
        """find_kvm_host_pte under kvm->mmu_lock with the mmu_seq check, a flow that waits for
        the lock at ``ppc_host_pte_lock_wait`` (a flow that is not stepped takes a free lock
        without pausing: see kvm_page_fault). A changed seq or a missing host PTE resumes
        the guest, which re-faults (``ppc_host_pte_retry``)."""
        if stepping() or not vm.mmu_lock.try_lock(WRITE):
            return self._find_host_pte_steps(vm, fault)
        return self._find_host_pte_locked(vm, fault)

    def _find_host_pte_steps(self, vm, fault):
        yield from vm.mmu_lock.write_lock("ppc_host_pte_lock_wait")
        return self._find_host_pte_locked(vm, fault)

    def _find_host_pte_locked(self, vm, fault) -> int:
        """The lock section (kvm->mmu_lock taken, dropped here)."""
        try:
            host = find_kvm_host_pte(vm, self, fault.mmu_seq, fault.hva)
        finally:
            vm.mmu_lock.write_unlock()
        if host is None:
            vm.stats["ppc_host_pte_retry"] += 1
            return RET_PF_RETRY
        # Held from here to map_leaf, as Linux's locals are, with kvmppc_create_pte's look
        # at the tree before its lock. A flow that is not stepped lets no other flow run
        # before it takes the lock, so it looks under the lock, with the same answer.
        fault.arch = host, (radix_mmu.kvmppc_create_pte_look(self, fault.gfn << 12)
                            if stepping() else None)
        return RET_PF_CONTINUE

    @hookimpl
    def map_leaf(self, vm, fault):
        """kvmppc_book3s_instantiate_page steps 6-10 -> kvmppc_create_pte. 0 is FIXED;
        -EAGAIN (mmu_seq changed, or a huge leaf raced in where the look saw a table) and
        -ENOMEM resume the guest to re-fault."""
        arch = fault.arch
        if arch is None:
            host, look = find_kvm_host_pte(vm, self, fault.mmu_seq, fault.hva), None
            if host is None:
                return RET_PF_RETRY
        else:
            host, look = arch
        host_pte, host_shift = host
        before = self.entry(fault.gfn << 12)
        ret, _level = radix_mmu.kvmppc_book3s_instantiate_page(
            self, vm, fault, host_pte, host_shift, bool(fault.map_writable), look)
        if ret:
            return RET_PF_RETRY
        if before & _PAGE_PTE and before == self.entry(fault.gfn << 12):
            return RET_PF_SPURIOUS
        return RET_PF_FIXED

    # ------------------------------------------------------------------ zapping

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        """kvm_unmap_gfn_range_hv: each covering leaf unmapped whole, tlbie'd by ppc itself,
        so no extra flush is requested (returns False). One table: the filter is moot."""
        radix_mmu.kvm_unmap_radix(self, vm, range.slot, range.start << 12, range.end << 12)
        return False

    @hookimpl
    def flush_shadow_memslot(self, vm, slot):
        """kvmppc_core_flush_memslot_hv -> kvmppc_radix_flush_memslot (DELETE / MOVE), a
        flow: under kvm->mmu_lock (``slot_flush_lock_wait``)."""
        lock = vm.mmu_lock
        yield from lock.write_lock(SLOT_FLUSH_LOCK_WAIT)
        try:
            radix_mmu.kvmppc_radix_flush_memslot(self, vm, slot)
        finally:
            lock.write_unlock()
        return False

    # ------------------------------------------------------------------ memslots

    @hookimpl
    def prepare_memory_region(self, vm, old, new, change):
        """ppc does not select HAVE_KVM_READONLY_MEM: generic check_memory_region_flags
        refuses KVM_MEM_READONLY with EINVAL (the core does it from the capability; this is
        the backstop). Alignment to PAGE_SIZE (64K on a 64K host) is the core's check."""
        if new is not None and new.flags & KVM_MEM_READONLY:
            raise KvmError(errno.EINVAL, "flags: KVM_MEM_READONLY is not supported on ppc")

    @hookimpl
    def commit_memory_region(self, vm, old, new, change):
        """kvmppc_core_commit_memory_region_hv: toggling KVM_MEM_LOG_DIRTY_PAGES flushes the
        slot (with the old slot), on to drop huge leaves, off so they can come back."""
        if change == KVM_MR_FLAGS_ONLY and dirty_logging_toggled(old, new):
            with vm.mmu_lock:
                radix_mmu.kvmppc_radix_flush_memslot(self, vm, old)

    # ------------------------------------------------------------------ aging

    @hookimpl
    def age_gfn(self, vm, range):
        """kvm_age_gfn_hv -> kvm_age_radix: clear R only, no tlbie."""
        return radix_mmu.kvm_age_radix(self, vm, range.start << 12, range.end << 12, False)

    @hookimpl
    def test_age_gfn(self, vm, range):
        """kvm_test_age_gfn_hv -> kvm_test_age_radix."""
        return radix_mmu.kvm_age_radix(self, vm, range.start << 12, range.end << 12, True)

    # ------------------------------------------------------------------ dirty logging

    @hookimpl
    def sync_dirty_log(self, vm, slot):
        """kvm_vm_ioctl_get_dirty_log_hv: harvest and clear C into the log; the accumulator
        (unmaps, mark_page_dirty) is already in the slot's bitmap."""
        if slot.dirty_bitmap is None:
            return
        radix_mmu.kvmppc_hv_get_dirty_log_radix(self, vm, slot)

    @hookimpl
    def enable_log_dirty_pt_masked(self, vm, slot, gfn_offset, mask):
        """Nothing to re-arm: W is never removed for logging; C was cleared at harvest."""
        return None

    @hookimpl
    def dirty_pending_gfns(self, vm, slot):
        """Pages whose C bit is set in a leaf of ``slot`` (what the next harvest logs)."""
        out: list[int] = []
        lo, hi = slot.base_gfn, slot.base_gfn + slot.npages
        for m in self.table.mappings(lo, hi):
            if m.dirty:
                out.extend(range(max(m.gfn, lo), min(m.gfn + m.npages, hi)))
        return out

    # ------------------------------------------------------------------ introspection

    @hookimpl
    def leaves(self, vm, start, end):
        return self.table.mappings(start, end)

    @hookimpl
    def page_table_bytes(self, vm):
        return self.table.page_table_bytes()

    @hookimpl
    def check_invariants(self, vm):
        return check_radix_invariants(self, vm)


def check_radix_invariants(be: PpcRadixBackend, vm) -> list[str]:
    """The ppc-radix invariants of the reference (§9) that hold of a state: the format's
    (``RadixTable.check``: table links, no leaked table (15), leaves only at PTE/PMD/PUD level
    and aligned (1, 7)), then the geometry (1), directory entries (2), X on every leaf (3),
    52-bit RPNs (7), base pages only while logging (6), leaves only over memslots (19)."""
    t, fmt = be.table, be.fmt
    store = t.store
    problems = t.check("ppc_radix")
    if len(store[t.pt.root]) != 1 << RADIX_PGD_INDEX_SIZE:
        problems.append(f"ppc_radix: root table has {len(store[t.pt.root])} entries, "
                        "not 8192 (RADIX_PGD_INDEX_SIZE 13)")
    seen_tables = set()

    def visit(ctx):
        pte = be64_to_cpu(ctx.pte)
        where = f"gpa {ctx.addr:#x} (level {ctx.level})"
        if ctx.flags == TABLE_PRE:
            nlb, nls = dir_nlb(pte), dir_nls(pte)
            want_nls = fmt.index_sizes[ctx.pos + 1]
            if pte & RADIX_DIR_BAD_BITS:
                problems.append(f"ppc_radix: directory entry at {where} has bad bits "
                                f"{pte & RADIX_DIR_BAD_BITS:#x}")
            if nls != want_nls:
                problems.append(f"ppc_radix: directory entry at {where} has NLS {nls}, "
                                f"the next level indexes {want_nls} bits")
            if nlb & ((1 << (want_nls + 3)) - 1):
                problems.append(f"ppc_radix: directory entry at {where} points to {nlb:#x}, "
                                "not aligned to the table size")
            if nlb not in store:
                return STOP                 # a broken link: RadixTable.check reports it
            if nlb in seen_tables:
                problems.append(f"ppc_radix: table {nlb:#x} is linked twice")
            seen_tables.add(nlb)
            return None
        if not pte & _PAGE_PTE:             # only a PTE-level entry is a leaf without L
            problems.append(f"ppc_radix: PTE-level entry at {where} lacks the L bit")
            return None
        if not pte & _PAGE_EXEC:
            problems.append(f"ppc_radix: leaf at {where} lacks X (every KVM leaf has X=1)")
        if pte & (((1 << _RPAGE_PA_MAX) - 1) & ~((1 << _PAGE_PA_MAX) - 1)):
            problems.append(f"ppc_radix: leaf at {where} has an RPN beyond 52 bits")
        slot = _slot_of(vm, ctx.addr >> 12, (ctx.addr + ctx.size) >> 12)
        if slot is None:
            problems.append(f"ppc_radix: leaf at {where} maps a gpa with no memslot")
        elif ctx.size > fmt.page_size and slot.flags & KVM_MEM_LOG_DIRTY_PAGES and \
                not vm.slots_lock.held:
            # (A memslot update publishes the logging slot before its commit flushes it.)
            problems.append(f"ppc_radix: {ctx.size:#x} leaf at {where} in dirty-logging slot "
                            f"{slot.id} (only base pages while logging)")
        return None

    t.pt.walk(0, 1 << fmt.geometry.ia_bits, visit, LEAF | TABLE_PRE)
    return problems


def _slot_of(vm, start: int, end: int):
    """A live memslot of address space 0 that intersects ``[start, end)``."""
    slot = vm.gfn_to_memslot(start)
    if slot is not None:
        return slot
    return next(vm.memslot_sets[0].in_gfn_range(start, end), None)
