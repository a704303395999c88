"""relax_perms: a permission fault on a present leaf adds permissions in place — same frame,
same size, nothing removed (arm64 kvm_pgtable_stage2_relax_perms; x86 fast_page_fault)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import PAGE, pattern
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

pytestmark = pytest.mark.requires("relax_perms")

GPA = 0xD00_0000
SIZE = 64 * PAGE


def test_exec_after_write_relaxes_in_place(guest):
    """Fetch after write: the leaf keeps its frame, size and write permission, and gains
    execute."""
    guest.slot(0, GPA, SIZE)
    guest.write(GPA + PAGE, pattern(1))
    before = guest.vm.lookup(GPA + PAGE)
    guest.fetch(GPA + PAGE)
    after = guest.vm.lookup(GPA + PAGE)
    assert (after.gfn, after.size, after.pfn) == (before.gfn, before.size, before.pfn)
    assert after.readable and after.writable and after.executable


@pytest.mark.requires("dirty_log")
def test_write_after_reprotect_relaxes_in_place(guest):
    """After GET re-protects a logged page, the next write restores write on the same frame
    and logs the page again."""
    guest.slot(0, GPA, SIZE, LOG)
    guest.write(GPA + 2 * PAGE, pattern(2))
    before = guest.vm.lookup(GPA + 2 * PAGE)
    guest.vm.get_dirty_log(0)
    guest.write(GPA + 2 * PAGE, pattern(3))
    after = guest.vm.lookup(GPA + 2 * PAGE)
    assert (after.gfn, after.size, after.pfn) == (before.gfn, before.size, before.pfn)
    assert after.writable
    assert (GPA + 2 * PAGE - GPA) >> 12 in guest.vm.get_dirty_log(0)
    assert guest.read(GPA + 2 * PAGE) == pattern(3)


def test_write_after_exec_keeps_exec(guest, host):
    """A write permission fault on an executable leaf never removes execute."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 3 * PAGE, pattern(4))  # the host page exists and is writable
    guest.fetch(GPA + 3 * PAGE)
    guest.write(GPA + 3 * PAGE, pattern(5))
    m = guest.vm.lookup(GPA + 3 * PAGE)
    assert m.writable and m.executable and m.readable
