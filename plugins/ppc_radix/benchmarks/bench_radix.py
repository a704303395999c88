"""Rough costs of the ppc_radix backend: faults, a C-bit harvest, and table memory.

Run: python benchmarks/bench_radix.py [page_size]
"""

from __future__ import annotations

import sys
import time

from kvmcore import VM
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from kvmcore_ppc_radix import PpcRadixBackend

GPA = 1 << 32


def main(page_size: int = 4096, size: int = 64 << 20) -> None:
    vm = VM(arch=PpcRadixBackend, page_size=page_size)    # a host of that PAGE_SIZE
    host = vm.host
    hva = host.mmap(size)
    vm.set_user_memory_region(0, GPA, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    npages = size // page_size
    t = time.perf_counter()
    for i in range(npages):
        vcpu.write(GPA + i * page_size, b"x")
    dt = time.perf_counter() - t
    print(f"page_size={page_size}: {npages} write faults in {dt:.2f}s "
          f"({npages / dt:,.0f}/s); tables {vm.page_table_bytes()} bytes "
          f"({vm.page_table_bytes() / (size >> 12):.1f} B per 4K mapped)")
    t = time.perf_counter()
    log = vm.get_dirty_log(0)
    dt = time.perf_counter() - t
    print(f"GET_DIRTY_LOG harvest of {npages} C bits: {dt * 1e3:.1f} ms, {len(log)} gfns")
    t = time.perf_counter()
    for i in range(npages):
        vcpu.write(GPA + i * page_size, b"y")
    dt = time.perf_counter() - t
    print(f"re-dirty after harvest (hardware sets C, no fault): {npages / dt:,.0f} writes/s, "
          f"faults {vm.stats['faults']}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
