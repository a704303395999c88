"""The partition-scoped radix entry format declared for ``kvmcore.radix``: the tree geometry
(asm/book3s/64/radix-4k.h, radix-64k.h) and the entries (radix.h, pgtable.h, ``pte.py``).

Both geometries cover a 52-bit address space in four levels: the PGD indexes 13 bits, PUD and
PMD 9 each, and the PTE level 9 (4K base pages) or 5 (64K base pages). KVM's level numbers
(``kvmppc_create_pte``'s ``level``) are 0 for the PTE, 1 for the PMD (2M), 2 for the PUD (1G);
the PGD is 3 here and never holds a leaf.
"""

from __future__ import annotations

from kvmcore.pgtable import Geometry
from kvmcore.radix import PERM_R, PERM_W, RadixFormat

from .pte import (_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_EXEC, _PAGE_PRESENT, _PAGE_PTE, _PAGE_READ,
                  _PAGE_WRITE, _RAW_PRESENT, _RAW_PTE, cpu_to_be64, dir_entry, dir_nlb, pfn_pte,
                  pte_rpn_mask)

RADIX_PGTABLE_EADDR_SIZE = 52
RADIX_PGD_INDEX_SIZE = 13
RADIX_PUD_INDEX_SIZE = 9
RADIX_PMD_INDEX_SIZE = 9

PUD_SHIFT = 30
PMD_SHIFT = 21
PGD_SHIFT = 39

#: KVM's level numbers.
LEVEL_PTE, LEVEL_PMD, LEVEL_PUD, LEVEL_PGD = 0, 1, 2, 3

#: RTS of a 52-bit tree: 52 - 31 = 21, split as 0x5 in bits 5-7 and 0x2 in bits 61-62
#: (radix__get_tree_size).
RTS_FIELD = (0x2 << 61) | (0x5 << 5)
PATB_HR = 1 << 63


class PpcRadixFormat(RadixFormat):
    """A partition-scoped radix entry, for a base page of ``1 << page_shift`` (PAGE_SIZE, which
    sets RADIX_PTE_INDEX_SIZE: 9 for 4K, 5 for 64K). The hardware follows a directory entry
    (V, no L: NLB | NLS) and stops at a leaf (V and L; Linux's software _PAGE_INVALID is not
    V, so it stops the walk too); R/W/X are the EAA bits, R and C the accessed and dirty
    bits. Entries are stored big-endian."""

    big_endian = True
    R, W, X, A, D = _PAGE_READ, _PAGE_WRITE, _PAGE_EXEC, _PAGE_ACCESSED, _PAGE_DIRTY
    leaf_levels = frozenset({LEVEL_PTE, LEVEL_PMD, LEVEL_PUD})

    def __init__(self, page_shift: int):
        self.page_shift = page_shift
        self.page_size = 1 << page_shift
        self.pte_index_size = PMD_SHIFT - page_shift
        self.rpn_mask = pte_rpn_mask(page_shift)
        #: Root first: PGD, PUD, PMD, PTE.
        self.index_sizes = (RADIX_PGD_INDEX_SIZE, RADIX_PUD_INDEX_SIZE, RADIX_PMD_INDEX_SIZE,
                            self.pte_index_size)
        self.index_masks = tuple((1 << b) - 1 for b in self.index_sizes)
        self.geometry = Geometry(shifts=(PGD_SHIFT, PUD_SHIFT, PMD_SHIFT, page_shift),
                                 bits=self.index_sizes,
                                 level_ids=(LEVEL_PGD, LEVEL_PUD, LEVEL_PMD, LEVEL_PTE),
                                 ia_bits=RADIX_PGTABLE_EADDR_SIZE)
        self._stored = _StoredRadix()

    def level_shift(self, level: int) -> int:
        """The size a leaf at KVM level ``level`` maps (0: PAGE_SHIFT, 1: PMD, 2: PUD)."""
        return (self.page_shift, PMD_SHIFT, PUD_SHIFT, PGD_SHIFT)[level]

    def next_index_size(self, level: int) -> int:
        """The NLS a directory entry at ``level`` carries: the index size of the level below."""
        return self.index_sizes[LEVEL_PGD - level + 1]

    def is_valid(self, pte: int, level: int) -> bool:
        return bool(pte & _PAGE_PRESENT)

    def is_table(self, pte: int, level: int) -> bool:
        return not pte & _PAGE_PTE

    def table_address(self, pte: int, level: int) -> int:
        return dir_nlb(pte)

    def output_address(self, pte: int, level: int) -> int:
        """pte_pfn() << PAGE_SHIFT (pte_pa)."""
        return pte & self.rpn_mask

    def make_table(self, pa: int, level: int) -> int:
        """pgd/pud/pmd_populate: NLB | V | NLS of the level below."""
        return dir_entry(pa, self.next_index_size(level))

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        return pfn_pte(pa, _PAGE_PRESENT | self.perm_bits(perms), self.page_shift)

    def perms(self, pte: int) -> int:
        """As the generic decoding, except that write permission grants read (EAA RW)."""
        p = RadixFormat.perms(self, pte)
        return p | PERM_R if p & PERM_W else p

    def stored(self):
        return self._stored


class _StoredRadix:
    """The walker's tests on stored entries: V and L tested in place; the NLB of a directory
    entry read once per distinct entry (there are as many as tables), not swapped per walk."""

    __slots__ = ("nlb_of", "table_bits")
    empty = 0

    def __init__(self):
        #: Stored directory entry -> the table it links (pud_pgtable, pmd_page_vaddr).
        self.nlb_of = _NlbOf()
        #: A directory entry is V without L, its table ``nlb_of[raw]`` (PageTable.lookup
        #: tests and follows it inline).
        self.table_bits = (_RAW_PRESENT | _RAW_PTE, _RAW_PRESENT, self.nlb_of)

    def is_valid(self, raw: int, level: int) -> int:
        return raw & _RAW_PRESENT

    def is_table(self, raw: int, level: int) -> bool:
        return not raw & _RAW_PTE

    def table_address(self, raw: int, level: int) -> int:
        return self.nlb_of[raw]


class _NlbOf(dict):
    """Stored directory entry -> its NLB, filled on first use."""

    def __missing__(self, raw: int) -> int:
        nlb = self[raw] = dir_nlb(cpu_to_be64(raw))
        return nlb


def partition_table_dw0(root_pa: int) -> int:
    """kvmppc_setup_partition_table's first doubleword: HR | RTS | root | RPDS (13)."""
    return PATB_HR | RTS_FIELD | (root_pa & 0x0FFFFFFFFFFFF000) | RADIX_PGD_INDEX_SIZE
