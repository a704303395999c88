"""guest_memfd: create, bind, fallocate, punch hole, mmap and release, with their errnos and
effects (reference/core.md §3; invariants 11-13)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (
    MAX_PAGE,
    PAGE,
    expect_errno,
    expect_errno_unchanged,
    expect_memory_fault,
    pattern,
    step_until,
)
from kvmcore.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
)

pytestmark = pytest.mark.requires("gmem")

GPA = 0x100_0000
SLOT_PAGES = 16  # the usual slot, in base pages
EINVAL, EOPNOTSUPP, ENODEV, EBADF = errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV, errno.EBADF
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@pytest.mark.parametrize("size,flags", [
    pytest.param(0, 0, id="size-zero"),
    pytest.param(PAGE + 1, 0, id="size-unaligned"),
    pytest.param(MAX_PAGE, 1 << 2, id="unknown-flag"),
    pytest.param(1 << 63, 0, id="size-negative-loff_t"),
    pytest.param((1 << 64) - MAX_PAGE, 0, id="size-u64-max-aligned"),
])
def test_create_einval(vm, size, flags):
    """kvm_gmem_create: flags outside the supported set, size <= 0 or not page-aligned. The
    u64 size is read into a loff_t, so an aligned size of 2^63 or more is negative: EINVAL
    (found by the differential test against /dev/kvm)."""
    expect_errno(EINVAL, vm.create_guest_memfd, size, flags)


def test_bind_beyond_size_einval(guest, host):
    """kvm_gmem_bind: offset + size > i_size is EINVAL; no slot appears."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size)
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem, guest_memfd_offset=page)
    # The failed bind left no binding behind: the whole file can still be bound.
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)


def test_bind_overlapping_binding_einval(guest, host):
    """One binding per file page: a second slot over a bound offset is EINVAL."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, _ = guest.gmem_slot(0, GPA, slot_size // 2, gmem=guest.new_gmem(slot_size))
    hva = host.mmap(slot_size // 2)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 1, GPA + slot_size,
                           slot_size // 2, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem,
                           guest_memfd_offset=slot_size // 2 - page)


def test_bind_disjoint_ranges(guest, host):
    """Several slots may bind disjoint ranges of one file; each serves its own pages."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size)
    guest.gmem_slot(0, GPA, slot_size // 2, gmem=gmem, offset=0)
    hva = host.mmap(slot_size // 2)
    guest.vm.set_user_memory_region(1, GPA + slot_size, slot_size // 2, hva, KVM_MEM_GUEST_MEMFD,
                                    guest_memfd=gmem, guest_memfd_offset=slot_size // 2)


def test_bind_closed_file_ebadf(guest, host):
    """kvm_gmem_bind: fget fails on a closed guest_memfd -> EBADF."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(slot_size)
    gmem.close()
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EBADF, guest.vm.set_user_memory_region, 0, GPA, slot_size, hva,
                           KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)


def test_bind_other_vms_file_einval(guest, host, make_vm):
    """kvm_gmem_bind: a guest_memfd of another VM is EINVAL."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    other = make_vm(vm_type=guest.vm.vm_type)
    gmem = other.create_guest_memfd(slot_size, guest.gmem_flags())
    hva = host.mmap(slot_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vm.set_user_memory_region, 0, GPA, slot_size,
                           hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)


@pytest.mark.parametrize("mode,offset,length,err", [
    pytest.param(FALLOC_FL_PUNCH_HOLE, 0, MAX_PAGE, EOPNOTSUPP, id="no-keep-size"),
    pytest.param(FALLOC_FL_KEEP_SIZE | 0x10, 0, MAX_PAGE, EOPNOTSUPP, id="unknown-mode-bit"),
    pytest.param(FALLOC_FL_KEEP_SIZE, 100, MAX_PAGE, EINVAL, id="offset-unaligned"),
    pytest.param(PUNCH, 0, MAX_PAGE + 1, EINVAL, id="len-unaligned"),
    pytest.param(FALLOC_FL_KEEP_SIZE, (SLOT_PAGES - 1) * MAX_PAGE, 2 * MAX_PAGE, EINVAL,
                 id="allocate-past-size"),
])
def test_fallocate_errors(vm, mode, offset, length, err):
    """kvm_gmem_fallocate: mode must hold KEEP_SIZE and only KEEP_SIZE|PUNCH_HOLE
    (EOPNOTSUPP), offset and len page-aligned (EINVAL), allocation inside i_size (EINVAL)."""
    gmem = vm.create_guest_memfd(SLOT_PAGES * MAX_PAGE)
    expect_errno(err, gmem.fallocate, mode, offset, length)


@pytest.mark.requires("private_mem")
def test_fallocate_allocate_keeps_zero_contents(guest):
    """Allocating pages hands them to the guest zeroed."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, _ = guest.gmem_slot(0, GPA, slot_size)
    gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, slot_size)
    guest.make_private(GPA, slot_size)
    assert guest.read(GPA + 3 * page, 32, private=True) == bytes(32)


@pytest.mark.requires("private_mem")
def test_punch_hole_zaps_private_and_zeroes(guest):
    """Punch hole invalidates the private leaves of the range (KVM_FILTER_PRIVATE) and frees
    the pages: they read back zero; pages outside keep their leaf and data."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, _ = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    for i in range(4):
        guest.write(GPA + i * page, pattern(i + 1), private=True)
    lo, hi = (GPA + page) >> 12, (GPA + 3 * page) >> 12
    keep = [m for m in guest.vm.mappings() if not lo <= m.gfn < hi]
    gmem.fallocate(PUNCH, page, 2 * page)
    assert guest.vm.lookup(GPA + page, private=True) is None
    assert guest.vm.lookup(GPA + 2 * page, private=True) is None
    assert list(guest.vm.mappings()) == keep
    assert guest.read(GPA + page, private=True) == bytes(8)
    assert guest.read(GPA + 2 * page, private=True) == bytes(8)
    assert guest.read(GPA, private=True) == pattern(1)
    assert guest.read(GPA + 3 * page, private=True) == pattern(4)


@pytest.mark.requires("private_mem")
def test_punch_hole_with_offset_binding(guest):
    """Punch hole maps file offsets to gfns through the binding's pgoff."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(2 * slot_size)
    guest.gmem_slot(0, GPA, slot_size, gmem=gmem, offset=slot_size)
    guest.make_private(GPA, slot_size)
    guest.write(GPA + 2 * page, pattern(5), private=True)
    guest.write(GPA + 5 * page, pattern(6), private=True)
    gmem.fallocate(PUNCH, slot_size + 2 * page, page)
    assert guest.vm.lookup(GPA + 2 * page, private=True) is None
    assert guest.vm.lookup(GPA + 5 * page, private=True) is not None
    assert guest.read(GPA + 5 * page, private=True) == pattern(6)
    assert guest.read(GPA + 2 * page, private=True) == bytes(8)


@pytest.mark.requires("private_mem")
def test_release_zaps_and_faults_efault(guest):
    """File release zaps every leaf of the file; the slot stays, and a private access then
    exits KVM_EXIT_MEMORY_FAULT (kvm_gmem_get_pfn: -EFAULT)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, _ = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    guest.write(GPA, pattern(7), private=True)
    gmem.close()
    assert [m for m in guest.vm.mappings() if m.private] == []
    expect_memory_fault(page, guest.read, GPA, private=True, gpa=GPA, exit_private=True)


# The inode's invalidate lock (filemap_invalidate_lock, an rw_semaphore) keeps a file's
# bindings stable across a punch hole, a memory error and release, so that each one's
# invalidate begin and end are balanced (guest_memfd.c: kvm_gmem_bind, kvm_gmem_unbind,
# kvm_gmem_release, kvm_gmem_allocate, kvm_gmem_error_folio).

@pytest.mark.requires("private_mem")
def test_slot_delete_waits_for_a_punch_hole(guest):
    """A memslot DELETE unbinds under the invalidate lock: it waits while a punch hole is
    between its begin and end, and once both are done a new slot there faults normally (no
    invalidation is left in progress)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, hva = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    guest.write(GPA, pattern(3), private=True)
    punch = gmem.steps.fallocate(PUNCH, 0, page)
    step_until(punch, "gmem_begin_done")
    delete = guest.vm.steps.set_user_memory_region(0, GPA, 0, hva, 0)
    step_until(delete, "gmem_unbind_lock_wait")
    assert not delete.runnable
    assert delete.waits_for == "gmem_invalidate_lock(write)"
    punch.run()
    delete.run()
    guest.gmem_slot(1, GPA, slot_size)
    assert guest.read(GPA, private=True) == bytes(8)
    guest.vm.check_invariants()


@pytest.mark.requires("private_mem")
def test_slot_create_waits_for_a_punch_hole(guest):
    """kvm_gmem_bind checks and stores the binding under the invalidate lock: a CREATE on
    another range of the file waits for a punch hole in progress."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.new_gmem(2 * slot_size)
    guest.gmem_slot(0, GPA, slot_size, gmem=gmem)
    guest.make_private(GPA, 2 * slot_size)
    guest.write(GPA, pattern(4), private=True)
    punch = gmem.steps.fallocate(PUNCH, 0, page)
    step_until(punch, "gmem_begin_done")
    hva = guest.host.mmap(slot_size, prot="rw", kind="anon")
    create = guest.vm.steps.set_user_memory_region(1, GPA + slot_size, slot_size, hva,
                                                   KVM_MEM_GUEST_MEMFD, guest_memfd=gmem,
                                                   guest_memfd_offset=slot_size)
    step_until(create, "gmem_bind_lock_wait")
    assert not create.runnable
    punch.run()
    create.run()
    assert guest.read(GPA + slot_size, private=True) == bytes(8)
    guest.vm.check_invariants()


@pytest.mark.requires("private_mem")
def test_release_excludes_memslot_updates(guest):
    """kvm_gmem_release holds kvm->slots_lock for its whole walk: a DELETE of a bound slot
    waits for it, and a release waits for a memslot update that holds slots_lock."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, hva = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    guest.write(GPA, pattern(5), private=True)
    close = gmem.steps.close()
    step_until(close, "gmem_begin_lock_wait")
    delete = guest.vm.steps.set_user_memory_region(0, GPA, 0, hva, 0)
    assert next(delete) == "slots_lock_wait" and not delete.runnable
    close.run()
    delete.run()
    assert list(guest.vm.mappings()) == []

    gmem2, hva2 = guest.gmem_slot(1, GPA, slot_size)
    other = guest.host.mmap(slot_size, prot="rw", kind="anon")
    update = guest.vm.steps.set_user_memory_region(2, GPA + slot_size, slot_size, other)
    step_until(update, "slot_srcu_sync")
    close2 = gmem2.steps.close()
    assert next(close2) == "gmem_slots_lock_wait" and not close2.runnable
    update.run()
    close2.run()
    guest.vm.check_invariants()


@pytest.mark.requires("private_mem")
def test_memory_error_shares_the_invalidate_lock_with_allocation(guest, host):
    """kvm_gmem_error_folio and kvm_gmem_allocate take the invalidate lock shared: an
    allocation completes beside a memory error in progress, a punch hole waits for it."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem, _ = guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, slot_size)
    guest.write(GPA, pattern(6), private=True)
    pfn = guest.vm.lookup(GPA, private=True).pfn
    error = host.steps.memory_failure(pfn)
    step_until(error, "gmem_begin_lock_wait")
    assert error.holds == ["gmem_invalidate_lock(read)"]
    gmem.fallocate(FALLOC_FL_KEEP_SIZE, page, page)
    punch = gmem.steps.fallocate(PUNCH, 2 * page, page)
    assert next(punch) == "gmem_inval_lock_wait" and not punch.runnable
    error.run()
    punch.run()
    assert guest.vm.lookup(GPA, private=True) is None
    guest.vm.check_invariants()


@pytest.mark.requires("private_mem")
def test_private_content_survives_zap(guest):
    """Guest-private data lives in the file: a zap (conversion round trip of another page)
    does not lose it."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    guest.gmem_slot(0, GPA, slot_size)
    guest.make_private(GPA, 2 * page)
    guest.write(GPA, pattern(8), private=True)
    guest.make_shared(GPA + page, page)
    guest.make_private(GPA + page, page)
    assert guest.read(GPA, private=True) == pattern(8)


def test_mmap_without_flag_enodev(vm):
    """kvm_gmem_mmap: a guest_memfd without GUEST_MEMFD_FLAG_MMAP cannot be mmapped."""
    page = vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = vm.create_guest_memfd(slot_size)
    expect_errno(ENODEV, gmem.mmap)


@pytest.mark.requires("gmem_mmap")
def test_mmap_init_shared_host_and_guest_share(guest, host):
    """MMAP|INIT_SHARED: the host writes through the mapping and the guest's shared access of
    the gmem-only slot reads it (KVM_MEMSLOT_GMEM_ONLY serves shared faults from the file)."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.vm.create_guest_memfd(slot_size,
                                       GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    host.write(hva + page, pattern(9))
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    assert guest.read(GPA + page) == pattern(9)
    guest.write(GPA + 2 * page, pattern(10))
    assert host.read(hva + 2 * page, 8) == pattern(10)


@pytest.mark.requires("gmem_mmap")
def test_mmap_without_init_shared_sigbus(vm, host):
    """kvm_gmem_fault_user_mapping: an inode without INIT_SHARED -> SIGBUS on host access."""
    page = vm.page_size
    slot_size = SLOT_PAGES * page
    from kvmcore.host import SigBus

    gmem = vm.create_guest_memfd(slot_size, GUEST_MEMFD_FLAG_MMAP)
    hva = gmem.mmap()
    with pytest.raises(SigBus):
        host.read(hva, 8)


@pytest.mark.requires("gmem_mmap")
def test_mmap_punch_hole_zaps_shared(guest, host):
    """For an INIT_SHARED file the invalidation filter is KVM_FILTER_SHARED: a punch hole
    zaps the shared leaf and the page reads back zero."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    gmem = guest.vm.create_guest_memfd(slot_size,
                                       GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    guest.vm.set_user_memory_region(0, GPA, slot_size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    guest.write(GPA + page, pattern(11))
    assert guest.vm.lookup(GPA + page) is not None
    gmem.fallocate(PUNCH, page, page)
    assert guest.vm.lookup(GPA + page) is None
    assert guest.read(GPA + page) == bytes(8)
    assert host.read(hva + page, 8) == bytes(8)
