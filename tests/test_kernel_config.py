"""A model VM configured like a kernel (KernelConfig, x86 smm=False) and the VM's own
KVM_CHECK_EXTENSION / KVM_ENABLE_CAP (issue 18)."""

import errno

import pytest

from kvmcore import VM, KvmError
from kvmcore.capabilities import KernelConfig
from kvmcore.uapi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_PRE_FAULT_MEMORY,
    KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

pytest.importorskip("kvmcore_x86_tdp")

# The kernel of issue 18: 6.18 with the PVM vendor module (no TDP, no SMM, no attributes).
PVM = KernelConfig(vm_types={"default"}, not_built={"memory_attributes"}, tdp=False)


def expect(err, fn, *args, **kw):
    with pytest.raises(KvmError) as e:
        fn(*args, **kw)
    assert e.value.errno == err, e.value


def test_backend_defaults_answer_check_extension():
    vm = VM("x86_tdp")
    assert vm.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert vm.check_extension(KVM_CAP_VM_TYPES) == 0b110011  # default, sw_protected, snp, tdx
    assert vm.check_extension(KVM_CAP_NR_MEMSLOTS) == 32764
    assert vm.check_extension(KVM_CAP_PRE_FAULT_MEMORY) == 1
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    assert vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == 3
    assert vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == 0  # no private memory
    assert VM("x86_tdp", "sw_protected").check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == \
        KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert vm.check_extension(99999) == 0


def test_kernel_without_attributes_smm_and_tdp():
    vm = VM("x86_tdp", kconfig=PVM, smm=False)
    assert vm.nr_address_spaces == 1
    assert vm.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 0
    assert vm.check_extension(KVM_CAP_VM_TYPES) == 1
    assert vm.check_extension(KVM_CAP_PRE_FAULT_MEMORY) == 0
    expect(errno.ENOTTY, vm.set_memory_attributes, 0, 4096, 0)
    hva = vm.host.mmap(1 << 20)
    expect(errno.EINVAL, vm.set_user_memory_region, 1 << 16, 0, 1 << 20, hva)
    expect(errno.EINVAL, vm.create_vcpu(1).set_vcpu_events, smm=True)
    expect(errno.EINVAL, VM, "x86_tdp", "sw_protected", kconfig=PVM)


def test_pre_fault_without_tdp_fails_like_the_shadow_mmu():
    """No MMU pages before the first memslot (ENOSPC), then no direct MMU (EOPNOTSUPP);
    argument checks come first (EINVAL)."""
    vm = VM("x86_tdp", kconfig=PVM, smm=False)
    vcpu = vm.create_vcpu(0)
    expect(errno.EINVAL, vcpu.pre_fault_memory, 0, 4096, 1)
    expect(errno.ENOSPC, vcpu.pre_fault_memory, 0, 4096)
    vm.set_user_memory_region(0, 0, 1 << 20, vm.host.mmap(1 << 20))
    expect(errno.EOPNOTSUPP, vcpu.pre_fault_memory, 0, 4096)
    vm.set_user_memory_region(0, 0, 0, 0)
    expect(errno.EOPNOTSUPP, vcpu.pre_fault_memory, 0, 4096)


def test_enable_cap():
    vm = VM("x86_tdp", pml=False)
    expect(errno.EINVAL, vm.enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, flags=1)
    expect(errno.EINVAL, vm.enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 2)
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
    assert vm.manual_dirty_log_protect == 3
    expect(errno.EINVAL, vm.enable_cap, 9999, 1)
    # kvm_vm_ioctl_enable_dirty_log_ring takes a u32 size.
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, (1 << 32) + 4096)
    assert vm.dirty_ring_size == 4096
    expect(errno.EINVAL, vm.enable_cap, KVM_CAP_DIRTY_LOG_RING, 4096)
    # With PML's 512 reserved entries a 4 KiB ring is too small.
    expect(errno.EINVAL, VM("x86_tdp").enable_cap, KVM_CAP_DIRTY_LOG_RING, 4096)
