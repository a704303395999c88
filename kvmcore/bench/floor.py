"""The CPython floor of a guest page fault (issue 14): every step of a first-touch 4 KiB fault,
inlined over plain containers, so a model figure can be given as a ratio to what no Python
implementation of the same steps can beat on the same machine in the same run.

``floor_fault(n)`` performs, for ``n`` distinct gfns, a read of untouched anonymous memory:
the vCPU TLB dict miss; the memslot bisection; the attribute range bisection; a fault record
(a tuple); the mmu_invalidate_seq snapshot; hva -> VMA bisection -> host page dict (the shared
zero page when untouched); the in-progress / seq retry check; a 4-level ``array('Q')`` walk that
allocates missing tables and installs the leaf; a stats counter; the hardware walk again,
setting the accessed bit; the TLB fill; the byte read. ``write=True`` is the write variant: the
first touch allocates the host page (a frame number, and its contents at the store).
``bare_walk(n)`` is the 4-level walk-and-install alone.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections import Counter

PAGE = 4096
#: Table addresses live far above data frames, as the backends' TableStores put them.
TABLE_BASE = 1 << 50
PRESENT = 0x7
ACCESSED = 1 << 8
DIRTY = 1 << 9
ADDR = ~0xFFF & ((1 << 52) - 1)


def floor_fault(n: int, write: bool = False) -> float:
    """Seconds for ``n`` first-touch faults at distinct gfns (reads, or writes), inlined."""
    tlb: dict = {}
    slot_starts, slots = [0], [(0, n, 1 << 32)]                # base_gfn, npages, hva
    attr_starts, attr_values = [0], [0]
    vma_starts, vmas = [1 << 32], [(1 << 32, (1 << 32) + n * PAGE, "rw")]
    host_pages: dict = {}
    frames: dict = {}
    zero_pfn = 0x1000
    next_pfn = [0x1001]
    seq, in_progress = [0], [0]
    root = array("Q", bytes(PAGE))
    tables = {TABLE_BASE: root}
    next_table = [TABLE_BASE + PAGE]
    stats: Counter = Counter()
    out = []
    data = b"x"
    t0 = time.perf_counter()
    for gfn in range(n):
        gpa = gfn << 12
        e = tlb.get((gfn, None))
        if e is None or (write and not e[2]):
            slot = slots[bisect_right(slot_starts, gfn) - 1]
            if gfn >= slot[0] + slot[1]:
                raise AssertionError("MMIO")
            attrs = attr_values[bisect_right(attr_starts, gfn) - 1]
            fault = (gpa, gfn, write, bool(attrs), slot)
            mmu_seq = seq[0]
            hva = slot[2] + ((fault[1] - slot[0]) << 12)
            vma = vmas[bisect_right(vma_starts, hva) - 1]
            if hva >= vma[1]:
                raise AssertionError("SIGSEGV")
            pfn = host_pages.get(hva >> 12)
            if pfn is None:
                if write:
                    pfn = next_pfn[0]
                    next_pfn[0] += 1
                else:
                    pfn = zero_pfn
                host_pages[hva >> 12] = pfn
            if in_progress[0] or seq[0] != mmu_seq:
                continue
            t = root
            for shift in (27, 18, 9):
                idx = (gfn >> shift) & 511
                pte = t[idx]
                if not pte:
                    pa = next_table[0]
                    next_table[0] = pa + PAGE
                    tables[pa] = array("Q", bytes(PAGE))
                    t[idx] = pte = pa | PRESENT
                t = tables[pte & ADDR]
            t[gfn & 511] = pfn << 12 | (PRESENT if write else 0x5)
            stats["faults"] += 1
            t = root
            for shift in (27, 18, 9):
                t = tables[t[(gfn >> shift) & 511] & ADDR]
            idx = gfn & 511
            pte = t[idx] | ACCESSED | (DIRTY if write else 0)
            t[idx] = pte
            e = tlb[(gfn, None)] = (gfn, pte >> 12 & 0xFFFFFFFFFF, write, False, write)
        pfn = e[1]
        if write:
            frame = frames.get(pfn)
            if frame is None:
                frame = frames[pfn] = bytearray(PAGE)
            frame[0:1] = data
        else:
            frame = frames.get(pfn)
            out.append(bytes(1) if frame is None else bytes(frame[0:1]))
    return time.perf_counter() - t0


def bare_walk(n: int) -> float:
    """Seconds for ``n`` 4-level ``array('Q')`` walks that allocate missing tables and install
    a leaf: the page-table work alone."""
    root = array("Q", bytes(PAGE))
    tables = {TABLE_BASE: root}
    next_table = TABLE_BASE + PAGE
    t0 = time.perf_counter()
    for gfn in range(n):
        t = root
        for shift in (27, 18, 9):
            idx = (gfn >> shift) & 511
            pte = t[idx]
            if not pte:
                pa = next_table
                next_table = pa + PAGE
                tables[pa] = array("Q", bytes(PAGE))
                t[idx] = pte = pa | PRESENT
            t = tables[pte & ADDR]
        t[gfn & 511] = gfn << 12 | PRESENT
    return time.perf_counter() - t0
