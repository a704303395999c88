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
