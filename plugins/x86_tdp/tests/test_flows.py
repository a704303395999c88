"""Return codes (invariant 24), fast-path eligibility (21), memslot MOVE, SMM address space,
and a fault racing an invalidation."""

from __future__ import annotations

from kvmcore.records import MISCONFIG, NOT_PRESENT, PageFault
from kvmcore.uapi import (RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS,
                          RET_PF_WRITE_PROTECTED)

from conftest import PAGE, SZ_2M, TDX_SHARED
from kvmcore_x86_tdp import spte as S


def _fault(g, gfn, write=False, **kw):
    slot = g.vm.gfn_to_memslot(gfn)
    f = PageFault(addr=gfn << 12, gfn=gfn, write=write, slot=slot, **kw)
    g.vm.faultin_pfn(vm=g.vm, fault=f)
    return f


def test_invariant_24_map_leaf_return_codes(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    with g.vm.mmu_lock:
        assert g.b.map_leaf(vm=g.vm, fault=_fault(g, 3, write=True)) == RET_PF_FIXED
        assert g.b.map_leaf(vm=g.vm, fault=_fault(g, 3, write=True)) == RET_PF_SPURIOUS
        # A prefetch over a present leaf is spurious too.
        assert g.b.map_leaf(vm=g.vm, fault=_fault(g, 3, prefetch=True)) == RET_PF_SPURIOUS


def test_invariant_24_write_protected_only_from_wrprot(make):
    """RET_PF_WRITE_PROTECTED comes only from make_spte refusing W on a write fault (a
    write-tracked gfn, mmu_try_to_unsync_pages failing)."""
    g = make()
    g.slot(0, 0, SZ_2M)
    f = _fault(g, 4, write=True)
    root = g.b.direct_roots[0]

    def make_leaf(old, level):
        spte, wrprot = S.make_spte(level=level, pfn=f.pfn, host_writable=True,
                                   write_tracked=True, old_spte=old)
        return spte, wrprot, False

    with g.vm.mmu_lock:
        r = g.b.tdp.kvm_tdp_mmu_map(g.vm, f, root, 1, f.pfn, make_leaf)
    assert r == RET_PF_WRITE_PROTECTED
    assert not g.leaf(4 * PAGE).writable


def test_invariant_24_mmio_install_emulates(make):
    g = make()
    f = PageFault(addr=0x5000_0000, gfn=0x50000)
    with g.vm.mmu_lock:
        assert g.b.handle_noslot_fault(vm=g.vm, fault=f) == RET_PF_EMULATE


def test_invariant_21_fast_path_eligibility(make):
    """21: RSVD (misconfig) faults go to the MMIO handler, never the W/A restore; not-present
    faults with A/D on are never fast; TDX private faults never use the fast path."""
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"x")
    f = PageFault(addr=0x1000, gfn=1, write=True, kind=MISCONFIG, error_code=1 << 3)
    assert g.b.fast_page_fault(vm=g.vm, fault=f) == 1       # not an MMIO SPTE: RETRY
    f = PageFault(addr=0x1000, gfn=1, write=True, kind=NOT_PRESENT, error_code=2)
    assert g.b.fast_page_fault(vm=g.vm, fault=f) is None
    t = make("tdx")
    t.gmem_slot(0, 0, SZ_2M)
    t.make_private(0, SZ_2M)
    t.vcpu.write(0x1000, b"p")
    spte = t.b.tdp.get_last_spte(t.b.mirror_roots[0], 1)[3]
    f = PageFault(addr=0x1000, gfn=1, write=True, is_private=True, kind="permission",
                  error_code=3)
    assert t.b.fast_page_fault(vm=t.vm, fault=f) is None
    assert t.b.tdp.get_last_spte(t.b.mirror_roots[0], 1)[3] == spte


def test_memslot_move_zaps_old_range(make):
    g = make("sw_protected")
    hva = g.slot(0, 0, SZ_2M)
    g.vcpu.write(0x1000, b"m")
    g.vm.set_user_memory_region(0, 4 * SZ_2M, SZ_2M, hva)
    assert list(g.vm.mappings()) == []
    assert g.vcpu.read(4 * SZ_2M + 0x1000, 1) == b"m"


def test_smm_address_space_has_its_own_root(make):
    g = make()
    hva = g.host.mmap(SZ_2M)
    g.vm.set_user_memory_region((1 << 16) | 0, 0, SZ_2M, hva)
    assert set(g.b.direct_roots) == {0, 1}
    assert g.b.direct_roots[0] is not g.b.direct_roots[1]
    g.vm.set_user_memory_region((1 << 16) | 0, 0, 0, 0)


def test_fault_racing_invalidation_retries(make):
    """A fault whose pfn was resolved before an munmap-style invalidation must not install it
    (is_page_fault_stale); the retry maps the new page."""
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.host.write(hva + PAGE, b"old")
    steps = g.vcpu.step_access("read", PAGE, 3)
    point = next(steps)
    while point != "pf_lock_wait":
        point = next(steps)
    g.host.madvise_dontneed(hva, SZ_2M)
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        assert stop.value == bytes(3)
    assert g.vm.stats["fault_retry_stale"] == 1


def test_tdx_leaves_merge_both_roots_by_gfn(make):
    """leaves(): shared (direct root) and private (mirror root) leaves merged by gfn."""
    g = make("tdx")
    g.gmem_slot(0, 0, SZ_2M)
    g.make_private(0, PAGE)
    g.make_private(2 * PAGE, PAGE)
    g.vcpu.write(2 * PAGE, b"p")
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.vcpu.write(0, b"p")
    assert [(m.gfn, m.private) for m in g.vm.mappings()] == [(0, True), (1, False), (2, True)]
