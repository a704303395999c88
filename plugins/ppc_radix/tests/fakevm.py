"""A minimal stand-in for the core's VM services, for tests of the table code alone."""

from __future__ import annotations

import collections
import types

from kvmcore.invalidate import InvalidateState
from kvmcore.locks import Mutex


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


class FakeHost:
    """The host page table as find_kvm_host_pte reads it: every hva is mapped by a host page
    (or THP / hugetlb block) of ``size`` bytes whose first frame is ``base`` (byte address),
    or, without ``base``, an identity-like layout at 0x40_0000_0000 + hva."""

    def __init__(self, size=4096, base=None, writable=True, prot="rw", pfnmap=False):
        self.size, self.base, self.writable = size, base, writable
        self.vma = types.SimpleNamespace(prot=prot, io_pfnmap=pfnmap)
        self.present = True

    def lookup_pte(self, hva):
        if not self.present:
            return None
        pa = (self.base if self.base is not None else
              0x40_0000_0000 + (hva & ~(self.size - 1))) + (hva & (self.size - 1))
        return pa >> 12, self.writable, self.size

    def find_vma(self, hva):
        return self.vma


class FakeVM:
    def __init__(self, slots=(), host=None):
        self.host = host if host is not None else FakeHost()
        self.stats = collections.Counter()
        self.mmu_invalidate = InvalidateState()
        self.slots_lock = Mutex("slots_lock")       # no memslot update runs here
        self.slots = list(slots)
        self.flushed: list[tuple[int, int]] = []
        self.dirty: list[int] = []
        self.events: list[tuple] = []

    def mmu_invalidate_begin(self):
        self.mmu_invalidate.begin()

    def mmu_invalidate_range_add(self, start, end):
        self.mmu_invalidate.range_add(start, end)

    def mmu_invalidate_end(self):
        self.mmu_invalidate.end()

    def mmu_invalidate_seq_bump(self):
        self.mmu_invalidate.seq_bump()

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

    @property
    def memslot_sets(self):
        """Address space 0's slots with MemslotSet's two lookups."""
        return [_Slots(self.slots)]

    def gfn_to_memslot(self, gfn, as_id=0):
        for s in self.slots:
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None


class _Slots:
    def __init__(self, slots):
        self.slots = sorted(slots, key=lambda s: s.base_gfn)

    def search(self, gfn):
        return next((s for s in self.slots if s.base_gfn <= gfn < s.base_gfn + s.npages), None)

    def in_gfn_range(self, start, end):
        return (s for s in self.slots if s.base_gfn < end and start < s.base_gfn + s.npages)
