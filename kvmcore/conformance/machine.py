"""The conformance state machine: random memory lives run on the backend under test and on
the flat reference backend (``kvmcore.testing.FlatBackend``) side by side.

Each step does the same operation on both VMs (each on its own ``HostMemory``): memslot
create / delete / move / flags, guest reads, writes and fetches (shared and, where the backend
has private memory, private), attribute conversions, guest_memfd hole punches, host munmap /
madvise / migrate / mprotect, dirty-log GET (and CLEAR with manual protect), aging. After every
step both VMs' invariants are checked. What every backend must agree on is compared:

- data read back, and each access's outcome: completed, or the exit (kind and fields), or the
  KvmError's errno, or the host signal;
- the errno (or success) of every ioctl-shaped call;
- dirty logs are checked against the guest's own history, since architectures differ on
  whether a read fault logs a page: every page written since the last harvest is reported,
  and nothing that was not touched is;
- aging's "young" answer, when both backends use 4 KiB base pages.

``make_machine(...)`` builds the machine class for one backend configuration;
``run(...)`` runs it with the current hypothesis profile.
"""

from __future__ import annotations

import errno
import sys

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvmcore import KvmError, VcpuExit
from kvmcore.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

NSLOTS = 4
# Sizes are in base pages (``unit``: the backend's PAGE_SIZE, 4 KiB to 64 KiB); gfns and dirty
# log offsets stay 4 KiB frames.
REGION = 0x10_0000          # slots live in regions [k * REGION, k * REGION + MAX_PAGES * unit)
NREGIONS = 6
MAX_PAGES = 16


def outcome(fn, *args, **kwargs):
    """("ok", value) or a comparable description of how the call failed."""
    try:
        return ("ok", fn(*args, **kwargs))
    except KvmError as e:
        return ("errno", e.errno)
    except VcpuExit as e:
        return ("exit", type(e).__name__, tuple(sorted(e.fields().items())))
    except Exception as e:  # noqa: BLE001 - host signals (SigSegv/SigBus) and the like
        if type(e).__module__.startswith("kvmcore"):
            return ("signal", type(e).__name__)
        raise


def _error_pfn_exit(b) -> bool:
    """The reference's KVM_EXIT_MEMORY_FAULT for an error pfn: shared (flags 0), EFAULT."""
    if b[0] != "exit" or b[1] != "MemoryFaultExit":
        return False
    fields = dict(b[2])
    return fields.get("flags") == 0 and fields.get("errno") == errno.EFAULT


class Side:
    """One VM (backend under test, or flat) with its own host, vCPU and slot backings."""

    def __init__(self, backend, vm_type: str, options: dict):
        from kvmcore import VM
        from kvmcore.vm import host_for

        self.host = host_for(backend, options)
        self.vm = VM(arch=backend, vm_type=vm_type, host=self.host, **options)
        self.vcpu = self.vm.create_vcpu(0)
        self.hva: dict[int, int] = {}     # slot id -> userspace_addr
        self.gmem: dict[int, object] = {}  # slot id -> guest_memfd


class ConformanceMachine(RuleBasedStateMachine):
    """Set by make_machine: BACKEND, VM_TYPE, OPTIONS, FLAT_VM_TYPE, CAPS (claimed by both),
    REFERENCE (the flat backend class or a stand-in), RECORD (a list the steps are logged to)."""

    BACKEND = None
    VM_TYPE = "default"
    OPTIONS: dict = {}
    REFERENCE = None
    FLAT_VM_TYPE = "default"
    CAPS: frozenset = frozenset()
    RECORD: list | None = None

    def __init__(self):
        super().__init__()
        self.t = Side(self.BACKEND, self.VM_TYPE, self.OPTIONS)
        self.unit = self.t.vm.page_size
        self.per = self.unit >> 12      # 4 KiB gfns per base page
        self.f = Side(self.REFERENCE, self.FLAT_VM_TYPE,
                      {"page_size": self.unit} if self.unit != 4096 else {})
        self.slots: dict[int, dict] = {}   # id -> {gpa, npages, flags}
        self.manual = False
        self.private = "private_mem" in self.CAPS and "gmem" in self.CAPS
        # Dirty-log history per slot id, in slot-relative 4 KiB pages.
        self.written: dict[int, set[int]] = {}
        self.touched: dict[int, set[int]] = {}
        self.base_t = min(self.t.vm.arch_info.page_sizes)
        self.base_f = min(self.f.vm.arch_info.page_sizes)
        if self.RECORD is not None:
            self.RECORD.clear()

    # ------------------------------------------------------------------ helpers

    def log(self, *step):
        if self.RECORD is not None:
            self.RECORD.append(step)

    def both(self, name, call, gpa: int | None = None):
        """Run ``call(side)`` on both sides and require the same outcome. A step the
        backend refuses with an errno it declares as a known divergence of the machine
        (``ArchInfo.known_divergences["state_machine:<step>:<ERRNO>"]``, e.g. RISC-V's EPERM
        for a writable slot over a VMA mprotect made read-only) changed nothing there, and
        is not run on the reference either."""
        a = outcome(call, self.t)
        if a[0] == "errno" and f"state_machine:{name}:{errno.errorcode.get(a[1])}" in (
                self.t.vm.arch_info.known_divergences):
            self.log(name, a, "known divergence")
            return a
        b = outcome(call, self.f)
        self.log(name, a)
        if a == ("errno", errno.EFAULT) and _error_pfn_exit(b) and \
                not self.t.vm.arch_info.error_pfn_memory_fault:
            return a        # the same error pfn, reported as KVM_RUN's -EFAULT alone
        if gpa is not None and a[:2] == ("exit", "MmioExit") and \
                b[:2] == ("exit", "MemoryFaultExit") and self.slot_of(gpa)[0] is None:
            # An MMIO entry the backend cached before the gfn turned private answers first
            # (x86: the EPT misconfiguration goes to handle_mmio_page_fault, before
            # kvm_mmu_faultin_pfn's private/shared check); the reference caches none.
            return a
        assert a == b, f"{name}: backend {a!r} != flat {b!r}"
        return a

    def slot_of(self, gpa: int):
        g = gpa >> 12
        for sid, s in self.slots.items():
            if s["gpa"] >> 12 <= g < (s["gpa"] >> 12) + s["npages"] * self.per:
                return sid, s
        return None, None

    def note_access(self, gpa: int, write: bool):
        sid, s = self.slot_of(gpa)
        if sid is None or not s["flags"] & KVM_MEM_LOG_DIRTY_PAGES:
            return
        rel = (gpa >> 12) - (s["gpa"] >> 12)
        self.touched.setdefault(sid, set()).add(rel)
        if write:
            self.written.setdefault(sid, set()).add(rel)

    def expand(self, pages: set[int], s: dict, base: int) -> set[int]:
        """Pages as a dirty log reports them with ``base``-byte base pages."""
        per = base >> 12
        out = set()
        first = s["gpa"] >> 12
        for p in pages:
            g = (first + p) & ~(per - 1)
            out.update(x - first for x in range(g, g + per)
                       if 0 <= x - first < s["npages"] * self.per)
        return out

    # ------------------------------------------------------------------ setup

    @initialize(manual=st.booleans(), npages=st.integers(1, MAX_PAGES),
                log=st.booleans(), gmem=st.booleans())
    def setup(self, manual, npages, log, gmem):
        if manual and "manual_dirty_protect" in self.CAPS:
            self.both("manual_protect", lambda side: side.vm.enable_dirty_log_manual_protect())
            self.manual = True
        # Two slots to start with, so that most accesses reach memory.
        self.create_slot(0, 0, MAX_PAGES, False, gmem)
        self.create_slot(1, 1, npages, log, False)

    # ------------------------------------------------------------------ memslots

    @rule(sid=st.integers(0, NSLOTS - 1), region=st.integers(0, NREGIONS - 1),
          npages=st.integers(1, MAX_PAGES), log=st.booleans(), gmem=st.booleans())
    def create_slot(self, sid, region, npages, log, gmem):
        gmem = gmem and self.private
        if gmem:
            log = False
        gpa = region * REGION
        flags = (KVM_MEM_LOG_DIRTY_PAGES if log and "dirty_log" in self.CAPS else 0) | (
            KVM_MEM_GUEST_MEMFD if gmem else 0)

        def call(side):
            hva = side.host.mmap(npages * self.unit)
            g = side.vm.create_guest_memfd(npages * self.unit) if gmem else None
            side.vm.set_user_memory_region(sid, gpa, npages * self.unit, hva, flags, guest_memfd=g)
            side.hva[sid] = hva
            if g is not None:
                side.gmem[sid] = g

        if self.both("create_slot", call)[0] == "ok" and sid not in self.slots:
            self.slots[sid] = {"gpa": gpa, "npages": npages, "flags": flags}
            self.written.pop(sid, None)
            self.touched.pop(sid, None)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), go=st.integers(0, 3))
    def delete_slot(self, data, go):
        if go:  # destructive steps are rarer, so that slots live long enough to be used
            return
        sid = data.draw(st.sampled_from(sorted(self.slots)))
        self.both("delete_slot", lambda side: side.vm.set_user_memory_region(sid, 0, 0, 0))
        del self.slots[sid]

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), region=st.integers(0, NREGIONS - 1), shift=st.integers(0, 3))
    def move_slot(self, data, region, shift):
        sid = data.draw(st.sampled_from(sorted(self.slots)))
        s = self.slots[sid]
        gpa = region * REGION + shift * self.unit
        r = self.both("move_slot", lambda side: side.vm.set_user_memory_region(
            sid, gpa, s["npages"] * self.unit, side.hva[sid], s["flags"],
            guest_memfd=side.gmem.get(sid)))
        if r[0] == "ok":
            s["gpa"] = gpa

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def toggle_logging(self, data):
        sid = data.draw(st.sampled_from(sorted(self.slots)))
        s = self.slots[sid]
        if s["flags"] & KVM_MEM_GUEST_MEMFD or "dirty_log" not in self.CAPS:
            return
        flags = s["flags"] ^ KVM_MEM_LOG_DIRTY_PAGES
        r = self.both("toggle_logging", lambda side: side.vm.set_user_memory_region(
            sid, s["gpa"], s["npages"] * self.unit, side.hva[sid], flags))
        if r[0] == "ok":
            s["flags"] = flags
            self.written.pop(sid, None)
            self.touched.pop(sid, None)

    # ------------------------------------------------------------------ guest accesses

    def pick_gpa(self, data, in_slot: bool) -> int:
        if in_slot and self.slots:  # 0: anywhere (MMIO holes too), else inside a slot
            s = self.slots[data.draw(st.sampled_from(sorted(self.slots)))]
            page = data.draw(st.integers(0, s["npages"] - 1))
            return s["gpa"] + page * self.unit + data.draw(
                st.sampled_from([0, 8, self.unit - 8]))
        region = data.draw(st.integers(0, NREGIONS - 1))
        return region * REGION + data.draw(st.integers(0, MAX_PAGES + 3)) * self.unit

    def intent(self, gpa: int) -> bool:
        """The access's private intent: the gfn's current attribute. VM types differ on an
        intent that contradicts the attribute (SNP/TDX take it from the access and exit, a
        software-protected VM — and the flat reference — from the attribute), so the machine
        never mixes them; the mismatch exits have their own tests (test_private, test_races).
        """
        return self.private and bool(self.f.vm.get_memory_attributes(gpa >> 12)
                                     & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    @rule(data=st.data(), in_slot=st.integers(0, 3))
    def guest_read(self, data, in_slot):
        gpa = self.pick_gpa(data, in_slot)
        private = self.intent(gpa)
        r = self.both("read", lambda side: side.vcpu.read(gpa, 8, private=private), gpa)
        if r[0] == "ok":
            self.note_access(gpa, False)

    @rule(data=st.data(), in_slot=st.integers(0, 3), value=st.integers(1, 255))
    def guest_write(self, data, in_slot, value):
        gpa = self.pick_gpa(data, in_slot)
        private = self.intent(gpa)
        r = self.both("write", lambda side: side.vcpu.write(gpa, bytes([value]) * 8,
                                                            private=private), gpa)
        if r[0] == "ok":
            self.note_access(gpa, True)

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def guest_fetch(self, data):
        # Only inside slots: a fetch from no memslot is arch-specific (arm64 injects an abort).
        gpa = self.pick_gpa(data, True) & ~7
        private = self.intent(gpa)
        r = self.both("fetch", lambda side: side.vcpu.fetch(gpa, private=private))
        if r[0] == "ok":
            self.note_access(gpa, False)

    # ------------------------------------------------------------------ private memory

    @precondition(lambda self: self.private)
    @rule(region=st.integers(0, 2), first=st.integers(0, MAX_PAGES - 1),
          npages=st.integers(1, 4), to_private=st.booleans())
    def convert(self, region, first, npages, to_private):
        gpa = region * REGION + first * self.unit
        attrs = KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0
        self.both("convert", lambda side: side.vm.set_memory_attributes(gpa, npages * self.unit,
                                                                        attrs))

    @precondition(lambda self: any(s["flags"] & KVM_MEM_GUEST_MEMFD
                                   for s in self.slots.values()))
    @rule(data=st.data())
    def punch_hole(self, data):
        sid = data.draw(st.sampled_from(sorted(
            i for i, s in self.slots.items() if s["flags"] & KVM_MEM_GUEST_MEMFD)))
        n = self.slots[sid]["npages"]
        first = data.draw(st.integers(0, n - 1))
        count = data.draw(st.integers(1, n - first))
        self.both("punch_hole", lambda side: side.gmem[sid].fallocate(
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, first * self.unit, count * self.unit))

    # ------------------------------------------------------------------ host mm

    def pick_hva_range(self, data):
        sid = data.draw(st.sampled_from(sorted(self.slots)))
        n = self.slots[sid]["npages"]
        first = data.draw(st.integers(0, n - 1))
        count = data.draw(st.integers(1, n - first))
        return sid, first, count

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), go=st.integers(0, 2))
    def host_munmap(self, data, go):
        if go:
            return
        sid, first, count = self.pick_hva_range(data)
        self.both("munmap", lambda side: side.host.munmap(side.hva[sid] + first * self.unit,
                                                          count * self.unit))

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def host_madvise(self, data):
        sid, first, count = self.pick_hva_range(data)
        self.both("madvise", lambda side: side.host.madvise_dontneed(
            side.hva[sid] + first * self.unit, count * self.unit))

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), prot=st.sampled_from(["", "r", "rw"]))
    def host_mprotect(self, data, prot):
        sid, first, count = self.pick_hva_range(data)
        self.both("mprotect", lambda side: side.host.mprotect(
            side.hva[sid] + first * self.unit, count * self.unit, prot))

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def host_migrate(self, data):
        sid, first, _ = self.pick_hva_range(data)
        # The new pfn is host-internal; compare only whether the migration happened.
        self.both("migrate", lambda side: side.host.migrate(side.hva[sid] + first * self.unit)
                  and None)

    @precondition(lambda self: self.slots and "aging" in self.CAPS)
    @rule(data=st.data())
    def host_age(self, data):
        """Aging is checked on each side against its own leaves: which leaves exist is
        arch-specific (x86 zaps every leaf on a slot delete, ppc flushes a slot when logging
        toggles), so "young" is not compared between backends."""
        sid, first, count = self.pick_hva_range(data)
        s = self.slots[sid]
        lo = (s["gpa"] >> 12) + first * self.per
        hi = lo + count * self.per
        for side, who in ((self.t, "backend"), (self.f, "flat")):
            leaves = [m for m in side.vm.mappings()
                      if m.gfn < hi and m.gfn + (m.size >> 12) > lo]
            shared_young = any(m.young for m in leaves if not m.private)
            any_young = any(m.young for m in leaves)
            r = outcome(side.host.age, side.hva[sid] + first * self.unit, count * self.unit)
            self.log("age", who, r)
            assert r[0] == "ok", f"age on {who}: {r!r}"
            assert r[1] in ((True,) if shared_young else (True, False) if any_young
                            else (False,)), f"age on {who} returned {r[1]} for leaves {leaves}"
            after = [m for m in side.vm.mappings() if m.gfn < hi and m.gfn + (m.size >> 12) > lo
                     and not m.private and m.young]
            assert after == [], f"{who}: leaves still young after aging: {after}"

    # ------------------------------------------------------------------ dirty logging

    def logging_slots(self):
        return sorted(i for i, s in self.slots.items() if s["flags"] & KVM_MEM_LOG_DIRTY_PAGES)

    @precondition(lambda self: self.logging_slots())
    @rule(data=st.data())
    def get_dirty_log(self, data):
        sid = data.draw(st.sampled_from(self.logging_slots()))
        s = self.slots[sid]
        a, b = outcome(self.t.vm.get_dirty_log, sid), outcome(self.f.vm.get_dirty_log, sid)
        self.log("get_dirty_log", a)
        assert a[0] == b[0] == "ok", f"get_dirty_log: backend {a!r}, flat {b!r}"
        for (_, pages), base, who in ((a, self.base_t, "backend"), (b, self.base_f, "flat")):
            pages = set(pages)
            must = self.expand(self.written.get(sid, set()), s, base)
            may = self.expand(self.touched.get(sid, set()), s, base)
            assert must <= pages, f"{who} dirty log misses written pages {sorted(must - pages)}"
            assert pages <= may, f"{who} dirty log reports untouched pages {sorted(pages - may)}"
        if not self.manual:
            self.written.pop(sid, None)
            self.touched.pop(sid, None)

    @precondition(lambda self: self.manual and self.logging_slots())
    @rule(data=st.data())
    def clear_dirty_log(self, data):
        sid = data.draw(st.sampled_from(self.logging_slots()))
        n = self.slots[sid]["npages"] * self.per
        # Clear everything each side reports (its own view), then both must report nothing
        # written since.
        for side in (self.t, self.f):
            pages = side.vm.get_dirty_log(sid)
            side.vm.clear_dirty_log(sid, 0, n, pages)
        self.log("clear_dirty_log", sid)
        self.written.pop(sid, None)
        self.touched.pop(sid, None)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def invariants_hold(self):
        self.t.vm.check_invariants()
        self.f.vm.check_invariants()


def flat_vm_type(private: bool) -> str:
    from kvmcore.testing import FlatBackend

    types = FlatBackend.arch_info.vm_types
    if private:
        for t, caps in types.items():
            if {"private_mem", "gmem"} <= caps:
                return t
    return "default"


def make_machine(backend, vm_type: str, options: dict, caps: frozenset,
                 reference=None, record: list | None = None):
    """The machine class for one backend configuration. ``caps`` are the VM type's
    capabilities; only those the flat VM type claims too are exercised."""
    from kvmcore.testing import FlatBackend

    reference = reference or FlatBackend
    private = {"private_mem", "gmem"} <= caps
    ftype = flat_vm_type(private)
    fcaps = FlatBackend.arch_info.vm_types[ftype]
    return type("ConformanceMachine_" + getattr(backend, "__name__", str(backend)),
                (ConformanceMachine,),
                {"BACKEND": backend, "VM_TYPE": vm_type, "OPTIONS": dict(options),
                 "REFERENCE": reference, "FLAT_VM_TYPE": ftype,
                 "CAPS": frozenset(caps) & frozenset(fcaps), "RECORD": record})


def run(machine_cls, **overrides) -> None:
    """Run ``machine_cls`` with the current hypothesis profile (``ci`` or ``long``)."""
    run_state_machine_as_test(machine_cls, settings=settings(settings.default, **overrides))


def called_from(name: str) -> bool:
    """Whether a frame named ``name`` is on the stack (used by the planted-bug self-test)."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == name:
            return True
        f = f.f_back
    return False
