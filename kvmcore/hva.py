"""hva-range and gfn-range iteration over memslots (kvm_handle_hva_range,
kvm_handle_gfn_range) and the record handed to backends (struct kvm_gfn_range)."""

from __future__ import annotations

from .records import GfnRange
from .uapi import KVM_FILTER_SHARED


def _hva_gfn_range(vm, slot, start: int, end: int, arg: int, may_block: bool,
                   lockless: bool) -> GfnRange:
    """The slot's gfns whose pages meet hva ``[start, end)``: pages (of PAGE_SIZE, the VM's
    base page) only partly inside count, and hva notifications never concern private memory
    (KVM_FILTER_SHARED)."""
    mask = vm.page_size - 1
    hva_start = max(start, slot.userspace_addr) & ~mask
    hva_end = (min(end, slot.userspace_addr + (slot.npages << 12)) + mask) & ~mask
    return GfnRange(slot, slot.hva_to_gfn(hva_start), slot.hva_to_gfn(hva_end), arg,
                    KVM_FILTER_SHARED, may_block, lockless)


def kvm_handle_hva_range(vm, start: int, end: int, handler, on_lock=None,
                         flush_on_ret: bool = False, may_block: bool = False,
                         lockless: bool = False, arg: int = 0) -> tuple[bool, bool]:
    """kvm_handle_hva_range, the MMU-notifier form (reference §2.2).

    For every slot of every address space whose hva interval meets ``[start, end)``, the gfn
    range covering it (pages only partly inside included), with KVM_FILTER_SHARED: hva
    notifications never concern private memory. The MMU lock is taken and ``on_lock`` run at
    the first slot found; ``handler(vm, range)`` results are ORed. Returns ``(ret,
    found_memslot)``; with no slot found nothing is locked or called."""
    if end <= start:
        raise ValueError(f"kvm_handle_hva_range: empty range [{start:#x}, {end:#x})")
    if handler is None and on_lock is None:
        raise ValueError("kvm_handle_hva_range: neither handler nor on_lock")
    if lockless and on_lock is not None:
        raise ValueError("kvm_handle_hva_range: lockless walks take no on_lock")
    ret = False
    locked = found = False
    try:
        for slots in vm.memslot_sets:
            for slot in slots.in_hva_range(start, end):
                rng = _hva_gfn_range(vm, slot, start, end, arg, may_block, lockless)
                if not found:
                    found = True
                    if not lockless:
                        vm.mmu_lock.acquire()
                        locked = True
                        if on_lock is not None:
                            on_lock()
                    if handler is None:
                        raise _Done
                ret |= bool(handler(vm, rng))
        if flush_on_ret and ret:
            vm.flush_remote_tlbs()
    except _Done:
        pass
    finally:
        if locked:
            vm.mmu_lock.release()
    return ret, found


class _Done(Exception):
    pass


def kvm_handle_hva_range_op(vm, start: int, end: int, op, arg: int = 0) -> int:
    """The hva-range *operator* form settled in the 2023 review ("KVM: Add HVA range
    operator"): for every slot of every address space whose hva interval meets ``[start,
    end)``, ``op(vm, range)`` with the slot's gfn range (pages only partly inside included,
    KVM_FILTER_SHARED, as ``kvm_handle_hva_range``). ``op`` returns 0 or a negative errno; the
    walk stops at the first non-zero result and returns it, else 0.

    Unlike the notifier form it takes no MMU lock (``range.lockless`` is True: the operator
    does its own synchronisation), calls no on_lock, implies no invalidation
    (mmu_invalidate_begin/end) and no TLB flush. An empty range meets no slot: 0."""
    for slots in vm.memslot_sets:
        for slot in slots.in_hva_range(start, end) if start < end else ():
            r = op(vm, _hva_gfn_range(vm, slot, start, end, arg, False, True))
            if r:
                return r
    return 0


def kvm_handle_gfn_range(vm, start: int, end: int, handler, on_lock=None,
                         flush_on_ret: bool = False, may_block: bool = False,
                         arg: int = 0) -> bool:
    """kvm_handle_gfn_range (reference §4): the gfn-based walk of the attribute flow. Each
    slot's part of ``[start, end)``; lock and ``on_lock`` at the first; ``attr_filter`` is
    left for the arch hook to choose (0 here)."""
    ret = False
    found = False
    try:
        for slots in vm.memslot_sets:
            for slot in slots.in_gfn_range(start, end):
                s, e = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
                if s >= e:
                    continue
                if not found:
                    found = True
                    vm.mmu_lock.acquire()
                    if on_lock is not None:
                        on_lock()
                ret |= bool(handler(vm, GfnRange(slot, s, e, arg, 0, may_block, False)))
        if flush_on_ret and ret:
            vm.flush_remote_tlbs()
    finally:
        if found:
            vm.mmu_lock.release()
    return ret
