"""check_invariants finds each broken invariant: every case corrupts one thing in a valid
state and expects the checker (or the SPTE-change checker) to name it."""

from __future__ import annotations

import pytest
from kvmcore import InvariantError
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import PAGE, SZ_2M, TDX_SHARED
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.tdx import KICK, SeamcallRecord


def leaf_slot(g, gfn, mirror=False):
    root = g.b.mirror_roots[0] if mirror else g.b.direct_roots[0]
    table, idx, level, spte = g.b.tdp.get_last_spte(root, gfn)
    return table, idx, level, spte


def problems(g):
    return g.b.check_invariants(vm=g.vm)


def restore_after(g, table, idx, value):
    table[idx] = value
    g.b.tdp.bugs.clear()


@pytest.fixture
def g4k(make):
    g = make(pml=False)
    g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0x1000, b"x")          # 2M leaf at gfn 0 (THP)
    return g


def test_valid_state_has_no_problems(g4k):
    assert problems(g4k) == []


@pytest.mark.parametrize("name,mutate,expect", [
    ("1: zero SPTE", lambda s: 0, "invalid but not empty"),
    ("2: frozen left", lambda s: S.FROZEN_SPTE, "FROZEN_SPTE left behind"),
    ("3: W without MMU-writable", lambda s: s & ~S.EPT_SPTE_MMU_WRITABLE,
     "not MMU-writable"),
    ("3: MMU-writable without host-writable", lambda s: s & ~S.EPT_SPTE_HOST_WRITABLE,
     "not Host-writable"),
    ("11: misaligned huge pfn", lambda s: s + (1 << 12), "not aligned"),
])
def test_leaf_corruptions(g4k, name, mutate, expect):
    table, idx, level, spte = leaf_slot(g4k, 0)
    assert level == 2
    table[idx] = mutate(spte)
    assert any(expect in p for p in problems(g4k)), name
    with pytest.raises(InvariantError):
        g4k.vm.check_invariants()
    restore_after(g4k, table, idx, spte)


def test_6_nonleaf_without_rwx(g4k):
    root = g4k.b.direct_roots[0]
    spte = root.table[0]
    root.table[0] = spte & ~S.VMX_EPT_EXECUTABLE_MASK
    assert any("is not RWX" in p for p in problems(g4k))
    root.table[0] = spte & ~S.VMX_EPT_ACCESS_BIT
    assert any("lacks Accessed" in p for p in problems(g4k))
    root.table[0] = spte


def test_7_nx_huge_leaf_executable(make):
    g = make(nx_huge_pages=True)
    g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.read(0, 1)
    table, idx, level, spte = leaf_slot(g, 0)
    table[idx] = spte | S.VMX_EPT_EXECUTABLE_MASK
    assert any("NX huge pages" in p for p in problems(g))
    table[idx] = spte


def test_9_writable_huge_leaf_in_logging_slot(make):
    g = make(pml=False, eager_page_split=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"x")
    g.vm.set_user_memory_region(0, 0, 4 << 20, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    table, idx, level, spte = leaf_slot(g, 0)
    assert level == 2 and not spte & S.PT_WRITABLE_MASK
    table[idx] = spte | S.PT_WRITABLE_MASK
    assert any("dirty-logged slot" in p for p in problems(g))
    table[idx] = spte


def test_9_waits_for_the_commit_of_a_paused_memslot_update(make):
    """A memslot update that turns logging on publishes the new slot (swap, then
    synchronize_srcu) before kvm_mmu_slot_apply_flags protects its leaves: paused in
    between, the writable huge leaf is not yet due to be protected."""
    g = make(pml=False, eager_page_split=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"x")
    update = g.vm.steps.set_user_memory_region(0, 0, 4 << 20, hva,
                                               flags=KVM_MEM_LOG_DIRTY_PAGES)
    while update.point != "slot_srcu_sync":
        next(update)
    table, idx, level, spte = leaf_slot(g, 0)
    assert level == 2 and spte & S.PT_WRITABLE_MASK
    assert not any("dirty-logged slot" in p for p in problems(g))
    update.run()
    assert not leaf_slot(g, 0)[3] & S.PT_WRITABLE_MASK
    assert problems(g) == []


def test_10_huge_leaf_where_disallowed(g4k):
    slot = g4k.vm.memslots()[0]
    slot.arch["lpage_info"][2][0] = 1
    assert any("disallow_lpage" in p for p in problems(g4k))
    slot.arch["lpage_info"][2][0] = 0


def test_17_leaf_outside_memslots(g4k):
    table, idx, level, spte = leaf_slot(g4k, 0)
    table[idx + 10] = spte + (10 << 21)       # a 2M leaf at gfn 10*512, beyond the slot
    assert any("outside every memslot" in p for p in problems(g4k))
    table[idx + 10] = S.SHADOW_NONPRESENT_VALUE


def test_26_mmio_spte_with_wrong_gfn(g4k):
    root = g4k.b.direct_roots[0]
    pa = root.table[0] & S.SPTE_BASE_ADDR_MASK
    pd = g4k.b.tdp.store[pa]
    # Link a fresh PT at the second 1G? simpler: write into the first PD a 4K-level table.
    table = g4k.b.tdp.store[pd[0] & S.SPTE_BASE_ADDR_MASK]
    # table is the 1G-level (PD) table; entry 5 maps gfn 5*512 (non-present): install a PT.
    pt = g4k.b.tdp.alloc_sp()
    table[5] = S.make_nonleaf_spte(pt)
    g4k.b.tdp.store[pt][3] = S.make_mmio_spte(0x777, 0)
    assert any("MMIO SPTE encodes gfn" in p for p in problems(g4k))
    g4k.b.tdp.store[pt][3] = S.make_mmio_spte(5 * 512 + 3, 0)
    assert not any("MMIO" in p for p in problems(g4k))
    table[5] = S.SHADOW_NONPRESENT_VALUE
    g4k.b.tdp.store.free(pt)


def test_leaked_table(g4k):
    pa = g4k.b.tdp.alloc_sp()
    assert any("leaked" in p for p in problems(g4k))
    g4k.b.tdp.store.free(pa)


def test_4_pfn_change_of_present_leaf_is_a_bug(g4k):
    table, idx, level, spte = leaf_slot(g4k, 0)
    root = g4k.b.direct_roots[0]
    g4k.b.tdp.set_spte(g4k.vm, root, table, idx, 0, level, spte + (512 << 12))
    assert any("changed pfn" in p for p in problems(g4k))
    restore_after(g4k, table, idx, spte)


def test_3_host_writable_may_change_on_present(g4k):
    """handle_changed_spte checks the writable triad of the new SPTE and forbids a pfn
    change, not a Host-writable change (a write fault replaces a host-read-only leaf of a
    MAP_SHARED page by a writable one)."""
    table, idx, level, spte = leaf_slot(g4k, 0)
    root = g4k.b.direct_roots[0]
    new = spte & ~(S.PT_WRITABLE_MASK | S.EPT_SPTE_MMU_WRITABLE | S.EPT_SPTE_HOST_WRITABLE)
    g4k.b.tdp.set_spte(g4k.vm, root, table, idx, 0, level, new)
    assert problems(g4k) == []
    g4k.b.tdp.set_spte(g4k.vm, root, table, idx, 0, level, new | S.PT_WRITABLE_MASK)
    assert any("not MMU-writable" in p for p in problems(g4k))
    restore_after(g4k, table, idx, spte)


def test_5_nonpresent_to_nonpresent_is_a_bug(g4k):
    root = g4k.b.direct_roots[0]
    table = root.table
    g4k.b.tdp.set_spte(g4k.vm, root, table, 7, 0, 4, S.SHADOW_NONPRESENT_VALUE | 0x10)
    assert any("non-present -> non-present" in p for p in problems(g4k))
    restore_after(g4k, table, 7, S.SHADOW_NONPRESENT_VALUE)


def test_15_mirror_root_on_non_tdx(g4k):
    g4k.b.tdp.alloc_root(0, True, 0)
    assert any("non-TDX VM has mirror roots" in p for p in problems(g4k))
    root = g4k.b.tdp.roots.pop()
    g4k.b.tdp.store.free(root.pt.root)


@pytest.fixture
def gtdx(make):
    g = make("tdx")
    g.gmem_slot(0, 0, 4 << 20)
    g.vcpu.write(TDX_SHARED | 0x1000, b"s")
    g.make_private(0x2000, PAGE)
    g.vcpu.write(0x2000, b"p")
    assert problems(g) == []
    return g


def test_13_tdx_shared_leaf_for_private_gfn(gtdx):
    table, idx, level, spte = leaf_slot(gtdx, 2, mirror=True)
    # Put a shared-root leaf for private gfn 2.
    dtable, didx, dlevel, dspte = leaf_slot(gtdx, 2)
    assert dlevel == 1
    dtable[didx] = spte
    assert any("shared leaf for a private gfn" in p for p in problems(gtdx))
    dtable[didx] = dspte


def test_20_mirror_and_sept_disagree(gtdx):
    gtdx.b.tdx.sept[77] = 1234
    assert any("S-EPT differ" in p for p in problems(gtdx))
    del gtdx.b.tdx.sept[77]


def test_19_removal_out_of_order(gtdx):
    gtdx.b.tdx.records.append(SeamcallRecord(KICK, 2))
    assert any("removal order" in p for p in problems(gtdx))
    gtdx.b.tdx.records.pop()


def test_10_tdx_private_huge_leaf(gtdx):
    """10: a TDX private (mirror) leaf above 4K is reported."""
    mirror = gtdx.b.mirror_roots[0]
    pdpt = gtdx.b.tdp.store[mirror.table[0] & S.SPTE_BASE_ADDR_MASK]
    pd = gtdx.b.tdp.store[pdpt[0] & S.SPTE_BASE_ADDR_MASK]
    link = pd[0]
    huge, _ = S.make_spte(level=2, pfn=0x200, host_writable=True)
    pd[0] = huge
    assert any("TDX private leaf above 4K" in p for p in problems(gtdx))
    pd[0] = link


def test_14_direct_leaf_below_shared_bit(gtdx):
    root = gtdx.b.direct_roots[0]
    dtable, didx, dlevel, dspte = leaf_slot(gtdx, 1)
    # Move the shared root's top-level link from index 256 (bit 47) to 0.
    root.table[0] = root.table[256]
    root.table[256] = S.SHADOW_NONPRESENT_VALUE
    assert any("below the shared bit" in p for p in problems(gtdx))
    root.table[256] = root.table[0]
    root.table[0] = S.SHADOW_NONPRESENT_VALUE
    assert dspte


def test_2_set_spte_over_frozen_is_a_bug(g4k):
    root = g4k.b.direct_roots[0]
    table = root.table
    table[9] = S.FROZEN_SPTE
    g4k.b.tdp.set_spte(g4k.vm, root, table, 9, 0, 4, S.SHADOW_NONPRESENT_VALUE)
    assert any("FROZEN" in p for p in problems(g4k))
    restore_after(g4k, table, 9, S.SHADOW_NONPRESENT_VALUE)


def test_frozen_spte_makes_the_fault_retry(make):
    """A fault that meets a FROZEN SPTE on its walk returns RET_PF_RETRY and installs nothing."""
    from kvmcore.records import PageFault
    from kvmcore.uapi import RET_PF_RETRY
    g = make()
    g.slot(0, 0, SZ_2M)
    root = g.b.direct_roots[0]
    old = root.table[0]
    root.table[0] = S.FROZEN_SPTE
    f = PageFault(addr=0, gfn=0, write=True, slot=g.vm.gfn_to_memslot(0), pfn=0x4000,
                  map_writable=True)
    with g.vm.mmu_lock:
        assert g.b.map_leaf(vm=g.vm, fault=f) == RET_PF_RETRY
    root.table[0] = old
    assert list(g.vm.mappings()) == []
