"""relax_perms: a permission fault on a present leaf adds permissions in place — same frame,
same size, nothing removed (arm64 kvm_pgtable_stage2_relax_perms; x86 fast_page_fault)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import pattern
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

pytestmark = pytest.mark.requires("relax_perms")

GPA = 0xD00_0000
SLOT_PAGES = 64  # the usual slot, in base pages


def test_exec_after_write_relaxes_in_place(guest):
    """Fetch after write: the leaf keeps its frame, size and write permission, and gains
    execute."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(1))
    before = guest.vm.lookup(GPA + page)
    guest.fetch(GPA + page)
    after = guest.vm.lookup(GPA + page)
    assert (after.gfn, after.size, after.pfn) == (before.gfn, before.size, before.pfn)
    assert after.readable and after.writable and after.executable


@pytest.mark.requires("dirty_log")
def test_write_after_reprotect_relaxes_in_place(guest):
    """After GET re-protects a logged page, the next write restores write on the same frame
    and logs the page again."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size, LOG)
    guest.write(GPA + 2 * page, pattern(2))
    before = guest.vm.lookup(GPA + 2 * page)
    guest.vm.get_dirty_log(0)
    guest.write(GPA + 2 * page, pattern(3))
    after = guest.vm.lookup(GPA + 2 * page)
    assert (after.gfn, after.size, after.pfn) == (before.gfn, before.size, before.pfn)
    assert after.writable
    assert (GPA + 2 * page - GPA) >> 12 in guest.vm.get_dirty_log(0)
    assert guest.read(GPA + 2 * page) == pattern(3)


def test_write_after_exec_keeps_exec(guest, host):
    """A write permission fault on an executable leaf never removes execute."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 3 * page, pattern(4))  # the host page exists and is writable
    guest.fetch(GPA + 3 * page)
    guest.write(GPA + 3 * page, pattern(5))
    m = guest.vm.lookup(GPA + 3 * page)
    assert m.writable and m.executable and m.readable
