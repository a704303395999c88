"""MMIO exits: an access with no visible memslot, or a write to a read-only memslot, leaves
KVM_RUN with KVM_EXIT_MMIO (reference/core.md §1.5 __gfn_to_hva_many, §7.1 kvm_follow_pfn:
KVM_PFN_NOSLOT / KVM_PFN_ERR_RO_FAULT; invariant 9)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import expect_mmio, pattern
from kvmcore.uapi import KVM_MEM_READONLY

GPA = 0x20_0000
SLOT_PAGES = 8  # the usual slot, in base pages


def test_read_no_slot(guest):
    """A read with no memslot: MMIO exit (phys_addr, length, is_write=False, no data); nothing
    is mapped."""
    expect_mmio(guest.read, GPA + 0x10, 4, None, GPA + 0x10, 4)
    assert list(guest.vm.mappings()) == []


def test_write_no_slot(guest):
    """A write with no memslot: MMIO exit carrying the written bytes."""
    expect_mmio(guest.write, GPA + 0x20, 8, pattern(1), GPA + 0x20, pattern(1))
    assert list(guest.vm.mappings()) == []


def test_mmio_is_not_cached(guest):
    """Every access to an MMIO gpa exits again (no memory appears there)."""
    for _ in range(3):
        expect_mmio(guest.read, GPA, 8, None, GPA)


def test_gap_between_slots(guest):
    """A hole between two slots is MMIO; both slots are memory."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.slot(1, GPA + 2 * slot_size, slot_size)
    guest.write(GPA, pattern(2))
    guest.write(GPA + 2 * slot_size, pattern(3))
    expect_mmio(guest.read, GPA + slot_size + page, 8, None, GPA + slot_size + page)
    assert guest.read(GPA) == pattern(2)
    assert guest.read(GPA + 2 * slot_size) == pattern(3)


@pytest.mark.requires("readonly_mem")
def test_readonly_slot_read(guest, host):
    """A READONLY slot reads host memory; its leaf is never writable (invariant 9)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, KVM_MEM_READONLY)
    host.write(hva + page, pattern(4))
    assert guest.read(GPA + page) == pattern(4)
    m = guest.vm.lookup(GPA + page)
    assert m is not None and m.readable and not m.writable


@pytest.mark.requires("readonly_mem")
def test_readonly_slot_write_is_mmio(guest, host):
    """A write to a READONLY slot: KVM_PFN_ERR_RO_FAULT -> MMIO exit with the data; host memory
    is unchanged and no writable leaf appears."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, KVM_MEM_READONLY)
    host.write(hva + 2 * page, pattern(5))
    expect_mmio(guest.write, GPA + 2 * page, 8, pattern(6), GPA + 2 * page, pattern(6))
    assert host.read(hva + 2 * page, 8) == pattern(5)
    assert all(not m.writable for m in guest.vm.mappings())


@pytest.mark.requires("readonly_mem")
def test_readonly_slot_write_after_read(guest, host):
    """A write to a READONLY page already mapped for reads is MMIO too (the permission fault
    does not grant write)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, KVM_MEM_READONLY)
    host.write(hva, pattern(7))
    assert guest.read(GPA) == pattern(7)
    expect_mmio(guest.write, GPA, 4, pattern(8, 4), GPA, pattern(8, 4))
    assert guest.read(GPA) == pattern(7)
    assert not guest.vm.lookup(GPA).writable
