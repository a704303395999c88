"""Races replayed through the fault path's race points (``vcpu.step_access``): Linux drops
the MMU lock between the mmu_invalidate_seq snapshot and the install, so another vCPU's fault,
an invalidation or a conversion can run there (reference/core.md §2.5; invariants 1, 2)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import (
    covers,
    expect_error_pfn,
    expect_memory_fault,
    finish,
    pattern,
    step_until,
)
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

GPA = 0x1000_0000
SLOT_PAGES = 16  # the usual slot, in base pages


@pytest.mark.parametrize("point", ["pf_seq_snapshot", "pf_lock_wait"])
def test_read_and_write_fault_end_writable(guest, host, point):
    """Seed: vCPU 0 faults a gfn for read and stops at a race point; vCPU 1 faults it for
    write and completes; vCPU 0 completes. The leaf ends writable, never downgraded."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 2 * page, pattern(1))   # a present, writable host page
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v0.step_access("read", GPA + 2 * page, 8, private=False)
    step_until(steps, point)
    v1.write(GPA + 2 * page, pattern(2), private=False)
    assert finish(steps) == pattern(2)
    m = guest.vm.lookup(GPA + 2 * page)
    assert covers(m, GPA + 2 * page) and m.writable
    v1.write(GPA + 2 * page + 8, pattern(3), private=False)
    assert v0.read(GPA + 2 * page + 8, 8, private=False) == pattern(3)


@pytest.mark.requires("dirty_log")
@pytest.mark.parametrize("point", ["pf_seq_snapshot", "pf_lock_wait"])
def test_read_and_write_fault_end_writable_while_logging(guest, host, point):
    """The same in a dirty-logged slot, where read faults may map read-only: the late read
    fault must not replace the writable leaf by a read-only one; the write is logged."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size, LOG)
    host.write(hva + 2 * page, pattern(1))
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v0.step_access("read", GPA + 2 * page, 8, private=False)
    step_until(steps, point)
    v1.write(GPA + 2 * page, pattern(2), private=False)
    assert finish(steps) == pattern(2)
    m = guest.vm.lookup(GPA + 2 * page)
    assert covers(m, GPA + 2 * page) and m.writable
    assert 2 * (page >> 12) in guest.vm.get_dirty_log(0)


@pytest.mark.parametrize("point", ["pf_seq_snapshot", "pf_lock_wait"])
def test_write_then_read_fault_end_writable(guest, host, point):
    """The other order: the write stops at the race point, the read completes first."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 3 * page, pattern(4))
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v1.step_access("write", GPA + 3 * page, pattern(5), private=False)
    step_until(steps, point)
    assert v0.read(GPA + 3 * page, 8, private=False) == pattern(4)
    finish(steps)
    m = guest.vm.lookup(GPA + 3 * page)
    assert covers(m, GPA + 3 * page) and m.writable
    assert v0.read(GPA + 3 * page, 8, private=False) == pattern(5)


def test_fault_racing_munmap_installs_nothing(guest, host):
    """Invariant 2: the hva is unmapped after the fault resolved its pfn and before it takes
    the MMU lock: the fault is stale, retries, and no leaf to the dead page is installed."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + page, pattern(6))
    steps = guest.vcpu.step_access("read", GPA + page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    host.munmap(hva + page, page)
    expect_error_pfn(guest.vm, finish, steps, gpa=GPA + page)
    assert guest.vm.lookup(GPA + page) is None


def test_fault_racing_madvise_sees_new_page(guest, host):
    """MADV_DONTNEED between pfn lookup and install: the retried fault maps the new (zero)
    page, not the freed one."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 4 * page, pattern(7))
    steps = guest.vcpu.step_access("read", GPA + 4 * page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    host.madvise_dontneed(hva + 4 * page, page)
    assert finish(steps) == bytes(8)
    host.write(hva + 4 * page, pattern(8))
    assert guest.read(GPA + 4 * page) == pattern(8)


def test_fault_racing_migration_maps_new_frame(guest, host):
    """Migration between pfn lookup and install: the retried fault maps the new frame, so a
    later host write is seen by the guest."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 5 * page, pattern(9))
    steps = guest.vcpu.step_access("read", GPA + 5 * page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    host.migrate(hva + 5 * page)
    assert finish(steps) == pattern(9)
    host.write(hva + 5 * page, pattern(10))
    assert guest.read(GPA + 5 * page) == pattern(10)


def test_fault_racing_other_gfn_invalidation_completes(guest, host):
    """An invalidation of another page that completes during the fault makes it retry (the
    seq changed), and the retried fault maps the right page."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 6 * page, pattern(11))
    steps = guest.vcpu.step_access("read", GPA + 6 * page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    host.madvise_dontneed(hva + 9 * page, page)
    assert finish(steps) == pattern(11)
    assert covers(guest.vm.lookup(GPA + 6 * page), GPA + 6 * page)


@pytest.mark.requires("private_mem", "gmem")
def test_conversion_racing_fault_leaves_no_shared_leaf(guest):
    """Invariant 1: a shared fault whose gfn becomes private after the pfn lookup is stale;
    whatever the retry does, no shared leaf maps the now-private gfn."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    steps = guest.vcpu.step_access("read", GPA + 7 * page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    guest.make_private(GPA + 7 * page, page)
    try:
        finish(steps)
    except Exception:  # noqa: BLE001 - the retried fault may exit; the leaf is what matters
        pass
    m = guest.vm.lookup(GPA + 7 * page)
    assert m is None or m.private


@pytest.mark.requires("private_mem", "gmem")
def test_private_fault_racing_conversion_exits_private(guest):
    """The private/shared check runs after the snapshot: a private fault whose gfn turned
    shared exits with flags PRIVATE (expect_memory_fault checks every field)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    steps = guest.vcpu.step_access("write", GPA + 8 * page, pattern(12), private=True)
    step_until(steps, "pf_seq_snapshot")
    guest.make_shared(GPA + 8 * page, page)
    expect_memory_fault(page, finish, steps, gpa=GPA + 8 * page, exit_private=True)
    assert guest.vm.lookup(GPA + 8 * page, private=True) is None
