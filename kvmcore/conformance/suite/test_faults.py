"""Faults and permissions: what the generic fault path installs and what the guest sees
(reference/core.md §2.5, §7; invariants 2, 10)."""

from __future__ import annotations

import pytest

from kvmcore import HwPoisonSignal
from kvmcore.conformance.helpers import PAGE, covers, expect_memory_fault, pattern

GPA = 0x40_0000
SIZE = 16 * PAGE


def test_read_fault_installs_readable_leaf(guest):
    """A read miss takes the fault path and installs a present, readable leaf over the gpa."""
    guest.slot(0, GPA, SIZE)
    assert guest.vm.lookup(GPA + 3 * PAGE) is None
    assert guest.read(GPA + 3 * PAGE) == bytes(8)
    m = guest.vm.lookup(GPA + 3 * PAGE)
    assert covers(m, GPA + 3 * PAGE) and m.readable and not m.private


def test_write_fault_installs_writable_leaf(guest, host):
    """A write installs a writable leaf whose page is the host page at the hva."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA + 4 * PAGE + 100, pattern(1))
    m = guest.vm.lookup(GPA + 4 * PAGE)
    assert covers(m, GPA + 4 * PAGE) and m.readable and m.writable
    assert host.read(hva + 4 * PAGE + 100, 8) == pattern(1)


def test_fresh_anon_memory_reads_zero(guest):
    """Never-touched anonymous memory reads as zeros."""
    guest.slot(0, GPA, SIZE)
    assert guest.read(GPA + 7 * PAGE, 64) == bytes(64)


def test_writes_stay_in_their_page(guest):
    """A write changes exactly its bytes: neighbours in and around the page are unchanged."""
    guest.slot(0, GPA, SIZE)
    guest.write(GPA + PAGE + 8, pattern(2))
    assert guest.read(GPA + PAGE, 8) == bytes(8)
    assert guest.read(GPA + PAGE + 16, 8) == bytes(8)
    assert guest.read(GPA + 2 * PAGE + 8, 8) == bytes(8)
    assert guest.read(GPA + PAGE + 8, 8) == pattern(2)


def test_host_write_visible_to_mapped_guest(guest, host):
    """After the leaf exists, a host write through the hva is seen by the guest (same page)."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(3))
    host.write(hva, pattern(4))
    assert guest.read(GPA) == pattern(4)


def test_fetch_is_executable(guest, host):
    """An instruction fetch from guest RAM completes; the leaf then allows execution."""
    guest.slot(0, GPA, SIZE)
    guest.fetch(GPA + 5 * PAGE)
    m = guest.vm.lookup(GPA + 5 * PAGE)
    assert covers(m, GPA + 5 * PAGE) and m.executable


def test_fetch_after_write_keeps_write(guest):
    """Adding execute to a writable leaf never removes write (relax or re-map: permissions only
    grow), and the data stays."""
    guest.slot(0, GPA, SIZE)
    guest.write(GPA + 6 * PAGE, pattern(5))
    guest.fetch(GPA + 6 * PAGE)
    m = guest.vm.lookup(GPA + 6 * PAGE)
    assert m.writable and m.executable and m.readable
    assert guest.read(GPA + 6 * PAGE) == pattern(5)


def test_host_readonly_mapping_never_writable(guest, host):
    """Invariant 10: a host mapping without write gives a read-only leaf (map_writable false)."""
    hva = host.mmap(SIZE, prot="rw")
    host.write(hva, pattern(6))
    host.mprotect(hva, SIZE, "r")
    guest.slot(0, GPA, SIZE, hva=hva)
    assert guest.read(GPA) == pattern(6)
    assert not guest.vm.lookup(GPA).writable


def test_two_vms_share_host_memory(guest, host, make_vm):
    """Two VMs on one host backed by the same hva see one page."""
    hva = guest.slot(0, GPA, SIZE)
    vm2 = make_vm()
    vm2.set_user_memory_region(0, GPA * 2, SIZE, hva)
    v2 = vm2.create_vcpu(0)
    guest.write(GPA + PAGE, pattern(7))
    assert v2.read(GPA * 2 + PAGE, 8, private=False) == pattern(7)
    v2.write(GPA * 2 + 2 * PAGE, pattern(8), private=False)
    assert guest.read(GPA + 2 * PAGE) == pattern(8)


def test_mappings_sorted_and_within_slots(guest):
    """vm.mappings() lists present leaves ascending by gfn, each inside a slot."""
    guest.slot(0, GPA, SIZE)
    guest.slot(1, GPA + 4 * SIZE, SIZE)
    for off in (9 * PAGE, 0, 4 * SIZE + 3 * PAGE, 2 * PAGE):
        guest.write(GPA + off, pattern(off & 0xFF))
    ms = list(guest.vm.mappings())
    assert [m.gfn for m in ms] == sorted(m.gfn for m in ms)
    for m in ms:
        lo, hi = m.gfn << 12, (m.gfn << 12) + m.size
        assert GPA <= lo and (hi <= GPA + SIZE or (lo >= GPA + 4 * SIZE and hi <= GPA + 5 * SIZE))
    for off in (9 * PAGE, 0, 4 * SIZE + 3 * PAGE, 2 * PAGE):
        assert any(covers(m, GPA + off) for m in ms)


def test_write_to_readonly_host_mapping_exits(guest, host):
    """A write where the host VMA forbids writing: GUP fails, KVM_PFN_ERR_FAULT ->
    KVM_EXIT_MEMORY_FAULT (flags 0, the page's gpa, 4096), errno EFAULT; memory unchanged."""
    hva = host.mmap(SIZE, prot="rw")
    host.write(hva + PAGE, pattern(9))
    host.mprotect(hva, SIZE, "r")
    guest.slot(0, GPA, SIZE, hva=hva)
    expect_memory_fault(guest.write, GPA + PAGE + 16, pattern(10), private=False,
                        gpa=GPA + PAGE, exit_private=False)
    assert host.read(hva + PAGE, 8) == pattern(9)


def test_hwpoison_sends_sigbus(guest, host):
    """A poisoned host page: the leaf is zapped (memory_failure unmaps, the notifier fires)
    and the next access gets KVM's SIGBUS (kvm_send_hwpoison_signal: the hva, lsb 12)."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA + 2 * PAGE, pattern(11))
    host.poison(hva + 2 * PAGE)
    assert guest.vm.lookup(GPA + 2 * PAGE) is None
    with pytest.raises(HwPoisonSignal) as info:
        guest.read(GPA + 2 * PAGE)
    assert (info.value.hva, info.value.lsb) == (hva + 2 * PAGE, 12)
    assert guest.read(GPA + 3 * PAGE) == bytes(8)
