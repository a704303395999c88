from __future__ import annotations

import pytest
from kvmcore import VM, HostMemory

GPA = 0x8000_0000
SZ_2M = 2 << 20
SZ_1G = 1 << 30


@pytest.fixture
def host():
    return HostMemory()


@pytest.fixture
def make_vm(host):
    """A VM factory; every VM's invariants are checked when the test ends."""
    vms = []

    def make(**options):
        vm = VM(arch="kvmcore_riscv_gstage:RiscvGstageBackend", host=host, **options)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.check_invariants()
        vm.close()


@pytest.fixture
def vm(make_vm):
    return make_vm()


def entry(vm, gpa):
    """``(level, pte)`` of the last entry the G-stage walk of ``gpa`` reads."""
    level, _table, _idx, pte = vm.backend.table(0).lookup(gpa)
    return level, pte


def pfn_of(pte):
    return pte >> 10
