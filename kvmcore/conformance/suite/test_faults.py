"""Faults and permissions: what the generic fault path installs and what the guest sees
(reference/core.md §2.5, §7; invariants 2, 10)."""

from __future__ import annotations

import pytest

from kvmcore import HwPoisonSignal
from kvmcore.conformance.helpers import covers, expect_error_pfn, pattern

GPA = 0x40_0000
SLOT_PAGES = 16  # the usual slot, in base pages


def test_read_fault_installs_readable_leaf(guest):
    """A read miss takes the fault path and installs a present, readable leaf over the gpa."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    assert guest.vm.lookup(GPA + 3 * page) is None
    assert guest.read(GPA + 3 * page) == bytes(8)
    m = guest.vm.lookup(GPA + 3 * page)
    assert covers(m, GPA + 3 * page) and m.readable and not m.private


def test_write_fault_installs_writable_leaf(guest, host):
    """A write installs a writable leaf whose page is the host page at the hva."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + 4 * page + 100, pattern(1))
    m = guest.vm.lookup(GPA + 4 * page)
    assert covers(m, GPA + 4 * page) and m.readable and m.writable
    assert host.read(hva + 4 * page + 100, 8) == pattern(1)


def test_fresh_anon_memory_reads_zero(guest):
    """Never-touched anonymous memory reads as zeros."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    assert guest.read(GPA + 7 * page, 64) == bytes(64)


def test_writes_stay_in_their_page(guest):
    """A write changes exactly its bytes: neighbours in and around the page are unchanged."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + page + 8, pattern(2))
    assert guest.read(GPA + page, 8) == bytes(8)
    assert guest.read(GPA + page + 16, 8) == bytes(8)
    assert guest.read(GPA + 2 * page + 8, 8) == bytes(8)
    assert guest.read(GPA + page + 8, 8) == pattern(2)


def test_host_write_visible_to_mapped_guest(guest, host):
    """After the leaf exists, a host write through the hva is seen by the guest (same page)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(3))
    host.write(hva, pattern(4))
    assert guest.read(GPA) == pattern(4)


def test_fetch_is_executable(guest, host):
    """An instruction fetch from guest RAM completes; the leaf then allows execution."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.fetch(GPA + 5 * page)
    m = guest.vm.lookup(GPA + 5 * page)
    assert covers(m, GPA + 5 * page) and m.executable


def test_fetch_after_write_keeps_write(guest):
    """Adding execute to a writable leaf never removes write (relax or re-map: permissions only
    grow), and the data stays."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + 6 * page, pattern(5))
    guest.fetch(GPA + 6 * page)
    m = guest.vm.lookup(GPA + 6 * page)
    assert m.writable and m.executable and m.readable
    assert guest.read(GPA + 6 * page) == pattern(5)


def test_host_readonly_mapping_never_writable(guest, host):
    """Invariant 10: a host mapping without write gives a read-only leaf (map_writable false)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size, prot="rw")
    host.write(hva, pattern(6))
    host.mprotect(hva, slot_size, "r")
    guest.slot(0, GPA, slot_size, hva=hva)
    assert guest.read(GPA) == pattern(6)
    assert not guest.vm.lookup(GPA).writable


def test_two_vms_share_host_memory(guest, host, make_vm):
    """Two VMs on one host backed by the same hva see one page."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    vm2 = make_vm()
    vm2.set_user_memory_region(0, GPA * 2, slot_size, hva)
    v2 = vm2.create_vcpu(0)
    guest.write(GPA + page, pattern(7))
    assert v2.read(GPA * 2 + page, 8, private=False) == pattern(7)
    v2.write(GPA * 2 + 2 * page, pattern(8), private=False)
    assert guest.read(GPA + 2 * page) == pattern(8)


def test_mappings_sorted_and_within_slots(guest):
    """vm.mappings() lists present leaves ascending by gfn, each inside a slot."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.slot(1, GPA + 4 * slot_size, slot_size)
    for off in (9 * page, 0, 4 * slot_size + 3 * page, 2 * page):
        guest.write(GPA + off, pattern(off & 0xFF))
    ms = list(guest.vm.mappings())
    assert [m.gfn for m in ms] == sorted(m.gfn for m in ms)
    for m in ms:
        lo, hi = m.gfn << 12, (m.gfn << 12) + m.size
        assert GPA <= lo and (hi <= GPA + slot_size
                              or (lo >= GPA + 4 * slot_size and hi <= GPA + 5 * slot_size))
    for off in (9 * page, 0, 4 * slot_size + 3 * page, 2 * page):
        assert any(covers(m, GPA + off) for m in ms)


def test_write_to_readonly_host_mapping_exits(guest, host):
    """A write where the host VMA forbids writing: GUP fails, KVM_PFN_ERR_FAULT ->
    KVM_EXIT_MEMORY_FAULT (flags 0, the page's gpa, 4096), errno EFAULT, or -EFAULT alone
    (``expect_error_pfn``); memory unchanged."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size, prot="rw")
    host.write(hva + page, pattern(9))
    host.mprotect(hva, slot_size, "r")
    guest.slot(0, GPA, slot_size, hva=hva)
    expect_error_pfn(guest.vm, guest.write, GPA + page + 16, pattern(10), private=False,
                     gpa=GPA + page)
    assert host.read(hva + page, 8) == pattern(9)


def test_hwpoison_sends_sigbus(guest, host):
    """A poisoned host page: the leaf is zapped (memory_failure unmaps, the notifier fires)
    and the next access gets KVM's SIGBUS (kvm_send_hwpoison_signal: the hva, lsb PAGE_SHIFT)
    -- or, where the arch has no hwpoison handling (ppc: ArchInfo.hwpoison_sigbus False),
    -EFAULT as for any error pfn, with no signal."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + 2 * page, pattern(11))
    host.poison(hva + 2 * page)
    assert guest.vm.lookup(GPA + 2 * page) is None
    if not guest.vm.arch_info.hwpoison_sigbus:
        expect_error_pfn(guest.vm, guest.read, GPA + 2 * page, gpa=GPA + 2 * page)
        assert guest.vm.lookup(GPA + 2 * page) is None
        assert guest.read(GPA + 3 * page) == bytes(8)
        return
    with pytest.raises(HwPoisonSignal) as info:
        guest.read(GPA + 2 * page)
    assert (info.value.hva, info.value.lsb) == (hva + 2 * page, page.bit_length() - 1)
    assert guest.read(GPA + 3 * page) == bytes(8)
