"""``RiscvGstageBackend``: RISC-V G-stage translation as Linux's arch/riscv/kvm/mmu.c and
gstage.c drive it (docs/arch/riscv_gstage.md).

VM options: ``mode`` ``"sv39x4"`` (default), ``"sv48x4"`` or ``"sv57x4"`` — the HGATP mode,
which Linux probes once at boot (kvm_riscv_gstage_mode_detect) and a VM takes as its
pgd_levels; ``svadu`` (default False): the hardware sets A and D (Svadu) instead of raising a
guest page fault on an entry without them; ``eager_page_split`` (default True): mmu.c's
module parameter.

What the core does for it: the walks (``kvmcore.radix``: write-protect, split, leaves,
invariants), the size policy (``radix.mapping_size``) and dirty logging by write protection
(``radix.WriteProtectDirtyLog``). What is RISC-V's and written here: the format
(``gstage``), the memslot checks, kvm_riscv_mmu_map / kvm_riscv_gstage_map_page, whose
permission update *replaces* a same-frame leaf's permissions — the divergences
``ArchInfo.known_divergences`` declares — and aging, which looks at the one leaf at the
range's start (kvm_age_gfn).
"""

from __future__ import annotations

import errno

import attrs
import structlog
from kvmcore import ArchInfo, KvmError, VmOption, hookimpl
from kvmcore.locks import WRITE, stepping
from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X, RadixBackend, Span, \
    mapping_size
from kvmcore.records import NOT_PRESENT, Violation
from kvmcore.uapi import (KVM_MEM_LOG_DIRTY_PAGES, KVM_MR_CREATE, KVM_MR_FLAGS_ONLY,
                          KVM_MR_MOVE, RET_PF_FIXED, SZ_1G, SZ_2M, SZ_4K)

from .gstage import GstageFormat, kvm_riscv_gstage_gpa_bits

logger = structlog.get_logger(__name__)

#: kvm_riscv_gstage_unmap_range's cond_resched_rwlock_write after each leaf of a may_block
#: unmap: the write lock is dropped and taken again.
RISCV_UNMAP_RESCHED = "riscv_unmap_resched"
#: vm.stats key: kvm_age_gfn / kvm_test_age_gfn's WARN_ON, a range that is not one PAGE_SIZE,
#: PMD_SIZE or PUD_SIZE.
RISCV_AGE_RANGE_WARN = "riscv_age_range_warn"
#: vm.stats key: kvm_riscv_gstage_unmap_range skipped a leaf the range does not hold from
#: its start (a WARN_ONCE in the newest gstage.c).
RISCV_UNMAP_SKIP = "riscv_unmap_skip"
#: HGATP.MODE -> pgd_levels (kvm_riscv_gstage_mode).
MODES = {"sv39x4": 3, "sv48x4": 4, "sv57x4": 5}
SIZES = (SZ_4K, SZ_2M, SZ_1G)
#: KVM_CHECK_EXTENSION on riscv (vm.c kvm_vm_ioctl_check_extension, Kconfig): read-only
#: memory, dirty logging with manual protect (KVM_GENERIC_DIRTYLOG_READ_PROTECT), the dirty
#: ring (HAVE_KVM_DIRTY_RING_ACQ_REL); no guest_memfd, no memory attributes, no pre-fault.
CAPS = frozenset({"readonly_mem", "dirty_log", "manual_dirty_protect", "initially_set",
                  "dirty_ring", "hugepage_2m", "hugepage_1g", "aging"})

_EPERM_WHY = ("arch/riscv/kvm/mmu.c:kvm_arch_prepare_memory_region — a memslot without "
              "KVM_MEM_READONLY over a VMA without VM_WRITE is refused with -EPERM; the "
              "other architectures accept it and map the pages read-only")
_DOWNGRADE_WHY = (
    "arch/riscv/kvm/gstage.c:kvm_riscv_gstage_map_page — a fault that finds a leaf of the "
    "same frame calls kvm_riscv_gstage_update_pte_prot, which replaces the permissions: a "
    "read fault in a logging slot that lost the race installs PAGE_READ_EXEC over the W "
    "another vCPU's write fault set (arm64 keeps permissions since 2020: relax_perms never "
    "removes one); the next write faults and is logged again")
KNOWN_DIVERGENCES = {
    "test_read_and_write_fault_end_writable_while_logging": _DOWNGRADE_WHY,
    # The explorer's no-downgrade oracle finds the same interleaving (seed 5).
    "test_race_scenario_is_clean_in_every_interleaving[two_faults_one_entry]": _DOWNGRADE_WHY,
    "test_host_readonly_mapping_never_writable": _EPERM_WHY,
    "test_write_to_readonly_host_mapping_exits": _EPERM_WHY,
    "test_pfnmap_readonly_pte_not_writable": _EPERM_WHY,
    # The state machine's memslot steps over a range host_mprotect made read-only.
    "state_machine:toggle_logging:EPERM": _EPERM_WHY,
    "state_machine:move_slot:EPERM": _EPERM_WHY,
}


def _arch_info(pgd_levels: int) -> ArchInfo:
    return ArchInfo(
        name="riscv_gstage", page_sizes=SIZES, levels=pgd_levels,
        vm_types={"default": CAPS},
        description=f"RISC-V G-stage (Sv{9 * pgd_levels + 12}x4): 16 KiB root, leaves "
                    "V|A|U|R|X[|W] with D preset, write-protection dirty logging",
        # kvm->mmu_lock is an rwlock, but every holder on riscv takes it for write
        # (kvm_riscv_mmu_map included), so faults exclude each other as with a spinlock.
        mmu_rwlock=False,
        # vm.c kvm_arch_vm_ioctl and vcpu.c kvm_arch_vcpu_ioctl default to -EINVAL.
        vm_ioctl_errno=errno.EINVAL, vcpu_ioctl_errno=errno.EINVAL,
        # kvm_riscv_mmu_map checks mmu_invalidate_retry: any invalidation retries.
        fault_retry_gfn=False,
        # kvm_riscv_gstage_page_fault: a missing or INVALID slot has no hva, the access is MMIO
        invalid_slot_retry=False,
        faultin_retry_unsafe=False,
        # kvm_riscv_mmu_map: kvm_send_hwpoison_signal(hva, vma_pageshift).
        hwpoison_lsb_vma=True,
        known_divergences=KNOWN_DIVERGENCES)


class RiscvGstageBackend(RadixBackend):
    """One VM's G-stage (kvm->arch.pgd) and the hooks of arch/riscv/kvm/mmu.c."""

    arch_info = _arch_info(3)
    OPTIONS = {"mode": VmOption("sv39x4", tuple(MODES)), "svadu": VmOption(False, (False, True)),
               "eager_page_split": VmOption(True, (True, False))}
    #: kvm_riscv_gstage_unmap_range clears leaves only: tables stay until the VM dies.
    free_tables = False

    def __init__(self, vm_type: str = "default", **options):
        super().__init__(vm_type, **options)
        self.pgd_levels = MODES[self.mode]
        self.arch_info = attrs.evolve(_arch_info(self.pgd_levels))
        self.hw_ad = self.svadu
        self.eager_split = self.eager_page_split
        self.gpa_bits = kvm_riscv_gstage_gpa_bits(self.pgd_levels)
        #: WARN / WARN_ONCE messages Linux would print.
        self.warnings: list[str] = []

    def make_format(self) -> GstageFormat:
        return GstageFormat(self.pgd_levels)

    def warn(self, vm, stat: str, message: str, once: bool = False) -> None:
        """A WARN Linux would print: counted in ``vm.stats[stat]``, kept in ``warnings`` and
        logged (a WARN_ONCE, ``once``, only the first time it is counted); the model goes
        on, as the kernel does."""
        vm.stats[stat] += 1
        if once and vm.stats[stat] > 1:
            return
        self.warnings.append(message)
        logger.warning("riscv_gstage.warn", message=message)

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        """The G-stage walk; a gpa beyond the mode's bits is a guest page fault."""
        if gpa >> self.gpa_bits:
            return Violation(NOT_PRESENT, gpa >> 12)
        return self.tables[vcpu.as_id].translate(gpa, access, self.hw_ad)

    @hookimpl
    def prepare_memory_region(self, vm, old, new, change):
        """kvm_arch_prepare_memory_region: -EFAULT for a slot reaching the end of the gpa
        space; then each VMA under it: -EPERM when the slot is writable and the VMA is not,
        -EINVAL for dirty logging on VM_PFNMAP."""
        if change not in (KVM_MR_CREATE, KVM_MR_MOVE, KVM_MR_FLAGS_ONLY) or new is None:
            return
        if new.base_gfn + new.npages >= (1 << self.gpa_bits) >> 12:
            raise KvmError(errno.EFAULT, f"guest_phys_addr+memory_size="
                           f"{new.end_gfn << 12:#x}: beyond the {self.gpa_bits}-bit gpa space "
                           f"of {self.mode}")
        writable = not new.readonly
        for vma in vm.host.vmas_in(new.userspace_addr,
                                   new.userspace_addr + (new.npages << 12)):
            if writable and "w" not in vma.prot:
                raise KvmError(errno.EPERM, f"userspace_addr: the VMA at {vma.start:#x} is "
                               "not writable and the slot is not KVM_MEM_READONLY")
            if vma.io_pfnmap and new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                raise KvmError(errno.EINVAL, f"flags: KVM_MEM_LOG_DIRTY_PAGES on a "
                               f"VM_PFNMAP range (hva {vma.start:#x})")

    @hookimpl
    def map_leaf(self, vm, fault):
        """kvm_riscv_mmu_map under kvm->mmu_lock: base pages while logging or for PFNMAP,
        hugetlb falling through PUD -> PMD, THP to PMD; a read fault in a logging slot maps
        read-only; the gfn is marked dirty before a writable mapping."""
        logging = self.logging(fault.slot)
        size = mapping_size(vm, fault, SIZES, logging)
        writable = self.writable(fault)
        if writable:
            vm.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        return self.kvm_riscv_gstage_map_page(vm, fault, size, writable)

    def kvm_riscv_gstage_map_page(self, vm, fault, size: int, writable: bool) -> int:
        """Three cases on the leaf found at the gpa: a bigger one is split down to ``size``
        (dirty logging on a block) and then replaced; one of the same frame (``size``
        aligned) gets the new permissions in place, whatever its size; otherwise the new
        leaf is set (kvm_riscv_gstage_set_pte). Leaves are V|A|U|R|X[|W] with D preset
        (pte_mkdirty): A and D never fault on a fresh mapping."""
        t = self.tables[fault.as_id]
        level = t.level_of[size]
        hpa = (fault.pfn << 12) - (fault.gpa & (size - 1))
        prot = PERM_R | PERM_X | PERM_A | PERM_D | (PERM_W if writable else 0)
        leaf = t.get_leaf(fault.gpa)
        if leaf is not None:
            found, table, idx, pte = leaf
            if found > level:
                t.split(fault.gpa, fault.gpa + 1, level).flush(vm)
            elif t.fmt.output_address(pte, found) & ~(size - 1) == hpa:
                return self.kvm_riscv_gstage_update_pte_prot(vm, t, found, fault.gpa, table,
                                                             idx, pte, prot)
        t.map(fault.gpa, level, t.fmt.make_leaf(hpa, level, prot)).flush(vm)
        return RET_PF_FIXED

    def kvm_riscv_gstage_update_pte_prot(self, vm, t, level, gpa, table, idx, pte,
                                         prot) -> int:
        """Replace the leaf's permissions by ``prot`` (keeping its frame), D preset; flush
        the leaf if it changed. Replace, not add: W goes away on a read fault."""
        new = t.fmt.with_perms(pte, prot)
        if new != pte:
            table[idx] = new
            size = t.size[level]
            vm.flush_remote_tlbs_range((gpa & ~(size - 1)) >> 12, size >> 12)
        return RET_PF_FIXED

    @hookimpl
    def age_gfn(self, vm, range):
        """kvm_age_gfn: ptep_test_and_clear_young on the one leaf that maps ``range.start``
        (kvm_riscv_gstage_get_leaf), whatever the range's length. Linux relies on its
        callers asking about one host mapping at a time — a page, a PMD or a PUD
        (``HostMemory.age``) — and WARNs on any other length; the model records that WARN
        (``warn``) and goes on. So a huge host page over small leaves (a THP under dirty
        logging's 4 KiB leaves) has only its first leaf aged, and none when that page is
        not mapped: a Linux quirk the other architectures, which walk the whole range, do
        not share. No flush (the notifier decides)."""
        t = self.tables[range.as_id]
        ptep = self._age_leaf(vm, t, range, "kvm_age_gfn")
        if ptep is None:
            return False
        table, idx, pte = ptep
        if not pte & t.fmt.A:
            return False
        table[idx] = t.st(pte & ~t.fmt.A)
        return True

    @hookimpl
    def test_age_gfn(self, vm, range):
        """kvm_test_age_gfn: pte_young of the leaf that maps ``range.start``, with
        kvm_age_gfn's WARN; nothing changes."""
        t = self.tables[range.as_id]
        ptep = self._age_leaf(vm, t, range, "kvm_test_age_gfn")
        return ptep is not None and bool(ptep[2] & t.fmt.A)

    def _age_leaf(self, vm, t, range, caller: str):
        """The aging hooks' common start: the WARN_ON on the range's length, then
        kvm_riscv_gstage_get_leaf at ``range.start``: ``(table, index, pte)`` or None."""
        size = range.npages << 12
        if size not in SIZES:
            self.warn(vm, RISCV_AGE_RANGE_WARN,
                      f"{caller}: gfns [{range.start:#x}, {range.end:#x}) are {size:#x} bytes, "
                      "not one PAGE_SIZE, PMD_SIZE or PUD_SIZE")
        leaf = t.get_leaf(range.start << 12)
        if leaf is None:
            return None
        _level, table, idx, pte = leaf
        return table, idx, pte

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        """kvm_unmap_gfn_range -> kvm_riscv_gstage_unmap_range over the range; with
        ``range.may_block``, the write lock is dropped between two leaves
        (``riscv_unmap_resched``), so a stepped unmap is a flow. Each leaf cleared is
        flushed (kvm_riscv_gstage_op_pte's hfence; the model flushes what one pass cleared
        at once): nothing is left for the caller to flush."""
        t = self.tables[range.as_id]
        if range.may_block and stepping():
            return self._unmap_resched(vm, t, range.start << 12, range.end << 12)
        self.kvm_riscv_gstage_unmap_range(vm, t, range.start << 12, range.end << 12)
        return False

    def kvm_riscv_gstage_unmap_range(self, vm, t, start: int, end: int) -> None:
        """Clear the leaves of ``[start, end)`` as Linux's walk does. ``addr`` goes from
        ``start``; the leaf mapping ``addr`` (kvm_riscv_gstage_get_leaf) is cleared only if
        ``addr`` is its start and the leaf ends inside the range; otherwise it is skipped
        — not split, not cleared; a WARN_ONCE in the newest gstage.c, counted here as
        ``riscv_unmap_skip`` — and either way ``addr`` advances by the leaf's size. A walk
        that starts inside a huge leaf therefore stays off alignment: it skips later leaves
        too and never looks at those it steps over, until an empty entry brings it back in
        line (the newest gstage.c aligns ``addr`` up to the empty entry's end; the
        6.18-era one added the entry's size, unaligned, which can step over leaves as
        well). A Linux quirk, harmless for Linux's callers: the primary MMU notifies a huge
        page's whole range (it splits first: __split_huge_pmd), memory failure too
        (``HostMemory.memory_failure``), and a memslot holds its huge leaves whole
        (fault_supports_gstage_huge_mapping).

        The model visits the present leaves in order instead of stepping through empty
        entries: the addresses Linux's steps land on are the same (past an empty entry the
        next leaf is reached at its start)."""
        span = Span()
        addr = start
        for leaf in t.pt.iter_present(start, end, leaves_only=True):
            if leaf[3] + (1 << t.g.shifts[leaf[2]]) <= addr:
                continue                  # stepped over by an off-alignment stride
            addr = self._unmap_leaf(vm, t, addr, end, leaf, span)
            if addr >= end:
                break
        span.flush(vm)

    def _unmap_resched(self, vm, t, addr: int, end: int):
        """kvm_riscv_gstage_unmap_range with may_block: cond_resched_rwlock_write between
        two leaves. Each leaf is found again from ``addr`` after the lock was dropped."""
        while (leaf := next(t.pt.iter_present(addr, end, leaves_only=True), None)) \
                is not None:
            span = Span()
            addr = self._unmap_leaf(vm, t, addr, end, leaf, span)
            span.flush(vm)
            if addr >= end or next(t.pt.iter_present(addr, end, leaves_only=True),
                                   None) is None:
                break
            vm.stats["riscv_unmap_resched"] += 1
            yield from vm.mmu_lock.cond_resched(WRITE, RISCV_UNMAP_RESCHED)
        return False

    def _unmap_leaf(self, vm, t, addr: int, end: int, leaf, span: Span) -> int:
        """One step of kvm_riscv_gstage_unmap_range on ``leaf`` (``iter_present``'s
        ``(table, index, pos, leaf_addr, raw)``), the first leaf touching ``[addr, end)``:
        GSTAGE_OP_CLEAR if the walk is at its start and it fits, else the skip. Returns the
        next ``addr``."""
        table, idx, pos, start, _raw = leaf
        size = 1 << t.g.shifts[pos]
        if start > addr:
            addr = start                  # the empty entries before it, stepped over
        if addr == start and end - addr >= size:
            table[idx] = t.st(t.fmt.empty)
            span.add(start, size)
        else:
            self.warn(vm, RISCV_UNMAP_SKIP,
                      f"kvm_riscv_gstage_unmap_range: the {size:#x} leaf at {start:#x} is "
                      f"skipped (walk at {addr:#x}, range end {end:#x})", once=True)
        return addr + size
