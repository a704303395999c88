"""Memslots: the slot object, per-address-space sets with logarithmic lookups, and
KVM_SET_USER_MEMORY_REGION2 (kvm_set_memory_region -> kvm_set_memslot), shared/reference/core.md
§1.

Linux keeps two copies of each set and swaps them under SRCU so that vCPUs read a stable set
while the writer edits the other. This model is single-threaded, so one set per address space
is edited in place; what the two copies buy in Linux — the INVALID copy published before a
DELETE/MOVE zaps, and a generation that changes on every swap — is kept exactly.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs
import structlog
from sortedcontainers import SortedList

from .uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
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
    from .arch import ArchInfo

logger = structlog.get_logger(__name__)

U64 = 1 << 64
#: Userspace addresses must lie below this (x86-64 TASK_SIZE_MAX with 4-level paging).
TASK_SIZE = (1 << 47) - PAGE_SIZE


def dirty_logging_toggled(old: Memslot | None, new: Memslot | None) -> int:
    """The test every kvm_arch_commit_memory_region makes first: whether the update flips
    KVM_MEM_LOG_DIRTY_PAGES (``(old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES``, a missing
    slot having no flags). +1 when it turns logging on, -1 off, 0 when it does neither."""
    old_flags = old.flags if old is not None else 0
    new_flags = new.flags if new is not None else 0
    if not (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
        return 0
    return 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1


def kvm_user_mem_slots(arch_info: ArchInfo) -> int:
    """KVM_USER_MEM_SLOTS: KVM_MEM_SLOTS_NUM less the arch's internal slots."""
    return KVM_MEM_SLOTS_NUM - arch_info.internal_mem_slots

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
    #: kvm_free_memslot has freed it (the model keeps the object, so that a flow still
    #: holding it, as KASAN would report, is named: ``Kvm.freed_slot_uses``).
    freed: bool = False

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
        #: The longest slot's length in bytes (``_lengths[-1]``, read by every hva walk).
        self._longest = 0
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
        self._longest = self._lengths[-1]

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
        self._longest = self._lengths[-1] if self._lengths else 0
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
        longest = self._longest
        if not longest:
            return []
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
