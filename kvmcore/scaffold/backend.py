"""A simple radix backend: the starting point ``kvmcore new-arch`` copies into a new plugin.

The format is made up, and deliberately plain, so that it can be replaced by real hardware:
four levels of 512 64-bit entries (shifts 39/30/21/12, a 48-bit input address), 4 KiB pages
and 2 MiB blocks. Entry bits:

====  =========================================================
0     valid
1     table (levels 4..2); at level 2 a valid entry without it is a 2 MiB block
2     writable
3     executable
5     accessed (set by the walk; cleared by aging)
6     dirty (set by a write through the walk)
12+   output address (next table, or the page / block)
====  =========================================================

Policies follow the flat reference backend (``kvmcore.testing``): dirty logging by write
protection, read faults in a logging slot map read-only, ``relax_perms`` adds W or X to one leaf
in place. Replace the format, then the policies, and keep the conformance suite green.
"""

from __future__ import annotations

import errno

from kvmcore import ArchInfo, KvmError, Mapping, hookimpl
from kvmcore.records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Translation, Violation
from kvmcore.pgtable import LEAF, TABLE_POST, Geometry, PageTable, TableStore, table_is_empty
from kvmcore.uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MR_DELETE,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    SZ_2M,
    SZ_4K,
)

VALID, TABLE, WRITE, EXEC, ACCESSED, DIRTY = 1, 2, 4, 8, 32, 64
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
GEOMETRY = Geometry(shifts=(39, 30, 21, 12), bits=(9, 9, 9, 9), level_ids=(4, 3, 2, 1),
                    ia_bits=48)
LEVEL_OF_SIZE = {SZ_4K: 1, SZ_2M: 2}
CAPS = frozenset({"readonly_mem", "dirty_log", "manual_dirty_protect", "initially_set",
                  "dirty_ring", "hugepage_2m", "relax_perms", "aging"})


class Format:
    """The entry format, as the walker needs it."""

    def is_valid(self, pte: int, level: int) -> bool:
        return bool(pte & VALID)

    def is_table(self, pte: int, level: int) -> bool:
        return level > 1 and bool(pte & TABLE)

    def table_address(self, pte: int, level: int) -> int:
        return pte & ADDR_MASK


def leaf_size(level: int) -> int:
    return 1 << GEOMETRY.shifts[GEOMETRY.pos_of(level)]


class RadixBackend:
    """One table per VM (address space 0: the model's vCPUs never run in another)."""

    arch_info = ArchInfo(name="radix", page_sizes=(SZ_4K, SZ_2M), levels=4,
                         vm_types={"default": CAPS},
                         description="kvmcore new-arch template: a plain 4-level radix table")

    def __init__(self, vm_type: str = "default", **options):
        if options:
            raise KvmError(errno.EINVAL, f"unknown VM options: {', '.join(sorted(options))}")
        self.store = TableStore()
        self.pt: PageTable | None = None

    # ------------------------------------------------------------------ life cycle

    @hookimpl
    def init_vm(self, vm):
        self.pt = PageTable(self.store, GEOMETRY, Format())

    # ------------------------------------------------------------------ the walk

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        gfn = gpa >> 12
        pos, table, idx, pte = self.pt.lookup(gpa)
        level = GEOMETRY.level_ids[pos]
        if not pte & VALID:
            return Violation(NOT_PRESENT, gfn, False, level)
        size = leaf_size(level)
        if not pte & ACCESSED:
            return Violation(ACCESS_FLAG, gfn, False, level, size)
        if (access.write and not pte & WRITE) or (access.exec and not pte & EXEC):
            return Violation(PERMISSION, gfn, False, level, size)
        if access.write and not pte & DIRTY:
            pte |= DIRTY
            table[idx] = pte
        base = (pte & ADDR_MASK) >> 12
        return Translation(gfn, base + (gfn & ((size >> 12) - 1)), size, True,
                           bool(pte & WRITE), bool(pte & EXEC), bool(pte & DIRTY))

    @hookimpl
    def fast_page_fault(self, vm, fault):
        """An access-flag fault: set the accessed bit in place."""
        if fault.kind != ACCESS_FLAG:
            return None
        _pos, table, idx, pte = self.pt.lookup(fault.gpa)
        if not pte & VALID:
            return None
        table[idx] = pte | ACCESSED
        return RET_PF_FIXED

    # ------------------------------------------------------------------ mapping

    def _choose_size(self, vm, fault) -> int:
        slot = fault.slot
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES or fault.max_size < SZ_2M:
            return SZ_4K
        if not slot.supports_huge_mapping(fault.gfn, SZ_2M):
            return SZ_4K
        start = fault.gfn & ~511
        if (fault.pfn - (fault.gfn - start)) % 512:
            return SZ_4K
        attr = vm.get_memory_attributes(fault.gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE
        if not vm.range_has_memory_attributes(start, start + 512, KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                              attr):
            return SZ_4K
        return SZ_2M

    def _entry(self, fault, size: int, logging: bool) -> int:
        base_pfn = fault.pfn - (fault.gfn & ((size >> 12) - 1))
        pte = VALID | EXEC | (base_pfn << 12)
        if fault.map_writable and (fault.write or not logging):
            pte |= WRITE
        if not fault.prefetch:
            pte |= ACCESSED
        if fault.write and pte & WRITE:
            pte |= DIRTY
        return pte

    @hookimpl
    def map_leaf(self, vm, fault):
        size = self._choose_size(vm, fault)
        target = LEVEL_OF_SIZE[size]
        logging = bool(fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
        new = self._entry(fault, size, logging)
        store, fmt = self.store, self.pt.fmt
        table = store[self.pt.root]
        gpa = fault.gpa
        for pos, level in enumerate(GEOMETRY.level_ids):
            idx = GEOMETRY.index(pos, gpa)
            pte = table[idx]
            if level == target:
                break
            if pte & VALID and not fmt.is_table(pte, level):
                # A block where a smaller leaf goes: replace it (the rest re-faults).
                table[idx] = 0
                vm.flush_remote_tlbs_range((gpa >> 12) & ~((leaf_size(level) >> 12) - 1),
                                           leaf_size(level) >> 12)
                pte = 0
            if not pte & VALID:
                child = store.alloc(512)
                table[idx] = child | VALID | TABLE
                pte = table[idx]
            table = store[pte & ADDR_MASK]
        if pte & VALID and fmt.is_table(pte, target):
            # A table where a block goes: free it and flush what it mapped.
            self.pt.free_subtree(pte & ADDR_MASK, GEOMETRY.pos_of(target) + 1)
            vm.flush_remote_tlbs_range((gpa >> 12) & ~((size >> 12) - 1), size >> 12)
            pte = 0
        if pte & VALID:
            if pte & ADDR_MASK == new & ADDR_MASK:
                if (pte | new) == pte:
                    return RET_PF_SPURIOUS
                new |= pte & (WRITE | DIRTY | ACCESSED)
            else:
                vm.flush_remote_tlbs_range(fault.gfn, 1)
        table[idx] = new
        if new & WRITE and logging:
            vm.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        return RET_PF_FIXED

    @hookimpl
    def relax_perms(self, vm, fault):
        pos, table, idx, pte = self.pt.lookup(fault.gpa)
        level = GEOMETRY.level_ids[pos]
        if not pte & VALID or leaf_size(level) != fault.fault_size:
            return None
        logging = bool(fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
        if fault.write:
            if not fault.map_writable or (logging and level != 1):
                return None
            pte |= WRITE
            if logging:
                vm.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        if fault.exec:
            pte |= EXEC
        table[idx] = pte
        return RET_PF_FIXED

    # ------------------------------------------------------------------ zapping

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        zapped = 0

        def visit(ctx):
            nonlocal zapped
            if ctx.flags == LEAF:
                ctx.set(0)
                zapped += 1
            elif table_is_empty(self.store[ctx.fmt.table_address(ctx.pte, ctx.level)]):
                self.store.free(ctx.fmt.table_address(ctx.pte, ctx.level))
                ctx.set(0)

        self.pt.walk(range.start << 12, range.end << 12, visit, LEAF | TABLE_POST)
        vm.stats["leaves_zapped"] += zapped
        return bool(zapped)

    @hookimpl
    def flush_shadow_all(self, vm):
        self.pt.destroy()
        self.pt = PageTable(self.store, GEOMETRY, Format())
        return True

    # ------------------------------------------------------------------ aging

    def _age(self, rng, clear: bool) -> bool:
        young = False

        def visit(ctx):
            nonlocal young
            if ctx.pte & ACCESSED:
                young = True
                if not clear:
                    return True
                ctx.set(ctx.pte & ~ACCESSED)
            return None

        self.pt.walk(rng.start << 12, rng.end << 12, visit, LEAF)
        return young

    @hookimpl
    def age_gfn(self, vm, range):
        return self._age(range, True)

    @hookimpl
    def test_age_gfn(self, vm, range):
        return self._age(range, False)

    # ------------------------------------------------------------------ dirty logging

    def _write_protect(self, start_gfn: int, end_gfn: int) -> None:
        def visit(ctx):
            ctx.set(ctx.pte & ~(WRITE | DIRTY))

        self.pt.walk(start_gfn << 12, end_gfn << 12, visit, LEAF)

    @hookimpl
    def commit_memory_region(self, vm, old, new, change):
        if change == KVM_MR_DELETE or new is None:
            return
        was = bool(old and old.flags & KVM_MEM_LOG_DIRTY_PAGES)
        if new.flags & KVM_MEM_LOG_DIRTY_PAGES and not was:
            if vm.dirty_log_manual_protect_and_init_set():
                return
            self._write_protect(new.base_gfn, new.end_gfn)
            vm.flush_remote_tlbs_memslot(new)

    @hookimpl
    def enable_log_dirty_pt_masked(self, vm, slot, gfn_offset, mask):
        base = slot.base_gfn + gfn_offset
        while mask:
            low = mask & -mask
            gfn = base + low.bit_length() - 1
            self._write_protect(gfn, gfn + 1)
            mask ^= low

    # ------------------------------------------------------------------ introspection

    @hookimpl
    def leaves(self, vm, start, end):
        found = []

        def visit(ctx):
            pte = ctx.pte
            found.append(Mapping(ctx.addr >> 12, ctx.size, (pte & ADDR_MASK) >> 12, True,
                                 bool(pte & WRITE), bool(pte & EXEC), False,
                                 bool(pte & ACCESSED), bool(pte & DIRTY), ctx.level, pte))

        self.pt.walk(start << 12, end << 12, visit, LEAF)
        return iter(found)

    @hookimpl
    def page_table_bytes(self, vm):
        return self.store.bytes_used

    @hookimpl
    def check_invariants(self, vm):
        problems = []
        fmt = self.pt.fmt
        for pa, pos in self.pt.tables():
            level = GEOMETRY.level_ids[pos]
            for idx, pte in enumerate(self.store[pa]):
                if not pte:
                    continue
                if not pte & VALID:
                    problems.append(f"radix: non-zero invalid entry {pte:#x} at level {level}")
                elif fmt.is_table(pte, level):
                    if pte & ADDR_MASK not in self.store:
                        problems.append(f"radix: table entry at level {level} points at "
                                        f"{pte & ADDR_MASK:#x}, not a table")
                elif level > 2:
                    problems.append(f"radix: a leaf at level {level} (only 4K and 2M exist)")
                elif ((pte & ADDR_MASK) >> 12) % (leaf_size(level) >> 12):
                    problems.append(f"radix: a {leaf_size(level):#x} leaf at index {idx} is "
                                    "not aligned")
        return problems
