"""Hypothesis: the memslot index against a naive list, and the invariant checker against
backends with planted bugs."""

import pytest
from conftest import MiB
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcore import VM, HostMemory, InvariantError, hookimpl
from kvmcore.memslots import Memslot, MemslotSet
from kvmcore.testing import FlatBackend
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

slot_st = st.tuples(st.integers(0, 40), st.integers(0, 200), st.integers(1, 30),
                    st.integers(0, 200))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), slot_st), max_size=40),
       st.lists(st.integers(0, 260), max_size=30),
       st.lists(st.tuples(st.integers(0, 260 * 4096), st.integers(1, 40 * 4096)), max_size=15))
def test_memslot_index_matches_naive(ops, gfns, hva_ranges):
    index, naive = MemslotSet(0), {}
    for insert, (sid, base, npages, uaddr_page) in ops:
        if insert and sid not in naive and not any(
                s.base_gfn < base + npages and base < s.end_gfn for s in naive.values()):
            slot = Memslot(0, sid, base, npages, 0, uaddr_page * 4096)
            index.insert(slot)
            naive[sid] = slot
        elif not insert and sid in naive:
            index.remove(naive.pop(sid))
    for gfn in gfns:
        expect = [s for s in naive.values() if s.contains(gfn)]
        assert index.search(gfn) is (expect[0] if expect else None)
    for start, length in hva_ranges:
        expect = sorted((s for s in naive.values()
                         if s.userspace_addr < start + length
                         and start < s.userspace_addr + s.npages * 4096),
                        key=lambda s: (s.userspace_addr, s.id))
        got = index.in_hva_range(start, start + length)
        assert sorted(got, key=lambda s: (s.userspace_addr, s.id)) == expect
    assert [s.base_gfn for s in index] == sorted(s.base_gfn for s in naive.values())


class ForgetsToZap(FlatBackend):
    @hookimpl
    def unmap_gfn_range(self, vm, range):
        return False


class ForgetsToLog(FlatBackend):
    @hookimpl
    def relax_perms(self, vm, fault):
        leaf = self._find(self.roots[0], fault.gfn)
        if leaf is None or leaf.size != fault.fault_size or not fault.map_writable:
            return None
        leaf.writable = True
        from kvmcore.uapi import RET_PF_FIXED
        return RET_PF_FIXED


def test_invariants_catch_a_missed_zap():
    host = HostMemory()
    vm = VM(arch=ForgetsToZap, host=host)
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    vm.create_vcpu(0).write(0, b"x")
    host.munmap(hva, MiB)
    with pytest.raises(InvariantError, match="the host has no page"):
        vm.check_invariants()


def test_invariants_catch_a_missed_dirty_log():
    host = HostMemory()
    vm = VM(arch=ForgetsToLog, host=host)
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.read(0, 1)        # maps read-only while logging
    host.write(hva, b"y")  # not the zero page any more: re-fault
    vcpu.read(0, 1)
    vcpu.write(0, b"x")    # permission fault: relaxed, but never logged
    with pytest.raises(InvariantError, match="neither logged nor pending"):
        vm.check_invariants()


def test_invariants_catch_a_stale_tlb_free_pfn_change():
    host = HostMemory()
    vm = VM(arch=ForgetsToZap, host=host)
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(0, b"old")
    host.migrate(hva)
    with pytest.raises(InvariantError, match="missed invalidation"):
        vm.check_invariants()


def test_invariants_check_every_address_space():
    """A leaf of address space 1 (x86 SMM) that no memslot of that space backs is reported:
    the leaf checks once looked at address space 0 only."""
    pytest.importorskip("kvmcore_x86_tdp")
    host = HostMemory()
    vm = VM(arch="x86_tdp", host=host)
    vm.set_user_memory_region(1 << 16, 0, MiB, host.mmap(MiB))
    vcpu = vm.create_vcpu(0)
    vcpu.set_vcpu_events(smm=True)
    vcpu.write(0, b"x")
    vm.check_invariants()
    smm_slots = vm.memslot_sets[1]
    smm_slots.remove(smm_slots.search(0))   # planted: the slot goes, its leaf stays
    with pytest.raises(InvariantError, match="no live memslot maps it"):
        vm.check_invariants()
