"""The figures of issue 14 (faults within 4x the CPython floor, a VM in 0.5 ms), each measured
in one run, interleaved with what it is compared to, over several rounds: a figure is the best
round, a ratio is best / best, and its spread is the lowest and highest per-round ratio.

- ``fault_read`` / ``fault_write``: first-touch 4 KiB faults through ``vcpu.read/write`` on a
  fresh VM per round, against ``floor_fault(n)`` (read) and its write variant, per backend at
  its 4 KiB configuration; ``vs_x86``: the same fault against x86_tdp's;
- ``cow_write``: a write to a page first read through the shared zero page (the host's COW
  break, the notifier's zap, the refault) against a first-touch write;
- ``vm_create_ms``: ``VM(...)`` + one memslot + one vCPU, the median of many;
- ``memslots``: faults on the same 4,000-page layout with 32,764 one-page memslots against 8
  memslots covering it, and the time to create the 32,764 slots;
- ``bytes_per_page``: every byte the model allocates per mapped 4 KiB page (tracemalloc over
  reads of 1 GiB: host page table, page tables, TLBs, statistics);
- ``table_bytes_per_page``: page-table bytes per mapped 4 KiB page of that 1 GiB, and
  ``table_bytes_per_page_64MiB`` of 64 MiB written densely (where a fixed root weighs more).
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc

from ..host import HostMemory
from ..plugins import installed_backends
from ..vm import VM
from .floor import bare_walk, floor_fault

MiB, GiB = 1 << 20, 1 << 30
FLAT = "kvmcore.testing:FlatBackend"
#: Each backend at its 4 KiB configuration (the options say so even where it is the default).
CONFIG_4K = {"x86_tdp": {}, "arm64_stage2": {"granule": 4096}, "ppc_radix": {"page_size": 4096}}
#: x86_tdp's internal memslots leave this many to userspace (KVM_USER_MEM_SLOTS).
MANY_SLOTS = 32764


def options_4k(arch) -> dict:
    return dict(CONFIG_4K.get(arch, {}))


def _name(arch) -> str:
    return arch.rsplit(":", 1)[-1] if isinstance(arch, str) else arch.__name__


def _vm(arch, size: int):
    host = HostMemory()
    vm = VM(arch=arch, host=host, **options_4k(arch))
    hva = host.mmap(size)
    vm.set_user_memory_region(0, 0, size, hva)
    return vm, vm.create_vcpu(0)


def _timed_faults(arch, n: int, kind: str) -> float:
    """Seconds for ``n`` faults of ``kind`` on a fresh VM: ``read`` and ``write`` first-touch,
    ``cow`` a write to pages first read (through the zero page, untimed)."""
    vm, vcpu = _vm(arch, max(n * 4096, 2 * MiB))
    data = b"x"
    if kind == "read":
        read = vcpu.read
        gc.disable()
        t0 = time.perf_counter()
        for i in range(n):
            read(i << 12, 1)
    else:
        write = vcpu.write
        if kind == "cow":
            for i in range(n):
                vcpu.read(i << 12, 1)
        gc.disable()
        t0 = time.perf_counter()
        for i in range(n):
            write(i << 12, data)
    dt = time.perf_counter() - t0
    gc.enable()
    vm.close()
    return dt


def _timed(fn) -> float:
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def _ratio(num: list[float], den: list[float]) -> dict:
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return {"ratio": round(min(num) / min(den), 2),
            "spread": [round(min(per_round), 2), round(max(per_round), 2)]}


def fault_figures(arches: list, n: int = 2000, rounds: int = 7) -> dict:
    """First-touch read and write faults per backend and the floors, interleaved: each round
    times the floor, then every backend, for reads, then for writes, then COW writes.
    ``{"floor": {...}, backend name: {...}}``."""
    samples: dict = {"floor_read": [], "floor_write": [], "bare_walk": []}
    for arch in arches:
        for kind in ("read", "write", "cow"):
            samples[(arch, kind)] = []
    for _ in range(rounds):
        samples["bare_walk"].append(_timed(lambda: bare_walk(n)))
        for kind in ("read", "write", "cow"):
            if kind != "cow":
                samples[f"floor_{kind}"].append(_timed(lambda k=kind: floor_fault(n, k == "write")))
            for arch in arches:
                samples[(arch, kind)].append(_timed_faults(arch, n, kind))
    us = lambda xs: round(min(xs) / n * 1e6, 2)  # noqa: E731
    out: dict = {"floor": {"n": n, "rounds": rounds,
                           "floor_read_us": us(samples["floor_read"]),
                           "floor_write_us": us(samples["floor_write"]),
                           "bare_walk_us": us(samples["bare_walk"]),
                           "floor_read_vs_bare_walk": _ratio(samples["floor_read"],
                                                             samples["bare_walk"])}}
    x86 = "x86_tdp" if "x86_tdp" in arches else None
    for arch in arches:
        f: dict = {}
        for kind in ("read", "write"):
            f[f"fault_{kind}_us"] = us(samples[(arch, kind)])
            f[f"{kind}_vs_floor"] = _ratio(samples[(arch, kind)], samples[f"floor_{kind}"])
            if x86 is not None and arch != x86:
                f[f"{kind}_vs_x86"] = _ratio(samples[(arch, kind)], samples[(x86, kind)])
        f["cow_write_us"] = us(samples[(arch, "cow")])
        f["cow_write_vs_first_write"] = _ratio(samples[(arch, "cow")], samples[(arch, "write")])
        out[_name(arch)] = f
    return out


def vm_create_ms(arch, count: int = 200) -> dict:
    """``VM(...)`` + one 2 MiB memslot + one vCPU: the median, and the quartiles."""
    opts = options_4k(arch)
    times = []
    for _ in range(3):          # first VMs build what is cached per backend class
        VM(arch=arch, **opts).close()
    for _ in range(count):
        t0 = time.perf_counter()
        vm = VM(arch=arch, **opts)
        hva = vm.host.mmap(2 * MiB)
        vm.set_user_memory_region(0, 0, 2 * MiB, hva)
        vm.create_vcpu(0)
        times.append(time.perf_counter() - t0)
        vm.close()
    q = statistics.quantiles(times, n=4)
    return {"vm_create_ms": round(statistics.median(times) * 1e3, 3),
            "vm_create_ms_quartiles": [round(q[0] * 1e3, 3), round(q[2] * 1e3, 3)]}


def _slots_vm(arch, nslots: int, span: int):
    """A VM whose memslots cover gfns [0, span): ``nslots`` equal slots over one mapping."""
    host = HostMemory()
    vm = VM(arch=arch, host=host, **options_4k(arch))
    hva = host.mmap(span * 4096)
    per = span // nslots
    t0 = time.perf_counter()
    for i in range(nslots):
        vm.set_user_memory_region(i, i * per * 4096, per * 4096, hva + i * per * 4096)
    return vm, time.perf_counter() - t0


def memslot_figures(arch, touched: int = 4000, rounds: int = 3) -> dict:
    """Reads of ``touched`` pages spread evenly over 2 x 32,764 gfns, with 32,764 two-page
    memslots against 8 memslots over the same gfns (the same pages, so the same tables); and
    the time to create the 32,764 slots (the best round)."""
    span = 2 * MANY_SLOTS
    gfns = [(i * MANY_SLOTS // touched) * 2 for i in range(touched)]
    many, few, create = [], [], []
    for _ in range(rounds):
        for nslots, into in ((8, few), (MANY_SLOTS, many)):
            vm, created = _slots_vm(arch, nslots, span)
            if nslots == MANY_SLOTS:
                create.append(created)
            read = vm.create_vcpu(0).read
            gc.disable()
            t0 = time.perf_counter()
            for g in gfns:
                read(g << 12, 1)
            into.append(time.perf_counter() - t0)
            gc.enable()
            vm.close()
    return {"fault_8_slots_us": round(min(few) / touched * 1e6, 2),
            "fault_32764_slots_us": round(min(many) / touched * 1e6, 2),
            "fault_32764_vs_8_slots": _ratio(many, few),
            "create_32764_slots_s": round(min(create), 3)}


def memory_figures(arch, size: int = GiB) -> dict:
    """Guest reads of every page of ``size`` (1 GiB: 262,144 4 KiB pages) on a fresh VM:
    ``bytes_per_page``, tracemalloc's count of every byte the model holds per mapped page
    (the VM, its host page table, page tables, TLBs, statistics); and
    ``table_bytes_per_page``, page-table bytes per mapped page of that dense mapping, where
    the fixed root tables (ppc's 64 KiB PGD: RADIX_PGD_INDEX_SIZE 13) weigh what they weigh
    in a guest of that size."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        vm, vcpu = _vm(arch, size)
        read = vcpu.read
        for gfn in range(size >> 12):
            read(gfn << 12, 1)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    pages = size >> 12
    assert vm.stats["faults"] >= pages
    return {"bytes_per_page": round(used / pages, 1),
            "table_bytes_per_page": round(vm.page_table_bytes() / pages, 2)}


def table_bytes_per_page(arch, size: int = 64 * MiB) -> float:
    """Page-table bytes per page of ``size`` written densely."""
    vm, vcpu = _vm(arch, size)
    for gfn in range(size >> 12):
        vcpu.write(gfn << 12, b"x")
    return round(vm.page_table_bytes() / (size >> 12), 2)


def run(arches: list | None = None, memory_size: int = GiB, rounds: int = 7) -> dict:
    """Every figure of issue 14 for ``arches`` (default: the installed backends, then the
    flat reference backend); ``memory_size`` 0 leaves out ``bytes_per_page``."""
    arches = list(arches or [*installed_backends(), FLAT])
    out = fault_figures(arches, rounds=rounds)
    for arch in arches:
        f = out.setdefault(_name(arch), {})
        f.update(vm_create_ms(arch))
        f.update(memslot_figures(arch))
        f["table_bytes_per_page_64MiB"] = table_bytes_per_page(arch)
        if memory_size:
            f.update(memory_figures(arch, memory_size))
    return out
