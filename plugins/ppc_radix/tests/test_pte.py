"""Entry formats: big-endian storage, leaf and directory bits, cache attributes."""

from array import array

import pytest

from kvmcore_ppc_radix import pte as P
from kvmcore_ppc_radix.radix import PpcRadixFormat

FMT = PpcRadixFormat(12)


def test_storage_is_big_endian():
    v = P._PAGE_PRESENT | P._PAGE_PTE | 0x1234000 | P._PAGE_READ
    t = array("Q", [P.cpu_to_be64(v)])
    raw = t.tobytes()
    assert raw == v.to_bytes(8, "big")
    assert raw[0] == 0xC0          # V and L are the first byte in memory, as on Power
    assert P.be64_to_cpu(t[0]) == v


def test_leaf_bit_values():
    assert (P._PAGE_ACCESSED, P._PAGE_DIRTY) == (0x100, 0x080)
    assert (P._PAGE_READ, P._PAGE_WRITE, P._PAGE_EXEC, P._PAGE_PRIVILEGED) == (4, 2, 1, 8)
    assert P._PAGE_CACHE_CTL == 0x30
    assert P.PTE_BITS_MUST_MATCH == ~0x182 & (2**64 - 1)


def test_pte_present_and_leaf():
    leaf = P.pfn_pte(0x5000, P._PAGE_PRESENT | P._PAGE_READ, 12)
    assert P.pte_present(leaf) and FMT.is_leaf(leaf, 1) and not FMT.is_table(leaf, 1)
    # _PAGE_INVALID | L counts as present for Linux (THP invalidation), V alone does not.
    assert P.pte_present((leaf & ~P._PAGE_PRESENT) | P._PAGE_INVALID)
    assert not P.pte_present(P._PAGE_PRESENT)
    assert not P.pte_present(0)


def test_rpn_mask_is_52_bit_and_page_aligned():
    assert P.pte_rpn_mask(12) == 0x001FFFFFFFFFF000
    assert P.pte_rpn_mask(16) == 0x001FFFFFFFFF0000
    top = (1 << 52) | (1 << 40)
    assert P.pte_pa(P.pfn_pte(top, P._PAGE_PRESENT, 12), 12) == top
    # Bits above _PAGE_PA_MAX never reach the RPN.
    assert P.pte_pa(P.pfn_pte(1 << 54, P._PAGE_PRESENT, 12), 12) == 0


def test_cache_attribute_helpers():
    base = P._PAGE_PRESENT | P._PAGE_READ | P._PAGE_SAO
    nc = P.pgprot_noncached(base)
    wc = P.pgprot_writecombine(base)
    assert P.pte_att(nc) == 0x20 and P.pte_ci(nc)
    assert P.pte_att(wc) == 0x30 and P.pte_ci(wc)
    assert P.pte_att(P.pgprot_cached(wc)) == 0 and not P.pte_ci(P.pgprot_cached(wc))
    assert not P.pte_ci(base)      # SAO (0x10) is cacheable


def test_directory_entry_format():
    d = P.dir_entry(0x4000_0000_1000, 9)
    assert d == 0x8000_4000_0000_1009
    assert FMT.is_valid(d, 1) and FMT.is_table(d, 1) and not d & P.RADIX_DIR_BAD_BITS
    assert P.dir_nlb(d) == 0x4000_0000_1000 and P.dir_nls(d) == 9
    assert FMT.make_table(0x4000_0000_1000, 2) == d
    # The walker's view tests the stored (big-endian) words in place.
    stored, raw = FMT.stored(), P.cpu_to_be64(d)
    assert stored.is_valid(raw, 1) and stored.is_table(raw, 1)
    assert stored.table_address(raw, 1) == 0x4000_0000_1000
    leaf = P.cpu_to_be64(P.pfn_pte(0x200000, P._PAGE_PRESENT, 12))
    assert stored.is_valid(leaf, 1) and not stored.is_table(leaf, 1)


@pytest.mark.parametrize("page_size,bits,shifts", [
    (4096, (13, 9, 9, 9), (39, 30, 21, 12)),
    (65536, (13, 9, 9, 5), (39, 30, 21, 16)),
])
def test_geometry(page_size, bits, shifts):
    cfg = PpcRadixFormat(page_size.bit_length() - 1)
    g = cfg.geometry
    assert g.bits == bits and g.shifts == shifts and g.ia_bits == 52
    assert sum(bits) + shifts[-1] == 52
    assert g.level_ids == (3, 2, 1, 0)
    assert [cfg.next_index_size(lv) for lv in (3, 2, 1)] == [9, 9, bits[-1]]
    assert [1 << cfg.level_shift(lv) for lv in (0, 1, 2)] == [page_size, 1 << 21, 1 << 30]


def test_describe():
    assert P.describe(0) == "none"
    assert "NLS=9" in P.describe(P.dir_entry(0x1000, 9))
    assert "ATT=0x20" in P.describe(P.pfn_pte(0, P.pgprot_noncached(P._PAGE_PRESENT), 12))


def test_leaf_permissions_and_output_address():
    """The format's logical view: EAA RW grants read, R/C are accessed/dirty, the RPN masks
    the base page."""
    from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X

    leaf = P.pfn_pte(0x1234_5000, P._PAGE_PRESENT | P._PAGE_WRITE | P._PAGE_DIRTY, 12)
    assert FMT.perms(leaf) == PERM_R | PERM_W | PERM_D
    assert FMT.output_address(leaf, 0) == P.pte_pa(leaf, 12) == 0x1234_5000
    made = FMT.make_leaf(0x20_0000, 1, PERM_R | PERM_X | PERM_A)
    assert made == P.pfn_pte(0x20_0000, P._PAGE_PRESENT | P._PAGE_READ | P._PAGE_EXEC
                             | P._PAGE_ACCESSED, 12)
    assert PpcRadixFormat(16).output_address(made | 0x8000, 1) == 0x20_0000
