"""Dirty logging: per-slot bitmaps, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, manual protect,
and the per-vCPU dirty ring (virt/kvm/kvm_main.c, virt/kvm/dirty_ring.c; reference §6).

How a write is noticed is the backend's business (write protection, PML, Power C bits); the
backend reports it through ``vm.mark_page_dirty_in_slot`` (mark_page_dirty_in_slot) and
re-arms tracking in ``enable_log_dirty_pt_masked``.
"""

from __future__ import annotations

import errno
from array import array
from typing import TYPE_CHECKING

import structlog

from .errors import KvmError
from .memslots import kvm_user_mem_slots
from .uapi import (
    KVM_DIRTY_GFN_F_DIRTY,
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
    from .vm import VM, Vcpu

logger = structlog.get_logger(__name__)

U64_MASK = (1 << 64) - 1


class DirtyBitmap:
    """A slot's dirty bitmap: 64-bit little-endian words, plus the set of words that may be
    non-zero so that GET costs what is dirty, not the slot size. (Linux allocates twice the
    size and uses the second half as scratch for the snapshot; the model returns the
    snapshot as a list instead.)"""

    __slots__ = ("npages", "words", "nonzero")

    def __init__(self, npages: int, initially_set: bool = False):
        self.npages = npages
        nwords = (npages + 63) >> 6
        self.words = array("Q", bytes(8 * nwords))
        self.nonzero: set[int] = set()
        if initially_set:
            for i in range(nwords):
                self.words[i] = U64_MASK
            if npages & 63:
                self.words[nwords - 1] = (1 << (npages & 63)) - 1
            self.nonzero = set(range(nwords))

    def set(self, rel: int) -> None:
        i = rel >> 6
        self.words[i] |= 1 << (rel & 63)
        self.nonzero.add(i)

    def test(self, rel: int) -> bool:
        return bool(self.words[rel >> 6] >> (rel & 63) & 1)

    def xchg(self, i: int) -> int:
        word = self.words[i]
        self.words[i] = 0
        self.nonzero.discard(i)
        return word

    def fetch_andnot(self, i: int, mask: int) -> int:
        old = self.words[i]
        new = old & ~mask & U64_MASK
        self.words[i] = new
        if not new:
            self.nonzero.discard(i)
        return old

    def pages(self) -> list[int]:
        out = []
        words = self.words
        for i in sorted(self.nonzero):
            word = words[i]
            base = i << 6
            while word:
                low = word & -word
                out.append(base + low.bit_length() - 1)
                word ^= low
        return out


def use_dirty_bitmap(vm: VM) -> bool:
    """kvm_use_dirty_bitmap."""
    return not vm.dirty_ring_size or vm.dirty_ring_with_bitmap


def prepare_dirty_bitmap(vm: VM, old: Memslot | None, new: Memslot) -> None:
    """The bitmap part of kvm_prepare_memory_region."""
    if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
        new.dirty_bitmap = None
    elif old is not None and old.dirty_bitmap is not None:
        new.dirty_bitmap = old.dirty_bitmap
    elif use_dirty_bitmap(vm):
        new.dirty_bitmap = DirtyBitmap(new.npages, vm.dirty_log_manual_protect_and_init_set())


def mark_page_dirty_in_slot(vm: VM, slot: Memslot | None, gfn: int) -> None:
    """mark_page_dirty_in_slot: the running vCPU's ring if rings are on, else the bitmap."""
    if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    rel = gfn - slot.base_gfn
    vcpu = vm.running_vcpu
    if vm.dirty_ring_size and vcpu is not None:
        vcpu.dirty_ring.push(slot.slot_id, rel)
    elif slot.dirty_bitmap is not None:
        slot.dirty_bitmap.set(rel)
    else:
        # Linux WARNs: a write with rings on and no running vCPU is lost.
        vm.stats["dirty_lost"] += 1


def _slot_for_log(vm: VM, slot: int, op: str):
    if vm.dirty_ring_size and not vm.dirty_ring_with_bitmap:
        raise KvmError(errno.ENXIO, f"{op}: the dirty ring is in use without bitmaps")
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < 1 << 32:
        raise KvmError(errno.EINVAL, f"slot={slot!r} is not a u32")
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if as_id >= vm.nr_address_spaces or id_ >= kvm_user_mem_slots(vm):
        raise KvmError(errno.EINVAL, f"slot={slot:#x}: bad address space or slot id")
    return as_id, id_


def kvm_get_dirty_log_protect(vm: VM, slot: int) -> list[int]:
    """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): snapshot and clear, re-protect,
    flush; with manual protect, the bitmap is returned as it is."""
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
    with vm.mmu_lock:
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
            vm.hook.enable_log_dirty_pt_masked(vm=vm, slot=memslot, gfn_offset=base, mask=mask)
    if flush:
        vm.flush_remote_tlbs_memslot(memslot)
    vm.stats["get_dirty_log"] += 1
    return snapshot


def kvm_clear_dirty_log_protect(vm: VM, slot: int, first_page: int, num_pages: int,
                                pages) -> None:
    """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect). ``pages`` are slot-relative page
    offsets to clear (the bits userspace sets in its bitmap)."""
    if "manual_dirty_protect" not in vm.arch_capabilities:
        # Not built: kvm_vm_ioctl hands it to kvm_arch_vm_ioctl, whose default answers.
        raise KvmError(vm.arch_info.vm_ioctl_errno, f"clear_dirty_log: {vm.arch_info.name} "
                                                    "has no KVM_CLEAR_DIRTY_LOG")
    as_id, id_ = _slot_for_log(vm, slot, "clear_dirty_log")
    for name, value in (("first_page", first_page), ("num_pages", num_pages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KvmError(errno.EINVAL, f"{name}={value!r} is not an unsigned integer")
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
        if (not isinstance(page, int) or isinstance(page, bool)
                or not first_page <= page < first_page + num_pages):
            raise KvmError(errno.EINVAL, f"pages: {page!r} is outside [first_page, "
                                         "first_page + num_pages)")
        k = (page - first_page) >> 6
        masks[k] = masks.get(k, 0) | 1 << ((page - first_page) & 63)
    vm.hook.sync_dirty_log(vm=vm, slot=memslot)
    bitmap = memslot.dirty_bitmap
    flush = False
    with vm.mmu_lock:
        for k in sorted(masks):
            offset = first_page + (k << 6)
            mask = masks[k] & bitmap.fetch_andnot(offset >> 6, masks[k])
            if mask:
                flush = True
                vm.hook.enable_log_dirty_pt_masked(vm=vm, slot=memslot, gfn_offset=offset,
                                                   mask=mask)
    if flush:
        vm.flush_remote_tlbs_memslot(memslot)
    vm.stats["clear_dirty_log"] += 1


def enable_manual_protect(vm: VM, args0: int) -> None:
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


class DirtyRing:
    """struct kvm_dirty_ring: ``size`` entries of (flags, slot, offset); the free-running u32
    indices ``dirty_index`` (KVM's producer) and ``reset_index`` (KVM's consumer), and
    ``fetch_index``, where userspace harvests next."""

    def __init__(self, size_bytes: int, cpu_dirty_log_size: int):
        self.size = size_bytes // KVM_DIRTY_GFN_SIZE
        self.soft_limit = self.size - (KVM_DIRTY_RING_RSVD_ENTRIES + cpu_dirty_log_size)
        self.flags = array("I", bytes(4 * self.size))
        self.slots = array("I", bytes(4 * self.size))
        self.offsets = array("Q", bytes(8 * self.size))
        self.dirty_index = 0
        self.reset_index = 0
        self.fetch_index = 0
        self.soft_full_request = False

    @property
    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & 0xFFFFFFFF

    def soft_full(self) -> bool:
        return self.used >= self.soft_limit

    def push(self, slot_id: int, offset: int) -> None:
        """kvm_dirty_ring_push."""
        if self.used >= self.size:
            raise RuntimeError("dirty ring overflow: KVM would WARN and lose the entry")
        i = self.dirty_index & (self.size - 1)
        self.slots[i] = slot_id
        self.offsets[i] = offset
        self.flags[i] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = (self.dirty_index + 1) & 0xFFFFFFFF
        if self.soft_full():
            self.soft_full_request = True

    def harvest(self) -> list[tuple[int, int]]:
        """What userspace does: collect DIRTY entries in order and mark them RESET."""
        out = []
        while True:
            i = self.fetch_index & (self.size - 1)
            if not self.flags[i] & KVM_DIRTY_GFN_F_DIRTY or self.flags[i] & KVM_DIRTY_GFN_F_RESET:
                break
            out.append((self.slots[i], self.offsets[i]))
            self.flags[i] |= KVM_DIRTY_GFN_F_RESET
            self.fetch_index = (self.fetch_index + 1) & 0xFFFFFFFF
        return out

    def pending(self) -> set[tuple[int, int]]:
        """Entries pushed and not yet reset: (slot_id, offset)."""
        out = set()
        idx = self.reset_index
        while idx != self.dirty_index:
            i = idx & (self.size - 1)
            out.add((self.slots[i], self.offsets[i]))
            idx = (idx + 1) & 0xFFFFFFFF
        return out

    def reset(self, vm: VM) -> int:
        """kvm_dirty_ring_reset: reset harvested entries in ring order, batching offsets of
        one slot within 64 of each other into one masked re-protect."""
        count = 0
        cur_slot = cur_offset = mask = 0
        first_round = True
        while True:
            i = self.reset_index & (self.size - 1)
            if not self.flags[i] & KVM_DIRTY_GFN_F_RESET:
                break
            next_slot, next_offset = self.slots[i], self.offsets[i]
            self.flags[i] = 0
            self.reset_index = (self.reset_index + 1) & 0xFFFFFFFF
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
                kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
            cur_slot, cur_offset, mask = next_slot, next_offset, 1
            first_round = False
        if not first_round:
            kvm_reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
        if not self.soft_full():
            self.soft_full_request = False
        return count


def kvm_reset_dirty_gfn(vm: VM, slot_id: int, offset: int, mask: int) -> None:
    """kvm_reset_dirty_gfn: silently ignores bad slots and out-of-range offsets."""
    as_id, id_ = slot_id >> 16, slot_id & 0xFFFF
    if as_id >= vm.nr_address_spaces or id_ >= kvm_user_mem_slots(vm):
        return
    memslot = vm.memslot_sets[as_id].by_id.get(id_)
    if memslot is None or offset + mask.bit_length() - 1 >= memslot.npages:
        return
    with vm.mmu_lock:
        vm.hook.enable_log_dirty_pt_masked(vm=vm, slot=memslot, gfn_offset=offset, mask=mask)


def enable_dirty_ring(vm: VM, size: int) -> None:
    """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) (kvm_vm_ioctl_enable_dirty_log_ring)."""
    if "dirty_ring" not in vm.arch_capabilities:
        raise KvmError(errno.EINVAL, f"KVM_CAP_DIRTY_LOG_RING is not supported by "
                                     f"{vm.arch_info.name}")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size & (size - 1):
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


def reset_dirty_rings(vm: VM) -> int:
    """KVM_RESET_DIRTY_RINGS (kvm_vm_ioctl_reset_dirty_pages)."""
    if not vm.dirty_ring_size:
        raise KvmError(errno.EINVAL, "reset_dirty_rings: the dirty ring is not enabled")
    cleared = 0
    for vcpu in vm.vcpus:
        cleared += vcpu.dirty_ring.reset(vm)
    if cleared:
        vm.flush_remote_tlbs()
    return cleared


def check_ring_request(vcpu: Vcpu) -> None:
    """kvm_dirty_ring_check_request, before entering the guest."""
    from .exits import DirtyRingFullExit

    ring = vcpu.dirty_ring
    if ring is not None and ring.soft_full_request:
        if ring.soft_full():
            vcpu.vm.stats["exit_dirty_ring_full"] += 1
            raise DirtyRingFullExit()
        ring.soft_full_request = False
