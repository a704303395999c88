"""A simple radix backend: the starting point ``kvmcore new-arch`` copies into a new plugin.

The format is made up, and deliberately plain, so that it can be replaced by real hardware:
four levels of 512 64-bit entries (shifts 39/30/21/12, a 48-bit input address), 4 KiB pages
and 2 MiB blocks. Entry bits:

====  =========================================================
0     valid (every valid leaf is readable)
1     table (levels 4..2); at level 2 a valid entry without it is a 2 MiB block
2     writable
3     executable
5     accessed (set by the walk; cleared by aging)
6     dirty (set by a write through the walk)
12+   output address (next table, or the page / block)
====  =========================================================

The format is declared (``Format``); the core's ``kvmcore.radix`` walks it: unmap, aging,
write protection, leaves, page-table bytes and the table invariants come from
``radix.RadixBackend``, dirty logging by write protection from its ``WriteProtectDirtyLog``,
the leaf size from ``radix.mapping_size``. What is left here is the policy of ``map_leaf``:
read faults in a logging slot map read-only, and a fault on a leaf of the same frame only
adds permissions. Replace the format, then the policies, and keep the conformance suite
green.
"""

from __future__ import annotations

from kvmcore import ArchInfo, hookimpl, radix
from kvmcore.pgtable import Geometry
from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X
from kvmcore.uapi import RET_PF_SPURIOUS, SZ_2M, SZ_4K

VALID, TABLE, WRITE, EXEC, ACCESSED, DIRTY = 1, 2, 4, 8, 32, 64
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
CAPS = frozenset({"readonly_mem", "dirty_log", "manual_dirty_protect", "initially_set",
                  "dirty_ring", "hugepage_2m", "relax_perms", "aging"})


class Format(radix.RadixFormat):
    """The entry format, declared for the core's walks."""

    geometry = Geometry(shifts=(39, 30, 21, 12), bits=(9, 9, 9, 9), level_ids=(4, 3, 2, 1),
                        ia_bits=48)
    leaf_levels = frozenset({1, 2})
    R, W, X, A, D = VALID, WRITE, EXEC, ACCESSED, DIRTY

    def is_valid(self, pte: int, level: int) -> bool:
        return bool(pte & VALID)

    def is_table(self, pte: int, level: int) -> bool:
        return level > 1 and bool(pte & TABLE)

    def table_address(self, pte: int, level: int) -> int:
        return pte & ADDR_MASK

    output_address = table_address

    def make_table(self, pa: int, level: int) -> int:
        return pa | VALID | TABLE

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        return pa | VALID | self.perm_bits(perms)


class RadixBackend(radix.RadixBackend):
    """One table per VM (address space 0: the model's vCPUs never run in another)."""

    arch_info = ArchInfo(name="radix", page_sizes=(SZ_4K, SZ_2M), levels=4,
                         vm_types={"default": CAPS},
                         description="kvmcore new-arch template: a plain 4-level radix table")
    FORMAT = Format()

    @hookimpl
    def map_leaf(self, vm, fault):
        """Choose the size, build the leaf, keep what a leaf of the same frame has."""
        size = radix.mapping_size(vm, fault, self.sizes, self.logging(fault.slot))
        perms = PERM_R | PERM_X | (PERM_W if self.writable(fault) else 0)
        perms |= (0 if fault.prefetch else PERM_A) | (PERM_D if fault.write and
                                                      perms & PERM_W else 0)
        t = self.table(fault.as_id)
        leaf = t.get_leaf(fault.gpa)
        if leaf is not None and t.size[leaf[0]] == size and (
                t.fmt.output_address(leaf[3], leaf[0]) >> 12 == fault.pfn - (
                    (fault.gpa & (size - 1)) >> 12)):
            old = t.fmt.perms(leaf[3])
            if not perms & ~old:
                return RET_PF_SPURIOUS
            perms |= old & (PERM_W | PERM_D | PERM_A)
        return self.install(vm, fault, size, perms)
