"""TdpMmu.tdp_mmu_map_4k, the one-pass 4K map, must leave exactly what the full
kvm_tdp_mmu_map walk leaves: the same SPTEs, results, statistics and events."""

from __future__ import annotations

import pytest
from conftest import PAGE, SZ_2M, G
from kvmcore import VcpuExit
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

from kvmcore_x86_tdp.tdp_mmu import TdpMmu


def _scenario(vm_type: str, options: dict):
    g = G(vm_type, **options)
    g.slot(0, 0, 8 * SZ_2M)
    g.slot(1, 64 * SZ_2M, SZ_2M, flags=KVM_MEM_READONLY)
    g.slot(2, 128 * SZ_2M, SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.slot(3, 192 * SZ_2M, 4 * SZ_2M, thp=True)
    v = g.vcpu
    out = []

    def do(fn, *args):
        try:
            out.append(fn(*args))
        except VcpuExit as e:
            out.append(repr(e))

    for i in range(40):                       # fresh tables, then present ones
        do(v.write, i * PAGE * 7, b"w")
    do(v.read, 3 * SZ_2M, 8)                  # zero page: read-only leaf
    do(v.write, 3 * SZ_2M, b"c")              # COW: zap, then a new leaf
    do(v.fetch, 5 * PAGE)
    do(v.read, 64 * SZ_2M, 1)                 # read-only slot
    do(v.write, 64 * SZ_2M + PAGE, b"x")      # ... MMIO
    for i in range(5):
        do(v.write, 128 * SZ_2M + i * PAGE, b"d")   # dirty logging
    do(v.write, 192 * SZ_2M, b"h")            # THP: a huge leaf
    g.host.madvise_dontneed(g.slot(4, 256 * SZ_2M, SZ_2M), SZ_2M)
    do(v.write, 256 * SZ_2M, b"z")
    if "pre_fault" in g.vm.capabilities:
        do(v.pre_fault_memory, 6 * SZ_2M, 16 * PAGE)  # prefetch leaves
    g.vm.set_user_memory_region(2, 128 * SZ_2M, 0, 0)   # delete: zapped entries
    g.host.madvise_dontneed(g.vm.memslots()[0].userspace_addr, 4 * PAGE)
    for i in range(4):
        do(v.write, i * PAGE * 7, b"again")
    g.check()
    tables = {pa: list(t) for pa, t in g.b.tdp.store.tables.items()}
    return out, tables, dict(g.vm.stats), g.vm.events, list(g.vm.mappings())


@pytest.mark.parametrize("vm_type, options", [
    ("default", {}),
    ("default", {"ad_disabled": True}),
    ("default", {"tdp_level": 5}),
    ("sw_protected", {}),
])
def test_one_pass_4k_map_matches_the_full_walk(monkeypatch, vm_type, options):
    lean = _scenario(vm_type, options)
    monkeypatch.setattr(TdpMmu, "tdp_mmu_map_4k", lambda *args: None)
    full = _scenario(vm_type, options)
    assert lean == full
