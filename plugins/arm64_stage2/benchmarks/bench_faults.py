"""Rough throughput of the arm64 stage-2 backend: first-touch write faults, re-reads through the
vCPU TLB, a host munmap that zaps everything, for 4K and 64K granules (each on a host with that
PAGE_SIZE) and THP-backed blocks (2 MiB, and 512 MiB with 64K pages).

    python plugins/arm64_stage2/benchmarks/bench_faults.py
"""

from __future__ import annotations

import time

from kvmcore import VM, HostMemory

GPA = 1 << 30


def run(label: str, size: int, granule: int = 4096, thp: bool = False) -> None:
    host = HostMemory(page_size=granule)
    vm = VM(arch="arm64_stage2", host=host, granule=granule)
    hva = host.mmap(size, thp=thp)
    vm.set_user_memory_region(0, GPA, size, hva)
    vcpu = vm.create_vcpu(0)
    t0 = time.perf_counter()
    for off in range(0, size, 4096):
        vcpu.write(GPA + off, b"x")
    t1 = time.perf_counter()
    for off in range(0, size, 4096):
        vcpu.read(GPA + off, 1)
    t2 = time.perf_counter()
    host.munmap(hva, size)
    t3 = time.perf_counter()
    faults = vm.stats["faults"]
    print(f"{label:28s} {size >> 20:5d} MiB  faults {faults:6d}  "
          f"write-touch {(size >> 12) / (t1 - t0):9.0f} pages/s  "
          f"TLB re-read {(size >> 12) / (t2 - t1):9.0f} pages/s  "
          f"munmap {1e3 * (t3 - t2):7.1f} ms  tables {vm.page_table_bytes() >> 10} KiB")


if __name__ == "__main__":
    run("4K granule, 4K anon", 64 << 20)
    run("64K granule, 64K anon", 64 << 20, granule=65536)
    run("4K granule, THP (2M blocks)", 256 << 20, thp=True)
    run("64K granule, THP (512M blocks)", 1 << 30, granule=65536, thp=True)
