"""Every flow paused at each of its race points while another vCPU accesses the affected page
(reference/races.md; the steppable flows of ``obj.steps``).

For each flow the test first runs it once to learn its race points on this backend. Then, for
every point, on a fresh guest: the flow is stepped to that point, vCPU 1 starts an access of
the page the flow concerns and runs until it ends or cannot run; the outcome must be one Linux
allows there:

- the access completes as it would before the flow, or as it would after it (the old
  mapping, or the new state), or ends with the exit it would get before or after;
- or it cannot run: it waits for what the paused flow holds (kvm->mmu_lock) or for the
  invalidation of its gfn to end (a vCPU that faults again and again until then), and it
  runs to one of those outcomes once the flow has finished;
- and whatever the interleaving, the model's invariants hold at the pause and at the end,
  and nothing maps the page while an invalidation of it is in progress.
"""

from __future__ import annotations

import contextlib

import pytest

from kvmcore import KvmError, VcpuExit
from kvmcore.locks import WouldBlock
from kvmcore.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

from kvmcore.conformance.helpers import Guest, pattern

GPA = 0x4000_0000
SLOT_PAGES = 16
#: The page of the slot every flow concerns.
TARGET = 5
#: Steps an access may take at a pause before the test says it neither ends nor waits.
MAX_STEPS = 200


def _outcome(flow):
    """Run ``flow`` until it ends or cannot run: ("blocked", point, what it waits for) or how
    it ended."""
    for _ in range(MAX_STEPS):
        if flow.done:
            return ("ok", flow.result)
        if not flow.runnable:
            return ("blocked", flow.point, flow.waits_for)
        try:
            next(flow)
        except StopIteration as stop:
            return ("ok", stop.value)
        except VcpuExit as e:
            return ("exit", type(e).__name__, tuple(sorted(e.fields().items())))
        except KvmError as e:
            return ("errno", e.errno)
    raise AssertionError(f"{flow} neither ended nor waited in {MAX_STEPS} steps")


def _finish(flow):
    if flow.done:
        return None
    try:
        flow.run()
    except (VcpuExit, KvmError):
        pass
    return None


class Setup:
    """A fresh guest of the backend under test with one 16-page slot at GPA (dirty-logged,
    with manual protect, or guest_memfd-backed as the flow needs), two vCPUs, and the target
    page written by vCPU 0 (so a leaf maps it; read instead for ``zero``: a leaf maps the
    host's zero page; for ``fresh`` the host wrote the page and no leaf maps it yet, so vCPU 0's
    own fault is the flow)."""

    def __init__(self, make_vm, arch, kind: str):
        from kvmcore.vm import host_for

        self.host = host_for(arch.config.backend, dict(arch.config.options))
        self.vm = make_vm(host=self.host)
        g = self.guest = Guest(self.vm, self.host, arch)
        self.page = page = self.vm.page_size
        self.gpa = GPA + TARGET * page
        size = SLOT_PAGES * page
        self.private = kind == "private"
        if kind == "private":
            self.gmem, self.hva = g.gmem_slot(0, GPA, size)
            g.make_private(GPA, size)
        else:
            if kind == "manual":
                self.vm.enable_dirty_log_manual_protect()
            logged = kind in ("logged", "manual", "fresh")
            self.hva = g.slot(0, GPA, size, KVM_MEM_LOG_DIRTY_PAGES if logged else 0)
        self.v0 = self.vm.create_vcpu(0)
        self.v1 = self.vm.create_vcpu(1)
        if kind == "zero":
            self.v0.read(self.gpa, 8, private=False)   # the shared zero page, read-only
        elif kind == "fresh":
            self.host.write(self.hva + TARGET * page, pattern(7))
            # The neighbour's fault builds the tables, so the two faults race on one leaf.
            self.v0.read(self.gpa + page, 8, private=False)
        else:
            self.v0.write(self.gpa, pattern(7), private=self.private)

    def access(self, kind: str):
        """vCPU 1's access of the target page, as a flow."""
        if kind == "write":
            return self.v1.step_access("write", self.gpa, pattern(9), private=self.private)
        return self.v1.step_access("read", self.gpa, 8, private=self.private)


def _munmap(s):
    return s.host.steps.munmap(s.hva + TARGET * s.page, s.page)


def _mprotect(s):
    return s.host.steps.mprotect(s.hva + TARGET * s.page, s.page, "r")


def _dontneed(s):
    return s.host.steps.madvise_dontneed(s.hva + TARGET * s.page, s.page)


def _migrate(s):
    return s.host.steps.migrate(s.hva + TARGET * s.page)


def _host_write(s):
    return s.host.steps.write(s.hva + TARGET * s.page, b"HOSTDATA")


def _age(s):
    return s.host.steps.age(s.hva, SLOT_PAGES * s.page)


def _delete(s):
    return s.vm.steps.set_user_memory_region(0, GPA, 0, s.hva)


def _move(s):
    return s.vm.steps.set_user_memory_region(0, GPA + (64 << 20), SLOT_PAGES * s.page, s.hva)


def _log_dirty(s):
    return s.vm.steps.set_user_memory_region(0, GPA, SLOT_PAGES * s.page, s.hva,
                                             KVM_MEM_LOG_DIRTY_PAGES)


def _get_dirty_log(s):
    return s.vm.steps.get_dirty_log(0)


def _clear_dirty_log(s):
    npages = SLOT_PAGES * s.page >> 12
    return s.vm.steps.clear_dirty_log(0, 0, npages, range(npages))


def _fault_read(s):
    return s.v0.steps.read(s.gpa, 8, private=False)


def _fault_write(s):
    return s.v0.steps.write(s.gpa, pattern(3), private=False)


def _to_shared(s):
    return s.vm.steps.set_memory_attributes(s.gpa, s.page, 0)


def _to_private(s):
    return s.vm.steps.set_memory_attributes(s.gpa, s.page, KVM_MEMORY_ATTRIBUTE_PRIVATE)


def _punch(s):
    return s.gmem.steps.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                  TARGET * s.page, s.page)


#: name -> (start the flow, slot kind, vCPU 1's access, capabilities it needs)
FLOWS = {
    "munmap": (_munmap, "anon", "read", ()),
    "mprotect": (_mprotect, "anon", "write", ()),
    "madvise_dontneed": (_dontneed, "anon", "read", ()),
    "migrate": (_migrate, "anon", "read", ()),
    "host_write_cow": (_host_write, "zero", "read", ()),
    "age": (_age, "anon", "read", ("aging",)),
    "memslot_delete": (_delete, "anon", "read", ()),
    "memslot_move": (_move, "anon", "read", ()),
    "memslot_log_dirty": (_log_dirty, "anon", "write", ("dirty_log",)),
    "get_dirty_log": (_get_dirty_log, "logged", "write", ("dirty_log",)),
    "clear_dirty_log": (_clear_dirty_log, "manual", "write",
                        ("dirty_log", "manual_dirty_protect")),
    # Two vCPUs' faults on one leaf of a dirty-logged slot (seed 5): vCPU 0's fault paused at
    # each of its points, its own install's compare-and-exchange ones included.
    "fault_read": (_fault_read, "fresh", "write", ("dirty_log",)),
    "fault_write": (_fault_write, "fresh", "read", ("dirty_log",)),
    "convert_to_shared": (_to_shared, "private", "read", ("private_mem", "gmem")),
    "convert_to_private": (_to_private, "anon", "read", ("private_mem",)),
    "punch_hole": (_punch, "private", "read", ("private_mem", "gmem")),
}


def _points(make_vm, arch, name):
    start, kind, _access, _caps = FLOWS[name]
    s = Setup(make_vm, arch, kind)
    flow = start(s)
    points = []
    for point in flow:
        points.append(point)
    return points


def _reference(make_vm, arch, name, after: bool):
    """vCPU 1's access on a fresh guest with the flow not run, or run to its end."""
    start, kind, access, _caps = FLOWS[name]
    s = Setup(make_vm, arch, kind)
    if after:
        start(s).run()
    return _outcome(s.access(access))


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_an_access_at_every_race_point_sees_the_old_or_the_new_state(make_vm, arch, name):
    start, kind, access, caps = FLOWS[name]
    missing = [c for c in caps if not arch.has(c)]
    if kind == "anon" and name == "convert_to_private" and arch.vm_type == "default":
        missing.append("private_mem")
    if missing:
        pytest.skip(f"{arch.id} ({arch.vm_type}) does not claim {missing}")
    if kind == "private" and not arch.has("private_mem"):
        pytest.skip(f"{arch.id} has no private memory")
    before = _reference(make_vm, arch, name, after=False)
    after = _reference(make_vm, arch, name, after=True)
    allowed = {before, after}
    points = _points(make_vm, arch, name)
    assert points, f"{name} has no race point on {arch.id}"
    for i, point in enumerate(points):
        s = Setup(make_vm, arch, kind)
        flow = start(s)
        for _ in range(i + 1):
            assert next(flow) is not None
        assert flow.point == point
        s.vm.check_invariants()
        acc = s.access(access)
        seen = _outcome(acc)
        where = f"{name} paused at {point} (step {i})"
        if seen[0] == "blocked":
            assert s.vm.lookup(s.gpa, private=s.private) is None or not \
                s.vm.mmu_invalidate_in_progress, where
            assert flow.runnable, f"{where}: deadlock, {acc} waits for {seen[2]}"
            flow.run()
            seen = _outcome(acc)
            assert seen[0] != "blocked", f"{where}: the access still waits after the flow"
            assert seen in allowed, f"{where}: after waiting, {seen} is neither {allowed}"
        else:
            assert seen in allowed, f"{where}: vCPU 1 saw {seen}, not one of {allowed}"
            _finish(flow)
        s.vm.check_invariants()


def test_a_paused_zap_holding_mmu_lock_for_write_makes_a_fault_not_runnable(guest, host):
    """An MMU-notifier invalidation (munmap; or reclaim's clear_flush_young where the backend
    flushes inside its zap) paused before its TLB flush holds kvm->mmu_lock for write
    (kvm_flush_remote_tlbs under the lock waits for the vCPUs): a fault that needs the lock
    cannot run until the invalidation moves on."""
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, SLOT_PAGES * page)
    v0, v1 = guest.vm.create_vcpu(0), guest.vm.create_vcpu(1)
    for i in range(12):
        v0.write(GPA + i * page, b"mapped", private=False)
    for inval in (host.steps.munmap(hva + 8 * page, page), host.steps.age(hva, 4 * page)):
        for point in inval:
            if point == "mn_start_flush":
                break
        if inval.point == "mn_start_flush":
            break
    else:
        pytest.skip("this backend's zaps and aging need no flush under the lock")
    assert inval.holds[-1] in ("mmu_lock(write)", "mmu_lock")   # after kvm->srcu
    fault = v1.step_access("read", GPA + 14 * page, 4, private=False)   # unmapped: it faults
    while fault.runnable:
        next(fault)
    assert fault.point.endswith("lock_wait") and fault.waits_for.startswith("mmu_lock")
    with pytest.raises(WouldBlock):
        next(fault)
    with contextlib.suppress(StopIteration):
        next(inval)                               # the flush, then the lock is dropped
    assert fault.runnable
    assert fault.run() == bytes(4)
