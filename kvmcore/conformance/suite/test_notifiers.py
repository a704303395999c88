"""MMU notifiers: host mm changes zap the leaves built from the changed hvas, in every VM and
every slot that maps them, and nothing else (reference/core.md §2.2, §2.4; invariant 4)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import (
    PAGE,
    SZ_2M,
    covers,
    expect_memory_fault,
    leaves_outside,
    pattern,
)

GPA = 0x200_0000
SIZE = 16 * PAGE


def _populate(guest, n=8):
    for i in range(n):
        guest.write(GPA + i * PAGE, pattern(i + 1))


def test_munmap_zaps_range_only(guest, host):
    """munmap: invalidate_range_start zaps the leaves of the unmapped pages; the others keep
    exactly their leaf."""
    hva = guest.slot(0, GPA, SIZE)
    _populate(guest)
    keep = leaves_outside(guest.vm, GPA + 2 * PAGE, 3 * PAGE)
    host.munmap(hva + 2 * PAGE, 3 * PAGE)
    assert list(guest.vm.mappings()) == keep
    assert all(guest.vm.lookup(GPA + i * PAGE) is None for i in (2, 3, 4))
    assert guest.read(GPA + 5 * PAGE) == pattern(6)


def test_munmap_zaps_every_vm(guest, host, make_vm):
    """The notifier reaches every VM of the host mm."""
    hva = guest.slot(0, GPA, SIZE)
    vm2 = make_vm()
    vm2.set_user_memory_region(0, GPA, SIZE, hva)
    v2 = vm2.create_vcpu(0)
    guest.write(GPA, pattern(1))
    assert v2.read(GPA, 8, private=False) == pattern(1)
    host.munmap(hva, PAGE)
    assert guest.vm.lookup(GPA) is None and vm2.lookup(GPA) is None


def test_munmap_zaps_every_slot_of_the_hva(guest, host):
    """Two slots backed by the same hva: one munmap zaps both aliases."""
    hva = guest.slot(0, GPA, SIZE)
    guest.vm.set_user_memory_region(1, GPA + 4 * SIZE, SIZE, hva)
    guest.write(GPA + PAGE, pattern(2))
    assert guest.read(GPA + 4 * SIZE + PAGE) == pattern(2)
    host.munmap(hva + PAGE, PAGE)
    assert guest.vm.lookup(GPA + PAGE) is None
    assert guest.vm.lookup(GPA + 4 * SIZE + PAGE) is None


def test_notifier_outside_slots_changes_nothing(guest, host):
    """An hva range that no slot maps zaps nothing."""
    guest.slot(0, GPA, SIZE)
    _populate(guest, 4)
    other = host.mmap(SIZE)
    before = list(guest.vm.mappings())
    host.munmap(other, SIZE)
    assert list(guest.vm.mappings()) == before


def test_madvise_dontneed_zaps_and_zeroes(guest, host):
    """MADV_DONTNEED zaps the leaf and frees the anonymous page: the guest reads zeros."""
    hva = guest.slot(0, GPA, SIZE)
    _populate(guest, 4)
    keep = leaves_outside(guest.vm, GPA + PAGE, PAGE)
    host.madvise_dontneed(hva + PAGE, PAGE)
    assert list(guest.vm.mappings()) == keep
    assert guest.read(GPA + PAGE) == bytes(8)
    assert guest.read(GPA + 2 * PAGE) == pattern(3)


def test_mprotect_readonly_zaps_and_remaps_readonly(guest, host):
    """mprotect(PROT_READ) zaps the writable leaf; the next read maps it read-only."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(4))
    assert guest.vm.lookup(GPA).writable
    host.mprotect(hva, PAGE, "r")
    assert guest.vm.lookup(GPA) is None
    assert guest.read(GPA) == pattern(4)
    assert not guest.vm.lookup(GPA).writable


def test_migrate_zaps_and_moves(guest, host):
    """Migration: the leaf is zapped; the next access maps the new frame with the same data."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA + 3 * PAGE, pattern(5))
    old = guest.vm.lookup(GPA + 3 * PAGE)
    host.migrate(hva + 3 * PAGE)
    assert guest.vm.lookup(GPA + 3 * PAGE) is None
    assert guest.read(GPA + 3 * PAGE) == pattern(5)
    new = guest.vm.lookup(GPA + 3 * PAGE)
    assert covers(new, GPA + 3 * PAGE) and new.pfn != old.pfn


def test_cow_break_replaces_zero_page(guest, host):
    """A read of untouched anonymous memory maps the shared zero page read-only (GUP without
    FOLL_WRITE); the guest's write breaks COW: the notifier zaps it and a new writable page is
    mapped."""
    guest.slot(0, GPA, SIZE)
    assert guest.read(GPA + 6 * PAGE) == bytes(8)
    ro = guest.vm.lookup(GPA + 6 * PAGE)
    assert not ro.writable
    guest.write(GPA + 6 * PAGE, pattern(6))
    rw = guest.vm.lookup(GPA + 6 * PAGE)
    assert rw.writable and rw.pfn != ro.pfn
    assert guest.read(GPA + 6 * PAGE) == pattern(6)
    # The zero page itself is unchanged: another untouched page still reads zero.
    assert guest.read(GPA + 7 * PAGE) == bytes(8)


@pytest.mark.requires("hugepage_2m")
def test_thp_split_zaps_huge_leaf(guest, host):
    """Splitting a transparent huge page fires the notifier for its 2 MiB: the 2 MiB leaf goes;
    the next access maps a 4 KiB leaf on the same frame as before."""
    hva = host.mmap(2 * SZ_2M, thp=True)
    guest.slot(0, 0x4000_0000, 2 * SZ_2M, hva=hva)
    guest.write(0x4000_0000 + 5 * PAGE, pattern(7))
    huge = guest.vm.lookup(0x4000_0000 + 5 * PAGE)
    assert huge.size == SZ_2M
    host.split_huge_page(hva)
    assert guest.vm.lookup(0x4000_0000 + 5 * PAGE) is None
    assert guest.read(0x4000_0000 + 5 * PAGE) == pattern(7)
    small = guest.vm.lookup(0x4000_0000 + 5 * PAGE)
    assert small.size == PAGE and small.pfn == huge.pfn + 5


def test_munmap_then_access_cannot_map(guest, host):
    """After munmap no leaf for the range is ever rebuilt from the dead hva."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(8))
    host.munmap(hva, SIZE)
    # hva_to_pfn finds no VMA: KVM_PFN_ERR_FAULT -> KVM_EXIT_MEMORY_FAULT, errno EFAULT.
    expect_memory_fault(guest.read, GPA, private=False, gpa=GPA, exit_private=False)
    assert guest.vm.lookup(GPA) is None
