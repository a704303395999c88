"""A minimal stand-in for the core's VM services, for tests of the table code alone."""

from __future__ import annotations

import collections

from kvmcore.invalidate import InvalidateState


class FakeSlot:
    def __init__(self, base_gfn, npages, userspace_addr=0, flags=0, logging=False, id=0):
        self.as_id, self.id = 0, id
        self.base_gfn, self.npages = base_gfn, npages
        self.userspace_addr, self.flags = userspace_addr, flags
        self.dirty_bitmap = set() if logging else None

    def supports_huge_mapping(self, gfn, size):
        npages = size >> 12
        if ((self.base_gfn << 12) - self.userspace_addr) % size:
            return False
        start = gfn & ~(npages - 1)
        return start >= self.base_gfn and start + npages <= self.base_gfn + self.npages


class FakeVM:
    def __init__(self, slots=()):
        self.stats = collections.Counter()
        self.mmu_invalidate = InvalidateState()
        self.slots = list(slots)
        self.flushed: list[tuple[int, int]] = []
        self.dirty: list[int] = []
        self.events: list[tuple] = []

    def flush_remote_tlbs_range(self, start_gfn, npages):
        self.flushed.append((start_gfn, npages))

    def mark_page_dirty_in_slot(self, slot, gfn):
        self.dirty.append(gfn)
        if slot.dirty_bitmap is not None:
            slot.dirty_bitmap.add(gfn - slot.base_gfn)

    def trace(self, event, **fields):
        self.events.append((event, fields))

    def all_memslots(self):
        return list(self.slots)

    def gfn_to_memslot(self, gfn, as_id=0):
        for s in self.slots:
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None
