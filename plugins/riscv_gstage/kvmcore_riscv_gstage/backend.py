"""``RiscvGstageBackend``: RISC-V G-stage translation as Linux 6.18's arch/riscv/kvm/mmu.c and
gstage.c drive it (docs/arch/riscv_gstage.md).

VM options: ``mode`` ``"sv39x4"`` (default), ``"sv48x4"`` or ``"sv57x4"`` — the HGATP mode,
which Linux probes once at boot (kvm_riscv_gstage_mode_detect) and every VM uses; ``svadu``
(default False): the hardware sets A and D (Svadu) instead of raising a guest page fault on
an entry without them. The default is 6.18; each of the other options, off by default,
turns on one later kernel's behaviour and is named after the Linux change that brought it:
``transparent_hugepage`` (ed7ae7a34bea "RISC-V: KVM: Transparent huge page support",
7.0), ``split_huge_on_fault`` (6ad36f39a769 "RISC-V: KVM: Split huge pages during fault
handling for dirty logging", 2026), ``eager_page_split`` (mmu.c's module parameter of the
2026 eager-splitting series), ``dirty_log_initially_set`` (df60cb2e6702 "KVM: riscv:
Support enabling dirty log gradually in small chunks", 6.19), ``wp_whole_leaves``
(a216e24fc947 "RISC-V: KVM: Fix lost write protection on huge pages during dirty logging",
2026), ``unmap_aligned_steps`` (the
unmap walk aligns up past an empty entry, as mainline's gstage.c does in a tree that has
6ad36f39a769 and a216e24fc947 (torvalds/linux 1b5ea65ffde7, read); the commit that changed it
is not identified: a text read earlier, with a216e24fc947, still stepped unaligned).

What the core does for it: the walks (``kvmcore.radix``: write-protect, split, leaves,
invariants), the hugetlb size policy (``radix.mapping_size``) and dirty logging by write
protection (``radix.WriteProtectDirtyLog``). What is RISC-V's and written here: the format
(``gstage``), the memslot checks, kvm_riscv_mmu_map and kvm_riscv_gstage_map_page /
kvm_riscv_gstage_set_pte — which store the fault's whole new PTE over the leaf of its level,
so a late read fault takes W away (the divergence ``ArchInfo.known_divergences`` declares),
and fail with -EEXIST out of KVM_RUN when the walk meets a bigger leaf — the unmap and the
dirty-log re-protection walks (kvm_riscv_gstage_unmap_range, kvm_riscv_gstage_wp_range), and
aging, which looks at the one leaf at the range's start (kvm_age_gfn).
"""

from __future__ import annotations

import errno

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

#: kvm_riscv_gstage_unmap_range's cond_resched_lock (6.18: kvm->mmu_lock is a spinlock) after
#: each leaf of a may_block unmap: the lock is dropped and taken again.
RISCV_UNMAP_RESCHED = "riscv_unmap_resched"
#: vm.stats key: kvm_age_gfn / kvm_test_age_gfn's WARN_ON, a range that is not one PAGE_SIZE,
#: PMD_SIZE or PUD_SIZE.
RISCV_AGE_RANGE_WARN = "riscv_age_range_warn"
#: vm.stats key: kvm_riscv_gstage_unmap_range skipped a leaf the range does not hold from
#: its start (silently in 6.18; a WARN_ONCE in later kernels).
RISCV_UNMAP_SKIP = "riscv_unmap_skip"
#: HGATP.MODE -> pgd_levels (kvm_riscv_gstage_mode).
MODES = {"sv39x4": 3, "sv48x4": 4, "sv57x4": 5}
SIZES = (SZ_4K, SZ_2M, SZ_1G)
#: KVM_CHECK_EXTENSION on riscv in 6.18 (vm.c kvm_vm_ioctl_check_extension, Kconfig):
#: read-only memory, dirty logging with manual protect (KVM_GENERIC_DIRTYLOG_READ_PROTECT;
#: KVM_DIRTY_LOG_MANUAL_CAPS is the generic default, PROTECT_ENABLE alone: riscv's
#: kvm_host.h defines it with INITIALLY_SET from 6.19), the dirty ring
#: (HAVE_KVM_DIRTY_RING_ACQ_REL, 6.17); no guest_memfd, no memory attributes, no pre-fault.
CAPS = frozenset({"readonly_mem", "dirty_log", "manual_dirty_protect", "dirty_ring",
                  "hugepage_2m", "hugepage_1g", "aging"})

_EPERM_WHY = ("arch/riscv/kvm/mmu.c:kvm_arch_prepare_memory_region (6.18 and later) — a "
              "memslot without "
              "KVM_MEM_READONLY over a VMA without VM_WRITE is refused with -EPERM; the "
              "other architectures accept it and map the pages read-only")
_DOWNGRADE_WHY = (
    "arch/riscv/kvm/gstage.c:kvm_riscv_gstage_set_pte (6.18, from kvm_riscv_gstage_map_page) "
    "— a fault stores its whole new PTE over the leaf it finds at its level: a read fault in "
    "a logging slot that lost the race stores pte_mkdirty(pfn_pte(pfn, PAGE_READ_EXEC)) over "
    "the W another vCPU's write fault set (arm64 keeps permissions since 2020: relax_perms "
    "never removes one); the next write faults and is logged again. Later kernels keep the "
    "divergence: their kvm_riscv_gstage_update_pte_prot replaces the permissions too")
_NO_THP_WHY = (
    "arch/riscv/kvm/mmu.c:kvm_riscv_mmu_map (6.18) — no transparent_hugepage_adjust: only a "
    "hugetlb VMA's page size maps a block, anything else PAGE_SIZE, so a THP the host maps "
    "with a PMD gets 4 KiB G-stage leaves (THP blocks came in 7.0, ed7ae7a34bea; the VM "
    "option transparent_hugepage)")
_EEXIST_WHY = (
    "arch/riscv/kvm/gstage.c:kvm_riscv_gstage_set_pte (6.18, from kvm_riscv_gstage_map_page) "
    "— enabling logging write-protects the block and splits nothing; the logged write maps "
    "PAGE_SIZE and its walk meets the 2 MiB leaf: -EEXIST, which kvm_riscv_mmu_map and "
    "vcpu_exit.c:gstage_page_fault return out of KVM_RUN (splitting on the fault came in "
    "2026, 6ad36f39a769; the VM option split_huge_on_fault)")
#: Gone with the VM option that brings the later behaviour (``_divergences``).
_THP_TESTS = ("test_thp_maps_pmd", "test_partial_munmap_of_thp_zaps_huge_leaf",
              "test_thp_split_zaps_huge_leaf")
_EEXIST_TEST = "test_enabling_logging_splits_writes"
KNOWN_DIVERGENCES = {
    **dict.fromkeys(_THP_TESTS, _NO_THP_WHY),
    _EEXIST_TEST: _EEXIST_WHY,
    "test_read_and_write_fault_end_writable_while_logging": _DOWNGRADE_WHY,
    # The explorer's no-downgrade oracle finds the same interleaving (seed 5).
    "test_race_scenario_is_clean_in_every_interleaving[two_faults_one_entry]": _DOWNGRADE_WHY,
    # ... and in any scenario where two vCPUs fault on one gfn (kvmcore swarm).
    "explore:downgrade": _DOWNGRADE_WHY,
    "test_host_readonly_mapping_never_writable": _EPERM_WHY,
    "test_write_to_readonly_host_mapping_exits": _EPERM_WHY,
    "test_pfnmap_readonly_pte_not_writable": _EPERM_WHY,
    # The state machine's memslot steps over a range host_mprotect made read-only.
    "state_machine:toggle_logging:EPERM": _EPERM_WHY,
    "state_machine:move_slot:EPERM": _EPERM_WHY,
}


def _divergences(thp: bool, splits: bool) -> dict[str, str]:
    """KNOWN_DIVERGENCES less those a later kernel's behaviour, turned on, does away with:
    THP blocks; a block split before the logged write meets it (on the fault or eagerly)."""
    gone = (_THP_TESTS if thp else ()) + ((_EEXIST_TEST,) if splits else ())
    return {k: v for k, v in KNOWN_DIVERGENCES.items() if k not in gone}


def _arch_info(pgd_levels: int, caps: frozenset = CAPS,
               divergences: dict | None = None) -> ArchInfo:
    return ArchInfo(
        name="riscv_gstage", page_sizes=SIZES, levels=pgd_levels,
        vm_types={"default": caps},
        description=f"RISC-V G-stage (Sv{9 * pgd_levels + 12}x4): 16 KiB root, leaves "
                    "V|A|U|R|X[|W] with D preset, write-protection dirty logging",
        # 6.18: no KVM_HAVE_MMU_RWLOCK in asm/kvm_host.h, kvm->mmu_lock is a spinlock
        # (spin_lock in mmu.c, cond_resched_lock in gstage.c): every holder excludes the others.
        mmu_rwlock=False,
        # vm.c kvm_arch_vm_ioctl and vcpu.c kvm_arch_vcpu_ioctl default to -EINVAL.
        vm_ioctl_errno=errno.EINVAL, vcpu_ioctl_errno=errno.EINVAL,
        # kvm_riscv_mmu_map checks mmu_invalidate_retry: any invalidation retries.
        fault_retry_gfn=False,
        # vcpu_exit.c gstage_page_fault: a missing or INVALID slot has no hva: MMIO.
        invalid_slot_retry=False,
        faultin_retry_unsafe=False,
        # An error pfn is -EFAULT out of KVM_RUN, without KVM_EXIT_MEMORY_FAULT.
        error_pfn_memory_fault=False,
        # kvm_riscv_mmu_map: send_sig_mceerr(BUS_MCEERR_AR, hva, vma_pageshift).
        hwpoison_lsb_vma=True,
        known_divergences=KNOWN_DIVERGENCES if divergences is None else divergences)


class RiscvGstageBackend(RadixBackend):
    """One VM's G-stage (kvm->arch.pgd) and the hooks of arch/riscv/kvm/mmu.c."""

    arch_info = _arch_info(3)
    OPTIONS = {
        "mode": VmOption("sv39x4", tuple(MODES)),
        "svadu": VmOption(False, (False, True)),
        # Later kernels, off by default (the model is 6.18): see the module's docstring.
        "transparent_hugepage": VmOption(False, (False, True), "7.0: THP-backed memory "
                                         "mapped with 2 MiB leaves"),
        "split_huge_on_fault": VmOption(False, (False, True), "2026: a fault splits a "
                                        "bigger leaf and updates a same-frame one in place"),
        "eager_page_split": VmOption(False, (False, True), "2026: enabling dirty logging "
                                     "splits the slot's blocks"),
        "dirty_log_initially_set": VmOption(False, (False, True), "6.19: "
                                            "KVM_DIRTY_LOG_INITIALLY_SET"),
        "unmap_aligned_steps": VmOption(False, (False, True), "newest: the unmap walk "
                                        "aligns up past an empty entry"),
        "wp_whole_leaves": VmOption(False, (False, True), "2026: the write-protect walk "
                                    "protects a leaf it reaches inside whole"),
    }
    #: kvm_riscv_gstage_unmap_range clears leaves only: tables stay until the VM dies.
    free_tables = False

    def __init__(self, vm_type: str = "default", **options):
        super().__init__(vm_type, **options)
        self.pgd_levels = MODES[self.mode]
        caps = (CAPS | {"initially_set"}) if self.dirty_log_initially_set else CAPS
        self.arch_info = _arch_info(self.pgd_levels, caps, _divergences(
            self.transparent_hugepage, self.split_huge_on_fault or self.eager_page_split))
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

    @staticmethod
    def logging(slot) -> bool:
        """6.18's kvm_riscv_mmu_map: ``memslot->dirty_bitmap && !KVM_MEM_READONLY`` — the
        bitmap, not the LOG_DIRTY_PAGES flag, so with the dirty ring alone (riscv has no
        bitmap beside it) the fault path does not log: blocks stay allowed and read faults map
        writable, marking the gfn dirty. The newest mmu.c tests kvm_slot_dirty_track_enabled
        instead; the change was not identified, so no option has it."""
        return slot.logging

    @hookimpl
    def map_leaf(self, vm, fault):
        """kvm_riscv_mmu_map under kvm->mmu_lock (6.18): base pages while logging or for
        VM_PFNMAP; a hugetlb VMA's page size; anything else PAGE_SIZE — THP-backed memory
        included (``transparent_hugepage``: 7.0's transparent_hugepage_adjust maps a PMD). A
        read fault in a logging slot maps read-only; the gfn (a hugetlb block's first) is
        marked dirty before a writable mapping is attempted, whatever comes of it.

        Simplified: 6.18 takes the hugetlb page size as it is; a slot whose gpa and hva are
        not congruent modulo it, or that ends inside one, gets a block mapping pages that are
        not the slot's (later kernels fall back with fault_supports_gstage_huge_mapping). The
        model falls back as they do (``mapping_size``) rather than map the wrong pages."""
        logging = self.logging(fault.slot)
        vma = fault.host_vma
        hugetlb = vma is not None and vma.kind.startswith("hugetlb")
        size = mapping_size(vm, fault, SIZES, logging) if hugetlb or \
            self.transparent_hugepage else SZ_4K
        # A hugetlb block's gfn is its first (the ALIGN_DOWN before __kvm_faultin_pfn): the
        # one marked dirty. THP's adjustment comes later and leaves the gfn as it is.
        gfn = fault.gfn & ~((size >> 12) - 1) if hugetlb else fault.gfn
        writable = self.writable(fault)
        if writable:
            vm.mark_page_dirty_in_slot(fault.slot, gfn)
        return self.kvm_riscv_gstage_map_page(vm, fault, size, writable)

    def kvm_riscv_gstage_map_page(self, vm, fault, size: int, writable: bool) -> int:
        """The leaf: V|A|U|R|X[|W] with D preset (pte_mkdirty), so A and D never fault on a
        fresh mapping, handed to kvm_riscv_gstage_set_pte (6.18). With
        ``split_huge_on_fault`` (2026), the leaf found at the gpa is looked at first: a
        bigger one is split down to ``size`` (dirty logging on a block) and then replaced;
        one of the same frame (``size`` aligned) gets the new permissions in place, whatever
        its size (kvm_riscv_gstage_update_pte_prot)."""
        t = self.tables[fault.as_id]
        level = t.level_of[size]
        hpa = (fault.pfn << 12) - (fault.gpa & (size - 1))
        prot = PERM_R | PERM_X | PERM_A | PERM_D | (PERM_W if writable else 0)
        if self.split_huge_on_fault:
            leaf = t.get_leaf(fault.gpa)
            if leaf is not None:
                found, table, idx, pte = leaf
                if found > level:
                    t.split(fault.gpa, fault.gpa + 1, level).flush(vm)
                elif t.fmt.output_address(pte, found) & ~(size - 1) == hpa:
                    return self.kvm_riscv_gstage_update_pte_prot(vm, t, found, fault.gpa,
                                                                 table, idx, pte, prot)
        return self.kvm_riscv_gstage_set_pte(vm, t, fault.gpa, level,
                                             t.fmt.make_leaf(hpa, level, prot))

    def kvm_riscv_gstage_set_pte(self, vm, t, gpa: int, level: int, pte: int) -> int:
        """Walk down to ``level``, allocating tables; a leaf on the way (a bigger mapping,
        the block dirty logging left in place) is -EEXIST, which kvm_riscv_mmu_map and
        gstage_page_fault return out of KVM_RUN: the access raises that KvmError. At
        ``level`` the entry is overwritten when it differs, and flushed: a leaf whatever its
        frame or permissions, or a table (a block where 4 KiB leaves were: Linux leaks the
        table, the model frees it)."""
        found = t.get_leaf(gpa)
        if found is not None and found[0] > level:
            size = t.size[found[0]]
            logger.error("riscv_gstage.map_failed", gpa=hex(gpa), leaf=hex(size))
            raise KvmError(errno.EEXIST, f"KVM_RUN: the fault at gpa {gpa:#x} maps "
                           f"{t.size[level]:#x} bytes, but its walk meets a {size:#x} leaf "
                           f"at {gpa & ~(size - 1):#x} (kvm_riscv_gstage_set_pte)")
        t.map(gpa, level, pte).flush(vm)
        return RET_PF_FIXED

    def kvm_riscv_gstage_update_pte_prot(self, vm, t, level, gpa, table, idx, pte,
                                         prot) -> int:
        """``split_huge_on_fault`` (2026): replace the leaf's permissions by ``prot``
        (keeping its frame), D preset; flush the leaf if it changed. Replace, not add: W
        goes away on a read fault, as with 6.18's set_pte."""
        new = t.fmt.with_perms(pte, prot)
        if new != pte:
            table[idx] = new
            size = t.size[level]
            vm.flush_remote_tlbs_range((gpa & ~(size - 1)) >> 12, size >> 12)
        return RET_PF_FIXED

    def wrprotect_gfns(self, vm, as_id, start, end) -> bool:
        """mmu_wp_memory_region, when logging starts: kvm_riscv_gstage_wp_range over the
        slot, with its unaligned steps past an empty entry."""
        return self.kvm_riscv_gstage_wp_range(self.tables[as_id], start << 12, end << 12)

    def wrprotect_mask(self, vm, slot, base_gfn, mask) -> bool:
        """kvm_arch_mmu_enable_log_dirty_pt_masked: kvm_riscv_gstage_wp_range from the first
        set bit's gfn to past the last, so every 4 KiB leaf there loses W, reported or not.
        In 6.18 a block does not (the range, at most 64 pages, never holds one whole); with
        ``wp_whole_leaves`` it does. The newest gstage.c protects the leaf of each set bit
        instead (kvm_riscv_gstage_wp_pt_masked); that change was not identified, so no
        option has it. The caller flushes."""
        if not mask:
            return False
        first, last = (mask & -mask).bit_length() - 1, mask.bit_length() - 1
        t = self.tables[slot.as_id]
        return self.kvm_riscv_gstage_wp_range(t, (base_gfn + first) << 12,
                                              (base_gfn + last + 1) << 12)

    def kvm_riscv_gstage_wp_range(self, t, start: int, end: int) -> bool:
        """6.18's walk: from ``start``, the entry the walk of ``addr`` ends on
        (kvm_riscv_gstage_get_leaf); a leaf loses W (GSTAGE_OP_WP) only when ``addr`` is its
        start and it ends inside the range; ``addr`` then advances by the size of that entry,
        leaf or empty, aligned or not. With ``wp_whole_leaves`` (a216e24fc947, as RVCK's
        backport of it has gstage.c) ``addr`` first aligns down to the start of a leaf it
        reaches, which loses W whole, however much of it the range holds; an empty entry is
        still stepped over unaligned. Returns whether a leaf changed (6.18's op_pte flushed
        each one itself; the model leaves it to the caller's flush)."""
        changed = False
        addr = start
        whole = self.wp_whole_leaves
        while addr < end:
            level, table, idx, pte = t.lookup(addr)
            size = t.size[level]
            if t.fmt.is_leaf(pte, level):
                if whole:
                    addr &= ~(size - 1)
                held = not addr & (size - 1) and end - addr >= size
                if (held or whole) and pte & t.fmt.W:
                    table[idx] = t.st(pte & ~t.fmt.W)
                    changed = True
            addr += size
        return changed

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
        ``range.may_block``, the lock is dropped between two leaves (``riscv_unmap_resched``,
        cond_resched_lock), so a stepped unmap is a flow. Each leaf cleared is flushed (6.18's
        kvm_riscv_gstage_op_pte hfences it; the model flushes what one pass cleared at once):
        nothing is left for the caller to flush, and kvm_unmap_gfn_range returns false."""
        t = self.tables[range.as_id]
        if range.may_block and stepping():
            return self._unmap_resched(vm, t, range.start << 12, range.end << 12)
        self.kvm_riscv_gstage_unmap_range(vm, t, range.start << 12, range.end << 12)
        return False

    def kvm_riscv_gstage_unmap_range(self, vm, t, start: int, end: int) -> None:
        """Clear the leaves of ``[start, end)`` as Linux's walk does, one step at a time
        (``_unmap_step``)."""
        span = Span()
        addr = start
        while addr < end:
            addr = self._unmap_step(vm, t, addr, end, span)[0]
        span.flush(vm)

    def _unmap_resched(self, vm, t, addr: int, end: int):
        """kvm_riscv_gstage_unmap_range with may_block: cond_resched_lock after a step; the
        model stops there after a step that met a leaf, when one is still ahead."""
        while addr < end:
            span = Span()
            addr, leaf = self._unmap_step(vm, t, addr, end, span)
            span.flush(vm)
            if leaf and addr < end and next(t.pt.iter_present(addr, end, leaves_only=True),
                                            None) is not None:
                vm.stats["riscv_unmap_resched"] += 1
                yield from vm.mmu_lock.cond_resched(WRITE, RISCV_UNMAP_RESCHED)
        return False

    def _unmap_step(self, vm, t, addr: int, end: int, span: Span) -> tuple[int, bool]:
        """One step of kvm_riscv_gstage_unmap_range at ``addr``: the entry the walk of
        ``addr`` ends on (kvm_riscv_gstage_get_leaf). A leaf is cleared only if ``addr`` is
        its start and it ends inside the range; otherwise it is skipped — not split, not
        cleared, silently in 6.18 (later kernels WARN_ONCE), counted here as
        ``riscv_unmap_skip`` — and either way ``addr`` advances by its size, so a walk that
        starts inside a huge leaf stays off alignment and skips later leaves too. Past an
        empty entry 6.18 also adds the entry's size to an ``addr`` that may be unaligned:
        a range starting inside an empty 2 MiB or 1 GiB region reaches the next region at
        the same offset and never looks at the leaves before it, which stay mapped over
        pages the host may free (a use after free the core's invariants report). The VM
        option ``unmap_aligned_steps`` aligns up there (ALIGN(addr + 1, page_size)), as
        mainline does now (docs/arch/riscv_gstage.md §5). Returns the
        next ``addr`` and whether the step met a leaf."""
        level, table, idx, pte = t.lookup(addr)
        size = t.size[level]
        if not t.fmt.is_leaf(pte, level):
            if self.unmap_aligned_steps:
                return (addr | (size - 1)) + 1, False
            return addr + size, False
        if not addr & (size - 1) and end - addr >= size:
            table[idx] = t.st(t.fmt.empty)
            span.add(addr, size)
        else:
            # 6.18 prints nothing here; the stat lets tests see the skip.
            vm.stats[RISCV_UNMAP_SKIP] += 1
            logger.debug("riscv_gstage.unmap_skip", addr=hex(addr), size=hex(size),
                         end=hex(end))
        return addr + size, True
