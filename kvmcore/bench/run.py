"""``kvmcore bench``: every figure of the project, each as a ratio measured in one run.

Issue 14's figures (``kvmcore.bench.faults``): first-touch read and write faults per backend
against the CPython floor and against x86_tdp, the zero-page-then-write fault, VM creation, faults
with 32,764 memslots against 8, model memory per mapped page and page-table bytes per dense page.

Per backend (every installed one, and the flat reference backend):

- ``zap_1TiB_sparse_vs_tight``: zapping a 1 TiB range holding N leaves spread over it, against
  zapping the same N leaves packed in a tight range (1.0 means zaps cost what is mapped);
- ``convert_1TiB_ms`` (backends with private memory);
- ``get_dirty_log_4GiB_vs_4MiB``: GET over a 4 GiB slot against a 4 MiB slot, with the same
  dirty pages (1.0 means GET costs what is dirty);
- ``explore_seed1_schedules_per_s``: the race explorer on the 2-flow seed-1 scenario, every
  schedule with every oracle, best of 5 rounds with the spread.

And the core's own: memslot lookups at 8 vs 32,767 slots, slot creation, hva iteration.
"""

from __future__ import annotations

import time

from ..host import HostMemory
from ..plugins import installed_backends
from ..uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMORY_ATTRIBUTE_PRIVATE
from ..vm import VM
from . import core, faults
from .core import best_of

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
FLAT = "kvmcore.testing:FlatBackend"


def _vm(arch, size: int, flags: int = 0, thp: bool = False, vm_type: str = "default"):
    host = HostMemory()
    vm = VM(arch=arch, vm_type=vm_type, host=host)
    hva = host.mmap(size, thp=thp)
    vm.set_user_memory_region(0, 0, size, hva, flags)
    return vm, host, hva


def zap_ratio(arch, n: int = 256) -> dict:
    def setup(span: int, stride: int):
        vm, host, hva = _vm(arch, span)
        vcpu = vm.create_vcpu(0)
        for i in range(n):
            vcpu.write(i * stride, b"x")
        return vm, host, hva

    def timed(span, stride):
        best = float("inf")
        for _ in range(3):
            vm, host, hva = setup(span, stride)
            t0 = time.perf_counter()
            host.madvise_dontneed(hva, span)
            best = min(best, time.perf_counter() - t0)
            assert not list(vm.mappings())
        return best

    sparse = timed(TiB, TiB // n)
    tight = timed(n * 4096 * 2, 4096)
    return {"zap_1TiB_sparse_ms": round(sparse * 1e3, 3), "zap_tight_ms": round(tight * 1e3, 3),
            "zap_1TiB_sparse_vs_tight": round(sparse / tight, 2)}


def convert_ms(arch, vm_type: str) -> float:
    vm, _host, _hva = _vm(arch, 4 * MiB, vm_type=vm_type)

    def convert():
        vm.set_memory_attributes(GiB, TiB, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.set_memory_attributes(GiB, TiB, 0)

    return best_of(convert) * 1e3


def dirty_log_ratio(arch, dirty: int = 512) -> dict:
    def timed(size):
        vm, _host, _hva = _vm(arch, size, KVM_MEM_LOG_DIRTY_PAGES)
        vcpu = vm.create_vcpu(0)
        best = float("inf")
        for _ in range(3):
            for i in range(dirty):
                vcpu.write(i * 8192 % size, b"x")
            t0 = time.perf_counter()
            pages = vm.get_dirty_log(0)
            best = min(best, time.perf_counter() - t0)
            assert len(pages) == min(dirty, size // 8192)
        return best

    big, small = timed(4 * GiB), timed(4 * MiB)
    return {"get_dirty_log_4GiB_ms": round(big * 1e3, 3),
            "get_dirty_log_4MiB_ms": round(small * 1e3, 3),
            "get_dirty_log_4GiB_vs_4MiB": round(big / small, 2)}


def explore_figures(arch, rounds: int = 5) -> dict:
    """``explore_seed1_schedules_per_s``: the explorer on the 2-flow seed-1 scenario (a
    private fault racing a conversion), every schedule, oracles after every step; the best of
    ``rounds`` runs and the spread (worst / best) across them. Backends without private
    memory run the 2-flow ``fault_vs_munmap`` scenario instead."""
    from ..explore import explore, load, supports

    scn = load("private_fault_vs_conversion")
    if not supports(scn, arch):
        scn = load("fault_vs_munmap")
    rates = []
    for _ in range(rounds):
        r = explore(scn, arch)
        rates.append(r.schedules_per_second)
    key = "seed1" if scn.name == "private_fault_vs_conversion" else "fault_vs_munmap"
    return {f"explore_{key}_schedules": r.schedules,
            f"explore_{key}_schedules_per_s": round(max(rates)),
            f"explore_{key}_spread": round(max(rates) / min(rates), 2)}


def backend_figures(arch) -> dict:
    from ..plugins import resolve_backend

    info = resolve_backend(arch).arch_info
    out = {}
    out.update(zap_ratio(arch))
    private = [t for t, caps in info.vm_types.items() if "private_mem" in caps]
    if private:
        out["convert_1TiB_ms"] = round(convert_ms(arch, private[0]), 3)
    if "dirty_log" in info.capabilities:
        out.update(dirty_log_ratio(arch))
    out.update(explore_figures(arch))
    return out


def run_all(arches: list[str] | None = None, memory_size: int = GiB,
            rounds: int = 7) -> dict:
    """Every figure: issue 14's (``faults``, then per backend), the core's, and each
    backend's others. ``memory_size`` 0 leaves out the (slow) tracemalloc figure."""
    arches = list(arches or [*installed_backends(), FLAT])
    figures = faults.run(arches, memory_size=memory_size, rounds=rounds)
    figures["core"] = core.run_all()
    for arch in arches:
        name = arch.rsplit(":", 1)[-1] if ":" in arch else arch
        figures.setdefault(name, {}).update(backend_figures(arch))
    return figures
