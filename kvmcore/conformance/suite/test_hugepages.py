"""Huge pages: a leaf is as large as the backing, the alignment of gpa and backing, the slot,
the memory attributes and dirty logging allow — never larger (reference/x86_tdp.md §4,
arm64_stage2.md §3.2, ppc_radix.md §2.2; Memslot.supports_huge_mapping).

Offsets written ``n * PAGE`` are 4 KiB steps inside one huge page, valid at every base page;
``page`` is the VM's base page where a test means one. A THP is the host's PMD size (2 MiB on
a 4 KiB host, 512 MiB on an arm64 64 KiB host)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import PAGE, SZ_1G, SZ_2M, covers, pattern
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

pytestmark = pytest.mark.requires("hugepage_2m")

GPA = 0x4000_0000  # 1 GiB: aligned for every block size


def test_hugetlb_2m_maps_2m(guest, host):
    """A 2 MiB hugetlb page under a congruent, fully covered gpa maps as one 2 MiB leaf."""
    hva = host.mmap(2 * SZ_2M, kind="hugetlb_2m")
    guest.slot(0, GPA, 2 * SZ_2M, hva=hva)
    guest.write(GPA + SZ_2M + 7 * PAGE, pattern(1))
    m = guest.vm.lookup(GPA + SZ_2M + 7 * PAGE)
    assert (m.gfn, m.size) == ((GPA + SZ_2M) >> 12, SZ_2M)
    assert guest.vm.lookup(GPA + SZ_2M + 300 * PAGE) == m
    assert guest.read(GPA + SZ_2M + 7 * PAGE) == pattern(1)


def thp_leaf_size(vm, host) -> int:
    """The leaf a THP maps as: the backend's largest leaf up to the host's PMD size."""
    return max(s for s in vm.arch_info.page_sizes if s <= host.pmd_size)


def test_thp_maps_pmd(guest, host):
    """An anonymous THP-backed range aligned to the host's PMD maps as one leaf of the largest
    size the backend has up to the PMD size (2 MiB on a 4 KiB host)."""
    pmd = host.pmd_size
    hva = host.mmap(2 * pmd, thp=True)
    guest.slot(0, GPA, 2 * pmd, hva=hva)
    guest.write(GPA + 3 * PAGE, pattern(2))
    assert guest.vm.lookup(GPA + 3 * PAGE).size == thp_leaf_size(guest.vm, host)


def test_small_pages_map_4k(guest, host):
    """4 KiB host pages (anon without THP) give 4 KiB leaves even when everything is aligned."""
    guest.slot(0, GPA, 2 * SZ_2M)
    guest.write(GPA + 3 * PAGE, pattern(3))
    assert guest.vm.lookup(GPA + 3 * PAGE).size == guest.vm.page_size


def test_incongruent_gpa_and_hva_map_4k(guest, host):
    """gpa and hva not congruent modulo 2 MiB: no huge leaf (supports_huge_mapping)."""
    hva = host.mmap(4 * SZ_2M, thp=True)
    guest.slot(0, GPA, 2 * SZ_2M, hva=hva + PAGE * 16)
    guest.write(GPA + SZ_2M, pattern(4))
    m = guest.vm.lookup(GPA + SZ_2M)
    assert m.size < SZ_2M
    assert guest.read(GPA + SZ_2M) == pattern(4)


def test_slot_smaller_than_block_maps_4k(guest, host):
    """A slot that does not cover the whole 2 MiB block: no huge leaf."""
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    guest.slot(0, GPA, SZ_2M // 2, hva=hva)
    guest.write(GPA + PAGE, pattern(5))
    m = guest.vm.lookup(GPA + PAGE)
    assert m.size < SZ_2M and m.gfn + (m.size >> 12) <= (GPA + SZ_2M // 2) >> 12


@pytest.mark.requires("dirty_log")
def test_dirty_logging_maps_base_pages(guest, host):
    """While a slot logs dirty pages, even a hugetlb backing maps base pages, and one write
    reports only its own base page."""
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    guest.slot(0, GPA, SZ_2M, LOG, hva=hva)
    guest.write(GPA + 9 * PAGE, pattern(6))
    m = guest.vm.lookup(GPA + 9 * PAGE)
    bp = min(guest.vm.arch_info.page_sizes)
    assert m.size == bp
    first = (9 * PAGE) & ~(bp - 1)
    assert guest.vm.get_dirty_log(0) == list(range(first >> 12, (first + bp) >> 12))


@pytest.mark.requires("dirty_log")
def test_enabling_logging_splits_writes(guest, host):
    """A 2 MiB leaf mapped before logging starts: after enabling logging a write maps (or
    splits to) a base page and is logged alone."""
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    guest.slot(0, GPA, SZ_2M, hva=hva)
    guest.write(GPA, pattern(7))
    assert guest.vm.lookup(GPA).size == SZ_2M
    guest.vm.set_user_memory_region(0, GPA, SZ_2M, hva, LOG)
    guest.write(GPA + 100 * PAGE, pattern(8))
    bp = min(guest.vm.arch_info.page_sizes)
    assert guest.vm.lookup(GPA + 100 * PAGE).size == bp
    first = (100 * PAGE) & ~(bp - 1)
    assert guest.vm.get_dirty_log(0) == list(range(first >> 12, (first + bp) >> 12))
    assert guest.read(GPA) == pattern(7)


@pytest.mark.requires("private_mem", "gmem")
def test_mixed_attributes_map_4k(guest, host):
    """A 2 MiB range whose gfns have mixed attributes is never mapped by one leaf: a shared
    access next to one private gfn maps less than 2 MiB."""
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    gmem = guest.vm.create_guest_memfd(SZ_2M)
    from kvmcore.uapi import KVM_MEM_GUEST_MEMFD

    guest.vm.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    page = guest.vm.page_size
    guest.make_private(GPA + 5 * page, page)
    guest.write(GPA + 6 * page, pattern(9))
    m = guest.vm.lookup(GPA + 6 * page)
    assert covers(m, GPA + 6 * page) and m.size < SZ_2M
    assert not covers(m, GPA + 5 * page)
    # Converting the page back makes the range uniform: a 2 MiB leaf is possible again.
    guest.make_shared(GPA + 5 * page, page)
    guest.write(GPA + 300 * PAGE, pattern(10))
    assert guest.vm.lookup(GPA + 300 * PAGE).size == SZ_2M


@pytest.mark.requires("private_mem", "gmem")
@pytest.mark.parametrize("order", [0, 1])
def test_small_gmem_folio_maps_4k(guest, order):
    """Seed: a guest_memfd backing of order 0 or 1 (8 KiB folios) maps at 4 KiB — never at
    the folio size, which no architecture has as a leaf, and never at 2 MiB — even in an
    aligned 2 MiB slot; the neighbour in the same folio maps separately."""
    page = guest.vm.page_size
    gmem = guest.vm.create_guest_memfd(SZ_2M, 0, folio_order=order)
    guest.gmem_slot(0, GPA, SZ_2M, gmem=gmem)
    guest.make_private(GPA, SZ_2M)
    guest.write(GPA + 2 * page, pattern(11), private=True)
    m = guest.vm.lookup(GPA + 2 * page, private=True)
    assert m.private and (m.gfn, m.size) == ((GPA + 2 * page) >> 12, page)
    assert guest.vm.lookup(GPA + 3 * page, private=True) is None
    guest.write(GPA + 3 * page, pattern(12), private=True)
    n = guest.vm.lookup(GPA + 3 * page, private=True)
    assert (n.gfn, n.size) == ((GPA + 3 * page) >> 12, page)
    assert guest.read(GPA + 2 * page, private=True) == pattern(11)


@pytest.mark.requires("hugepage_1g")
def test_hugetlb_1g_maps_1g(guest, host):
    """A 1 GiB hugetlb page under a congruent 1 GiB slot maps as one 1 GiB leaf."""
    hva = host.mmap(SZ_1G, kind="hugetlb_1g")
    guest.slot(0, GPA, SZ_1G, hva=hva)
    guest.write(GPA + 12345 * PAGE, pattern(12))
    m = guest.vm.lookup(GPA + 12345 * PAGE)
    assert (m.gfn, m.size) == (GPA >> 12, SZ_1G)



def test_partial_munmap_of_thp_zaps_huge_leaf(guest, host):
    """MADV_DONTNEED of one base page inside a THP-backed huge leaf zaps the whole leaf; the
    other pages keep their data."""
    page, pmd = guest.vm.page_size, host.pmd_size
    hva = host.mmap(pmd, thp=True)
    guest.slot(0, GPA, pmd, hva=hva)
    guest.write(GPA + 2 * PAGE, pattern(14))
    assert guest.vm.lookup(GPA + 2 * PAGE).size == thp_leaf_size(guest.vm, host)
    host.madvise_dontneed(hva + 10 * page, page)
    assert guest.vm.lookup(GPA + 2 * PAGE) is None
    assert guest.read(GPA + 2 * PAGE) == pattern(14)
    assert guest.read(GPA + 10 * page) == bytes(8)
