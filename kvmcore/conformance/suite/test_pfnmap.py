"""VM_IO|VM_PFNMAP: device memory without struct pages is mapped through the remapped path
(hva_to_pfn_remapped), with the PTE's pfn and writability (reference/core.md §7.2)."""

from __future__ import annotations

from kvmcore.conformance.helpers import PAGE, covers

GPA = 0x300_0000
DEV_PFN = 0xF_E000
SIZE = 8 * PAGE


def test_pfnmap_maps_device_pfn(guest, host):
    """Seed: a fault on a VM_PFNMAP range maps the device pfn, on every backend."""
    guest.slot(0, GPA, SIZE, kind="pfnmap", pfn=DEV_PFN)
    guest.read(GPA + 3 * PAGE)
    m = guest.vm.lookup(GPA + 3 * PAGE)
    assert covers(m, GPA + 3 * PAGE)
    assert m.pfn + ((GPA + 3 * PAGE) >> 12) - m.gfn == DEV_PFN + 3


def test_pfnmap_each_page_its_pfn(guest, host):
    """Page i of the device range is device pfn + i."""
    guest.slot(0, GPA, SIZE, kind="pfnmap", pfn=DEV_PFN)
    for i in range(SIZE // PAGE):
        guest.read(GPA + i * PAGE, 4)
    for i in range(SIZE // PAGE):
        m = guest.vm.lookup(GPA + i * PAGE)
        assert m.pfn + ((GPA + i * PAGE) >> 12) - m.gfn == DEV_PFN + i


def test_pfnmap_write_is_writable(guest, host):
    """A write to a writable device mapping installs a writable leaf on the device pfn and the
    data lands in that device page."""
    hva = guest.slot(0, GPA, SIZE, kind="pfnmap", pfn=DEV_PFN)
    guest.write(GPA + PAGE, b"\x5a" * 8)
    m = guest.vm.lookup(GPA + PAGE)
    assert m.writable and m.pfn + ((GPA + PAGE) >> 12) - m.gfn == DEV_PFN + 1
    assert host.read(hva + PAGE, 8) == b"\x5a" * 8


def test_pfnmap_readonly_pte_not_writable(guest, host):
    """A read-only device mapping gives a read-only leaf (writable = PTE writable)."""
    guest.slot(0, GPA, SIZE, kind="pfnmap", pfn=DEV_PFN, prot="r")
    guest.read(GPA)
    m = guest.vm.lookup(GPA)
    assert not m.writable and m.pfn + (GPA >> 12) - m.gfn == DEV_PFN


def test_pfnmap_munmap_zaps(guest, host):
    """No reference is held on pfnmap pages: safety relies on the notifier, which zaps."""
    hva = guest.slot(0, GPA, SIZE, kind="pfnmap", pfn=DEV_PFN)
    guest.read(GPA)
    guest.read(GPA + PAGE)
    host.munmap(hva, PAGE)
    assert guest.vm.lookup(GPA) is None
    assert guest.vm.lookup(GPA + PAGE) is not None
