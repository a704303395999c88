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


RING_RESET_ON_A_BLOCK = """
name = "ring_reset_on_a_block"
[vm]
dirty_ring = 65536
[[slot]]
pages = 1024
kind = "hugetlb_2m"
log_dirty = true
populate = true
[[access]]
op = "read"
page = 0
[[flow]]
op = "write"
page = 1
[[flow]]
op = "reset_dirty_rings"
[[flow]]
op = "write"
page = 1
vcpu = 1
"""


def test_swarm_finds_the_lost_write_protection_of_a_huge_leaf():
    """Found by kvmcore swarm (seed 41, no mutant): with a dirty ring alone (no bitmap, so
    memslot logging is off), a read maps the 2 MiB hugetlb block writable and reports its
    first gfn to the ring; the harvest and KVM_RESET_DIRTY_RINGS re-protect that gfn, but
    6.18's kvm_riscv_gstage_wp_range leaves alone a leaf its 4K range does not cover whole,
    so a write to the block after the reset is never reported. a216e24fc947 (VM option
    wp_whole_leaves) protects the whole leaf: every interleaving is clean."""
    from kvmcore.explore import explore, parse

    scn = parse(RING_RESET_ON_A_BLOCK)
    bug = explore(scn, "kvmcore_riscv_gstage:RiscvGstageBackend")
    assert bug.failures[0].kind == "dirty-log" and bug.failures[0].id == "A1.B4.C1"
    fixed = explore(scn, "kvmcore_riscv_gstage:RiscvGstageBackend",
                    options={"wp_whole_leaves": True})
    assert fixed.exhausted and not fixed.failures
