"""Races replayed through the fault path's race points (``vcpu.step_access``): Linux drops
the MMU lock between the mmu_invalidate_seq snapshot and the install, so another vCPU's fault,
an invalidation or a conversion can run there (reference/core.md §2.5; invariants 1, 2)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import (
    PAGE,
    covers,
    expect_memory_fault,
    finish,
    pattern,
    step_until,
)
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

GPA = 0x1000_0000
SIZE = 16 * PAGE


@pytest.mark.parametrize("point", ["after_snapshot", "before_lock"])
def test_read_and_write_fault_end_writable(guest, host, point):
    """Seed: vCPU 0 faults a gfn for read and stops at a race point; vCPU 1 faults it for
    write and completes; vCPU 0 completes. The leaf ends writable, never downgraded."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 2 * PAGE, pattern(1))   # a present, writable host page
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v0.step_access("read", GPA + 2 * PAGE, 8, private=False)
    step_until(steps, point)
    v1.write(GPA + 2 * PAGE, pattern(2), private=False)
    assert finish(steps) == pattern(2)
    m = guest.vm.lookup(GPA + 2 * PAGE)
    assert covers(m, GPA + 2 * PAGE) and m.writable
    v1.write(GPA + 2 * PAGE + 8, pattern(3), private=False)
    assert v0.read(GPA + 2 * PAGE + 8, 8, private=False) == pattern(3)


@pytest.mark.requires("dirty_log")
@pytest.mark.parametrize("point", ["after_snapshot", "before_lock"])
def test_read_and_write_fault_end_writable_while_logging(guest, host, point):
    """The same in a dirty-logged slot, where read faults may map read-only: the late read
    fault must not replace the writable leaf by a read-only one; the write is logged."""
    hva = guest.slot(0, GPA, SIZE, LOG)
    host.write(hva + 2 * PAGE, pattern(1))
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v0.step_access("read", GPA + 2 * PAGE, 8, private=False)
    step_until(steps, point)
    v1.write(GPA + 2 * PAGE, pattern(2), private=False)
    assert finish(steps) == pattern(2)
    m = guest.vm.lookup(GPA + 2 * PAGE)
    assert covers(m, GPA + 2 * PAGE) and m.writable
    assert 2 in guest.vm.get_dirty_log(0)


@pytest.mark.parametrize("point", ["after_snapshot", "before_lock"])
def test_write_then_read_fault_end_writable(guest, host, point):
    """The other order: the write stops at the race point, the read completes first."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 3 * PAGE, pattern(4))
    v0, v1 = guest.vcpu, guest.vm.create_vcpu(1)
    steps = v1.step_access("write", GPA + 3 * PAGE, pattern(5), private=False)
    step_until(steps, point)
    assert v0.read(GPA + 3 * PAGE, 8, private=False) == pattern(4)
    finish(steps)
    m = guest.vm.lookup(GPA + 3 * PAGE)
    assert covers(m, GPA + 3 * PAGE) and m.writable
    assert v0.read(GPA + 3 * PAGE, 8, private=False) == pattern(5)


def test_fault_racing_munmap_installs_nothing(guest, host):
    """Invariant 2: the hva is unmapped after the fault resolved its pfn and before it takes
    the MMU lock: the fault is stale, retries, and no leaf to the dead page is installed."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + PAGE, pattern(6))
    steps = guest.vcpu.step_access("read", GPA + PAGE, 8, private=False)
    step_until(steps, "before_lock")
    host.munmap(hva + PAGE, PAGE)
    expect_memory_fault(finish, steps, gpa=GPA + PAGE, exit_private=False)
    assert guest.vm.lookup(GPA + PAGE) is None


def test_fault_racing_madvise_sees_new_page(guest, host):
    """MADV_DONTNEED between pfn lookup and install: the retried fault maps the new (zero)
    page, not the freed one."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 4 * PAGE, pattern(7))
    steps = guest.vcpu.step_access("read", GPA + 4 * PAGE, 8, private=False)
    step_until(steps, "before_lock")
    host.madvise_dontneed(hva + 4 * PAGE, PAGE)
    assert finish(steps) == bytes(8)
    host.write(hva + 4 * PAGE, pattern(8))
    assert guest.read(GPA + 4 * PAGE) == pattern(8)


def test_fault_racing_migration_maps_new_frame(guest, host):
    """Migration between pfn lookup and install: the retried fault maps the new frame, so a
    later host write is seen by the guest."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 5 * PAGE, pattern(9))
    steps = guest.vcpu.step_access("read", GPA + 5 * PAGE, 8, private=False)
    step_until(steps, "before_lock")
    host.migrate(hva + 5 * PAGE)
    assert finish(steps) == pattern(9)
    host.write(hva + 5 * PAGE, pattern(10))
    assert guest.read(GPA + 5 * PAGE) == pattern(10)


def test_fault_racing_other_gfn_invalidation_completes(guest, host):
    """An invalidation of another page that completes during the fault makes it retry (the
    seq changed), and the retried fault maps the right page."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + 6 * PAGE, pattern(11))
    steps = guest.vcpu.step_access("read", GPA + 6 * PAGE, 8, private=False)
    step_until(steps, "before_lock")
    host.madvise_dontneed(hva + 9 * PAGE, PAGE)
    assert finish(steps) == pattern(11)
    assert covers(guest.vm.lookup(GPA + 6 * PAGE), GPA + 6 * PAGE)


@pytest.mark.requires("private_mem", "gmem")
def test_conversion_racing_fault_leaves_no_shared_leaf(guest):
    """Invariant 1: a shared fault whose gfn becomes private after the pfn lookup is stale;
    whatever the retry does, no shared leaf maps the now-private gfn."""
    guest.gmem_slot(0, GPA, SIZE)
    steps = guest.vcpu.step_access("read", GPA + 7 * PAGE, 8, private=False)
    step_until(steps, "before_lock")
    guest.make_private(GPA + 7 * PAGE, PAGE)
    try:
        finish(steps)
    except Exception:  # noqa: BLE001 - the retried fault may exit; the leaf is what matters
        pass
    m = guest.vm.lookup(GPA + 7 * PAGE)
    assert m is None or m.private


@pytest.mark.requires("private_mem", "gmem")
def test_private_fault_racing_conversion_exits_private(guest):
    """The private/shared check runs after the snapshot: a private fault whose gfn turned
    shared exits with flags PRIVATE (expect_memory_fault checks every field)."""
    guest.gmem_slot(0, GPA, SIZE)
    guest.make_private(GPA, SIZE)
    steps = guest.vcpu.step_access("write", GPA + 8 * PAGE, pattern(12), private=True)
    step_until(steps, "after_snapshot")
    guest.make_shared(GPA + 8 * PAGE, PAGE)
    expect_memory_fault(finish, steps, gpa=GPA + 8 * PAGE, exit_private=True)
    assert guest.vm.lookup(GPA + 8 * PAGE, private=True) is None
