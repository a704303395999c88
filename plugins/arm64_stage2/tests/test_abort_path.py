"""The abort path end to end through the public API (arm64_stage2.md §3, §6, §9; invariants 3, 8,
10, 14, 18, 19, 22)."""

from __future__ import annotations

import errno

import pytest
from kvmcore import GuestAbort, KvmError, MemoryFaultExit, MmioExit
from kvmcore.records import ACCESS_FLAG, Access, NOT_PRESENT, PERMISSION, Translation, Violation
from kvmcore.uapi import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                          KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)

from conftest import GPA, SZ_1G, SZ_2M, backend_of, slot
from kvmcore_arm64_stage2.pgtable import (MT_S2_DEVICE_nGnRE, MT_S2_FWB_NORMAL, MT_S2_NORMAL,
                                          pte_memattr)

PAGE = 4096


# ---------------------------------------------------------------- what translate reports

def test_translate_reports_fault_kinds_with_level_and_granule(vm, host):
    slot(vm, host, 0, GPA, 16 * PAGE)
    vcpu = vm.create_vcpu(0)
    v = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA, access=Access("read"))
    assert isinstance(v, Violation) and v.kind == NOT_PRESENT
    assert (v.level, v.size, v.error_code) == (1, SZ_1G, 0x04 | 1), "empty level-1 entry"
    vcpu.read(GPA, 8)
    t = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA, access=Access("read"))
    assert isinstance(t, Translation) and t.size == PAGE
    host.age(vm.gfn_to_memslot(GPA >> 12).userspace_addr, 16 * PAGE)
    v = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA, access=Access("read"))
    assert (v.kind, v.level, v.size, v.error_code) == (ACCESS_FLAG, 3, PAGE, 0x08 | 3)


def test_permission_fault_reports_leaf_level(make_vm, host):
    vm = make_vm(cache_dic=False)
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 8)
    v = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA + 5 * PAGE, access=Access("fetch"))
    assert (v.kind, v.level, v.size, v.error_code) == (PERMISSION, 2, SZ_2M, 0x0C | 2)


def test_ipa_bounds_inject_aborts(make_vm):
    vm = make_vm(ipa_bits=36)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(GuestAbort) as e:
        vcpu.read(1 << 36, 8)
    assert e.value.kind == "external_abort"
    with pytest.raises(GuestAbort) as e:
        vcpu.read(1 << 48, 8)
    assert e.value.kind == "address_size"


def test_memslot_beyond_ipa_space_is_efault(make_vm, host):
    vm = make_vm(ipa_bits=32)
    hva = host.mmap(2 * PAGE)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, (1 << 32) - PAGE, 2 * PAGE, hva)
    assert e.value.errno == errno.EFAULT
    assert list(vm.all_memslots()) == []


# ---------------------------------------------------------------- slot misses (invariant 19)

def test_exec_from_no_slot_is_injected_never_mmio(vm):
    vcpu = vm.create_vcpu(0)
    with pytest.raises(GuestAbort) as e:
        vcpu.fetch(GPA)
    assert e.value.kind == "instruction_abort"
    with pytest.raises(MmioExit):
        vcpu.read(GPA, 4)


def test_write_to_readonly_slot_is_mmio(vm, host):
    slot(vm, host, 0, GPA, 4 * PAGE, KVM_MEM_READONLY)
    vcpu = vm.create_vcpu(0)
    assert vcpu.read(GPA, 4) == bytes(4)
    with pytest.raises(MmioExit) as e:
        vcpu.write(GPA, b"abcd")
    assert e.value.is_write and e.value.phys_addr == GPA
    assert not vm.lookup(GPA).writable


# ---------------------------------------------------------------- device memory (invariant 3)

def test_pfnmap_maps_device_never_executable(vm, host):
    hva = host.mmap(4 * PAGE, kind="pfnmap", pfn=0x9_0000)
    vm.set_user_memory_region(0, GPA, 4 * PAGE, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + PAGE, b"\x01\x02")
    m = vm.lookup(GPA + PAGE)
    assert m.pfn == 0x9_0001 and m.writable and not m.executable
    assert pte_memattr(m.raw) == MT_S2_DEVICE_nGnRE
    with pytest.raises(GuestAbort) as e:
        vcpu.fetch(GPA + 2 * PAGE)
    assert e.value.kind == "instruction_abort"


def test_pfnmap_block_when_hva_and_pa_share_alignment(vm, host):
    """get_vma_page_shift sizes a VM_PFNMAP block from the VMA's alignment alone: the driver
    has populated one PTE (4K) when the vCPU's fault maps the whole 2M block, and the core's
    leaf check accepts it, as the VMA maps its device pfns linearly."""
    hva = host.mmap(2 * SZ_2M, kind="pfnmap", pfn=0x20_0000)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).read(GPA + SZ_2M + 3 * PAGE, 4)
    assert host.lookup_pte(hva + SZ_2M + 3 * PAGE)[2] == PAGE
    assert host.lookup_pte(hva + SZ_2M) is None
    m = vm.lookup(GPA + SZ_2M)
    assert m.size == SZ_2M and m.pfn == 0x20_0200 and not m.executable
    vm.check_invariants()
    host.munmap(hva, 2 * SZ_2M)
    assert vm.lookup(GPA + SZ_2M) is None


def test_pfnmap_refuses_dirty_logging(vm, host):
    hva = host.mmap(4 * PAGE, kind="pfnmap", pfn=0x9_0000)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, GPA, 4 * PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert e.value.errno == errno.EINVAL
    vm.set_user_memory_region(0, GPA, 4 * PAGE, hva)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, GPA, 4 * PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("fwb,normal", [(True, MT_S2_FWB_NORMAL), (False, MT_S2_NORMAL)])
def test_ram_is_normal_memory(make_vm, host, fwb, normal):
    vm = make_vm(fwb=fwb)
    slot(vm, host, 0, GPA, 4 * PAGE)
    vm.create_vcpu(0).read(GPA, 4)
    assert pte_memattr(vm.lookup(GPA).raw) == normal


# ---------------------------------------------------------------- huge mappings (invariant 14)

def test_hugetlb_2m_and_1g_blocks(vm, host):
    slot(vm, host, 0, SZ_1G, SZ_1G, kind="hugetlb_1g")
    slot(vm, host, 1, 2 * SZ_1G, 2 * SZ_2M, kind="hugetlb_2m")
    vcpu = vm.create_vcpu(0)
    vcpu.read(SZ_1G + 12345 * PAGE, 4)
    vcpu.read(2 * SZ_1G + SZ_2M + 7 * PAGE, 4)
    assert (vm.lookup(SZ_1G).size, vm.lookup(SZ_1G).level) == (SZ_1G, 1)
    assert (vm.lookup(2 * SZ_1G + SZ_2M).size, vm.lookup(2 * SZ_1G + SZ_2M).level) == (SZ_2M, 2)


def test_no_block_when_ipa_and_hva_offsets_differ(vm, host):
    hva = host.mmap(4 * SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA + PAGE, 2 * SZ_2M, hva)
    vm.create_vcpu(0).read(GPA + SZ_2M + 5 * PAGE, 4)
    assert vm.lookup(GPA + SZ_2M + 5 * PAGE).size == PAGE


def test_no_block_when_it_would_leave_the_slot(vm, host):
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M // 2, hva)
    vm.create_vcpu(0).read(GPA, 4)
    assert vm.lookup(GPA).size == PAGE


def test_thp_promotes_to_pmd_only(vm, host):
    hva = host.mmap(4 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 4 * SZ_2M, hva)
    vm.create_vcpu(0).write(GPA + SZ_2M + 9 * PAGE, b"x")
    m = vm.lookup(GPA + SZ_2M)
    assert m.size == SZ_2M and vm.stats["arm64_thp_adjust"] == 1


@pytest.mark.parametrize("granule,block", [(16384, 32 << 20), (65536, 512 << 20)])
def test_large_granule_blocks_from_hugetlb_1g(make_vm, granule, block):
    vm = make_vm(granule=granule)
    host = vm.host
    hva = slot(vm, host, 0, SZ_1G, SZ_1G, kind="hugetlb_1g")
    vm.create_vcpu(0).read(SZ_1G + block + 3 * PAGE, 4)
    m = vm.lookup(SZ_1G + block)
    assert (m.size, m.level) == (block, 2)
    assert m.pfn == host.lookup_pte(hva + block)[0] and m.pfn % (block >> 12) == 0


def test_hugetlb_2m_is_a_contiguous_hint_with_64k_pages(make_vm):
    """With 64K pages a 2 MiB hugetlb page is CONT_PTE: stage-2 maps PAGE_SIZE."""
    vm = make_vm(granule=65536)
    hva = slot(vm, vm.host, 0, GPA, SZ_2M, kind="hugetlb_2m")
    vm.create_vcpu(0).read(GPA + 0x30000 + 3 * PAGE, 4)
    m = vm.lookup(GPA + 0x30000)
    assert (m.gfn, m.size) == ((GPA + 0x30000) >> 12, 65536)
    assert m.pfn == vm.host.lookup_pte(hva + 0x30000)[0]


# ---------------------------------------------------------------- the granule is PAGE_SIZE

@pytest.mark.parametrize("granule", [16384, 65536])
def test_granule_option_builds_a_host_with_that_page_size(granule):
    from kvmcore import VM

    vm = VM(arch="arm64_stage2", granule=granule)
    assert vm.host.page_size == vm.page_size == granule
    assert vm.backend.geom.granule == granule
    assert vm.arch_info.base_page_option == "granule"
    vm.close()


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_the_granule_follows_the_hosts_page_size(page_size):
    from kvmcore import VM, HostMemory

    vm = VM(arch="arm64_stage2", host=HostMemory(page_size=page_size))
    assert vm.backend.geom.granule == page_size and vm.options["granule"] == page_size
    vm.close()


@pytest.mark.parametrize("granule,page_size", [(65536, 4096), (4096, 65536), (16384, 65536)])
def test_granule_other_than_the_hosts_page_size_is_einval(granule, page_size):
    from kvmcore import VM, HostMemory

    with pytest.raises(KvmError) as e:
        VM(arch="arm64_stage2", host=HostMemory(page_size=page_size), granule=granule)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("granule", [16384, 65536])
def test_large_granule_leaf_maps_the_first_frame_of_the_host_page(make_vm, granule):
    """One stage-2 page is one host page: the output address is the real address of its
    first 4 KiB frame, whichever 4 KiB of it faulted."""
    vm = make_vm(granule=granule)
    host = vm.host
    hva = slot(vm, host, 0, GPA, 4 * granule)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + granule + PAGE + 8, b"w")
    m = vm.lookup(GPA + granule + PAGE)
    first = host.lookup_pte(hva + granule)[0]
    assert (m.gfn, m.size, m.level, m.writable) == ((GPA + granule) >> 12, granule, 3, True)
    assert m.pfn == first and first % (granule >> 12) == 0
    assert vm.backend.pgt.fmt.pte_to_phys(m.raw) == first << 12
    assert len(list(vm.mappings())) == 1
    t = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA + 2 * granule - PAGE,
                      access=Access("read"))
    assert isinstance(t, Translation) and (t.pfn, t.size) == (first + (granule >> 12) - 1,
                                                              granule)
    assert host.read(hva + granule + PAGE + 8, 1) == b"w"


def test_64k_thp_is_a_512m_block_at_level_2(make_vm):
    """A THP on a 64K host is a PMD of 512 MiB (8192 entries of 64 KiB): stage-2 maps it as a
    level-2 block on the huge page's frames."""
    vm = make_vm(granule=65536)
    host = vm.host
    block = 512 << 20
    assert host.pmd_size == block == vm.backend.geom.pmd_size
    hva = slot(vm, host, 0, SZ_1G, 2 * block, thp=True)
    vm.create_vcpu(0).write(SZ_1G + block + 0x123000, b"t")
    m = vm.lookup(SZ_1G + block)
    assert (m.gfn, m.size, m.level) == ((SZ_1G + block) >> 12, block, 2)
    assert m.pfn == host.lookup_pte(hva + block)[0] and m.pfn % (block >> 12) == 0
    assert host.host_mapping_size(hva + block) == block
    assert vm.stats["arm64_thp_adjust"] == 1
    assert host.read(hva + block + 0x123000, 1) == b"t"


def test_64k_thp_not_congruent_maps_base_pages(make_vm):
    """IPA and hva not congruent modulo the PMD: fault_supports_stage2_huge_mapping says no,
    the fault maps one 64K page of the huge page (its own frames)."""
    vm = make_vm(granule=65536)
    host = vm.host
    block = 512 << 20
    hva = host.mmap(2 * block, thp=True)
    vm.set_user_memory_region(0, SZ_1G + 65536, block, hva)
    vm.create_vcpu(0).write(SZ_1G + 65536 + 0x20000 + 8, b"n")
    m = vm.lookup(SZ_1G + 65536 + 0x20000)
    assert (m.size, m.level) == (65536, 3)
    assert m.pfn == host.lookup_pte(hva + 0x20000)[0]
    assert vm.stats["arm64_thp_adjust"] == 0


@pytest.mark.parametrize("field", ["guest_phys_addr", "memory_size", "userspace_addr"])
def test_64k_memslot_must_be_page_aligned(make_vm, field):
    vm = make_vm(granule=65536)
    hva = vm.host.mmap(4 * 65536)
    args = {"guest_phys_addr": GPA, "memory_size": 2 * 65536, "userspace_addr": hva}
    args[field] += PAGE
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, args["guest_phys_addr"], args["memory_size"],
                                  args["userspace_addr"])
    assert e.value.errno == errno.EINVAL


# ---------------------------------------------------------------- relax vs map (invariant 8)

def test_exec_permission_fault_relaxes_in_place(make_vm, host):
    vm = make_vm(cache_dic=False)
    slot(vm, host, 0, GPA, 4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 4)
    assert not vm.lookup(GPA).executable
    b = backend_of(vm)
    b.pgt.events.clear()
    vcpu.fetch(GPA)
    m = vm.lookup(GPA)
    assert m.executable and m.readable
    assert vm.stats["relax_perms"] == 1
    assert not [e for e in b.pgt.events if e.kind == "break"]
    assert [e.kind for e in b.pgt.events if e.kind != "tlbi"] == ["icache_inval_pou", "set"]


def test_permission_fault_on_block_keeps_block(make_vm, host):
    vm = make_vm(cache_dic=False)
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 4)
    vcpu.fetch(GPA + 17 * PAGE)
    m = vm.lookup(GPA)
    assert m.size == SZ_2M and m.executable and vm.stats["relax_perms"] == 1


# ---------------------------------------------------------------- access flag and aging (§6)

def test_aging_clears_af_without_tlbi_and_access_flag_fault_sets_it(vm, host):
    hva = slot(vm, host, 0, GPA, 4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    b = backend_of(vm)
    b.tlbi_log.clear()
    assert host.age(hva, 4 * PAGE) is True
    assert not vm.lookup(GPA).young
    assert list(b.tlbi_log) == [], "aging issues no TLBI"
    vcpu.read(GPA, 1)
    assert vm.lookup(GPA).young
    assert vm.stats["arm64_access_flag_fault"] == 1 and vm.stats["fast_page_fault"] == 1
    assert list(b.tlbi_log) == [], "mkyoung issues no TLBI"


def test_hardware_af_update_means_no_access_flag_faults(make_vm, host):
    vm = make_vm(hw_af=True)
    hva = slot(vm, host, 0, GPA, 4 * PAGE)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    host.age(hva, 4 * PAGE)
    vm.flush_remote_tlbs()
    vcpu.read(GPA, 1)
    assert vm.lookup(GPA).young and vm.stats["arm64_access_flag_fault"] == 0


# ---------------------------------------------------------------- unmap (invariant 15)

def test_unmap_clears_whole_block_with_one_tlbi_per_leaf(vm, host):
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 5 * PAGE, b"x")
    vcpu.write(GPA + SZ_2M + 5 * PAGE, b"y")
    b = backend_of(vm)
    b.tlbi_log.clear()
    host.madvise_dontneed(hva + 7 * PAGE, PAGE)      # one 4K page inside the first block
    assert vm.lookup(GPA) is None and vm.lookup(GPA + 100 * PAGE) is None
    assert vm.lookup(GPA + SZ_2M) is not None
    assert [(t.op, t.ipa, t.level) for t in b.tlbi_log if t.why == "unmap"] == [
        ("vmid_ipa", GPA, 2)]


def test_unmap_gfn_range_returns_false_and_frees_tables(vm, host):
    from kvmcore.records import GfnRange

    slot(vm, host, 0, GPA, 8 * PAGE)
    vcpu = vm.create_vcpu(0)
    for i in range(8):
        vcpu.write(GPA + i * PAGE, b"z")
    b = backend_of(vm)
    tables_before = len(b.pgt.store)
    b.tlbi_log.clear()
    s = vm.gfn_to_memslot(GPA >> 12)
    with vm.mmu_lock:
        assert vm.hook.unmap_gfn_range(vm=vm, range=GfnRange(s, s.base_gfn, s.end_gfn)) is False
    assert len([t for t in b.tlbi_log if t.why == "unmap"]) == 8
    assert len(b.pgt.store) == tables_before - 2, "the empty level-2 and level-3 tables go"
    # The vCPU TLB was flushed by the TLBIs: the next access faults again.
    faults = vm.stats["faults"]
    vcpu.read(GPA, 1)
    assert vm.stats["faults"] == faults + 1


# ---------------------------------------------------------------- guest_memfd (invariant 22)

def test_gmem_slot_must_be_gmem_only(vm, host):
    gmem = vm.create_guest_memfd(4 * PAGE)
    hva = host.mmap(4 * PAGE)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, GPA, 4 * PAGE, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    assert e.value.errno == errno.EINVAL


def test_gmem_faults_map_pages_only(vm, host):
    gmem = vm.create_guest_memfd(SZ_2M, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    vm.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 3 * PAGE, b"g")
    m = vm.lookup(GPA + 3 * PAGE)
    assert m.size == PAGE and m.writable and not m.private
    assert host.read(hva + 3 * PAGE, 1) == b"g"
    # gmem_abort ignores the folio size and the permission-fault granule: PAGE_SIZE always.
    from kvmcore.records import PageFault

    f = PageFault(addr=GPA, gfn=GPA >> 12, kind=PERMISSION, fault_size=SZ_2M)
    f.slot, f.max_size = vm.gfn_to_memslot(GPA >> 12), SZ_2M
    assert backend_of(vm).abort.stage2_mapping_size(vm, f) == (PAGE, False)
    assert backend_of(vm).abort.relax_or_none(vm, f) is None


def test_capabilities_claimed():
    from kvmcore_arm64_stage2 import Arm64Stage2Backend

    caps = Arm64Stage2Backend.arch_info.capabilities_of("default")
    assert {"gmem", "gmem_mmap", "relax_perms", "aging", "dirty_log", "dirty_ring",
            "manual_dirty_protect", "initially_set", "readonly_mem", "hugepage_2m",
            "hugepage_1g"} <= caps
    assert not caps & {"private_mem", "memory_attributes", "pre_fault", "pml"}
    big = Arm64Stage2Backend(granule=65536).arch_info
    assert big.page_sizes == (65536, 512 << 20)
    assert not big.capabilities & {"hugepage_2m", "hugepage_1g"}


@pytest.mark.parametrize("opts", [dict(granule=8192), dict(ipa_bits=50), dict(nosuch=1),
                                  dict(eager_split_chunk_size=3 * 4096), dict(fwb="yes")])
def test_bad_options_einval(host, opts):
    from kvmcore import VM

    with pytest.raises(KvmError) as e:
        VM(arch="arm64_stage2", host=host, **opts)
    assert e.value.errno == errno.EINVAL
    assert next(iter(opts)) in str(e.value)


def test_memory_fault_exit_type_exists():
    # gmem_abort's failed kvm_gmem_get_pfn is a KVM_EXIT_MEMORY_FAULT with private=false.
    assert MemoryFaultExit(0, GPA, PAGE).private is False


def test_gmem_exec_after_read_without_dic_refaults_forever(make_vm, host):
    """Reference §3.3 model note: gmem_abort ignores is_perm and asks the map path for an
    exec-only upgrade, which the map path leaves alone (-EAGAIN -> 0): without CTR_EL0.DIC the
    guest re-faults for ever. The model shows it as the core's livelock error."""
    vm = make_vm(cache_dic=False)
    gmem = vm.create_guest_memfd(4 * PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    vm.set_user_memory_region(0, GPA, 4 * PAGE, gmem.mmap(), KVM_MEM_GUEST_MEMFD,
                              guest_memfd=gmem)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 4)
    with pytest.raises(KvmError) as e:
        vcpu.fetch(GPA)
    assert e.value.errno == errno.EAGAIN and "livelock" in str(e.value)
    assert vm.stats["relax_perms"] == 0 and not vm.lookup(GPA).executable


def test_munmap_records_one_tlbi_per_leaf_but_merges_vcpu_tlb_work(vm, host):
    hva = slot(vm, host, 0, GPA, 64 * PAGE)
    vcpu = vm.create_vcpu(0)
    for i in range(64):
        vcpu.write(GPA + i * PAGE, b"m")
    b = backend_of(vm)
    b.tlbi_log.clear()
    before = vm.stats["tlb_flush_range"]
    host.munmap(hva, 64 * PAGE)
    assert [t.ipa for t in b.tlbi_log if t.why == "unmap"] == [GPA + i * PAGE for i in range(64)]
    assert vm.stats["tlb_flush_range"] - before == 1
    assert vcpu.tlb == {}


@pytest.mark.parametrize("kind,lsb", [("anon", 12), ("hugetlb_2m", 21)])
def test_hwpoison_signal_carries_vma_shift(vm, host, kind, lsb):
    from kvmcore import HwPoisonSignal

    hva = slot(vm, host, 0, GPA, SZ_2M, kind=kind)
    host.write(hva, b"p")
    host.poison(hva)
    with pytest.raises(HwPoisonSignal) as e:
        vm.create_vcpu(0).read(GPA, 1)
    assert (e.value.hva, e.value.lsb) == (hva, lsb)


def test_64k_poison_signals_the_host_page(make_vm):
    """memory_failure poisons a whole 64K host page; user_mem_abort's SIGBUS gives the page's
    hva (gfn_to_hva of ipa >> PAGE_SHIFT) and vma_shift 16."""
    from kvmcore import HwPoisonSignal

    vm = make_vm(granule=65536)
    host = vm.host
    hva = slot(vm, host, 0, GPA, 2 * 65536)
    host.write(hva, bytes(2 * 65536))
    host.poison(hva + 9 * PAGE)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(HwPoisonSignal) as e:
        vcpu.read(GPA + 2 * PAGE, 1)
    assert (e.value.hva, e.value.lsb) == (hva, 16)
    assert vcpu.read(GPA + 65536 + 2 * PAGE, 1) == b"\0", "the next page is unaffected"
    host.munmap(hva, 2 * 65536)


def test_pfnmap_block_outlives_the_vma_split_until_the_notifier(vm, host):
    """munmap of two pages inside a block-mapped VM_PFNMAP range: the VMA is cut and the
    middle detached before the notifiers run. Until then the stage-2 block still maps the
    linear device range, as in Linux (the detached pages are mapped until their PTEs go);
    the notifier then zaps the whole block."""
    hva = host.mmap(2 * SZ_2M, kind="pfnmap", pfn=0x20_0000)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).read(GPA + 3 * PAGE, 4)
    assert vm.lookup(GPA).size == SZ_2M
    unmap = host.steps.munmap(hva + 3 * PAGE, 2 * PAGE)
    assert next(unmap) == "mn_start_lock_wait"
    assert len(host.vmas_in(hva, hva + 2 * SZ_2M)) == 2
    vm.check_invariants()
    assert len(host.detached) == 1
    unmap.run()
    assert vm.lookup(GPA) is None and not host.detached
    vm.check_invariants()


def test_logging_slot_is_published_before_its_blocks_are_protected(vm, host):
    """Turning logging on publishes the new slot (swap, then synchronize_srcu) before
    kvm_arch_commit_memory_region write-protects it: paused in between, the writable block
    is not reported; after the commit it is read-only."""
    from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    assert vm.lookup(GPA).size == SZ_2M and vm.lookup(GPA).writable
    update = vm.steps.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    while update.point != "slot_srcu_sync":
        next(update)
    vm.check_invariants()
    update.run()
    assert not vm.lookup(GPA).writable


PFNMAP_FAULTS_VS_MPROTECT = """
name = "pfnmap_faults_vs_mprotect"
[[slot]]
pages = 1024
kind = "pfnmap"
[[flow]]
op = "read"
page = 2
[[flow]]
op = "mprotect"
page = 2
prot = ""
[[flow]]
op = "write"
page = 2
"""


def test_vma_pagesize_is_read_before_the_pfn_not_at_the_install():
    """Found by kvmcore swarm (seed 21): user_mem_abort reads vma_pagesize under the mmap
    lock before it snapshots mmu_invalidate_seq. An mprotect that splits the VMA afterwards,
    but has not begun its invalidation yet, does not shrink the size the fault installs:
    the write's fault meets the read's 2M block with the same size (only permissions
    differ), so it does not break it (the model read the size from the VMA at the install,
    after the split, and replaced the block by a table)."""
    from kvmcore.explore import explore, parse, replay

    scn = parse(PFNMAP_FAULTS_VS_MPROTECT)
    run = replay(scn, "arm64_stage2", "A6.C2.B1.A1.C1")   # the write ends at once
    assert run.failure is None, run.failure
    assert [e.get("point", "end") for e in run.trace if e["flow"] == "C"] == \
        ["pf_seq_snapshot", "pf_lock_wait", "end"]
    assert not explore(scn, "arm64_stage2", max_schedules=500).failures
