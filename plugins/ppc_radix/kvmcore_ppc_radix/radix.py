"""Radix tree geometry (asm/book3s/64/radix-4k.h, radix-64k.h) and the entry format the
generic walker needs (radix.h).

Both geometries cover a 52-bit address space in four levels: the PGD indexes 13 bits, PUD and
PMD 9 each, and the PTE level 9 (4K base pages) or 5 (64K base pages). KVM's level numbers
(``kvmppc_create_pte``'s ``level``) are 0 for the PTE, 1 for the PMD (2M), 2 for the PUD (1G);
the PGD is 3 here and never holds a leaf.
"""

from __future__ import annotations

import attrs
from kvmcore.pgtable import Geometry

from .pte import _PAGE_PRESENT, _PAGE_PTE, be64_to_cpu, cpu_to_be64, dir_nlb

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


@attrs.frozen
class RadixConfig:
    """The base page and the index sizes it implies (RADIX_PTE_INDEX_SIZE: 9 for 4K, 5 for
    64K)."""

    page_shift: int

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def pte_index_size(self) -> int:
        return PMD_SHIFT - self.page_shift

    @property
    def index_sizes(self) -> tuple[int, int, int, int]:
        """Root first: PGD, PUD, PMD, PTE."""
        return (RADIX_PGD_INDEX_SIZE, RADIX_PUD_INDEX_SIZE, RADIX_PMD_INDEX_SIZE,
                self.pte_index_size)

    @property
    def geometry(self) -> Geometry:
        return Geometry(shifts=(PGD_SHIFT, PUD_SHIFT, PMD_SHIFT, self.page_shift),
                        bits=self.index_sizes,
                        level_ids=(LEVEL_PGD, LEVEL_PUD, LEVEL_PMD, LEVEL_PTE),
                        ia_bits=RADIX_PGTABLE_EADDR_SIZE)

    def level_shift(self, level: int) -> int:
        """The size a leaf at KVM level ``level`` maps (0: PAGE_SHIFT, 1: PMD, 2: PUD)."""
        return (self.page_shift, PMD_SHIFT, PUD_SHIFT, PGD_SHIFT)[level]

    def next_index_size(self, level: int) -> int:
        """The NLS a directory entry at ``level`` carries: the index size of the level below."""
        return {LEVEL_PGD: RADIX_PUD_INDEX_SIZE, LEVEL_PUD: RADIX_PMD_INDEX_SIZE,
                LEVEL_PMD: self.pte_index_size}[level]


#: V and L as they sit in a stored (big-endian) entry: a bit test commutes with the byte
#: swap, so a stored entry is tested without converting it, as Linux's pte_present does
#: (``pte_raw(pte) & cpu_to_be64(_PAGE_PRESENT)``).
_RAW_PRESENT = cpu_to_be64(_PAGE_PRESENT)
_RAW_PTE = cpu_to_be64(_PAGE_PTE)


class RadixFormat:
    """The walker's view of stored (big-endian) entries: hardware follows a directory entry
    when V is set and L is clear; a leaf is V and L (the hardware ignores Linux's software
    _PAGE_INVALID, so an entry without V stops the walk)."""

    __slots__ = ()

    def is_valid(self, raw: int, level: int) -> bool:
        return bool(raw & _RAW_PRESENT)

    def is_table(self, raw: int, level: int) -> bool:
        return not raw & _RAW_PTE

    def table_address(self, raw: int, level: int) -> int:
        return dir_nlb(be64_to_cpu(raw))


RADIX_FORMAT = RadixFormat()


def partition_table_dw0(root_pa: int) -> int:
    """kvmppc_setup_partition_table's first doubleword: HR | RTS | root | RPDS (13)."""
    return PATB_HR | RTS_FIELD | (root_pa & 0x0FFFFFFFFFFFF000) | RADIX_PGD_INDEX_SIZE


def populated_span(pgtable, start: int, end: int) -> tuple[int, int]:
    """Clip ``[start, end)`` to the part of the address space that the root's non-zero
    entries cover. The PGD has 8192 entries and a walk visits each in Python, so a walk of
    the whole 52-bit space would cost ~8192 steps even for an empty tree; finding the first
    and last non-zero root entry runs at C speed (the zero bytes are stripped)."""
    raw = pgtable.store[pgtable.root].tobytes()
    head = raw.rstrip(b"\0")
    if not head:
        return start, start
    first = (len(raw) - len(raw.lstrip(b"\0"))) // 8
    last = (len(head) - 1) // 8
    shift = pgtable.geometry.shifts[0]
    return max(start, first << shift), min(end, (last + 1) << shift)
