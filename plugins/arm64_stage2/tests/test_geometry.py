"""Geometry: levels, start level, concatenated roots, SL0/T0SZ for every IPA size 32..48 and
every granule, checked against the reference formulas (arm64_stage2.md §2.2, invariant 17) and
its worked examples."""

from __future__ import annotations

import errno

import pytest
from kvmcore.errors import KvmError

from kvmcore_arm64_stage2.geometry import (VTCR_EL2_HA, VTCR_EL2_HD, VTCR_EL2_DS,
                                           Stage2Geometry)
from kvmcore_arm64_stage2.pgtable import Stage2PageTable

PAGE_SHIFT = {4096: 12, 16384: 14, 65536: 16}


def reference(granule: int, ipa: int) -> tuple[int, int, int, int, int]:
    """The reference's formulas, written out independently of the implementation."""
    ps = PAGE_SHIFT[granule]
    levels = max(2, (ipa - 8) // (ps - 3))
    start = 4 - levels
    shift_above_root = (ps - 3) * (4 - (start - 1)) + 3
    root = (((1 << ipa) - 1) >> shift_above_root) + 1
    base = 2 if granule == 4096 else 3
    return levels, start, root, base - start, 64 - ipa


TABLE = [(g, ipa) for g in (4096, 16384, 65536) for ipa in range(32, 49)]


@pytest.mark.parametrize("granule,ipa", TABLE, ids=[f"{g // 1024}K-{i}" for g, i in TABLE])
def test_geometry_table_matches_reference_formulas(granule, ipa):
    g = Stage2Geometry(granule, ipa)
    levels, start, root, sl0, t0sz = reference(granule, ipa)
    assert (g.levels, g.start_level, g.root_pages, g.sl0, g.t0sz) == (levels, start, root, sl0,
                                                                      t0sz)
    assert g.start_level >= 0, "stage-2 never starts at level -1"
    assert 1 <= g.root_pages <= 16
    # VTCR_EL2 round-trips to the same walk parameters (__kvm_pgtable_stage2_init).
    assert Stage2Geometry.decode_vtcr(g.vtcr) == (ipa, start)
    # The allocated root really has that many concatenated pages of PTRS_PER_PTE entries.
    pt = Stage2PageTable(g)
    assert len(pt.store[pt.root]) == root * (granule // 8)
    assert pt.root % (root * granule) == 0


WORKED = [
    (4096, 32, 2, 2, 4), (4096, 36, 3, 1, 1), (4096, 40, 3, 1, 2), (4096, 42, 3, 1, 8),
    (4096, 43, 3, 1, 16), (4096, 44, 4, 0, 1), (4096, 48, 4, 0, 1), (16384, 40, 2, 2, 16),
    (16384, 48, 3, 1, 2), (65536, 40, 2, 2, 1), (65536, 46, 2, 2, 16), (65536, 48, 3, 1, 1),
]


@pytest.mark.parametrize("granule,ipa,levels,start,root", WORKED)
def test_reference_worked_examples(granule, ipa, levels, start, root):
    g = Stage2Geometry(granule, ipa)
    assert (g.levels, g.start_level, g.root_pages) == (levels, start, root)


@pytest.mark.parametrize("ipa", [0, 31, 49, 52, 64])
def test_ipa_size_outside_32_48_is_einval_except_default(ipa):
    if ipa == 0:
        assert Stage2Geometry.from_options(ipa_bits=0).ipa_bits == 40
        return
    with pytest.raises(KvmError) as e:
        Stage2Geometry.from_options(ipa_bits=ipa)
    assert e.value.errno == errno.EINVAL and "ipa_bits" in str(e.value)


@pytest.mark.parametrize("granule", [0, 8192, 2 << 20])
def test_bad_granule_is_einval(granule):
    with pytest.raises(KvmError) as e:
        Stage2Geometry.from_options(granule=granule)
    assert e.value.errno == errno.EINVAL and "granule" in str(e.value)


@pytest.mark.parametrize("granule,blocks,min_level", [
    (4096, (1 << 30, 2 << 20, 4096), 1),
    (16384, (32 << 20, 16384), 2),
    (65536, (512 << 20, 65536), 2),
])
def test_block_sizes_per_granule(granule, blocks, min_level):
    g = Stage2Geometry(granule, 48)
    assert g.min_block_level == min_level
    assert g.supported_block_sizes() == blocks
    assert not g.is_block_size_supported(3 * granule)
    assert not g.is_block_size_supported(g.size(min_level - 1))


def test_vtcr_flags():
    """Invariant 21: HD and DS never; HA only with hardware AF update; TG0 per granule."""
    for granule, tg0 in ((4096, 0), (16384, 2), (65536, 1)):
        g = Stage2Geometry(granule, 40)
        assert (g.vtcr >> 14) & 3 == tg0
        assert not g.vtcr & (VTCR_EL2_HD | VTCR_EL2_DS)
        assert not g.vtcr & VTCR_EL2_HA
        assert Stage2Geometry(granule, 40, hw_af=True).vtcr & VTCR_EL2_HA
        assert (g.vtcr >> 16) & 7 == 5  # PS: 48 bits
