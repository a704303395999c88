"""Benchmarks of the x86_tdp backend (run: ``python benchmarks/bench_tdp.py``).

1. Table memory: map 1 GiB densely with 4K leaves (KVM_PRE_FAULT_MEMORY over a 4K-backed
   slot) and report page-table bytes per mapped page (goal <= 9).
2. 4K fault throughput: guest writes to distinct, never-touched 4K pages (each one EPT
   violation -> fault path -> host fault-in -> map_leaf -> walk again), against a bare 4-level
   ``array('Q')`` walk that installs a leaf the same way (allocating tables on the way), in
   the same run (goal: ratio <= 8).
3. The CPython floor of (2): the same steps written as one function over plain containers
   (no hooks, records, checks, stats or trace), so the ratio (2) can reach is visible.
"""

from __future__ import annotations

import argparse
import time
from array import array
from bisect import bisect_right

from kvmcore import VM, HostMemory

PAGE = 4096
SZ_1G = 1 << 30


def table_bytes_per_page(size: int = SZ_1G) -> tuple[float, int, int]:
    host = HostMemory()
    vm = VM(arch="x86_tdp", host=host)
    hva = host.mmap(size)
    vm.set_user_memory_region(0, 0, size, hva)
    vcpu = vm.create_vcpu(0)
    gpa, left = vcpu.pre_fault_memory(0, size)
    assert left == 0, (gpa, left)
    npages = size // PAGE
    leaves = sum(1 for _ in vm.mappings())
    assert leaves == npages, leaves
    total = vm.page_table_bytes()
    return total / npages, total, npages


def fault_throughput(n: int) -> float:
    host = HostMemory()
    vm = VM(arch="x86_tdp", host=host)
    size = n * PAGE
    hva = host.mmap(size)
    vm.set_user_memory_region(0, 0, size, hva)
    vcpu = vm.create_vcpu(0)
    data = b"x"
    write = vcpu.write
    t0 = time.perf_counter()
    for i in range(n):
        write(i * PAGE, data)
    dt = time.perf_counter() - t0
    assert vm.stats["faults"] == n, vm.stats["faults"]
    return n / dt


def map_leaf_throughput(n: int) -> float:
    """The backend's share of a fault: map_leaf (hugepage adjust, the TDP MMU walk, table
    allocation, make_spte, the SPTE-change checks) on PageFaults whose pfn is already known."""
    from kvmcore.records import PageFault

    vm = VM(arch="x86_tdp")
    size = n * PAGE
    vm.set_user_memory_region(0, 0, size, vm.host.mmap(size))
    slot = vm.gfn_to_memslot(0)
    faults = [PageFault(addr=i * PAGE, gfn=i, write=True, slot=slot, pfn=0x100000 + i,
                        map_writable=True) for i in range(n)]
    map_leaf = vm.backend.map_leaf
    vm.mmu_lock.acquire()
    t0 = time.perf_counter()
    for f in faults:
        map_leaf(vm=vm, fault=f)
    dt = time.perf_counter() - t0
    vm.mmu_lock.release()
    return n / dt


NP = 1 << 63


def bare_walk_throughput(n: int) -> float:
    """A bare 4-level radix install: walk 4 arrays of 512 entries, allocate a table where the
    entry is empty, write the leaf. Tables are found by index in a list (no hashing)."""
    tables = [array("Q", [NP]) * 512]
    t0 = time.perf_counter()
    for i in range(n):
        addr = i * PAGE
        t = tables[0]
        for shift in (39, 30, 21):
            idx = (addr >> shift) & 511
            e = t[idx]
            if e == NP:
                tables.append(array("Q", [NP]) * 512)
                e = t[idx] = (len(tables) - 1) << 12 | 0x807
            t = tables[e >> 12 & 0xFFFFFFFFF]
        t[(addr >> 12) & 511] = (addr & ~0xFFF) | 0x807
    dt = time.perf_counter() - t0
    return n / dt


def inline_fault_floor(n: int) -> float:
    """The steps of one end-to-end 4K write fault in a single function over plain containers:
    TLB miss, the EPT walk that fails, memslot binary search, invalidation-seq snapshot, host
    PTE lookup and first touch (a fresh frame), the staleness check, the 4-level walk that
    allocates tables and installs make_spte's bits, the walk again with A/D set, the TLB
    fill and the store. No hooks, no records, no argument checks, no statistics: no
    implementation of these steps in CPython is faster, so bare_walk / this is the best
    ratio a fault path can reach here."""
    tables = [array("Q", [NP]) * 512]
    slot_base, slot_npages, slot_hva = [0], [n], [1 << 40]
    host_ptes: dict = {}
    frames: dict = {}
    next_pfn = 0x1000
    tlb: dict = {}
    seq = 0
    faults = 0
    data = b"x"
    t0 = time.perf_counter()
    for i in range(n):
        gpa = i * PAGE
        gfn = gpa >> 12
        e = tlb.get(gfn)
        while e is None:
            t = tables[0]
            for shift in (39, 30, 21, 12):
                spte = t[(gpa >> shift) & 511]
                if not spte & 0x7 or shift == 12:
                    break
                t = tables[spte >> 12 & 0xFFFFFFFFF]
            if spte & 0x7:
                t[gfn & 511] = spte | 0x300           # A/D
                e = tlb[gfn] = (spte >> 12) & 0xFFFFFFFFF
                break
            faults += 1
            k = bisect_right(slot_base, gfn) - 1
            if k < 0 or gfn >= slot_base[k] + slot_npages[k]:
                raise AssertionError("MMIO")
            mmu_seq = seq
            hva = slot_hva[k] + ((gfn - slot_base[k]) << 12)
            pte = host_ptes.get(hva >> 12)
            if pte is None:
                pte = host_ptes[hva >> 12] = (next_pfn, True)
                next_pfn += 1
            if seq != mmu_seq:
                continue
            t = tables[0]
            for shift in (39, 30, 21):
                idx = (gpa >> shift) & 511
                spte = t[idx]
                if spte == NP:
                    tables.append(array("Q", [NP]) * 512)
                    spte = t[idx] = (len(tables) - 1) << 12 | 0x807
                t = tables[spte >> 12 & 0xFFFFFFFFF]
            t[gfn & 511] = (pte[0] << 12 | 0x807 | 6 << 3 | 1 << 57 | 1 << 58
                            | (0x2 if pte[1] else 0))
        frame = frames.get(e)
        if frame is None:
            frame = frames[e] = bytearray(PAGE)
        frame[0:1] = data
    dt = time.perf_counter() - t0
    assert faults == n, faults
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=50_000)
    ap.add_argument("--dense-size", type=int, default=SZ_1G)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    per_page, total, npages = table_bytes_per_page(args.dense_size)
    print(f"dense {args.dense_size >> 20} MiB at 4K: {npages} leaves, {total} table bytes, "
          f"{per_page:.3f} bytes/page (goal <= 9)")
    best_f = max(fault_throughput(args.faults) for _ in range(args.repeat))
    best_b = max(bare_walk_throughput(args.faults) for _ in range(args.repeat))
    print(f"4K faults end to end: {best_f:,.0f}/s ({1e6 / best_f:.2f} us/fault)")
    print(f"bare 4-level array walk+install: {best_b:,.0f}/s ({1e6 / best_b:.2f} us/walk)")
    print(f"ratio: {best_b / best_f:.1f}x (goal <= 8x)")
    best_i = max(inline_fault_floor(args.faults) for _ in range(args.repeat))
    print(f"CPython floor, the same steps inlined: {best_i:,.0f}/s ({1e6 / best_i:.2f} us/fault),"
          f" {best_b / best_i:.1f}x the bare walk; the model is {best_i / best_f:.1f}x the floor")
    best_m = max(map_leaf_throughput(args.faults) for _ in range(args.repeat))
    print(f"backend share, map_leaf alone: {best_m:,.0f}/s ({1e6 / best_m:.2f} us/leaf), "
          f"{best_b / best_m:.1f}x the bare walk, {best_f / best_m:.0%} of a fault")


if __name__ == "__main__":
    main()
