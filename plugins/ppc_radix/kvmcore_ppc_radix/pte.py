"""Radix PTE and directory-entry formats (arch/powerpc/include/asm/book3s/64/pgtable.h,
radix.h, mmu.h).

Power stores page-table entries big-endian; the tables here are ``array('Q')`` holding exactly
the bytes the hardware would read, so on the little-endian hosts the model runs on every stored
word is the byte-swapped value (``kvmcore.radix.RadixFormat.big_endian``: the core swaps with
the same ``bswap64``). ``cpu_to_be64`` / ``be64_to_cpu`` are the crossing points (Linux's
``pte_raw`` / ``__pte_raw``); everything else works on CPU-order values.
"""

from __future__ import annotations

import struct

from kvmcore.radix import bswap64

be64_to_cpu = cpu_to_be64 = bswap64

_BE64 = struct.Struct(">Q")
#: ``be64_to_cpu(table[idx])`` and ``table[idx] = cpu_to_be64(val)`` in one C call each, on the
#: table's bytes (a load of a __be64 entry and its conversion): ``load_be64(table, idx << 3)[0]``.
load_be64 = _BE64.unpack_from
store_be64 = _BE64.pack_into

# --------------------------------------------------------------------------- leaf bits

_PAGE_PRESENT = 0x8000000000000000      # V
_PAGE_PTE = 0x4000000000000000          # L: a leaf, also at PMD/PUD level
_RPAGE_SW0 = 0x2000000000000000
_PAGE_INVALID = _RPAGE_SW0              # present-but-being-invalidated (host THP)
_RPAGE_PKEY_MASK = 0x1F00000000000000   # process-scoped keys, unused in partition tables
_RPAGE_SW1 = 0x800
_RPAGE_SW2 = 0x400
_RPAGE_SW3 = 0x200
_PAGE_DEVMAP = _RPAGE_SW1
_PAGE_SPECIAL = _RPAGE_SW2
_PAGE_SOFT_DIRTY = _RPAGE_SW3
_PAGE_ACCESSED = 0x100                  # R
_PAGE_DIRTY = 0x080                     # C
_RPAGE_RSV1 = 0x040
_PAGE_CACHE_CTL = 0x030                 # ATT field
_PAGE_SAO = 0x010
_PAGE_NON_IDEMPOTENT = 0x020            # cache-inhibited, guarded (pgprot_noncached)
_PAGE_TOLERANT = 0x030                  # cache-inhibited, tolerant (pgprot_writecombine)
_PAGE_PRIVILEGED = 0x008
_PAGE_READ = 0x004
_PAGE_WRITE = 0x002
_PAGE_EXEC = 0x001
_PAGE_RWX = _PAGE_READ | _PAGE_WRITE | _PAGE_EXEC

_PAGE_PA_MAX = 53                       # 52-bit real addresses (bits 12..52)
_RPAGE_PA_MAX = 56

#: Bits a re-fault may add to an existing leaf without a WARN (kvmppc_create_pte).
PTE_BITS_MUST_MATCH = ~(_PAGE_WRITE | _PAGE_DIRTY | _PAGE_ACCESSED) & (2**64 - 1)


def pte_rpn_mask(page_shift: int) -> int:
    """PTE_RPN_MASK: bits PAGE_SHIFT.._PAGE_PA_MAX-1."""
    return ((1 << _PAGE_PA_MAX) - 1) & ~((1 << page_shift) - 1)


#: The bits above as they sit in a stored (big-endian) entry: a bit test commutes with the byte
#: swap, so a stored entry is tested without converting it, as Linux's pte_present, pud_leaf
#: and pmd_present do (``pte_raw(pte) & cpu_to_be64(_PAGE_PRESENT)``).
_RAW_PRESENT = cpu_to_be64(_PAGE_PRESENT)
_RAW_PTE = cpu_to_be64(_PAGE_PTE)
_RAW_PRESENT_OR_INVALID = cpu_to_be64(_PAGE_PRESENT | _PAGE_INVALID)

# --------------------------------------------------------------------------- directory bits

RPDB_MASK = 0x0FFFFFFFFFFFFF00          # NLB: next-level base
RPDS_MASK = 0x1F                        # NLS: log2 of the next table's entries
RADIX_DIR_BAD_BITS = 0x60000000000000E0  # L, SW0 and bits 5-7 must be 0 in a directory entry

# --------------------------------------------------------------------------- DSISR (reg.h)

DSISR_NOHPTE = 0x40000000
DSISR_ATTR_CONFLICT = 0x20000000
DSISR_PROTFAULT = 0x08000000
DSISR_BADACCESS = 0x04000000
DSISR_ISSTORE = 0x02000000
DSISR_UNSUPP_MMU = 0x00080000
DSISR_SET_RC = 0x00040000
DSISR_PRTABLE_FAULT = 0x00020000


# --------------------------------------------------------------------------- helpers (CPU order)


def pte_present(pte: int) -> bool:
    """V and L, or _PAGE_INVALID and L (pgtable.h pte_present)."""
    return bool(pte & _PAGE_PTE) and bool(pte & (_PAGE_PRESENT | _PAGE_INVALID))


def pte_young(pte: int) -> bool:
    return bool(pte & _PAGE_ACCESSED)


def pte_dirty(pte: int) -> bool:
    return bool(pte & _PAGE_DIRTY)


def pte_write(pte: int) -> bool:
    return bool(pte & _PAGE_WRITE)


def pte_ci(pte: int) -> bool:
    """Cache-inhibited: ATT is NON_IDEMPOTENT or TOLERANT."""
    return (pte & _PAGE_CACHE_CTL) in (_PAGE_NON_IDEMPOTENT, _PAGE_TOLERANT)


def pte_att(pte: int) -> int:
    return pte & _PAGE_CACHE_CTL


def pgprot_noncached(prot: int) -> int:
    return (prot & ~_PAGE_CACHE_CTL) | _PAGE_NON_IDEMPOTENT


def pgprot_writecombine(prot: int) -> int:
    """pgprot_noncached_wc / pgprot_writecombine."""
    return (prot & ~_PAGE_CACHE_CTL) | _PAGE_TOLERANT


def pgprot_cached(prot: int) -> int:
    return prot & ~_PAGE_CACHE_CTL


def pfn_pte(pa: int, prot: int, page_shift: int) -> int:
    """pfn_pte: the real address (bytes, aligned to the base page) | prot | L."""
    return (pa & pte_rpn_mask(page_shift)) | prot | _PAGE_PTE


def pte_pa(pte: int, page_shift: int) -> int:
    """pte_pfn() << PAGE_SHIFT: the real address the leaf maps."""
    return pte & pte_rpn_mask(page_shift)


def dir_entry(table_pa: int, next_index_size: int) -> int:
    """A directory entry as Linux writes it (pgd/pud/pmd_populate): NLB | V | NLS of the
    next-lower level."""
    return (table_pa & RPDB_MASK) | _PAGE_PRESENT | next_index_size


def dir_nlb(pde: int) -> int:
    return pde & RPDB_MASK


def dir_nls(pde: int) -> int:
    return pde & RPDS_MASK


def describe(pte: int) -> str:
    """A human-readable decoding of a CPU-order entry (for dumps and error messages)."""
    if not pte:
        return "none"
    if not pte & _PAGE_PTE:
        return f"dir(V={int(bool(pte & _PAGE_PRESENT))} NLB={dir_nlb(pte):#x} NLS={dir_nls(pte)})"
    flags = "".join(c if pte & b else "-" for c, b in (
        ("V", _PAGE_PRESENT), ("I", _PAGE_INVALID), ("R", _PAGE_ACCESSED), ("C", _PAGE_DIRTY),
        ("P", _PAGE_PRIVILEGED), ("r", _PAGE_READ), ("w", _PAGE_WRITE), ("x", _PAGE_EXEC)))
    return f"leaf({flags} ATT={pte_att(pte):#x} RPN={pte & pte_rpn_mask(12):#x})"
