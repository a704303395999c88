"""The x86 backend's own race points (docs/races.md): the fault's compare-and-exchanges under
the read lock (x86_pf_link_cmpxchg, x86_pf_leaf_cmpxchg), a zap that drops the write lock
between regions (tdp_zap_yield), dirty logging's steps and the yields inside them
(x86_dlog_lock_wait, x86_dlog_yield, x86_split_alloc), and TDX's private removal steps
(tdx_block, tdx_track_kick, tdx_page_remove), each paused while another flow runs."""

from __future__ import annotations

import contextlib
from unittest.mock import patch

import pytest
from kvmcore import InvariantError
from kvmcore.exits import MemoryFaultExit
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import PAGE, SZ_2M, G
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp import tdx as T


def step_to(flow, point):
    """Step ``flow`` until it stops at ``point``; the points passed on the way."""
    seen = []
    while True:
        p = next(flow)
        seen.append(p)
        if p == point:
            return seen


def tlb_gfns(vcpu):
    return {gfn for gfn, _private in vcpu.tlb}


def test_a_stepped_first_touch_stops_before_each_exchange(make):
    """A fault in an empty tree links three tables (4-level root) and then the leaf, each by
    an exchange it pauses before; a plain call runs the same path without pausing."""
    g = make()
    g.slot(0, 0, SZ_2M)
    fault = g.vcpu.steps.read(5 * PAGE, 4)
    assert list(fault) == ["pf_seq_snapshot", "pf_lock_wait", "x86_pf_link_cmpxchg",
                           "x86_pf_link_cmpxchg", "x86_pf_link_cmpxchg", "x86_pf_leaf_cmpxchg"]
    assert fault.result == bytes(4)
    assert list(g.vcpu.steps.read(6 * PAGE, 4)) == ["pf_seq_snapshot", "pf_lock_wait",
                                                      "x86_pf_leaf_cmpxchg"]
    assert g.vcpu.read(7 * PAGE, 4) == bytes(4)


def test_two_vcpus_race_on_one_gfn_at_the_leaf_cmpxchg(make):
    """Two vCPUs fault on one gfn and both reach the leaf's exchange holding mmu_lock for read.
    The first installs; the second's exchange sees the first's SPTE instead of the
    non-present one it read, fails (tdp_mmu_set_spte_atomic: -EBUSY -> RET_PF_RETRY), and the
    vCPU's retry finds the translation. Both read the page's data; one leaf maps it."""
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.host.write(hva + 5 * PAGE, b"data")
    g.vcpu.read(0, 1)                                    # the tables exist
    v1 = g.vm.create_vcpu(1)
    a = g.vcpu.steps.read(5 * PAGE, 4)
    b = v1.steps.read(5 * PAGE, 4)
    assert step_to(a, "x86_pf_leaf_cmpxchg")[-2:] == ["pf_lock_wait", "x86_pf_leaf_cmpxchg"]
    step_to(b, "x86_pf_leaf_cmpxchg")
    assert "mmu_lock(read)" in a.holds and "mmu_lock(read)" in b.holds
    retries = g.vm.stats["fault_retry"]
    assert a.run() == b"data"
    leaf = g.leaf(5 * PAGE)
    assert b.run() == b"data"
    assert g.vm.stats["x86_tdp.pf_cmpxchg_failed"] == 1
    assert g.vm.stats["fault_retry"] == retries + 1
    assert g.leaf(5 * PAGE) == leaf and g.vm.stats["x86_tdp.leaf_count"] == 2
    assert 5 in tlb_gfns(v1)
    g.check()


def test_two_vcpus_race_to_link_one_table(make):
    """Two faults on different gfns of one empty region both want to link the same new page
    table. The second's exchange fails: its table is never linked (nothing leaks), it retries
    and installs its leaf below the first one's table."""
    g = make()
    g.slot(0, 0, SZ_2M)
    v1 = g.vm.create_vcpu(1)
    a = g.vcpu.steps.write(5 * PAGE, b"a")
    b = v1.steps.write(7 * PAGE, b"b")
    step_to(a, "x86_pf_link_cmpxchg")
    step_to(b, "x86_pf_link_cmpxchg")
    tables = len(g.b.tdp.store)
    a.run()
    assert len(g.b.tdp.store) == tables + 3
    b.run()
    assert len(g.b.tdp.store) == tables + 3
    assert g.vm.stats["x86_tdp.pf_cmpxchg_failed"] == 1
    assert g.vcpu.read(7 * PAGE, 1) == b"b" and v1.read(5 * PAGE, 1) == b"a"
    g.check()


def test_a_fault_paused_in_a_table_removed_under_the_read_lock_retries(make):
    """A page table taken out while a fault is paused before its exchange in it (as
    kvm_tdp_mmu_zap_invalidated_roots does under the read lock) is left all FROZEN by
    handle_removed_pt: the fault's exchange fails instead of writing into a freed page, and
    its retry maps the page through a new table."""
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.host.write(hva + 5 * PAGE, b"data")
    g.vcpu.read(0, 1)
    fault = g.vcpu.steps.read(5 * PAGE, 4)
    step_to(fault, "x86_pf_leaf_cmpxchg")
    root = g.b.direct_roots[0]
    _pos, l2_pa, l2_idx = root.pt.path(5 * PAGE)[2]
    l1_pa = g.b.tdp.store[l2_pa][l2_idx] & S.SPTE_BASE_ADDR_MASK
    l1 = g.b.tdp.store[l1_pa]
    g.b.tdp.set_spte(g.vm, root, g.b.tdp.store[l2_pa], l2_idx, 0, 2,
                     S.SHADOW_NONPRESENT_VALUE)
    g.vm.flush_remote_tlbs()
    assert l1_pa not in g.b.tdp.store and set(l1) == {S.FROZEN_SPTE}
    assert fault.run() == b"data"
    assert g.vm.stats["x86_tdp.pf_cmpxchg_failed"] == 1
    assert set(l1) == {S.FROZEN_SPTE}
    assert g.leaf(5 * PAGE) is not None and g.leaf(0) is None
    g.check()


def test_munmap_waits_for_a_fault_paused_at_its_leaf_cmpxchg(make):
    """A fault paused before its exchange holds mmu_lock for read: the munmap's notifier needs
    it for write, so it cannot zap until the fault has installed; it then zaps the new leaf
    and flushes it from the vCPU's TLB."""
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.host.write(hva + 5 * PAGE, b"data")
    g.vcpu.read(0, 1)
    fault = g.vcpu.steps.read(5 * PAGE, 4)
    step_to(fault, "x86_pf_leaf_cmpxchg")
    unmap = g.host.steps.munmap(hva + 5 * PAGE, PAGE)
    assert next(unmap) == "mn_start_lock_wait"
    assert not unmap.runnable and unmap.waits_for == "mmu_lock(write)"
    assert g.vm.mmu_invalidate_in_progress == 0       # begun only under the lock
    assert fault.run() == b"data"
    assert 5 in tlb_gfns(g.vcpu) and g.leaf(5 * PAGE) is not None
    assert unmap.runnable
    unmap.run()
    assert g.leaf(5 * PAGE) is None and 5 not in tlb_gfns(g.vcpu)
    g.check()


def test_a_zap_paused_at_tdp_zap_yield_lets_a_fault_in(make):
    """A notifier zap over two 2 MiB regions drops mmu_lock after the first one
    (tdp_mmu_iter_cond_resched), having flushed what it zapped. A fault outside the
    invalidated range takes the lock and installs meanwhile; one inside it sees the
    invalidation before it looks its pfn up (mmu_invalidate_retry_gfn_unsafe) and waits for
    it to end; the zap then takes the lock again for the second region."""
    g = make()
    hva = g.slot(0, 0, 2 * SZ_2M)
    g.slot(1, 4 * SZ_2M, SZ_2M)
    g.vcpu.write(PAGE, b"1")
    g.vcpu.write(SZ_2M + PAGE, b"2")
    zap = g.host.steps.madvise_dontneed(hva, 2 * SZ_2M)
    assert step_to(zap, "tdp_zap_yield") == ["mn_start_lock_wait", "tdp_zap_yield"]
    assert not any(h.startswith("mmu_lock") for h in zap.holds)
    assert g.leaf(PAGE) is None and g.leaf(SZ_2M + PAGE) is not None
    assert not tlb_gfns(g.vcpu)                          # flushed before yielding
    g.check()                                            # no stale TLB entry behind
    v1 = g.vm.create_vcpu(1)
    assert v1.read(4 * SZ_2M, 1) == bytes(1)            # another slot: installs
    inside = v1.steps.read(PAGE, 1)
    assert step_to(inside, "pf_retry_wait") == ["pf_seq_snapshot", "pf_retry_wait"]
    assert g.vm.stats["fault_retry_unsafe"] == 1
    assert not inside.runnable
    assert zap.runnable
    zap.run()
    assert g.leaf(SZ_2M + PAGE) is None
    assert inside.run() == bytes(1)                     # DONTNEED: a new zero page
    assert g.vcpu.read(SZ_2M + PAGE, 1) == bytes(1)
    g.check()


def test_only_a_zap_that_may_block_yields(make):
    """A zap whose range may not block (an MMU notifier that is not blockable) runs to its
    end under the lock and leaves the flush to its caller; one that may block flushes the
    first region before it drops the lock, and owes the flush of the second."""
    from kvmcore.defaults import whole_slot
    from kvmcore.locks import drive
    import attrs

    g = make()
    g.slot(0, 0, 2 * SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.write(PAGE, b"1")
    g.vcpu.write(SZ_2M + PAGE, b"2")
    slot = g.vm.gfn_to_memslot(0)
    rng = attrs.evolve(whole_slot(slot), may_block=False)
    flushes = g.vm.stats["tlb_flush"]
    with g.vm.mmu_lock:
        assert g.b.unmap_gfn_range(vm=g.vm, range=rng) is True
    assert g.vm.stats["tlb_flush"] == flushes
    g.vm.flush_remote_tlbs()
    g.vcpu.write(PAGE, b"1")
    g.vcpu.write(SZ_2M + PAGE, b"2")
    flushes = g.vm.stats["tlb_flush"]
    with g.vm.mmu_lock:
        flow = g.b.unmap_gfn_range(vm=g.vm, range=whole_slot(slot))
        assert next(flow) == "tdp_zap_yield" and not g.vm.mmu_lock.held
        assert g.vm.stats["tlb_flush"] == flushes + 1 and not tlb_gfns(g.vcpu) & {1}
        assert drive(flow) is True
    g.vm.flush_remote_tlbs()
    assert not list(g.vm.mappings())
    g.check()


def test_a_zap_restarts_from_the_root_after_it_yields(make):
    """tdp_mmu_zap_leafs restarts its walk from the root after tdp_mmu_iter_cond_resched: if
    the huge leaf it was about to zap was replaced by a page table while the lock was
    dropped, the table is walked, not zapped, and leaves outside the range stay."""
    from kvmcore.locks import WRITE, Flow

    g = make()
    raw = g.host.mmap(3 * SZ_2M, thp=True)
    hva = (raw + SZ_2M - 1) & ~(SZ_2M - 1)
    g.slot(0, 0, 2 * SZ_2M, hva=hva)
    g.vcpu.read(0, 1)
    g.vcpu.read(SZ_2M, 1)
    assert [m.size for m in g.vm.mappings()] == [SZ_2M, SZ_2M]
    tdp, root = g.b.tdp, g.b.direct_roots[0]

    def zap():
        yield from g.vm.mmu_lock.write_lock("zap_lock_wait")
        try:
            return (yield from tdp.tdp_mmu_zap_leafs(g.vm, root, 0, 600, True, False))
        finally:
            g.vm.mmu_lock.write_unlock()

    flow = Flow("zap", zap())
    assert [next(flow), next(flow)] == ["zap_lock_wait", "tdp_zap_yield"]
    # Lock dropped: the 2M leaf at gfn 512 goes, and a fault outside the zap's range links
    # a 4K table where it was.
    with g.vm.mmu_lock(WRITE):
        table, idx, level, _ = tdp.get_last_spte(root, 512)
        tdp.set_spte(g.vm, root, table, idx, 512, level, S.SHADOW_NONPRESENT_VALUE)
    g.vm.flush_remote_tlbs()
    g.host.split_huge_page(hva + SZ_2M)
    g.vcpu.read(800 << 12, 1)
    assert [(m.gfn, m.size) for m in g.vm.mappings()] == [(800, PAGE)]
    flow.run()
    assert [(m.gfn, m.size) for m in g.vm.mappings()] == [(800, PAGE)]
    assert not tdp.bugs
    g.check()


def test_zap_all_fast_zaps_the_old_roots_after_dropping_the_write_lock(make):
    """kvm_mmu_zap_all_fast (a DEFAULT_VM's memslot DELETE): the roots are invalidated and
    the vCPUs sent to new ones under the write lock; the old roots are zapped afterwards under
    the read lock (kvm_tdp_mmu_zap_invalidated_roots), so in between an invalid root still
    holds its leaves while a fault installs through the new root."""
    from kvmcore_x86_tdp.tdp_mmu import X86_ZAP_INVALIDATED_LOCK_WAIT

    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.slot(1, 4 * SZ_2M, SZ_2M)
    g.vcpu.write(PAGE, b"1")
    g.vcpu.write(4 * SZ_2M, b"2")
    delete = g.vm.steps.set_user_memory_region(0, 0, 0, hva)
    assert step_to(delete, X86_ZAP_INVALIDATED_LOCK_WAIT)[-2:] == [
        "slot_flush_lock_wait", X86_ZAP_INVALIDATED_LOCK_WAIT]
    assert not any(h.startswith("mmu_lock") for h in delete.holds)
    old = [r for r in g.b.tdp.roots if r.invalid]
    assert old and any(True for _ in old[0].pt.iter_present(0, 1 << 52, leaves_only=True))
    assert not tlb_gfns(g.vcpu)
    assert g.vcpu.read(4 * SZ_2M, 1) == b"2"             # through the new root
    assert g.leaf(4 * SZ_2M) is not None
    delete.run()
    assert not [r for r in g.b.tdp.roots if r.invalid]
    assert g.vm.stats["x86_tdp.zap_all_fast"] == 1
    g.check()


@pytest.mark.parametrize("fixed", [True, False])
def test_a_fault_in_flight_on_an_obsoleted_root_retries_on_the_new_one(fixed):
    """A fault that entered on the root kvm_mmu_zap_all_fast then invalidates finds it
    obsolete in is_page_fault_stale and retries; the vCPU loads the new root as it enters
    again and puts the old one, which is freed, its tables zapped. Without that test
    (before a955cad84cda) the fault installs into the old root after
    kvm_tdp_mmu_zap_invalidated_roots zapped it, and the tables it linked leak."""
    from kvmcore.explore import MUTANTS
    from kvmcore_x86_tdp.tdp_mmu import X86_ZAP_INVALIDATED_LOCK_WAIT

    g = G("default")                     # not ``make``: its final check would see the leak
    hva = g.slot(0, 0, SZ_2M)
    g.slot(1, 4 * SZ_2M, SZ_2M)
    g.vcpu.write(PAGE, b"1")
    old = g.vcpu.arch["roots"][0]
    delete = g.vm.steps.set_user_memory_region(0, 0, 0, hva)
    step_to(delete, "slot_flush_lock_wait")          # the INVALID copy is out, SRCU synced
    fault = g.vcpu.steps.read(4 * SZ_2M + PAGE, 1)
    step_to(fault, "pf_lock_wait")
    step_to(delete, X86_ZAP_INVALIDATED_LOCK_WAIT)
    assert old.invalid and old.refs == 2              # the TDP MMU's and the vCPU's
    assert next(delete) == "slot_srcu_sync"           # zapped; waits for the fault's SRCU
    assert old.refs == 1 and old in g.b.tdp.roots
    with contextlib.nullcontext() if fixed else MUTANTS["obsolete_root_no_retry"].patch():
        fault.run()
    delete.run()
    assert old not in g.b.tdp.roots and g.vcpu.arch["roots"][0] is g.b.direct_roots[0]
    assert g.vm.stats["x86_tdp.fault_obsolete_root"] == (1 if fixed else 0)
    assert g.leaf(4 * SZ_2M + PAGE) is not None
    if fixed:
        g.check()
    else:
        with pytest.raises(InvariantError, match="3 table\\(s\\) are leaked"):
            g.check()


def test_an_mmio_fault_on_an_obsoleted_root_retries_and_caches_on_the_new_one():
    """A fault on a gfn without a memslot goes on to kvm_tdp_mmu_map with MMIO caching, so it
    passes is_page_fault_stale like any other: on a root kvm_mmu_zap_all_fast made obsolete
    meanwhile it retries, and the vCPU caches the MMIO SPTE on the new root before it exits
    (the next access then takes the fast MMIO path)."""
    from kvmcore import MmioExit

    g = G("default")
    hva = g.slot(0, 0, SZ_2M)
    g.vcpu.write(PAGE, b"1")
    mmio = 0x4000_0000
    old = g.vcpu.arch["roots"][0]
    delete = g.vm.steps.set_user_memory_region(0, 0, 0, hva)
    step_to(delete, "slot_flush_lock_wait")
    fault = g.vcpu.steps.read(mmio, 4)
    step_to(fault, "pf_lock_wait")
    step_to(delete, "slot_srcu_sync")   # kvm_mmu_zap_all_fast: the fault's root is obsolete
    assert old.invalid
    with pytest.raises(MmioExit):
        fault.run()
    assert g.vm.stats["x86_tdp.fault_obsolete_root"] == 1
    new = g.vcpu.arch["roots"][0]
    assert new is not old and not new.invalid
    spte = g.b.tdp.get_last_spte(new, mmio >> 12)[3]
    # Cached with the generation of the memslots the vCPU saw, mid-update.
    assert S.is_mmio_spte(spte) and S.get_mmio_spte_generation(spte) == \
        g.vm.memslot_generation(0) & S.MMIO_SPTE_GEN_MASK
    delete.run()
    for _ in range(2):      # a new generation: stale, cached again, then the fast path
        with pytest.raises(MmioExit):
            g.vcpu.read(mmio, 4)
    assert g.vm.stats["x86_tdp.mmio_spte_stale"] == 1
    assert g.vm.stats["x86_tdp.mmio_spte_hit"] == 1
    g.check()


def test_an_mmio_fault_is_not_stale_for_an_invalidation_since_its_snapshot():
    """is_page_fault_stale tests the invalidation sequence only for a fault with a memslot:
    an MMIO fault whose snapshot a notifier (elsewhere in the VM) made stale caches its MMIO
    SPTE anyway (the memslot generation in the SPTE, not the sequence, keeps it honest)."""
    from kvmcore import MmioExit

    g = G("default")
    hva = g.slot(0, 0, SZ_2M)
    g.vcpu.write(PAGE, b"1")
    fault = g.vcpu.steps.read(0x4000_0000, 4)
    step_to(fault, "pf_seq_snapshot")
    g.host.munmap(hva + PAGE, PAGE)
    with pytest.raises(MmioExit):
        fault.run()
    assert g.vm.stats["fault_retry_stale"] == 0
    assert S.is_mmio_spte(g.b.tdp.get_last_spte(g.b.direct_roots[0], 0x40000)[3])
    g.check()


@pytest.mark.parametrize("fixed", [True, False])
def test_a_pre_fault_after_a_memslot_update_drops_the_obsolete_root(fixed):
    """KVM_PRE_FAULT_MEMORY runs no vcpu_enter_guest: its kvm_mmu_reload drops the root
    kvm_mmu_zap_all_fast made obsolete and loads the new one (20a6cff3b283). Before that
    (``fixed`` False) every fault of the pre-fault finds its root obsolete and retries for
    ever (a livelock; Linux spins until a signal)."""
    from kvmcore.errors import FaultLivelock
    from kvmcore.explore import MUTANTS

    g = G("default")
    hva = g.slot(0, 0, SZ_2M)
    g.slot(1, 4 * SZ_2M, SZ_2M)
    g.vcpu.read(PAGE, 1)
    old = g.vcpu.arch["roots"][0]
    g.vm.set_user_memory_region(0, 0, 0, hva)             # DELETE: kvm_mmu_zap_all_fast
    assert old.invalid
    with contextlib.nullcontext() if fixed else MUTANTS["reload_keeps_obsolete_root"].patch():
        if not fixed:
            with pytest.raises(FaultLivelock):
                g.vcpu.pre_fault_memory(4 * SZ_2M, PAGE)
            return
        assert g.vcpu.pre_fault_memory(4 * SZ_2M, PAGE) == (4 * SZ_2M + PAGE, 0)
    assert g.vcpu.arch["roots"][0] is g.b.direct_roots[0] and not old.refs
    assert g.leaf(4 * SZ_2M) is not None
    g.check()


def test_a_pre_fault_whose_root_goes_obsolete_mid_page_retries_until_a_signal():
    """What 6.18 still does (a model finding, docs/races.md): kvm_tdp_map_page retries
    without reloading, so a pre-fault that began while a DEFAULT_VM memslot deletion waited
    in its first synchronize_srcu, and whose fault meets the root kvm_mmu_zap_all_fast then
    made obsolete, never completes; the deletion waits for its kvm->srcu. It takes two
    preemptions (the deletion's, then the fault's before its lock); on a VM type that zaps
    only the slot the scenario is clean."""
    from kvmcore.explore import explore, load, replay

    scn = load("pre_fault_vs_other_slot_delete")
    r = explore(scn, "x86_tdp")
    assert r.failures[0].kind == "livelock" and r.failures[0].id == "B2.A2.B2.A127"
    assert "pre_fault_memory" in r.failures[0].message
    bounded = explore(scn, "x86_tdp", preemption_bound=1)
    assert bounded.clean and bounded.exhausted
    assert explore(scn, "x86_tdp", preemption_bound=2).failures
    steps = [(t["flow"], t["point"]) for t in replay(scn, "x86_tdp", "B2.A2.B2.A3").trace
             if "point" in t]
    assert steps[:6] == [("B", "slots_lock_wait"), ("B", "slot_srcu_sync"),
                         ("A", "pf_seq_snapshot"), ("A", "pf_lock_wait"),
                         ("B", "slot_flush_lock_wait"),
                         ("B", "x86_zap_invalidated_lock_wait")]
    assert explore(scn, "x86_tdp", "sw_protected").clean


@pytest.mark.parametrize("pml", [True, False])
def test_starting_dirty_logging_drops_the_read_lock_between_steps(make, pml):
    """kvm_mmu_slot_apply_flags: eager split, then (PML) clear D and write-protect huge leaves
    or (no PML) write-protect every leaf, each step under kvm->mmu_lock for read, dropped
    between them (x86_dlog_lock_wait) and by the split to allocate (x86_split_alloc): a fault
    runs in between, on the split leaves, and the next step still finds what it installed.
    The flush comes last, with no mmu_lock."""
    from kvmcore_x86_tdp.tdp_mmu import X86_DLOG_LOCK_WAIT, X86_SPLIT_ALLOC

    g = make(pml=pml)
    hva = g.slot(0, 0, SZ_2M, thp=True)
    g.vcpu.write(PAGE, b"1")
    assert g.leaf(0).size == SZ_2M
    start = g.vm.steps.set_user_memory_region(0, 0, SZ_2M, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert step_to(start, X86_DLOG_LOCK_WAIT)[-3:] == [
        "slot_commit", X86_SPLIT_ALLOC, X86_DLOG_LOCK_WAIT]
    assert not any(h.startswith("mmu_lock") for h in start.holds)
    assert g.leaf(0).size == PAGE and g.leaf(PAGE).writable       # split, not yet protected
    g.vcpu.write(3 * PAGE, b"3")                  # a fault beside the flow, in a logged slot
    assert g.leaf(3 * PAGE).writable
    start.run()
    assert not g.leaf(PAGE).writable or pml
    assert not g.leaf(3 * PAGE).writable or pml
    assert not start.holds and not tlb_gfns(g.vcpu)
    g.check()


@pytest.mark.parametrize("pml", [True, False])
def test_starting_dirty_logging_yields_inside_a_step_between_regions(make, pml):
    """The D-bit clearing (PML) or write protection (no PML) of kvm_mmu_slot_apply_flags
    yields kvm->mmu_lock between 2 MiB regions (x86_dlog_yield, tdp_mmu_iter_cond_resched):
    the first region's leaf is done, the second's not yet. A notifier zaps that one there,
    and the walk, going on from the root at the leaf it stopped at, finds nothing left to
    change; a write then refaults it, logged. No flush at the yield: the memslot's comes at
    the end."""
    from kvmcore_x86_tdp.tdp_mmu import X86_DLOG_YIELD

    g = make(pml=pml)
    hva = g.slot(0, 0, 2 * SZ_2M)
    for gpa in (PAGE, SZ_2M + PAGE):
        g.vcpu.write(gpa, b"w")
    def flushes():
        return g.vm.stats["tlb_flush"] + g.vm.stats["tlb_flush_range"]

    before = flushes()
    start = g.vm.steps.set_user_memory_region(0, 0, 2 * SZ_2M, hva,
                                              flags=KVM_MEM_LOG_DIRTY_PAGES)
    step_to(start, X86_DLOG_YIELD)
    assert not any(h.startswith("mmu_lock") for h in start.holds)
    assert flushes() == before
    done, todo = g.leaf(PAGE), g.leaf(SZ_2M + PAGE)
    assert (not done.dirty and todo.dirty) if pml else (not done.writable and todo.writable)
    g.host.madvise_dontneed(hva + SZ_2M, SZ_2M)
    assert g.leaf(SZ_2M + PAGE) is None
    before = flushes()
    assert X86_DLOG_YIELD not in list(start)
    assert g.leaf(SZ_2M + PAGE) is None and flushes() > before
    g.vcpu.write(SZ_2M + PAGE, b"v")
    assert 512 + 1 in g.vm.get_dirty_log(0)
    g.check()


def test_eager_split_in_clear_dirty_log_drops_the_write_lock_to_allocate(make):
    """With manual protect + INITIALLY_SET, KVM_CLEAR_DIRTY_LOG splits the huge pages around
    its mask under the write lock (kvm_mmu_try_split_huge_pages), which it drops to allocate
    each table (x86_split_alloc): a notifier's zap runs there, and the split, restarting from
    the root, finds no huge leaf left to split."""
    from kvmcore_x86_tdp.tdp_mmu import X86_SPLIT_ALLOC

    g = make(pml=False)
    hva = g.slot(0, 0, SZ_2M, thp=True)
    g.vcpu.write(PAGE, b"h")
    g.vm.enable_dirty_log_manual_protect(initially_set=True)
    g.vm.set_user_memory_region(0, 0, SZ_2M, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert g.leaf(0).size == SZ_2M and g.leaf(0).writable
    clear = g.vm.steps.clear_dirty_log(0, 0, 64, range(64))
    assert step_to(clear, X86_SPLIT_ALLOC)[-2:] == ["dlog_lock_wait", X86_SPLIT_ALLOC]
    assert not any(h.startswith("mmu_lock") for h in clear.holds)
    g.host.madvise_dontneed(hva, SZ_2M)                # zaps the huge leaf meanwhile
    assert g.leaf(0) is None
    clear.run()
    assert g.leaf(0) is None and g.vm.stats["x86_tdp.split_huge_page"] == 0
    g.vcpu.write(PAGE, b"4")                           # refaults 4K, logged
    assert g.leaf(PAGE).size == PAGE and 1 in g.vm.get_dirty_log(0)
    g.check()


def test_fast_page_fault_exchange_fails_when_a_zap_came_first(make):
    """fast_page_fault reads the SPTE without mmu_lock and stops before its try_cmpxchg64
    (x86_fast_pf_cmpxchg); a notifier zaps the SPTE meanwhile, so the exchange fails, the walk
    finds nothing present and the slow path maps the host's new page: the fix is never
    stored over the zapped entry."""
    from kvmcore_x86_tdp.tdp_mmu import X86_FAST_PF_CMPXCHG

    g = make(pml=False)
    hva = g.slot(0, 0, SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.write(PAGE, b"old")
    old = g.leaf(PAGE).pfn
    assert g.vm.get_dirty_log(0) == [1] and not g.leaf(PAGE).writable
    write = g.vcpu.steps.write(PAGE, b"new")
    assert step_to(write, X86_FAST_PF_CMPXCHG) == [X86_FAST_PF_CMPXCHG]
    g.host.madvise_dontneed(hva + PAGE, PAGE)
    assert g.leaf(PAGE) is None
    write.run()
    m = g.leaf(PAGE)
    assert m.writable and m.pfn != old and g.vcpu.read(PAGE, 3) == b"new"
    assert g.vm.stats["x86_tdp.fast_pf_cmpxchg_failed"] == 1
    assert g.vm.stats["x86_tdp.fast_pf_fixed"] == 0
    g.check()


def test_fast_page_fault_fixes_in_place_when_nothing_raced(make):
    """Unraced, the stepped fast path restores W on the write-protected SPTE (MMU-writable
    kept by dirty logging) and logs the page, without the slow path."""
    from kvmcore_x86_tdp.tdp_mmu import X86_FAST_PF_CMPXCHG

    g = make(pml=False)
    g.slot(0, 0, SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.write(PAGE, b"old")
    old = g.leaf(PAGE).pfn
    g.vm.get_dirty_log(0)
    write = g.vcpu.steps.write(PAGE, b"new")
    assert list(write) == [X86_FAST_PF_CMPXCHG]
    assert g.leaf(PAGE).writable and g.leaf(PAGE).pfn == old
    assert g.vm.stats["x86_tdp.fast_pf_fixed"] == 1 and g.vm.get_dirty_log(0) == [1]
    g.check()


@pytest.fixture
def td(make):
    """A TD with a private page at gfn 5 written by vCPU 0 (its TLB holds it)."""
    g = make("tdx")
    g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    g.vcpu.write(5 * PAGE, b"priv")
    g.tdx = g.b.tdx
    return g


def test_tdx_private_zap_pauses_between_block_track_and_remove(td):
    """Converting a TD's private page to shared zaps its mirror SPTE under the write lock,
    then removes it from the TDX module in three steps (tdx_sept_remove_private_spte):
    - before BLOCK the S-EPT still maps the page: a vCPU that walks now still reads it;
    - after BLOCK no new translation is made (a walk faults, sees the invalidation in
      progress and retries until it ends), but a vCPU's TLB still serves it until TRACK and
      the kick;
    - after the kick every vCPU's TLB has lost it, before PAGE.REMOVE frees it.
    The model's invariants hold at every pause."""
    g, tdx = td, td.tdx
    v1, v2 = g.vm.create_vcpu(1), g.vm.create_vcpu(2)
    conv = g.vm.steps.set_memory_attributes(5 * PAGE, PAGE, 0)
    assert step_to(conv, "tdx_block") == ["attr_slots_lock_wait", "attr_pre_lock_wait",
                                          "tdx_block"]
    assert conv.holds == ["slots_lock", "mmu_lock(write)"]
    assert g.leaf(5 * PAGE, private=True) is None and tdx.sept[5] is not None
    g.check()
    assert g.vcpu.read(5 * PAGE, 4) == b"priv"           # its TLB
    assert v1.read(5 * PAGE, 4) == b"priv"               # a walk of the S-EPT

    assert next(conv) == "tdx_track_kick"
    assert 5 in tdx.blocked
    g.check()
    assert g.vcpu.read(5 * PAGE, 4) == b"priv" and v1.read(5 * PAGE, 4) == b"priv"
    walker = v2.steps.read(5 * PAGE, 4)
    step_to(walker, "pf_retry_wait")
    assert not walker.runnable

    assert next(conv) == "tdx_page_remove"
    assert not tlb_gfns(g.vcpu) & {5} and not tlb_gfns(v1) & {5}
    assert tdx.sept[5] is not None                       # not removed yet
    g.check()
    stuck = g.vcpu.steps.read(5 * PAGE, 4)
    step_to(stuck, "pf_retry_wait")
    assert not stuck.runnable

    conv.run()
    ops = [r.op for r in tdx.records if r.gfn == 5]
    assert ops[-5:] == list(T.REMOVAL_ORDER)
    assert 5 not in tdx.sept and not tdx.removing
    for flow in (walker, stuck):                         # private accesses of a shared gfn
        with pytest.raises(MemoryFaultExit):
            flow.run()
    g.check()


@pytest.mark.parametrize("fixed", [True, False])
def test_a_td_private_fault_retries_holding_srcu_but_not_on_an_invalid_slot(fixed):
    """tdx_handle_ept_violation retries a private fault inside the handler, kvm->srcu held
    (local_retry): a fault that meets a hole punch's invalidation waits there, and a memslot
    deletion's synchronize_srcu waits for it. When the punch ends the slot is INVALID: the
    handler stops retrying locally (2bc2694fe20b, 6.18) and re-enters the guest, leaving
    kvm->srcu, and the deletion goes on; before that fix (``fixed`` False) each waits for
    the other."""
    from kvmcore.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    g = G("tdx")
    gmem = g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    punch = gmem.steps.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 5 * PAGE, PAGE)
    step_to(punch, "gmem_begin_done")
    read = g.vm.create_vcpu(1).steps.read(5 * PAGE, 4)
    assert step_to(read, "pf_retry_wait") == ["pf_seq_snapshot", "pf_retry_wait"]
    assert read.holds == ["srcu"] and not read.runnable
    delete = g.vm.steps.set_user_memory_region(0, 0, 0, 0)
    assert step_to(delete, "slot_srcu_sync")[-1] == "slot_srcu_sync"
    assert not delete.runnable and delete.waits_for == "srcu grace period"
    with contextlib.ExitStack() as stack:
        if not fixed:
            stack.enter_context(patch.object(T.Tdx, "local_retry",
                                             staticmethod(lambda vm, fault: fault.is_private)))
        punch.run()
        if not fixed:
            assert not read.runnable and not delete.runnable     # a deadlock
            return
        # It faults once more, meets the INVALID slot and leaves the handler.
        assert step_to(read, "pf_retry_wait") == ["pf_seq_snapshot", "pf_retry_wait"]
        assert read.holds == [] and delete.runnable
        delete.run()
        with pytest.raises(MemoryFaultExit):
            read.run()                        # no memslot now: the private access exits
    g.check()


def test_the_explorer_finds_the_local_retry_deadlock_without_2bc2694fe20b():
    """The race above as the built-in scenario: three flows, searched whole within two
    preemptions (its declared bound), by priorities, and without a bound; the deadlock
    needs one preemption."""
    from kvmcore.explore import explore, load

    scn = load("tdx_private_read_vs_punch_and_delete")
    assert scn.preemption_bound == 2
    clean = explore(scn, "x86_tdp")
    assert clean.clean and clean.exhausted and clean.schedules == 1208
    assert explore(scn, "x86_tdp", strategy="pct", max_schedules=300).clean
    for kw in ({}, {"preemption_bound": None}, {"strategy": "pct"}, {"preemption_bound": 1}):
        result = explore(scn, "x86_tdp", mutants=["tdx_local_retry_invalid_slot"],
                         max_schedules=300, **kw)
        assert result.failures[0].kind == "deadlock", kw
        assert "pf_retry_wait" in result.failures[0].message
        assert "srcu grace period" in result.failures[0].message
    assert explore(scn, "x86_tdp", mutants=["tdx_local_retry_invalid_slot"],
                   preemption_bound=0).clean


def test_tdx_removal_abandoned_midway_is_reported():
    """A removal stopped for good between BLOCK and REMOVE (its flow closed, its locks
    released) leaves the S-EPT holding a BLOCKED page KVM's mirror no longer maps: the
    invariants, which allow that only while the removing flow holds mmu_lock, report it."""
    g = G("tdx")
    g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, SZ_2M)
    g.vcpu.write(5 * PAGE, b"priv")
    conv = g.vm.steps.set_memory_attributes(5 * PAGE, PAGE, 0)
    step_to(conv, "tdx_track_kick")
    g.check()
    conv.close()
    assert not g.vm.mmu_lock.held
    with pytest.raises(InvariantError, match="S-EPT differ") as e:
        g.vm.check_invariants()
    assert "left BLOCKED" in str(e.value) and "removal stopped" in str(e.value)


FAR = 512 << 30                          # under the root's second entry (4-level: 512 GiB)


def _two_far_slots():
    """A DEFAULT_VM (KVM_X86_QUIRK_SLOT_ZAP_ALL) with a written page in slot 0 at 0 and one
    in slot 1 at 512 GiB, and the steps of slot 0's deletion."""
    g = G("default")                     # not ``make``: a mutant's final check fails
    hva = g.slot(0, 0, SZ_2M)
    far = g.slot(1, FAR, SZ_2M)
    g.vcpu.write(PAGE, b"0")
    g.vcpu.write(FAR + 5 * PAGE, b"1")
    return g, far, g.vm.steps.set_user_memory_region(0, 0, 0, hva)


@pytest.mark.parametrize("fixed", [True, False])
def test_the_zap_of_an_invalid_root_goes_on_where_it_yielded(fixed):
    """kvm_tdp_mmu_zap_invalidated_roots zaps the old root in four passes (4K, 2M, 1G, the
    root's level), each yielding kvm->mmu_lock between its two regions, and goes on from the
    entry it stopped at. Stepping past it after the restart (before 3a0f64de479c) skips the
    root-level entry of the far slot: the zapped root still links its tables."""
    from kvmcore.explore import MUTANTS
    from kvmcore_x86_tdp.tdp_mmu import TDP_ZAP_YIELD

    g, _far, delete = _two_far_slots()
    old = g.vcpu.arch["roots"][0]
    with contextlib.nullcontext() if fixed else MUTANTS["zap_root_restart_advances"].patch():
        points = list(delete)
    assert points.count(TDP_ZAP_YIELD) == 4
    assert old.zapped and old in g.b.tdp.roots             # the vCPU still holds it
    assert g.vcpu.read(FAR + 5 * PAGE, 1) == b"1"          # reloads: the old root is put
    assert old not in g.b.tdp.roots
    if fixed:
        g.check()
    else:
        with pytest.raises(InvariantError, match="table\\(s\\) are leaked"):
            g.check()


@pytest.mark.parametrize("fixed", [True, False])
def test_a_notifier_zaps_the_invalid_roots_while_their_zap_yields(fixed):
    """An munmap that runs while kvm_tdp_mmu_zap_invalidated_roots has yielded the lock, the
    far slot's leaf not zapped yet in the old root: kvm_tdp_mmu_unmap_gfn_range walks the
    invalid roots too (d62007edf01f), so when the notifier returns no page table KVM holds
    maps the page the host frees. Walking the valid roots only leaves it in the old root."""
    from kvmcore.explore import MUTANTS
    from kvmcore_x86_tdp.tdp_mmu import TDP_ZAP_YIELD

    g, far, delete = _two_far_slots()
    step_to(delete, TDP_ZAP_YIELD)                 # slot 0's leaf zapped, the far one not
    stale = [m.gfn for m in g.vm.hook.stale_leaves(vm=g.vm)]
    assert stale == [(FAR >> 12) + 5]
    with contextlib.nullcontext() if fixed else MUTANTS["unmap_valid_roots_only"].patch():
        g.host.munmap(far + 5 * PAGE, PAGE)
    stale = [m.gfn for m in g.vm.hook.stale_leaves(vm=g.vm)]
    assert stale == ([] if fixed else [(FAR >> 12) + 5])
    delete.run()
    assert list(g.vm.hook.stale_leaves(vm=g.vm)) == []
    g.check()
