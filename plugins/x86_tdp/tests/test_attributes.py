"""Memory attributes and huge pages: the MIXED flag (invariant 12), the pre-set widening and
zap of the old alias (§6.3, invariant 16)."""

from __future__ import annotations

import random

from conftest import PAGE, SZ_1G, SZ_2M
from kvmcore_x86_tdp import mmu
from kvmcore_x86_tdp.invariants import _mixed_problems


def mixed(g, gfn, level):
    return mmu.hugepage_test_mixed(g.vm.memslots()[0], gfn, level)


def test_invariant_12_mixed_flag_exact(make):
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_1G)
    g.make_private(0x3000, PAGE)
    assert mixed(g, 0, 2) and not mixed(g, 512, 2)
    assert mixed(g, 0, 3)
    g.make_private(0, SZ_2M)
    assert not mixed(g, 0, 2) and mixed(g, 0, 3)
    g.make_shared(0, SZ_2M)
    assert not mixed(g, 0, 2) and not mixed(g, 0, 3)


def test_invariant_12_random_conversions(make):
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_1G)
    slot = g.vm.memslots()[0]
    rnd = random.Random(4)
    for _ in range(40):
        start = rnd.randrange(0, 262144 - 1)
        n = rnd.choice([1, 7, 512, 513, 3000, 70000])
        n = min(n, 262144 - start)
        if rnd.random() < 0.5:
            g.make_private(start * PAGE, n * PAGE)
        else:
            g.make_shared(start * PAGE, n * PAGE)
        assert _mixed_problems(g.vm, slot, slot.arch["lpage_info"]) == []


def test_mixed_check_detects_a_wrong_flag(make):
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_1G)
    slot = g.vm.memslots()[0]
    mmu.hugepage_set_mixed(slot, 1024, 2)
    assert _mixed_problems(g.vm, slot, slot.arch["lpage_info"])
    mmu.hugepage_clear_mixed(slot, 1024, 2)


def test_disallow_count_never_flips_mixed(make):
    g = make("sw_protected")
    g.gmem_slot(0, 0, SZ_1G)
    g.make_private(0x3000, PAGE)
    slot = g.vm.memslots()[0]
    mmu.update_gfn_disallow_lpage_count(slot, 3, 1)
    assert mixed(g, 0, 2) and mmu.lpage_info(slot)[2][0] & 0xFFFF == 1
    mmu.update_gfn_disallow_lpage_count(slot, 3, -1)
    assert mixed(g, 0, 2) and mmu.lpage_info(slot)[2][0] & 0xFFFF == 0


def test_mixed_huge_page_maps_4k(make):
    """10: a mixed 2M range maps 4K even when the backing could map 2M."""
    g = make("sw_protected")
    g.gmem_slot(0, 0, 4 << 20, folio_order=9)
    g.make_private(0, SZ_2M - PAGE)
    g.vcpu.write(0x1000, b"p")
    assert g.leaf(0x1000, private=True).size == PAGE
    g.make_private(SZ_2M - PAGE, PAGE)     # now uniform: the next fault may go huge
    g.vcpu.write(0x5000, b"q")
    assert g.leaf(0x5000, private=True).size == SZ_2M


def test_pre_set_widens_invalidation_for_straddling_huge_page(make):
    """§6.3: a conversion of part of a non-mixed huge page adds the whole huge page to the
    invalidation, and the huge leaf overlapping the range is zapped whole."""
    g = make("sw_protected")
    g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(SZ_2M, b"t")
    assert g.leaf(SZ_2M).size == SZ_2M
    seen = []
    orig = g.vm.mmu_invalidate_range_add

    def spy(start, end):
        seen.append((start, end))
        orig(start, end)

    g.vm.mmu_invalidate_range_add = spy
    g.make_private(SZ_2M + 0x10000, PAGE)
    assert (512, 1024) in seen
    assert g.leaf(SZ_2M) is None                         # 16: old alias gone


def test_default_vm_pre_set_is_a_no_op_warning(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    from kvmcore.records import GfnRange
    slot = g.vm.memslots()[0]
    assert g.b.pre_set_memory_attributes(vm=g.vm, range=GfnRange(slot, 0, 1, 8)) is False
    assert g.vm.stats["x86_tdp.warn_pre_set_no_private_mem"] == 1


def test_mixed_computed_at_slot_creation(make):
    """kvm_mmu_init_memslot_memory_attributes: attributes set before the slot exists."""
    g = make("sw_protected")
    g.make_private(SZ_2M + PAGE, PAGE)
    g.gmem_slot(0, 0, 8 << 20)
    assert not mixed(g, 0, 2) and mixed(g, 512, 2) and mixed(g, 1024, 2) is False


def test_huge_slot_metadata_is_cheap(make):
    """A 1 TiB slot: lpage_info arrays, not per-gfn objects; uniform attributes need no scan."""
    g = make("sw_protected")
    hva = g.host.mmap(1 << 40)
    g.vm.set_user_memory_region(0, 0, 1 << 40, hva)
    info = g.vm.memslots()[0].arch["lpage_info"]
    assert len(info[2]) == 1 << 19 and len(info[3]) == 1 << 10


def test_mixed_flags_wait_for_the_post_set_of_a_paused_conversion(make):
    """KVM_SET_MEMORY_ATTRIBUTES stores the attributes, then updates the MIXED flags in
    kvm_arch_post_set_memory_attributes under mmu_lock: paused in between
    (``attr_post_lock_wait``), the flags of the huge pages its invalidation covers are not
    yet due, and the invariant must not report them; once it ends they are exact."""
    g = make("sw_protected")
    g.gmem_slot(0, 0, 2 * SZ_2M)
    g.make_private(0, 2 * SZ_2M)
    slot = g.vm.memslots()[0]
    conv = g.vm.steps.set_memory_attributes(2 * PAGE, 2 * PAGE, 0)
    while conv.point != "attr_post_lock_wait":
        next(conv)
    assert not mixed(g, 0, 2)                        # the post-set has not run yet
    assert _mixed_problems(g.vm, slot, slot.arch["lpage_info"]) == []
    g.vm.check_invariants()
    mmu.hugepage_set_mixed(slot, 512, 2)             # outside the invalidation: still seen
    assert _mixed_problems(g.vm, slot, slot.arch["lpage_info"])
    mmu.hugepage_clear_mixed(slot, 512, 2)
    conv.run()
    assert mixed(g, 0, 2) and not mixed(g, 512, 2)
    assert _mixed_problems(g.vm, slot, slot.arch["lpage_info"]) == []
