"""hva-range and gfn-range iteration over memslots (kvm_handle_hva_range,
kvm_handle_gfn_range) and the record handed to backends (struct kvm_gfn_range)."""

from __future__ import annotations

from types import GeneratorType

from .locks import WRITE, stepping
from .records import GfnRange
from .uapi import KVM_FILTER_SHARED


def _hva_gfn_range(vm, slot, start: int, end: int, arg: int, may_block: bool,
                   lockless: bool) -> GfnRange:
    """The slot's gfns whose pages meet hva ``[start, end)``: pages (of PAGE_SIZE, the VM's
    base page) only partly inside count, and hva notifications never concern private memory
    (KVM_FILTER_SHARED)."""
    mask = vm.page_size - 1
    uaddr = slot.userspace_addr
    slot_end = uaddr + (slot.npages << 12)
    hva_start = (start if start > uaddr else uaddr) & ~mask
    hva_end = ((end if end < slot_end else slot_end) + mask) & ~mask
    return GfnRange(slot, slot.hva_to_gfn(hva_start), slot.hva_to_gfn(hva_end), arg,
                    KVM_FILTER_SHARED, may_block, lockless)


#: kvm_handle_hva_range has zapped and holds kvm->mmu_lock for write while its TLB flush
#: waits for the vCPUs (reference/races.md §2, ``mn_start_flush``).
MN_FLUSH = "mn_start_flush"


def kvm_handle_ranges(vm, ranges, handler, on_lock=None, flush_on_ret: bool = False,
                      lockless: bool = False, point: str = "mmu_lock_wait",
                      flush_point: str | None = None, srcu=None):
    """The loop every locked walk shares (__kvm_handle_hva_range, kvm_handle_gfn_range,
    __kvm_gmem_invalidate_begin), as a flow returning ``(ret, found)``: at the first of
    ``ranges`` (struct kvm_gfn_range, produced lazily) wait for kvm->mmu_lock for write at
    ``point``, take it and run ``on_lock`` (a ``lockless`` walk takes no lock: it only pauses
    at ``point`` when stepped); OR the ``handler(vm, range)`` results (a handler
    may be a flow itself; None: only lock and ``on_lock``, and ``ranges`` need only say
    whether there is one); flush every TLB before dropping the lock when one asked for it
    (pausing at ``flush_point`` first, if given: the flusher waits for the vCPUs holding the
    lock). With no range, nothing is locked or called. A flow that is not stepped passes the
    points without yielding when the lock is free (``stepping()``: no other flow could run
    there). ``srcu``: the walk runs inside its read side (__kvm_handle_hva_range's
    srcu_read_lock, taken before the memslots are read and dropped after mmu_lock)."""
    ret = found = locked = False
    lock = vm.mmu_lock
    if srcu is not None:
        idx = srcu.read_lock()
    try:
        for rng in ranges:
            if not found:
                found = True
                if not lockless:
                    if stepping() or not lock.try_lock(WRITE):
                        yield from lock.write_lock(point)
                    locked = True
                    if on_lock is not None:
                        on_lock()
                elif stepping():
                    yield point     # no mmu_lock: the walk runs beside faults and zaps
                if handler is None:
                    break
            if rng.slot.freed:
                vm.freed_slot_uses.append(f"{handler.__name__} on gfns [{rng.start:#x}, "
                                          f"{rng.end:#x}) of memslot {rng.slot.slot_id:#x}")
            r = handler(vm, rng)
            if type(r) is GeneratorType:
                r = yield from r
            ret |= bool(r)
        if flush_on_ret and ret:
            if flush_point is not None and stepping():
                yield flush_point
            vm.flush_remote_tlbs()
        return ret, found
    finally:
        if locked:
            lock.write_unlock()
        if srcu is not None:
            srcu.read_unlock(idx)


def kvm_handle_hva_range(vm, start: int, end: int, handler, on_lock=None,
                         flush_on_ret: bool = False, may_block: bool = False,
                         lockless: bool = False, arg: int = 0, point: str = "mn_lock_wait"):
    """kvm_handle_hva_range, the MMU-notifier form (reference §2.2), as a flow: a generator
    returning ``(ret, found_memslot)`` (``kvm_handle_ranges``' own: the arguments are checked
    when this is called).

    Under kvm->srcu, for every slot of every address space whose hva interval meets ``[start,
    end)``, the gfn range covering it (pages only partly inside included), with
    KVM_FILTER_SHARED: hva notifications never concern private memory; locked, called and
    flushed as ``kvm_handle_ranges`` does, pausing before the flush at ``mn_start_flush``.
    With no handler (invalidate_range_end's kvm_null_fn) no range record is built: the
    slots alone say whether the walk locks and runs ``on_lock``."""
    if end <= start:
        raise ValueError(f"kvm_handle_hva_range: empty range [{start:#x}, {end:#x})")
    if handler is None and on_lock is None:
        raise ValueError("kvm_handle_hva_range: neither handler nor on_lock")
    if lockless and on_lock is not None:
        raise ValueError("kvm_handle_hva_range: lockless walks take no on_lock")
    if handler is None:
        ranges = (slot for slots in vm.memslot_sets for slot in slots.in_hva_range(start, end))
    else:
        ranges = (_hva_gfn_range(vm, slot, start, end, arg, may_block, lockless)
                  for slots in vm.memslot_sets for slot in slots.in_hva_range(start, end))
    return kvm_handle_ranges(vm, ranges, handler, on_lock, flush_on_ret, lockless, point,
                             MN_FLUSH, vm.srcu)


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
                         arg: int = 0, point: str = "mmu_lock_wait"):
    """kvm_handle_gfn_range (reference §3): the gfn-based walk of the attribute flow, as a
    generator returning ``ret``: each slot's part of ``[start, end)`` (``attr_filter`` left
    for the arch hook to choose: 0), locked, called and flushed as ``kvm_handle_ranges`` does.
    No SRCU: the caller holds slots_lock, which keeps the memslots stable."""
    ranges = (GfnRange(slot, max(start, slot.base_gfn), min(end, slot.end_gfn), arg, 0,
                       may_block, False)
              for slots in vm.memslot_sets for slot in list(slots.in_gfn_range(start, end))
              if max(start, slot.base_gfn) < min(end, slot.end_gfn))
    ret, _found = yield from kvm_handle_ranges(vm, ranges, handler, on_lock, flush_on_ret,
                                               point=point)
    return ret
