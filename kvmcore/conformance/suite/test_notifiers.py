"""MMU notifiers: host mm changes zap the leaves built from the changed hvas, in every VM and
every slot that maps them, and nothing else (reference/core.md §2.2, §2.4; invariant 4)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import (
    covers,
    expect_error_pfn,
    leaves_outside,
    pattern,
)

GPA = 0x200_0000
SLOT_PAGES = 16  # the usual slot, in base pages


def _populate(guest, n=8):
    page = guest.vm.page_size
    for i in range(n):
        guest.write(GPA + i * page, pattern(i + 1))


def test_munmap_zaps_range_only(guest, host):
    """munmap: invalidate_range_start zaps the leaves of the unmapped pages; the others keep
    exactly their leaf."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    _populate(guest)
    keep = leaves_outside(guest.vm, GPA + 2 * page, 3 * page)
    host.munmap(hva + 2 * page, 3 * page)
    assert list(guest.vm.mappings()) == keep
    assert all(guest.vm.lookup(GPA + i * page) is None for i in (2, 3, 4))
    assert guest.read(GPA + 5 * page) == pattern(6)


def test_munmap_zaps_every_vm(guest, host, make_vm):
    """The notifier reaches every VM of the host mm."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    vm2 = make_vm()
    vm2.set_user_memory_region(0, GPA, slot_size, hva)
    v2 = vm2.create_vcpu(0)
    guest.write(GPA, pattern(1))
    assert v2.read(GPA, 8, private=False) == pattern(1)
    host.munmap(hva, page)
    assert guest.vm.lookup(GPA) is None and vm2.lookup(GPA) is None


def test_munmap_zaps_every_slot_of_the_hva(guest, host):
    """Two slots backed by the same hva: one munmap zaps both aliases."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.vm.set_user_memory_region(1, GPA + 4 * slot_size, slot_size, hva)
    guest.write(GPA + page, pattern(2))
    assert guest.read(GPA + 4 * slot_size + page) == pattern(2)
    host.munmap(hva + page, page)
    assert guest.vm.lookup(GPA + page) is None
    assert guest.vm.lookup(GPA + 4 * slot_size + page) is None


def test_notifier_outside_slots_changes_nothing(guest, host):
    """An hva range that no slot maps zaps nothing."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    _populate(guest, 4)
    other = host.mmap(slot_size)
    before = list(guest.vm.mappings())
    host.munmap(other, slot_size)
    assert list(guest.vm.mappings()) == before


def test_madvise_dontneed_zaps_and_zeroes(guest, host):
    """MADV_DONTNEED zaps the leaf and frees the anonymous page: the guest reads zeros."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    _populate(guest, 4)
    keep = leaves_outside(guest.vm, GPA + page, page)
    host.madvise_dontneed(hva + page, page)
    assert list(guest.vm.mappings()) == keep
    assert guest.read(GPA + page) == bytes(8)
    assert guest.read(GPA + 2 * page) == pattern(3)


def test_mprotect_readonly_zaps_and_remaps_readonly(guest, host):
    """mprotect(PROT_READ) zaps the writable leaf; the next read maps it read-only."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(4))
    assert guest.vm.lookup(GPA).writable
    host.mprotect(hva, page, "r")
    assert guest.vm.lookup(GPA) is None
    assert guest.read(GPA) == pattern(4)
    assert not guest.vm.lookup(GPA).writable


def test_mprotect_adding_write_zaps_too(guest, host):
    """mprotect back to read-write notifies as well (change_protection's
    MMU_NOTIFY_PROTECTION_VMA): the read-only leaf goes. The exclusive anonymous page is
    writable again at once (can_change_pte_writable), so the next write maps the same frame
    writable, with no COW."""
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, SLOT_PAGES * page)
    guest.write(GPA, pattern(4))
    pfn = guest.vm.lookup(GPA).pfn
    host.mprotect(hva, page, "r")
    assert guest.read(GPA) == pattern(4) and not guest.vm.lookup(GPA).writable
    host.mprotect(hva, page, "rw")
    assert guest.vm.lookup(GPA) is None
    guest.write(GPA + 8, pattern(5))
    m = guest.vm.lookup(GPA)
    assert m.writable and m.pfn == pfn and guest.read(GPA) == pattern(4)


def test_mprotect_none_keeps_the_page(guest, host):
    """PROT_NONE zaps the leaf and leaves the fault no page (its GUP fails: an error pfn),
    but the host keeps the page (change_pte_range makes protnone entries): after mprotect
    back to read-write the guest reads what it wrote."""
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, SLOT_PAGES * page)
    guest.write(GPA, pattern(4))
    host.mprotect(hva, page, "")
    assert guest.vm.lookup(GPA) is None
    expect_error_pfn(guest.vm, guest.read, GPA, gpa=GPA)
    host.mprotect(hva, page, "rw")
    assert guest.read(GPA) == pattern(4)


def test_migrate_zaps_and_moves(guest, host):
    """Migration: the leaf is zapped; the next access maps the new frame with the same data."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + 3 * page, pattern(5))
    old = guest.vm.lookup(GPA + 3 * page)
    host.migrate(hva + 3 * page)
    assert guest.vm.lookup(GPA + 3 * page) is None
    assert guest.read(GPA + 3 * page) == pattern(5)
    new = guest.vm.lookup(GPA + 3 * page)
    assert covers(new, GPA + 3 * page) and new.pfn != old.pfn


def test_cow_break_replaces_zero_page(guest, host):
    """A read of untouched anonymous memory maps the shared zero page read-only (GUP without
    FOLL_WRITE); the guest's write breaks COW: the notifier zaps it and a new writable page is
    mapped."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    assert guest.read(GPA + 6 * page) == bytes(8)
    ro = guest.vm.lookup(GPA + 6 * page)
    assert not ro.writable
    guest.write(GPA + 6 * page, pattern(6))
    rw = guest.vm.lookup(GPA + 6 * page)
    assert rw.writable and rw.pfn != ro.pfn
    assert guest.read(GPA + 6 * page) == pattern(6)
    # The zero page itself is unchanged: another untouched page still reads zero.
    assert guest.read(GPA + 7 * page) == bytes(8)


@pytest.mark.requires("hugepage_2m")
def test_thp_split_zaps_huge_leaf(guest, host):
    """Splitting a transparent huge page fires the notifier for its PMD range: the huge leaf
    goes; the next access maps a base-page leaf on the same frame as before."""
    page, pmd = guest.vm.page_size, host.pmd_size
    hva = host.mmap(2 * pmd, thp=True)
    guest.slot(0, 0x4000_0000, 2 * pmd, hva=hva)
    guest.write(0x4000_0000 + 5 * page, pattern(7))
    huge = guest.vm.lookup(0x4000_0000 + 5 * page)
    assert huge.size == max(s for s in guest.vm.arch_info.page_sizes if s <= pmd) > page
    host.split_huge_page(hva)
    assert guest.vm.lookup(0x4000_0000 + 5 * page) is None
    assert guest.read(0x4000_0000 + 5 * page) == pattern(7)
    small = guest.vm.lookup(0x4000_0000 + 5 * page)
    assert small.size == page and small.pfn == huge.pfn + 5 * (page >> 12)


def test_munmap_then_access_cannot_map(guest, host):
    """After munmap no leaf for the range is ever rebuilt from the dead hva."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(8))
    host.munmap(hva, slot_size)
    # hva_to_pfn finds no VMA: KVM_PFN_ERR_FAULT -> KVM_EXIT_MEMORY_FAULT, errno EFAULT
    # (x86), or KVM_RUN's -EFAULT alone.
    expect_error_pfn(guest.vm, guest.read, GPA, private=False, gpa=GPA)
    assert guest.vm.lookup(GPA) is None
