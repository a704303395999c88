"""Memslots: KVM_SET_USER_MEMORY_REGION2's validation in Linux's order and its four changes
(reference/core.md §1.3, §1.4; kvm_set_memory_region, kvm_set_memslot)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (
    expect_errno_unchanged,
    expect_mmio,
    finish,
    pattern,
    step_until,
)
from kvmcore.uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
)

GPA = 0x10_0000
SLOT_PAGES = 16  # the usual slot, in base pages
EINVAL, EEXIST, EBADF = errno.EINVAL, errno.EEXIST, errno.EBADF


def test_create_maps_host_memory(guest, host):
    """CREATE: guest accesses of the slot reach the host pages at userspace_addr, both ways."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    host.write(hva + 3 * page + 16, pattern(1))
    assert guest.read(GPA + 3 * page + 16) == pattern(1)
    guest.write(GPA + 5 * page, pattern(2))
    assert host.read(hva + 5 * page, 8) == pattern(2)
    assert guest.read(GPA + 5 * page) == pattern(2)


def test_unknown_flag_einval(guest, host):
    """§1.3 step 1: a flag outside the valid set (bit 3) is EINVAL; nothing is created."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, 1 << 3)
    expect_mmio(guest.read, GPA, 8, None, GPA)


def test_internal_flag_einval(guest, host):
    """§1.3 step 1: the internal flags (bits 16+, e.g. KVM_MEMSLOT_INVALID) are not valid."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, 1 << 16)


@pytest.mark.requires("gmem")
def test_gmem_with_log_dirty_einval(guest, host):
    """§1.3 step 1: GUEST_MEMFD removes LOG_DIRTY_PAGES from the valid set."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size)
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
                           guest_memfd=gmem)


@pytest.mark.requires("gmem", "readonly_mem")
def test_gmem_with_readonly_einval(guest, host):
    """§1.3 step 1: READONLY is valid only without GUEST_MEMFD."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size)
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, guest_memfd=gmem)


def test_size_unaligned_einval(guest, host):
    """§1.3 step 2: memory_size not page-aligned."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA,
                           slot_size - 512, hva)


def test_gpa_unaligned_einval(guest, host):
    """§1.3 step 3: guest_phys_addr not page-aligned."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA + 8,
                           slot_size, hva)


def test_uaddr_unaligned_einval(guest, host):
    """§1.3 step 4: userspace_addr not page-aligned."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva + 8)


def test_delete_checks_uaddr_alignment(guest):
    """§1.3 step 4 applies to deletes too: an unaligned userspace_addr with size 0 is EINVAL and
    the slot stays (its mapping too)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(3))
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, 0,
                           hva + 1)
    assert guest.read(GPA) == pattern(3)


@pytest.mark.requires("gmem")
def test_gmem_offset_unaligned_einval_before_ebadf(guest, host):
    """§1.3 step 5 (EINVAL) runs before the bind (step 15, EBADF): an unaligned
    guest_memfd_offset with a closed guest_memfd is EINVAL."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size * 2)
    gmem.close()
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem, guest_memfd_offset=100)


def test_as_id_out_of_range_einval(guest, host):
    """§1.3 step 6: as_id (slot bits 16+) >= the VM's number of address spaces."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    slot = guest.vm.nr_address_spaces << 16
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, slot, GPA, slot_size,
                           hva)


def test_slot_id_too_large_einval(guest, host):
    """§1.2/§1.3 step 6: slot id >= KVM_MEM_SLOTS_NUM (32767)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region,
                           KVM_MEM_SLOTS_NUM, GPA, slot_size, hva)


def test_gpa_wrap_einval(guest, host):
    """§1.3 step 7: guest_phys_addr + memory_size wraps 2^64."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0,
                           (1 << 64) - 4 * page, slot_size, hva)


def test_too_many_pages_einval(guest, host):
    """§1.3 steps 4/8: npages > KVM_MEM_MAX_NR_PAGES (2^31 - 1) is EINVAL."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, 0,
                           (KVM_MEM_MAX_NR_PAGES + 1) * page, hva)


def test_delete_missing_slot_einval(guest, host):
    """§1.3 step 10: deleting a slot that does not exist."""
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 5, 0, 0, 0)


def test_overlap_eexist(guest, host):
    """§1.3 step 13: a CREATE that intersects another slot of the address space is EEXIST;
    the existing slot and its mappings are untouched."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(4))
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EEXIST, guest.vm.set_user_memory_region, 1,
                           GPA + slot_size - page, slot_size, hva)
    assert guest.read(GPA + page) == pattern(4)
    expect_mmio(guest.read, GPA + slot_size, 8, None, GPA + slot_size)


def test_move_onto_other_slot_eexist(guest, host):
    """§1.3 step 13 for MOVE: the slot being moved is ignored, any other slot conflicts."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.slot(1, GPA + 2 * slot_size, slot_size)
    # Moving onto part of itself is allowed...
    guest.vm.set_user_memory_region(0, GPA + page, slot_size, hva)
    # ...onto slot 1 is not.
    expect_errno_unchanged(guest.vm, EEXIST, guest.vm.set_user_memory_region, 0,
                           GPA + 2 * slot_size - page, slot_size, hva)


def test_overlap_checked_after_flags(guest, host):
    """Order: step 1 (flags, EINVAL) wins over step 13 (overlap, EEXIST)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 1, GPA, slot_size,
                           hva, 1 << 5)


@pytest.mark.requires("gmem")
def test_overlap_checked_before_bind(guest, host):
    """Order: step 13 (overlap, EEXIST) runs before the bind (step 15, EBADF for a closed
    guest_memfd)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    gmem = guest.new_gmem(slot_size)
    gmem.close()
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EEXIST, guest.vm.set_user_memory_region, 1, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)


def test_address_spaces_do_not_conflict(guest, host):
    """api.rst §4.35: slots in different address spaces may cover the same gpa."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    for as_id in range(guest.vm.nr_address_spaces):
        hva = host.mmap(slot_size)
        guest.vm.set_user_memory_region((as_id << 16) | 3, GPA, slot_size, hva)
    # Address space 0 is the one the vCPU uses.
    assert guest.read(GPA) == bytes(8)


def test_resize_einval(guest):
    """§1.3 step 12: npages differs on an existing slot."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(5))
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA,
                           slot_size * 2, hva)
    assert guest.read(GPA) == pattern(5)


def test_change_uaddr_einval(guest, host):
    """§1.3 step 12: userspace_addr differs on an existing slot."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    other = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           other)


@pytest.mark.requires("readonly_mem")
def test_toggle_readonly_einval(guest):
    """§1.3 step 12: the READONLY bit may not toggle on an existing slot."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_READONLY)


@pytest.mark.requires("gmem")
def test_gmem_slot_immutable(guest):
    """§1.3 step 12: a request with GUEST_MEMFD on an existing slot is EINVAL ("private
    memslots are immutable"), even when it repeats the slot exactly."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, hva = guest.gmem_slot(0, GPA, slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA + slot_size,
                           slot_size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)


def test_identical_request_is_noop(guest):
    """§1.3 step 12: the same request again is a no-op returning 0: no zap."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(6))
    before = list(guest.vm.mappings())
    assert before
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva)
    assert list(guest.vm.mappings()) == before


def test_delete_zaps_and_unmaps(guest):
    """DELETE: the slot's leaves are zapped (kvm_arch_flush_shadow_memslot) and the range
    becomes MMIO."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(7))
    guest.vm.set_user_memory_region(0, GPA, 0, 0)
    assert list(guest.vm.mappings()) == []
    expect_mmio(guest.read, GPA + page, 8, None, GPA + page)


@pytest.mark.parametrize("change", ["delete", "move"])
def test_fault_while_the_invalid_copy_is_published(guest, change):
    """A fault between a DELETE's or MOVE's first swap (the INVALID copy published) and its
    end: where ArchInfo.invalid_slot_retry (x86 kvm_mmu_faultin_pfn) the vCPU retries until
    the update is done, outside kvm->srcu, so the update's synchronize_srcu is not held up,
    and then sees the new memslots; elsewhere (arm64 kvm_handle_guest_abort, ppc
    kvmppc_book3s_radix_page_fault, riscv gstage_page_fault) an INVALID slot has no
    hva and the access is MMIO at once. Never a livelock, never a leaf in the old range (the
    one already there serves accesses until the update's flush)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(7))
    new_gpa = GPA + 4 * slot_size
    update = guest.vm.steps.set_user_memory_region(
        0, GPA if change == "delete" else new_gpa, 0 if change == "delete" else slot_size, hva)
    step_until(update, "slot_srcu_sync")
    untouched = GPA + 3 * page          # no leaf yet: the access faults
    access = guest.vcpu.steps.read(untouched, 8)
    if guest.vm.arch_info.invalid_slot_retry:
        assert step_until(access, "pf_retry_wait") is None and not access.runnable
        assert list(update) and access.runnable
    expect_mmio(finish, untouched, 8, None, access)
    assert bool(guest.vm.stats["fault_retry"]) == guest.vm.arch_info.invalid_slot_retry
    finish(update)
    assert all(m.gfn >= new_gpa >> 12 for m in guest.vm.mappings())
    if change == "move":
        assert guest.read(new_gpa + page) == pattern(7)
    guest.vm.check_invariants()


def test_delete_keeps_other_slots(guest):
    """DELETE removes only the deleted slot: its range has no leaf and is MMIO; the other
    slot's memory is intact (its leaves may go too: x86 default VMs zap everything on a
    delete, KVM_X86_QUIRK_SLOT_ZAP_ALL)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.slot(1, GPA + slot_size, slot_size)
    guest.write(GPA, pattern(8))
    guest.write(GPA + slot_size, pattern(9))
    guest.vm.set_user_memory_region(0, GPA, 0, 0)
    assert [m for m in guest.vm.mappings() if m.gfn < (GPA + slot_size) >> 12] == []
    assert guest.read(GPA + slot_size) == pattern(9)
    expect_mmio(guest.read, GPA, 8, None, GPA)


def test_move_zaps_old_range_and_keeps_data(guest):
    """MOVE: the old range's leaves are zapped, the old range is MMIO, and the same host pages
    appear at the new gpa."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + 2 * page, pattern(10))
    new = GPA + 64 * slot_size
    guest.vm.set_user_memory_region(0, new, slot_size, hva)
    assert list(guest.vm.mappings()) == []
    expect_mmio(guest.read, GPA + 2 * page, 8, None, GPA + 2 * page)
    assert guest.read(new + 2 * page) == pattern(10)


def test_recreate_after_delete(guest, host):
    """A deleted id can be created again elsewhere with other memory."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(11))
    guest.vm.set_user_memory_region(0, GPA, 0, 0)
    hva = guest.slot(0, GPA + slot_size, slot_size)
    host.write(hva, pattern(12))
    assert guest.read(GPA + slot_size) == pattern(12)


def test_slot_boundaries(guest):
    """The last page of a slot is memory, the page after it is MMIO."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.slot(0, GPA, slot_size)
    guest.write(GPA + slot_size - 8, pattern(13))
    assert guest.read(GPA + slot_size - 8) == pattern(13)
    expect_mmio(guest.read, GPA + slot_size, 8, None, GPA + slot_size)
    expect_mmio(guest.read, GPA - page, 8, None, GPA - page)
