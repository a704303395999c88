"""KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes -> kvm_vm_set_mem_attributes,
virt/kvm/kvm_main.c; shared/reference/core.md §4): validation in Linux's order, then the
conversion inside an invalidation."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .args import u64
from .attributes import U64, supported_mem_attributes
from .errors import KvmError
from .hva import kvm_handle_gfn_range
from .records import GfnRange
from .uapi import PAGE_SHIFT

if TYPE_CHECKING:
    from .kvm import Kvm


#: Race points of a conversion (reference/races.md §3): waiting for slots_lock; waiting for
#: kvm->mmu_lock before the pre-set zap (the invalidation begins there); the window in which
#: the attributes are stored with the invalidation in progress and no mmu_lock; waiting for
#: kvm->mmu_lock to end the invalidation and run the post-set hook.
ATTR_SLOTS_LOCK_WAIT = "attr_slots_lock_wait"
ATTR_PRE_LOCK_WAIT = "attr_pre_lock_wait"
ATTR_STORE_WINDOW = "attr_store_window"
ATTR_POST_LOCK_WAIT = "attr_post_lock_wait"


def kvm_vm_ioctl_set_mem_attributes(vm: Kvm, address: int, size: int, attributes: int,
                                    flags: int):
    """KVM_SET_MEMORY_ATTRIBUTES, a flow: validation in Linux's order, then
    kvm_vm_set_mem_attributes."""
    if "memory_attributes" not in vm.arch_capabilities:
        # Not built: kvm_vm_ioctl hands it to kvm_arch_vm_ioctl, whose default answers.
        raise KvmError(vm.arch_info.vm_ioctl_errno, f"set_memory_attributes: "
                       f"{vm.arch_info.name} has no KVM_SET_MEMORY_ATTRIBUTES")
    for name, value in (("address", address), ("size", size), ("attributes", attributes),
                        ("flags", flags)):
        u64(name, value)
    if flags:
        raise KvmError(errno.EINVAL, f"flags={flags:#x} must be 0")
    supported = supported_mem_attributes(vm.capabilities)
    if attributes & ~supported:
        raise KvmError(errno.EINVAL, f"attributes={attributes:#x}: unsupported bits "
                                     f"{attributes & ~supported:#x} for this VM")
    if not size or address + size >= U64:
        raise KvmError(errno.EINVAL, f"size={size:#x}: zero, or address + size wraps")
    if address & (vm.page_size - 1) or size & (vm.page_size - 1):
        raise KvmError(errno.EINVAL, f"address={address:#x} or size={size:#x} is not "
                                     f"aligned to PAGE_SIZE {vm.page_size:#x}")
    yield from kvm_vm_set_mem_attributes(vm, address >> PAGE_SHIFT,
                                         (address + size) >> PAGE_SHIFT, attributes)


def kvm_vm_set_mem_attributes(vm: Kvm, start: int, end: int, attributes: int):
    """kvm_vm_set_mem_attributes, a flow: under slots_lock, the no-op check, then pre_set
    per slot inside an invalidation (the handler adds the range, then calls the arch hook,
    which zaps), the store with the invalidation in progress and no mmu_lock, then end +
    post_set under the lock. Where no memslot overlaps, the store alone happens."""
    yield from vm.slots_lock.lock(ATTR_SLOTS_LOCK_WAIT)
    try:
        if vm.range_has_memory_attributes(start, end, U64 - 1, attributes):
            return
        yield from kvm_handle_gfn_range(vm, start, end, _pre_set, on_lock=vm.mmu_invalidate_begin,
                                        flush_on_ret=True, may_block=True, arg=attributes,
                                        point=ATTR_PRE_LOCK_WAIT)
        yield ATTR_STORE_WINDOW
        vm.attributes.set(start, end, attributes)
        yield from kvm_handle_gfn_range(vm, start, end, _post_set, on_lock=vm.mmu_invalidate_end,
                                        flush_on_ret=False, may_block=True, arg=attributes,
                                        point=ATTR_POST_LOCK_WAIT)
        vm.stats["set_memory_attributes"] += 1
        vm.trace("attributes.set", gfn=start, npages=end - start, attributes=attributes)
    finally:
        vm.slots_lock.unlock()


def _pre_set(vm: Kvm, rng: GfnRange):
    """kvm_pre_set_memory_attributes: add the range to the invalidation, then the arch hook
    (which may be a flow)."""
    vm.mmu_invalidate_range_add(rng.start, rng.end)
    return vm.hook.pre_set_memory_attributes(vm=vm, range=rng)


def _post_set(vm: Kvm, rng: GfnRange):
    return vm.hook.post_set_memory_attributes(vm=vm, range=rng)
