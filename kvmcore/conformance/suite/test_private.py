"""Private memory and conversions: the private/shared check of the fault path, the
KVM_SET_MEMORY_ATTRIBUTES flow and which alias a conversion zaps (reference/core.md §4, §5;
invariants 1, 14, 15, 21)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (
    MAX_PAGE,
    covers,
    expect_errno_unchanged,
    expect_memory_fault,
    finish,
    leaves_in,
    leaves_outside,
    pattern,
    step_until,
)
from kvmcore.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE

pytestmark = pytest.mark.requires("private_mem", "gmem")

GPA = 0x80_0000
SLOT_PAGES = 16  # the usual slot, in base pages
EINVAL = errno.EINVAL


def test_attributes_start_shared(guest):
    """Every gfn starts shared: attribute 0."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    assert [guest.vm.get_memory_attributes((GPA >> 12) + i) for i in range(16)] == [0] * 16


def test_set_and_get_attributes(guest):
    """KVM_SET_MEMORY_ATTRIBUTES stores PRIVATE (8) for exactly [address, address + size)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA + 2 * page, 3 * page)
    g, n = GPA >> 12, page >> 12
    assert [guest.vm.get_memory_attributes(g + i * n) for i in range(7)] == [0, 0, 8, 8, 8, 0, 0]


def test_attributes_without_memslot(guest):
    """Attributes may be set on gfns no memslot covers (§4: memslots are not required)."""
    page = guest.vm.page_size
    guest.make_private(0x4000_0000, 2 * page)
    g, n = 0x4000_0000 >> 12, page >> 12
    assert [guest.vm.get_memory_attributes(g + i * n) for i in range(3)] == [PRIVATE, PRIVATE, 0]


@pytest.mark.parametrize("address,size,attributes,flags", [
    pytest.param(GPA, MAX_PAGE, PRIVATE, 1, id="flags"),
    pytest.param(GPA, MAX_PAGE, 1 << 0, 0, id="unsupported-attribute"),
    pytest.param(GPA, 0, PRIVATE, 0, id="size-zero"),
    pytest.param((1 << 64) - MAX_PAGE, 2 * MAX_PAGE, PRIVATE, 0, id="wrap"),
    pytest.param(GPA + 8, MAX_PAGE, PRIVATE, 0, id="address-unaligned"),
    pytest.param(GPA, MAX_PAGE + 8, PRIVATE, 0, id="size-unaligned"),
])
def test_set_attributes_einval(guest, address, size, attributes, flags):
    """kvm_vm_ioctl_set_mem_attributes validation: each bad argument is EINVAL and no
    attribute or mapping changes."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.read(GPA)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_memory_attributes, address, size,
                           attributes, flags, gfns=range(GPA >> 12, (GPA >> 12) + 3))


def test_private_fault_on_shared_gfn_exits(guest):
    """Seed: a private fault on a shared gfn exits KVM_EXIT_MEMORY_FAULT with flags PRIVATE,
    the page's gpa and size 4096, errno EFAULT, and maps nothing. The fault is private (the
    gfn was private when it was built); the gfn becomes shared before the fault path's
    private/shared check (a conversion racing the fault: Linux exits, it does not retry)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA + 3 * page, page)
    steps = guest.vcpu.step_access("read", GPA + 3 * page + 24, 8, private=True)
    step_until(steps, "pf_seq_snapshot")
    guest.make_shared(GPA + 3 * page, page)
    expect_memory_fault(page, finish, steps, gpa=GPA + 3 * page, exit_private=True)
    assert list(guest.vm.mappings()) == []


def test_shared_fault_on_private_gfn_exits(guest):
    """A shared fault on a gfn that is private at the check exits with flags 0, the gpa and
    size 4096."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    steps = guest.vcpu.step_access("write", GPA + 5 * page, pattern(1), private=False)
    step_until(steps, "pf_seq_snapshot")
    guest.make_private(GPA, slot_size)
    expect_memory_fault(page, finish, steps, gpa=GPA + 5 * page, exit_private=False)
    assert list(guest.vm.mappings()) == []


def test_private_fault_without_gmem_exits(guest):
    """A private access to a private gfn of a slot without guest_memfd exits PRIVATE."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    expect_memory_fault(page, guest.read, GPA + page, private=True, gpa=GPA + page,
                        exit_private=True)
    assert list(guest.vm.mappings()) == []


def test_private_fault_without_slot_exits(guest):
    """A private access with no memslot exits KVM_EXIT_MEMORY_FAULT (PRIVATE), not MMIO."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.make_private(GPA, slot_size)
    expect_memory_fault(page, guest.read, GPA + 2 * page, private=True, gpa=GPA + 2 * page,
                        exit_private=True)


def test_shared_fault_on_private_gfn_without_slot_exits(guest):
    """kvm_mmu_faultin_pfn checks private/shared right after the seq snapshot, before it
    looks at the slot: a shared access with no memslot whose gfn turns private after the
    snapshot exits KVM_EXIT_MEMORY_FAULT (flags 0), not MMIO."""
    page = guest.vm.page_size
    steps = guest.vcpu.step_access("read", GPA + 3 * page, 8, private=False)
    step_until(steps, "pf_seq_snapshot")
    guest.make_private(GPA, SLOT_PAGES * page)
    expect_memory_fault(page, finish, steps, gpa=GPA + 3 * page, exit_private=False)


def test_private_access_maps_private_leaf(guest):
    """A private access to a private gfn maps the private alias; the data round-trips."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    assert guest.read(GPA + page, private=True) == bytes(8)
    guest.write(GPA + page + 8, pattern(2), private=True)
    assert guest.read(GPA + page + 8, private=True) == pattern(2)
    m = guest.vm.lookup(GPA + page, private=True)
    assert covers(m, GPA + page) and m.private and m.writable
    assert guest.vm.lookup(GPA + page) is None or not guest.vm.lookup(GPA + page).private


def test_private_data_not_in_shared_backing(guest, host):
    """Private writes go to guest_memfd, not to the slot's userspace memory."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    _, hva = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, page)
    guest.write(GPA, pattern(3), private=True)
    assert host.read(hva, 8) == bytes(8)
    guest.make_shared(GPA, page)
    assert guest.read(GPA) == bytes(8)


def test_setting_same_attributes_is_noop(guest):
    """§4 step 2: setting the attributes a range already has changes nothing, zaps nothing."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, 4 * page)
    guest.write(GPA + page, pattern(4), private=True)
    guest.write(GPA + 8 * page, pattern(5))
    before = list(guest.vm.mappings())
    guest.make_private(GPA, 4 * page)
    guest.make_shared(GPA + 8 * page, 4 * page)
    assert list(guest.vm.mappings()) == before


def test_shared_to_private_zaps_shared_leaf(guest):
    """Converting shared->private zaps the shared leaves of the range; leaves outside the range
    stay exactly as they were."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    for i in range(8):
        guest.write(GPA + i * page, pattern(i))
    outside = leaves_outside(guest.vm, GPA + 2 * page, 2 * page)
    guest.make_private(GPA + 2 * page, 2 * page)
    assert [m for m in leaves_in(guest.vm, GPA + 2 * page, 2 * page) if not m.private] == []
    assert leaves_outside(guest.vm, GPA + 2 * page, 2 * page) == outside


def test_private_to_shared_zaps_private_leaf(guest):
    """Converting private->shared zaps the private leaves of the range; outside untouched."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    for i in range(8):
        guest.write(GPA + i * page, pattern(i), private=True)
    outside = leaves_outside(guest.vm, GPA + 4 * page, page)
    guest.make_shared(GPA + 4 * page, page)
    assert [m for m in leaves_in(guest.vm, GPA + 4 * page, page) if m.private] == []
    assert leaves_outside(guest.vm, GPA + 4 * page, page) == outside
    assert guest.read(GPA + 4 * page) == bytes(8)
    assert guest.read(GPA + 3 * page, private=True) == pattern(3)


@pytest.mark.requires("private_alias")
def test_shared_to_private_keeps_private_alias(guest):
    """Seed: with separate aliases (TDX's mirror root), shared->private zaps only the shared
    alias: a private leaf inside the converted range survives."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, page)
    guest.write(GPA, pattern(6), private=True)
    guest.write(GPA + page, pattern(7))
    priv = guest.vm.lookup(GPA, private=True)
    guest.make_private(GPA, 2 * page)
    assert guest.vm.lookup(GPA, private=True) == priv
    assert guest.vm.lookup(GPA + page) is None


@pytest.mark.requires("private_alias")
def test_private_to_shared_keeps_shared_alias(guest):
    """Seed: private->shared zaps only the private alias: a shared leaf inside the converted
    range survives."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA + page, page)
    guest.write(GPA, pattern(8))
    guest.write(GPA + page, pattern(9), private=True)
    shared = guest.vm.lookup(GPA)
    guest.make_shared(GPA, 2 * page)
    assert guest.vm.lookup(GPA) == shared
    assert guest.vm.lookup(GPA + page, private=True) is None


def test_conversion_then_access_of_new_kind(guest):
    """After shared->private, a private access maps the private alias (zero-filled guest_memfd
    page) and no shared leaf remains."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.write(GPA, pattern(10))
    guest.make_private(GPA, page)
    assert guest.read(GPA, private=True) == bytes(8)
    m = guest.vm.lookup(GPA, private=True)
    assert covers(m, GPA) and m.private
    assert [x for x in leaves_in(guest.vm, GPA, page) if not x.private] == []
