"""Dirty logging: per-slot bitmaps, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, manual protect,
and the per-vCPU dirty ring (virt/kvm/kvm_main.c, virt/kvm/dirty_ring.c; reference §6).

How a write is noticed is the backend's business (write protection, PML, Power C bits); the
backend reports it through ``vm.mark_page_dirty_in_slot`` (mark_page_dirty_in_slot) and
re-arms tracking in ``enable_log_dirty_pt_masked``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from types import GeneratorType
from typing import TYPE_CHECKING

import structlog

from .args import integer, u32, u64
from .errors import KvmError
from .exits import DirtyRingFullExit
from .locks import stepping
from .dirty_log import DirtyBitmap, DirtyRing
from .memslots import kvm_user_mem_slots
from .uapi import (
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
)

if TYPE_CHECKING:
    from .memslots import Memslot
    from .kvm import Kvm, KvmVcpu

logger = structlog.get_logger(__name__)

U64_MASK = (1 << 64) - 1


def use_dirty_bitmap(vm: Kvm) -> bool:
    """kvm_use_dirty_bitmap."""
    return not vm.dirty_ring_size or vm.dirty_ring_with_bitmap


def prepare_dirty_bitmap(vm: Kvm, old: Memslot | None, new: Memslot) -> None:
    """The bitmap part of kvm_prepare_memory_region."""
    if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
        new.dirty_bitmap = None
    elif old is not None and old.dirty_bitmap is not None:
        new.dirty_bitmap = old.dirty_bitmap
    elif use_dirty_bitmap(vm):
        new.dirty_bitmap = DirtyBitmap(new.npages, vm.dirty_log_manual_protect_and_init_set())


def _slot_for_log(vm: Kvm, slot: int, op: str):
    if vm.dirty_ring_size and not vm.dirty_ring_with_bitmap:
        raise KvmError(errno.ENXIO, f"{op}: the dirty ring is in use without bitmaps")
    u32("slot", slot)
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if as_id >= vm.nr_address_spaces or id_ >= kvm_user_mem_slots(vm.arch_info):
        raise KvmError(errno.EINVAL, f"slot={slot:#x}: bad address space or slot id")
    return as_id, id_


#: Race points of the dirty-log ioctls (reference/races.md §6): waiting for slots_lock, for
#: kvm->mmu_lock, and after the lock is dropped with the pages write-protected but the TLBs
#: not yet flushed (a vCPU may still write through a stale writable entry: Linux allows it,
#: the page is already in the snapshot); reset batches each wait for the lock.
DLOG_SLOTS_LOCK_WAIT = "dlog_slots_lock_wait"
DLOG_LOCK_WAIT = "dlog_lock_wait"
DLOG_UNLOCKED_BEFORE_FLUSH = "dlog_unlocked_before_flush"
RING_RESET_BATCH = "ring_reset_batch"


def kvm_vm_ioctl_get_dirty_log(vm: Kvm, slot: int):
    """KVM_GET_DIRTY_LOG, a flow: kvm_get_dirty_log_protect under slots_lock."""
    yield from vm.slots_lock.lock(DLOG_SLOTS_LOCK_WAIT)
    try:
        return (yield from kvm_get_dirty_log_protect(vm, slot))
    finally:
        vm.slots_lock.unlock()


def kvm_vm_ioctl_clear_dirty_log(vm: Kvm, slot: int, first_page: int, num_pages: int, pages):
    """KVM_CLEAR_DIRTY_LOG, a flow: kvm_clear_dirty_log_protect under slots_lock."""
    yield from vm.slots_lock.lock(DLOG_SLOTS_LOCK_WAIT)
    try:
        return (yield from kvm_clear_dirty_log_protect(vm, slot, first_page, num_pages, pages))
    finally:
        vm.slots_lock.unlock()


def _enable_log_dirty_pt_masked(vm: Kvm, memslot, offset: int, mask: int):
    """kvm_arch_mmu_enable_log_dirty_pt_masked under kvm->mmu_lock for write: a backend's
    answer may be a flow, which drops and takes the lock again at its own points (x86's eager
    split allocates each page table with the lock dropped)."""
    r = vm.hook.enable_log_dirty_pt_masked(vm=vm, slot=memslot, gfn_offset=offset, mask=mask)
    if type(r) is GeneratorType:
        yield from r


def kvm_get_dirty_log_protect(vm: Kvm, slot: int):
    """kvm_get_dirty_log_protect (slots_lock held): snapshot and clear, re-protect under
    kvm->mmu_lock, then flush after dropping it; with manual protect, the bitmap is returned
    as it is."""
    as_id, id_ = _slot_for_log(vm, slot, "get_dirty_log")
    memslot = vm.memslot_sets[as_id].by_id.get(id_)
    if memslot is None or memslot.dirty_bitmap is None:
        raise KvmError(errno.ENOENT, f"slot={slot:#x}: no such memslot, or it does not log "
                                     "dirty pages")
    vm.hook.sync_dirty_log(vm=vm, slot=memslot)
    bitmap = memslot.dirty_bitmap
    if vm.manual_dirty_log_protect:
        return bitmap.pages()
    snapshot = []
    flush = False
    lock = vm.mmu_lock
    yield from lock.write_lock(DLOG_LOCK_WAIT)
    try:
        for i in sorted(bitmap.nonzero):
            mask = bitmap.xchg(i)
            if not mask:
                continue
            flush = True
            base = i << 6
            word = mask
            while word:
                low = word & -word
                snapshot.append(base + low.bit_length() - 1)
                word ^= low
            yield from _enable_log_dirty_pt_masked(vm, memslot, base, mask)
    finally:
        lock.write_unlock()
    if flush:
        yield DLOG_UNLOCKED_BEFORE_FLUSH
        vm.flush_remote_tlbs_memslot(memslot)
    vm.stats["get_dirty_log"] += 1
    return snapshot


def kvm_clear_dirty_log_protect(vm: Kvm, slot: int, first_page: int, num_pages: int,
                                pages):
    """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect). ``pages`` are slot-relative page
    offsets to clear (the bits userspace sets in its bitmap)."""
    if "manual_dirty_protect" not in vm.arch_capabilities:
        # Not built: kvm_vm_ioctl hands it to kvm_arch_vm_ioctl, whose default answers.
        raise KvmError(vm.arch_info.vm_ioctl_errno, f"clear_dirty_log: {vm.arch_info.name} "
                                                    "has no KVM_CLEAR_DIRTY_LOG")
    as_id, id_ = _slot_for_log(vm, slot, "clear_dirty_log")
    u64("first_page", first_page)
    u32("num_pages", num_pages)
    if isinstance(pages, (str, bytes)) or not isinstance(pages, Iterable):
        raise TypeError(f"pages must be an iterable of ints, not {type(pages).__name__}")
    pages = list(pages)
    for page in pages:
        integer("pages[]", page)
    if first_page & 63:
        raise KvmError(errno.EINVAL, f"first_page={first_page} is not a multiple of 64")
    memslot = vm.memslot_sets[as_id].by_id.get(id_)
    if memslot is None or memslot.dirty_bitmap is None:
        raise KvmError(errno.ENOENT, f"slot={slot:#x}: no such memslot, or it does not log "
                                     "dirty pages")
    npages = memslot.npages
    if (first_page > npages or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages & 63)):
        raise KvmError(errno.EINVAL, f"first_page={first_page}, num_pages={num_pages}: outside "
                                     f"the slot's {npages} pages, or not a multiple of 64 "
                                     "short of its end")
    masks: dict[int, int] = {}
    for page in pages:
        if not first_page <= page < first_page + num_pages:
            raise KvmError(errno.EINVAL, f"pages: {page!r} is outside [first_page, "
                                         "first_page + num_pages)")
        k = (page - first_page) >> 6
        masks[k] = masks.get(k, 0) | 1 << ((page - first_page) & 63)
    vm.hook.sync_dirty_log(vm=vm, slot=memslot)
    bitmap = memslot.dirty_bitmap
    flush = False
    lock = vm.mmu_lock
    yield from lock.write_lock(DLOG_LOCK_WAIT)
    try:
        for k in sorted(masks):
            offset = first_page + (k << 6)
            mask = masks[k] & bitmap.fetch_andnot(offset >> 6, masks[k])
            if mask:
                flush = True
                yield from _enable_log_dirty_pt_masked(vm, memslot, offset, mask)
    finally:
        lock.write_unlock()
    if flush:
        yield DLOG_UNLOCKED_BEFORE_FLUSH
        vm.flush_remote_tlbs_memslot(memslot)
    vm.stats["clear_dirty_log"] += 1


def enable_manual_protect(vm: Kvm, args0: int) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) (kvm_vm_ioctl_enable_cap_generic)."""
    caps = vm.arch_capabilities
    if "manual_dirty_protect" not in caps:
        raise KvmError(errno.EINVAL, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not supported by "
                                     f"{vm.arch_info.name}")
    supported = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if "initially_set" in caps:
        supported = KVM_DIRTY_LOG_MANUAL_CAPS
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if args0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = supported
    if args0 & ~allowed:
        raise KvmError(errno.EINVAL, f"args[0]={args0:#x}: bits {args0 & ~allowed:#x} are not "
                                     "allowed")
    vm.manual_dirty_log_protect = args0


def kvm_dirty_ring_reset(vm: Kvm, ring: DirtyRing):
    """kvm_dirty_ring_reset: reset harvested entries in ring order, batching offsets of
    one slot within 64 of each other into one masked re-protect."""
    count = 0
    cur_slot = cur_offset = mask = 0
    first_round = True
    while True:
        i = ring.reset_index & (ring.size - 1)
        if not ring.flags[i] & KVM_DIRTY_GFN_F_RESET:
            break
        next_slot, next_offset = ring.slots[i], ring.offsets[i]
        ring.flags[i] = 0
        ring.reset_index = (ring.reset_index + 1) & 0xFFFFFFFF
        count += 1
        if not first_round and next_slot == cur_slot:
            delta = next_offset - cur_offset
            if 0 <= delta < 64:
                mask |= 1 << delta
                continue
            if -64 < delta < 0 and ((mask << -delta) & U64_MASK) >> -delta == mask:
                cur_offset = next_offset
                mask = ((mask << -delta) & U64_MASK) | 1
                continue
        if not first_round:
            yield from kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
        cur_slot, cur_offset, mask = next_slot, next_offset, 1
        first_round = False
    if not first_round:
        yield from kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
    if not ring.soft_full():
        ring.soft_full_request = False
    return count


def kvm_reset_dirty_gfn(vm: Kvm, slot_id: int, offset: int, mask: int):
    """kvm_reset_dirty_gfn: silently ignores bad slots and out-of-range offsets."""
    as_id, id_ = slot_id >> 16, slot_id & 0xFFFF
    if as_id >= vm.nr_address_spaces or id_ >= kvm_user_mem_slots(vm.arch_info):
        return
    memslot = vm.memslot_sets[as_id].by_id.get(id_)
    if memslot is None or offset + mask.bit_length() - 1 >= memslot.npages:
        return
    lock = vm.mmu_lock
    yield from lock.write_lock(RING_RESET_BATCH)
    try:
        yield from _enable_log_dirty_pt_masked(vm, memslot, offset, mask)
    finally:
        lock.write_unlock()


def enable_dirty_ring(vm: Kvm, size: int) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) (kvm_vm_ioctl_enable_dirty_log_ring)."""
    if "dirty_ring" not in vm.arch_capabilities:
        raise KvmError(errno.EINVAL, f"KVM_CAP_DIRTY_LOG_RING is not supported by "
                                     f"{vm.arch_info.name}")
    if integer("size_bytes", size) <= 0 or size & (size - 1):
        raise KvmError(errno.EINVAL, f"size_bytes={size!r} is not a power of two")
    rsvd = KVM_DIRTY_RING_RSVD_ENTRIES + vm.cpu_dirty_log_size
    if size < rsvd * KVM_DIRTY_GFN_SIZE or size < vm.page_size:
        raise KvmError(errno.EINVAL, f"size_bytes={size}: smaller than a page or than the "
                                     f"{rsvd} reserved entries")
    if size > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise KvmError(errno.E2BIG, f"size_bytes={size}: more than "
                                    f"{KVM_DIRTY_RING_MAX_ENTRIES} entries")
    if vm.dirty_ring_size:
        raise KvmError(errno.EINVAL, "size_bytes: the dirty ring is already enabled")
    if vm.vcpus:
        raise KvmError(errno.EINVAL, "size_bytes: vCPUs were already created")
    vm.dirty_ring_size = size


def reset_dirty_rings(vm: Kvm):
    """KVM_RESET_DIRTY_RINGS (kvm_vm_ioctl_reset_dirty_pages), a flow: every vCPU's ring
    under slots_lock, each batch under kvm->mmu_lock; one flush at the end, after slots_lock
    is dropped (``dlog_unlocked_before_flush``)."""
    if not vm.dirty_ring_size:
        raise KvmError(errno.EINVAL, "reset_dirty_rings: the dirty ring is not enabled")
    cleared = 0
    yield from vm.slots_lock.lock(DLOG_SLOTS_LOCK_WAIT)
    try:
        for vcpu in vm.vcpus:
            cleared += yield from kvm_dirty_ring_reset(vm, vcpu.dirty_ring)
    finally:
        vm.slots_lock.unlock()
    if cleared:
        # Both locks dropped, the re-protected pages' TLB entries not yet flushed: a vCPU
        # may still write through one (as after GET's unlock).
        if stepping():
            vm.flushes_owed += 1
            try:
                yield DLOG_UNLOCKED_BEFORE_FLUSH
            finally:
                vm.flushes_owed -= 1
        vm.flush_remote_tlbs()
    return cleared


def check_ring_request(vcpu: KvmVcpu) -> None:
    """kvm_dirty_ring_check_request, before entering the guest."""
    ring = vcpu.dirty_ring
    if ring is not None and ring.soft_full_request:
        if ring.soft_full():
            vcpu.vm.stats["exit_dirty_ring_full"] += 1
            raise DirtyRingFullExit()
        ring.soft_full_request = False
