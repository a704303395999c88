"""The generic fault path: exits, the private/shared check, hva -> pfn, and the races it must
survive, replayed through the generator race points."""

import errno

import pytest
from conftest import MiB

from kvmcore import HwPoisonSignal, KvmError, MemoryFaultExit, MmioExit
from kvmcore.records import PageFault
from kvmcore.locks import Flow, WouldBlock, drive
from kvmcore.fault import AFTER_SNAPSHOT, BEFORE_LOCK, kvm_page_fault, run_to_completion
from kvmcore.hva import kvm_handle_hva_range_op
from kvmcore.uapi import (KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY,
                          KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE,
                          KVM_MEMORY_EXIT_FLAG_PRIVATE, RET_PF_RETRY)


@pytest.fixture
def slot0(vm, host):
    hva = host.mmap(4 * MiB)
    vm.set_user_memory_region(0, 0, 4 * MiB, hva)
    return hva


def test_no_slot_is_mmio(vm, slot0):
    vcpu = vm.create_vcpu(0)
    with pytest.raises(MmioExit) as e:
        vcpu.write(0x10000000, b"\x01\x02")
    assert (e.value.phys_addr, e.value.length, e.value.is_write, e.value.data) == (
        0x10000000, 2, True, b"\x01\x02")
    with pytest.raises(MmioExit) as e:
        vcpu.read(0x10000000, 4)
    assert (e.value.is_write, e.value.data) == (False, None)


def test_write_to_readonly_slot_is_mmio_read_maps_readonly(vm, host):
    hva = host.mmap(MiB)
    host.write(hva, b"rom")
    vm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_READONLY)
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(0, 3) == b"rom"
    assert not vm.lookup(0).writable
    with pytest.raises(MmioExit) as e:
        vcpu.write(0, b"x")
    assert e.value.is_write and e.value.phys_addr == 0
    assert host.read(hva, 3) == b"rom"


def test_untouched_anon_read_maps_zero_page_then_cow(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(0x5000, 4) == bytes(4)
    leaf = vm.lookup(0x5000)
    assert leaf.pfn == host.zero_pfn and not leaf.writable
    vcpu.write(0x5000, b"cow!")
    leaf = vm.lookup(0x5000)
    assert leaf.pfn != host.zero_pfn and leaf.writable
    assert host.read(slot0 + 0x5000, 4) == b"cow!"


def test_host_cow_break_zaps_the_zero_page_mapping(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    vcpu.read(0x6000, 1)
    host.write(slot0 + 0x6000, b"host")        # COW break fires the notifier
    assert vm.lookup(0x6000) is None
    assert vcpu.read(0x6000, 4) == b"host"


def test_private_access_to_shared_gfn_exits_with_flag(pvm, host):
    gmem = pvm.create_guest_memfd(MiB)
    hva = host.mmap(MiB)
    pvm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0x2000, b"shared")                # shared by default
    pvm.set_memory_attributes(0x2000, 4096, PRIVATE)
    # a private fault whose gfn is shared: exit, PRIVATE flag, gpa of the gfn
    pvm.set_memory_attributes(0x2000, 4096, 0)
    fault = PageFault(addr=0x2123, gfn=2, is_private=True, vcpu=vcpu)
    with pytest.raises(MemoryFaultExit) as e:
        run_to_completion(kvm_page_fault(pvm, fault))
    assert (e.value.flags, e.value.gpa, e.value.size, e.value.errno) == (
        KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x2000, 4096, errno.EFAULT)


def test_pfnmap_maps_device_pfn_with_retry(vm, host):
    hva = host.mmap(MiB, kind="pfnmap", pfn=0xFE000)
    vm.set_user_memory_region(0, 0, MiB, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.read(0x3000, 4)
    assert vm.lookup(0x3000).pfn == 0xFE003
    assert vm.stats["hva_to_pfn_remapped_retry"] == 1   # populate dropped the lock, retry
    assert vm.stats["hva_to_pfn_fixup"] == 1


def test_hwpoison_signals(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x7000, b"x")
    host.poison(slot0 + 0x7000)
    assert vm.lookup(0x7000) is None
    with pytest.raises(HwPoisonSignal) as e:
        vcpu.read(0x7000, 1)
    assert e.value.hva == slot0 + 0x7000 and e.value.lsb == 12


def test_unmapped_hva_is_efault_memory_fault(vm, host):
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    host.munmap(hva, MiB)
    with pytest.raises(MemoryFaultExit) as e:
        vm.create_vcpu(0).read(0, 1)
    assert (e.value.errno, e.value.flags) == (errno.EFAULT, 0)


# ------------------------------------------------------------------ races


def test_invalidation_after_snapshot_makes_the_fault_retry(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    steps = vcpu.step_access("write", 0x1000, b"x")
    assert next(steps) == AFTER_SNAPSHOT
    host.madvise_dontneed(slot0, 4096 * 4)         # invalidate gfn 1 and complete
    # mmu_invalidate_retry_gfn_unsafe before the pfn lookup: retry, start over, unlocked.
    assert next(steps) == AFTER_SNAPSHOT
    assert vm.stats["fault_retry_unsafe"] == 1 and vm.stats["fault_retry_stale"] == 0
    assert list(vm.mappings()) == []                 # nothing installed by the stale fault
    for _ in steps:
        pass
    assert vm.lookup(0x1000).writable


def test_cow_break_between_pfn_lookup_and_lock_installs_the_new_pfn(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    steps = vcpu.step_access("read", 0x9000, 4)
    next(steps)
    assert next(steps) == BEFORE_LOCK              # resolved to the zero page
    host.write(slot0 + 0x9000, b"new!")            # COW break: new pfn, notifier fired
    for _ in steps:
        pass
    assert vm.lookup(0x9000).pfn == host.lookup_pte(slot0 + 0x9000)[0] != host.zero_pfn
    assert vm.stats["fault_retry_stale"] == 1
    assert vcpu.read(0x9000, 4) == b"new!"


def test_invalidation_in_progress_of_other_gfn_does_not_stop_the_fault(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    steps = vcpu.step_access("write", 0x1000, b"x")
    assert next(steps) == AFTER_SNAPSHOT
    with host.invalidating(slot0 + 0x100000, 4096):     # gfn 0x100 being invalidated
        assert vm.mmu_invalidate_in_progress == 1
        assert next(steps) == BEFORE_LOCK
        with pytest.raises(StopIteration):
            next(steps)
        assert vm.lookup(0x1000) is not None and vm.stats["fault_retry_stale"] == 0


def test_invalidation_in_progress_of_same_gfn_blocks_install(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    steps = vcpu.step_access("write", 0x1000, b"x")
    next(steps)
    with host.invalidating(slot0, 0x2000):
        # The lockless pre-check sees the invalidation: retried before the pfn lookup, and
        # retries until the end.
        assert next(steps) == "pf_retry_wait"
        assert vm.lookup(0x1000) is None and vm.stats["fault_retry_unsafe"] == 1
        assert not steps.runnable
        with pytest.raises(WouldBlock):
            next(steps)
    assert steps.runnable
    for _ in steps:
        pass
    assert vm.lookup(0x1000) is not None


def test_conversion_between_snapshot_and_lock_retries_then_exits(pvm, host):
    gmem = pvm.create_guest_memfd(MiB)
    hva = host.mmap(MiB)
    pvm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    vcpu = pvm.create_vcpu(0)
    steps = vcpu.step_access("write", 0x4000, b"x", private=False)
    next(steps)
    assert next(steps) == BEFORE_LOCK                # shared pfn resolved
    pvm.set_memory_attributes(0x4000, 4096, PRIVATE)
    # Stale: the fault retries; the flat backend's sw_protected VM then derives the fault as
    # private from the attribute (as KVM_X86_SW_PROTECTED_VM does) and maps guest_memfd.
    assert next(steps) == AFTER_SNAPSHOT
    for _ in steps:
        pass
    assert pvm.lookup(0x4000, private=True).pfn == gmem.inode.folios[4]
    assert pvm.stats["fault_retry_stale"] == 1


def test_conversion_retry_then_mismatch_exit(pvm, host):
    gmem = pvm.create_guest_memfd(MiB)
    hva = host.mmap(MiB)
    pvm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    vcpu = pvm.create_vcpu(0)
    # A fault whose intent is fixed by its builder (as an SNP shared access would be),
    # stepped in a flow of its own (a plain run passes the points without pausing).
    steps = Flow("vcpu0.fault", kvm_page_fault(pvm, PageFault(addr=0x4000, gfn=4, write=True,
                                                             vcpu=vcpu)), vcpu)
    next(steps)
    next(steps)
    pvm.set_memory_attributes(0x4000, 4096, PRIVATE)
    with pytest.raises(StopIteration) as stop:
        next(steps)
    assert stop.value.value == RET_PF_RETRY and pvm.lookup(0x4000) is None
    # The retried fault (same intent: shared) now meets a private gfn: memory-fault exit.
    retry = Flow("vcpu0.fault", kvm_page_fault(pvm, PageFault(addr=0x4000, gfn=4, write=True,
                                                             vcpu=vcpu)), vcpu)
    assert next(retry) == AFTER_SNAPSHOT
    with pytest.raises(MemoryFaultExit) as e:
        next(retry)
    assert (e.value.flags, e.value.gpa, e.value.size) == (0, 0x4000, 4096)


def test_two_vcpus_read_then_write_end_writable(vm, host, slot0):
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    host.write(slot0 + 0x8000, b"data")
    ra = a.step_access("read", 0x8000, 4)
    wb = b.step_access("write", 0x8000, b"DATA")
    next(ra), next(wb), next(ra), next(wb)
    for steps in (wb, ra):
        for _ in steps:
            pass
    leaf = vm.lookup(0x8000)
    assert leaf.writable
    assert a.read(0x8000, 4) == b"DATA"


def test_memslot_delete_waits_for_a_suspended_fault(vm, host, slot0):
    """kvm_set_memslot publishes the INVALID copy, then synchronize_srcu waits for the fault
    that looked the old slot up (it holds kvm->srcu): the fault completes on the old slot,
    then the update's flush zaps what it installed. Before, the model had the fault retry."""
    vcpu = vm.create_vcpu(0)
    fault = vcpu.step_access("read", 0x1000, 1)
    assert next(fault) == "pf_seq_snapshot"
    assert next(fault) == "pf_lock_wait"
    delete = vm.steps.set_user_memory_region(0, 0, 0, slot0)
    assert next(delete) == "slots_lock_wait"
    assert next(delete) == "slot_srcu_sync"
    assert not delete.runnable and delete.waits_for == "srcu grace period"
    assert "slots_lock" in delete.holds
    with pytest.raises(WouldBlock):
        next(delete)
    assert fault.run() == b"\0"                 # the old slot's page, mapped
    assert vm.lookup(0x1000) is not None
    assert delete.runnable
    delete.run()
    assert list(vm.mappings()) == []
    with pytest.raises(MmioExit):
        vcpu.read(0x1000, 1)


def test_a_plain_call_that_would_block_leaves_its_flow_paused(vm, host, slot0):
    """A plain call cannot sleep: it raises WouldBlock with the paused flow, which holds
    what Linux's thread would hold while it waits, and finishes once the holder moves."""
    vcpu = vm.create_vcpu(0)
    fault = vcpu.step_access("read", 0x1000, 1)
    next(fault)
    with pytest.raises(WouldBlock) as info:
        vm.set_user_memory_region(0, 0, 0, slot0)
    delete = info.value.flow
    assert delete.point == "slot_srcu_sync" and delete.holds == ["slots_lock"]
    fault.run()
    delete.run()
    assert vm.memslots() == []


def test_stepping_says_whether_the_running_flow_stops_at_its_points():
    """locks.stepping(): True inside a flow driven by next(), False in a plain run (Flow.run,
    a nested drive) and outside any flow; it follows the flow, not the caller."""
    from kvmcore.locks import Flow, stepping

    seen = []

    def flow():
        seen.append(stepping())
        yield "a"
        seen.append(stepping())
        seen.append(drive(nested()))

    def nested():
        return stepping()
        yield

    f = Flow("f", flow())
    assert next(f) == "a"
    f.run()
    assert seen == [True, False, False] and not stepping()
    g = Flow("g", flow())
    assert next(g) == "a"
    with pytest.raises(StopIteration):
        next(g)
    assert seen[3:] == [True, True, True]


# ------------------------------------------------------------------ hva iteration


def test_hva_operator_stops_at_first_error(vm, host):
    hva = host.mmap(3 * MiB)
    for i in range(3):
        vm.set_user_memory_region(i, i * 16 * MiB, MiB, hva + i * MiB)
    visited = []

    def op(vm_, rng):
        visited.append(rng.slot.id)
        return -errno.EBUSY if rng.slot.id == 1 else 0

    assert kvm_handle_hva_range_op(vm, hva, hva + 3 * MiB, op) == -errno.EBUSY
    assert visited == [0, 1]
    assert not vm.mmu_lock.held
    assert kvm_handle_hva_range_op(vm, hva, hva + MiB, op) == 0


def test_notifier_rounds_partial_pages_outward(vm, host):
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    vcpu = vm.create_vcpu(0)
    for gfn in (1, 2, 3):
        vcpu.write(gfn << 12, b"x")
    drive(vm.notifier.invalidate_range_start(hva + 0x1800, hva + 0x2001))
    assert {m.gfn for m in vm.mappings()} == {3}
    drive(vm.notifier.invalidate_range_end(hva + 0x1800, hva + 0x2001))
    assert vm.mmu_invalidate_seq == 1


def test_pre_fault_memory(vm, host, slot0):
    vcpu = vm.create_vcpu(0)
    assert vcpu.pre_fault_memory(0, 0x3000) == (0x3000, 0)
    assert all(not m.young for m in vm.mappings())            # not marked accessed
    assert vm.lookup(0).pfn == host.zero_pfn                   # COW not broken
    assert vcpu.pre_fault_memory(4 * MiB - 4096, 0x2000) == (4 * MiB, 4096)
    with pytest.raises(KvmError) as e:
        vcpu.pre_fault_memory(64 * MiB, 4096)
    assert e.value.errno == errno.ENOENT
    for args in ((1, 4096), (0, 4095), (0, 0), (0, 4096, 1)):
        with pytest.raises(KvmError) as e:
            vcpu.pre_fault_memory(*args)
        assert e.value.errno == errno.EINVAL


def test_fast_path_sees_the_memslot(host):
    """kvm_mmu_do_page_fault sets fault->slot before fast_page_fault runs."""
    from kvmcore import VM, hookimpl
    from kvmcore.testing import FlatBackend

    seen = []

    class Spy(FlatBackend):
        @hookimpl
        def fast_page_fault(self, vm, fault):
            seen.append(fault.slot)
            return super().fast_page_fault(vm, fault)

    vm = VM(arch=Spy, host=host)
    vm.set_user_memory_region(0, 0, MiB, host.mmap(MiB))
    vm.create_vcpu(0).read(0x1000, 1)
    assert seen == [vm.gfn_to_memslot(1)]


def test_a_plain_fault_waits_at_pf_lock_wait_only_while_the_lock_is_held(vm, host, slot0):
    """A plain fault passes its points without pausing (locks.RwLock.try_lock), but when a
    paused flow holds mmu_lock it stops at pf_lock_wait as before: WouldBlock, the fault
    paused there, and it completes once the holder has moved."""
    from kvmcore.fault import PF_LOCK_WAIT

    vcpu = vm.create_vcpu(0)

    def holder():
        yield from vm.mmu_lock.write_lock("test_lock_wait")
        try:
            yield "test_holding"
        finally:
            vm.mmu_lock.write_unlock()

    h = Flow("holder", holder())
    assert next(h) == "test_lock_wait" and next(h) == "test_holding"
    with pytest.raises(WouldBlock) as info:
        vcpu.read(0x1000, 1)
    fault = info.value.flow
    assert fault.point == PF_LOCK_WAIT and not fault.runnable and "srcu" in fault.holds
    h.run()
    assert fault.run() == b"\0" and vm.lookup(0x1000) is not None
    assert vcpu.read(0x2000, 1) == b"\0" and not vm.mmu_lock.held
