"""Random guest and host activity on 4K, 16K and 64K granules, checked against a plain model of
memory contents, with the invariants (core and arm64) after every step, each on a host whose
PAGE_SIZE is the granule (host operations act on whole base pages)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvmcore import VM, HostMemory
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import check

GPA = 0x4000_0000
NPAGES_4K = 32
SIZE = NPAGES_4K * 4096


def make_machine(granule: int):
    class Stage2Machine(RuleBasedStateMachine):
        @initialize(thp=st.booleans(), log=st.booleans(), dic=st.booleans())
        def setup(self, thp, log, dic):
            self.host = HostMemory(page_size=granule)
            self.vm = VM(arch="arm64_stage2", host=self.host, granule=granule, cache_dic=dic)
            self.hva = self.host.mmap(SIZE, thp=thp)
            self.flags = KVM_MEM_LOG_DIRTY_PAGES if log else 0
            self.vm.set_user_memory_region(0, GPA, SIZE, self.hva, self.flags)
            self.vcpus = [self.vm.create_vcpu(0), self.vm.create_vcpu(1)]
            self.mem = {}
            self.written = set()

        @rule(page=st.integers(0, NPAGES_4K - 1), cpu=st.integers(0, 1),
              val=st.integers(1, 255))
        def guest_write(self, page, cpu, val):
            self.vcpus[cpu].write(GPA + page * 4096, bytes([val]))
            self.mem[page] = val
            self.written.add(page)

        @rule(page=st.integers(0, NPAGES_4K - 1), cpu=st.integers(0, 1))
        def guest_read(self, page, cpu):
            assert self.vcpus[cpu].read(GPA + page * 4096, 1) == bytes([self.mem.get(page, 0)])

        @rule(page=st.integers(0, NPAGES_4K - 1))
        def guest_fetch(self, page):
            self.vcpus[0].fetch(GPA + page * 4096, n=1)
            assert self.vm.lookup(GPA + page * 4096).executable

        @rule(page=st.integers(0, NPAGES_4K - 1), val=st.integers(1, 255))
        def host_write(self, page, val):
            self.host.write(self.hva + page * 4096, bytes([val]))
            self.mem[page] = val

        @rule(page=st.integers(0, NPAGES_4K - 1))
        def host_read(self, page):
            assert self.host.read(self.hva + page * 4096, 1) == bytes([self.mem.get(page, 0)])

        @rule(base=st.integers(0, SIZE // granule - 1))
        def host_dontneed(self, base):
            self.host.madvise_dontneed(self.hva + base * granule, granule)
            for p in range(base * granule // 4096, (base + 1) * granule // 4096):
                self.mem.pop(p, None)

        @rule()
        def host_age(self):
            self.host.age(self.hva, SIZE)

        @rule()
        def get_dirty_log(self):
            if not self.flags:
                return
            got = set(self.vm.get_dirty_log(0))
            n = granule // 4096
            want = {q for p in self.written for q in range(p - p % n, p - p % n + n)}
            assert got == want
            self.written = set()

        @rule(log=st.booleans())
        def toggle_logging(self, log):
            flags = KVM_MEM_LOG_DIRTY_PAGES if log else 0
            self.vm.set_user_memory_region(0, GPA, SIZE, self.hva, flags)
            if flags != self.flags:          # a new bitmap starts empty; the same one stays
                self.written = set()
            self.flags = flags

        @invariant()
        def invariants_hold(self):
            if hasattr(self, "vm"):
                check(self.vm)

    return Stage2Machine


@pytest.mark.parametrize("granule", [4096, 16384, 65536])
def test_random_activity(granule):
    machine = make_machine(granule)
    machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                         derandomize=True, deadline=None, database=None,
                                         suppress_health_check=[HealthCheck.too_slow])
    machine.TestCase().runTest()
