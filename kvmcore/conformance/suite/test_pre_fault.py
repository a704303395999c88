"""KVM_PRE_FAULT_MEMORY: validation, progress and the leftover range
(reference/core.md §8; invariant 19)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (
    MAX_PAGE,
    covers,
    expect_errno_unchanged,
    pattern,
    step_until,
)

pytestmark = pytest.mark.requires("pre_fault")

GPA = 0xE00_0000
SLOT_PAGES = 16  # the usual slot, in base pages
EINVAL, ENOENT = errno.EINVAL, errno.ENOENT


@pytest.mark.parametrize("gpa,size,flags", [
    pytest.param(GPA, MAX_PAGE, 1, id="flags"),
    pytest.param(GPA + 8, MAX_PAGE, 0, id="gpa-unaligned"),
    pytest.param(GPA, MAX_PAGE + 8, 0, id="size-unaligned"),
    pytest.param(GPA, 0, 0, id="size-zero"),
    pytest.param((1 << 64) - MAX_PAGE, 2 * MAX_PAGE, 0, id="wrap"),
])
def test_pre_fault_einval(guest, gpa, size, flags):
    """flags != 0, unaligned gpa/size, size 0 or gpa + size wrapping: EINVAL, nothing mapped."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vcpu.pre_fault_memory, gpa, size, flags)


def test_pre_fault_outside_memslots_enoent(guest):
    """A gpa outside every memslot, with nothing processed: ENOENT."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    expect_errno_unchanged(guest.vm, ENOENT, guest.vcpu.pre_fault_memory, GPA + 2 * slot_size, page)


def test_pre_fault_maps_whole_range(guest):
    """The whole range is processed: leftover (gpa + size, 0), and every page has a leaf."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    assert guest.vcpu.pre_fault_memory(GPA, 4 * page) == (GPA + 4 * page, 0)
    for i in range(4):
        assert covers(guest.vm.lookup(GPA + i * page), GPA + i * page)


def test_pre_fault_partial_progress(guest):
    """A range running past the slot returns success with the unprocessed remainder."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    gpa, size = guest.vcpu.pre_fault_memory(GPA + slot_size - 2 * page, 4 * page)
    assert (gpa, size) == (GPA + slot_size, 2 * page)
    assert covers(guest.vm.lookup(GPA + slot_size - page), GPA + slot_size - page)


def test_pre_fault_keeps_data(guest, host):
    """Pre-faulting maps the host's existing pages (a read fault): their data is visible."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + page, pattern(1))
    guest.vcpu.pre_fault_memory(GPA, 2 * page)
    assert guest.vm.lookup(GPA + page) is not None
    assert guest.read(GPA + page) == pattern(1)


@pytest.mark.requires("private_mem", "gmem")
def test_pre_fault_private(guest):
    """Pre-faulting a private gfn maps the private alias."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    assert guest.vcpu.pre_fault_memory(GPA, page) == (GPA + page, 0)
    m = guest.vm.lookup(GPA, private=True)
    assert covers(m, GPA) and m.private


def test_pre_fault_waits_for_an_invalidation_holding_srcu(guest, host):
    """kvm_vcpu_pre_fault_memory holds kvm->srcu across its loop, and kvm_tdp_map_page
    faults again while the fault retries: a pre-fault that meets an invalidation of its page
    waits for it to end (still in the SRCU read side), then maps the page."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    pre = guest.vcpu.steps.pre_fault_memory(GPA + 2 * page, 2 * page)
    step_until(pre, "pf_seq_snapshot")
    zap = host.steps.madvise_dontneed(hva, slot_size)
    step_until(zap, "mn_host_window")
    assert next(pre) == "pf_retry_wait" and not pre.runnable and "srcu" in pre.holds
    zap.run()
    assert pre.run() == (GPA + 4 * page, 0)
    assert covers(guest.vm.lookup(GPA + 2 * page), GPA + 2 * page)
    assert covers(guest.vm.lookup(GPA + 3 * page), GPA + 3 * page)
    guest.vm.check_invariants()
