"""Core figures: memslot lookup and creation at scale, 1 TiB conversions, hva iteration."""

from __future__ import annotations

import random
import time

from ..host import HostMemory
from ..hva import kvm_handle_hva_range
from ..locks import drive
from ..testing import FlatBackend
from ..uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from ..vm import VM

TiB = 1 << 40


def best_of(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _vm_with_slots(n: int):
    host = HostMemory()
    vm = VM(arch=FlatBackend, host=host)
    hva = host.mmap(n * 4096)
    t0 = time.perf_counter()
    for i in range(n):
        vm.set_user_memory_region(i, i * 2 * 4096, 4096, hva + i * 4096)
    return vm, hva, time.perf_counter() - t0


def memslot_figures(lookups: int = 20000) -> dict:
    """Random-gfn lookups through ``vm.gfn_to_memslot`` (the path every fault takes, with
    Linux's last_used_slot cache in front of the bisection) and of the bare bisection."""
    out = {}
    full, bare = {}, {}
    for n in (8, 32767):
        vm, _hva, create_s = _vm_with_slots(n)
        rng = random.Random(n)
        gfns = [rng.randrange(n) * 2 for _ in range(lookups)]
        lookup = vm.gfn_to_memslot
        sets = vm.memslot_sets[0]

        def run_full(gfns=gfns, lookup=lookup):
            for g in gfns:
                lookup(g)

        def run_bare(gfns=gfns, sets=sets):
            search = sets.search
            for g in gfns:
                sets.last_used_slot = None
                search(g)

        full[n] = best_of(run_full) / lookups
        bare[n] = best_of(run_bare) / lookups
        if n == 32767:
            out["memslot_create_32767_s"] = round(create_s, 3)
    for name, table in (("memslot_lookup", full), ("memslot_search_uncached", bare)):
        out[f"{name}_8_ns"] = round(table[8] * 1e9)
        out[f"{name}_32767_ns"] = round(table[32767] * 1e9)
        out[f"{name}_ratio_32767_vs_8"] = round(table[32767] / table[8], 2)
    return out


def conversion_figures() -> dict:
    vm = VM(arch=FlatBackend, vm_type="sw_protected")

    def convert():
        vm.set_memory_attributes(0, TiB, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.set_memory_attributes(0, TiB, 0)

    t = best_of(convert)
    return {"convert_1TiB_private_and_back_ms": round(t * 1e3, 3),
            "attribute_entries_after": len(vm.attributes)}


def hva_iteration_figures() -> dict:
    vm, hva, _ = _vm_with_slots(32767)
    target = hva + 16000 * 4096
    calls = []

    def handler(vm_, rng):
        calls.append(rng.slot.id)
        return False

    n = 2000

    def run():
        for _ in range(n):
            drive(kvm_handle_hva_range(vm, target, target + 4096, handler))

    t = best_of(run) / n
    return {"hva_iter_32767_slots_one_page_us": round(t * 1e6, 2),
            "hva_iter_slots_visited": len(calls) // (5 * n)}


def run_all() -> dict:
    out = {}
    out.update(memslot_figures())
    out.update(conversion_figures())
    out.update(hva_iteration_figures())
    return out
