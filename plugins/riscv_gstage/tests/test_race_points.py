"""riscv_unmap_resched: kvm_riscv_gstage_unmap_range drops kvm->mmu_lock (a spinlock in
6.18: cond_resched_lock) between two leaves of a may_block unmap; a fault let in there
retries until the invalidation ends."""

from __future__ import annotations

from kvmcore_riscv_gstage.backend import RISCV_UNMAP_RESCHED

from conftest import GPA


def _two_leaves(vm, host):
    """A slot of 4 pages, the first and third mapped: the hva and the vCPU."""
    hva = host.mmap(4 * 4096)
    vm.set_user_memory_region(0, GPA, 4 * 4096, hva)
    a = vm.create_vcpu(0)
    a.write(GPA, b"a")
    a.write(GPA + 0x2000, b"b")
    return hva, a


def test_a_may_block_unmap_drops_the_lock_between_leaves(vm, host):
    hva, a = _two_leaves(vm, host)
    zap = host.steps.madvise_dontneed(hva, 4 * 4096)
    while next(zap) != RISCV_UNMAP_RESCHED:
        pass
    assert "mmu_lock" not in " ".join(zap.holds) and vm.mmu_invalidate_in_progress == 1
    assert vm.lookup(GPA) is None and vm.lookup(GPA + 0x2000) is not None
    vm.check_invariants()
    fault = a.steps.read(GPA, 1)
    points = []
    while (p := next(fault)) != "pf_retry_wait":
        points.append(p)
    assert "pf_lock_wait" in points and not fault.runnable
    zap.run()
    assert vm.lookup(GPA + 0x2000) is None
    assert fault.run() == b"\x00"
    assert vm.stats["riscv_unmap_resched"] == 1


def test_an_unmap_run_to_its_end_has_no_point(vm, host):
    hva, _a = _two_leaves(vm, host)
    host.madvise_dontneed(hva, 4 * 4096)
    assert list(vm.mappings()) == [] and vm.stats["riscv_unmap_resched"] == 0


def test_failed_move_waits_to_restore_the_old_slot(vm, host):
    """kvm_set_memslot: a MOVE whose kvm_arch_prepare_memory_region fails (-EPERM: the VMA
    became read-only) puts the old slot back with kvm_activate_memslot, which waits, as
    every swap does, for the notifier invalidations in progress to end: it pauses at
    ``slot_swap_wait_mn`` while an mprotect sits between its start and end (it crashed
    there with WouldBlock), then fails once that has ended."""
    import errno

    import pytest
    from kvmcore import KvmError

    hva = host.mmap(4 * 4096)
    host.write(hva, b"x")
    vm.set_user_memory_region(0, GPA, 4 * 4096, hva)
    move = vm.steps.set_user_memory_region(0, GPA + (1 << 24), 4 * 4096, hva)
    while move.point != "slot_srcu_sync":
        next(move)
    protect = host.steps.mprotect(hva, 4096, "r")
    while protect.point != "mn_end_lock_wait":
        next(protect)
    while move.runnable:
        next(move)
    assert move.point == "slot_swap_wait_mn"
    assert not vm.memslots()                           # the INVALID copy is published
    protect.run()
    with pytest.raises(KvmError) as e:
        move.run()
    assert e.value.errno == errno.EPERM
    assert vm.memslots()[0].base_gfn == GPA >> 12 and not vm.memslots()[0].flags
