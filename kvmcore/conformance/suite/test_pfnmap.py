"""VM_IO|VM_PFNMAP: device memory without struct pages is mapped through the remapped path
(hva_to_pfn_remapped), with the PTE's pfn and writability (reference/core.md §7.2)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import covers, expect_mmio
from kvmcore.uapi import KVM_MEM_READONLY

GPA = 0x300_0000
DEV_PFN = 0xF_E000
SLOT_PAGES = 8  # the usual slot, in base pages


def test_pfnmap_maps_device_pfn(guest, host):
    """Seed: a fault on a VM_PFNMAP range maps the device pfn, on every backend."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, kind="pfnmap", pfn=DEV_PFN)
    guest.read(GPA + 3 * page)
    m = guest.vm.lookup(GPA + 3 * page)
    assert covers(m, GPA + 3 * page)
    assert m.pfn + ((GPA + 3 * page) >> 12) - m.gfn == DEV_PFN + 3 * (page >> 12)


def test_pfnmap_each_page_its_pfn(guest, host):
    """Page i of the device range is device pfn + i."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, kind="pfnmap", pfn=DEV_PFN)
    for i in range(slot_size // page):
        guest.read(GPA + i * page, 4)
    for i in range(slot_size // page):
        m = guest.vm.lookup(GPA + i * page)
        assert m.pfn + ((GPA + i * page) >> 12) - m.gfn == DEV_PFN + i * (page >> 12)


def test_pfnmap_write_is_writable(guest, host):
    """A write to a writable device mapping installs a writable leaf on the device pfn and the
    data lands in that device page."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, kind="pfnmap", pfn=DEV_PFN)
    guest.write(GPA + page, b"\x5a" * 8)
    m = guest.vm.lookup(GPA + page)
    assert m.writable and m.pfn + ((GPA + page) >> 12) - m.gfn == DEV_PFN + (page >> 12)
    assert host.read(hva + page, 8) == b"\x5a" * 8


def test_pfnmap_readonly_pte_not_writable(guest, host):
    """A read-only device mapping gives a read-only leaf (writable = PTE writable)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, kind="pfnmap", pfn=DEV_PFN, prot="r")
    guest.read(GPA)
    m = guest.vm.lookup(GPA)
    assert not m.writable and m.pfn + (GPA >> 12) - m.gfn == DEV_PFN


def test_pfnmap_munmap_zaps(guest, host):
    """No reference is held on pfnmap pages: safety relies on the notifier, which zaps."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, kind="pfnmap", pfn=DEV_PFN)
    guest.read(GPA)
    guest.read(GPA + page)
    host.munmap(hva, page)
    assert guest.vm.lookup(GPA) is None
    assert guest.vm.lookup(GPA + page) is not None


@pytest.mark.requires("readonly_mem")
def test_pfnmap_in_a_readonly_slot_is_never_writable(guest, host):
    """kvm_follow_pfn drops map_writable for a KVM_MEM_READONLY slot, so the remapped path
    (kvm_resolve_pfn) cannot report the device PTE's W: the leaf is read-only, and a guest
    write is an MMIO exit that leaves the device page alone."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, flags=KVM_MEM_READONLY, kind="pfnmap", pfn=DEV_PFN)
    guest.read(GPA + page)
    m = guest.vm.lookup(GPA + page)
    assert covers(m, GPA + page) and not m.writable
    before = host.read(hva + page, 8)
    expect_mmio(guest.write, GPA + page, 8, b"\x5a" * 8, GPA + page, b"\x5a" * 8)
    assert host.read(hva + page, 8) == before
    guest.vm.check_invariants()
