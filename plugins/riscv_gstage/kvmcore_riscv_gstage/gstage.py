"""The G-stage entry format, declared for the core's radix walks (``kvmcore.radix``).

A RISC-V PTE (asm/pgtable-bits.h): V bit 0, R 1, W 2, X 3, U 4, G 5, A 6, D 7, the PPN from
bit 10 (_PAGE_PFN_SHIFT). An entry with V and none of R/W/X points to the next table
(_PAGE_TABLE is _PAGE_PRESENT alone); any of R/W/X makes it a leaf (gstage_pte_leaf). The
G-stage of SvNNx4 has NN / 9 - 1 levels of 512 entries below a root of 2048 (the index
widened by kvm_riscv_gstage_pgd_xbits = 2: a 16 KiB root, asm/kvm_gstage.h), so the guest
physical address has 2 more bits than the mode's virtual one: 41, 50 or 59
(kvm_riscv_gstage_gpa_bits). Linux's levels count from the leaf: 0 is 4 KiB, 1 is 2 MiB,
2 is 1 GiB (gstage_page_size_to_level); KVM maps leaves at those three only
(kvm_riscv_mmu_map's PAGE_SIZE / PMD_SIZE / PUD_SIZE). All of this is the same in 6.18 and
later kernels.
"""

from __future__ import annotations

from kvmcore.pgtable import Geometry
from kvmcore.radix import RadixFormat

_PAGE_PRESENT, _PAGE_READ, _PAGE_WRITE, _PAGE_EXEC = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_PAGE_USER, _PAGE_GLOBAL, _PAGE_ACCESSED, _PAGE_DIRTY = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_PAGE_LEAF = _PAGE_READ | _PAGE_WRITE | _PAGE_EXEC
_PAGE_TABLE = _PAGE_PRESENT
_PAGE_PFN_SHIFT = 10
_PAGE_PFN_MASK = ((1 << 44) - 1) << _PAGE_PFN_SHIFT
HGATP_PAGE_SHIFT = 12
kvm_riscv_gstage_index_bits = 9
kvm_riscv_gstage_pgd_xbits = 2


def kvm_riscv_gstage_gpa_bits(pgd_levels: int) -> int:
    """The gpa bits of a G-stage of ``pgd_levels`` levels. 6.18's asm/kvm_gstage.h has it as
    a macro of the global kvm_riscv_gstage_pgd_levels (the boot-time mode every VM uses);
    the per-VM HGATP mode series (2026) makes it this function of the VM's levels."""
    return HGATP_PAGE_SHIFT + pgd_levels * kvm_riscv_gstage_index_bits + \
        kvm_riscv_gstage_pgd_xbits


def pfn_pte(pfn: int, prot: int) -> int:
    return (pfn << _PAGE_PFN_SHIFT) | prot


class GstageFormat(RadixFormat):
    """SvNNx4 with ``pgd_levels`` levels (3, 4 or 5)."""

    R, W, X, A, D = _PAGE_READ, _PAGE_WRITE, _PAGE_EXEC, _PAGE_ACCESSED, _PAGE_DIRTY
    leaf_levels = frozenset({0, 1, 2})
    #: A non-leaf PTE: V with none of R, W, X (the walker tests it inline).
    table_bits = (_PAGE_PRESENT | _PAGE_LEAF, _PAGE_PRESENT)

    def __init__(self, pgd_levels: int):
        self.pgd_levels = pgd_levels
        levels = range(pgd_levels - 1, -1, -1)
        self.geometry = Geometry(
            shifts=[HGATP_PAGE_SHIFT + kvm_riscv_gstage_index_bits * lvl for lvl in levels],
            bits=[kvm_riscv_gstage_index_bits + (kvm_riscv_gstage_pgd_xbits
                                                 if lvl == pgd_levels - 1 else 0)
                  for lvl in levels],
            level_ids=levels, ia_bits=kvm_riscv_gstage_gpa_bits(pgd_levels))

    def is_valid(self, pte: int, level: int) -> bool:
        return bool(pte & _PAGE_PRESENT)

    def is_table(self, pte: int, level: int) -> bool:
        return not pte & _PAGE_LEAF

    def table_address(self, pte: int, level: int) -> int:
        return (pte & _PAGE_PFN_MASK) >> _PAGE_PFN_SHIFT << 12

    output_address = table_address

    def make_table(self, pa: int, level: int) -> int:
        return pfn_pte(pa >> 12, _PAGE_TABLE)

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        """pfn_pte(pfn, prot): every G-stage leaf has V and U (_PAGE_BASE also holds A;
        the caller passes it, and D for pte_mkdirty)."""
        return pfn_pte(pa >> 12, _PAGE_PRESENT | _PAGE_USER | self.perm_bits(perms))

    def split_child(self, pte: int, level: int, child_level: int, index: int) -> int:
        """make_child_pte: the block's entry with the child's page offset ORed into the
        PPN; every other bit (W cleared by write protection included) is kept."""
        child_pages = 1 << (kvm_riscv_gstage_index_bits * child_level)
        return pte | pfn_pte(index * child_pages, 0)
