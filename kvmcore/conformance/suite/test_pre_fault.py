"""KVM_PRE_FAULT_MEMORY: validation, progress and the leftover range
(reference/core.md §8; invariant 19)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import PAGE, covers, expect_errno_unchanged, pattern

pytestmark = pytest.mark.requires("pre_fault")

GPA = 0xE00_0000
SIZE = 16 * PAGE
EINVAL, ENOENT = errno.EINVAL, errno.ENOENT


@pytest.mark.parametrize("gpa,size,flags", [
    pytest.param(GPA, PAGE, 1, id="flags"),
    pytest.param(GPA + 8, PAGE, 0, id="gpa-unaligned"),
    pytest.param(GPA, PAGE + 8, 0, id="size-unaligned"),
    pytest.param(GPA, 0, 0, id="size-zero"),
    pytest.param((1 << 64) - PAGE, 2 * PAGE, 0, id="wrap"),
])
def test_pre_fault_einval(guest, gpa, size, flags):
    """flags != 0, unaligned gpa/size, size 0 or gpa + size wrapping: EINVAL, nothing mapped."""
    guest.slot(0, GPA, SIZE)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vcpu.pre_fault_memory, gpa, size, flags)


def test_pre_fault_outside_memslots_enoent(guest):
    """A gpa outside every memslot, with nothing processed: ENOENT."""
    guest.slot(0, GPA, SIZE)
    expect_errno_unchanged(guest.vm, ENOENT, guest.vcpu.pre_fault_memory, GPA + 2 * SIZE, PAGE)


def test_pre_fault_maps_whole_range(guest):
    """The whole range is processed: leftover (gpa + size, 0), and every page has a leaf."""
    guest.slot(0, GPA, SIZE)
    assert guest.vcpu.pre_fault_memory(GPA, 4 * PAGE) == (GPA + 4 * PAGE, 0)
    for i in range(4):
        assert covers(guest.vm.lookup(GPA + i * PAGE), GPA + i * PAGE)


def test_pre_fault_partial_progress(guest):
    """A range running past the slot returns success with the unprocessed remainder."""
    guest.slot(0, GPA, SIZE)
    gpa, size = guest.vcpu.pre_fault_memory(GPA + SIZE - 2 * PAGE, 4 * PAGE)
    assert (gpa, size) == (GPA + SIZE, 2 * PAGE)
    assert covers(guest.vm.lookup(GPA + SIZE - PAGE), GPA + SIZE - PAGE)


def test_pre_fault_keeps_data(guest, host):
    """Pre-faulting maps the host's existing pages (a read fault): their data is visible."""
    hva = guest.slot(0, GPA, SIZE)
    host.write(hva + PAGE, pattern(1))
    guest.vcpu.pre_fault_memory(GPA, 2 * PAGE)
    assert guest.vm.lookup(GPA + PAGE) is not None
    assert guest.read(GPA + PAGE) == pattern(1)


@pytest.mark.requires("private_mem", "gmem")
def test_pre_fault_private(guest):
    """Pre-faulting a private gfn maps the private alias."""
    guest.gmem_slot(0, GPA, SIZE)
    guest.make_private(GPA, SIZE)
    assert guest.vcpu.pre_fault_memory(GPA, PAGE) == (GPA + PAGE, 0)
    m = guest.vm.lookup(GPA, private=True)
    assert covers(m, GPA) and m.private
