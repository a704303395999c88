"""The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c): roots, the map walk, zapping, splitting,
write-protection, D-bit clearing, aging and huge-page recovery over EPT tables.

Each root is a ``kvmcore.radix.RadixTable`` of the VM's ``EptFormat`` in one ``TableStore``; a
present non-leaf SPTE carries its child's physical address exactly as EPT hardware follows it.
The leaf loops (for_each_tdp_pte_min_level) are the core's ``PageTable.iter_present``, the
split and recovery walks visitors of its ``walk``; the map walk is the fault's own flow, for
its exchanges. Every SPTE write goes through ``handle_changed_spte`` which checks the
transitions Linux BUGs/WARNs on and records violations in ``TdpMmu.bugs`` (KVM_BUG_ON), so
``check_invariants`` can report them.

Race points (reference/races.md §1.A, §7). A fault installs under the read lock with
tdp_mmu_set_spte_atomic, a compare-and-exchange against the SPTE its walk read: the map walk
pauses before each (``x86_pf_link_cmpxchg`` before linking a new page table or a split huge
page, ``x86_pf_leaf_cmpxchg`` before the leaf) and then re-reads the entry; if another flow
changed it meanwhile the exchange fails and the fault returns RET_PF_RETRY, as in Linux. The
fault path is hot: it pauses there only when its flow is stepped
(``kvmcore.locks.stepping()``), and only then is the walk a generator; a plain call, which no
other flow can interleave, goes straight on. A zap that may block drops the write lock between
2 MiB regions (``tdp_zap_yield``, tdp_mmu_iter_cond_resched), flushing first what it zapped;
the zap of a whole root and the write protection and D-bit clearing of a memslot whose dirty
logging starts yield between regions too (``TdpIter``). A stretch between two points runs
atomically; RCU-deferred freeing of page tables is immediate, and a page table removed under
the read lock is filled with FROZEN_SPTE (handle_removed_pt), so a flow paused with a pointer
into it fails its exchange.
"""

from __future__ import annotations

from array import array
from types import GeneratorType
from typing import TYPE_CHECKING

import structlog
from kvmcore.locks import READ, WRITE, drive, stepping
from kvmcore.pgtable import TABLE_PRE, TableStore, present_indices
from kvmcore.radix import RadixTable
from kvmcore.uapi import (RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS,
                          RET_PF_WRITE_PROTECTED)

from .spte import (
    FROZEN_SPTE,
    NONPRESENT_TABLE,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    EptFormat,
    check_spte_writable_invariants,
    is_accessed_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    leaf_spte_change_needs_tlb_flush,
    make_huge_spte,
    mark_spte_for_access_track,
    shadow_accessed_mask,
    shadow_dirty_mask,
    spte_ad_enabled,
    spte_to_pfn,
    tdp_geometry,
)

if TYPE_CHECKING:
    from kvmcore.kvm import Kvm

logger = structlog.get_logger(__name__)

#: Race points of the map walk (kvm_tdp_mmu_map: tdp_mmu_link_sp / tdp_mmu_split_huge_page
#: and tdp_mmu_map_handle_target_level, each a tdp_mmu_set_spte_atomic) and of a zap that may
#: block (tdp_mmu_zap_leafs -> tdp_mmu_iter_cond_resched).
X86_PF_LINK_CMPXCHG = "x86_pf_link_cmpxchg"
X86_PF_LEAF_CMPXCHG = "x86_pf_leaf_cmpxchg"
TDP_ZAP_YIELD = "tdp_zap_yield"
#: kvm_mmu_zap_all_fast has invalidated the roots and dropped the write lock; its
#: kvm_tdp_mmu_zap_invalidated_roots waits for the lock for read.
X86_ZAP_INVALIDATED_LOCK_WAIT = "x86_zap_invalidated_lock_wait"
#: kvm_mmu_slot_apply_flags between two of its steps (eager split, clear D, write-protect),
#: each under kvm->mmu_lock for read: the next waits for the lock.
X86_DLOG_LOCK_WAIT = "x86_dlog_lock_wait"
#: wrprot_gfn_range or clear_dirty_gfn_range (the steps of kvm_mmu_slot_apply_flags) yields
#: kvm->mmu_lock between two regions (tdp_mmu_iter_cond_resched) and waits to take it again.
X86_DLOG_YIELD = "x86_dlog_yield"
#: tdp_mmu_split_huge_pages_root dropped kvm->mmu_lock to allocate a page table
#: (tdp_mmu_alloc_sp_for_split) and waits to take it again.
X86_SPLIT_ALLOC = "x86_split_alloc"
#: fast_page_fault read the last SPTE without mmu_lock and is about to try_cmpxchg64 its fix
#: (fast_pf_fix_direct_spte): a zap, a write protection or aging may change it first.
X86_FAST_PF_CMPXCHG = "x86_fast_pf_cmpxchg"
RACE_POINTS = (X86_PF_LINK_CMPXCHG, X86_PF_LEAF_CMPXCHG, TDP_ZAP_YIELD,
               X86_ZAP_INVALIDATED_LOCK_WAIT, X86_DLOG_LOCK_WAIT, X86_DLOG_YIELD,
               X86_SPLIT_ALLOC, X86_FAST_PF_CMPXCHG)

#: Gfns per yield region of a zap: the model's grain for tdp_mmu_iter_cond_resched.
ZAP_YIELD_GFNS = 512

#: What handle_removed_pt leaves in a page table it took out of the paging structure.
FROZEN_TABLE = array("Q", [FROZEN_SPTE]) * SPTE_ENT_PER_PAGE

# enum kvm_tdp_mmu_root_types (tdp_mmu.h)
KVM_INVALID_ROOTS = 1 << 0
KVM_DIRECT_ROOTS = 1 << 1
KVM_MIRROR_ROOTS = 1 << 2
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS


class TdpRoot:
    """A root kvm_mmu_page: its tree (``rt``, a RadixTable in the VM's shared store; ``pt``
    its PageTable), ``role.is_mirror``, ``role.invalid``, the address space (role.smm), the
    alias bits OR-ed into the walk index (kvm_gfn_root_bits) and ``refs``
    (tdp_mmu_root_count: the TDP MMU's own reference while the root is valid, and one per
    vCPU that has it loaded). ``zapped``, the model's own record: this invalid root has been
    through kvm_tdp_mmu_zap_invalidated_roots, and nothing may fill it again (faults retry
    on it, every other walk takes valid roots only)."""

    __slots__ = ("rt", "pt", "as_id", "is_mirror", "gfn_bits", "level", "invalid", "table",
                 "name", "refs", "zapped")

    def __init__(self, rt: RadixTable, as_id: int, is_mirror: bool, gfn_bits: int, level: int):
        self.rt = rt
        self.pt = pt = rt.pt
        self.as_id = as_id
        self.is_mirror = is_mirror
        self.gfn_bits = gfn_bits
        self.level = level
        self.invalid = False
        self.zapped = False
        self.refs = 1
        self.table = pt.store[pt.root]
        self.name = f"{'mirror' if is_mirror else 'direct'} root as{as_id}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        kind = "mirror" if self.is_mirror else "direct"
        return (f"TdpRoot({kind}, as_id={self.as_id}, level={self.level}, "
                f"gfn_bits={self.gfn_bits:#x}{', invalid' if self.invalid else ''})")


def tdp_mmu_root_match(root: TdpRoot, types: int) -> bool:
    if root.invalid:
        return bool(types & KVM_INVALID_ROOTS)
    if root.is_mirror:
        return bool(types & KVM_MIRROR_ROOTS)
    return bool(types & KVM_DIRECT_ROOTS)


def is_access_allowed(write: bool, exec_: bool, spte: int) -> bool:
    """mmu.c is_access_allowed: exec needs X, write needs W, a read needs EPT R (bit 0)."""
    if exec_:
        return bool(spte & 0x4)
    if write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & 0x1)


class TdpIter:
    """A leaf walk that may yield kvm->mmu_lock (struct tdp_iter's share in it): ``next()``
    gives the next present entry ``(table, index, level, gfn)`` of ``TdpMmu.iter_leaves``
    over [start, end) at ``min_level``, or None at the end. ``need_resched(gfn)`` stands for
    tdp_mmu_iter_need_resched: Linux yields when need_resched() or the lock is contended,
    once the walk moved since it last yielded; the model yields at the first entry of each
    region of ``grain`` gfns after one where the walk changed an entry (its owner sets
    ``progress``), which keeps the explorer's schedules few while another flow can still
    run between two parts of the walk. ``restart()`` after the yield: tdp_iter_restart,
    the walk reads every entry afresh from the root, from the gfn it stopped at."""

    __slots__ = ("mmu", "root", "end", "min_level", "grain", "leaves", "gfn", "region",
                 "progress")

    def __init__(self, mmu: TdpMmu, root: TdpRoot, start: int, end: int,
                 min_level: int = PG_LEVEL_4K, grain: int = ZAP_YIELD_GFNS):
        self.mmu, self.root, self.end, self.min_level = mmu, root, end, min_level
        self.grain = grain
        self.leaves = mmu.iter_leaves(root, start, end, min_level=min_level)
        self.gfn = start
        self.region = None
        self.progress = False

    def next(self):
        item = next(self.leaves, None)
        if item is not None:
            self.gfn = max(self.gfn, item[3])
        return item

    def need_resched(self, gfn: int) -> bool:
        here = gfn // self.grain
        if self.progress and here != self.region:
            return True
        self.region = here
        return False

    def restart(self) -> None:
        # Every entry is read as it is now: a table on the path may be gone, the leaf split,
        # or a table linked where a leaf was.
        self.progress = False
        gfn = self.mmu.tdp_iter_restart(self.root, self.gfn, self.min_level)
        self.leaves = self.mmu.iter_leaves(self.root, gfn, self.end, min_level=self.min_level)


class TdpMmu:
    """kvm->arch.tdp_mmu_roots and the functions of tdp_mmu.c that work on them."""

    def __init__(self, backend, root_level: int):
        self.backend = backend
        self.root_level = root_level
        self.fmt = EptFormat(root_level, backend.ad_disabled, backend.nx_huge_pages,
                             backend.shadow_mmio_value)
        self.geometry = self.fmt.geometry
        self.store = TableStore(min_align=4096)
        self.roots: list[TdpRoot] = []
        #: KVM_BUG_ON / WARN conditions hit by an SPTE change; check_invariants reports them.
        self.bugs: list[str] = []
        #: Mirror (S-EPT) page tables freed so far; Linux frees them only at TD teardown.
        self.mirror_tables_freed = 0

    # ------------------------------------------------------------------ allocation
    def alloc_sp(self) -> int:
        """tdp_mmu_alloc_sp: a page-table page pre-filled with SHADOW_NONPRESENT_VALUE."""
        pa = self.store.alloc(SPTE_ENT_PER_PAGE)
        self.store.tables[pa] = NONPRESENT_TABLE[:]
        return pa

    def alloc_root(self, as_id: int, is_mirror: bool, gfn_bits: int) -> TdpRoot:
        """kvm_tdp_mmu_alloc_root."""
        root = TdpRoot(RadixTable(self.fmt, self.store), as_id, is_mirror,
                       0 if is_mirror else gfn_bits, self.root_level)
        self.roots.append(root)
        return root

    def kvm_tdp_mmu_put_root(self, root: TdpRoot) -> None:
        """kvm_tdp_mmu_put_root: drop a reference; the last one (never a valid root's) takes
        the root off the list and frees its own page only. Whatever is still linked below
        it leaks, as in Linux: it is kvm_tdp_mmu_zap_invalidated_roots that frees an invalid
        root's tables, and the invariants report tables no root reaches."""
        root.refs -= 1
        if root.refs:
            return
        self.roots.remove(root)
        self.store.free(root.pt.root)

    def roots_of(self, types: int, as_id: int | None = None) -> list[TdpRoot]:
        return [r for r in self.roots if tdp_mmu_root_match(r, types)
                and (as_id is None or r.as_id == as_id)]

    def bug(self, vm: Kvm, message: str) -> None:
        self.bugs.append(message)
        vm.stats["x86_tdp.kvm_bug"] += 1
        logger.warning("kvm_bug", message=message)

    # ------------------------------------------------------------------ SPTE changes
    def handle_changed_spte(self, vm: Kvm, root: TdpRoot, gfn: int, old: int, new: int,
                            level: int) -> None:
        """tdp_mmu.c handle_changed_spte: the transitions Linux forbids, leaf accounting, and
        freeing of a page table that a zap or a huge leaf disconnected (handle_removed_pt)."""
        # is_shadow_present_pte / is_last_spte, inline: this runs on every SPTE write.
        was_present = bool(old & SPTE_MMU_PRESENT_MASK)
        is_present = bool(new & SPTE_MMU_PRESENT_MASK)
        was_leaf = was_present and (level == PG_LEVEL_4K or bool(old & PT_PAGE_SIZE_MASK))
        is_leaf = is_present and (level == PG_LEVEL_4K or bool(new & PT_PAGE_SIZE_MASK))
        if was_leaf and is_leaf:
            if spte_to_pfn(old) != spte_to_pfn(new):
                self.bug(vm, f"present leaf at gfn {gfn:#x} level {level} changed pfn "
                             f"{spte_to_pfn(old):#x} -> {spte_to_pfn(new):#x}")
            # Host-writable may change: a write fault replaces a host-read-only leaf (a
            # MAP_SHARED page a read fault mapped) by a writable one of the same pfn, as
            # tdp_mmu_map_handle_target_level does; only a pfn change is forbidden.
        if is_leaf:
            problem = check_spte_writable_invariants(new)
            if problem:
                self.bug(vm, problem)
            if level > PG_LEVEL_4K:
                mask = KVM_PAGES_PER_HPAGE(level) - 1
                if gfn & mask or spte_to_pfn(new) & mask:
                    self.bug(vm, f"misaligned level-{level} leaf gfn {gfn:#x} pfn "
                                 f"{spte_to_pfn(new):#x}")
        if not was_present and not is_present:
            if not (is_mmio_spte(old) or is_mmio_spte(new) or new == FROZEN_SPTE
                    or old == FROZEN_SPTE):
                self.bug(vm, f"non-present -> non-present change {old:#x} -> {new:#x} at gfn "
                             f"{gfn:#x}")
        if was_leaf != is_leaf:
            vm.stats["x86_tdp.leaf_count"] += 1 if is_leaf else -1
        if was_present and not was_leaf and (not is_present or is_leaf):
            self.handle_removed_pt(vm, root, old & SPTE_BASE_ADDR_MASK, level - 1, gfn)

    def handle_removed_pt(self, vm: Kvm, root: TdpRoot, table_pa: int, level: int,
                          base_gfn: int) -> None:
        """tdp_mmu.c handle_removed_pt: freeze each child, handle it (a mirror leaf then goes
        through remove_external_spte), free the page. Every entry ends FROZEN, as the shared
        (read-lock) form leaves them: a fault paused with this table in its walk then fails
        its compare-and-exchange instead of writing into a freed page."""
        table = self.store[table_pa]
        step = KVM_PAGES_PER_HPAGE(level)
        for i in present_indices(table, SHADOW_NONPRESENT_VALUE):
            old = table[i]
            if not old & SPTE_MMU_PRESENT_MASK:
                continue
            gfn = base_gfn + i * step
            table[i] = FROZEN_SPTE
            self.handle_changed_spte(vm, root, gfn, old, FROZEN_SPTE, level)
            if root.is_mirror and is_last_spte(old, level):
                drive(self.backend.remove_external_spte(vm, gfn, level, old))
        table[:] = FROZEN_TABLE
        if root.is_mirror:
            self.mirror_tables_freed += 1
            tdx = getattr(self.backend, "tdx", None)
            if tdx is not None and tdx.hkid_assigned:
                self.bug(vm, "mirror (S-EPT) page table freed while the TD's HKID is assigned")
        self.store.free(table_pa)

    def set_spte(self, vm: Kvm, root: TdpRoot, table, idx: int, gfn: int, level: int,
                 new: int) -> int:
        """tdp_mmu_set_spte / tdp_mmu_iter_set_spte (write lock): write ``new``, handle the
        change, then for a mirror leaf going away remove_external_spte (TDX's BLOCK, TRACK,
        REMOVE), run through without pausing: callers that may pause there use
        ``tdp_mmu_zap_leafs``."""
        old = table[idx]
        if old == FROZEN_SPTE:
            self.bug(vm, f"tdp_mmu_set_spte on a FROZEN SPTE at gfn {gfn:#x}")
        table[idx] = new
        self.handle_changed_spte(vm, root, gfn, old, new, level)
        if root.is_mirror and old & SPTE_MMU_PRESENT_MASK and is_last_spte(old, level) \
                and not new & SPTE_MMU_PRESENT_MASK:
            drive(self.backend.remove_external_spte(vm, gfn, level, old))
        return old

    # ------------------------------------------------------------------ the map walk
    def kvm_tdp_mmu_map(self, vm: Kvm, fault, root: TdpRoot, goal_level: int, pfn: int,
                        make_leaf):
        """tdp_mmu.c kvm_tdp_mmu_map (the caller holds kvm->mmu_lock for read): walk from the
        root down to ``goal_level``; where the SPTE is missing link a new table
        (tdp_mmu_link_sp), where it is a huge leaf above the goal split it
        (tdp_mmu_split_huge_page), each by an exchange against the SPTE the walk read; a
        FROZEN SPTE or a failed exchange retries the fault. Then the leaf built by
        ``make_leaf(old_spte, level)`` (tdp_mmu_map_handle_target_level).

        Returns a RET_PF_* code or, when the running flow is stepped, a flow that pauses at
        ``x86_pf_link_cmpxchg`` / ``x86_pf_leaf_cmpxchg`` before each exchange (a plain
        call, which nothing can interleave, builds no generator: this is every fault)."""
        tables = self.store.tables
        gfn = fault.gfn
        key = gfn + root.gfn_bits
        table = root.table
        level = root.level
        while True:
            idx = (key >> (9 * (level - 1))) & 511
            spte = table[idx]
            if spte == FROZEN_SPTE:
                return RET_PF_RETRY
            if level == goal_level:
                break
            if spte & SPTE_MMU_PRESENT_MASK and not spte & PT_PAGE_SIZE_MASK:
                table = tables[spte & SPTE_BASE_ADDR_MASK]
                level -= 1
                continue
            if stepping():
                return self._link_flow(vm, fault, root, table, idx, level, spte, goal_level,
                                       pfn, make_leaf)
            child_pa = self.tdp_mmu_link_sp(vm, fault, root, table, idx, level, spte)
            if child_pa is None:
                return RET_PF_RETRY
            table = tables[child_pa]
            level -= 1
        return self.tdp_mmu_map_handle_target_level(vm, fault, root, table, idx, level, pfn,
                                                    make_leaf)

    def _link_flow(self, vm: Kvm, fault, root: TdpRoot, table, idx: int, level: int,
                   spte: int, goal_level: int, pfn: int, make_leaf):
        """The rest of a stepped kvm_tdp_mmu_map from a missing or huge SPTE: pause, link,
        and go on down. The walk below starts again at the root, which reads what this
        stretch just read and linked: nothing else runs in between."""
        yield X86_PF_LINK_CMPXCHG
        if self.tdp_mmu_link_sp(vm, fault, root, table, idx, level, spte) is None:
            return RET_PF_RETRY
        r = self.kvm_tdp_mmu_map(vm, fault, root, goal_level, pfn, make_leaf)
        if type(r) is GeneratorType:
            r = yield from r
        return r

    def tdp_mmu_link_sp(self, vm: Kvm, fault, root: TdpRoot, table, idx: int, level: int,
                        spte: int) -> int | None:
        """tdp_mmu_link_sp, or tdp_mmu_split_huge_page over a huge ``spte``, in the fault
        path: a new child table exchanged in for ``spte`` (tdp_mmu_set_spte_atomic); its
        address, or None when the exchange failed. Linux fills the table from the vCPU's
        cache before the exchange and frees it on failure; nobody else can see it until it
        is linked, so the model builds it only once the exchange succeeds."""
        split = bool(spte & SPTE_MMU_PRESENT_MASK)
        if split and root.is_mirror:
            self.bug(vm, "huge page split on a mirror root")
            return None
        # The exchange fails if the SPTE changed since the walk read it (another vCPU linked
        # or split it, a zap ran, or it is frozen).
        if table[idx] != spte:
            vm.stats["x86_tdp.pf_cmpxchg_failed"] += 1
            return None
        child_pa = self._split_child(spte, level) if split else self.alloc_sp()
        new = self.fmt.make_table(child_pa, level)
        if root.is_mirror:
            level_gfn = fault.gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1)
            if not self.backend.set_external_spte_present(vm, table, idx, level_gfn, level,
                                                          spte, new, child_pa):
                self.store.free(child_pa)
                return None
        else:
            table[idx] = new
        if split:
            self._account_split(vm)
        return child_pa

    def tdp_mmu_map_handle_target_level(self, vm: Kvm, fault, root: TdpRoot, table, idx: int,
                                        level: int, pfn: int, make_leaf):
        """tdp_mmu.c tdp_mmu_map_handle_target_level: spurious if the SPTE already allows the
        access; else make_spte and exchange it in against the SPTE the walk read
        (``_set_leaf``); when the running flow is stepped, a flow that pauses at
        ``x86_pf_leaf_cmpxchg`` first."""
        old = table[idx]
        if old & SPTE_MMU_PRESENT_MASK and is_last_spte(old, level) and (
                fault.prefetch or is_access_allowed(fault.write, fault.exec, old)):
            if spte_to_pfn(old) != pfn:
                gfn = fault.gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1)
                self.bug(vm, f"spurious fault at gfn {gfn:#x} found pfn {spte_to_pfn(old):#x}"
                             f", expected {pfn:#x}")
            return RET_PF_SPURIOUS
        new, wrprot, mmio = make_leaf(old, level)
        if new == old:
            return RET_PF_SPURIOUS
        if stepping():
            return self._leaf_flow(vm, fault, root, table, idx, level, old, new, wrprot, mmio)
        return self._set_leaf(vm, fault, root, table, idx, level, old, new, wrprot, mmio)

    def _leaf_flow(self, vm: Kvm, fault, root: TdpRoot, table, idx: int, level: int, old: int,
                   new: int, wrprot: bool, mmio: bool):
        yield X86_PF_LEAF_CMPXCHG
        return self._set_leaf(vm, fault, root, table, idx, level, old, new, wrprot, mmio)

    def _set_leaf(self, vm: Kvm, fault, root: TdpRoot, table, idx: int, level: int, old: int,
                  new: int, wrprot: bool, mmio: bool) -> int:
        """The second half of tdp_mmu_map_handle_target_level: tdp_mmu_set_spte_atomic
        (RET_PF_RETRY if another flow changed the SPTE since the walk read it), the flush when
        a table became a huge leaf, the return code."""
        if table[idx] != old:
            vm.stats["x86_tdp.pf_cmpxchg_failed"] += 1
            return RET_PF_RETRY
        gfn = fault.gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1)
        if root.is_mirror:
            if not self.backend.set_external_spte_present(vm, table, idx, gfn, level, old,
                                                          new, None):
                return RET_PF_RETRY
        else:
            table[idx] = new
        self.handle_changed_spte(vm, root, gfn, old, new, level)
        if old & SPTE_MMU_PRESENT_MASK:
            if not is_last_spte(old, level):
                # A table was replaced by a huge leaf: translations through it must go.
                vm.flush_remote_tlbs_range(gfn, KVM_PAGES_PER_HPAGE(level))
            elif leaf_spte_change_needs_tlb_flush(old, new):
                self.bug(vm, f"leaf change at gfn {gfn:#x} needs a TLB flush in the fault path")
        if mmio:
            return RET_PF_EMULATE
        if wrprot and fault.write:
            return RET_PF_WRITE_PROTECTED
        return RET_PF_FIXED

    def _split_child(self, huge: int, level: int) -> int:
        """A new child table holding ``huge``'s translation in 512 smaller SPTEs
        (make_small_spte), not linked yet."""
        child_pa = self.alloc_sp()
        child = self.store.tables[child_pa]
        split_child = self.fmt.split_child
        for i in range(SPTE_ENT_PER_PAGE):
            child[i] = split_child(huge, level, level - 1, i)
        return child_pa

    def _account_split(self, vm: Kvm) -> None:
        # The children took over the leaf; only the count changes.
        vm.stats["x86_tdp.leaf_count"] += SPTE_ENT_PER_PAGE - 1
        vm.stats["x86_tdp.split_huge_page"] += 1

    def tdp_mmu_split_huge_page(self, vm: Kvm, root: TdpRoot, table, idx: int, gfn: int,
                                level: int) -> int:
        """tdp_mmu_split_huge_page (eager splitting, in one stretch): fill a child table
        with make_small_spte and replace the huge leaf by a link to it; the translation is
        unchanged, so no TLB flush."""
        child_pa = self._split_child(table[idx], level)
        table[idx] = self.fmt.make_table(child_pa, level)
        self._account_split(vm)
        return child_pa

    # ------------------------------------------------------------------ walks
    @staticmethod
    def _span(root: TdpRoot, start: int, end: int) -> tuple[int, int]:
        return (start + root.gfn_bits) << 12, (end + root.gfn_bits) << 12

    def zap_leafs_locked(self, vm: Kvm, root: TdpRoot, start: int, end: int) -> bool:
        """tdp_mmu.c tdp_mmu_zap_leafs where it cannot yield (``can_yield`` false, or a range
        inside one yield region) on a direct root: write SHADOW_NONPRESENT_VALUE over every
        present leaf overlapping [start, end); page tables are kept; flush unless the root is
        invalid. The same iteration as ``tdp_mmu_zap_leafs`` (for_each_tdp_pte_min_level)."""
        zapped = False
        for table, idx, level, gfn in self.iter_leaves(root, start, end):
            self.set_spte(vm, root, table, idx, gfn, level, SHADOW_NONPRESENT_VALUE)
            zapped = True
        if zapped:
            vm.stats["x86_tdp.zap_leafs"] += 1
        return zapped and not root.invalid

    def tdp_mmu_zap_leafs(self, vm: Kvm, root: TdpRoot, start: int, end: int,
                          can_yield: bool, flush: bool):
        """tdp_mmu.c tdp_mmu_zap_leafs, a flow (the caller holds kvm->mmu_lock for write) that
        returns whether a TLB flush is still owed: every present leaf overlapping [start, end)
        becomes SHADOW_NONPRESENT_VALUE (tdp_mmu_iter_set_spte); a mirror leaf then goes
        through remove_external_spte, whose TDX steps pause at their own points. With
        ``can_yield`` (range.may_block) it may yield between 2 MiB regions
        (``tdp_mmu_iter_cond_resched`` at ``tdp_zap_yield``), flushing first what it zapped,
        and then owes nothing."""
        mirror = root.is_mirror
        flush_needed = not root.invalid
        it = TdpIter(self, root, start, end)
        zapped = False
        while (item := it.next()) is not None:
            table, idx, level, gfn = item
            if can_yield and it.need_resched(gfn):
                yield from self.tdp_mmu_iter_cond_resched(vm, it, flush, WRITE, TDP_ZAP_YIELD)
                flush = False
                continue
            old = table[idx]
            if not old & SPTE_MMU_PRESENT_MASK:
                continue        # zapped by another flow while this one had yielded
            table[idx] = SHADOW_NONPRESENT_VALUE
            self.handle_changed_spte(vm, root, gfn, old, SHADOW_NONPRESENT_VALUE, level)
            if mirror:
                yield from self.backend.remove_external_spte(vm, gfn, level, old)
            it.progress = zapped = True
            flush = flush or flush_needed
        if zapped:
            vm.stats["x86_tdp.zap_leafs"] += 1
        return flush

    @staticmethod
    def tdp_mmu_iter_cond_resched(vm: Kvm, it: TdpIter, flush: bool, mode: str, point: str):
        """tdp_mmu_iter_cond_resched where ``it.need_resched`` said so, a flow: flush what
        the walk owes (kvm_flush_remote_tlbs), drop kvm->mmu_lock (held in ``mode``) at
        ``point`` and take it again, then restart the walk from the root."""
        if flush:
            vm.flush_remote_tlbs()
        yield from vm.mmu_lock.cond_resched(mode, point)
        it.restart()

    def iter_leaves(self, root: TdpRoot, start: int, end: int, snapshot: bool = False,
                    min_level: int = PG_LEVEL_4K):
        """The present leaves overlapping gfns [start, end), in gfn order, as ``(table,
        index, level, gfn)``: for_each_tdp_pte_min_level, the core's lazy iterator, which
        reads each table when it gets there, so a walk restarted after a yield sees the
        tables as they are then (``snapshot``: for a reader that yields nothing,
        ``PageTable.iter_present``'s). Above ``min_level`` only huge leaves; at it every
        present entry, a leaf or a table, whose table is not entered."""
        bits, top = root.gfn_bits, root.level
        return ((table, idx, top - pos, (addr >> 12) - bits) for table, idx, pos, addr, _
                in root.pt.iter_present(*self._span(root, start, end), leaves_only=True,
                                        snapshot=snapshot, max_pos=top - min_level))

    @staticmethod
    def tdp_iter_restart(root: TdpRoot, gfn: int, min_level: int) -> int:
        """Where a walk that yielded at the entry of ``gfn`` goes on: tdp_iter_restart
        takes the iterator back to the root, and the loop's next step goes down to that
        same entry again, reading everything on its path afresh."""
        return gfn

    def tdp_mmu_zap_root(self, vm: Kvm, root: TdpRoot, shared: bool):
        """tdp_mmu.c tdp_mmu_zap_root, a flow (the caller holds kvm->mmu_lock, for read when
        ``shared``): zap every SPTE of the root in passes of decreasing granularity, the
        4K entries, then those at 2M, 1G and the root's level (__tdp_mmu_zap_root each), so
        each pass removes the tables the one before emptied and no stretch frees a whole
        populated 1G region (the model builds without CONFIG_KVM_PROVE_MMU, which skips the
        first two). A pass may yield the lock as ``tdp_mmu_zap_leafs`` does, at the first
        entry of each region of its level (2 MiB at least) after one where it zapped, with
        no flush (an invalid root needs none; kvm_tdp_mmu_zap_all's caller flushes nothing),
        and goes on from the entry it stopped at (``tdp_iter_restart``)."""
        for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.level):
            yield from self._tdp_mmu_zap_root(vm, root, shared, zap_level)

    def _tdp_mmu_zap_root(self, vm: Kvm, root: TdpRoot, shared: bool, zap_level: int):
        """__tdp_mmu_zap_root: one pass over every entry of the root at ``zap_level``
        (tdp_mmu_set_spte_atomic when ``shared``: a stretch runs atomically in the model).
        A huge leaf above ``zap_level`` waits for its own pass."""
        it = TdpIter(self, root, 0, KVM_PAGES_PER_HPAGE(root.level + 1), zap_level,
                     max(ZAP_YIELD_GFNS, KVM_PAGES_PER_HPAGE(zap_level)))
        while (item := it.next()) is not None:
            table, idx, level, gfn = item
            if level > zap_level:
                continue
            if it.need_resched(gfn):
                yield from self.tdp_mmu_iter_cond_resched(vm, it, False,
                                                          READ if shared else WRITE,
                                                          TDP_ZAP_YIELD)
                continue
            if table[idx] & SPTE_MMU_PRESENT_MASK:
                self.set_spte(vm, root, table, idx, gfn, level, SHADOW_NONPRESENT_VALUE)
                it.progress = True

    def wrprot_gfn_range(self, vm: Kvm, root: TdpRoot, start: int, end: int,
                         min_level: int):
        """tdp_mmu.c wrprot_gfn_range, a flow under kvm->mmu_lock for read that returns
        whether a leaf changed: clear W (keeping MMU-writable, so the fast path may restore
        it) on leaves at or above ``min_level``."""
        return self.clear_spte_bits(vm, root, start, end, PT_WRITABLE_MASK, min_level)

    def clear_dirty_gfn_range(self, vm: Kvm, root: TdpRoot, start: int, end: int,
                              wrprot: bool):
        """tdp_mmu.c clear_dirty_gfn_range, a flow under kvm->mmu_lock for read that returns
        whether a leaf changed: clear D (or W when write protection is needed: A/D
        disabled) on every leaf in the range."""
        return self.clear_spte_bits(vm, root, start, end,
                                    PT_WRITABLE_MASK if wrprot else shadow_dirty_mask,
                                    PG_LEVEL_4K)

    def clear_spte_bits(self, vm: Kvm, root: TdpRoot, start: int, end: int, mask: int,
                        min_level: int = PG_LEVEL_4K):
        """A flow that returns whether a leaf changed: tdp_mmu_clear_spte_bits on each
        present leaf at or above ``min_level`` overlapping [start, end) that has a bit of
        ``mask`` (the walk of wrprot_gfn_range, clear_dirty_gfn_range and, over one gfn,
        write_protect_gfn), with tdp_mmu_iter_cond_resched (shared, no flush: the caller
        flushes) between 2 MiB regions at ``x86_dlog_yield``; a range inside one region
        never yields."""
        it = TdpIter(self, root, start, end)
        changed = False
        while (item := it.next()) is not None:
            table, idx, level, gfn = item
            if it.need_resched(gfn):
                yield from self.tdp_mmu_iter_cond_resched(vm, it, False, READ, X86_DLOG_YIELD)
                continue
            old = table[idx]
            if level >= min_level and old & SPTE_MMU_PRESENT_MASK and old & mask:
                self.set_spte(vm, root, table, idx, gfn, level, old & ~mask)
                it.progress = changed = True
        return changed

    def clear_dirty_pt_masked(self, vm: Kvm, root: TdpRoot, gfn: int, mask: int,
                              wrprot: bool) -> None:
        """tdp_mmu.c clear_dirty_pt_masked: only 4K leaves whose bit is set in ``mask``."""
        dbit = PT_WRITABLE_MASK if wrprot else shadow_dirty_mask
        if not mask:
            return
        start = gfn + (mask & -mask).bit_length() - 1
        for table, idx, level, g in self.iter_leaves(root, start, gfn + mask.bit_length()):
            old = table[idx]
            if level == PG_LEVEL_4K and mask >> (g - gfn) & 1 and old & dbit:
                self.set_spte(vm, root, table, idx, g, level, old & ~dbit)

    def split_huge_pages_range(self, vm: Kvm, root: TdpRoot, start: int, end: int,
                               target_level: int, mode: str):
        """tdp_mmu_split_huge_pages_root, a flow: top-down, every huge leaf overlapping the
        range is split until none above ``target_level`` remains (a 1G leaf becomes 2M leaves
        that are split in turn). Before each split, kvm->mmu_lock (held in ``mode``: read
        when logging starts, write inside a dirty-log GET / CLEAR) is dropped to allocate the
        child table (tdp_mmu_alloc_sp_for_split) and taken again at ``x86_split_alloc``;
        the walk then restarts from the root at that gfn, where the leaf may have been
        zapped, split or replaced meanwhile. Linux may also yield between entries
        (tdp_mmu_iter_cond_resched); the model does not."""
        lock = vm.mmu_lock
        gfn = start
        while True:
            huge = next((leaf for leaf in self.iter_leaves(root, gfn, end)
                         if leaf[2] > target_level), None)
            if huge is None:
                return
            gfn = max(gfn, huge[3])
            yield from lock.cond_resched(mode, X86_SPLIT_ALLOC)
            table, idx, level, spte = self.get_last_spte(root, gfn)
            if level > target_level and is_shadow_present_pte(spte) and is_large_pte(spte):
                pages = KVM_PAGES_PER_HPAGE(level)
                self.tdp_mmu_split_huge_page(vm, root, table, idx, gfn & -pages, level)
                if level - 1 == target_level:       # its children need no split
                    gfn = (gfn & -pages) + pages

    def age_gfn_range(self, vm: Kvm, root: TdpRoot, start: int, end: int,
                      test_only: bool) -> bool:
        """tdp_mmu.c kvm_tdp_mmu_age_gfn_range / test_age: clear Accessed (A/D) or convert to
        the access-tracked form (A/D disabled); never zaps, never flushes."""
        young = False
        for table, idx, level, gfn in self.iter_leaves(root, start, end):
            spte = table[idx]
            if not is_accessed_spte(spte):
                continue
            young = True
            if test_only:
                break
            new = spte & ~shadow_accessed_mask if spte_ad_enabled(spte) else \
                mark_spte_for_access_track(spte)
            self.set_spte(vm, root, table, idx, gfn, level, new)
        return young

    def recover_huge_pages_range(self, vm: Kvm, root: TdpRoot, slot, max_level_fn) -> bool:
        """tdp_mmu.c recover_huge_pages_range: replace a table inside the slot by a huge leaf
        made from one of its leaves when the slot/host allow that level."""
        bits = root.gfn_bits
        changed = [False]
        start, end = slot.base_gfn, slot.base_gfn + slot.npages

        def visit(ctx):
            level = ctx.level
            if level > KVM_MAX_HUGEPAGE_LEVEL or level < PG_LEVEL_2M:
                return None
            gfn = (ctx.addr >> 12) - bits
            npages = KVM_PAGES_PER_HPAGE(level)
            if gfn < start or gfn + npages > end:
                return None
            if max_level_fn(gfn) < level:
                return None
            # Any leaf below: the first one the core's iterator meets.
            child = next(root.pt.iter_present(ctx.addr, ctx.addr + ctx.size,
                                                   leaves_only=True), None)
            if child is None:
                return None
            huge = make_huge_spte(child[4], level)
            self.set_spte(vm, root, ctx.table, ctx.index, gfn, level, huge)
            changed[0] = True
            return None

        lo, hi = self._span(root, start, end)
        root.pt.walk(lo, hi, visit, TABLE_PRE)
        return changed[0]

    def get_last_spte(self, root: TdpRoot, gfn: int):
        """kvm_tdp_mmu_fast_pf_get_last_sptep: (table, index, level, spte) of the last SPTE a
        walk of ``gfn`` reads."""
        pos, table, idx, spte = root.pt.lookup((gfn + root.gfn_bits) << 12)
        return table, idx, root.level - pos, spte


__all__ = ["TdpMmu", "TdpRoot", "tdp_geometry", "is_access_allowed", "KVM_INVALID_ROOTS",
           "KVM_DIRECT_ROOTS", "KVM_MIRROR_ROOTS", "KVM_VALID_ROOTS", "KVM_ALL_ROOTS",
           "X86_PF_LINK_CMPXCHG", "X86_PF_LEAF_CMPXCHG", "TDP_ZAP_YIELD", "RACE_POINTS"]
