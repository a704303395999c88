"""The race explorer: schedule ids, exhaustive search, the mutants it must find (each on the
backends where the core's mechanism is the only defence), shrinking and replay, the CLI."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmcore.cli import main
from kvmcore.errors import KvmError
from kvmcore.explore.oracles import Oracles
from kvmcore.explore.scenario import RaceScenarioError, World, read_text
from kvmcore.explore import (MUTANTS, builtin_names, choose_vm_type, explore, load, parse,
                             parse_schedule_id, replay, schedule_id, supports)
from kvmcore.explore import Window
from kvmcore.plugins import installed_backends

FLAT = "kvmcore.testing:FlatBackend"
#: A 3-flow scenario whose two faults commute (too many schedules for the built-in set that
#: the conformance suite explores on every backend without reduction on some).
REDUCTION_EXAMPLE = str(Path(__file__).parent.parent / "docs" / "races" /
                        "two_faults_vs_munmap.toml")
#: Where each mutant applies: the backends on which nothing else covers for what it removes
#: (ppc re-checks mmu_invalidate_retry in kvmppc_create_pte; arm64 and ppc invalidate their
#: TLBs inside the zap, so the core's flush is not theirs to lose).
APPLIES = {
    "no_stale_check": ["x86_tdp", "arm64_stage2", FLAT],
    "pfnmap_no_retry": ["x86_tdp", "arm64_stage2", FLAT],
    "notifier_without_invalidation": ["x86_tdp", "arm64_stage2", "ppc_radix", FLAT],
    "no_flush_on_zap": ["x86_tdp", FLAT],
    "dirty_clear_no_flush": ["x86_tdp", "arm64_stage2", FLAT],
    "swap_without_mn_wait": ["x86_tdp", "arm64_stage2", "ppc_radix", "riscv_gstage", FLAT],
    # ppc's flush of the old slot bumps mmu_invalidate_seq: the late fault retries.
    "swap_without_srcu_sync": ["x86_tdp", "arm64_stage2", "riscv_gstage", FLAT],
    "gmem_end_before_truncate": ["x86_tdp", FLAT],     # the backends with guest_memfd
    "ring_reset_no_flush": ["x86_tdp", "arm64_stage2", "riscv_gstage", FLAT],   # ppc: no ring
    # ppc starts logging with nothing to protect: it harvests C bits.
    "log_dirty_no_flush": ["x86_tdp", "arm64_stage2", "riscv_gstage", FLAT],
    # The backends with KVM_PRE_FAULT_MEMORY in 6.18.
    "prefault_retries_invalid_slot": ["x86_tdp", FLAT],
    # The pfn cache: x86 (CONFIG_HAVE_KVM_PFNCACHE) and the flat backend.
    "gpc_retry_in_progress": ["x86_tdp", FLAT],
    "gpc_refresh_unserialized": ["x86_tdp", FLAT],
    "gpc_refresh_inactive": ["x86_tdp", FLAT],
    # The backends' own (entry-point group kvmcore.mutants), present when they are installed.
    "tdx_zap_shared_alias": ["x86_tdp"],
    "tdx_remove_before_track": ["x86_tdp"],
    "zap_yield_without_flush": ["x86_tdp"],
    "obsolete_root_no_retry": ["x86_tdp"],
    "zap_root_restart_advances": ["x86_tdp"],
    "unmap_valid_roots_only": ["x86_tdp"],
    "tdx_local_retry_invalid_slot": ["x86_tdp"],
    "reload_keeps_obsolete_root": ["x86_tdp"],
    "arm64_map_replaces_perms": ["arm64_stage2"],
    "arm64_relax_perms_only": ["arm64_stage2"],
}
#: Where a mutant's scenario needs a VM type other than the first: on x86's DEFAULT_VM,
#: KVM_X86_QUIRK_SLOT_ZAP_ALL makes a memslot update obsolete every root, and the late fault
#: a missing synchronize_srcu lets through retries at is_page_fault_stale's root test.
VM_TYPES = {("swap_without_srcu_sync", "x86_tdp"): "sw_protected"}


def test_a_slot_update_that_zaps_all_also_stops_the_late_fault():
    """x86 DEFAULT_VM without synchronize_srcu in the swap: the fault that looked the old slot
    up finds its root obsolete (a955cad84cda) and retries, so nothing fails; the same race
    on a VM type that zaps the slot only installs into the deleted slot."""
    if not _available("x86_tdp"):
        pytest.skip("x86_tdp is not installed")
    scn = load("fault_vs_slot_delete")
    assert explore(scn, "x86_tdp", "default", mutants=["swap_without_srcu_sync"]).clean
    assert explore(scn, "x86_tdp", "default", {"slot_zap_all_quirk": False},
                   mutants=["swap_without_srcu_sync"]).failures


CASES = [(m, s, a) for m, archs in APPLIES.items() if m in MUTANTS
         for s in MUTANTS[m].scenarios
         for a in archs if not (s == "private_fault_vs_conversion" and a == "arm64_stage2")]


def _available(arch: str) -> bool:
    return ":" in arch or arch in installed_backends()


def test_schedule_ids_round_trip():
    assert schedule_id([0, 0, 1, 0, 2, 2, 2]) == "A2.B1.A1.C3"
    assert parse_schedule_id("A2.B1.A1.C3", 3) == [0, 0, 1, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="C1"):
        parse_schedule_id("A1.C1", 2)


def test_every_mutant_has_a_case():
    assert set(MUTANTS) <= set(APPLIES)
    assert {m.name for m in MUTANTS.values() if m.arch is None} == \
        {m for m, archs in APPLIES.items() if len(archs) > 1}
    for m in MUTANTS.values():
        assert m.arch is None or APPLIES[m.name] == [m.arch]


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_scenarios_are_clean_on_flat(name):
    scn = load(name)
    if not supports(scn, FLAT):
        pytest.skip(f"the flat backend cannot run {name}")
    if scn.linux_race is not None:
        pytest.skip(f"{name} shows a race of Linux")
    result = explore(scn, FLAT)
    result.assert_clean()
    assert result.exhausted and result.schedules > 1


@pytest.mark.parametrize("mutant, scenario, arch", CASES)
def test_each_mutant_is_found_and_its_shrunk_schedule_replays(mutant, scenario, arch):
    if not _available(arch):
        pytest.skip(f"{arch} is not installed")
    scn = load(scenario)
    if not supports(scn, arch):
        pytest.skip(f"{arch} cannot run {scenario}")
    vm_type = VM_TYPES.get((mutant, arch))
    result = explore(scn, arch, vm_type, mutants=[mutant], max_schedules=1000)
    assert result.failures, f"{mutant} not found on {arch} in {result.schedules} schedules"
    assert result.schedules <= 1000
    failure = result.failures[0]
    again = replay(scn, arch, failure.id, vm_type, mutants=[mutant])
    assert again.failure is not None and again.failure.kind == failure.kind
    assert again.failure.message == failure.message
    # Linux's code fails no oracle on that schedule; it may stop short of the schedule's end
    # where a Linux flow waits and the mutant's did not (the fault, made stale by a notifier
    # with its invalidation, waits at pf_retry_wait for the invalidation to end).
    clean = replay(scn, arch, failure.id, vm_type).failure
    assert clean is None or clean.kind == "replay", clean


def _preemptions(r) -> int:
    """The preemptions of run ``r``: switches away from a flow that could have gone on."""
    return sum(1 for k in range(1, len(r.schedule))
               if r.schedule[k] != r.schedule[k - 1] and r.schedule[k - 1] in r.choices[k])


PRE_FAULT_THROUGH_AN_UPDATE = """
name = "dontneed_pre_fault_move"
[[slot]]
pages = 16
populate = true
[[access]]
op = "read"
page = 2
[[flow]]
op = "madvise_dontneed"
page = 0
pages = 16
[[flow]]
op = "pre_fault"
page = 2
pages = 1
[[flow]]
op = "move_slot"
gpa = 0x800000
"""


def test_a_pre_fault_waiting_out_an_invalidation_stops_when_its_slot_is_moved():
    """A pre-fault that retries while a DONTNEED's invalidation is in progress spins fault
    after fault in kvm_tdp_map_page; once a MOVE of its slot has made it INVALID, the next
    fault fails with -EAGAIN and the pre-fault leaves kvm->srcu, which the MOVE's
    synchronize_srcu waits for. (The model waited for the update itself there: a deadlock
    the swarm found with a preemption bound, ``A4.B2.A1.C2``.)"""
    scn = parse(PRE_FAULT_THROUGH_AN_UPDATE)
    run = replay(scn, FLAT, "A4.B2.A1.C2")
    assert run.failure is None
    assert run.outcomes[1] == ("raised", "KvmError",
                               "[EAGAIN] pre_fault_memory: the memslot is being updated")
    result = explore(scn, FLAT, preemption_bound=2)
    assert result.clean and result.exhausted and result.schedules == 527


WRITES_ON_THE_ZERO_PAGE = """
name = "host_write_vs_write_one_cow"
[[slot]]
pages = 16
[[access]]
op = "read"
page = 1
[[flow]]
op = "host_write"
page = 1
[[flow]]
op = "write"
page = 1
"""


def _cow_break_without_pte_same(self, vma, hva):
    """HostMemory._cow_break before b53d767: no pte_same check before the install."""
    page = hva & ~(self.page_size - 1)
    yield from self._invalidate_start(page, self.page_size)
    self._set_pte(page, self._alloc_anon(self.nr_frames), True)
    yield from self._invalidate_end(page, self.page_size)


def test_a_page_lost_by_a_cow_break_is_found(monkeypatch):
    """The lost-page oracle: a VMM write and a guest write that both find the zero page break
    COW once. Without wp_page_copy's pte_same check (the model's bug before b53d767), the
    loser's copy goes over the winner's page, which nobody maps or frees any more."""
    from kvmcore.host import HostMemory

    scn = parse(WRITES_ON_THE_ZERO_PAGE)
    assert explore(scn, FLAT).clean

    monkeypatch.setattr(HostMemory, "_cow_break", _cow_break_without_pte_same)
    failure = explore(scn, FLAT).failures[0]
    assert failure.kind == "lost-page" and "neither mapped by the host nor freed" in \
        failure.message
    assert replay(scn, FLAT, failure.id).failure.kind == "lost-page"


def test_a_store_lost_by_a_cow_break_is_found(monkeypatch):
    """The lost-write oracle, with the lost-page oracle off: without pte_same the first
    store goes to the page the loser's copy then replaced, and the end holds zeros where it
    wrote. Each flow stores at bytes of its own (A at 8, B at 16), so no order of the two
    explains the loss."""
    from kvmcore.explore.oracles import Oracles
    from kvmcore.host import HostMemory

    scn = parse(WRITES_ON_THE_ZERO_PAGE)
    assert [f["offset"] for f in scn.flows] == [8, 16]

    monkeypatch.setattr(HostMemory, "_cow_break", _cow_break_without_pte_same)
    monkeypatch.setattr(Oracles, "lost_page", lambda self: None)
    failure = explore(scn, FLAT).failures[0]
    assert (failure.kind, failure.id) == ("lost-write", "A1.B2.A4.B5")
    assert failure.message == ("end: A:host.write stored b'HOST' at hva 0x100001008 and "
                               "completed, but b'\\x00\\x00\\x00\\x00' is there at the end")


LOST_IN_MIGRATION = """
name = "writes_vs_migration"
[[slot]]
pages = 16
populate = true
[[flow]]
op = "write"
page = 3
[[flow]]
op = "host_write"
page = 3
[[flow]]
op = "migrate"
page = 3
"""


def test_a_migration_that_does_not_copy_loses_the_stores_before_it(monkeypatch):
    """A migration that maps its new page without copying the old (a model bug planted
    here) loses every store that completed before its unmap; clean with the copy, in every
    interleaving (a store after the unmap waits for the migration entry and goes to the new
    page)."""
    from kvmcore.host import HostMemory

    scn = parse(LOST_IN_MIGRATION)
    result = explore(scn, FLAT)
    assert result.clean and result.exhausted
    monkeypatch.setattr(HostMemory, "copy_frames", lambda self, src, dst, npages: None)
    failure = explore(scn, FLAT).failures[0]
    assert failure.kind == "lost-write" and "is there at the end" in failure.message
    assert replay(scn, FLAT, failure.id).failure.kind == "lost-write"


DISCARDED = """
name = "write_vs_dontneed"
[[slot]]
pages = 16
[[flow]]
op = "write"
page = 3
[[flow]]
op = "madvise_dontneed"
page = 3
[[flow]]
op = "host_write"
page = 5
"""


def test_a_store_on_a_page_a_flow_discards_is_not_claimed():
    """MADV_DONTNEED may take a completed store with it (the next touch reads zeros): the
    store on its page is not checked, one on another page still is."""
    from kvmcore.explore.search import Explorer

    scn = parse(DISCARDED)
    result = explore(scn, FLAT)
    assert result.clean and result.exhausted
    ex = Explorer(scn, FLAT, choose_vm_type(scn, FLAT))
    run = ex.run([])                      # A, then B, then C, each to its end
    oracles = run.oracles
    assert [i for i, _w, _d in oracles.stores] == [0, 2]
    assert oracles.world.host.peek(run.world.hvas[0] + 3 * 4096 + 8, 8) == bytes(8)
    assert oracles.lost_write() is None
    oracles.world.host.write_frame(oracles.world.host.lookup_pte(
        run.world.hvas[0] + 5 * 4096)[0], 24, b"gone")
    assert oracles.lost_write()[0] == "lost-write"


STALE = """
name = "reads_vs_the_host"
[vm]
requires = ["pfncache"]
[[slot]]
pages = 16
[[access]]
op = "gpc_activate"
page = 5
[[flow]]
op = "read"
page = 3
[[flow]]
op = "gpc_read"
"""


def _no_notifiers(self, hva, length):
    return
    yield


def test_an_access_through_a_frame_the_host_moved_away_is_stale(monkeypatch):
    """The stale-access oracle: a vCPU's read (of the shared zero page) and a pfn cache's
    (of the page its refresh faulted in for write) went to the frame the host maps at their
    hva. After a COW break and a migration whose notifiers do not fire (a host bug planted
    here), the vCPU's TLB entry and the cache reach the old frames: the zero page, which is
    never freed (the use-after-free oracle cannot see it), and a freed page."""
    from kvmcore.explore.search import Explorer
    from kvmcore.host import HostMemory

    scn = parse(STALE)
    assert explore(scn, FLAT).clean
    run = Explorer(scn, FLAT, choose_vm_type(scn, FLAT)).run([])
    oracles, host = run.oracles, run.world.host
    assert [oracles.stale_access(i, run.outcomes[i]) for i in (0, 1)] == [None, None]
    monkeypatch.setattr(HostMemory, "_invalidate_start", _no_notifiers)
    monkeypatch.setattr(HostMemory, "_invalidate_end", _no_notifiers)
    hva3, hva5 = (run.world.hvas[0] + page * 4096 for page in (3, 5))
    old5 = host.lookup_pte(hva5)[0]
    host.write(hva3, b"new")
    new3, new5 = host.lookup_pte(hva3)[0], host.migrate(hva5)
    assert oracles.stale_access(0, run.outcomes[0]) == (
        "stale-access", f"A:vcpu0.read went to gpa 0x3000 through pfn {host.zero_pfn:#x}, but "
        f"the host maps its hva {hva3:#x} to pfn {new3:#x}")
    assert oracles.stale_access(1, run.outcomes[1]) == (
        "stale-access", f"B:gpc.read went through the pfn cache's pfn {old5:#x}, but the "
        f"host maps its hva {hva5:#x} to pfn {new5:#x}")


PFNMAP_BLOCK = """
name = "write_under_a_pfnmap_block"
[[slot]]
pages = 1024
kind = "pfnmap"
[[access]]
op = "write"
page = 77
[[flow]]
op = "write"
page = 0
[[flow]]
op = "read"
page = 1
"""


@pytest.mark.skipif(not _available("arm64_stage2"), reason="the arm64 backend is not installed")
def test_an_access_under_a_pfnmap_block_goes_where_the_vma_places_it():
    """arm64 maps a VM_PFNMAP range by its VMA's geometry (get_vma_page_shift): the setup's
    fault on page 77 maps a block over device pages whose host PTEs are not populated. The
    stale-access oracle takes the VMA's pfn there, as a fault would (it reported the swarm's
    arm64 seed 0, 60th scenario, before)."""
    result = explore(parse(PFNMAP_BLOCK), "arm64_stage2")
    assert result.clean and result.exhausted


def test_a_flow_that_ends_as_its_scenario_does_not_expect_fails_the_schedule():
    """``expect`` lists the outcomes a flow may end with in any schedule: the built-in
    pre-fault racing its slot's deletion ends with ok, EAGAIN or ENOENT; a copy that expects
    only ok or EAGAIN fails where the deletion ran first, with the outcome named."""
    from kvmcore.explore.scenario import outcome_name
    from kvmcore.exits import MemoryFaultExit
    from kvmcore.host import SigBus

    scn = load("pre_fault_vs_slot_delete")
    assert scn.flows[0]["expect"] == ["ok", "EAGAIN", "ENOENT"]
    assert explore(scn, FLAT).clean
    text = read_text("pre_fault_vs_slot_delete")[0].replace('"EAGAIN", "ENOENT"', '"EAGAIN"')
    failure = explore(parse(text), FLAT).failures[0]
    assert failure.kind == "unexpected" and failure.message == (
        "A:vcpu0.pre_fault_memory ended with ENOENT ([ENOENT] gpa=0x0 is not covered by a "
        "memslot); the scenario expects ok or EAGAIN")
    assert replay(parse(text), FLAT, failure.id).failure.kind == "unexpected"
    assert [outcome_name(e) for e in (None, KvmError(errno.EAGAIN, "x"),
                                      MemoryFaultExit(0, 0, 4096), SigBus("x"))] == \
        ["ok", "EAGAIN", "memory_fault", "sigbus"]
    for bad in ('"ok"', '[]', '["ok", "EWHAT"]', '[1]'):
        with pytest.raises(ValueError, match="flow 1: key 'expect': .* is not a list of "
                                             "outcomes: ok, an errno name"):
            parse(f"[[slot]]\n[[flow]]\nop = 'read'\nexpect = {bad}\n")


def test_close_gmem_releases_the_file_unless_a_mapping_holds_it():
    """``close_gmem``: the VMM closes a slot's guest_memfd, its last reference
    (kvm_gmem_release); between taking the file from its slots and zapping, the slot's leaves
    stay (the invariants allowed none there before: the built-in
    ``private_fault_vs_gmem_release`` failed in its first schedule). A ``"mmap"`` slot's
    mapping holds its file, so closing the fd releases nothing."""
    from kvmcore.invariants import check_vm

    scn = load("private_fault_vs_gmem_release")
    assert replay(scn, FLAT, "A3.B3").failure is None
    world = World(scn, FLAT, choose_vm_type(scn, FLAT), {})
    fault, release = world.flows
    for _ in fault:
        pass
    points = [next(release) for _ in range(3)]
    assert points == ["gmem_slots_lock_wait", "gmem_inval_lock_wait", "gmem_begin_lock_wait"]
    vm = world.vm
    assert world.gmems[0].dying and vm.memslots()[0].gmem_file is None
    assert vm.lookup(5 << 12, private=True) is not None and check_vm(vm) == []
    for _ in release:
        pass
    assert vm.lookup(5 << 12, private=True) is None and check_vm(vm) == []
    with pytest.raises(ValueError, match="flow 1: close_gmem: the mapping of a guest_memfd "
                                         '= "mmap" slot holds its file'):
        parse('[[slot]]\nguest_memfd = "mmap"\n[[flow]]\nop = "close_gmem"\n')


STORE_DURING_RELEASE = """
name = "private_store_vs_gmem_release"
[vm]
requires = ["private_mem", "gmem"]
[[slot]]
pages = 16
guest_memfd = true
private = true
[[access]]
op = "write"
page = 5
private = true
[[flow]]
op = "close_gmem"
[[flow]]
op = "write"
page = 5
private = true
"""


def test_a_private_store_through_a_leaf_a_release_has_not_zapped_yet_is_checked():
    """A store that completes through the leaf of a slot whose guest_memfd a release has
    taken away (before its zap) went to the file's folio: the lost-write oracle looks for it
    there (it asked the slot for the file, which was None: a crash, found by the swarm)."""
    scn = parse(STORE_DURING_RELEASE)
    run = replay(scn, FLAT, "A3.B1")
    assert run.failure is None and run.outcomes[1][0] == "ok"
    assert [(i, where[0], where[2]) for i, where, _d in run.oracles.stores] == \
        [(1, "gmem", 0x5010)]
    assert explore(scn, FLAT).clean


POISON_DURING_COLLAPSE = """
name = "poison_vs_collapse"
[[slot]]
pages = 512
thp = "split"
[[flow]]
op = "poison"
[[flow]]
op = "write"
page = 125
[[flow]]
op = "collapse_huge_page"
"""


def test_a_memory_error_injected_during_a_collapse_waits_for_its_mmap_lock():
    """Found by the lost-write oracle (ppc swarm, seed 0, the 272nd): a memory error
    injected on a page a collapse had taken out of its PTEs faulted the page in again
    without the mmap lock (a new THP under the collapse), and the collapse's huge page then
    sat beside the PTEs of the fault's split: the write before it was lost. The page comes
    from get_user_pages_fast, whose slow path takes the mmap lock for read. And a collapse
    fails on a page memory_failure has begun on and holds (__collapse_huge_page_isolate's
    refcount check): it collapsed it, and the memory error then cut a 4 KiB page out of
    the new huge mapping without the invalidation of its split (``A1.C4.A1.B3.A1``)."""
    scn = parse(POISON_DURING_COLLAPSE)
    result = explore(scn, FLAT, preemption_bound=2)
    assert result.clean, result.failures[0]
    run = replay(scn, FLAT, "C3.A1")         # the collapse has taken the PTEs out
    assert run.failure is None
    assert [e.get("point") for e in run.trace if e["flow"] == "A"][:1] == ["mmap_lock_wait"]


def test_a_memory_error_on_private_memory_hits_the_guest_memfd_folio():
    """``poison`` with ``private = true``: memory_failure on the frame of the slot's
    guest_memfd folio (allocated first when the setup did not: a memory error hits memory),
    whose error handler invalidates it; the private write after it exits with -EHWPOISON.
    Only a slot with a guest_memfd of its own has such a page."""
    scn = load("private_fault_vs_memory_failure")
    arch = "x86_tdp" if _available("x86_tdp") else FLAT
    run = replay(scn, arch, "B3.A1")
    assert run.failure is None and run.outcomes[1] == ("ok", None)
    assert run.outcomes[0][:2] == ("raised", "MemoryFaultExit") and \
        "errno=0x85" in run.outcomes[0][2]
    inode = run.world.gmems[0].inode
    assert inode.poisoned == {5} and inode.frame_of(5) in run.world.host.poisoned
    assert explore(scn, arch).clean
    for slot in ("", 'guest_memfd = "mmap"'):
        text = f"""[[slot]]\n{slot}\n[[flow]]\nop = "poison"\npage = 1\nprivate = true\n"""
        with pytest.raises(RaceScenarioError, match="poison: private = true names a page of "
                                                    "the slot's guest_memfd"):
            parse(text)


def _unbind_under_the_lock(slot):
    """kvm_gmem_unbind taking the inode's invalidate lock for a dying file too (the file and
    its mapping live until the release, which waits for the slots_lock the caller holds)."""
    from kvmcore.gmem import unbind_locked

    if slot.gmem_file is not None:
        yield from unbind_locked(slot.gmem_file, slot)


PUNCH_DELETE_CLOSE = """
name = "punch_vs_slot_delete_vs_close"
[vm]
requires = ["private_mem"]
[[slot]]
pages = 16
guest_memfd = true
private = true
[[flow]]
op = "punch_hole"
page = 9
pages = 2
[[flow]]
op = "delete_slot"
[[flow]]
op = "close_gmem"
"""


def test_a_hole_punch_keeps_the_file_alive_across_a_close():
    """The swarm (seed 16, the 202nd) found the hole punch's invalidation left in progress
    when a close made the file dying at once and a memslot deletion then unbound it without
    the invalidate lock: the punch's fallocate holds a reference, so the close is not the
    last fput and the unbind waits for the lock. Clean in every interleaving."""
    result = explore(parse(PUNCH_DELETE_CLOSE), FLAT, preemption_bound=None)
    assert result.clean and result.exhausted


def test_the_race_of_a_dying_guest_memfd_unbind_is_found_and_goes_with_the_lock(monkeypatch):
    """``gmem_error_vs_dying_unbind``, a race of Linux the swarm found: a memory error's
    invalidation has read a slot's binding when the slot's deletion unbinds it without the
    invalidate lock (the file is dying) and frees it; the zap goes through the freed slot,
    and the end, finding no binding, never lowers mmu_invalidate_in_progress. With the
    unbind under the lock in every case the scenario is clean in every interleaving."""
    from kvmcore import set_memory_region
    from kvmcore.invariants import check_vm

    scn = load("gmem_error_vs_dying_unbind")
    assert scn.linux_race.startswith("virt/kvm/guest_memfd.c:kvm_gmem_unbind")
    failure = explore(scn, FLAT).failures[0]
    assert (failure.kind, failure.id) == ("invariant", "A1.B5.C2.B1.A1.C1")
    assert failure.message == ("after C: kvm_mmu_unmap_gfn_range on gfns [0x5, 0x6) of "
                               "memslot 0x0: the memslot was freed (kvm_free_memslot)")
    # Run on to the end, unchecked: the invalidation's end left it in progress.
    world = World(scn, FLAT, choose_vm_type(scn, FLAT), {})
    for i in parse_schedule_id("A1.B5.C2.B1.A1.C1.A1", 3):
        with contextlib.suppress(StopIteration):        # the stretch that ends a flow
            next(world.flows[i])
    assert all(flow.done for flow in world.flows)
    assert check_vm(world.vm)[-1] == ("mmu_invalidate_in_progress is 1 but only 0 "
                                      "invalidations are active: one began and will never end")
    monkeypatch.setattr(set_memory_region, "kvm_gmem_unbind", _unbind_under_the_lock)
    result = explore(scn, FLAT)
    assert result.clean and result.exhausted


GPC_WRITE_ON_POISON = """
name = "gpc_write_vs_poison"
[[slot]]
pages = 1024
kind = "hugetlb_2m"
[[access]]
op = "gpc_activate"
page = 3
[[flow]]
op = "gpc_write"
expect = ["ok", "EFAULT"]
[[flow]]
op = "poison"
"""


def test_a_pfn_cache_write_whose_refresh_failed_stored_nothing():
    """A pfn cache's write returns -errno when its refresh fails (the hugetlb page it maps
    was poisoned whole): it stored nothing, which the lost-write oracle took for a lost
    store (x86 swarm, seed 1, the 25th), and ``expect`` names the outcome by its errno."""
    scn = parse(GPC_WRITE_ON_POISON)
    run = replay(scn, FLAT, "B4")                    # the poison first, whole
    assert run.failure is None and run.outcomes[0] == ("ok", -errno.EFAULT)
    assert run.oracles.stores == []
    assert explore(scn, FLAT).clean
    failure = explore(parse(GPC_WRITE_ON_POISON.replace('"ok", "EFAULT"', '"ok"')),
                      FLAT).failures[0]
    assert failure.kind == "unexpected" and "ended with EFAULT;" in failure.message


def test_a_store_offset_must_leave_its_bytes_in_the_page():
    with pytest.raises(ValueError, match="flow 1: key 'offset': 4090 does not leave the 8 "
                                         "bytes of its store in a 4096-byte page"):
        parse("[[slot]]\n[[flow]]\nop = 'write'\npage = 1\noffset = 4090\n")
    with pytest.raises(ValueError, match="flow 2: key 'data': '' is not a non-empty ASCII"):
        parse("[[slot]]\n[[flow]]\nop = 'read'\n[[flow]]\nop = 'host_write'\ndata = ''\n")
    scn = parse("[[slot]]\n[[flow]]\nop = 'write'\ngpa = 0x1004\n"
                "[[flow]]\nop = 'host_write'\npage = 1\noffset = 0\ndata = 'ab'\n")
    assert "offset" not in scn.flows[0] and scn.flows[1]["offset"] == 0


MIGRATIONS_AND_A_ZAP = """
name = "migrations_and_a_zap"
[[slot]]
pages = 16
populate = true
[[flow]]
op = "migrate"
page = 3
[[flow]]
op = "migrate"
page = 3
[[flow]]
op = "madvise_dontneed"
page = 3
"""


def test_a_migration_loses_no_page():
    """Found by the lost-page oracle (x86 swarm, seed 1, scenarios 17 and 184): a second
    migration of a folio the first had isolated copied it again and mapped its copy nowhere
    (now EBUSY, folio_isolate_lru), and a migration whose page a DONTNEED or munmap zapped
    in its window kept the new folio it mapped nowhere (now freed with it)."""
    scn = parse(MIGRATIONS_AND_A_ZAP)
    result = explore(scn, FLAT)
    assert result.clean and result.exhausted
    run = replay(scn, FLAT, "A1.B1")       # A in its window: B finds the folio isolated
    assert run.outcomes[1] == ("raised", "KvmError",
                               "[EBUSY] migrate: the page at hva=0x100003000 is being migrated")


def test_a_bounded_search_runs_exactly_the_schedules_within_its_bound():
    """Context bounding: the bounded depth-first search runs every schedule of the unbounded
    one that has at most N preemptions, and no other (three flows, two of them waiting for
    locks on the way: a switch away from a waiting flow is free)."""
    from kvmcore.explore.search import Explorer, _dfs

    scn = load("write_vs_log_dirty")
    vm_type = choose_vm_type(scn, FLAT)
    every = {tuple(r.schedule): _preemptions(r)
             for r in _dfs(Explorer(scn, FLAT, vm_type), [], reduce=False)}
    assert len(every) == 105 and max(every.values()) == 5
    for bound in range(5):
        runs = list(_dfs(Explorer(scn, FLAT, vm_type, preemption_bound=bound), [],
                         reduce=False))
        assert all(_preemptions(r) <= bound for r in runs)
        assert {tuple(r.schedule) for r in runs} == \
            {s for s, n in every.items() if n <= bound}, bound
    assert len({s for s, n in every.items() if n == 0}) == 6      # 3! serial orders


def test_a_scenario_declares_its_preemption_bound():
    bounded = parse("preemption_bound = 1\n" + _builtin_text("write_vs_log_dirty"))
    assert bounded.preemption_bound == 1 and load("write_vs_log_dirty").preemption_bound is None
    r = explore(bounded, FLAT)
    assert r.exhausted and r.schedules == 35 and r.preemption_bound == 1
    assert r.summary()["preemption_bound"] == 1 and r.pruned == 0      # no sleep sets
    assert explore(bounded, FLAT, preemption_bound=None).schedules == 105
    assert explore(bounded, FLAT, preemption_bound=0).schedules == 6
    assert explore(bounded, FLAT, strategy="pct", max_schedules=20).preemption_bound is None
    for bad in (-1, True, "2", 1.5):
        with pytest.raises(ValueError, match="preemption_bound="):
            explore(bounded, FLAT, preemption_bound=bad)
    with pytest.raises(ValueError, match="for the dfs strategy"):
        explore(bounded, FLAT, strategy="pct", preemption_bound=1)
    with pytest.raises(ValueError, match="key 'preemption_bound': -1 is not a non-negative"):
        parse("preemption_bound = -1\n[[slot]]\n[[flow]]\nop = 'read'\n")
    with pytest.raises(ValueError, match="unknown key 'preemptions': one of name, "):
        parse("preemptions = 1\n[[slot]]\n[[flow]]\nop = 'read'\n")


def _builtin_text(name: str) -> str:
    from kvmcore.explore.scenario import read_text

    return read_text(name)[0]


def test_cli_bounds_the_search_and_says_so(tmp_path):
    r = CliRunner().invoke(main, ["explore", "write_vs_log_dirty", "--arch", FLAT,
                                  "--preemption-bound", "1"])
    assert r.exit_code == 0, r.output
    assert "35 schedules (all with at most 1 preemptions)" in r.output
    scn = tmp_path / "bounded.toml"
    scn.write_text("preemption_bound = 0\n" + _builtin_text("write_vs_log_dirty"))
    r = CliRunner().invoke(main, ["explore", str(scn), "--arch", FLAT, "--json"])
    assert json.loads(r.output)["schedules"] == 6
    r = CliRunner().invoke(main, ["explore", str(scn), "--arch", FLAT, "--json",
                                  "--preemption-bound", "none"])
    assert json.loads(r.output)["preemption_bound"] is None
    assert json.loads(r.output)["schedules"] == 105
    for bad in ("-1", "x"):
        r = CliRunner().invoke(main, ["explore", "write_vs_log_dirty", "--arch", FLAT,
                                      "--preemption-bound", bad])
        assert r.exit_code == 2 and "not a non-negative number or none" in r.output
        assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["explore", "write_vs_log_dirty", "--arch", FLAT,
                                  "--strategy", "pct", "--preemption-bound", "1"])
    assert r.exit_code == 2 and "for the dfs strategy" in r.output


def test_a_scenario_error_names_the_item():
    with pytest.raises(ValueError, match="flow 1: key 'op'"):
        parse("[[slot]]\n[[flow]]\nop = 'fly'\n")
    with pytest.raises(ValueError, match="\\[vm\\]: key 'dirty_ring': 'x'"):
        parse("[vm]\ndirty_ring = 'x'\n[[slot]]\n[[flow]]\nop = 'reset_dirty_rings'\n")
    assert parse("[vm]\ndirty_ring = '0x10000'\n[[slot]]\n[[flow]]\nop = "
                 "'reset_dirty_rings'\n").vm["dirty_ring"] == 0x10000
    for vm, match in (("requires = 5", "key 'requires': 5 is not a list"),
                      ("requires = [5]", "key 'requires': \\[5\\] is not a list"),
                      ("manual_protect = 'x'", "key 'manual_protect': 'x' is not true"),
                      ("vm_type = 7", "key 'vm_type': 7 is not a string"),
                      ("vcpus = 2", "unknown key 'vcpus'")):
        with pytest.raises(ValueError, match=f"\\[vm\\]: {match}"):
            parse(f"[vm]\n{vm}\n[[slot]]\n[[flow]]\nop = 'read'\n")
    for key, match in (("data = 5", "key 'data': 5 is not a string"),
                       ("private = 'x'", "key 'private': 'x' is not true or false")):
        with pytest.raises(ValueError, match=f"flow 1: {match}"):
            parse(f"[[slot]]\n[[flow]]\nop = 'write'\n{key}\n")
    with pytest.raises(ValueError, match="flow 1: punch_hole needs a \\[\\[slot\\]\\] with "
                                         "guest_memfd = true"):
        parse("[[slot]]\n[[flow]]\nop = 'punch_hole'\n")
    with pytest.raises(ValueError, match="slot 1: key 'guest_memfd': 'x' is not true, false"):
        parse("[[slot]]\nguest_memfd = 'x'\n[[flow]]\nop = 'read'\n")
    for slot in ("thp = 'yes'", "thp = 1", "kind = 'shared'\nthp = true",
                 "guest_memfd = true\nthp = 'split'"):
        with pytest.raises(ValueError, match="slot 1: key 'thp': .* only for an anonymous"):
            parse(f"[[slot]]\n{slot}\n[[flow]]\nop = 'read'\n")


def test_a_split_thp_slot_starts_with_small_ptes_for_khugepaged():
    """``thp = "split"``: every 2 MiB block populated as a THP, then split to PTEs, so the
    collapse flow finds every page present; ``thp = true`` faults in whole huge pages."""
    for thp, size in (('"split"', 4096), ("true", 2 * 1024 * 1024)):
        world = World(parse(f"[[slot]]\npages = 1024\nthp = {thp}\npopulate = true\n"
                            "[[flow]]\nop = 'collapse_huge_page'\npage = 512\n"),
                      FLAT, "default", {})
        hva = world.hvas[0]
        assert {world.host.lookup_pte(hva + i * 4096)[2] for i in range(1024)} == {size}
        flow = world.flows[0]
        if thp == "true":       # no small pages to collapse
            with pytest.raises(KvmError, match="not every page is present"):
                flow.run()
        else:
            new = flow.run()
            assert world.host.lookup_pte(hva + 512 * 4096) == (new, True, 2 * 1024 * 1024)


GMEM_MMAP = """
name = "gmem_mmap_fault_vs_punch"
[vm]
requires = ["gmem"]
[[slot]]
pages = 16
guest_memfd = "mmap"
[[access]]
op = "write"
page = 5
[[flow]]
op = "read"
page = 5
[[flow]]
op = "punch_hole"
page = 5
"""


def test_a_gmem_mmap_slot_is_a_shared_guest_memfd_mapped_by_its_own_mmap():
    """``guest_memfd = "mmap"``: GUEST_MEMFD_FLAG_MMAP | INIT_SHARED, the file's own mmap as
    the slot's userspace_addr; a fault on it racing a hole punch is clean in every
    interleaving, and the punched page reads as zeros."""
    scn = parse(GMEM_MMAP)
    world = World(scn, FLAT, "default", {})
    slot = world.vm.memslots()[0]
    assert world.gmems[0].flags == 0x3 and world.host.find_vma(world.hvas[0]).kind == "gmem"
    assert slot.userspace_addr == world.hvas[0]
    result = explore(scn, FLAT)
    assert result.exhausted and not result.failures
    # A read returns the setup's store (byte 0) and the bytes each flow could store.
    assert {s[0][0][1] for s in result.end_states} == {("ok", b"\x5a" * 8 + bytes(32)),
                                                       ("ok", bytes(40))}


def test_a_scenario_names_pages_so_it_means_the_same_at_every_page_size():
    """``page``/``pages`` are the VM's base pages: on arm64 with 64 KiB pages the fault and
    the munmap of fault_vs_munmap still race on one page (they did not when the scenario gave
    4 KiB byte addresses), and a slot reference must name a [[slot]]."""
    from kvmcore.explore.scenario import World

    scn = load("fault_vs_munmap")
    for arch, options in ((FLAT, {}), ("arm64_stage2", {"granule": 65536})):
        if not _available(arch):
            continue
        w = World(scn, arch, choose_vm_type(scn, arch), options)
        assert w.scn_flows[0]["gpa"] == 6 * w.vm.page_size
        slot = w.vm.leaf_memslot(6 * w.vm.page_size >> 12)
        assert w._hva(w.scn_flows[1]) == slot.gfn_to_hva(6 * w.vm.page_size >> 12)
    with pytest.raises(ValueError, match="flow 1: key 'slot': no \\[\\[slot\\]\\] 3"):
        parse("[[slot]]\n[[flow]]\nop = 'read'\nslot = 3\npage = 1\n")


def test_a_pre_fault_flow_maps_its_pages_or_fails_with_eagain_on_a_deleted_slot():
    """``op = "pre_fault"`` is KVM_PRE_FAULT_MEMORY on its vCPU over ``page`` and ``pages``,
    on a VM type with ``pre_fault``. Against a deletion it maps its pages first, or meets the
    INVALID slot after some (it returns the rest) or before any (EAGAIN, 3ccbf6f47098), or
    runs after the deletion (ENOENT)."""
    from kvmcore.explore.scenario import World

    scn = load("pre_fault_vs_slot_delete")
    assert scn.vm["requires"] == ["pre_fault"]
    if _available("arm64_stage2"):                # 6.18's arm64 has no KVM_PRE_FAULT_MEMORY
        assert not supports(scn, "arm64_stage2")
    w = World(scn, FLAT, choose_vm_type(scn, FLAT), {})
    assert (w.scn_flows[0]["gpa"], w.scn_flows[0]["size"]) == (0, 4 * w.vm.page_size)
    result = explore(scn, FLAT)
    assert result.exhausted and not result.failures
    page = w.vm.page_size
    outcomes = {s[0][0][1] for s in result.end_states}
    assert {("ok", (n * page, (4 - n) * page)) for n in (1, 2, 3, 4)} <= outcomes
    errors = {o[2].split("]")[0] for o in outcomes if o[0] == "raised"}
    assert errors == {"[EAGAIN", "[ENOENT"}, outcomes


def test_cli_finds_a_mutant_and_replays_it(tmp_path):
    cli = CliRunner()
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                          "no_stale_check", "--json"])
    assert r.exit_code == 1, r.output
    failure = json.loads(r.output)["failures"][0]
    trace = tmp_path / "t.jsonl"
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                          "no_stale_check", "--replay", failure["schedule"], "--trace",
                          str(trace)])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events and {"flow", "name"} <= set(events[0])
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT])
    assert r.exit_code == 0 and "(all)" in r.output


def test_cli_takes_the_arch_from_the_scenario(tmp_path):
    """[vm] arch is the backend unless --arch names another."""
    path = tmp_path / "s.toml"
    path.write_text(f"[vm]\narch = '{FLAT}'\n[[slot]]\n[[flow]]\nop = 'read'\npage = 1\n")
    r = CliRunner().invoke(main, ["explore", str(path)])
    assert r.exit_code == 0 and " on flat " in r.output, r.output


@pytest.mark.parametrize("args", [["nope.toml"], ["fault_vs_munmap", "--mutant", "nope"],
                                  ["fault_vs_munmap", "--replay", "Z9"],
                                  ["fault_vs_munmap", "--arch", "sparc64"]])
def test_cli_bad_input_is_one_line_and_exit_2(args):
    r = CliRunner().invoke(main, ["explore", *args, *(["--arch", FLAT] if "--arch" not in args
                                                       else [])])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.stderr.strip().startswith("kvmcore: error:")


def test_cli_lists_the_builtin_scenarios_and_says_which_show_a_race_of_linux():
    r = CliRunner().invoke(main, ["explore"])
    assert r.exit_code == 0 and "gmem_error_vs_dying_unbind (a race of Linux)" in r.output
    assert "fault_vs_munmap," in r.output


def test_cli_prints_the_race_of_linux_a_scenario_shows(tmp_path):
    r = CliRunner().invoke(main, ["explore", "gmem_error_vs_dying_unbind", "--arch", FLAT])
    assert r.exit_code == 1
    assert "\n  a race of Linux itself, as the scenario says: virt/kvm/guest_memfd.c:" \
        "kvm_gmem_unbind" in r.output
    r = CliRunner().invoke(main, ["explore", "gmem_error_vs_dying_unbind", "--arch", FLAT,
                                  "--json"])
    assert json.loads(r.output)["linux_race"].startswith("virt/kvm/guest_memfd.c")


def test_cli_replay_draws_the_schedule(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "race.png"
    r = CliRunner().invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                                  "no_stale_check", "--replay", "A2.B4.A1", "--picture",
                                  str(picture)])
    assert r.exit_code == 1 and "FAILED stale-access" in r.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mutant", sorted(APPLIES))
def test_pct_finds_each_mutant_too(mutant):
    """The randomized strategy finds what the exhaustive one does, within 1000 schedules."""
    arch = FLAT if FLAT in APPLIES[mutant] else APPLIES[mutant][0]
    if mutant not in MUTANTS or not _available(arch):
        pytest.skip(f"{arch}, whose mutant {mutant} is, is not installed")
    scn = load(MUTANTS[mutant].scenarios[0])
    result = explore(scn, arch, strategy="pct", seed=1, mutants=[mutant], max_schedules=1000)
    assert result.failures, f"pct missed {mutant} in {result.schedules} schedules"


# --------------------------------------------------------------------------- the oracles

UAF = """
name = "fault vs munmap of a written page"
[[slot]]
pages = 16
[[access]]
op = "write"
gpa = 0x6000
[[flow]]
op = "read"
gpa = 0x6000
[[flow]]
op = "munmap"
page = 6
"""


def test_a_tlb_entry_to_a_freed_frame_is_a_use_after_free():
    """Whatever locks are held: a frame the host freed is reachable by no TLB entry or leaf.
    (Without the zap's flush, the TLB check already fails in the host window, one step before
    munmap frees the page; this oracle is the backstop while other flows hold locks.)"""
    world, oracles = _world(UAF)
    world.flows[0].run()
    assert oracles.use_after_free() is None
    (_gfn, pfn, *_rest), = world.vcpus[0].tlb.values()
    world.host.freed.add(pfn)
    kind, message = oracles.use_after_free()
    assert kind == "use-after-free" and f"pfn {pfn:#x}" in message
    result = explore(parse(UAF), FLAT)
    result.assert_clean()
    assert result.exhausted


def test_the_host_records_the_frames_it_frees():
    from kvmcore.host import HostMemory

    host = HostMemory()
    host.freed = set()
    a = host.mmap(0x4000)
    host.write(a, b"x")                     # an anonymous page
    host.read(a + 0x1000, 1)                # the zero page
    old = host.lookup_pte(a)[0]
    new = host.migrate(a)
    assert old in host.freed and new not in host.freed
    host.munmap(a, 0x4000)
    assert new in host.freed and host.zero_pfn not in host.freed
    f = host.mmap(0x1000, kind="shared")
    host.write(f, b"y")
    host.munmap(f, 0x1000)                  # a file page stays in its backing
    assert len(host.freed) == 2


def _world(text: str):
    world = World(parse(text), FLAT, "default", {})
    return world, Oracles(world)


def test_a_leaf_taken_away_without_an_invalidation_is_a_downgrade():
    world, oracles = _world(UAF)
    flow = world.flows[0]
    flow.run()
    oracles.flow_ended(0, ("ok", flow.result))
    assert oracles.downgrade(0) is None
    vm = world.vm
    slot = vm.leaf_memslot(6)
    from kvmcore.records import GfnRange
    with vm.mmu_lock:               # a zap nobody counts: not kvm_unmap_gfn_range
        vm.hook.unmap_gfn_range(vm=vm, range=GfnRange(slot, 6, 7))
    kind, message = oracles.downgrade(0)
    assert kind == "downgrade" and "gpa 0x6000" in message and "gone" in message


def test_an_invalidation_begun_and_never_ended_is_an_invariant_failure():
    """What a memslot swap between a notifier's start and end leaves (the end found no
    memslot): mmu_invalidate_in_progress above the invalidations active. Within them, or
    while an attribute change holds slots_lock, it is not reported."""
    from kvmcore import InvariantError
    from kvmcore.invariants import check_vm

    world, _oracles = _world(UAF)
    vm = world.vm
    with vm.mmu_lock:
        vm.mmu_invalidate_begin()
        vm.mmu_invalidate_range_add(6, 7)
    with pytest.raises(InvariantError, match="in_progress is 1 but only 0 invalidations"):
        vm.check_invariants()
    vm.mn_active_invalidate_count += 1          # a notifier between its start and end
    vm.check_invariants()
    vm.mn_active_invalidate_count -= 1
    with vm.slots_lock:                         # an attribute change between its steps
        assert not [p for p in check_vm(vm) if "in_progress" in p]
    with vm.mmu_lock:
        vm.mmu_invalidate_end()
    vm.check_invariants()


def test_a_shared_leaf_on_a_private_gmem_page_is_a_private_leak():
    import attrs

    world = World(load("private_fault_vs_conversion"), FLAT, "sw_protected", {})
    oracles = Oracles(world)
    world.flows[0].run()                    # the private read maps the guest_memfd page
    assert oracles.use_after_free() is None
    vm, real = world.vm, world.vm.leaves
    vm.leaves = lambda **kw: [attrs.evolve(m, private=False) for m in real(**kw)]
    kind, message = oracles.use_after_free()
    assert kind == "private-leak" and "gfn 0x5" in message


def test_a_write_after_the_clear_must_be_reported():
    text = """
[vm]
manual_protect = true
[[slot]]
pages = 16
log_dirty = true
[[flow]]
op = "clear_dirty_log"
[[flow]]
op = "write"
gpa = 0x3000
vcpu = 0
"""
    from kvmcore.explore.search import Explorer

    ex = Explorer(parse(text), FLAT, "default")
    r = ex.run([])                    # the clear, then the write
    assert r.failure is None
    r.world.vm.leaf_memslot(3).dirty_bitmap.xchg(0)          # a lost log
    assert r.oracles.at_end(r)[0] == "dirty-log"


# --------------------------------------------------------------------------- scale

def _totals(result):
    return (result.schedules, result.steps, sorted(map(repr, result.end_states)),
            [f.id for f in result.failures], result.exhausted,
            None if result.windows is None else sorted(result.windows))


@pytest.mark.parametrize("strategy", ["dfs", "pct"])
def test_workers_give_the_single_process_totals(strategy):
    scn = load("fault_vs_munmap")
    kw = dict(strategy=strategy, max_schedules=200, stop_at_first=False, seed=3,
              coverage=True)
    one = explore(scn, FLAT, **kw)
    two = explore(scn, FLAT, workers=2, **kw)
    assert _totals(one) == _totals(two) and one.windows
    assert one.schedules == (19 if strategy == "dfs" else 200)
    found = explore(scn, FLAT, workers=2, mutants=["no_stale_check"])
    assert [f.id for f in found.failures] == \
        [f.id for f in explore(scn, FLAT, mutants=["no_stale_check"]).failures]
    if strategy == "dfs":                 # each worker keeps the bound
        bounded = explore(load("write_vs_log_dirty"), FLAT, preemption_bound=1, workers=2)
        assert bounded.schedules == 35 and bounded.exhausted


def test_dask_gives_the_single_process_totals():
    distributed = pytest.importorskip("distributed")
    scn = load("private_fault_vs_conversion")
    one = explore(scn, FLAT, stop_at_first=False, coverage=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = explore(scn, FLAT, stop_at_first=False, dask=client, coverage=True)
        found = explore(scn, FLAT, dask=client, mutants=["no_stale_check"])
    assert _totals(one) == _totals(on_dask) and one.exhausted
    assert found.failures and found.failures[0].id == \
        explore(scn, FLAT, mutants=["no_stale_check"]).failures[0].id


def test_coverage_reports_the_race_windows_the_search_opened():
    """``coverage``: each stretch of a flow that ran while another stood at a race point,
    for the schedules searched. A bound of N opens a subset of what N + 1 opens; here none
    without a preemption, and with one every window of the whole tree (35 schedules of
    105), among them the write run whole while the memslot update that turns logging on
    stands waiting for its SRCU readers; the CLI lists it."""
    scn = load("write_vs_log_dirty")
    assert explore(scn, FLAT).windows is None and "windows" not in explore(scn, FLAT).summary()
    whole = explore(scn, FLAT, coverage=True, reduce=False, preemption_bound=None)
    bounded = [explore(scn, FLAT, coverage=True, preemption_bound=n) for n in range(3)]
    assert all(a.windows <= b.windows <= whole.windows for a, b in itertools.pairwise(bounded))
    assert (bounded[0].windows, bounded[1].windows) == (set(), whole.windows)
    assert (bounded[1].schedules, whole.schedules, len(whole.windows)) == (35, 105, 24)
    w = Window("B", "slot_srcu_sync", "A", "start", "end")
    assert w in bounded[1].windows
    # A stretch that fails (a pre-fault's livelock: the flow stops there) runs to "end".
    failing = explore(load("pre_fault_vs_slot_delete"), FLAT, coverage=True,
                      mutants=["prefault_retries_invalid_slot"], stop_at_first=False)
    assert failing.failures[0].kind == "livelock" and failing.windows
    assert all(isinstance(field, str) for w in sorted(failing.windows) for field in
               (w.stands, w.at, w.runs, w.start, w.end))
    assert {"stands": "B", "at": "slot_srcu_sync", "runs": "A", "start": "start",
            "end": "end"} in bounded[1].summary()["windows"]
    r = CliRunner().invoke(main, ["explore", "write_vs_log_dirty", "--arch", FLAT,
                                  "--coverage", "--preemption-bound", "1"])
    assert r.exit_code == 0 and f"{len(bounded[1].windows)} race windows opened" in r.output
    assert "B (log_dirty) at slot_srcu_sync: A (write) start->end" in r.output


def test_the_reduction_keeps_every_end_state_with_fewer_schedules():
    """Sleep sets over the two faults that commute (different vCPUs, memslots 512 GiB apart,
    the MMU lock for read): the same end states and verdict as the full search."""
    scn = load(REDUCTION_EXAMPLE)
    full = explore(scn, FLAT, stop_at_first=False, reduce=False, max_schedules=20_000)
    reduced = explore(scn, FLAT, stop_at_first=False)
    assert full.exhausted and reduced.exhausted and full.clean and reduced.clean
    assert reduced.end_states == full.end_states
    assert reduced.pruned and reduced.schedules * 4 < full.schedules
    two = explore(scn, FLAT, stop_at_first=False, workers=2)
    assert _totals(two) == _totals(reduced) and two.pruned == reduced.pruned


def test_each_node_of_the_schedule_tree_is_checked_once(monkeypatch):
    """The depth-first search re-runs a schedule's prefix without checking it again (its
    states were checked by the run that first took it), and the end state of a schedule is
    the state after its last step, checked then: fewer checks, the same verdicts."""
    from kvmcore.explore import search

    scn = load("fault_vs_munmap")
    calls = []
    real = search.Explorer._check

    def counting(self, r, when, stepped=None, ended=False):
        calls.append((tuple(r.schedule), when == "end"))
        return real(self, r, when, stepped, ended)

    monkeypatch.setattr(search.Explorer, "_check", counting)
    clean = explore(scn, FLAT)
    assert len(calls) == len(set(calls)), "a state was checked twice"
    assert not any(end for _, end in calls), "an end state was checked after its last step"
    once = len(calls)
    calls.clear()
    real_run = search.Explorer.run
    monkeypatch.setattr(search.Explorer, "run",
                        lambda self, prefix, policy=None, reduce=False, checked=0:
                        real_run(self, prefix, policy, reduce, 0))
    again = explore(scn, FLAT)
    assert len(calls) > once
    assert (again.schedules, again.steps, again.end_states) == \
        (clean.schedules, clean.steps, clean.end_states)
    monkeypatch.undo()
    found = explore(scn, FLAT, mutants=["no_stale_check"], stop_at_first=False)
    monkeypatch.setattr(search.Explorer, "run",
                        lambda self, prefix, policy=None, reduce=False, checked=0:
                        real_run(self, prefix, policy, reduce, 0))
    everywhere = explore(scn, FLAT, mutants=["no_stale_check"], stop_at_first=False)
    assert [f.id for f in everywhere.failures] == [f.id for f in found.failures]


ZERO_PAGE_RACE = """
name = "read maps the zero page, write breaks COW"
[[slot]]
pages = 16
log_dirty = true
[[access]]
op = "read"
page = 6
[[flow]]
op = "write"
page = 5
vcpu = 0
[[flow]]
op = "read"
page = 5
vcpu = 1
"""


@pytest.mark.parametrize("arch", ["x86_tdp", "arm64_stage2", FLAT])
def test_a_write_breaking_cow_waits_for_a_paused_reader_of_the_mmu_lock(arch):
    """B's read maps the host's zero page; A's write breaks COW, whose notifier needs
    kvm->mmu_lock for write while B may be paused holding it for read. The COW break runs in
    A's own flow and waits there (it used to run nested and raise WouldBlock: a crash)."""
    if not _available(arch):
        pytest.skip(f"{arch} is not installed")
    result = explore(parse(ZERO_PAGE_RACE), arch)
    result.assert_clean()
    assert result.exhausted and result.schedules > 20


@pytest.mark.parametrize("name", ["write_vs_clear_dirty_log", "private_fault_vs_conversion"])
def test_the_end_state_is_read_from_the_state_after_the_run(name):
    """A schedule's end state comes from the leaves its last check enumerated, unless the
    dirty-log oracle's KVM_GET_DIRTY_LOG changed the tables since: either way, what a fresh
    enumeration of the VM after the run finds."""
    from kvmcore.explore.search import Explorer, _dfs
    from kvmcore.invariants import all_leaves

    scn = load(name)
    arch = "x86_tdp" if "x86_tdp" in installed_backends() else FLAT
    ex = Explorer(scn, arch, choose_vm_type(scn, arch), {})
    harvested = runs = 0
    for r in _dfs(ex, []):
        if r.pruned or r.failure is not None:
            continue
        runs += 1
        harvested += r.leaves is None
        fresh = [(m.gfn, m.size, m.pfn, m.writable, m.private)
                 for per_as in all_leaves(r.world.vm) for m in per_as]
        assert ex.end_state(r)[1] == tuple(fresh)
    assert runs and (0 < harvested < runs if name == "write_vs_clear_dirty_log"
                     else not harvested)


BIG_AGING = """
name = "big_aging"
[[slot]]
pages = 512
populate = true
[[access]]
op = "write"
page = 300
[[flow]]
op = "age"
page = 100
pages = 400
[[flow]]
op = "read"
page = 300
"""


def test_a_long_flow_is_work_not_a_livelock(monkeypatch):
    """Aging 400 pages stops at every page (the notifier's clear_flush_young per PTE): more
    than MAX_FLOW_STEPS stretches, as many as it takes alone, which is no livelock. A flow's
    budget is MAX_FLOW_STEPS + its stretches alone + the pages of its range; a flow that
    does not end alone within SOLO_CAP stretches counts none alone."""
    import kvmcore.explore.search as search

    result = explore(parse(BIG_AGING), FLAT, max_schedules=20)
    assert result.schedules == 20 and not result.failures
    alone = search.Explorer(parse(BIG_AGING), FLAT, "default").budgets()
    assert alone[0] > 200 + 400 + 400 and alone[1] < 200 + 1 + 20
    monkeypatch.setattr(search, "SOLO_CAP", 50)
    monkeypatch.setattr(search, "MAX_FLOW_STEPS", 10)
    assert search.Explorer(parse(BIG_AGING), FLAT, "default").budgets()[0] == 10 + 400
    monkeypatch.setattr(search.Explorer, "budgets", lambda self: [50, 50])
    result = explore(parse(BIG_AGING), FLAT, max_schedules=20)
    assert result.failures[0].kind == "livelock"
    assert "ran 50 stretches without ending" in result.failures[0].message


THP_AGING_VS_DONTNEED = """
name = "thp_aging_vs_dontneed"
[[slot]]
pages = 1024
thp = true
[[access]]
op = "write"
page = 0
[[flow]]
op = "age"
page = 0
pages = 1024
[[flow]]
op = "madvise_dontneed"
page = 115
"""


def test_an_aging_that_meets_a_thp_split_by_another_flow_is_no_livelock():
    """Alone, the aging meets the THP once; a DONTNEED of one of its pages first splits it,
    and the aging then stops at each of the 511 PTEs left: work another flow made, within
    the budget's page per page of the range (found by kvmcore swarm, seed 61)."""
    result = explore(parse(THP_AGING_VS_DONTNEED), FLAT, max_schedules=50)
    assert result.schedules == 50 and not result.failures, result.failures


RING_ONLY_BLOCK = """
name = "ring_only_block"
[vm]
dirty_ring = 65536
[[slot]]
pages = 1024
kind = "hugetlb_2m"
log_dirty = true
[[flow]]
op = "write"
page = 449
[[flow]]
op = "age"
page = 0
"""


@pytest.mark.parametrize("arch", ["arm64_stage2", "riscv_gstage", "x86_tdp"])
def test_a_ring_without_bitmap_reports_a_block_by_its_first_gfn(arch):
    """With a dirty ring and no bitmap, memslot_is_logging is false on arm64 and RISC-V: the
    write fault maps the 2M block and marks its first gfn for all of it; the dirty-log
    oracle accepts that, as the core invariant does (found by kvmcore swarm). x86 tests
    the slot's flag: it maps 4K and marks the gfn written."""
    if not _available(arch):
        pytest.skip(f"{arch} is not installed")
    result = explore(parse(RING_ONLY_BLOCK), arch)
    assert result.exhausted and not result.failures, result.failures[:1]
    world = World(parse(RING_ONLY_BLOCK), arch, "default", {})
    world.flows[0].run()
    ring = world.vcpus[0].harvest_dirty_ring()
    size = world.vm.lookup(449 << 12).size
    assert (size, ring) == ((4096, [(0, 449)]) if arch == "x86_tdp" else (2 << 20, [(0, 0)]))


ALIASED = """
name = "aliased_slots"
[[slot]]
pages = 16
[[slot]]
slot = 1
gpa = 0x100000000
pages = 16
alias = 0
[[access]]
op = "write"
page = 5
slot = 1
[[flow]]
op = "read"
page = 5
[[flow]]
op = "munmap"
page = 5
"""


def test_an_alias_slot_maps_the_host_pages_of_another_at_another_gpa():
    """``alias = 0``: two memslots over the same host pages; a munmap zaps both gfns (the
    notifier walks every slot the hva range intersects), in every interleaving with a read
    through the other slot."""
    scn = parse(ALIASED)
    world = World(scn, FLAT, "default", {})
    vm = world.vm
    assert world.hvas[0] == world.hvas[1]
    assert vm.lookup((1 << 32) + 5 * 4096).writable
    assert world.vcpus[0].read(5 * 4096, 8) == b"\x5a" * 8
    world.flows[1].run()
    assert vm.lookup(5 * 4096) is None and vm.lookup((1 << 32) + 5 * 4096) is None
    result = explore(scn, FLAT)
    assert result.exhausted and not result.failures
    with pytest.raises(ValueError, match="slot 2: key 'alias': 3 is not an earlier"):
        parse("[[slot]]\n[[slot]]\nslot = 1\nalias = 3\n[[flow]]\nop = 'read'\n")
    with pytest.raises(ValueError, match="an alias covers at most the 16 pages of slot 0"):
        parse("[[slot]]\n[[slot]]\nslot = 1\npages = 32\nalias = 0\n[[flow]]\nop = 'read'\n")


def test_a_fault_that_unmaps_the_rest_of_a_block_is_no_downgrade():
    """A 4K write fault under a block of a slot that logs now replaces the block (arm64's
    stage2_map_walk_leaf, the flat backend's map_leaf): the page another access read
    through it is gone until it refaults. The backend counts it as
    ``fault_block_unmapped``, which the downgrade oracle allows."""
    scn = load("block_read_vs_log_dirty_write")
    result = explore(scn, FLAT)
    assert result.exhausted and not result.failures, result.failures
    world = World(scn, FLAT, "default", {})
    for flow in world.flows:
        flow.run()
    assert world.vm.stats["fault_block_unmapped"] == 1
