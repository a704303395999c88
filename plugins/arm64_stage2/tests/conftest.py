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
    """A VM factory. Without ``granule`` the VM lives on the ``host`` fixture (4 KiB pages);
    with ``granule=`` it gets a fresh host whose PAGE_SIZE is that granule, as ``VM()`` builds
    one (``kvmcore.vm.host_for``): use ``vm.host``."""
    vms = []

    def make(**options):
        vm = VM(arch="arm64_stage2", host=None if "granule" in options else host, **options)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        check(vm)
        vm.close()


def check(vm):
    """Every invariant, the core's (each leaf maps the host's page or huge page for its IPA,
    at its size) and the backend's."""
    vm.check_invariants()


@pytest.fixture
def vm(make_vm):
    return make_vm()


def backend_of(vm) -> Arm64Stage2Backend:
    return vm.backend


def slot(vm, host, slot_id, gpa, size, flags=0, **mmap_kw):
    hva = host.mmap(size, **mmap_kw)
    vm.set_user_memory_region(slot_id, gpa, size, hva, flags)
    return hva
