"""The partition-scoped radix MMU of a Book3S HV guest (arch/powerpc/kvm/book3s_64_mmu_radix.c).

Every function here takes the backend (``kvm->arch``: the tree, the lpid, the TLB-invalidate
record) and the VM, and mirrors the Linux function of the same name. Entries are CPU-order
values; ``_get`` / ``_set`` do the big-endian conversion at the table boundary.

Units: Linux's ``gfn`` here is in host base pages (4K or 64K); the model's API is in 4 KiB
frames. Functions below take byte addresses (``gpa``) and convert to 4 KiB gfns only where they
talk to the core (dirty marks, TLB flushes).

Model simplifications (each says why):

- ``kvmppc_create_pte``'s lockless look (which tables to pre-allocate) is taken by a stepped
  fault before it waits for kvm->mmu_lock (``kvmppc_create_pte_look``), as in Linux, so
  another fault may install a huge leaf where the look saw a table: -EAGAIN, the guest
  re-faults. A fault that is not stepped looks under the lock, where no other flow can
  have run since. The tables themselves are allocated under the lock (an allocation nobody
  can observe).
- Secure (Ultravisor) guests and nested (L2) shadow tables are not modelled.
- ``kvm_unmap_gfn_range_hv`` calls ``kvm_unmap_radix`` per gfn; here one walk visits each
  covering leaf once (same result, cost proportional to what is mapped). The gpa passed to
  ``kvmppc_unmap_pte`` is the first gfn of the range that hits the leaf, as in Linux.
- ``kvmppc_unmap_free_pte`` passes the host physical address as the gpa of leftover leaves
  [quirk]; the model passes their gpa, so the tlbie and the dirty bits land where they belong.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

import structlog
from kvmcore.pgtable import LEAF, STOP

from .pte import (_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_EXEC, _PAGE_PTE, _PAGE_WRITE,
                  _RAW_PRESENT, _RAW_PRESENT_OR_INVALID, _RAW_PTE, PTE_BITS_MUST_MATCH,
                  be64_to_cpu, dir_nlb, load_be64, pte_dirty, pte_present, pte_write, pte_young,
                  store_be64)
from .radix import LEVEL_PGD, LEVEL_PMD, LEVEL_PTE, LEVEL_PUD, PMD_SHIFT, PUD_SHIFT

logger = structlog.get_logger(__name__)

SZ_4K_SHIFT = 12


def _get(table, idx) -> int:
    """be64_to_cpu(*ptep)."""
    return load_be64(table, idx << 3)[0]


def _set(table, idx, val: int) -> None:
    """*ptep = cpu_to_be64(val)."""
    store_be64(table, idx << 3, val)


# --------------------------------------------------------------------------- TLB primitives


def kvmppc_radix_update_pte(table, idx, clr: int, set_: int) -> int:
    """__radix_pte_update: new = (old | set) & ~clr; returns old. No TLB flush."""
    old = _get(table, idx)
    _set(table, idx, (old | set_) & ~clr & (2**64 - 1))
    return old


def kvmppc_radix_tlbie_page(be, vm, addr: int, pshift: int) -> None:
    """Invalidate one translation of size 1 << pshift (PAGE_SIZE when 0) at ``addr`` aligned
    down to it (radix__flush_tlb_lpid_page). The model records it and drops the vCPUs' TLB
    entries for that range."""
    size = 1 << pshift if pshift else be.fmt.page_size
    addr &= ~(size - 1)
    be.tlbie_log.append((addr, size, be.lpid))
    vm.stats["ppc_tlbie"] += 1
    if be.tlb_batch is not None:
        be.tlb_batch.append((addr >> SZ_4K_SHIFT, size >> SZ_4K_SHIFT))
    else:
        vm.flush_remote_tlbs_range(addr >> SZ_4K_SHIFT, size >> SZ_4K_SHIFT)


@contextmanager
def batched_tlbie(be, vm):
    """Within one flow that issues many tlbies (a range unmap, a harvest) no guest access
    runs in this model, so the vCPU TLBs can be flushed once per contiguous run at the end.
    Every tlbie is still recorded; only the model's TLB bookkeeping is coalesced (its range
    flush costs the size of each vCPU's TLB)."""
    if be.tlb_batch is not None:
        yield
        return
    be.tlb_batch = batch = []
    try:
        yield
    finally:
        be.tlb_batch = None
        start = end = None
        for gfn, n in sorted(batch):
            if start is not None and gfn <= end:
                end = max(end, gfn + n)
                continue
            if start is not None:
                vm.flush_remote_tlbs_range(start, end - start)
            start, end = gfn, gfn + n
        if start is not None:
            vm.flush_remote_tlbs_range(start, end - start)


def kvmppc_radix_flush_pwc(be, vm) -> None:
    """Flush the page-walk cache of the whole lpid (a table was unlinked). The vCPU TLBs of the
    model cache only leaf translations, which are dropped with the leaves themselves."""
    be.pwc_flushes.append(be.lpid)
    vm.stats["ppc_pwc_flush"] += 1


# --------------------------------------------------------------------------- lookups


def find_kvm_secondary_pte(be, gpa: int):
    """The present leaf covering ``gpa`` at any level: ``(table, idx, shift, pte)``, or None
    (find_kvm_secondary_pte / __find_linux_pte on the partition tree)."""
    pos, table, idx, raw = be.table.pt.lookup(gpa)
    if not raw:
        return None
    pte = be64_to_cpu(raw)
    if not (pte & _PAGE_PTE) or not pte_present(pte):
        return None
    return table, idx, be.fmt.geometry.shifts[pos], pte


# --------------------------------------------------------------------------- dirty accumulator


def kvmppc_update_dirty_map(be, vm, memslot, gfn4k: int, page_size: int) -> None:
    """Set the accumulator bits for ``page_size`` bytes from ``gfn4k`` (kvmppc_update_dirty_map
    into the first half of the bitmap). The model's accumulator is the slot's bitmap, reached
    through ``vm.mark_page_dirty_in_slot``; bits are clipped to the slot (Linux would write
    past the slot for the unaligned-gfn quirk)."""
    if memslot is None or memslot.dirty_bitmap is None:
        return
    end = min(gfn4k + (page_size >> SZ_4K_SHIFT), memslot.base_gfn + memslot.npages)
    for gfn in range(max(gfn4k, memslot.base_gfn), end):
        vm.mark_page_dirty_in_slot(memslot, gfn)


def _slot_for(vm, gpa: int, memslot):
    if memslot is not None:
        return memslot
    # Invalid slots are still live (the DELETE path publishes an INVALID copy first), and
    # their bitmap is still the one GET would read: search them too (one bisection).
    return vm.memslot_sets[0].search(gpa >> SZ_4K_SHIFT)


# --------------------------------------------------------------------------- unmap


def kvmppc_unmap_pte(be, vm, table, idx, gpa: int, shift: int, memslot=None) -> int:
    """Clear the whole leaf, tlbie it at its own size, and move C into the slot's dirty
    accumulator before it goes (kvmppc_unmap_pte). Returns the old entry."""
    old = kvmppc_radix_update_pte(table, idx, ~0 & (2**64 - 1), 0)
    kvmppc_radix_tlbie_page(be, vm, gpa, shift)
    page_size = be.fmt.page_size
    if shift and shift != be.fmt.page_shift:
        page_size = 1 << shift
        if shift == PMD_SHIFT:
            vm.stats["num_2M_pages"] -= 1
        elif shift == PUD_SHIFT:
            vm.stats["num_1G_pages"] -= 1
    gfn_gpa = gpa if be.unaligned_dirty_quirk else gpa & ~(page_size - 1)
    vm.stats["ppc_unmap_pte"] += 1
    vm.trace("ppc.unmap_pte", gpa=gpa, size=page_size, old=old)
    if old & _PAGE_DIRTY:
        memslot = _slot_for(vm, gpa, memslot)
        if memslot is not None:
            kvmppc_update_dirty_map(be, vm, memslot, gfn_gpa >> SZ_4K_SHIFT, page_size)
    return old


def kvm_unmap_radix(be, vm, memslot, start_gpa: int, end_gpa: int) -> None:
    """kvm_unmap_gfn_range_hv -> kvm_unmap_radix for each gfn of the range: any gfn of a huge
    leaf removes the whole leaf. One walk instead of a per-gfn loop."""
    def visit(ctx):
        pte = be64_to_cpu(ctx.pte)
        if not (pte & _PAGE_PTE and pte_present(pte)):
            return None
        first = max(ctx.addr, start_gpa)
        shift = ctx.geometry.shifts[ctx.pos]
        kvmppc_unmap_pte(be, vm, ctx.table, ctx.index, first, shift, memslot)
        ctx.pte = 0
        return None

    with batched_tlbie(be, vm):
        be.table.pt.walk(start_gpa, end_gpa, visit, LEAF)


def kvmppc_radix_flush_memslot(be, vm, memslot) -> None:
    """Unmap every leaf covering a page of the slot, then bump mmu_invalidate_seq so a fault
    that read the old slot retries (kvmppc_radix_flush_memslot)."""
    start = memslot.base_gfn << SZ_4K_SHIFT
    end = (memslot.base_gfn + memslot.npages) << SZ_4K_SHIFT
    kvm_unmap_radix(be, vm, memslot, start, end)
    vm.mmu_invalidate_seq_bump()


def kvmppc_unmap_free_entry_table(be, vm, table, idx, pos: int, gpa: int) -> None:
    """kvmppc_unmap_free_pud_entry_table / kvmppc_unmap_free_pmd_entry_table: clear the
    directory entry, flush the page-walk cache, then kvmppc_unmap_free_pmd / _pte with
    full=false: unmap the leaves left below (WARN for huge ones) and free the tables."""
    pde = _get(table, idx)
    _set(table, idx, 0)
    kvmppc_radix_flush_pwc(be, vm)
    pt = be.table.pt
    shifts = pt.geometry.shifts

    def leftover(ctx):
        pte = be64_to_cpu(ctx.pte)
        if pte & _PAGE_PTE and pte_present(pte):
            if not ctx.is_last_level:
                be.warn(f"leftover {ctx.size:#x} leaf at gpa {ctx.addr:#x} under a table "
                        "being replaced")
            kvmppc_unmap_pte(be, vm, ctx.table, ctx.index, ctx.addr, shifts[ctx.pos], None)

    child, base = dir_nlb(pde), gpa & ~((1 << shifts[pos]) - 1)
    pt.walk_subtree(child, pos + 1, base, leftover)
    pt.free_subtree(child, pos + 1)
    vm.stats["ppc_table_freed"] += 1


# --------------------------------------------------------------------------- create_pte


def kvmppc_create_pte_look(be, gpa: int) -> tuple[bool, bool, bool]:
    """kvmppc_create_pte's look at the tree before it takes kvm->mmu_lock, at ``gpa``: whether
    the PGD entry has no PUD table, the PUD entry no PMD table, the PMD entry no PTE table
    (what to pre-allocate for a leaf at each level)."""
    fmt = be.fmt
    shifts, masks = fmt.geometry.shifts, fmt.index_masks
    tables = be.table.store.tables
    pgd = tables[be.table.pt.root][(gpa >> shifts[0]) & masks[0]]
    if not pgd & _RAW_PRESENT:
        return _NO_TABLES
    pud = tables[be.nlb_of[pgd]][(gpa >> shifts[1]) & masks[1]]
    if not pud & _RAW_PRESENT or pud & _RAW_PTE:
        return _NO_PMD_TABLE
    pmd = tables[be.nlb_of[pud]][(gpa >> shifts[2]) & masks[2]]
    return _ALL_TABLES if pmd & _RAW_PRESENT and not pmd & _RAW_PTE else _NO_PTE_TABLE


_NO_TABLES = (True, True, True)
_NO_PMD_TABLE = (False, True, True)
_NO_PTE_TABLE = (False, False, True)
_ALL_TABLES = (False, False, False)


def kvmppc_create_pte(be, vm, pte: int, gpa: int, level: int, mmu_seq: int,
                      look: tuple[bool, bool, bool] | None = None) -> int:
    """Install ``pte`` (CPU order) for ``gpa`` at KVM level ``level`` (kvmppc_create_pte),
    under kvm->mmu_lock. ``look``: what ``kvmppc_create_pte_look`` saw before the lock (None:
    look now). Returns 0, -EAGAIN (mmu_seq changed, or a huge leaf where the look saw a table,
    so nothing was pre-allocated: nothing installed) or -ENOMEM.

    Entries are read as stored and tested with the stored form of their bits, as Linux's
    p4d_present, pud_leaf and pte_present test ``pte_raw`` against cpu_to_be64 constants; a
    directory entry's table is ``nlb_of[raw]`` (pud_pgtable, pmd_page_vaddr), and only the
    value of a leaf that is merged into is converted."""
    fmt = be.fmt
    g = fmt.geometry
    store = be.table.store
    tables = store.tables
    nlb_of = be.nlb_of
    root = tables[be.table.pt.root]
    # The table indexes of gpa, root first (pgd_index, pud_index, pmd_index, pte_index).
    shifts, masks = g.shifts, fmt.index_masks
    pgd_idx = (gpa >> shifts[0]) & masks[0]
    pud_idx = (gpa >> shifts[1]) & masks[1]
    pmd_idx = (gpa >> shifts[2]) & masks[2]
    pte_idx = (gpa >> shifts[3]) & masks[3]

    # Step A: pre-allocate what the lockless look asked for.
    no_pud, no_pmd, no_ptep = look or kvmppc_create_pte_look(be, gpa)
    new_pud = store.alloc(g.entries(1)) if no_pud else None
    new_pmd = store.alloc(g.entries(2)) if no_pmd and level <= LEVEL_PMD else None
    new_ptep = store.alloc(g.entries(3)) if no_ptep and level == LEVEL_PTE else None

    def cleanup(ret):
        # Step I: free what was not used.
        if new_pud is not None or new_pmd is not None or new_ptep is not None:
            for pa in (new_pud, new_pmd, new_ptep):
                if pa is not None:
                    store.free(pa)
        return ret

    # Step B: the sequence check under mmu_lock.
    if be.mmu_invalidate_retry(vm, mmu_seq):
        vm.stats["ppc_create_pte_eagain"] += 1
        return cleanup(-errno.EAGAIN)

    # Step C: PGD, read again under the lock.
    if not root[pgd_idx]:
        if new_pud is None:
            return cleanup(-errno.ENOMEM)
        _set(root, pgd_idx, fmt.make_table(new_pud, LEVEL_PGD))
        new_pud = None
    pud_table = tables[nlb_of[root[pgd_idx]]]

    # Step D: PUD entry.
    ret = _install_at(be, vm, pud_table, pud_idx, 1, LEVEL_PUD, pte, gpa, level,
                      have_table=new_pmd is not None)
    if ret is not None:
        return cleanup(ret)
    # Step E: populate PUD.
    if not pud_table[pud_idx]:
        if new_pmd is None:
            return cleanup(-errno.ENOMEM)
        _set(pud_table, pud_idx, fmt.make_table(new_pmd, LEVEL_PUD))
        new_pmd = None
    pmd_table = tables[nlb_of[pud_table[pud_idx]]]

    # Step F: PMD entry.
    ret = _install_at(be, vm, pmd_table, pmd_idx, 2, LEVEL_PMD, pte, gpa, level,
                      have_table=new_ptep is not None)
    if ret is not None:
        return cleanup(ret)
    # Step G: populate PMD.
    if not pmd_table[pmd_idx]:
        if new_ptep is None:
            return cleanup(-errno.ENOMEM)
        _set(pmd_table, pmd_idx, fmt.make_table(new_ptep, LEVEL_PMD))
        new_ptep = None
    pte_table = tables[nlb_of[pmd_table[pmd_idx]]]

    # Step H: base-page entry.
    old = pte_table[pte_idx]
    if old & _RAW_PTE and old & _RAW_PRESENT_OR_INVALID:        # pte_present
        _merge_extra_bits(be, vm, pte_table, pte_idx, be64_to_cpu(old), pte, gpa)
        return cleanup(0)
    _set(pte_table, pte_idx, pte)
    vm.stats["ppc_set_pte"] += 1
    return cleanup(0)


def _install_at(be, vm, table, idx, pos: int, here: int, pte: int, gpa: int, level: int,
                have_table: bool):
    """Steps D and F: the entry at KVM level ``here`` (PUD or PMD). Returns a result when the
    install is finished here, None to go on down."""
    cur = table[idx]
    if cur & _RAW_PTE and cur & _RAW_PRESENT_OR_INVALID:       # a present leaf
        if level == here:
            _merge_extra_bits(be, vm, table, idx, be64_to_cpu(cur), pte, gpa)
            return 0
        # A smaller mapping under an existing huge leaf: the leaf goes first.
        if not have_table:
            vm.stats["ppc_create_pte_raced_leaf"] += 1
            return -errno.EAGAIN
        shift = be.fmt.geometry.shifts[pos]
        kvmppc_unmap_pte(be, vm, table, idx, gpa & ~((1 << shift) - 1), shift, None)
        # The rest of the huge page refaults: allowed to take away what a completed access
        # used (the explorer's downgrade oracle counts it).
        vm.stats["fault_block_unmapped"] += 1
        cur = 0
    if level == here:
        if cur:
            # A huge leaf replaces a lower table (dirty logging turned off while base
            # pages were mapped).
            kvmppc_unmap_free_entry_table(be, vm, table, idx, pos, gpa)
        _set(table, idx, pte)
        vm.stats["ppc_set_pte"] += 1
        return 0
    return None


def _merge_extra_bits(be, vm, table, idx, old: int, new: int, gpa: int) -> None:
    """Re-fault onto a present leaf at the same level: identical -> nothing; otherwise OR the
    new bits in (W, C, R may be added, never removed), WARN_ONCE when anything else differs.
    No TLB flush (the "add our extra bits" path of kvmppc_create_pte)."""
    if old == new:
        vm.stats["ppc_pte_identical"] += 1
        return
    if (old ^ new) & PTE_BITS_MUST_MATCH:
        be.warn(f"kvmppc_create_pte: gpa {gpa:#x} old {old:#x} new {new:#x} differ outside "
                "W/C/R")
    kvmppc_radix_update_pte(table, idx, 0, new)
    vm.stats["ppc_pte_merged"] += 1


# --------------------------------------------------------------------------- instantiate


def kvmppc_book3s_instantiate_page(be, vm, fault, host_pte: int, host_shift: int,
                                   upgrade_write: bool,
                                   look: tuple[bool, bool, bool] | None = None
                                   ) -> tuple[int, int]:
    """Build the partition PTE from the host Linux PTE and install it
    (kvmppc_book3s_instantiate_page, steps 6-10; ``look``: kvmppc_create_pte's, taken before
    the lock). Returns ``(ret, level)``."""
    fmt = be.fmt
    page_shift = fmt.page_shift
    page_size = fmt.page_size
    memslot = fault.slot
    writing = fault.write
    gpa = fault.gfn << SZ_4K_SHIFT
    hva = fault.hva
    large_enable = not be.slot_logging(memslot)
    pte = host_pte

    # Step 6: the level, from the host PTE size and gpa/hva congruence only.
    if large_enable and host_shift == PUD_SHIFT and (
            (gpa & ((1 << PUD_SHIFT) - page_size)) == (hva & ((1 << PUD_SHIFT) - page_size))):
        level = LEVEL_PUD
    elif large_enable and host_shift == PMD_SHIFT and (
            (gpa & ((1 << PMD_SHIFT) - page_size)) == (hva & ((1 << PMD_SHIFT) - page_size))):
        level = LEVEL_PMD
    else:
        level = LEVEL_PTE
        if host_shift > page_shift:
            pte |= hva & ((1 << host_shift) - page_size)
    if not be.huge_past_slot and level != LEVEL_PTE:
        # Option: x86/arm64's rule that the whole block lies in the slot (off by default).
        if not memslot.supports_huge_mapping(fault.gfn, 1 << fmt.level_shift(level)):
            level = LEVEL_PTE
            pte = host_pte | (hva & ((1 << host_shift) - page_size))

    # Step 7: R and X always; C with W; read faults without upgrade lose W and C.
    pte |= _PAGE_EXEC | _PAGE_ACCESSED
    if writing or upgrade_write:
        if pte & _PAGE_WRITE:
            pte |= _PAGE_DIRTY
    else:
        pte &= ~(_PAGE_WRITE | _PAGE_DIRTY)

    gpa_aligned = gpa & ~((1 << fmt.level_shift(level)) - 1)
    if vm.events is not None:
        vm.trace("ppc.instantiate", gpa=gpa_aligned, level=level, pte=pte)
    # Step 8.
    ret = kvmppc_create_pte(be, vm, pte, gpa_aligned, level, fault.mmu_seq, look)
    # Step 10.
    if ret == 0:
        if level == LEVEL_PMD:
            vm.stats["num_2M_pages"] += 1
        elif level == LEVEL_PUD:
            vm.stats["num_1G_pages"] += 1
    return ret, level


# --------------------------------------------------------------------------- R/C


def kvmppc_hv_handle_set_rc(be, vm, writing: bool, gpa: int) -> bool:
    """The SET_RC fallback: OR R (and C when writing) into a present leaf that allows the
    access; no TLB flush (kvmppc_hv_handle_set_rc)."""
    found = find_kvm_secondary_pte(be, gpa)
    if found is None:
        return False
    table, idx, _shift, pte = found
    if writing and not pte_write(pte):
        return False
    kvmppc_radix_update_pte(table, idx, 0, _PAGE_ACCESSED | (_PAGE_DIRTY if writing else 0))
    return True


def kvm_radix_test_clear_dirty(be, vm, gpa: int):
    """Clear C of the leaf covering ``gpa`` and tlbie it; returns the bytes harvested (0 if
    clean). Linux VM_BUG_ONs a huge leaf here (logging allows only base pages); the model
    reports the whole leaf, as Linux did up to about v5.7."""
    found = find_kvm_secondary_pte(be, gpa)
    if found is None:
        return 0, 0
    table, idx, shift, pte = found
    if not pte_dirty(pte):
        return 0, 0
    kvmppc_radix_update_pte(table, idx, _PAGE_DIRTY, 0)
    kvmppc_radix_tlbie_page(be, vm, gpa, shift)
    return gpa & ~((1 << shift) - 1), 1 << shift


def kvmppc_hv_get_dirty_log_radix(be, vm, memslot) -> None:
    """Harvest and clear the C bits of every leaf of the slot, marking its pages dirty
    (kvmppc_hv_get_dirty_log_radix). Walks the mapped leaves instead of every page."""
    start = memslot.base_gfn << SZ_4K_SHIFT
    end = (memslot.base_gfn + memslot.npages) << SZ_4K_SHIFT
    dirty: list[int] = []

    def visit(ctx):
        pte = be64_to_cpu(ctx.pte)
        if pte & _PAGE_PTE and pte_present(pte) and pte_dirty(pte):
            dirty.append(max(ctx.addr, start))
        return None

    be.table.pt.walk(start, end, visit, LEAF)
    with batched_tlbie(be, vm):
        for gpa in dirty:
            base, size = kvm_radix_test_clear_dirty(be, vm, gpa)
            if size:
                vm.stats["ppc_c_harvested"] += 1
                kvmppc_update_dirty_map(be, vm, memslot, base >> SZ_4K_SHIFT, size)


# --------------------------------------------------------------------------- aging


def kvm_age_radix(be, vm, start_gpa: int, end_gpa: int, test_only: bool) -> bool:
    """kvm_age_radix / kvm_test_age_radix over a range: clear (or test) R only, no tlbie."""
    young = False

    def visit(ctx):
        nonlocal young
        pte = be64_to_cpu(ctx.pte)
        if pte & _PAGE_PTE and pte_present(pte) and pte_young(pte):
            young = True
            if test_only:
                return STOP
            kvmppc_radix_update_pte(ctx.table, ctx.index, _PAGE_ACCESSED, 0)
        return None

    be.table.pt.walk(start_gpa, end_gpa, visit, LEAF)
    return young


__all__ = [
    "kvmppc_radix_update_pte", "kvmppc_radix_tlbie_page", "kvmppc_radix_flush_pwc",
    "find_kvm_secondary_pte", "kvmppc_update_dirty_map", "kvmppc_unmap_pte", "kvm_unmap_radix",
    "kvmppc_radix_flush_memslot", "kvmppc_create_pte_look", "kvmppc_create_pte",
    "kvmppc_book3s_instantiate_page",
    "kvmppc_hv_handle_set_rc", "kvm_radix_test_clear_dirty", "kvmppc_hv_get_dirty_log_radix",
    "kvm_age_radix", "LEVEL_PGD",
]
