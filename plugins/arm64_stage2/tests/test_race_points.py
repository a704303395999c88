"""The arm64 stage-2 race points, stepped with the flows' ``steps`` API.

* The fault's install under the read MMU lock (arch/arm64/kvm/hyp/pgtable.c): the
  break-before-make of stage2_map_walker_try_leaf / stage2_map_walk_leaf, with
  ``arm64_pte_break`` (the old entry read, before the cmpxchg to LOCKED) and
  ``arm64_pte_make`` (the entry LOCKED, before the new one is stored), and relax_perms'
  ``arm64_relax_cmpxchg``. A walker that meets a LOCKED entry gets -EAGAIN; the vCPU then
  waits at ``arm64_pte_locked_wait`` until the make instead of re-faulting for ever.
* stage2_apply_range's cond_resched_rwlock_write between two chunks of a may_block unmap
  (``s2_unmap_resched``).
* The 2020 thread (Yanan Wang's RFC, commits 694d071f8d85, 509552e65ae8, 7d894834a305):
  vCPU A writes and vCPU B reads one gfn of a dirty-logged slot (where a read fault maps
  read-only). Upstream, the map walker never changes permissions only, so B's read never
  downgrades A's writable leaf, and A's write that finds B's read-only leaf comes back as a
  permission fault relax_perms resolves in place. With the mutant ``arm64_relax_perms_only``
  (user_mem_abort's choice before 7d894834a305) that permission fault goes to the map walker,
  which leaves it alone: A livelocks, and the explorer finds the interleaving.
"""

from __future__ import annotations

import errno

import pytest
from kvmcore.errors import FaultLivelock, KvmError
from kvmcore.explore import MUTANTS, explore, load, parse
from kvmcore.fault import PF_LOCK_WAIT, PF_SEQ_SNAPSHOT
from kvmcore.locks import WouldBlock
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import GPA, backend_of
from kvmcore_arm64_stage2.backend import S2_UNMAP_RESCHED
from kvmcore_arm64_stage2.mmu import ARM64_PTE_LOCKED_WAIT
from kvmcore_arm64_stage2.pgtable import (ARM64_PTE_BREAK, ARM64_PTE_MAKE, BBM_BLOCK_TO_TABLE,
                                          ARM64_RELAX_CMPXCHG, KVM_INVALID_PTE_LOCKED,
                                          KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)

SIZE = 64 * 4096
TARGET = GPA + 5 * 4096


def _setup(make_vm, granule=4096, flags=0, **options):
    vm = make_vm(granule=granule, **options)
    host = vm.host
    hva = host.mmap(SIZE)
    host.write(hva, bytes(SIZE))          # host pages exist and are writable
    vm.set_user_memory_region(0, GPA, SIZE, hva, flags)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    backend = backend_of(vm)
    backend.tlbi_log.clear()
    backend.pgt.events.clear()
    return vm, a, b, backend


def _advance_to(flow, point):
    """Step ``flow`` until it stops at ``point``; the points passed on the way."""
    seen = []
    while True:
        p = next(flow)
        seen.append(p)
        if p == point:
            return seen


def _entry(backend, gpa):
    _pos, table, idx, pte = backend.pgt.pt.lookup(gpa)
    return table, idx, pte


def _bbm_on_valid_leaf(backend):
    return [e for e in backend.pgt.events if e.kind == "break" and e.old & 1]


# --------------------------------------------------------------------------- break / make


def test_a_first_fault_breaks_and_makes_every_entry_it_installs(make_vm):
    """A fault on an empty stage-2 installs the tables and the leaf of its walk, each with a
    break (cmpxchg of the empty entry to LOCKED) and a make, all under the read lock."""
    vm, a, _b, backend = _setup(make_vm)
    fault = a.steps.write(TARGET, b"\xaa")
    points = []
    for p in fault:
        points.append(p)
        if p in (ARM64_PTE_BREAK, ARM64_PTE_MAKE):
            assert "mmu_lock(read)" in fault.holds
    levels = backend.geom.levels - 1       # the tables below the root, then the leaf
    assert points[:2] == [PF_SEQ_SNAPSHOT, PF_LOCK_WAIT]
    assert points[2:] == [ARM64_PTE_BREAK, ARM64_PTE_MAKE] * (levels + 1) or \
        points[2:] == [ARM64_PTE_BREAK, ARM64_PTE_MAKE] * levels
    assert vm.lookup(TARGET).writable
    assert backend.pgt.bbm_windows == {}


def test_the_entry_is_locked_at_the_make_and_a_racing_walker_backs_off(make_vm):
    """Two vCPUs fault on one empty gfn. Both read the empty entry (``arm64_pte_break``);
    A's cmpxchg wins and the entry is LOCKED while A is at ``arm64_pte_make``; B's cmpxchg
    fails (-EAGAIN, the guest re-enters), B's next fault meets the LOCKED entry in its walk
    (-EAGAIN again) and its vCPU then waits for A's make; afterwards B reads A's page."""
    vm, a, b, backend = _setup(make_vm)
    fa = a.steps.write(TARGET, b"\xaa" * 8)
    fb = b.steps.read(TARGET, 8)
    _advance_to(fa, PF_LOCK_WAIT)
    _advance_to(fb, PF_LOCK_WAIT)
    # Walk down to the leaf: both install nothing above it (one vCPU made the tables first).
    while next(fa) != ARM64_PTE_BREAK or _entry(backend, TARGET)[2] != 0 \
            or backend.pgt.pt.lookup(TARGET)[0] != backend.geom.levels - 1:
        pass
    table, idx, _ = _entry(backend, TARGET)
    assert next(fb) == ARM64_PTE_BREAK and table[idx] == 0       # B read the empty leaf too
    assert next(fa) == ARM64_PTE_MAKE
    assert table[idx] == KVM_INVALID_PTE_LOCKED
    assert backend.pgt.bbm_windows == {(backend.pgt.pt.path(TARGET)[-1][1], idx): 0}
    vm.check_invariants()                      # LOCKED inside A's window is no violation
    # B: cmpxchg fails, its vCPU re-enters and faults on the LOCKED entry, its walk backs off.
    points = _advance_to(fb, ARM64_PTE_LOCKED_WAIT)
    assert ARM64_PTE_BREAK not in points and ARM64_PTE_MAKE not in points
    assert not fb.runnable
    assert fb.waits_for == "another walker's break-before-make to end (stage2_make_pte)"
    assert fb.holds == ["srcu"]
    assert vm.stats["arm64_fault_eagain"] == 2
    assert table[idx] == KVM_INVALID_PTE_LOCKED, "B never overwrote the LOCKED entry"
    assert fa.run() is None
    assert fb.runnable
    assert fb.run() == b"\xaa" * 8
    assert [e.kind for e in backend.pgt.events if e.ipa == TARGET] == ["break", "make"]
    assert vm.stats["arm64_locked_refault_wait"] == 1


def test_a_plain_access_that_meets_a_locked_entry_would_block(make_vm):
    """A plain call cannot wait for a paused flow: vCPU B's read while A holds the entry
    LOCKED raises WouldBlock with B's flow paused at ``arm64_pte_locked_wait``; once A has
    made the entry, B's flow finishes."""
    vm, a, b, backend = _setup(make_vm)
    b.read(TARGET + 4096, 1)                  # the tables exist: A installs only the leaf
    fa = a.steps.write(TARGET, b"\x5a")
    assert _advance_to(fa, ARM64_PTE_MAKE)[-2:] == [ARM64_PTE_BREAK, ARM64_PTE_MAKE]
    with pytest.raises(WouldBlock) as e:
        b.read(TARGET, 1)
    assert e.value.flow.point == ARM64_PTE_LOCKED_WAIT
    fa.run()
    assert e.value.flow.run() == b"\x5a"


def test_a_write_replacing_a_valid_leaf_invalidates_before_the_make(make_vm):
    """Break-before-make on a valid leaf (kvm_pgtable_stage2_map of another PA over it, as
    a shared walk): the TLBI comes with the break, before the make point, so no vCPU keeps
    the old translation while the entry is LOCKED."""
    vm, a, b, backend = _setup(make_vm)
    assert b.read(TARGET, 1) == b"\x00"
    assert b.tlb
    pgt = backend.pgt
    table, idx, old = _entry(backend, TARGET)
    flags = 1 << 3 | 1 << 4                   # KVM_PGTABLE_WALK_SHARED | HANDLE_FAULT
    gen = pgt.map_steps(TARGET, 4096, (pgt.fmt.pte_to_phys(old)) + (1 << 30), 0b110, flags)
    assert next(gen) == ARM64_PTE_BREAK and table[idx] == old
    assert next(gen) == ARM64_PTE_MAKE and table[idx] == KVM_INVALID_PTE_LOCKED
    assert [t.why for t in backend.tlbi_log] == ["bbm"]
    assert not b.tlb, "the break's TLBI emptied the vCPU TLBs"
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == (0, None)
    assert table[idx] != old and table[idx] & 1
    pgt.unmap(TARGET, 4096)                   # that PA is no backing of the gfn


def test_a_collapse_keeps_the_old_table_until_its_make_and_blocks_the_region(make_vm, host):
    """A THP-backed slot mapped with pages while it was dirty-logged: after logging stops, a
    fault maps a 2 MiB block over the level-2 table (stage2_map_walk_table_pre). While A is
    at ``arm64_pte_make`` the table entry is LOCKED and the old table still allocated (no
    leak: it is freed after the make); a vCPU reading a page under it waits for the make,
    then reads through the block."""
    from conftest import SZ_2M

    vm = make_vm()
    size = 2 * SZ_2M
    hva = host.mmap(size, thp=True)
    host.write(hva, bytes(size))
    vm.set_user_memory_region(0, GPA, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.write(GPA, b"x")
    a.read(GPA + 0x3000, 1)
    vm.set_user_memory_region(0, GPA, size, hva, 0)         # logging off: tables stay
    assert [(m.gfn, m.size) for m in vm.mappings()] == [(GPA >> 12, 4096),
                                                         ((GPA >> 12) + 3, 4096)]
    pgt = backend_of(vm).pgt
    fa = a.steps.read(GPA + 0x5000, 1)
    assert _advance_to(fa, ARM64_PTE_MAKE)[2:] == [ARM64_PTE_BREAK, ARM64_PTE_MAKE]
    ((_table, _idx), old), = pgt.bbm_windows.items()
    assert pgt.fmt.table_address(old, 2) in pgt.store, "the old table is not freed yet"
    vm.check_invariants()
    fb = b.steps.read(GPA + 0x3000, 1)
    assert _advance_to(fb, ARM64_PTE_LOCKED_WAIT)
    assert fa.run() == b"\x00"
    assert pgt.fmt.table_address(old, 2) not in pgt.store
    assert pgt.rcu_deferred == [] and pgt.shared_walkers == 0
    assert fb.run() == b"\x00"
    assert [(m.gfn, m.size) for m in vm.mappings()] == [(GPA >> 12, SZ_2M)]


@pytest.fixture
def relax_perms_only():
    """The explorer's mutant ``arm64_relax_perms_only``: user_mem_abort before 7d894834a305."""
    with MUTANTS["arm64_relax_perms_only"].patch():
        yield


def test_a_table_unlinked_under_a_paused_walker_is_freed_after_its_walk(make_vm, host,
                                                                         relax_perms_only):
    """RCU: a walker inside a table that another walker replaces by a block finishes on the
    unlinked table, which is freed only when no shared walk is in progress any more. Here B
    relaxes a page of the table (``relax_perms_only`` makes a page-level permission fault
    relax under a THP, before 7d894834a305) while A collapses it."""
    from conftest import SZ_2M

    vm = make_vm()
    size = 2 * SZ_2M
    hva = host.mmap(size, thp=True)
    host.write(hva, bytes(size))
    vm.set_user_memory_region(0, GPA, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    b.read(GPA + 0x3000, 1)                   # read-only while logging
    vm.set_user_memory_region(0, GPA, size, hva, 0)
    pgt = backend_of(vm).pgt
    table = pgt.pt.path(GPA)[-1][1]
    fb = b.steps.write(GPA + 0x3000, b"w")
    _advance_to(fb, ARM64_RELAX_CMPXCHG)
    assert a.read(GPA + 0x5000, 1) == b"\x00"       # A maps the 2 MiB block over the table
    assert [m.size for m in vm.mappings()] == [SZ_2M]
    assert [t for t, _level, _ipa in pgt.rcu_deferred] == [table] and table in pgt.store
    vm.check_invariants()
    assert fb.run() is None                   # its cmpxchg lands in the unlinked table
    assert table not in pgt.store and pgt.rcu_deferred == []
    assert a.read(GPA + 0x3000, 1) == b"w"


# --------------------------------------------------------------------------- relax_perms


def test_two_writers_relax_one_leaf_the_second_cmpxchg_fails(make_vm):
    """Two vCPUs write-fault on a read-only page of a dirty-logged slot: both read it at
    ``arm64_relax_cmpxchg``; A's cmpxchg adds W; B's fails (the entry changed), -EAGAIN, and
    B's vCPU re-enters the guest and writes through A's leaf."""
    vm, a, b, backend = _setup(make_vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    a.read(TARGET, 1)                         # logging: a read fault maps read-only
    assert not vm.lookup(TARGET).writable
    fa = a.steps.write(TARGET, b"\xaa")
    fb = b.steps.write(TARGET, b"\xbb")
    _advance_to(fa, ARM64_RELAX_CMPXCHG)
    _advance_to(fb, ARM64_RELAX_CMPXCHG)
    assert fa.holds == fb.holds == ["srcu", "mmu_lock(read)"]
    assert fa.run() is None
    assert vm.lookup(TARGET).writable
    assert fb.run() is None
    assert vm.stats["arm64_fault_eagain"] == 1
    assert a.read(TARGET, 1) == b"\xbb"
    assert _bbm_on_valid_leaf(backend) == []
    assert [(t.op, t.why) for t in backend.tlbi_log] == [("vmid_ipa_nsh", "relax_perms")] * 2
    assert (TARGET - GPA) >> 12 in vm.get_dirty_log(0)


# --------------------------------------------------------------------------- the 2020 thread


@pytest.mark.parametrize("granule", [4096, 65536])
@pytest.mark.parametrize("point", [PF_SEQ_SNAPSHOT, PF_LOCK_WAIT])
def test_write_then_read_interleaved_reader_finishes_first(make_vm, point, granule):
    """A (write) stops at the race point; B (read) maps the page read-only; A then maps RW over
    RO: a permission-only difference, so -EAGAIN and A re-faults with a permission fault that
    relax_perms resolves (``arm64_relax_cmpxchg``, no break-before-make)."""
    vm, a, b, backend = _setup(make_vm, granule, KVM_MEM_LOG_DIRTY_PAGES)
    fa = a.steps.write(TARGET, b"\xaa" * 8)
    _advance_to(fa, point)
    assert b.read(TARGET, 8) == bytes(8)
    leaf = vm.lookup(TARGET)
    assert leaf.readable and not leaf.writable, "logging: a read fault maps read-only"
    assert ARM64_RELAX_CMPXCHG in list(fa)
    assert vm.lookup(TARGET).writable, "the leaf ends writable"
    assert _bbm_on_valid_leaf(backend) == [], "no break-before-make on a permission upgrade"
    assert vm.stats["relax_perms"] == 1
    assert [(t.op, t.why, t.ipa, t.level) for t in backend.tlbi_log] == [
        ("vmid_ipa_nsh", "relax_perms", TARGET & ~(granule - 1), 3)]
    assert b.read(TARGET, 8) == b"\xaa" * 8
    assert (TARGET - GPA) >> 12 in vm.get_dirty_log(0)


@pytest.mark.parametrize("granule", [4096, 65536])
@pytest.mark.parametrize("point", [PF_SEQ_SNAPSHOT, PF_LOCK_WAIT])
def test_read_then_write_interleaved_writer_finishes_first(make_vm, point, granule):
    """B (read) stops at the race point; A (write) maps RW and logs the page; B then maps RO
    over RW: a permission-only difference the map path leaves alone — no downgrade, and B
    never reaches a break."""
    vm, a, b, backend = _setup(make_vm, granule, KVM_MEM_LOG_DIRTY_PAGES)
    fb = b.steps.read(TARGET, 8)
    _advance_to(fb, point)
    a.write(TARGET, b"\xbb" * 8)
    before = vm.lookup(TARGET)
    assert before.writable
    rest = []
    with pytest.raises(StopIteration) as stop:
        while True:
            rest.append(next(fb))
    assert stop.value.value == b"\xbb" * 8
    assert ARM64_PTE_BREAK not in rest
    assert vm.lookup(TARGET) == before, "the racing read fault changed nothing"
    assert _bbm_on_valid_leaf(backend) == []
    assert list(backend.tlbi_log) == [], "neither fault needed a TLB invalidation"
    assert vm.stats["arm64_fault_eagain"] >= 1
    assert (TARGET - GPA) >> 12 in vm.get_dirty_log(0)


def test_pre_2020_map_walker_would_have_downgraded(make_vm):
    """Control: the map walker's filter (694d071f8d85) is what saves the writable leaf. With
    it disabled (stage2_pte_needs_update true for permission-only changes), B's read fault
    paused at ``arm64_pte_break`` while A maps RW then downgrades A's leaf through a
    break-before-make."""
    vm, a, b, backend = _setup(make_vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    b.read(TARGET + 4096, 1)                  # the tables exist: B's break is the leaf's
    pgt = backend.pgt
    pgt.pte_needs_update = lambda old, new: old != new
    fb = b.steps.read(TARGET, 8)
    _advance_to(fb, PF_LOCK_WAIT)
    a.write(TARGET, b"\xcc" * 8)
    assert fb.run() == b"\xcc" * 8
    pte = _entry(backend, TARGET)[2]
    assert not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert _bbm_on_valid_leaf(backend)
    assert "vmid_ipa" in {t.op for t in backend.tlbi_log}


def test_relax_perms_only_livelocks_a_write_after_a_racing_read(make_vm, relax_perms_only):
    """``relax_perms_only`` (before 7d894834a305): A's write that finds B's read-only leaf
    is a permission fault in a logging slot with a writable pfn, so it goes to the map
    walker, which leaves a permission-only change alone (-EAGAIN): A re-faults until it gives
    up. Linux since the fix relaxes it (the test above)."""
    vm, a, b, _backend = _setup(make_vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    fa = a.steps.write(TARGET, b"\xaa" * 8)
    _advance_to(fa, PF_LOCK_WAIT)
    assert b.read(TARGET, 8) == bytes(8)
    with pytest.raises(FaultLivelock) as e:
        for point in fa:
            assert point != ARM64_RELAX_CMPXCHG
    assert e.value.errno == errno.EAGAIN
    assert not vm.lookup(TARGET).writable
    assert vm.stats["relax_perms"] == 0


def test_relax_perms_only_still_relaxes_outside_dirty_logging(make_vm, relax_perms_only):
    """Before the fix a permission fault relaxed whatever the level it was taken at, unless
    it was a write to a logging slot: reads and writes elsewhere behave as today."""
    vm, a, _b, _backend = _setup(make_vm)
    a.write(TARGET, b"\x01")
    assert vm.lookup(TARGET).writable


def test_the_pre_fix_choice_is_a_mutant_not_a_vm_option(make_vm):
    with pytest.raises(KvmError) as e:
        make_vm(relax_perms_only=True)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("mutant, kind", [("arm64_relax_perms_only", "livelock"),
                                           ("arm64_map_replaces_perms", "downgrade")])
def test_the_explorer_finds_each_half_of_the_2020_bug_only_with_its_mutant(mutant, kind):
    """Every interleaving of a read and a write fault on one gfn of a dirty-logged slot (the
    built-in ``two_faults_one_entry``): with Linux's user_mem_abort every oracle holds; with
    the relax-vs-map choice before 7d894834a305 the write livelocks behind the read's
    read-only leaf; without the map walker's permission filter (694d071f8d85) the read
    downgrades the write's leaf."""
    scn = load("two_faults_one_entry")
    clean = explore(scn, "arm64_stage2")
    clean.assert_clean()
    assert clean.exhausted and clean.schedules > 3
    bad = explore(scn, "arm64_stage2", mutants=[mutant])
    assert bad.failures and bad.failures[0].kind == kind, bad.failures[:1]


# --------------------------------------------------------------------------- unmap


@pytest.mark.parametrize("granule", [4096, 16384, 65536])
def test_a_may_block_unmap_drops_the_write_lock_between_chunks(make_vm, granule):
    """stage2_apply_range with resched: a notifier's unmap of a range that crosses a
    KVM_PGTABLE_MIN_BLOCK_LEVEL boundary zaps the first chunk, then drops the write lock at
    ``s2_unmap_resched``; a fault may take the read lock there and retries, waiting for the
    invalidation to end; then the second chunk is zapped."""
    vm = make_vm(granule=granule)
    backend = backend_of(vm)
    chunk = backend.geom.size(backend.geom.min_block_level)
    host = vm.host
    size = 8 * granule
    hva = host.mmap(size)
    base = chunk - 4 * granule                 # the slot straddles the chunk boundary
    vm.set_user_memory_region(0, base, size, hva)
    a = vm.create_vcpu(0)
    for off in range(0, size, granule):
        a.write(base + off, b"\x77")
    zap = host.steps.madvise_dontneed(hva, size)
    _advance_to(zap, S2_UNMAP_RESCHED)
    assert "mmu_lock" not in zap.holds and vm.mmu_invalidate_in_progress == 1
    assert vm.lookup(base) is None, "the first chunk is zapped"
    assert vm.lookup(chunk) is not None, "the second one not yet"
    vm.check_invariants()
    fault = a.steps.read(base, 1)
    points = _advance_to(fault, "pf_retry_wait")
    assert PF_LOCK_WAIT in points and not fault.runnable
    zap.run()
    assert vm.lookup(chunk) is None
    assert fault.run() == b"\x00", "DONTNEED: the page faults back in as zero"
    assert vm.stats["arm64_s2_unmap_resched"] == 1


def test_a_memslot_flush_reschedules_between_chunks_and_small_unmaps_do_not(make_vm, host):
    """kvm_arch_flush_shadow_memslot unmaps with may_block (the core's flush_shadow_memslot
    default, under the write lock); a range inside one chunk has no point."""
    vm = make_vm()
    chunk = backend_of(vm).geom.size(backend_of(vm).geom.min_block_level)
    hva = host.mmap(SIZE)
    vm.set_user_memory_region(0, chunk - SIZE // 2, SIZE, hva)
    a = vm.create_vcpu(0)
    a.write(chunk - 4096, b"x")
    a.write(chunk, b"y")
    delete = vm.steps.set_user_memory_region(0, chunk - SIZE // 2, 0, hva)
    points = list(delete)
    assert S2_UNMAP_RESCHED in points
    assert points.index(S2_UNMAP_RESCHED) > points.index("slot_flush_lock_wait")
    assert list(vm.mappings()) == []
    small = make_vm()
    hva2 = host.mmap(SIZE)
    small.set_user_memory_region(0, GPA, SIZE, hva2)
    small.create_vcpu(0).write(GPA, b"z")
    assert S2_UNMAP_RESCHED not in list(host.steps.munmap(hva2, SIZE))


def test_a_write_fault_marks_its_page_dirty_after_dropping_mmu_lock(make_vm):
    """user_mem_abort marks the page dirty after kvm_fault_unlock: a KVM_GET_DIRTY_LOG that
    runs in between does not report the page although its leaf is writable (it is pending,
    and the invariants accept it); the next one does."""
    from kvmcore_arm64_stage2.mmu import ARM64_PF_MARK_DIRTY

    vm, a, _b, backend = _setup(make_vm, flags=KVM_MEM_LOG_DIRTY_PAGES)
    write = a.steps.write(TARGET, b"w")
    _advance_to(write, ARM64_PF_MARK_DIRTY)
    assert not any(h.startswith("mmu_lock") for h in write.holds)
    assert vm.lookup(TARGET).writable
    vm.check_invariants()
    assert vm.get_dirty_log(0) == []
    write.run()
    assert vm.get_dirty_log(0) == [5]
    assert not backend.dirty_marks_in_flight
    vm.check_invariants()


def test_starting_dirty_logging_write_protects_a_chunk_at_a_time(make_vm):
    """kvm_mmu_wp_memory_region -> kvm_stage2_wp_range: stage2_apply_range with resched drops
    the write lock between two 1 GiB chunks (``s2_wp_resched``); meanwhile a write to the
    chunk not yet protected completes without a fault (and unlogged), then the rest is
    protected and flushed."""
    from kvmcore_arm64_stage2.backend import S2_WP_RESCHED

    vm = make_vm(granule=4096)
    size = 2 << 30
    hva = vm.host.mmap(size)
    vm.set_user_memory_region(0, 0, size, hva)
    v = vm.create_vcpu(0)
    v.write(0x1000, b"a")
    v.write((1 << 30) + 0x1000, b"b")
    faults = vm.stats["faults"]
    update = vm.steps.set_user_memory_region(0, 0, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    _advance_to(update, S2_WP_RESCHED)
    assert not any(h.startswith("mmu_lock") for h in update.holds)
    assert not vm.lookup(0x1000).writable
    assert vm.lookup((1 << 30) + 0x1000).writable
    v.write((1 << 30) + 0x1000, b"c")
    assert vm.stats["faults"] == faults
    update.run()
    assert not vm.lookup((1 << 30) + 0x1000).writable
    assert vm.get_dirty_log(0) == []
    vm.check_invariants()


def test_eager_split_drops_the_write_lock_before_each_chunk(make_vm):
    """kvm_mmu_split_memory_region -> kvm_mmu_split_huge_pages: before each chunk,
    need_split_memcache_topup_or_resched may drop the write lock (``s2_split_topup``); a
    vCPU's write to a block not yet split faults there (the write protection left a
    permission fault), and its 4K map replaces the block with a table holding that page
    alone; the next chunk then has no block left to split."""
    from kvmcore_arm64_stage2.backend import S2_SPLIT_TOPUP

    vm = make_vm(granule=4096, eager_split_chunk_size=2 << 20)
    size = 4 << 20
    hva = vm.host.mmap(size, thp=True)
    vm.set_user_memory_region(0, 0, size, hva)
    v = vm.create_vcpu(0)
    v.write(0x1000, b"a")
    v.write((2 << 20) + 0x1000, b"b")
    assert vm.lookup(2 << 20).size == 2 << 20
    update = vm.steps.set_user_memory_region(0, 0, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    _advance_to(update, S2_SPLIT_TOPUP)
    _advance_to(update, S2_SPLIT_TOPUP)                    # the first chunk is split
    assert not any(h.startswith("mmu_lock") for h in update.holds)
    assert vm.lookup(0).size == 0x1000 and vm.lookup(2 << 20).size == 2 << 20
    v.write((2 << 20) + 0x3000, b"c")                      # logged, mapped 4K in the block
    assert vm.lookup((2 << 20) + 0x3000).size == 0x1000
    assert vm.lookup((2 << 20) + 0x5000) is None
    update.run()
    assert vm.lookup((2 << 20) + 0x3000).writable
    assert vm.get_dirty_log(0) == [512 + 3]
    vm.check_invariants()


THP_RING_ONLY = """
name = "thp_ring_only"
[vm]
dirty_ring = 65536
[[slot]]
pages = 1024
thp = true
log_dirty = true
[[flow]]
op = "read"
page = 252
vcpu = 1
[[flow]]
op = "write"
page = 1
"""


def test_a_thp_block_of_a_ring_only_slot_reports_its_faulting_gfn():
    """With a dirty ring and no bitmap memslot_is_logging is false: a read fault maps the
    THP's block writable and marks the gfn user_mem_abort took before
    transparent_hugepage_adjust aligned the ipa (the faulting one, 252); a later write
    elsewhere in the block faults no more. The dirty-log oracle takes a gfn anywhere in the
    block as the report (it wanted the block's first gfn; found by kvmcore swarm, seed 61)."""
    result = explore(parse(THP_RING_ONLY), "arm64_stage2", max_schedules=200)
    assert result.schedules == 200 and not result.failures, result.failures


def test_a_write_that_splits_a_block_of_a_logging_slot_unmaps_the_rest_of_it():
    """Dirty logging turned on over a THP block: the block is write-protected, not split
    (no eager split). A read elsewhere in it then completes through it, and a write fault
    maps 4K under it: stage2_map_walk_leaf replaces the block by an empty table, so the read's
    page is gone until it refaults, which Linux allows ('mapped lazily'); the downgrade oracle
    counts the replacement (``fault_block_unmapped``) as something that may take it away
    (found by kvmcore swarm, seed 61)."""
    from kvmcore.explore.scenario import World

    scn = load("block_read_vs_log_dirty_write")
    result = explore(scn, "arm64_stage2")
    assert result.exhausted and not result.failures, result.failures
    assert len(result.end_states) > 1
    world = World(scn, "arm64_stage2", "default", {})
    for flow in world.flows:
        flow.run()
    assert world.vm.stats["fault_block_unmapped"] == 1
    assert BBM_BLOCK_TO_TABLE in [t.why for t in backend_of(world.vm).tlbi_log]


HUGETLB_READS_VS_LOG_DIRTY = """
[[slot]]
pages = 512
kind = "hugetlb_2m"
[[flow]]
op = "read"
page = 4
[[flow]]
op = "read"
page = 0
[[flow]]
op = "log_dirty"
"""


def test_a_block_fault_that_breaks_a_table_may_take_its_leaves_away():
    """A read fault that looked the slot up before dirty logging started maps a block over
    the table that a read in the logging slot has just linked (stage2_map_walk_table_pre):
    between the break and the make nothing maps the range, which the downgrade oracle
    counts as a fault's break (``fault_block_unmapped``), not a downgrade (found by kvmcore
    swarm, seed 12, with a preemption bound of 2)."""
    from kvmcore.explore import parse, replay
    from kvmcore_arm64_stage2.pgtable import BBM_TABLE

    scn = parse(HUGETLB_READS_VS_LOG_DIRTY)
    run = replay(scn, "arm64_stage2", "A2.C2.B9.A2")
    assert run.failure is None
    assert run.world.vm.stats["fault_block_unmapped"] == 1
    assert BBM_TABLE in [t.why for t in backend_of(run.world.vm).tlbi_log]
    assert explore(scn, "arm64_stage2", preemption_bound=2).clean
