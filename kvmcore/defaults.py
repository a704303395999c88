"""The core's default hook implementations, registered ``trylast`` in every VM's plugin
manager: what is the same on every architecture (the generic pfn lookup, the memslot zap, the
attribute pre-set filter). A backend overrides one by implementing the hook, or wraps it."""

from __future__ import annotations

import errno

import attrs

from . import hookimpl
from .errors import KvmError
from .exits import HwPoisonSignal, memory_fault_exit
from .gmem import kvm_gmem_get_pfn
from .hookspecs import SLOT_FLUSH_LOCK_WAIT
from .locks import drive
from .mmu_notifier import kvm_unmap_gfn_range
from .records import GfnRange
from .pfn import kvm_follow_pfn
from .uapi import (
    KVM_FILTER_PRIVATE,
    KVM_FILTER_SHARED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_PFN_ERR_FAULT,
    KVM_PFN_ERR_HWPOISON,
    KVM_PFN_ERR_RO_FAULT,
    PAGE_SIZE,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
)


@hookimpl(trylast=True)
def faultin_pfn(vm, fault):
    """__kvm_mmu_faultin_pfn: guest_memfd for private faults and gmem-only slots
    (kvm_mmu_faultin_pfn_private), hva -> pfn otherwise (__kvm_faultin_pfn), with the error
    handling of kvm_handle_error_pfn."""
    slot = fault.slot
    if fault.is_private or slot.gmem_only:
        if not slot.has_gmem:
            raise memory_fault_exit(vm, fault)
        try:
            pfn, order = kvm_gmem_get_pfn(vm, slot, fault.gfn)
        except KvmError as e:
            raise memory_fault_exit(vm, fault, e.errno) from None
        fault.pfn = pfn
        fault.map_writable = not slot.readonly
        fault.max_size = PAGE_SIZE << order
        fault.hva = 0
        fault.pfnmap = False
        fault.cacheable = True
        return RET_PF_CONTINUE
    pfn, writable, hva = kvm_follow_pfn(vm, slot, fault.gfn, fault.write)
    fault.hva = hva
    if pfn == KVM_PFN_ERR_RO_FAULT:
        return RET_PF_EMULATE
    if pfn == KVM_PFN_ERR_HWPOISON:
        vm.stats["hwpoison_signal"] += 1
        shift = vm.host.page_shift
        if vm.arch_info.hwpoison_lsb_vma:
            shift = vm.host.find_vma(hva).page_size.bit_length() - 1
        raise HwPoisonSignal(hva & ~(vm.page_size - 1), shift)
    if pfn == KVM_PFN_ERR_FAULT:
        if vm.arch_info.error_pfn_memory_fault:
            raise memory_fault_exit(vm, fault)
        # arm64 user_mem_abort, ppc kvmppc_book3s_instantiate_page, riscv kvm_riscv_mmu_map:
        # -EFAULT out of KVM_RUN, no KVM_EXIT_MEMORY_FAULT.
        raise KvmError(errno.EFAULT, f"gpa={fault.gpa:#x}: no page at hva {hva:#x}")
    host = vm.host
    # None when GUP-fast found the PTE of a range munmap has already detached (its
    # notifiers' window): the fault goes on with the pfn, and the staleness check stops it.
    vma = host.find_vma(hva)
    pfnmap = vma is not None and vma.io_pfnmap
    fault.pfn = pfn
    fault.map_writable = writable
    fault.host_vma = vma
    fault.pfnmap = pfnmap
    fault.cacheable = not pfnmap
    fault.max_size = host.host_mapping_size(hva)
    return RET_PF_CONTINUE


@hookimpl(trylast=True)
def set_vcpu_events(vm, vcpu, smm):
    """A kernel without CONFIG_KVM_SMM: entering SMM is EINVAL, leaving it a no-op."""
    if smm:
        raise KvmError(errno.EINVAL, f"smm=True: {vm.arch_info.name} vCPUs have no System "
                                     "Management Mode")
    return True


@hookimpl(trylast=True)
def vcpu_memslots_id(vm, vcpu):
    return 0


def whole_slot(slot) -> GfnRange:
    """Every gfn of ``slot``, both aliases: what memslot and VM teardown zap."""
    return GfnRange(slot, slot.base_gfn, slot.end_gfn, 0,
                    KVM_FILTER_PRIVATE | KVM_FILTER_SHARED, True, False)


@hookimpl(trylast=True)
def flush_shadow_memslot(vm, slot):
    """kvm_mmu_zap_memslot, a flow: under kvm->mmu_lock for write (``slot_flush_lock_wait``),
    zap the whole slot, both aliases, and flush."""
    lock = vm.mmu_lock
    yield from lock.write_lock(SLOT_FLUSH_LOCK_WAIT)
    try:
        if (yield from kvm_unmap_gfn_range(vm, whole_slot(slot))):
            vm.flush_remote_tlbs()
    finally:
        lock.write_unlock()
    return True


@hookimpl(trylast=True)
def flush_shadow_all(vm):
    """kvm_arch_flush_shadow_all: every slot, both aliases; no vCPU runs, so no flush."""
    for slot in list(vm.all_memslots()):
        drive(kvm_unmap_gfn_range(vm, whole_slot(slot)))
    vm.flush_remote_tlbs()
    return True


@hookimpl(trylast=True)
def pre_set_memory_attributes(vm, range):
    """kvm_arch_pre_set_memory_attributes, without x86's huge-page straddle widening: zap the
    *old* kind — shared when converting to private, private when converting to shared."""
    to_private = bool(range.arg & KVM_MEMORY_ATTRIBUTE_PRIVATE)
    rng = attrs.evolve(range, attr_filter=KVM_FILTER_SHARED if to_private else
                       KVM_FILTER_PRIVATE)
    return (yield from kvm_unmap_gfn_range(vm, rng))


@hookimpl(trylast=True)
def post_set_memory_attributes(vm, range):
    return False


@hookimpl(trylast=True)
def page_table_bytes(vm):
    return 0


@hookimpl(trylast=True)
def stale_leaves(vm):
    return ()


@hookimpl(trylast=True)
def fault_retries_locally(vm, fault):
    return False
