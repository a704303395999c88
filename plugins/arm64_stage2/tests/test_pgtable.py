"""Descriptors and walkers on their own (no VM): arm64_stage2.md §1, §4, §5, §6, §8 and the
page-table invariants of §10 (1-7, 9, 13, 15, 16, 20)."""

from __future__ import annotations

import copy
import errno
import pickle

import pytest

from kvmcore_arm64_stage2.geometry import Stage2Geometry
from kvmcore_arm64_stage2.pgtable import (
    FAULT_WALK_FLAGS, KVM_INVALID_PTE_LOCKED, KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R, KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    PROT_DEVICE, PROT_NORMAL_NC, PROT_R, PROT_RW, PROT_RWX, PROT_W, PROT_X, KvmPgtableProt,
    PteEvent, Stage2PageTable, kvm_pgtable_stage2_pte_prot, pte_memattr, stage2_set_prot_attr)

SZ_2M, SZ_1G = 2 << 20, 1 << 30
PA = 0x8000_0000


def make(granule=4096, ipa=40, **kw) -> Stage2PageTable:
    return Stage2PageTable(Stage2Geometry(granule, ipa), **kw)


def leaf_at(pt, ipa):
    pte, level = pt.get_leaf(ipa)
    return pte, level


# ---------------------------------------------------------------- invariant 1: leaf encoding

@pytest.mark.parametrize("fwb,kind,memattr", [
    (True, "normal", 0x6), (False, "normal", 0xF), (True, "nc", 0x5), (False, "nc", 0x5),
    (True, "device", 0x1), (False, "device", 0x1)])
def test_leaf_encoding_bits(fwb, kind, memattr):
    pt = make(fwb=fwb)
    prot = {"normal": PROT_RWX, "nc": PROT_RW | PROT_NORMAL_NC, "device": PROT_RW | PROT_DEVICE}
    assert pt.map(0x1000, 4096, PA, prot[kind], FAULT_WALK_FLAGS) == 0
    pte, level = leaf_at(pt, 0x1000)
    assert level == 3
    assert pte & 0b11 == 0b11                   # VALID, TYPE=page at level 3
    assert pte & 0xFFFF_FFFF_F000 == PA         # OA [47:12]
    assert pte_memattr(pte) == memattr          # [5:2]
    assert pte & (1 << 6) and pte & (1 << 7)    # S2AP R, W
    assert (pte >> 8) & 3 == 3                  # SH inner shareable
    assert pte & (1 << 10)                      # AF
    assert bool(pte & (1 << 54)) == (kind != "normal")  # XN (single bit 54)
    assert not pte & ((1 << 51) | (1 << 52) | (1 << 11))  # DBM, Contiguous, bit 11 never
    assert pt.check() == []


def test_block_encoding_and_sw_bits():
    pt = make()
    prot = PROT_R | KvmPgtableProt.SW1
    assert pt.map(SZ_2M, SZ_2M, PA, prot, FAULT_WALK_FLAGS) == 0
    pte, level = leaf_at(pt, SZ_2M + 0x5000)
    assert level == 2 and pte & 0b11 == 0b01   # VALID, TYPE=block
    assert pte & (1 << 56) and not pte & (1 << 55)
    assert not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert kvm_pgtable_stage2_pte_prot(pte) == PROT_R | KvmPgtableProt.SW1


def test_check_catches_bad_leaf_encoding():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    _, table, idx, pte = pt.pt.lookup(0x1000)
    table[idx] = pte & ~(3 << 8)                 # SH cleared
    assert any("SH" in p for p in pt.check())
    table[idx] = pte & ~0b10                     # level-3 TYPE=0: reserved
    assert any("TYPE=0" in p for p in pt.check())
    table[idx] = pte | (1 << 51)                 # DBM
    assert any("never sets" in p for p in pt.check())
    table[idx] = ((pte & ~(0xF << 2)) | (0x1 << 2)) & ~KVM_PTE_LEAF_ATTR_HI_S2_XN  # exec device
    assert any("executable" in p for p in pt.check())


# ---------------------------------------------------------------- invariant 2: block legality

def test_blocks_need_aligned_ipa_and_pa():
    pt = make()
    assert pt.map(SZ_2M, SZ_2M, PA + 0x1000, PROT_RW, FAULT_WALK_FLAGS) == 0
    assert leaf_at(pt, SZ_2M)[1] == 3, "PA not 2M-aligned: only pages"
    pt2 = make()
    assert pt2.map(SZ_1G, SZ_1G, PA, PROT_RW, FAULT_WALK_FLAGS) == 0
    assert leaf_at(pt2, SZ_1G)[1] == 1
    assert pt.check() == [] and pt2.check() == []


@pytest.mark.parametrize("granule", [16384, 65536])
def test_no_level1_blocks_with_16k_64k(granule):
    g = Stage2Geometry(granule, 48)
    pt = Stage2PageTable(g)
    big = g.size(1)
    assert pt.map(big, big, 1 << 44, PROT_RW, FAULT_WALK_FLAGS) == 0
    levels = {lvl for _, lvl, _ in pt.valid_leaves(big, big + g.size(2))}
    assert levels == {2}
    assert pt.check() == []


def test_check_catches_illegal_block_level():
    pt = make(granule=65536, ipa=48)
    pt.map(1 << 29, 1 << 29, 1 << 40, PROT_RW, FAULT_WALK_FLAGS)
    _, table, idx, pte = pt.pt.lookup(1 << 29)
    # Move the block one level up (a level-1 block is illegal with a 64K granule).
    root = pt.store[pt.root]
    table[idx] = 0
    pt.page_count[pt._page_of(pt.pt.path(1 << 29)[1][1], idx)] -= 1
    root[0] = pte  # root entry 0 now a block at level 1
    assert any("a leaf at a level without leaves" in p for p in pt.check())


# ---------------------------------------------------------------- invariant 3: bad prots

@pytest.mark.parametrize("prot", [PROT_DEVICE | PROT_NORMAL_NC, PROT_DEVICE | PROT_X,
                                  PROT_NORMAL_NC | PROT_X])
def test_invalid_prot_combinations(prot):
    assert stage2_set_prot_attr(PROT_R | prot, True)[0] == -errno.EINVAL
    pt = make()
    assert pt.map(0, 4096, PA, PROT_R | prot, FAULT_WALK_FLAGS) == -errno.EINVAL
    assert pt.valid_leaves(0, 1 << 40) == []


# ---------------------------------------------------------------- invariant 4: map never
# changes permissions only (the 2020 rule)

@pytest.mark.parametrize("first,second", [(PROT_RW, PROT_R), (PROT_R, PROT_RW),
                                          (PROT_R, PROT_RWX), (PROT_RW, PROT_RW)])
def test_map_permission_only_difference_is_left_alone(first, second):
    pt = make()
    assert pt.map(0x1000, 4096, PA, first, FAULT_WALK_FLAGS) == 0
    before = leaf_at(pt, 0x1000)[0]
    pt.events.clear()
    pt.tlbi_log.clear()
    assert pt.map(0x1000, 4096, PA, second, FAULT_WALK_FLAGS) == -errno.EAGAIN
    assert leaf_at(pt, 0x1000)[0] == before
    assert not pt.events and not pt.tlbi_log


def test_map_with_af_clear_goes_through_bbm():
    """An aged leaf (AF=0) differs outside the permission bits: the map path BBMs it."""
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.test_clear_young(0, 1 << 20, mkold=True)
    pt.events.clear()
    assert pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS) == 0
    assert [e.kind for e in pt.events] == ["break", "tlbi", "make"]
    assert leaf_at(pt, 0x1000)[0] & KVM_PTE_LEAF_ATTR_LO_S2_AF


def test_the_event_log_reads_as_pte_event_records():
    """The log keeps tuples and hands out PteEvent records however it is read: iterated,
    reversed, indexed from either end; it keeps its last ``log_size`` steps."""
    pt = make(log_size=4)
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.map(0x1000, 4096, PA + 0x10000, PROT_RW, FAULT_WALK_FLAGS)
    events = list(pt.events)
    assert len(events) == len(pt.events) == 4 and all(isinstance(e, PteEvent) for e in events)
    assert [e.kind for e in events] == ["make", "break", "tlbi", "make"]
    assert list(reversed(pt.events)) == events[::-1]
    assert pt.events[0] == events[0] and pt.events[-1] == events[-1]
    assert pt.events[-1] == PteEvent("make", 0x1000, 3, KVM_INVALID_PTE_LOCKED,
                                     leaf_at(pt, 0x1000)[0])
    assert pt.events[2] == PteEvent("tlbi", 0x1000, 3)
    assert PteEvent("tlbi", 0x1000, 3) in pt.events and ("tlbi", 0x1000, 3) not in pt.events
    for other in (copy.copy(pt.events), pickle.loads(pickle.dumps(pt.events))):
        assert list(other) == events and other.maxlen == 4
    pt.events.clear()
    assert not pt.events


# ---------------------------------------------------------------- invariant 5: BBM order

def test_bbm_order_on_output_address_change():
    pt = make(fwb=False, cache_dic=False)
    pt.map(0x1000, 4096, PA, PROT_RWX, FAULT_WALK_FLAGS)
    pt.events.clear()
    pt.tlbi_log.clear()
    assert pt.map(0x1000, 4096, PA + 0x10000, PROT_RWX, FAULT_WALK_FLAGS) == 0
    kinds = [e.kind for e in pt.events]
    assert kinds == ["break", "tlbi", "dcache_clean_inval_poc", "icache_inval_pou", "make"]
    assert pt.events[0].new == KVM_INVALID_PTE_LOCKED
    assert [(t.op, t.ipa, t.level) for t in pt.tlbi_log] == [("vmid_ipa", 0x1000, 3)]
    assert pt.check() == []


def test_split_in_map_path_breaks_block_with_ipa_tlbi_and_leaves_rest_unmapped():
    pt = make()
    pt.map(SZ_2M, SZ_2M, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.tlbi_log.clear()
    assert pt.map(SZ_2M + 0x3000, 4096, PA + 0x3000, PROT_RW, FAULT_WALK_FLAGS) == 0
    assert [(t.op, t.ipa, t.level) for t in pt.tlbi_log] == [("vmid_ipa", SZ_2M, 2)]
    assert [(a, lvl) for a, lvl, _ in pt.valid_leaves(SZ_2M, 2 * SZ_2M)] == [
        (SZ_2M + 0x3000, 3)]
    assert pt.check() == []


def test_collapse_table_into_block_breaks_table_with_range_tlbi():
    pt = make(tlbirange=True)
    pt.map(SZ_2M + 0x3000, 4096, PA + 0x3000, PROT_RW, FAULT_WALK_FLAGS)
    tables_before = len(pt.store)
    pt.tlbi_log.clear()
    assert pt.map(SZ_2M, SZ_2M, PA, PROT_RW, FAULT_WALK_FLAGS) == 0
    assert [(t.op, t.ipa, t.size) for t in pt.tlbi_log] == [("vmid_range", SZ_2M, SZ_2M)]
    assert leaf_at(pt, SZ_2M)[1] == 2
    assert len(pt.store) == tables_before - 1, "the detached level-3 table is freed"
    assert pt.check() == []


# ---------------------------------------------------------------- invariant 6: LOCKED

def _plant_locked(pt, ipa):
    _, table, idx, pte = pt.pt.lookup(ipa)
    table[idx] = KVM_INVALID_PTE_LOCKED
    return table, idx, pte


def test_locked_entry_is_never_overwritten_by_fault_walkers():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_R, FAULT_WALK_FLAGS)
    table, idx, _ = _plant_locked(pt, 0x1000)
    assert pt.map(0x1000, 4096, PA + 0x1000, PROT_RW, FAULT_WALK_FLAGS) == -errno.EAGAIN
    assert pt.relax_perms(0x1000, PROT_RW) == -errno.EAGAIN
    assert pt.mkyoung(0x1000) == -errno.EAGAIN
    assert table[idx] == KVM_INVALID_PTE_LOCKED
    assert any("LOCKED" in p for p in pt.check())


# ---------------------------------------------------------------- invariant 9: relax_perms

def test_relax_perms_adds_in_place_one_leaf_local_tlbi():
    pt = make()
    pt.map(SZ_2M, SZ_2M, PA, PROT_R, FAULT_WALK_FLAGS)
    pt.map(2 * SZ_2M, 4096, PA + SZ_2M, PROT_R, FAULT_WALK_FLAGS)
    before = leaf_at(pt, SZ_2M)[0]
    pt.events.clear()
    pt.tlbi_log.clear()
    assert pt.relax_perms(SZ_2M + 0x7000, PROT_RWX) == 0
    after = leaf_at(pt, SZ_2M)[0]
    assert after == (before | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W) & ~KVM_PTE_LEAF_ATTR_HI_S2_XN
    assert [e.kind for e in pt.events if e.kind != "tlbi"] == ["set"], "no BBM"
    assert [(t.op, t.ipa, t.level) for t in pt.tlbi_log] == [("vmid_ipa_nsh", SZ_2M, 2)]
    assert not leaf_at(pt, 2 * SZ_2M)[0] & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W, "one leaf only"


def test_relax_perms_never_removes():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_RWX, FAULT_WALK_FLAGS)
    before = leaf_at(pt, 0x1000)[0]
    assert pt.relax_perms(0x1000, PROT_R) == 0
    assert leaf_at(pt, 0x1000)[0] == before


def test_relax_perms_refuses_sw_bits_and_invalid_leaf():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_R, FAULT_WALK_FLAGS)
    assert pt.relax_perms(0x1000, PROT_RW | KvmPgtableProt.SW0) == -errno.EINVAL
    pt.tlbi_log.clear()
    assert pt.relax_perms(0x9000, PROT_RW) == -errno.EAGAIN
    assert [t.op for t in pt.tlbi_log] == ["vmid_ipa_nsh"], "local TLBI after -EAGAIN too"


# ---------------------------------------------------------------- invariant 13: wp / AF

def test_wrprotect_clears_only_w_without_tlbi():
    pt = make()
    pt.map(0, SZ_2M, PA, PROT_RWX, FAULT_WALK_FLAGS)
    pt.map(SZ_2M, 4096, PA + SZ_2M, PROT_RW, FAULT_WALK_FLAGS)
    before = [p for _, _, p in pt.valid_leaves(0, 4 * SZ_2M)]
    pt.tlbi_log.clear()
    pt.wrprotect(0, 4 * SZ_2M)
    after = [p for _, _, p in pt.valid_leaves(0, 4 * SZ_2M)]
    assert after == [p & ~KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W for p in before]
    assert not pt.tlbi_log


def test_age_and_mkyoung_without_tlbi():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.tlbi_log.clear()
    assert pt.test_clear_young(0, 1 << 20, mkold=False) is True
    assert leaf_at(pt, 0x1000)[0] & KVM_PTE_LEAF_ATTR_LO_S2_AF
    assert pt.test_clear_young(0, 1 << 20, mkold=True) is True
    assert not leaf_at(pt, 0x1000)[0] & KVM_PTE_LEAF_ATTR_LO_S2_AF
    assert pt.test_clear_young(0, 1 << 20, mkold=True) is False
    assert pt.mkyoung(0x1000) == 0
    assert leaf_at(pt, 0x1000)[0] & KVM_PTE_LEAF_ATTR_LO_S2_AF
    assert pt.mkyoung(0x5000) == -errno.EAGAIN
    assert not pt.tlbi_log


# ---------------------------------------------------------------- invariant 15: unmap

def test_unmap_partial_block_clears_whole_block_and_frees_tables():
    pt = make()
    pt.map(SZ_2M, SZ_2M, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.map(4 * SZ_2M, 4096, PA + SZ_2M, PROT_RW, FAULT_WALK_FLAGS)
    pt.map(4 * SZ_2M + 4096, 4096, PA + SZ_2M + 4096, PROT_RW, FAULT_WALK_FLAGS)
    pt.tlbi_log.clear()
    pt.unmap(SZ_2M + 0x1000, 4 * SZ_2M)   # touches the block and both pages
    assert pt.valid_leaves(0, 1 << 40) == []
    leaf_tlbis = [(t.ipa, t.level) for t in pt.tlbi_log if t.why == "unmap"]
    assert leaf_tlbis == [(SZ_2M, 2), (4 * SZ_2M, 3), (4 * SZ_2M + 4096, 3)]
    assert len(pt.store) == 1, "every emptied table is freed; only the root stays"
    assert pt.check() == []


def test_unmap_keeps_non_empty_tables():
    pt = make()
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.map(0x2000, 4096, PA + 0x1000, PROT_RW, FAULT_WALK_FLAGS)
    tables = len(pt.store)
    pt.unmap(0x1000, 4096)
    assert len(pt.store) == tables
    assert [a for a, _, _ in pt.valid_leaves(0, 1 << 40)] == [0x2000]
    assert pt.check() == []


def test_unmap_deferred_tlbi_with_tlbirange_and_fwb():
    pt = make(tlbirange=True, fwb=True)
    for i in range(3):
        pt.map(i * 4096, 4096, PA + i * 4096, PROT_RW, FAULT_WALK_FLAGS)
    pt.tlbi_log.clear()
    pt.unmap(0, 3 * 4096)
    assert [t.why for t in pt.tlbi_log if t.why.startswith("unmap")] == [
        "unmap_table", "unmap_table", "unmap_deferred"]


def test_unmap_cacheable_without_fwb_cleans_dcache_after_tlbi():
    pt = make(fwb=False)
    pt.map(0x1000, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.events.clear()
    pt.unmap(0x1000, 4096)
    kinds = [e.kind for e in pt.events]
    assert kinds[:3] == ["clear", "tlbi", "dcache_clean_inval_poc"]


# ---------------------------------------------------------------- invariant 16: refcount

def test_refcount_tracks_counted_entries_and_check_catches_drift():
    pt = make()
    for i in range(5):
        pt.map(i * 4096, 4096, PA + i * 4096, PROT_RW, FAULT_WALK_FLAGS)
    path = pt.pt.path(0)
    l3_table = path[-1][1]
    assert pt.page_count[l3_table] == 1 + 5
    assert pt.check() == []
    pt.page_count[l3_table] += 1
    assert any("page_count" in p for p in pt.check())


def test_concatenated_root_pages_are_counted_separately():
    pt = make(ipa=40)   # two concatenated root pages
    pt.map(0, 4096, PA, PROT_RW, FAULT_WALK_FLAGS)
    pt.map(1 << 39, 4096, PA + 4096, PROT_RW, FAULT_WALK_FLAGS)
    assert pt.page_count[pt.root] == 2 and pt.page_count[pt.root + 4096] == 2
    assert pt.check() == []


# ---------------------------------------------------------------- invariant 20: split

@pytest.mark.parametrize("granule", [4096, 65536])
def test_split_keeps_rwx_sw_sets_af_and_loses_device(granule):
    g = Stage2Geometry(granule, 48)
    pt = Stage2PageTable(g)
    pmd = g.size(2)
    pt.map(pmd, pmd, 1 << 40, PROT_RW | KvmPgtableProt.SW2, FAULT_WALK_FLAGS)
    pt.test_clear_young(pmd, pmd, mkold=True)
    assert pt.split(pmd, pmd) == 0
    leaves = pt.valid_leaves(pmd, 2 * pmd)
    assert len(leaves) == g.ptrs_per_pte and {lvl for _, lvl, _ in leaves} == {3}
    for ipa, _, pte in leaves:
        assert pte & KVM_PTE_LEAF_ATTR_LO_S2_AF
        assert kvm_pgtable_stage2_pte_prot(pte) == PROT_RW | KvmPgtableProt.SW2
        assert pt.fmt.pte_to_phys(pte) == (1 << 40) + ipa - pmd
    assert pt.check() == []


def test_split_of_level1_block_needs_ptrs_plus_one_pages():
    g = Stage2Geometry(4096, 40)
    assert Stage2PageTable.block_get_nr_page_tables(g, 1) == 513
    assert Stage2PageTable.block_get_nr_page_tables(g, 2) == 1
    pt = Stage2PageTable(g)
    pt.map(SZ_1G, SZ_1G, SZ_1G, PROT_RW, FAULT_WALK_FLAGS)
    n = len(pt.store)
    pt.split(SZ_1G, SZ_1G)
    assert len(pt.store) - n == 513
    assert pt.check() == []


def test_walk_beyond_ipa_space_is_erange():
    pt = make(ipa=36)
    assert pt.map(1 << 36, 4096, PA, PROT_R, FAULT_WALK_FLAGS) == -errno.ERANGE


def test_prot_flag_names_not_numbers():
    assert PROT_R == KvmPgtableProt.R and PROT_W == KvmPgtableProt.W
    assert KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R == 1 << 6


# ---------------------------------------------------------------- invariant 7: shared walks

def test_shared_walk_update_is_a_compare_and_exchange():
    """A shared walker whose entry changed since it read it (another CPU won) neither breaks
    nor overwrites it: -EAGAIN, never a blind store."""
    from kvmcore.pgtable import LEAF

    from kvmcore_arm64_stage2.pgtable import KVM_PGTABLE_WALK_SHARED

    pt = make()
    pt.map(0x1000, 4096, PA, PROT_R, FAULT_WALK_FLAGS)
    other = pt.get_leaf(0x1000)[0] | KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    seen = []

    def visitor(ctx):
        if ctx.pte & 1 and ctx.level == 3:
            ctx.table[ctx.index] = other          # the racing CPU's cmpxchg landed first
            seen.append((pt._try_break_pte(ctx), pt._try_set_pte(ctx, 0)))
        return None

    pt.pt.walk(0x1000, 0x2000, visitor, LEAF, arg=KVM_PGTABLE_WALK_SHARED)
    assert seen == [(False, False)]
    assert pt.get_leaf(0x1000)[0] == other


# ---------------------------------------------------------------- the declared format

@pytest.mark.parametrize("granule", [4096, 16384, 65536])
def test_format_declares_what_the_walks_install(granule):
    """Stage2Format as a kvmcore.radix.RadixFormat: leaf levels from the granule, make_leaf
    is the leaf kvm_pgtable_stage2_map installs, split_child the pages a split makes, and
    perms reads S2AP/XN/AF (dirty = writable: no DBM)."""
    from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X

    g = Stage2Geometry(granule, 48)
    pt = Stage2PageTable(g)
    fmt = pt.fmt
    assert fmt.leaf_levels == {lvl for lvl in range(g.start_level, 4)
                               if g.level_supports_block(lvl)}
    pmd = g.size(2)
    pt.map(pmd, pmd, 1 << 40, PROT_RWX, FAULT_WALK_FLAGS)
    block, level = leaf_at(pt, pmd)
    assert block == fmt.make_leaf(1 << 40, 2, PERM_R | PERM_W | PERM_X | PERM_A)
    assert fmt.perms(block) == PERM_R | PERM_W | PERM_X | PERM_A | PERM_D
    assert fmt.perms(block & ~KVM_PTE_LEAF_ATTR_LO_S2_AF) & PERM_A == 0
    children = [fmt.split_child(block, 2, 3, i) for i in range(g.ptrs_per_pte)]
    pt.split(pmd, pmd)
    assert [pte for _, _, pte in pt.valid_leaves(pmd, 2 * pmd)] == children
