"""read/write/fetch run the fault path without generators; step_access runs it with its race
points. Driven to the end with nothing run at the race points, both must leave the same
results, exits, statistics, trace events and mappings."""

import pytest
from conftest import MiB

from kvmcore import VM, HostMemory, VcpuExit
from kvmcore.fault import run_to_completion
from kvmcore.testing import FlatBackend
from kvmcore.uapi import (KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
                          KVM_MEMORY_ATTRIBUTE_PRIVATE)


def _setup(vm_type: str):
    host = HostMemory()
    vm = VM(arch=FlatBackend, vm_type=vm_type, host=host, trace=True)
    vm.set_user_memory_region(0, 0, 4 * MiB, host.mmap(4 * MiB))
    ro = host.mmap(MiB)
    vm.set_user_memory_region(1, 8 * MiB, MiB, ro, KVM_MEM_READONLY)
    vm.set_user_memory_region(2, 16 * MiB, MiB, host.mmap(MiB), KVM_MEM_LOG_DIRTY_PAGES)
    poisoned = host.mmap(MiB)
    vm.set_user_memory_region(3, 32 * MiB, MiB, poisoned)
    host.write(poisoned + 0x3000, b"p")         # a page of its own, not the zero page
    host.poison(poisoned + 0x3000)
    if vm_type != "default":
        gmem = vm.create_guest_memfd(MiB)
        vm.set_user_memory_region(4, 64 * MiB, MiB, host.mmap(MiB), KVM_MEM_GUEST_MEMFD,
                                  guest_memfd=gmem)
        vm.set_memory_attributes(64 * MiB, 2 * 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return vm, vm.create_vcpu(0)


ACCESSES = [
    ("write", 0x1000, b"abc", None),
    ("read", 0x1000, 3, None),
    ("read", 0x2ffe, 4, None),                  # two pages, the second a fresh fault
    ("write", 0x5000, b"y" * 9000, None),        # three pages
    ("fetch", 0x1000, 4, None),
    ("read", 0x9000, 8, None),                  # zero page, then COW on the write
    ("write", 0x9000, b"w", None),
    ("write", 0x10000000, b"mmio", None),       # no slot: MMIO exit
    ("read", 8 * MiB, 2, None),                 # read-only slot: maps read-only
    ("write", 8 * MiB, b"x", None),             # ... and a write is MMIO
    ("write", 16 * MiB + 0x4000, b"d", None),   # dirty logging
    ("read", 32 * MiB + 0x3000, 1, None),       # hwpoison
    ("read", 64 * MiB, 4, True),                # private
    ("read", 64 * MiB, 4, False),               # private gfn, shared access: exit
    ("write", 64 * MiB + 0x4000, b"s", False),
]


def _run(vm_type: str, stepped: bool):
    vm, vcpu = _setup(vm_type)
    outcomes = []
    for kind, gpa, arg, private in ACCESSES:
        if private is not None and vm_type == "default":
            continue
        try:
            if stepped:
                r = run_to_completion(vcpu.step_access(kind, gpa, arg, private=private))
            elif kind == "read":
                r = vcpu.read(gpa, arg, private=private)
            elif kind == "write":
                r = vcpu.write(gpa, arg, private=private)
            else:
                r = vcpu.fetch(gpa, private=private, n=arg)
            outcomes.append(r)
        except VcpuExit as e:
            outcomes.append(repr(e))
    vm.check_invariants()
    return (outcomes, dict(vm.stats), vm.events, list(vm.mappings()), vm.get_dirty_log(2),
            sorted(vcpu.tlb.items()))


@pytest.mark.parametrize("vm_type", ["default", "sw_protected"])
def test_direct_and_stepped_accesses_agree(vm_type):
    assert _run(vm_type, stepped=False) == _run(vm_type, stepped=True)
