"""Dirty logging with bitmaps: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG with its errnos, manual
protect and INITIALLY_SET (reference/core.md §6.1-§6.4; invariants 16, 18).

Only writes are asserted as dirty: architectures differ on whether a read fault that maps a
page writable also logs it (x86 and ppc do, arm64 does not), so these tests never read a
logged page before checking a bitmap."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (
    base_page_gfns,
    expect_errno,
    expect_errno_unchanged,
    expect_error_pfn,
    pattern,
)
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

pytestmark = pytest.mark.requires("dirty_log")

GPA = 0x400_0000
NPAGES = 256
SLOT_PAGES = NPAGES  # the usual slot, in base pages
EINVAL, ENOENT = errno.EINVAL, errno.ENOENT


def dirty(vm, *offsets):
    """Slot-relative offsets a write to each page offset reports (whole base pages)."""
    page = vm.page_size
    slot_size = SLOT_PAGES * page
    out = set()
    for off in offsets:
        out.update(base_page_gfns(vm, GPA + off * page, GPA, slot_size))
    return sorted(out)


def test_get_dirty_log_reports_written_pages(guest):
    """GET returns exactly the written pages, ascending."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, LOG)
    for off in (200, 3, 64, 65):
        guest.write(GPA + off * page + 8, pattern(off))
    assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 3, 64, 65, 200)


def test_get_dirty_log_clears(guest):
    """Without manual protect, GET snapshots and clears: an immediate second GET is empty."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, LOG)
    guest.write(GPA + 10 * page, pattern(1))
    assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 10)
    assert guest.vm.get_dirty_log(0) == []


def test_write_after_get_reported_again(guest):
    """GET re-arms tracking for the reported pages: a write after the snapshot (even to a page
    already mapped writable) is reported next time."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, LOG)
    guest.write(GPA + 10 * page, pattern(1))
    guest.write(GPA + 11 * page, pattern(2))
    guest.vm.get_dirty_log(0)
    guest.write(GPA + 10 * page, pattern(3))
    assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 10)
    assert guest.read(GPA + 10 * page) == pattern(3)
    assert guest.read(GPA + 11 * page) == pattern(2)


def test_enable_logging_catches_writes_to_mapped_pages(guest):
    """FLAGS_ONLY enabling LOG_DIRTY_PAGES on a slot whose pages are already mapped writable:
    later writes to them are logged."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    for off in (1, 2, 3):
        guest.write(GPA + off * page, pattern(off))
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva, LOG)
    guest.write(GPA + 2 * page, pattern(9))
    assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 2)


def test_disable_logging_drops_bitmap(guest):
    """FLAGS_ONLY clearing LOG_DIRTY_PAGES frees the bitmap: GET is ENOENT."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, LOG)
    guest.write(GPA, pattern(1))
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva, 0)
    expect_errno(ENOENT, guest.vm.get_dirty_log, 0)
    assert guest.read(GPA) == pattern(1)


def test_get_without_logging_enoent(guest):
    """GET on a slot without a bitmap, or on no slot: ENOENT."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    expect_errno(ENOENT, guest.vm.get_dirty_log, 0)
    expect_errno(ENOENT, guest.vm.get_dirty_log, 7)


def test_get_bad_slot_einval(guest):
    """GET with as_id >= the address spaces, or id >= KVM_USER_MEM_SLOTS: EINVAL."""
    expect_errno(EINVAL, guest.vm.get_dirty_log, guest.vm.nr_address_spaces << 16)
    expect_errno(EINVAL, guest.vm.get_dirty_log, 0x7FFF)


def test_logging_slot_maps_base_pages(guest):
    """While a slot logs, write faults map base pages only (so one dirty bit = one leaf)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, LOG)
    guest.write(GPA + 5 * page, pattern(1))
    m = guest.vm.lookup(GPA + 5 * page)
    assert m.size == min(guest.vm.arch_info.page_sizes) and m.writable


def test_write_to_a_logged_page_the_host_made_read_only_exits(guest, host):
    """A dirty-logged slot whose host pages mprotect(PROT_READ) made read-only: a page mapped
    writable before is zapped by the notifier, a page read afterwards maps read-only; a
    write to either takes the host fault path (hva_to_pfn fails for the write:
    KVM_PFN_ERR_FAULT, KVM_EXIT_MEMORY_FAULT with EFAULT) and never gets W on its base-page
    leaf — a backend that grants W to any 4 KiB leaf of a logging slot on a write fault
    (the dirty-log fast path) would let the guest write a read-only host page. Nothing is
    logged, the host memory is unchanged."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, LOG)
    host.write(hva + 3 * page, pattern(1))
    guest.write(GPA + 4 * page, pattern(2))        # a writable leaf, logged
    host.mprotect(hva, slot_size, "r")
    assert guest.vm.lookup(GPA + 4 * page) is None
    assert guest.read(GPA + 3 * page) == pattern(1)
    assert not guest.vm.lookup(GPA + 3 * page).writable
    assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 4)
    for off, before in ((3, pattern(1)), (4, pattern(2))):
        expect_error_pfn(guest.vm, guest.write, GPA + off * page + 8, pattern(9),
                         private=False, gpa=GPA + off * page)
        m = guest.vm.lookup(GPA + off * page)
        assert m is None or not m.writable
        assert host.read(hva + off * page, 8) == before
    assert guest.vm.get_dirty_log(0) == []
    assert guest.read(GPA + 4 * page) == pattern(2)


@pytest.mark.requires("manual_dirty_protect")
class TestManualProtect:
    def test_get_does_not_clear(self, guest):
        """Manual protect: GET copies the bitmap out as it is, every time."""
        page = guest.vm.page_size
        slot_size = SLOT_PAGES * page
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, slot_size, LOG)
        guest.write(GPA + 7 * page, pattern(1))
        assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 7)
        assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 7)

    def test_clear_clears_listed_pages_only(self, guest):
        """CLEAR clears exactly the given bits; the others stay reported."""
        page = guest.vm.page_size
        slot_size = SLOT_PAGES * page
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, slot_size, LOG)
        for off in (1, 2, 100):
            guest.write(GPA + off * page, pattern(off))
        guest.vm.clear_dirty_log(0, 0, slot_size >> 12, dirty(guest.vm, 2))
        assert guest.vm.get_dirty_log(0) == sorted(set(dirty(guest.vm, 1, 100))
                                                    - set(dirty(guest.vm, 2)))

    def test_write_after_clear_reported(self, guest):
        """CLEAR re-arms tracking for the cleared pages."""
        page = guest.vm.page_size
        slot_size = SLOT_PAGES * page
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, slot_size, LOG)
        guest.write(GPA + 64 * page, pattern(1))
        first = (64 * page) >> 12
        guest.vm.clear_dirty_log(0, first, (slot_size >> 12) - first, dirty(guest.vm, 64))
        assert guest.vm.get_dirty_log(0) == []
        guest.write(GPA + 64 * page, pattern(2))
        assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 64)

    def test_clear_first_page_unaligned_einval_before_enoent(self, guest):
        """CLEAR checks first_page & 63 (EINVAL) before the slot (ENOENT)."""
        page = guest.vm.page_size
        slot_size = SLOT_PAGES * page
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, slot_size)
        expect_errno(EINVAL, guest.vm.clear_dirty_log, 0, 1, 64, [])
        expect_errno(ENOENT, guest.vm.clear_dirty_log, 0, 0, 64, [])

    # Bitmap offsets are 4 KiB gfns; ``end`` is the slot's count of them.
    @pytest.mark.parametrize("args", [
        pytest.param(lambda end: (end + 64, 0, []), id="first-past-end"),
        pytest.param(lambda end: (64, end, []), id="num-past-end"),
        pytest.param(lambda end: (0, 100, []), id="num-not-multiple-of-64"),
        pytest.param(lambda end: (0, 64, [64]), id="page-outside-range"),
    ])
    def test_clear_range_einval(self, guest, args):
        """CLEAR: first_page > npages, num_pages > npages - first_page, num_pages not a
        multiple of 64 short of the end, a page outside the range: EINVAL, bitmap
        unchanged."""
        page = guest.vm.page_size
        slot_size = SLOT_PAGES * page
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, slot_size, LOG)
        guest.write(GPA + 64 * page, pattern(1))
        expect_errno_unchanged(guest.vm, EINVAL, guest.vm.clear_dirty_log, 0,
                               *args(slot_size >> 12))
        assert guest.vm.get_dirty_log(0) == dirty(guest.vm, 64)

    def test_clear_to_end_any_count(self, guest):
        """num_pages need not be a multiple of 64 when the range runs to the slot's end."""
        page = guest.vm.page_size
        guest.vm.enable_dirty_log_manual_protect()
        guest.slot(0, GPA, 101 * page, LOG)   # 101 pages: never a multiple of 64 gfns
        guest.write(GPA + 100 * page, pattern(1))
        end = (101 * page) >> 12
        first = end // 64 * 64
        assert end - first not in (0, 64)
        guest.vm.clear_dirty_log(0, first, end - first, base_page_gfns(
            guest.vm, GPA + 100 * page, GPA, 101 * page))
        assert guest.vm.get_dirty_log(0) == []


@pytest.mark.requires("manual_dirty_protect", "initially_set")
def test_initially_set(guest):
    """KVM_DIRTY_LOG_INITIALLY_SET: a bitmap allocated afterwards starts with every page set."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_log_manual_protect(initially_set=True)
    guest.slot(0, GPA, 100 * page, LOG)
    end = (100 * page) >> 12
    assert guest.vm.get_dirty_log(0) == list(range(end))
    guest.vm.clear_dirty_log(0, 0, end, list(range(end)))
    assert guest.vm.get_dirty_log(0) == []
    guest.write(GPA + 50 * page, pattern(1))
    assert guest.vm.get_dirty_log(0) == base_page_gfns(guest.vm, GPA + 50 * page, GPA, 100 * page)
