"""Dirty logging (reference §6): GET with re-protection, CLEAR, manual protect,
INITIALLY_SET, and the dirty ring."""

import errno

import pytest
from conftest import MiB, snapshot

from kvmcore import DirtyRingFullExit, KvmError
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG


@pytest.fixture
def logged(vm, host):
    hva = host.mmap(4 * MiB)
    vm.set_user_memory_region(0, 0, 4 * MiB, hva, LOG)
    return hva


def test_get_reports_once_and_reprotects(vm, logged):
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x1000, b"a")
    vcpu.write(0x5000, b"b")
    vcpu.read(0x9000, 1)
    assert vm.get_dirty_log(0) == [1, 5]
    assert not vm.lookup(0x1000).writable               # re-protected
    assert vm.get_dirty_log(0) == []
    vcpu.write(0x1000, b"c")                            # write after the snapshot
    assert vm.get_dirty_log(0) == [1]


def test_logging_forces_small_leaves_and_write_protects(vm, host):
    hva = host.mmap(4 * MiB, thp=True)
    vm.set_user_memory_region(0, 0, 4 * MiB, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x1000, b"x")
    assert vm.lookup(0x1000).size == 2 * MiB
    vm.set_user_memory_region(0, 0, 4 * MiB, hva, LOG)
    assert not vm.lookup(0x1000).writable
    vcpu.write(0x3000, b"y")
    assert vm.lookup(0x3000).size == 4096 and vm.lookup(0x3000).writable
    assert vm.get_dirty_log(0) == [3]


@pytest.mark.parametrize("slot, err", [(5, errno.ENOENT), (2 << 16, errno.EINVAL),
                                       (32767, errno.EINVAL)])
def test_get_errors(vm, logged, slot, err):
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(slot)
    assert e.value.errno == err


def test_get_on_slot_without_logging_is_enoent(vm, host):
    vm.set_user_memory_region(0, 0, MiB, host.mmap(MiB))
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0)
    assert e.value.errno == errno.ENOENT


def test_manual_protect_get_does_not_clear_clear_does(vm, logged):
    vm.enable_dirty_log_manual_protect()
    vcpu = vm.create_vcpu(0)
    for gfn in (1, 2, 70):
        vcpu.write(gfn << 12, b"x")
    assert vm.get_dirty_log(0) == [1, 2, 70]
    assert vm.lookup(0x1000).writable
    assert vm.get_dirty_log(0) == [1, 2, 70]
    vm.clear_dirty_log(0, 0, 64, [1])
    assert vm.get_dirty_log(0) == [2, 70]
    assert not vm.lookup(0x1000).writable and vm.lookup(0x2000).writable
    vm.clear_dirty_log(0, 64, 1024 - 64, [70])     # runs to the end: any count
    assert vm.get_dirty_log(0) == [2]


@pytest.mark.parametrize("first, num, pages, err", [
    (1, 64, [], errno.EINVAL),            # first_page & 63
    (0, 1025, [], errno.EINVAL),          # beyond npages
    (1024 + 64, 0, [], errno.EINVAL),     # first_page > npages
    (0, 65, [], errno.EINVAL),            # not a multiple of 64 short of the end
    (0, 64, [64], errno.EINVAL),          # a page outside the range
])
def test_clear_errors(vm, logged, first, num, pages, err):
    vm.enable_dirty_log_manual_protect()
    vm.create_vcpu(0).write(0, b"x")
    before = snapshot(vm)
    with pytest.raises(KvmError) as e:
        vm.clear_dirty_log(0, first, num, pages)
    assert e.value.errno == err
    assert snapshot(vm) == before and vm.get_dirty_log(0) == [0]


def test_initially_set(vm, host):
    vm.enable_dirty_log_manual_protect(initially_set=True)
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva, LOG)
    assert vm.get_dirty_log(0) == list(range(256))


def test_manual_protect_flags(vm):
    vm.enable_dirty_log_manual_protect(enable=False)
    assert vm.manual_dirty_log_protect == 0


def test_ring_size_checks(vm):
    for size, err in ((0, errno.EINVAL), (3 * 4096, errno.EINVAL), (2048, errno.EINVAL),
                      (1 << 21, errno.E2BIG)):
        with pytest.raises(KvmError) as e:
            vm.enable_dirty_ring(size)
        assert e.value.errno == err, size
    vm.enable_dirty_ring(1 << 16)
    with pytest.raises(KvmError):
        vm.enable_dirty_ring(1 << 16)


def test_ring_after_vcpu_is_einval(vm):
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vm.enable_dirty_ring(1 << 16)
    assert e.value.errno == errno.EINVAL


def test_ring_push_harvest_reset_and_soft_full(vm, host):
    vm.enable_dirty_ring(4096)                      # 256 entries, soft limit 192
    hva = host.mmap(4 * MiB)
    vm.set_user_memory_region(0, 0, 4 * MiB, hva, LOG)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0)
    assert e.value.errno == errno.ENXIO
    for gfn in range(191):
        vcpu.write(gfn << 12, b"x")
    assert vcpu.dirty_ring.used == 191
    with pytest.raises(DirtyRingFullExit):          # its fault reaches the soft limit:
        vcpu.write(191 << 12, b"x")                 # the vCPU exits before the write
    assert host.read(hva + (191 << 12), 1) == b"\0"
    with pytest.raises(DirtyRingFullExit):          # and again while nothing is harvested
        vcpu.read(0, 1)
    harvested = vcpu.harvest_dirty_ring()
    assert harvested == [(0, gfn) for gfn in range(192)]
    assert vm.reset_dirty_rings() == 192
    assert not vm.lookup(0).writable                 # re-protected by the reset
    vcpu.read(0, 1)                                  # may run again
    assert vm.reset_dirty_rings() == 0


def test_reset_without_ring_is_einval(vm):
    with pytest.raises(KvmError) as e:
        vm.reset_dirty_rings()
    assert e.value.errno == errno.EINVAL


def test_ring_reset_flushes_after_dropping_its_locks(vm, host):
    """kvm_vm_ioctl_reset_dirty_pages flushes after it has dropped slots_lock: stepped, the
    reset stops there holding nothing, a vCPU may still write through its stale entry, and
    the invariants wait for the flush."""
    vm.enable_dirty_ring(4096)
    hva = host.mmap(4 * MiB)
    vm.set_user_memory_region(0, 0, 4 * MiB, hva, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x1000, b"a")
    vcpu.harvest_dirty_ring()
    reset = vm.steps.reset_dirty_rings()
    points = []
    while True:
        points.append(next(reset))
        if points[-1] == "dlog_unlocked_before_flush":
            break
    assert reset.holds == [] and not vm.lookup(0x1000).writable
    vm.check_invariants()
    vcpu.write(0x1000, b"b")                          # the stale writable entry
    assert vcpu.dirty_ring.used == 0
    assert reset.run() == 1
    vm.check_invariants()
    vcpu.write(0x1000, b"c")                          # faults again, and is logged
    assert vcpu.dirty_ring.used == 1
