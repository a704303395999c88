"""The G-stage entries KVM writes, exactly (Linux 6.18's arch/riscv/kvm/gstage.c, mmu.c):
leaves V|R|X|U|A|D[|W], non-leaves V alone, the 16 KiB root, 4 KiB leaves for THP-backed
memory, kvm_riscv_gstage_set_pte's -EEXIST on a bigger leaf and its overwrite of the entry
at the fault's level, write protection for dirty logging, the memslot checks of
kvm_arch_prepare_memory_region, the modes, Svadu; and the later kernels' behaviour the VM
options turn on (THP blocks, split on fault, eager split, INITIALLY_SET)."""

from __future__ import annotations

import errno

import pytest
from kvmcore import KvmError, MmioExit
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmcore.uapi import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS,
                          KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_READONLY, SZ_1G, SZ_2M)

from conftest import GPA, entry, pfn_of

V, R, W, X, U, A, D = 1, 2, 4, 8, 16, 64, 128
LEAF_RW = V | R | W | X | U | A | D          # pte_mkdirty(pfn_pte(pfn, PAGE_WRITE_EXEC))
LEAF_RO = V | R | X | U | A | D              # pte_mkdirty(pfn_pte(pfn, PAGE_READ_EXEC))


def test_a_read_fault_maps_a_4k_leaf_writable_with_a_and_d_preset(vm, host):
    hva = host.mmap(1 << 20)
    host.write(hva + 0x3000, b"present")       # else a read maps the zero page read-only
    vm.set_user_memory_region(0, GPA, 1 << 20, hva)
    vm.create_vcpu(0).read(GPA + 0x3008, 8)
    level, pte = entry(vm, GPA + 0x3000)
    assert level == 0 and pte & 0x3FF == LEAF_RW
    assert pfn_of(pte) == host.lookup_pte(hva + 0x3000)[0]
    t = vm.backend.table(0)
    root = t.store[t.pt.root]
    assert len(root) == 2048 and t.pt.root % 16384 == 0      # the 16 KiB Sv39x4 root
    nonleaf = root[(GPA >> 30) & 2047]
    assert nonleaf & 0x3FF == V                              # _PAGE_TABLE: V alone


def test_logging_read_maps_read_only_then_the_write_adds_w_and_logs(vm, host):
    hva = host.mmap(1 << 20)
    vm.set_user_memory_region(0, GPA, 1 << 20, hva, LOG)
    cpu = vm.create_vcpu(0)
    cpu.read(GPA, 8)
    assert entry(vm, GPA)[1] & 0x3FF == LEAF_RO
    assert vm.get_dirty_log(0) == []
    cpu.write(GPA, b"x")
    assert entry(vm, GPA)[1] & 0x3FF == LEAF_RW
    assert vm.get_dirty_log(0) == [0]
    assert entry(vm, GPA)[1] & 0x3FF == LEAF_RO              # re-protected: W off, D kept


@pytest.mark.parametrize("kind,size,level", [("hugetlb_2m", SZ_2M, 1),
                                              ("hugetlb_1g", SZ_1G, 2)])
def test_hugetlb_leaves(vm, host, kind, size, level):
    hva = host.mmap(2 * size, kind=kind)
    vm.set_user_memory_region(0, SZ_1G, 2 * size, hva)
    vm.create_vcpu(0).write(SZ_1G + size + 0x5000, b"x")
    lvl, pte = entry(vm, SZ_1G + size)
    assert (lvl, pte & 0x3FF) == (level, LEAF_RW)
    assert (pfn_of(pte) << 12) % size == 0


def test_thp_backed_memory_maps_4k_leaves(vm, host):
    """6.18's kvm_riscv_mmu_map has no transparent_hugepage_adjust: a THP is mapped a page
    at a time, though the host maps it with a PMD."""
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).write(GPA + SZ_2M + 0x5000, b"x")
    assert host.host_mapping_size(hva + SZ_2M) == SZ_2M
    assert [(m.gfn - (GPA >> 12), m.size) for m in vm.mappings()] == [(517, 4096)]


def test_transparent_hugepage_maps_a_thp_with_a_2m_leaf(make_vm, host):
    """The option: 7.0's transparent_hugepage_adjust (ed7ae7a34bea)."""
    vm = make_vm(transparent_hugepage=True)
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).write(GPA + SZ_2M + 0x5000, b"x")
    lvl, pte = entry(vm, GPA + SZ_2M)
    assert (lvl, pte & 0x3FF) == (1, LEAF_RW)
    assert pfn_of(pte) == host.lookup_pte(hva + SZ_2M)[0]


def _logging_over_a_block(vm, host):
    """A hugetlb slot mapped with a 2 MiB block, then dirty logging switched on."""
    hva = host.mmap(2 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, LOG)
    return cpu


def test_enabling_logging_write_protects_without_splitting(vm, host):
    """6.18's kvm_arch_commit_memory_region write-protects the slot and splits nothing
    (no eager_page_split before the 2026 series)."""
    _logging_over_a_block(vm, host)
    level, pte = entry(vm, GPA)
    assert level == 1 and pte & 0x3FF == LEAF_RO
    assert vm.stats["riscv_unmap_skip"] == 0


def test_a_logging_write_meeting_the_block_fails_kvm_run_with_eexist(vm, host):
    """The write maps 4 KiB (logging); kvm_riscv_gstage_set_pte's walk meets the 2 MiB leaf
    above that level: -EEXIST, which kvm_riscv_mmu_map and gstage_page_fault return out of
    KVM_RUN. The gfn was marked dirty first; the block stays, read-only; reads still work."""
    cpu = _logging_over_a_block(vm, host)
    with pytest.raises(KvmError) as e:
        cpu.write(GPA + 0x3000, b"y")
    assert e.value.errno == errno.EEXIST
    level, pte = entry(vm, GPA + 0x3000)
    assert level == 1 and pte & 0x3FF == LEAF_RO
    assert vm.get_dirty_log(0) == [3]
    assert cpu.read(GPA, 1) == b"x"
    with pytest.raises(KvmError) as e:
        cpu.write(GPA + 0x3000, b"y")                       # again: nothing changed
    assert e.value.errno == errno.EEXIST


@pytest.mark.parametrize("series,after", [
    (False, [(0, SZ_2M, True)]),
    (True, [(0, 4096, True), (3, 4096, True)])])
def test_a_block_fault_over_small_leaves(make_vm, host, series, after):
    """Logging off again, a write to a 4 KiB leaf left read-only maps the hugetlb page's
    2 MiB: 6.18's kvm_riscv_gstage_set_pte stops at level 1 and overwrites the table entry
    there with the block; with ``split_huge_on_fault`` map_page finds the small leaf of the
    same frame and gives it W in place (kvm_riscv_gstage_update_pte_prot)."""
    vm = make_vm(split_huge_on_fault=series)
    hva = host.mmap(2 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, LOG)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    cpu.read(GPA + 0x3000, 1)
    assert [m.size for m in vm.mappings()] == [4096, 4096]
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu.write(GPA + 0x3000, b"y")
    assert [(m.gfn - (GPA >> 12), m.size, m.writable) for m in vm.mappings()] == after
    assert cpu.read(GPA, 1) == b"x"
    vm.check_invariants()


def test_eager_page_split_splits_when_logging_starts(make_vm, host):
    """The option: the 2026 series' mmu_split_memory_region after the write protection."""
    vm = make_vm(eager_page_split=True)
    cpu = _logging_over_a_block(vm, host)
    block = pfn_of(entry(vm, GPA)[1])
    leaves = list(vm.mappings(GPA, GPA + SZ_2M))
    assert len(leaves) == 512 and all(m.size == 4096 and not m.writable for m in leaves)
    assert all(m.raw & 0x3FF == LEAF_RO and pfn_of(m.raw) == block + i
               for i, m in enumerate(leaves))                # make_child_pte
    cpu.write(GPA + 0x7000, b"y")
    assert vm.lookup(GPA + 0x7000).writable and not vm.lookup(GPA + 0x8000).writable
    assert vm.get_dirty_log(0) == [7]


def test_split_huge_on_fault_splits_the_block_on_the_write(make_vm, host):
    """The option: 6ad36f39a769's map_page, case 1 — the leaf found is bigger than the size
    the fault maps: split, then the fault's leaf is set."""
    vm = make_vm(split_huge_on_fault=True)
    cpu = _logging_over_a_block(vm, host)
    level, pte = entry(vm, GPA)
    assert level == 1 and pte & 0x3FF == LEAF_RO             # protected, not split
    cpu.write(GPA + 0x3000, b"y")
    leaves = list(vm.mappings(GPA, GPA + SZ_2M))
    assert len(leaves) == 512
    assert [m.gfn - (GPA >> 12) for m in leaves if m.writable] == [3]
    assert vm.get_dirty_log(0) == [3]


def test_clear_dirty_log_reprotects_from_the_first_to_the_last_bit(vm, host):
    """kvm_arch_mmu_enable_log_dirty_pt_masked: 6.18's kvm_riscv_gstage_wp_range over
    [first set bit, last set bit] takes W from page 1 too, whose bit is clear."""
    vm.enable_dirty_log_manual_protect()
    hva = host.mmap(1 << 20)
    vm.set_user_memory_region(0, GPA, 1 << 20, hva, LOG)
    cpu = vm.create_vcpu(0)
    for page in range(4):
        cpu.write(GPA + page * 4096, b"x")
    vm.clear_dirty_log(0, 0, 64, [0, 2])
    assert [p for p in range(4) if not vm.lookup(GPA + p * 4096).writable] == [0, 1, 2]


@pytest.mark.parametrize("whole", [False, True])
def test_a_ring_reset_of_a_block(make_vm, host, whole):
    """With the dirty ring alone a hugetlb block is mapped writable in a logging slot (see
    below); resetting its harvested gfn runs kvm_riscv_gstage_wp_range over that one page.
    6.18's walk protects only a leaf the range holds whole: the block keeps W, and later
    writes to it are not seen (the lost write protection of huge pages). a216e24fc947 (VM
    option ``wp_whole_leaves``) aligns down to the leaf the walk reaches and protects it
    whole: the next write faults and is logged (at the block's first gfn, as before)."""
    vm = make_vm(wp_whole_leaves=whole)
    vm.enable_dirty_ring(1 << 16)
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva, LOG)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA + 0x5000, b"x")
    assert cpu.harvest_dirty_ring() == [(0, 0)]
    vm.reset_dirty_rings()
    assert entry(vm, GPA)[1] & 0x3FF == (LEAF_RW & ~W if whole else LEAF_RW)
    cpu.write(GPA + 0x7000, b"y")
    assert cpu.harvest_dirty_ring() == ([(0, 0)] if whole else [])
    vm.check_invariants()


def test_the_options_take_their_divergences_away(make_vm):
    """A later kernel's behaviour, turned on, is no divergence any more (the conformance
    suite runs with ``--vm-option``)."""
    assert {"test_thp_maps_pmd", "test_enabling_logging_splits_writes"} <= \
        set(make_vm().arch_info.known_divergences)
    assert "test_thp_maps_pmd" not in \
        make_vm(transparent_hugepage=True).arch_info.known_divergences
    for option in ("split_huge_on_fault", "eager_page_split"):
        assert "test_enabling_logging_splits_writes" not in \
            make_vm(**{option: True}).arch_info.known_divergences


def test_initially_set_is_not_offered(vm):
    """6.18's riscv kvm_host.h leaves KVM_DIRTY_LOG_MANUAL_CAPS at the generic
    PROTECT_ENABLE; INITIALLY_SET came in 6.19 (the option)."""
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == \
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    with pytest.raises(KvmError) as e:
        vm.enable_dirty_log_manual_protect(initially_set=True)
    assert e.value.errno == errno.EINVAL
    vm.enable_dirty_log_manual_protect()


def test_dirty_log_initially_set_offers_it(make_vm):
    vm = make_vm(dirty_log_initially_set=True)
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == KVM_DIRTY_LOG_MANUAL_CAPS
    vm.enable_dirty_log_manual_protect(initially_set=True)


def test_a_same_frame_fault_replaces_the_permissions_in_place(vm, host):
    """kvm_riscv_gstage_set_pte stores the fault's whole PTE over the leaf of its level: a
    late read fault in a logging slot takes W away; the next write faults again and is
    logged again — the declared divergence, step by step."""
    hva = host.mmap(1 << 20)
    host.write(hva, b"present")                # one frame throughout: no COW of a zero page
    vm.set_user_memory_region(0, GPA, 1 << 20, hva, LOG)
    reader, writer = vm.create_vcpu(0), vm.create_vcpu(1)
    steps = reader.step_access("read", GPA, 8)
    while next(steps) != "pf_lock_wait":
        pass
    writer.write(GPA, b"w")
    assert entry(vm, GPA)[1] & 0x3FF == LEAF_RW
    assert vm.get_dirty_log(0) == [0]
    vm.set_user_memory_region(0, GPA, 1 << 20, hva, LOG)     # nothing changes (same flags)
    for _ in steps:
        pass
    assert entry(vm, GPA)[1] & 0x3FF == LEAF_RO              # downgraded
    assert pfn_of(entry(vm, GPA)[1]) == host.lookup_pte(hva)[0]
    writer.write(GPA, b"v")
    assert vm.get_dirty_log(0) == [0]


def test_prepare_memory_region_checks(make_vm, host):
    vm = make_vm()
    limit = 1 << 41                                          # Sv39x4
    hva = host.mmap(1 << 21)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, limit - (1 << 21), 1 << 21, hva)
    assert e.value.errno == errno.EFAULT                     # reaches the end: >=
    vm.set_user_memory_region(0, limit - (2 << 21), 1 << 21, hva)
    make_vm(mode="sv48x4").set_user_memory_region(0, limit, 1 << 21, hva)
    ro = host.mmap(1 << 20, prot="r")
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(1, GPA, 1 << 20, ro)
    assert e.value.errno == errno.EPERM
    vm.set_user_memory_region(1, GPA, 1 << 20, ro, KVM_MEM_READONLY)
    dev = host.mmap(1 << 20, kind="pfnmap", pfn=0x100000)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(2, 2 * GPA, 1 << 20, dev, LOG)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("mode,levels,gpa_bits", [("sv39x4", 3, 41), ("sv48x4", 4, 50),
                                                   ("sv57x4", 5, 59)])
def test_modes(make_vm, host, mode, levels, gpa_bits):
    vm = make_vm(mode=mode)
    assert vm.arch_info.levels == levels
    g = vm.backend.table(0).g
    assert (g.ia_bits, g.bits[0], g.nlevels) == (gpa_bits, 11, levels)
    hva = host.mmap(1 << 20)
    vm.set_user_memory_region(0, GPA, 1 << 20, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    assert entry(vm, GPA)[0] == 0
    if gpa_bits < 52:                            # the model's gpas end at 2**52
        with pytest.raises(MmioExit):            # beyond the gpa bits: no slot, MMIO
            cpu.read(1 << gpa_bits, 4)
    with pytest.raises(KvmError):
        make_vm(mode="sv32x4")


@pytest.mark.parametrize("svadu", [False, True])
def test_accessed_bit_by_fault_or_by_hardware(make_vm, host, svadu):
    vm = make_vm(svadu=svadu)
    hva = host.mmap(1 << 20)
    vm.set_user_memory_region(0, GPA, 1 << 20, hva)
    cpu = vm.create_vcpu(0)
    cpu.read(GPA, 1)
    assert host.age(hva, 4096)                               # clears A, no flush
    vm.flush_remote_tlbs()
    assert not entry(vm, GPA)[1] & A
    faults = vm.stats["fault_access_flag"]
    cpu.read(GPA, 1)
    assert entry(vm, GPA)[1] & A
    assert vm.stats["fault_access_flag"] == faults + (0 if svadu else 1)


def test_hwpoison_in_a_hugetlb_vma_signals_the_vma_page_shift(vm, host):
    """kvm_riscv_mmu_map sends send_sig_mceerr(BUS_MCEERR_AR, hva, vma_pageshift): the hugetlb
    page's shift, where x86 always says PAGE_SHIFT."""
    from kvmcore import HwPoisonSignal

    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    host.poison(hva + 0x3000)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(HwPoisonSignal) as info:
        vcpu.read(GPA + 0x3000, 8)
    assert info.value.lsb == 21
    assert info.value.hva == hva + 0x3000
    # The hugetlb page is poisoned whole: any other page of it too.
    with pytest.raises(HwPoisonSignal) as info:
        vcpu.read(GPA + 0x100000, 8)
    assert (info.value.hva, info.value.lsb) == (hva + 0x100000, 21)


def test_with_the_dirty_ring_alone_the_fault_path_does_not_log(vm, host):
    """6.18's kvm_riscv_mmu_map logs when memslot->dirty_bitmap is set, and the dirty ring
    alone leaves it NULL: in a LOG_DIRTY_PAGES slot a read fault maps writable (and pushes
    its gfn: mark_page_dirty_in_slot before every writable mapping), and a hugetlb page is
    mapped whole."""
    vm.enable_dirty_ring(1 << 16)
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva, LOG)
    cpu = vm.create_vcpu(0)
    cpu.read(GPA + 0x5000, 8)
    level, pte = entry(vm, GPA)
    assert (level, pte & 0x3FF) == (1, LEAF_RW)
    assert cpu.harvest_dirty_ring() == [(0, 0)]          # the block's first gfn


def test_618_starting_dirty_logging_misses_leaves_past_an_unaligned_empty_start(vm, host):
    """mmu_wp_memory_region walks the slot with kvm_riscv_gstage_wp_range: from a slot base
    1 MiB into an empty 2 MiB region, 6.18's step past the empty entry lands at 3 MiB and
    never looks at the leaves of [2 MiB, 3 MiB). They keep W: the guest writes through one
    without a fault and the write is never logged (the core's invariants report it)."""
    from kvmcore import InvariantError

    base = GPA + SZ_2M // 2
    hva = host.mmap(2 * SZ_2M)
    vm.set_user_memory_region(0, base, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA + SZ_2M + 0x1000, b"a")             # [2 MiB, 3 MiB)
    cpu.write(GPA + SZ_2M + SZ_2M // 2 + 0x1000, b"b")  # [3 MiB, 4 MiB)
    vm.set_user_memory_region(0, base, 2 * SZ_2M, hva, LOG)
    assert entry(vm, GPA + SZ_2M + 0x1000)[1] & W
    assert not entry(vm, GPA + SZ_2M + SZ_2M // 2 + 0x1000)[1] & W
    cpu.write(GPA + SZ_2M + 0x1000, b"c")
    with pytest.raises(InvariantError, match="neither logged nor pending"):
        vm.check_invariants()
    assert vm.get_dirty_log(0) == []                   # the write is lost to the log
    vm.set_user_memory_region(0, base, 2 * SZ_2M, hva)  # logging off: nothing to check
