"""Fixtures: VMs of this backend through kvmcore's public API."""

from __future__ import annotations

import pytest
from kvmcore import VM, HostMemory
from kvmcore.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE

from kvmcore_x86_tdp import X86TdpBackend

PAGE = 4096
SZ_2M = 2 << 20
SZ_1G = 1 << 30
TDX_SHARED = 1 << 47


class G:
    """A VM, its host and vCPU 0, with slot helpers."""

    def __init__(self, vm_type="default", **options):
        self.host = HostMemory()
        self.vm = VM(arch=X86TdpBackend, vm_type=vm_type, host=self.host, trace=True,
                     **options)
        self.vcpu = self.vm.create_vcpu(0)
        self.b = self.vm.backend

    def slot(self, sid, gpa, size, flags=0, kind="anon", thp=False, prot="rw", hva=None):
        if hva is None:
            hva = self.host.mmap(size, prot=prot, kind=kind, thp=thp)
        self.vm.set_user_memory_region(sid, gpa, size, hva, flags=flags)
        return hva

    def gmem_slot(self, sid, gpa, size, folio_order=0, flags=0):
        hva = self.host.mmap(size)
        gmem = self.vm.create_guest_memfd(size, folio_order=folio_order)
        self.vm.set_user_memory_region(sid, gpa, size, hva, flags=KVM_MEM_GUEST_MEMFD | flags,
                                       guest_memfd=gmem)
        return gmem

    def make_private(self, gpa, size):
        self.vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def make_shared(self, gpa, size):
        self.vm.set_memory_attributes(gpa, size, 0)

    def leaf(self, gpa, private=False):
        return self.vm.lookup(gpa, private=private)

    def events(self, prefix):
        return [e for e in self.vm.events if e["event"].startswith(prefix)]

    def check(self):
        self.vm.check_invariants()
        return True


@pytest.fixture
def make():
    made = []

    def factory(vm_type="default", **options):
        g = G(vm_type, **options)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.vm.check_invariants()
