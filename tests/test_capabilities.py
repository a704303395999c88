"""Ioctls an architecture does not offer are ENOTTY; capabilities a VM type lacks are EINVAL
(or EOPNOTSUPP), as Linux answers them."""

import errno

import pytest
from conftest import MiB

from kvmcore import VM, KvmError
from kvmcore.arch import ArchInfo
from kvmcore.dirty import enable_manual_protect
from kvmcore.testing import FlatBackend
from kvmcore.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_READONLY


class Bare(FlatBackend):
    """An architecture with none of the optional ioctls (like ppc: no attributes, no
    guest_memfd, no CLEAR_DIRTY_LOG, no read-only memory, no ring, no pre-fault)."""

    arch_info = ArchInfo(name="bare", page_sizes=(4096,), levels=1,
                         vm_types={"default": {"dirty_log", "aging"}})


@pytest.fixture
def bare():
    return VM(arch=Bare)


def test_missing_ioctls_are_enotty(bare):
    for call in (lambda: bare.set_memory_attributes(0, 4096, 0),
                 lambda: bare.create_guest_memfd(MiB),
                 lambda: bare.clear_dirty_log(0, 0, 64, []),
                 lambda: bare.create_vcpu(0).pre_fault_memory(0, 4096)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.ENOTTY


def test_missing_caps_are_einval(bare):
    hva = bare.host.mmap(MiB)
    for flags in (KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD):
        with pytest.raises(KvmError) as e:
            bare.set_user_memory_region(0, 0, MiB, hva, flags)
        assert e.value.errno == errno.EINVAL
    for call in (lambda: bare.enable_dirty_log_manual_protect(),
                 lambda: bare.enable_dirty_ring(1 << 16)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EINVAL


def test_manual_protect_arguments(vm):
    for bad in (1 << 2, 1 << 1):   # unknown bit; INITIALLY_SET without ENABLE
        with pytest.raises(KvmError) as e:
            enable_manual_protect(vm, bad)
        assert e.value.errno == errno.EINVAL
    enable_manual_protect(vm, 3)
    assert vm.dirty_log_manual_protect_and_init_set()


def test_initially_set_needs_its_capability():
    class NoInitSet(FlatBackend):
        arch_info = ArchInfo(name="noinit", page_sizes=(4096,), levels=1,
                             vm_types={"default": {"dirty_log", "manual_dirty_protect"}})

    vm = VM(arch=NoInitSet)
    with pytest.raises(KvmError) as e:
        vm.enable_dirty_log_manual_protect(initially_set=True)
    assert e.value.errno == errno.EINVAL
    vm.enable_dirty_log_manual_protect()


def test_gmem_mmap_flags_by_capability(vm, pvm):
    from kvmcore.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

    vm.create_guest_memfd(MiB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    pvm.create_guest_memfd(MiB, GUEST_MEMFD_FLAG_MMAP)
