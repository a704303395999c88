from __future__ import annotations

import pytest
from kvmcore import HostMemory
from kvmcore.testing import VmFactory

GPA = 0x8000_0000


@pytest.fixture
def make_vm():
    """VMs on one host, each checked and closed when the test ends."""
    make = VmFactory("kvmcore_riscv_gstage:RiscvGstageBackend", HostMemory())
    yield make
    make.close()


@pytest.fixture
def host(make_vm):
    return make_vm.host


@pytest.fixture
def vm(make_vm):
    return make_vm()


def entry(vm, gpa):
    """``(level, pte)`` of the last entry the G-stage walk of ``gpa`` reads."""
    level, _table, _idx, pte = vm.backend.table(0).lookup(gpa)
    return level, pte


def pfn_of(pte):
    return pte >> 10
