"""book3s_64_mmu_radix.py against a stand-in VM: create_pte, unmap, harvest, aging,
instantiate's PTE construction and level choice (reference §2.2-§5, invariants 1-17)."""

import errno

import pytest
from kvmcore.records import PageFault

from fakevm import FakeHost, FakeSlot, FakeVM
from kvmcore_ppc_radix import PpcRadixBackend
from kvmcore_ppc_radix import book3s_64_mmu_radix as M
from kvmcore_ppc_radix import pte as P
from kvmcore_ppc_radix.backend import check_radix_invariants
from kvmcore_ppc_radix.host_pte import find_kvm_host_pte
from kvmcore_ppc_radix.radix import LEVEL_PMD, LEVEL_PTE, LEVEL_PUD

SZ_2M, SZ_1G = 1 << 21, 1 << 30
RAM = P._PAGE_PRESENT | P._PAGE_READ | P._PAGE_WRITE | P._PAGE_ACCESSED


def leaf(pa, extra=0, shift=12):
    return P.pfn_pte(pa, RAM | P._PAGE_EXEC | extra, shift)


@pytest.fixture(params=[4096, 65536], ids=["4K", "64K"])
def be(request):
    return PpcRadixBackend(page_size=request.param)


def test_create_pte_links_tables_with_next_level_sizes(be):
    vm = FakeVM()
    assert M.kvmppc_create_pte(be, vm, leaf(0x40000000), 0x1230000, LEVEL_PTE, 0) == 0
    path = be.table.pt.path(0x1230000)
    assert len(path) == 4
    nls = []
    for _pos, table_pa, idx in path[:-1]:
        d = P.be64_to_cpu(be.table.store[table_pa][idx])
        assert d & P._PAGE_PRESENT and not d & P._PAGE_PTE
        assert P.dir_nlb(d) & ((1 << (P.dir_nls(d) + 3)) - 1) == 0
        nls.append(P.dir_nls(d))
    assert nls == [9, 9, be.fmt.pte_index_size]
    assert len(be.table.store[path[-1][1]]) == 1 << be.fmt.pte_index_size
    assert be.entry(0x1230000) == leaf(0x40000000)


def test_mmu_seq_change_installs_nothing_and_frees_preallocations(be):
    vm = FakeVM()
    tables = len(be.table.store)
    vm.mmu_invalidate.seq = 5
    assert M.kvmppc_create_pte(be, vm, leaf(0), 0, LEVEL_PTE, 4) == -errno.EAGAIN
    assert len(be.table.store) == tables and be.entry(0) == 0
    vm.mmu_invalidate.begin()
    assert M.kvmppc_create_pte(be, vm, leaf(0), 0, LEVEL_PTE, 5) == -errno.EAGAIN
    assert len(be.table.store) == tables


def test_refault_identical_and_or_merge_without_flush(be):
    vm = FakeVM()
    ro = leaf(0x100000) & ~(P._PAGE_WRITE | P._PAGE_DIRTY)
    M.kvmppc_create_pte(be, vm, ro, 0x100000, LEVEL_PTE, 0)
    M.kvmppc_create_pte(be, vm, ro, 0x100000, LEVEL_PTE, 0)
    assert vm.stats["ppc_pte_identical"] == 1
    M.kvmppc_create_pte(be, vm, ro | P._PAGE_WRITE | P._PAGE_DIRTY, 0x100000, LEVEL_PTE, 0)
    assert be.entry(0x100000) == ro | P._PAGE_WRITE | P._PAGE_DIRTY
    assert not be.tlbie_log and not be.warnings
    # A re-fault without W never removes it.
    M.kvmppc_create_pte(be, vm, ro, 0x100000, LEVEL_PTE, 0)
    assert be.entry(0x100000) & P._PAGE_WRITE
    # Any other difference is a WARN, and is still OR-merged.
    M.kvmppc_create_pte(be, vm, ro | P._PAGE_NON_IDEMPOTENT, 0x100000, LEVEL_PTE, 0)
    assert be.warnings and P.pte_att(be.entry(0x100000)) == 0x20


def test_huge_leaf_replaces_table_flushes_pwc_and_frees(be):
    slot = FakeSlot(0, 1024, logging=True)
    vm = FakeVM([slot])
    ps = be.fmt.page_size
    M.kvmppc_create_pte(be, vm, leaf(0x600000 + ps, P._PAGE_DIRTY), ps, LEVEL_PTE, 0)
    M.kvmppc_create_pte(be, vm, leaf(0x600000), 0, LEVEL_PTE, 0)
    tables = len(be.table.store)
    assert M.kvmppc_create_pte(be, vm, leaf(0x600000, P._PAGE_DIRTY, 21), 0, LEVEL_PMD, 0) == 0
    assert be.pwc_flushes == [be.lpid]
    assert len(be.table.store) == tables - 1                     # the PTE table is gone
    assert {a for a, _s, _l in be.tlbie_log} == {0, ps}    # leftover leaves were unmapped
    assert sorted(vm.dirty) == list(range(ps >> 12, 2 * ps >> 12))   # C went to the log
    found = M.find_kvm_secondary_pte(be, 0x1000)
    assert found[2] == 21


def test_small_mapping_under_huge_leaf_unmaps_it_first(be):
    slot = FakeSlot(0, 1024, logging=True)
    vm = FakeVM([slot])
    M.kvmppc_create_pte(be, vm, leaf(0x600000, P._PAGE_DIRTY, 21), 0, LEVEL_PMD, 0)
    gpa = 0x30000 & ~(be.fmt.page_size - 1)
    assert M.kvmppc_create_pte(be, vm, leaf(0x900000), gpa, LEVEL_PTE, 0) == 0
    assert be.tlbie_log == [(0, SZ_2M, be.lpid)]
    assert len(vm.dirty) == 512                            # the whole 2M leaf was dirty
    assert M.find_kvm_secondary_pte(be, 0) is None
    assert M.find_kvm_secondary_pte(be, gpa)[2] == be.fmt.page_shift


def test_unmap_whole_covering_leaf_with_dirty_transfer_and_no_table_free(be):
    slot = FakeSlot(0, 1 << 20, logging=True)
    vm = FakeVM([slot])
    M.kvmppc_create_pte(be, vm, leaf(SZ_1G, P._PAGE_DIRTY, 30), SZ_1G, LEVEL_PUD, 0)
    M.kvmppc_create_pte(be, vm, leaf(0x5000000), 0x10000, LEVEL_PTE, 0)
    tables = len(be.table.store)
    M.kvm_unmap_radix(be, vm, slot, SZ_1G + 0x5000, SZ_1G + 0x6000)
    assert be.entry(SZ_1G) == 0 and be.entry(SZ_1G + (SZ_1G >> 1)) == 0
    assert be.tlbie_log == [(SZ_1G, SZ_1G, be.lpid)]
    assert vm.flushed == [(SZ_1G >> 12, SZ_1G >> 12)]
    # kvmppc_unmap_pte marks the leaf's pages from the gfn it was reached by [quirk].
    first = (SZ_1G + 0x5000 if be.unaligned_dirty_quirk else SZ_1G) >> 12
    assert len(vm.dirty) == SZ_1G >> 12 and min(vm.dirty) == first
    M.kvm_unmap_radix(be, vm, slot, 0, 1 << 40)
    assert len(be.table.store) == tables                          # unmap never frees tables


def test_flush_memslot_bumps_the_seq_alone(be):
    """kvmppc_radix_flush_memslot ends with a bare mmu_invalidate_seq++: a fault that
    snapshotted the seq before it retries, and an invalidation in progress elsewhere keeps
    its count and range (no begin/end bracket)."""
    slot = FakeSlot(0, 512)
    vm = FakeVM([slot])
    M.kvmppc_create_pte(be, vm, leaf(0x5000000), 0x3000, LEVEL_PTE, 0)
    inv = vm.mmu_invalidate
    inv.begin()
    inv.range_add(1 << 20, (1 << 20) + 16)
    M.kvmppc_radix_flush_memslot(be, vm, slot)
    assert be.entry(0x3000) == 0
    assert (inv.seq, inv.in_progress, inv.range_start, inv.range_end) == (
        1, 1, 1 << 20, (1 << 20) + 16)
    inv.end()
    assert inv.retry(1) and not inv.retry(2)


@pytest.mark.parametrize("quirk, first", [(True, 0x100), (False, 0)])
def test_unaligned_dirty_quirk_option(quirk, first):
    """Linux (the default): the dirty pages of a huge leaf start at the gfn the unmap reached
    it by, mid-leaf; False starts them at the leaf."""
    be = PpcRadixBackend(unaligned_dirty_quirk=quirk)
    slot = FakeSlot(0, 1024, logging=True)
    vm = FakeVM([slot])
    M.kvmppc_create_pte(be, vm, leaf(0x600000, P._PAGE_DIRTY, 21), 0, LEVEL_PMD, 0)
    M.kvm_unmap_radix(be, vm, slot, 0x100000, 0x101000)
    assert min(vm.dirty) == first and max(vm.dirty) == first + 511


def test_aging_clears_only_r_without_tlbie(be):
    vm = FakeVM()
    M.kvmppc_create_pte(be, vm, leaf(0, P._PAGE_DIRTY), 0, LEVEL_PTE, 0)
    before = be.entry(0)
    assert M.kvm_age_radix(be, vm, 0, 1 << 21, test_only=True)
    assert be.entry(0) == before
    assert M.kvm_age_radix(be, vm, 0, 1 << 21, test_only=False)
    assert be.entry(0) == before & ~P._PAGE_ACCESSED
    assert not M.kvm_age_radix(be, vm, 0, 1 << 21, test_only=True)
    assert not be.tlbie_log and not vm.flushed


def test_harvest_clears_only_c_with_one_tlbie_per_page(be):
    ps = be.fmt.page_size
    slot = FakeSlot(0, 1024, logging=True)
    vm = FakeVM([slot])
    for i in range(3):
        M.kvmppc_create_pte(be, vm, leaf(0x800000 + i * ps, P._PAGE_DIRTY if i != 1 else 0),
                            i * ps, LEVEL_PTE, 0)
    M.kvmppc_hv_get_dirty_log_radix(be, vm, slot)
    assert [a for a, _s, _l in be.tlbie_log] == [0, 2 * ps]
    assert vm.flushed == [(0, ps >> 12), (2 * ps >> 12, ps >> 12)]   # the vCPU TLBs drop both
    assert sorted(vm.dirty) == list(range(ps >> 12)) + list(range(2 * ps >> 12, 3 * ps >> 12))
    for i in range(3):
        e = be.entry(i * ps)
        assert not e & P._PAGE_DIRTY and e & P._PAGE_WRITE


def test_batched_tlbie_merges_model_flushes_but_records_each(be):
    ps = be.fmt.page_size
    slot = FakeSlot(0, 1 << 12)
    vm = FakeVM([slot])
    for i in range(4):
        M.kvmppc_create_pte(be, vm, leaf(0x800000 + i * ps), i * ps, LEVEL_PTE, 0)
    M.kvm_unmap_radix(be, vm, slot, 0, 4 * ps)
    assert len(be.tlbie_log) == 4 and vm.stats["ppc_tlbie"] == 4
    assert vm.flushed == [(0, 4 * ps >> 12)]
    assert be.tlb_batch is None


def test_set_rc_ors_bits_without_flush(be):
    vm = FakeVM()
    bare = leaf(0) & ~(P._PAGE_ACCESSED | P._PAGE_DIRTY)
    M.kvmppc_create_pte(be, vm, bare, 0, LEVEL_PTE, 0)
    assert M.kvmppc_hv_handle_set_rc(be, vm, True, 0)
    assert be.entry(0) == bare | P._PAGE_ACCESSED | P._PAGE_DIRTY
    ro = bare & ~P._PAGE_WRITE
    M.kvmppc_create_pte(be, vm, ro, SZ_2M, LEVEL_PTE, 0)
    assert not M.kvmppc_hv_handle_set_rc(be, vm, True, SZ_2M)   # no W: falls through
    assert not be.tlbie_log


# ------------------------------------------------------------------ instantiate


def _fault(slot, gpa, hva, write=False, writable=True):
    f = PageFault(addr=gpa, gfn=gpa >> 12, write=write)
    f.slot, f.hva, f.map_writable = slot, hva, writable
    return f


def _instantiate(be, vm, f):
    host = find_kvm_host_pte(vm, be, f.mmu_seq, f.hva)
    return M.kvmppc_book3s_instantiate_page(be, vm, f, *host, f.map_writable)


def _vm(be, slot, **host):
    host.setdefault("size", be.fmt.page_size)
    return FakeVM([slot], FakeHost(**host))


def test_new_leaf_has_r_x_and_c_with_w(be):
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    vm = _vm(be, slot)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr, write=True))
    e = be.entry(0)
    assert e & P._PAGE_ACCESSED and e & P._PAGE_EXEC and e & P._PAGE_WRITE and e & P._PAGE_DIRTY


def test_read_fault_upgraded_is_writable_and_dirty(be):
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000, flags=1, logging=True)
    vm = _vm(be, slot)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr, write=False))
    e = be.entry(0)
    assert e & P._PAGE_WRITE and e & P._PAGE_DIRTY       # even while logging (invariant 5)


def test_read_fault_not_upgraded_has_neither_w_nor_c(be):
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    vm = _vm(be, slot)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr, writable=False))
    e = be.entry(0)
    assert not e & (P._PAGE_WRITE | P._PAGE_DIRTY) and e & P._PAGE_EXEC and e & P._PAGE_ACCESSED


def test_upgrade_without_host_w_keeps_w_clear(be):
    """W comes from the host PTE: upgrade_write on a read-only host PTE grants nothing."""
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    vm = _vm(be, slot, writable=False)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr, write=True))
    assert not be.entry(0) & (P._PAGE_WRITE | P._PAGE_DIRTY)


@pytest.mark.parametrize("gpa_off,hva_off,host_size,logging,want", [
    (0, 0, SZ_1G, False, SZ_1G),
    (0, 0, SZ_2M, False, SZ_2M),
    (0, SZ_2M, SZ_1G, False, None),       # 1G host page congruent only mod 2M: base page
    (0, 0x10000 * 3, SZ_2M, False, None),  # not congruent: base page
    (0, 0, SZ_1G, True, None),            # logging: base page
    (0, 0, SZ_2M, True, None),
    (0, 0, 1 << 29, False, None),         # a PMD size radix does not have: base page
    (0, 0, None, False, None),            # a PAGE_SIZE host page
])
def test_level_selection(be, gpa_off, hva_off, host_size, logging, want):
    base_hva = 0x7F0000000000
    slot = FakeSlot(0, 1 << 20, userspace_addr=base_hva + hva_off,
                    flags=1 if logging else 0, logging=logging)
    host_size = host_size or be.fmt.page_size
    host_base = 0x40_0000_0000
    vm = _vm(be, slot, size=host_size, base=host_base)
    gpa = SZ_1G + gpa_off + 0x50000
    hva = slot.userspace_addr + gpa
    ret, level = _instantiate(be, vm, _fault(slot, gpa, hva))
    assert ret == 0
    table, idx, shift, e = M.find_kvm_secondary_pte(be, gpa)
    want = want or be.fmt.page_size
    assert 1 << shift == want
    # The RPN is the host block's first frame | the sub-frame of hva (invariant 7).
    assert P.pte_pa(e, be.fmt.page_shift) == (host_base + (hva & (host_size - 1))) & ~(want - 1)


def test_host_pte_rpn_is_first_frame_of_the_host_page(be):
    """find_kvm_host_pte: the host PTE maps the whole host page; its RPN is the first frame,
    whatever 4 KiB of it the hva points at; shift is log2 of the host mapping."""
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    ps = be.fmt.page_size
    vm = _vm(be, slot, base=0x1230000 & ~(ps - 1))
    pte, shift = find_kvm_host_pte(vm, be, 0, slot.userspace_addr + ps - 0x1000)
    assert shift == be.fmt.page_shift
    assert P.pte_pa(pte, be.fmt.page_shift) == 0x1230000 & ~(ps - 1)
    assert pte & P._PAGE_PRESENT and pte & P._PAGE_PTE and pte & P._PAGE_WRITE


def test_host_pte_missing_or_seq_changed_is_none(be):
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    vm = _vm(be, slot)
    assert find_kvm_host_pte(vm, be, 0, slot.userspace_addr) is not None
    assert find_kvm_host_pte(vm, be, 1, slot.userspace_addr) is None     # seq moved on
    vm.mmu_invalidate.begin()
    assert find_kvm_host_pte(vm, be, 0, slot.userspace_addr) is None     # in progress
    vm.mmu_invalidate.in_progress = 0
    vm.host.present = False
    assert find_kvm_host_pte(vm, be, 0, slot.userspace_addr) is None     # no host PTE


def test_memslot_boundary_quirk_option():
    slot = FakeSlot(0, 16, userspace_addr=0x7F0000000000)   # a 64K slot
    vm = FakeVM([slot], FakeHost(size=SZ_2M))
    be = PpcRadixBackend(huge_past_slot=True)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr))
    assert M.find_kvm_secondary_pte(be, 0)[2] == 21          # [quirk] past the slot
    assert check_radix_invariants(be, vm) == []              # it still intersects a slot
    be2 = PpcRadixBackend(huge_past_slot=False)
    _instantiate(be2, vm, _fault(slot, 0, slot.userspace_addr))
    assert M.find_kvm_secondary_pte(be2, 0)[2] == 12


@pytest.mark.parametrize("kw,att", [({"pfnmap": True}, 0x20), ({}, 0)])
def test_attributes_copied_from_host_pte(be, kw, att):
    slot = FakeSlot(0, 1 << 20, userspace_addr=0x7F0000000000)
    vm = _vm(be, slot, **kw)
    _instantiate(be, vm, _fault(slot, 0, slot.userspace_addr))
    e = be.entry(0)
    assert P.pte_att(e) == att
    assert bool(e & P._PAGE_SPECIAL) == bool(kw.get("pfnmap"))
