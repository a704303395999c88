"""Memslots: the slot object, per-address-space sets with logarithmic lookups, and
KVM_SET_USER_MEMORY_REGION2 (kvm_set_memory_region -> kvm_set_memslot), shared/reference/core.md
§1.

Linux keeps two copies of each set and swaps them under SRCU so that vCPUs read a stable set
while the writer edits the other. This model is single-threaded, so one set per address space
is edited in place; what the two copies buy in Linux — the INVALID copy published before a
DELETE/MOVE zaps, and a generation that changes on every swap — is kept exactly.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
import structlog
from sortedcontainers import SortedList

from .args import unsigned
from .errors import KvmError
from .uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_GMEM_ONLY,
    KVM_MEMSLOT_INVALID,
    KVM_MR_CREATE,
    KVM_MR_DELETE,
    KVM_MR_FLAGS_ONLY,
    KVM_MR_MOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

if TYPE_CHECKING:
    from .vm import VM

logger = structlog.get_logger(__name__)

U64 = 1 << 64
#: Userspace addresses must lie below this (x86-64 TASK_SIZE_MAX with 4-level paging).
TASK_SIZE = (1 << 47) - PAGE_SIZE


def kvm_user_mem_slots(vm: VM) -> int:
    """KVM_USER_MEM_SLOTS: KVM_MEM_SLOTS_NUM less the arch's internal slots."""
    return KVM_MEM_SLOTS_NUM - vm.arch_info.internal_mem_slots

CHANGE_NAMES = {KVM_MR_CREATE: "create", KVM_MR_DELETE: "delete", KVM_MR_MOVE: "move",
                KVM_MR_FLAGS_ONLY: "flags_only"}


@attrs.define(slots=True, eq=False)
class Memslot:
    """struct kvm_memory_slot. ``arch`` is the backend's own per-slot data (lpage_info, ...).
    ``dirty_bitmap`` is a ``kvmcore.dirty.DirtyBitmap`` while the slot logs dirty pages."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem_file: object = None
    gmem_pgoff: int = 0
    dirty_bitmap: object = None
    arch: dict = attrs.Factory(dict)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def slot_id(self) -> int:
        """The uapi slot number: address-space id in bits 16-31, slot id in bits 0-15."""
        return (self.as_id << 16) | self.id

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def logging(self) -> bool:
        """memslot_is_logging: has a dirty bitmap and is not read-only."""
        return self.dirty_bitmap is not None and not self.readonly

    @property
    def has_gmem(self) -> bool:
        """kvm_slot_has_gmem: the slot was created with KVM_MEM_GUEST_MEMFD."""
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    @property
    def gmem_only(self) -> bool:
        """kvm_memslot_is_gmem_only: every fault, shared or private, is served from gmem."""
        return bool(self.flags & KVM_MEMSLOT_GMEM_ONLY)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """__gfn_to_hva_memslot."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        """hva_to_gfn_memslot."""
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    def gmem_index(self, gfn: int) -> int:
        """kvm_gmem_get_index: the guest_memfd page offset backing ``gfn``."""
        return gfn - self.base_gfn + self.gmem_pgoff

    def supports_huge_mapping(self, gfn: int, size: int) -> bool:
        """Whether a leaf of ``size`` bytes around ``gfn`` may map this slot: the gpa and the
        backing address (userspace_addr, or the guest_memfd offset for a gmem slot) are
        congruent modulo ``size`` and the aligned block lies inside the slot
        (arm64 fault_supports_stage2_huge_mapping; x86's lpage_info slot-alignment rule)."""
        if size <= PAGE_SIZE:
            return True
        npages = size >> PAGE_SHIFT
        backing = (self.gmem_pgoff << PAGE_SHIFT) if self.has_gmem else self.userspace_addr
        if ((self.base_gfn << PAGE_SHIFT) - backing) % size:
            return False
        start = gfn & ~(npages - 1)
        return start >= self.base_gfn and start + npages <= self.base_gfn + self.npages

    def evolve(self, **changes) -> Memslot:
        return attrs.evolve(self, **changes)


class MemslotSet:
    """struct kvm_memslots for one address space: id hash, gfn index, hva index, generation
    and the last-used-slot cache.

    The gfn and hva indexes are plain sorted lists searched with ``bisect`` (C code): a lookup
    is one bisection, whatever the number of slots, and an insert is one memmove — cheaper
    than a balanced tree at KVM's 32,767 slots. The hva index keeps the largest slot length
    alongside, so an intersection query is a bisection plus a walk back over the slots that
    can reach the range (slots may overlap in hva: aliases are legal)."""

    def __init__(self, as_id: int):
        self.as_id = as_id
        self.generation = as_id
        self.by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []
        self._by_gfn: list[Memslot] = []
        self._uaddrs: list[int] = []
        self._by_hva: list[Memslot] = []
        self._lengths = SortedList()
        self.last_used_slot: Memslot | None = None

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Memslot]:
        """Slots ascending by base_gfn."""
        return iter(list(self._by_gfn))

    def insert(self, slot: Memslot) -> None:
        self.by_id[slot.id] = slot
        i = bisect_right(self._bases, slot.base_gfn)
        self._bases.insert(i, slot.base_gfn)
        self._by_gfn.insert(i, slot)
        j = bisect_right(self._uaddrs, slot.userspace_addr)
        self._uaddrs.insert(j, slot.userspace_addr)
        self._by_hva.insert(j, slot)
        self._lengths.add(slot.npages << PAGE_SHIFT)

    def remove(self, slot: Memslot) -> None:
        del self.by_id[slot.id]
        i = bisect_left(self._bases, slot.base_gfn)
        while self._by_gfn[i] is not slot:
            i += 1
        del self._bases[i], self._by_gfn[i]
        j = bisect_left(self._uaddrs, slot.userspace_addr)
        while self._by_hva[j] is not slot:
            j += 1
        del self._uaddrs[j], self._by_hva[j]
        self._lengths.remove(slot.npages << PAGE_SHIFT)
        if self.last_used_slot is slot:
            self.last_used_slot = None

    def replace(self, old: Memslot | None, new: Memslot | None) -> None:
        """kvm_replace_memslot."""
        if old is not None:
            self.remove(old)
        if new is not None:
            self.insert(new)

    def search(self, gfn: int) -> Memslot | None:
        """search_memslots: the slot with base_gfn <= gfn < base_gfn + npages."""
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
        idx = bisect_right(self._bases, gfn) - 1
        if idx < 0:
            return None
        slot = self._by_gfn[idx]
        if gfn < slot.base_gfn + slot.npages:
            self.last_used_slot = slot
            return slot
        return None

    def in_gfn_range(self, start: int, end: int) -> Iterator[Memslot]:
        """kvm_for_each_memslot_in_gfn_range: every slot intersecting ``[start, end)``."""
        slots = self._by_gfn
        idx = max(bisect_right(self._bases, start) - 1, 0)
        while idx < len(slots):
            slot = slots[idx]
            if slot.base_gfn >= end:
                break
            if slot.base_gfn + slot.npages > start:
                yield slot
            idx += 1

    def in_hva_range(self, start: int, end: int) -> list[Memslot]:
        """Every slot whose hva interval intersects ``[start, end)``, ascending by hva."""
        if not self._lengths:
            return []
        longest = self._lengths[-1]
        slots = self._by_hva
        idx = bisect_left(self._uaddrs, end) - 1
        found = []
        while idx >= 0:
            slot = slots[idx]
            if slot.userspace_addr + longest <= start:
                break
            if slot.userspace_addr + (slot.npages << PAGE_SHIFT) > start:
                found.append(slot)
            idx -= 1
        found.reverse()
        return found

    def overlapping(self, base_gfn: int, npages: int, ignore_id: int) -> Memslot | None:
        for slot in self.in_gfn_range(base_gfn, base_gfn + npages):
            if slot.id != ignore_id:
                return slot
        return None


def _einval(message: str) -> KvmError:
    return KvmError(errno.EINVAL, message)


def check_memory_region_flags(vm: VM, flags: int) -> None:
    """check_memory_region_flags: LOG_DIRTY_PAGES, GUEST_MEMFD where guest_memfd exists (and
    then no dirty logging), READONLY where the arch has read-only memory (never with gmem)."""
    caps = vm.capabilities
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if "gmem" in caps:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    if "readonly_mem" in caps and not flags & KVM_MEM_GUEST_MEMFD:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        raise _einval(f"flags={flags:#x}: bits {flags & ~valid:#x} are not valid for this VM"
                      + (" (guest_memfd slots cannot log dirty pages or be read-only)"
                         if flags & KVM_MEM_GUEST_MEMFD else ""))


def kvm_set_memory_region(vm: VM, slot: int, flags: int, guest_phys_addr: int,
                          memory_size: int, userspace_addr: int, guest_memfd=None,
                          guest_memfd_offset: int = 0) -> None:
    """KVM_SET_USER_MEMORY_REGION2: kvm_vm_ioctl_set_memory_region + kvm_set_memory_region,
    every check in Linux's order (reference §1.2-1.3), then kvm_set_memslot."""
    for name, value, bits in (("slot", slot, 32), ("flags", flags, 32),
                              ("guest_phys_addr", guest_phys_addr, 64),
                              ("memory_size", memory_size, 64),
                              ("userspace_addr", userspace_addr, 64),
                              ("guest_memfd_offset", guest_memfd_offset, 64)):
        unsigned(name, value, bits)
    user_slots = kvm_user_mem_slots(vm)
    if slot & 0xFFFF >= user_slots:
        raise _einval(f"slot={slot:#x}: id {slot & 0xFFFF} is not a user memslot "
                      f"(< {user_slots})")
    as_id, id_ = slot >> 16, slot & 0xFFFF
    check_memory_region_flags(vm, flags)
    mask = vm.page_size - 1  # PAGE_SIZE: the host's, which may be 16K or 64K
    if memory_size & mask:
        raise _einval(f"memory_size={memory_size:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if guest_phys_addr & mask:
        raise _einval(f"guest_phys_addr={guest_phys_addr:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if userspace_addr & mask:
        raise _einval(f"userspace_addr={userspace_addr:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if userspace_addr + memory_size > TASK_SIZE:
        raise _einval(f"userspace_addr={userspace_addr:#x}+memory_size fails access_ok()")
    if flags & KVM_MEM_GUEST_MEMFD and (guest_memfd_offset & mask
                                        or guest_memfd_offset + memory_size >= U64):
        raise _einval(f"guest_memfd_offset={guest_memfd_offset:#x} is not aligned to "
                      f"PAGE_SIZE {vm.page_size:#x} or offset + size wraps")
    if as_id >= vm.nr_address_spaces or id_ >= KVM_MEM_SLOTS_NUM:
        raise _einval(f"slot={slot:#x}: address space {as_id} does not exist "
                      f"(this VM has {vm.nr_address_spaces})")
    if guest_phys_addr + memory_size >= U64:
        raise _einval("guest_phys_addr + memory_size wraps")
    npages = memory_size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise _einval(f"memory_size={memory_size:#x} exceeds KVM_MEM_MAX_NR_PAGES pages")
    slots = vm.memslot_sets[as_id]
    old = slots.by_id.get(id_)
    base_gfn = guest_phys_addr >> PAGE_SHIFT
    if not memory_size:
        if old is None or not old.npages:
            raise _einval(f"slot={slot:#x}: cannot delete a slot that does not exist")
        if vm.nr_memslot_pages < old.npages:
            raise KvmError(errno.EIO, "nr_memslot_pages underflow")
        change = KVM_MR_DELETE
        new = None
    else:
        if old is None:
            if vm.nr_memslot_pages + npages >= U64:
                raise _einval("memory_size: total memslot pages would wrap")
            change = KVM_MR_CREATE
        else:
            if flags & KVM_MEM_GUEST_MEMFD:
                raise _einval(f"slot={slot:#x}: guest_memfd memslots are immutable")
            if (userspace_addr != old.userspace_addr or npages != old.npages
                    or (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)):
                raise _einval(f"slot={slot:#x}: a memslot cannot be resized, change its "
                              "userspace_addr, or toggle READONLY/GUEST_MEMFD")
            if base_gfn != old.base_gfn:
                change = KVM_MR_MOVE
            elif flags != old.flags & 0xFFFF:
                change = KVM_MR_FLAGS_ONLY
            else:
                return
        if change in (KVM_MR_CREATE, KVM_MR_MOVE):
            other = slots.overlapping(base_gfn, npages, id_)
            if other is not None:
                raise KvmError(errno.EEXIST,
                               f"guest_phys_addr={guest_phys_addr:#x}: overlaps slot "
                               f"{other.slot_id:#x} [{other.base_gfn << PAGE_SHIFT:#x}, "
                               f"{other.end_gfn << PAGE_SHIFT:#x})")
        new = Memslot(as_id, id_, base_gfn, npages, flags, userspace_addr)
        if change == KVM_MR_FLAGS_ONLY:
            # The arch metadata (lpage_info, ...) depends on base_gfn only: FLAGS_ONLY keeps it,
            # MOVE gets it anew from the backend's prepare_memory_region.
            new.arch = old.arch
    if new is not None and flags & KVM_MEM_GUEST_MEMFD:
        from .gmem import kvm_gmem_bind

        kvm_gmem_bind(vm, new, guest_memfd, guest_memfd_offset)
    try:
        kvm_set_memslot(vm, old, new, change)
    except BaseException:
        if new is not None and new.gmem_file is not None:
            from .gmem import kvm_gmem_unbind

            kvm_gmem_unbind(new)
        raise


def _swap_generation(vm: VM, as_id: int) -> None:
    """kvm_swap_active_memslots' generation update: bit 63 while in flux, then
    + nr_address_spaces."""
    slots = vm.memslot_sets[as_id]
    if vm.mn_active_invalidate_count:
        # Linux waits here for invalidate_range_end; a single thread would wait forever.
        raise RuntimeError("memslot update while an MMU-notifier invalidation is open: "
                           "Linux would wait for invalidate_range_end")
    slots.generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    gen = (slots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + vm.nr_address_spaces
    slots.generation = gen
    slots.last_used_slot = None


def kvm_set_memslot(vm: VM, old: Memslot | None, new: Memslot | None, change: int) -> None:
    """kvm_set_memslot: invalidate (DELETE/MOVE), prepare, install, commit (reference §1.4)."""
    from .dirty import prepare_dirty_bitmap

    as_id = (old or new).as_id
    slots = vm.memslot_sets[as_id]
    invalid = None
    if change in (KVM_MR_DELETE, KVM_MR_MOVE):
        # kvm_invalidate_memslot: publish an INVALID copy, then zap the old range.
        invalid = old.evolve(flags=old.flags | KVM_MEMSLOT_INVALID)
        slots.replace(old, invalid)
        _swap_generation(vm, as_id)
        vm.hook.flush_shadow_memslot(vm=vm, slot=old)
    try:
        if change != KVM_MR_DELETE:
            prepare_dirty_bitmap(vm, old, new)
        vm.hook.prepare_memory_region(vm=vm, old=old, new=new, change=change)
    except BaseException:
        if invalid is not None:
            slots.replace(invalid, old)
            _swap_generation(vm, as_id)
        raise
    if change == KVM_MR_CREATE:
        slots.replace(None, new)
    elif change == KVM_MR_DELETE:
        slots.replace(invalid, None)
    elif change == KVM_MR_MOVE:
        slots.replace(invalid, new)
    else:
        slots.replace(old, new)
    _swap_generation(vm, as_id)
    # kvm_commit_memory_region
    if change == KVM_MR_DELETE:
        vm.nr_memslot_pages -= old.npages
    elif change == KVM_MR_CREATE:
        vm.nr_memslot_pages += new.npages
    old_log = bool(old and old.flags & KVM_MEM_LOG_DIRTY_PAGES)
    new_log = bool(new and new.flags & KVM_MEM_LOG_DIRTY_PAGES)
    vm.nr_memslots_dirty_logging += new_log - old_log
    vm.hook.commit_memory_region(vm=vm, old=old, new=new, change=change)
    if change == KVM_MR_DELETE and old.gmem_file is not None:
        from .gmem import kvm_gmem_unbind

        kvm_gmem_unbind(old)
    vm.stats[f"memslot_{CHANGE_NAMES[change]}"] += 1
    vm.trace(f"memslot.{CHANGE_NAMES[change]}", slot=(old or new).slot_id,
             gpa=(new or old).base_gfn << PAGE_SHIFT, size=(new or old).npages << PAGE_SHIFT,
             flags=(new or old).flags)
