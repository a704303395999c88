"""guest_memfd: create, bind, fallocate, punch hole, mmap, memory errors, release
(reference §3), and the faults it serves."""

import errno

import pytest
from conftest import MiB, snapshot

from kvmcore import KvmError, MemoryFaultExit
from kvmcore.errors import EHWPOISON, InvariantError
from kvmcore.host import SigBus
from kvmcore.uapi import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
                          GUEST_MEMFD_FLAG_MMAP, KVM_MEM_GUEST_MEMFD,
                          KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
                          KVM_MEMSLOT_GMEM_ONLY)

PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def private_slot(vm, host, size=4 * MiB, gpa=0, slot=0, gmem=None, offset=0):
    gmem = gmem or vm.create_guest_memfd(size)
    hva = host.mmap(size)
    vm.set_user_memory_region(slot, gpa, size, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem,
                              guest_memfd_offset=offset)
    vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return gmem, hva


@pytest.mark.parametrize("size, flags, err", [
    (0, 0, errno.EINVAL), (4097, 0, errno.EINVAL), (-4096, 0, errno.EINVAL),
    (MiB, 1 << 7, errno.EINVAL),
    (MiB, GUEST_MEMFD_FLAG_INIT_SHARED, errno.EINVAL),  # a private-memory VM: no INIT_SHARED
])
def test_create_errors(pvm, size, flags, err):
    with pytest.raises(KvmError) as e:
        pvm.create_guest_memfd(size, flags)
    assert e.value.errno == err
    assert pvm.gmem_files == []


def test_create_folio_order_must_divide_size(pvm):
    with pytest.raises(KvmError, match="folio_order") as e:
        pvm.create_guest_memfd(MiB, folio_order=9)
    assert e.value.errno == errno.EINVAL


def test_bind_errors(pvm, make_vm, host):
    hva = host.mmap(4 * MiB)
    gmem = pvm.create_guest_memfd(2 * MiB)
    other = make_vm("sw_protected").create_guest_memfd(2 * MiB)
    closed = pvm.create_guest_memfd(2 * MiB)
    closed.close()
    cases = [(None, 0, errno.EBADF), (closed, 0, errno.EBADF), (42, 0, errno.EINVAL),
             (other, 0, errno.EINVAL), (gmem, MiB + 4096, errno.EINVAL)]
    for fd, off, err in cases:
        before = snapshot(pvm)
        with pytest.raises(KvmError) as e:
            pvm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=fd,
                                       guest_memfd_offset=off)
        assert e.value.errno == err, (fd, off)
        assert snapshot(pvm) == before


def test_one_binding_per_file_page(pvm, host):
    hva = host.mmap(4 * MiB)
    gmem = pvm.create_guest_memfd(2 * MiB)
    pvm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    before = snapshot(pvm)
    with pytest.raises(KvmError, match="already bound") as e:
        pvm.set_user_memory_region(1, 8 * MiB, MiB, hva, KVM_MEM_GUEST_MEMFD,
                                   guest_memfd=gmem, guest_memfd_offset=MiB - 4096)
    assert e.value.errno == errno.EINVAL
    assert snapshot(pvm) == before
    # Disjoint ranges of one file may back two slots.
    pvm.set_user_memory_region(1, 8 * MiB, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem,
                               guest_memfd_offset=MiB)
    assert [(s, e) for s, e, _ in gmem.bindings] == [(0, 256), (256, 512)]


@pytest.mark.parametrize("mode, offset, length, err", [
    (0, 0, 4096, errno.EOPNOTSUPP),
    (FALLOC_FL_KEEP_SIZE | 0x8, 0, 4096, errno.EOPNOTSUPP),
    (FALLOC_FL_KEEP_SIZE, 10, 4096, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE, 0, 4097, errno.EINVAL),
    (FALLOC_FL_KEEP_SIZE, MiB, 4096, errno.EINVAL),     # beyond i_size
])
def test_fallocate_errors(pvm, mode, offset, length, err):
    gmem = pvm.create_guest_memfd(MiB)
    with pytest.raises(KvmError) as e:
        gmem.fallocate(mode, offset, length)
    assert e.value.errno == err
    assert gmem.inode.folios == {}


def test_private_fault_maps_gmem_and_punch_hole_zaps_private(pvm, host):
    gmem, _ = private_slot(pvm, host)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0x3000, b"secret")
    leaf = pvm.lookup(0x3000, private=True)
    assert leaf is not None and leaf.private and leaf.size == 4096
    assert leaf.pfn == gmem.inode.folios[3]
    gmem.fallocate(PUNCH, 0x3000, 0x1000)
    assert pvm.lookup(0x3000, private=True) is None
    assert pvm.mmu_invalidate_seq == 2  # set_memory_attributes, then the punch
    assert vcpu.read(0x3000, 6) == bytes(6)   # punched memory comes back zeroed


def test_gmem_mmap_needs_flag(pvm):
    with pytest.raises(KvmError) as e:
        pvm.create_guest_memfd(MiB).mmap()
    assert e.value.errno == errno.ENODEV


def test_gmem_only_slot_serves_shared_faults_from_the_file(vm, host):
    gmem = vm.create_guest_memfd(2 * MiB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    vm.set_user_memory_region(0, 0, 2 * MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    slot = vm.gfn_to_memslot(0)
    assert slot.flags & KVM_MEMSLOT_GMEM_ONLY
    host.write(hva + 0x5000, b"from host")
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(0x5000, 9) == b"from host"
    assert vm.lookup(0x5000).pfn == gmem.inode.folios[5]


def test_a_memory_error_unmaps_a_guest_memfd_page_from_its_mapping_first(vm, host):
    """memory_failure unmaps a poisoned page-cache folio from every user mapping first
    (hwpoison_user_mappings: try_to_unmap with TTU_HWPOISON, in an MMU-notifier
    invalidation of the page, which leaves a hwpoison entry), then calls the file's
    error_remove_folio (kvm_gmem_error_folio's invalidation): the host's mapping of a
    guest_memfd page goes, and a touch is SIGBUS from the entry."""
    gmem = vm.create_guest_memfd(2 * MiB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    vm.set_user_memory_region(0, 0, 2 * MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    host.write(hva + 0x5000, b"x")
    vm.create_vcpu(0).read(0x5000, 1)
    seq = vm.mmu_invalidate.seq
    host.poison(hva + 0x5000)
    assert host.lookup_pte(hva + 0x5000) is None and vm.lookup(0x5000) is None
    assert gmem.inode.poisoned == {5} and 5 in gmem.inode.folios
    assert vm.mmu_invalidate.seq == seq + 2           # the unmap's, then the file's
    with pytest.raises(SigBus, match="hardware-poisoned"):
        host.read(hva + 0x5000, 1)
    assert host.read(hva + 0x6000, 1) == b"\0"
    vm.check_invariants()


def test_gmem_mmap_read_fault_maps_writable(vm, host):
    """A guest_memfd mapping is MAP_SHARED with no writenotify (no page_mkwrite, no
    writeback), so its page protection is writable and a read fault maps the page writable
    (set_pte_range), where a writenotify file maps it read-only until the first write."""
    gmem = vm.create_guest_memfd(2 * MiB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    assert host.read(hva + 0x3000, 1) == b"\0"
    assert host.lookup_pte(hva + 0x3000)[1:] == (True, 4096)
    assert host.gup_fast(hva + 0x3000, True) is not None


def test_release_zaps_and_later_faults_efault(pvm, host):
    gmem, _ = private_slot(pvm, host)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0, b"a")
    folios = dict(gmem.inode.folios)
    gmem.close()
    assert list(pvm.mappings()) == []
    assert gmem.inode.folios == folios           # the inode keeps its memory
    with pytest.raises(MemoryFaultExit) as e:
        vcpu.read(0, 1)
    assert (e.value.errno, e.value.flags, e.value.gpa) == (errno.EFAULT,
                                                           KVM_MEMORY_EXIT_FLAG_PRIVATE, 0)


def test_a_dying_file_serves_no_fault_before_release_zaps(pvm, host):
    """After the last fput the file is dying: kvm_gmem_get_pfn's get_file_active fails, so a
    fault on a page not mapped yet is -EFAULT (KVM_EXIT_MEMORY_FAULT) even before
    kvm_gmem_release, waiting for slots_lock, has zapped; a page already mapped is read
    through its leaf until release zaps it."""
    gmem, _ = private_slot(pvm, host)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0, b"a")
    close = gmem.steps.close()
    assert next(close) == "gmem_slots_lock_wait"
    with pytest.raises(MemoryFaultExit) as e:
        vcpu.read(0x1000, 1)
    assert (e.value.errno, e.value.flags, e.value.gpa) == (errno.EFAULT,
                                                           KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x1000)
    assert vcpu.read(0, 1) == b"a"
    close.run()
    assert list(pvm.mappings()) == []
    pvm.check_invariants()


def test_a_close_while_a_fallocate_holds_the_file_is_not_its_last_fput(pvm, host):
    """A fallocate holds a reference to the file (fdget) for its length: the close of the
    fd then is not the last fput. The fd is gone at once (a new fallocate is EBADF), but the
    file is not dying, and the release runs when the fallocate returns (before, the file
    was dying at once: a memslot deletion then unbound it without the invalidate lock under
    the hole punch's invalidation, whose end found no binding; the swarm, seed 16, the
    202nd)."""
    gmem, _ = private_slot(pvm, host)
    pvm.create_vcpu(0).write(0x3000, b"a")
    punch = gmem.steps.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 0x2000)
    assert next(punch) == "gmem_inval_lock_wait"
    close = gmem.steps.close()
    assert next(close) == "gmem_last_fput_wait" and not close.runnable
    assert gmem.fd_closed and not gmem.dying and gmem.refs == 1
    with pytest.raises(KvmError) as e:
        gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, 0x1000)
    assert e.value.errno == errno.EBADF
    assert pvm.create_vcpu(1).read(0x3000, 1) == b"a"     # the file still serves faults
    punch.run()
    assert close.runnable
    close.run()
    assert gmem.closed and list(pvm.mappings()) == []
    pvm.check_invariants()


def test_memory_error_zaps_and_faults_ehwpoison(pvm, host):
    gmem, _ = private_slot(pvm, host)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0x2000, b"a")
    host.memory_failure(gmem.inode.folios[2])
    assert pvm.lookup(0x2000, private=True) is None
    with pytest.raises(MemoryFaultExit) as e:
        vcpu.read(0x2000, 1)
    assert e.value.errno == EHWPOISON and e.value.private
    vcpu.read(0x3000, 1)   # the neighbour is fine


def test_a_leaf_over_a_poisoned_folio_is_a_missed_invalidation_once_its_zap_began(
        pvm, host):
    """kvm_gmem_get_pfn fails with -EHWPOISON once memory_failure marked the folio, and
    kvm_gmem_error_folio's invalidation zaps what was mapped: a leaf on the folio may stay
    while the handler has not begun its invalidation, and is a missed invalidation after
    (before this check, a fault that skipped its staleness test left a private leaf on a
    poisoned page unnoticed: ``no_stale_check`` on ``private_fault_vs_memory_failure``)."""
    gmem, _ = private_slot(pvm, host)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0x2000, b"a")
    leaf = pvm.lookup(0x2000, private=True)
    flow = host.steps.memory_failure(gmem.inode.folios[2])
    assert next(flow) == "gmem_inval_lock_wait"
    assert gmem.inode.poisoned == gmem.inode.poison_pending == {2}
    pvm.check_invariants()                  # flagged, not invalidated yet: the leaf stays
    flow.run()
    assert pvm.lookup(0x2000, private=True) is None and not gmem.inode.poison_pending
    # The leaf of a fault that got the pfn before the flag and installed after the zap
    # without looking at mmu_invalidate_seq: the page is poisoned again once it is there.
    gmem.inode.poisoned.clear()
    vcpu.read(0x2000, 1)
    gmem.inode.poisoned.add(2)
    assert pvm.lookup(0x2000, private=True).pfn == leaf.pfn
    with pytest.raises(InvariantError, match="guest_memfd page 2 is hardware-poisoned"):
        pvm.check_invariants()
    gmem.inode.poisoned.clear()             # for the fixture's own check at the end


def test_private_fault_on_slot_without_gmem_exits(pvm, host):
    hva = host.mmap(MiB)
    pvm.set_user_memory_region(0, 0, MiB, hva)
    pvm.set_memory_attributes(0, MiB, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    with pytest.raises(MemoryFaultExit) as e:
        pvm.create_vcpu(0).read(0x4000, 4)
    assert (e.value.flags, e.value.gpa, e.value.size) == (KVM_MEMORY_EXIT_FLAG_PRIVATE,
                                                          0x4000, 4096)


@pytest.mark.parametrize("order, offset, expect", [
    (9, 0, 2 * MiB),        # a 2 MiB folio, aligned: a 2 MiB leaf
    (1, 0, 4096),           # order 1 is below the next level: 4 KiB
    (9, 4096 * 512 * 1, 2 * MiB),
])
def test_folio_order_caps_the_leaf(pvm, host, order, offset, expect):
    gmem = pvm.create_guest_memfd(8 * MiB, folio_order=order)
    private_slot(pvm, host, size=4 * MiB, gmem=gmem, offset=offset)
    pvm.create_vcpu(0).write(0x1000, b"x")
    assert pvm.lookup(0x1000, private=True).size == expect


def test_misaligned_gmem_offset_maps_small(pvm, host):
    gmem = pvm.create_guest_memfd(8 * MiB, folio_order=9)
    private_slot(pvm, host, size=4 * MiB, gmem=gmem, offset=MiB)  # gpa 0 vs offset 1 MiB
    pvm.create_vcpu(0).write(0x1000, b"x")
    assert pvm.lookup(0x1000, private=True).size == 4096


def test_private_gmem_pages_cannot_be_touched_by_the_host(make_vm):
    vm = make_vm()   # a VM without private memory may mmap its guest_memfd
    gmem = vm.create_guest_memfd(MiB, GUEST_MEMFD_FLAG_MMAP)   # but not INIT_SHARED
    hva = gmem.mmap()
    with pytest.raises(SigBus, match="private"):
        vm.host.read(hva, 1)
