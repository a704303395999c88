from __future__ import annotations

import pytest
from kvmcore import VM, HostMemory

from kvmcore_arm64_stage2 import Arm64Stage2Backend

GPA = 0x4000_0000
SZ_2M = 2 << 20
SZ_1G = 1 << 30


@pytest.fixture
def host():
    return HostMemory()


@pytest.fixture
def make_vm(host):
    vms = []

    def make(**options):
        vm = VM(arch="arm64_stage2", host=host, **options)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        check(vm)
        vm.close()


#: Messages of the core's leaf check that assume a leaf is host-contiguous memory no larger than
#: the host mapping (true only for 4 KiB base pages on the 4 KiB host model).
_HOST_4K_ASSUMPTIONS = ("not aligned to its size", "larger than its backing", "maps pfn")


def check(vm):
    """vm.check_invariants(); with a 16K/64K granule the core's contiguity checks are replaced
    by a check of every 4 KiB piece of every leaf against the host page table."""
    from kvmcore.errors import InvariantError
    from kvmcore.invariants import check_vm

    if vm.backend.geom.granule == 4096:
        vm.check_invariants()
        return
    problems = [p for p in check_vm(vm) if not any(s in p for s in _HOST_4K_ASSUMPTIONS)]
    inv = vm.mmu_invalidate
    for m in vm.mappings():
        slot = vm.gfn_to_memslot(m.gfn)
        for gfn in range(m.gfn, m.gfn + m.npages):
            if slot is None or not slot.contains(gfn) or slot.has_gmem:
                continue
            if inv.in_progress and inv.range_start <= gfn < inv.range_end:
                continue
            pte = vm.host.lookup_pte(slot.gfn_to_hva(gfn))
            got = vm.backend.pfn_of(gfn << 12)
            if pte is None or pte[0] != got:
                problems.append(f"gfn {gfn:#x}: leaf maps pfn {got:#x}, host has {pte}")
            elif m.writable and not pte[1]:
                problems.append(f"gfn {gfn:#x}: writable leaf over a read-only host page")
    if problems:
        raise InvariantError(problems)


@pytest.fixture
def vm(make_vm):
    return make_vm()


def backend_of(vm) -> Arm64Stage2Backend:
    return vm.backend


def slot(vm, host, slot_id, gpa, size, flags=0, **mmap_kw):
    hva = host.mmap(size, **mmap_kw)
    vm.set_user_memory_region(slot_id, gpa, size, hva, flags)
    return hva
