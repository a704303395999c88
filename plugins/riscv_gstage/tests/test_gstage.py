"""The G-stage entries KVM writes, exactly (arch/riscv/kvm/gstage.c, mmu.c): leaves
V|R|X|U|A|D[|W], non-leaves V alone, the 16 KiB root, the three cases of
kvm_riscv_gstage_map_page, write protection and eager split for dirty logging, the memslot
checks of kvm_arch_prepare_memory_region, the modes, Svadu."""

from __future__ import annotations

import errno

import pytest
from kvmcore import KvmError, MmioExit
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmcore.uapi import KVM_MEM_READONLY, SZ_1G, SZ_2M

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


@pytest.mark.parametrize("kind,size,level", [("thp", SZ_2M, 1), ("hugetlb_1g", SZ_1G, 2)])
def test_huge_leaves(vm, host, kind, size, level):
    hva = host.mmap(2 * size, thp=True) if kind == "thp" else host.mmap(2 * size, kind=kind)
    vm.set_user_memory_region(0, SZ_1G, 2 * size, hva)
    vm.create_vcpu(0).write(SZ_1G + size + 0x5000, b"x")
    lvl, pte = entry(vm, SZ_1G + size)
    assert (lvl, pte & 0x3FF) == (level, LEAF_RW)
    assert (pfn_of(pte) << 12) % size == 0


def test_enabling_logging_write_protects_and_eagerly_splits(vm, host):
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    block = entry(vm, GPA)[1]
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, LOG)
    leaves = list(vm.mappings(GPA, GPA + SZ_2M))
    assert len(leaves) == 512 and all(m.size == 4096 and not m.writable for m in leaves)
    assert all(m.raw & 0x3FF == LEAF_RO and pfn_of(m.raw) == pfn_of(block) + i
               for i, m in enumerate(leaves))                # make_child_pte
    cpu.write(GPA + 0x7000, b"y")
    assert vm.lookup(GPA + 0x7000).writable and not vm.lookup(GPA + 0x8000).writable
    assert vm.get_dirty_log(0) == [7]


def test_without_eager_split_a_logging_write_splits_the_block_on_the_fault(make_vm, host):
    """map_page case 1: the leaf found is bigger than the size the fault maps."""
    vm = make_vm(eager_page_split=False)
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    cpu = vm.create_vcpu(0)
    cpu.write(GPA, b"x")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, LOG)
    level, pte = entry(vm, GPA)
    assert level == 1 and pte & 0x3FF == LEAF_RO             # protected, not split
    cpu.write(GPA + 0x3000, b"y")
    leaves = list(vm.mappings(GPA, GPA + SZ_2M))
    assert len(leaves) == 512
    assert [m.gfn - (GPA >> 12) for m in leaves if m.writable] == [3]
    assert vm.get_dirty_log(0) == [3]


def test_a_same_frame_fault_replaces_the_permissions_in_place(vm, host):
    """map_page case 3 (and case 2, a smaller leaf of the same frame): a late read fault in a
    logging slot takes W away (kvm_riscv_gstage_update_pte_prot); the next write faults
    again and is logged again — the declared divergence, step by step."""
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
    """kvm_riscv_mmu_map sends kvm_send_hwpoison_signal(hva, vma_pageshift): the hugetlb
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
