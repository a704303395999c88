"""Dirty logging: write-protect mode, PML mode (buffer, full exit, drain), eager split,
enable_log_dirty_pt_masked, INITIALLY_SET, huge-page recovery (§7, invariants 9 and 22)."""

from __future__ import annotations

from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import PAGE, SZ_2M
from kvmcore_x86_tdp import spte as S
from kvmcore_x86_tdp.pml import PML_LOG_NR_ENTRIES, PmlBuffer

LOG = KVM_MEM_LOG_DIRTY_PAGES


def enable_log(g, hva, size=SZ_2M, gpa=0):
    g.vm.set_user_memory_region(0, gpa, size, hva, flags=LOG)


def test_wrprot_mode_clears_w_keeps_mmu_writable_and_flushes_once(make):
    g = make(pml=False)
    hva = g.slot(0, 0, SZ_2M)
    for i in range(4):
        g.vcpu.write(i * PAGE, b"x")
    flushes = g.vm.stats["tlb_flush_range"]
    enable_log(g, hva)
    assert g.vm.stats["tlb_flush_range"] == flushes + 1          # memslot flush
    for m in g.vm.mappings():
        assert not m.writable and m.raw & S.EPT_SPTE_MMU_WRITABLE and m.dirty
    g.vcpu.write(2 * PAGE, b"y")
    assert g.vm.get_dirty_log(0) == [2]
    # GET_DIRTY_LOG re-protected gfn 2 (W only, no MMU-writable loss: no extra flush need).
    assert not g.leaf(2 * PAGE).writable and g.leaf(2 * PAGE).raw & S.EPT_SPTE_MMU_WRITABLE


def test_invariant_9_every_w_transition_is_logged(make):
    g = make(pml=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"0")
    enable_log(g, hva, 4 << 20)
    written = {0, 5, 511, 512, 700}
    for gfn in sorted(written):
        g.vcpu.write(gfn * PAGE, b"w")
    assert set(g.vm.get_dirty_log(0)) == written
    for m in g.vm.mappings():
        assert m.size == PAGE or not m.writable


def test_pml_mode_clears_d_and_logs_through_buffer(make):
    g = make(pml=True)
    hva = g.slot(0, 0, SZ_2M)
    for i in range(3):
        g.vcpu.write(i * PAGE, b"x")
    enable_log(g, hva)
    for m in g.vm.mappings():
        assert m.writable and not m.dirty      # 4K leaves stay writable, D cleared
    g.vcpu.write(PAGE, b"y")
    assert g.leaf(PAGE).dirty
    assert g.vm.stats["x86_tdp.pml_drained"] == 1
    assert g.vm.get_dirty_log(0) == [1]
    # GET re-armed by clearing D (PML), not W.
    m = g.leaf(PAGE)
    assert m.writable and not m.dirty


def test_pml_full_exit_drains_512(make):
    g = make(pml=True, pml_drain_on_exit=False)
    npages = PML_LOG_NR_ENTRIES + 8
    hva = g.slot(0, 0, 4 << 20)
    for i in range(npages):
        g.vcpu.write(i * PAGE, b"x")
    enable_log(g, hva, 4 << 20)
    for i in range(npages):
        g.vcpu.write(i * PAGE, b"y")
    assert g.vm.stats["x86_tdp.pml_full"] == 1
    buf = g.vcpu.arch["pml"]
    assert len(buf) == 8 and g.vm.stats["x86_tdp.pml_drained"] == PML_LOG_NR_ENTRIES
    assert g.vm.get_dirty_log(0) == list(range(npages))   # sync_dirty_log drained the rest
    assert len(buf) == 0


def test_pml_buffer_order():
    buf = PmlBuffer()
    for i in range(PML_LOG_NR_ENTRIES):
        buf.log(i << 12)
    assert buf.full and buf.index == -1
    assert buf.drain() == [i << 12 for i in range(PML_LOG_NR_ENTRIES)]
    assert buf.index == 511


def test_eager_split_on_enable(make):
    g = make()
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"h")
    assert g.leaf(0).size == SZ_2M
    enable_log(g, hva, 4 << 20)
    ms = list(g.vm.mappings())
    assert len(ms) == 512 and all(m.size == PAGE for m in ms)
    assert g.vm.stats["x86_tdp.split_huge_page"] == 1


def test_initially_set_protects_lazily_on_clear(make):
    g = make(pml=False)
    g.vm.enable_dirty_log_manual_protect(initially_set=True)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"h")
    enable_log(g, hva, 4 << 20)
    assert g.leaf(0).size == SZ_2M and g.leaf(0).writable        # nothing protected yet
    g.vm.clear_dirty_log(0, 0, 64, [3])
    # Eager split of [3, 4) and the 2M SPTE covering it write-protected, then gfn 3 wrprot.
    assert g.leaf(3 * PAGE).size == PAGE and not g.leaf(3 * PAGE).writable
    g.vcpu.write(3 * PAGE, b"z")
    assert 3 in g.vm.get_dirty_log(0)


def test_enable_log_dirty_pt_masked_touches_only_mask(make):
    g = make(pml=False)
    g.vm.enable_dirty_log_manual_protect()
    hva = g.slot(0, 0, SZ_2M, flags=LOG)
    for i in range(8):
        g.vcpu.write(i * PAGE, b"x")
    assert g.vm.get_dirty_log(0) == list(range(8))
    slot = g.vm.memslots()[0]
    with g.vm.mmu_lock:
        g.b.enable_log_dirty_pt_masked(vm=g.vm, slot=slot, gfn_offset=0, mask=0b10100)
    g.vm.flush_remote_tlbs()                   # what kvm_clear_dirty_log_protect does next
    w = [g.leaf(i * PAGE).writable for i in range(8)]
    assert w == [True, True, False, True, False, True, True, True]
    assert hva


def test_recover_huge_pages_when_logging_stops(make):
    g = make()
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"h")
    enable_log(g, hva, 4 << 20)
    assert g.leaf(0).size == PAGE
    tables = g.vm.page_table_bytes()
    g.vm.set_user_memory_region(0, 0, 4 << 20, hva, flags=0)
    assert g.leaf(0).size == SZ_2M
    assert g.vm.page_table_bytes() == tables - PAGE


def test_eager_split_1g_down_to_4k(make):
    """tdp_mmu_split_huge_pages_root splits top-down: a 1G leaf becomes 512 2M leaves, each of
    which becomes 512 4K leaves; pfns and permissions carry over."""
    from conftest import SZ_1G
    g = make()
    hva = g.slot(0, 0, SZ_1G, kind="hugetlb_1g")
    g.vcpu.write(0, b"g")
    big = g.leaf(0)
    assert big.size == SZ_1G
    enable_log(g, hva, SZ_1G)
    ms = list(g.vm.mappings())
    assert len(ms) == 262144 and all(m.size == PAGE for m in ms)
    assert [m.pfn for m in ms[:3]] == [big.pfn, big.pfn + 1, big.pfn + 2]
    assert g.vm.stats["x86_tdp.split_huge_page"] == 1 + 512
    assert g.vm.page_table_bytes() == (2 + 1 + 1 + 512) * PAGE  # 2 roots, PDPT, PD, 512 PTs


def test_pml_full_drains_into_the_vcpus_ring(make):
    """With dirty rings, a PML drain pushes into the vCPU's own ring (kvm_vcpu_mark_page_dirty)
    and the ring reserves PML's 512 entries (cpu_dirty_log_size)."""
    from kvmcore import VM, HostMemory
    host = HostMemory()
    vm = VM(arch="x86_tdp", host=host, pml=True, pml_drain_on_exit=False)
    vm.enable_dirty_ring(64 * 1024)
    vcpu = vm.create_vcpu(0)
    hva = host.mmap(4 << 20)
    vm.set_user_memory_region(0, 0, 4 << 20, hva, flags=LOG)
    g = type("G", (), {"vm": vm, "vcpu": vcpu})
    n = PML_LOG_NR_ENTRIES + 3
    for i in range(n):
        g.vcpu.write(i * PAGE, b"x")          # creation logs directly (make_spte)
    assert len(g.vcpu.harvest_dirty_ring()) == n
    g.vm.reset_dirty_rings()                  # re-arm: clear D (PML)
    for i in range(n):
        g.vcpu.write(i * PAGE, b"y")          # hardware D 0->1: PML
    got = g.vcpu.harvest_dirty_ring()
    assert [off for _slot, off in got] == list(range(PML_LOG_NR_ENTRIES))
    assert len(g.vcpu.arch["pml"]) == 3 and g.vm.cpu_dirty_log_size == 512
    vm.check_invariants()


def test_initially_set_keeps_writable_2m_leaves_until_clear(make):
    """Invariant 9 with manual protect + INITIALLY_SET: kvm_mmu_slot_apply_flags returns
    before write-protecting or splitting, so a writable 2M leaf legitimately stays in the
    dirty-logged slot until CLEAR_DIRTY_LOG reaches it (then it is write-protected)."""
    g = make(pml=False)
    hva = g.slot(0, 0, 4 << 20, thp=True)
    g.vcpu.write(0, b"h")
    assert g.leaf(0).size == SZ_2M and g.leaf(0).writable
    g.vm.enable_dirty_log_manual_protect(initially_set=True)
    enable_log(g, hva, 4 << 20)
    m = g.leaf(0)
    assert m.size == SZ_2M and m.writable
    g.vm.check_invariants()
    g.vm.clear_dirty_log(0, 0, 64, range(64))
    assert not any(m.writable and m.size > PAGE for m in g.vm.mappings())
    g.vm.check_invariants()
