"""End to end through the public API: the 2018 PFNMAP case, dirty logging by C bits, huge
leaves, aging, R/C handling, what ppc refuses."""

import errno

import pytest
from kvmcore import InvariantError, KvmError
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

from kvmcore_ppc_radix import pte as P

SZ_2M, SZ_1G = 1 << 21, 1 << 30


def assert_invariants(vm):
    problems = [p for ps in vm.hook.check_invariants(vm=vm) for p in ps]
    assert problems == []
    vm.check_invariants()


GPA = 1 << 32


def cpu(m):
    return P.be64_to_cpu(m.raw)


def test_2018_pfnmap_maps_device_pfn_cache_inhibited(make_vm, host, page_size):
    """A VM_IO|VM_PFNMAP range populated on first touch: the generic hva -> pfn takes the
    populate-and-retry path, and the partition PTE copies the host PTE's ATT (0x20)."""
    vm = make_vm(page_size=page_size)
    dev_pfn = 0x8000000            # 64K- and 2M-aligned device frame
    hva = host.mmap(SZ_2M, kind="pfnmap", pfn=dev_pfn)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA + 0x3000, 8)
    m = vm.lookup(GPA + 0x3000)
    assert m is not None and m.size == page_size
    assert m.pfn == dev_pfn + ((0x3000 & ~(page_size - 1)) >> 12)
    e = cpu(m)
    assert P.pte_att(e) == P._PAGE_NON_IDEMPOTENT and P.pte_ci(e)
    assert e & P._PAGE_SPECIAL and e & P._PAGE_EXEC and e & P._PAGE_ACCESSED
    assert vm.stats["hva_to_pfn_remapped_retry"] >= 1
    assert vm.stats["hva_to_pfn_fixup"] >= 1
    assert_invariants(vm)


def test_ram_is_cacheable(make_vm, host, page_size):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    assert P.pte_att(cpu(vm.lookup(GPA))) == 0


def _logging_guest(make_vm, host, page_size, size=SZ_2M):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(size)
    vm.set_user_memory_region(0, GPA, size, hva, KVM_MEM_LOG_DIRTY_PAGES)
    return vm, hva, vm.create_vcpu(0)


def _page_gfns(page_size, off):
    start = off & ~(page_size - 1)
    return list(range(start >> 12, (start + page_size) >> 12))


def test_page_written_while_logging_shows_exactly_once(make_vm, host, page_size):
    vm, _hva, vcpu = _logging_guest(make_vm, host, page_size)
    vm.get_dirty_log(0)
    vcpu.write(GPA + 0x5000, b"a")
    log = vm.get_dirty_log(0)
    assert log == _page_gfns(page_size, 0x5000)
    assert vm.get_dirty_log(0) == []           # C was harvested and cleared, W kept
    assert vm.lookup(GPA + 0x5000).writable
    assert not vm.lookup(GPA + 0x5000).dirty
    vcpu.write(GPA + 0x5000, b"b")              # hardware sets C again, no fault
    assert vm.get_dirty_log(0) == _page_gfns(page_size, 0x5000)


def test_harvest_tlbie_per_page_and_no_write_protect(make_vm, host, page_size):
    vm, _hva, vcpu = _logging_guest(make_vm, host, page_size)
    vcpu.write(GPA, b"a")
    vcpu.write(GPA + page_size, b"b")
    be = vm.backend
    be.tlbie_log.clear()
    vm.get_dirty_log(0)
    assert [(a, s) for a, s, _ in be.tlbie_log] == [(GPA, page_size), (GPA + page_size, page_size)]
    assert all(m.writable for m in vm.mappings())


def test_unmapped_while_dirty_still_shows(make_vm, host, page_size):
    vm, hva, vcpu = _logging_guest(make_vm, host, page_size)
    vm.get_dirty_log(0)
    vcpu.write(GPA + 0x2000, b"a")
    assert vm.lookup(GPA + 0x2000).dirty
    host.madvise_dontneed(hva, SZ_2M)          # the notifier unmaps the leaf while C=1
    assert vm.lookup(GPA + 0x2000) is None
    assert vm.get_dirty_log(0) == _page_gfns(page_size, 0x2000)
    assert vm.get_dirty_log(0) == []


def test_read_fault_on_writable_memory_is_reported_dirty(make_vm, host, page_size):
    """Invariant 5: the upgraded read fault creates W=1 C=1 even while logging."""
    vm, hva, vcpu = _logging_guest(make_vm, host, page_size)
    host.write(hva + 0x1000, b"populated")     # host page present and writable
    vm.get_dirty_log(0)
    vcpu.read(GPA + 0x1000, 4)
    m = vm.lookup(GPA + 0x1000)
    assert m.writable and m.dirty
    assert vm.get_dirty_log(0) == _page_gfns(page_size, 0x1000)


def test_huge_leaves_and_logging_toggle(make_vm, host, page_size):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(4 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 4 * SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 0x1000, b"a")
    m = vm.lookup(GPA)
    assert m.size == SZ_2M and m.level == 1
    assert vm.stats["num_2M_pages"] == 1
    seq = vm.mmu_invalidate.seq
    vm.set_user_memory_region(0, GPA, 4 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.lookup(GPA) is None              # flushed when logging was turned on
    assert vm.mmu_invalidate.seq == seq + 1
    assert vm.backend.tlbie_log[-1][:2] == (GPA, SZ_2M)
    vcpu.write(GPA + 0x1000, b"b")
    assert vm.lookup(GPA + 0x1000).size == page_size    # base pages only while logging
    vm.set_user_memory_region(0, GPA, 4 * SZ_2M, hva, 0)
    assert list(vm.mappings()) == []
    vcpu.write(GPA + 0x1000, b"c")
    assert vm.lookup(GPA).size == SZ_2M        # huge leaves come back
    assert_invariants(vm)


def test_1g_host_page(make_vm, host, page_size):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_1G, kind="hugetlb_1g")
    vm.set_user_memory_region(0, SZ_1G, SZ_1G, hva)
    vm.create_vcpu(0).write(SZ_1G + 0x123000, b"x")
    m = vm.lookup(SZ_1G)
    assert m.size == SZ_1G and m.level == 2


def test_1g_host_page_congruent_only_mod_2m_maps_base_pages(make_vm, host, page_size):
    """[quirk] no fall back to 2M."""
    vm = make_vm(page_size=page_size)
    hva = host.mmap(2 * SZ_1G, kind="hugetlb_1g")
    vm.set_user_memory_region(0, SZ_1G, SZ_1G, hva + SZ_2M)
    vm.create_vcpu(0).write(SZ_1G + 0x5000, b"x")
    m = vm.lookup(SZ_1G + 0x5000)
    assert m.size == page_size
    assert host.read(hva + SZ_2M + 0x5000, 1) == b"x"


def test_aging_clears_r_without_flush(make_vm, host, page_size):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    assert vm.lookup(GPA).young
    n = len(vm.backend.tlbie_log)
    assert host.age(hva, SZ_2M, flush=False)
    assert not vm.lookup(GPA).young
    assert vm.lookup(GPA).writable and vm.lookup(GPA).dirty
    assert len(vm.backend.tlbie_log) == n


def test_set_rc_fault_path(make_vm, host, page_size):
    """With the MMU reporting SET_RC, the fast path ORs C in: no instantiate, no tlbie."""
    vm = make_vm(page_size=page_size, set_rc_faults=True)
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    vm.get_dirty_log(0)                        # C cleared, tlbie
    n = len(vm.backend.tlbie_log)
    sets = vm.stats["ppc_set_pte"]
    vcpu.write(GPA, b"b")
    assert vm.stats["ppc_set_rc_fixed"] == 1
    assert vm.stats["ppc_set_pte"] == sets and len(vm.backend.tlbie_log) == n
    assert vm.lookup(GPA).dirty
    assert vm.get_dirty_log(0) == _page_gfns(page_size, 0)


def test_write_to_read_only_leaf_merges_w(make_vm, host, page_size):
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    host.mprotect(hva, SZ_2M, "r")         # a read fault cannot be upgraded
    vcpu.read(GPA, 4)
    m = vm.lookup(GPA)
    assert not m.writable and not m.dirty
    host.mprotect(hva, SZ_2M, "rw")
    vcpu.write(GPA, b"z")
    m = vm.lookup(GPA)
    assert m.writable and m.dirty
    assert host.read(hva, 1) == b"z"


def test_readonly_memslot_refused(make_vm, host):
    vm = make_vm()
    hva = host.mmap(SZ_2M)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_READONLY)
    assert e.value.errno == errno.EINVAL


def test_memory_attributes_not_offered(make_vm):
    vm = make_vm()
    with pytest.raises(KvmError) as e:
        vm.set_memory_attributes(GPA, 4096, 8)
    assert e.value.errno == errno.ENOTTY


def test_no_slot_is_mmio_and_creates_nothing(make_vm):
    from kvmcore import MmioExit

    vm = make_vm()
    with pytest.raises(MmioExit):
        vm.create_vcpu(0).read(GPA, 4)
    assert list(vm.mappings()) == []


def test_bad_options_are_einval(make_vm):
    for opts in ({"page_size": 8192}, {"bogus": 1}):
        with pytest.raises(KvmError) as e:
            make_vm(**opts)
        assert e.value.errno == errno.EINVAL


def test_capabilities(make_vm, page_size):
    vm = make_vm(page_size=page_size)
    assert vm.capabilities == {"dirty_log", "hugepage_2m", "hugepage_1g", "aging"}
    assert min(vm.arch_info.page_sizes) == page_size


def _two_slots(make_vm, host, page_size):
    """A VM with slot 0 at GPA and slot 1 at GPA + 1 GiB (2 MiB each): (vm, vcpu, hva, other)."""
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M)
    other = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.set_user_memory_region(1, GPA + SZ_1G, SZ_2M, other)
    return vm, vm.create_vcpu(0), hva, other


def test_unrelated_invalidation_in_progress_makes_create_pte_eagain(make_vm, host, page_size):
    """Invariant 9: kvmppc_create_pte checks mmu_invalidate_retry (any invalidation in
    progress, not only one covering this gfn): nothing is installed, the guest re-faults.
    The core runs that check as the fault's staleness check (ArchInfo.fault_retry_gfn is
    False on ppc), before map_leaf reaches kvmppc_create_pte's own."""
    vm, vcpu, hva, other = _two_slots(make_vm, host, page_size)
    vcpu.read(GPA + SZ_1G, 1)
    vcpu.write(GPA, b"s")                      # host pages in place
    host.mprotect(hva, SZ_2M, "r")             # zaps the leaf, keeps the host pages
    host.mprotect(hva, SZ_2M, "rw")
    assert vm.lookup(GPA) is None
    steps = vcpu.step_access("write", GPA, b"x")
    assert next(steps) == "pf_seq_snapshot"
    assert next(steps) == "ppc_host_pte_lock_wait"
    assert next(steps) == "pf_lock_wait"
    with host.invalidating(other, 4096):
        next(steps)
        assert vm.stats["fault_retry_stale"] == 1
        assert vm.lookup(GPA) is None
    try:
        while True:
            next(steps)
    except StopIteration:
        pass
    assert vm.lookup(GPA).writable and host.read(hva, 1) == b"x"
    assert_invariants(vm)


def test_invalidation_in_progress_at_find_kvm_host_pte_resumes_guest(make_vm, host, page_size):
    """Reference 2.2 steps 4-5: find_kvm_host_pte returns NULL while any invalidation is in
    progress (mmu_invalidate_retry); the guest is resumed with nothing installed and
    re-faults."""
    vm, vcpu, hva, other = _two_slots(make_vm, host, page_size)
    steps = vcpu.step_access("write", GPA, b"x")
    assert next(steps) == "pf_seq_snapshot"
    assert next(steps) == "ppc_host_pte_lock_wait"
    with host.invalidating(other, page_size):  # not this gfn: the core's checks let it pass
        assert next(steps) == "pf_retry_wait"  # retries until no invalidation is in progress
        assert vm.stats["ppc_host_pte_retry"] == 1
        assert vm.lookup(GPA) is None
    for _point in steps:
        pass
    assert vm.lookup(GPA).writable and host.read(hva, 1) == b"x"


def test_delete_and_move_flush_the_slot(make_vm, host, page_size):
    """Invariant 18: DELETE and MOVE go through kvmppc_radix_flush_memslot (tlbie per leaf,
    C into the log, mmu_invalidate_seq bumped); tables stay (invariant 15)."""
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA, b"a")
    vcpu.write(GPA + 4 * page_size, b"b")
    tables = len(vm.backend.table.store)
    seq = vm.mmu_invalidate.seq
    vm.backend.tlbie_log.clear()
    vm.set_user_memory_region(0, 2 * GPA, SZ_2M, hva)        # MOVE
    assert list(vm.mappings()) == []
    assert [a for a, _s, _l in vm.backend.tlbie_log] == [GPA, GPA + 4 * page_size]
    assert vm.mmu_invalidate.seq > seq
    assert len(vm.backend.table.store) == tables
    assert vcpu.read(2 * GPA, 1) == b"a"
    vm.set_user_memory_region(0, 2 * GPA, 0, hva)             # DELETE
    assert list(vm.mappings()) == []
    assert_invariants(vm)


def test_flush_shadow_all_is_a_no_op(make_vm, host):
    """kvm_arch_flush_shadow_all is empty on ppc: the mm's release leaves the tree alone."""
    vm = make_vm()
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"a")
    assert vm.hook.flush_shadow_all(vm=vm) is False
    assert vm.lookup(GPA) is not None


def test_unmap_of_one_gfn_removes_whole_huge_leaf(make_vm, host, page_size):
    """Invariant 14: one base page of a 2M leaf removes the leaf; the tlbie is at 2M. (A
    THP: MADV_DONTNEED of part of a hugetlb page is EINVAL.)"""
    vm = make_vm()
    hva = host.mmap(SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA + 0x7000, b"a")
    assert vm.lookup(GPA).size == SZ_2M
    vm.backend.tlbie_log.clear()
    host.madvise_dontneed(hva + 5 * page_size, page_size)
    assert list(vm.mappings()) == []
    assert vm.backend.tlbie_log == [(GPA, SZ_2M, vm.backend.lpid)]
    assert vm.stats["num_2M_pages"] == 0


def test_partition_table_entry(make_vm):
    vm = make_vm()
    dw0, _dw1 = vm.backend.partition_table_entry
    assert dw0 >> 63 == 1 and dw0 & 0x1F == 13                # HR, RPDS = 13
    assert (dw0 >> 61) & 3 == 2 and (dw0 >> 5) & 7 == 5       # RTS = 21: a 52-bit tree
    assert dw0 & 0x0FFFFFFFFFFFF000 == vm.backend.table.pt.root


# ------------------------------------------------------------------ the host's PAGE_SIZE


def test_vm_without_host_gets_a_radix_host_of_its_page_size(page_size):
    """base_page_option="page_size": VM builds a host of that PAGE_SIZE; with 64K pages the
    host PMD (THP) is 2 MiB, as radix-64k.h has it, not PAGE_SIZE^2 / 8."""
    from kvmcore import VM

    vm = VM(arch="ppc_radix", page_size=page_size)
    assert vm.page_size == vm.host.page_size == vm.backend.fmt.page_size == page_size
    assert vm.host.pmd_size == SZ_2M


def test_vm_follows_its_hosts_page_size():
    from kvmcore import VM, HostMemory

    vm = VM(arch="ppc_radix", host=HostMemory(page_size=65536, pmd_size=SZ_2M))
    assert vm.page_size == vm.backend.fmt.page_size == 65536
    assert vm.backend.fmt.pte_index_size == 5 and min(vm.arch_info.page_sizes) == 65536
    assert VM(arch="ppc_radix", host=HostMemory()).backend.fmt.page_size == 4096


@pytest.mark.parametrize("host_page,opts", [
    (4096, {"page_size": 65536}),      # a 64K VM on a 4K host
    (65536, {"page_size": 4096}),
    (16384, {}),                       # ppc kernels have no 16K PAGE_SIZE
])
def test_base_page_other_than_the_hosts_is_einval(host_page, opts):
    from kvmcore import VM, HostMemory

    with pytest.raises(KvmError) as e:
        VM(arch="ppc_radix", host=HostMemory(page_size=host_page), **opts)
    assert e.value.errno == errno.EINVAL


def test_base_page_leaf_maps_the_host_page_from_its_first_frame(make_vm, host, page_size):
    """A base-page PTE maps exactly one host page: its RPN is that page's first frame, and
    every 4 KiB of it reads the host's bytes."""
    vm = make_vm()
    hva = host.mmap(SZ_2M)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 0x3000, b"x")
    frame, writable, size = host.lookup_pte(hva + 0x3000)
    assert size == page_size and writable
    m = vm.lookup(GPA + 0x3000)
    assert m.size == page_size and m.gfn == (GPA + (0x3000 & ~(page_size - 1))) >> 12
    assert m.pfn == host.page_of(frame) == frame - ((0x3000 & (page_size - 1)) >> 12)
    assert P.pte_pa(cpu(m), vm.backend.fmt.page_shift) == m.pfn << 12
    host.write(hva + page_size - 8, b"lastword")
    assert vcpu.read(GPA + page_size - 8, 8) == b"lastword"
    assert_invariants(vm)


def test_thp_is_2m_and_base_pages_inside_it_pick_their_sub_frame(make_vm, host, page_size):
    """THP is a 2 MiB PMD at 4K and 64K alike: a 2M leaf whose RPN is the THP's first frame;
    while logging, base pages of the same THP (hva & (2M - PAGE_SIZE) ORed into the RPN)."""
    vm = make_vm()
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 0x1000, b"a")
    frame, _w, size = host.lookup_pte(hva)
    assert size == SZ_2M
    m = vm.lookup(GPA)
    assert m.size == SZ_2M and m.pfn == frame
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu.write(GPA + 5 * page_size, b"b")
    m = vm.lookup(GPA + 5 * page_size)
    assert m.size == page_size and m.pfn == frame + 5 * (page_size >> 12)
    assert host.lookup_pte(hva)[2] == SZ_2M           # the host THP stays whole
    assert vm.get_dirty_log(0) == _page_gfns(page_size, 5 * page_size)
    assert_invariants(vm)


def test_memslot_alignment_is_the_hosts_page(make_vm, host, page_size):
    """kvm_set_memory_region: guest_phys_addr, memory_size, userspace_addr aligned to
    PAGE_SIZE, EINVAL otherwise (64K on a 64K host)."""
    vm = make_vm()
    hva = host.mmap(SZ_2M)
    bad = [(GPA + 0x1000, SZ_2M - page_size, hva + page_size),
           (GPA, SZ_2M - 0x1000, hva),
           (GPA, page_size, hva + 0x1000)] if page_size > 4096 else [(GPA + 1, 4096, hva)]
    for gpa, size, uaddr in bad:
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(0, gpa, size, uaddr)
        assert e.value.errno == errno.EINVAL
    vm.set_user_memory_region(0, GPA + page_size, page_size, hva + page_size)
    vm.create_vcpu(0).write(GPA + page_size, b"ok")
    assert vm.lookup(GPA + page_size).size == page_size


def test_huge_leaf_raced_in_after_the_look_makes_create_pte_eagain(make_vm, host, page_size):
    """kvmppc_create_pte looks at the tree before it takes kvm->mmu_lock to choose what to
    pre-allocate. A base-page fault in slot 0 that saw a PMD table there (nothing to
    pre-allocate) waits for the lock while a vCPU faults in slot 1, backed by a THP whose
    2 MiB block is congruent with the gpa: ppc maps it with a 2 MiB leaf that covers slot 0's
    half too (the leaf may extend past its memslot), replacing the table. Under the lock the
    first fault finds that leaf with no table pre-allocated: -EAGAIN, nothing installed, and
    the guest's access, run again, goes through the huge leaf (to the THP's first half: the
    leaf past the slot is ppc's quirk)."""
    half = SZ_2M // 2
    vm = make_vm(page_size=page_size)
    small = host.mmap(half)
    thp = host.mmap(SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, half, small)
    vm.set_user_memory_region(1, GPA + half, half, thp + half)
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    v0.write(GPA, b"a")
    assert vm.lookup(GPA).size == page_size
    steps = v0.step_access("read", GPA + 3 * page_size, 1)
    for point in steps:
        if point == "pf_lock_wait":
            break
    v1.write(GPA + half + 5 * page_size, b"b")
    assert vm.lookup(GPA).size == SZ_2M               # over slot 0's gpas as well
    for _point in steps:
        pass
    assert vm.stats["ppc_create_pte_raced_leaf"] == 1
    assert vm.lookup(GPA + 3 * page_size).size == SZ_2M
    assert v0.read(GPA, 1) == b"\0"
    with pytest.raises(InvariantError, match="crosses the end of slot"):
        vm.check_invariants()                         # the quirk, as the checks see it


def test_logging_slot_is_published_before_its_huge_leaves_are_flushed(make_vm, host,
                                                                     page_size):
    """Turning logging on publishes the new slot (swap, then synchronize_srcu) before
    kvmppc_core_commit_memory_region_hv flushes it (kvmppc_radix_flush_memslot): paused in
    between, the 2M leaf is not yet due to go; after the commit it is gone."""
    vm = make_vm(page_size=page_size)
    hva = host.mmap(SZ_2M, kind="hugetlb_2m")
    vm.set_user_memory_region(0, GPA, SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    assert vm.lookup(GPA).size == SZ_2M
    update = vm.steps.set_user_memory_region(0, GPA, SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    while update.point != "slot_srcu_sync":
        next(update)
    assert_invariants(vm)
    update.run()
    assert vm.lookup(GPA) is None
    assert_invariants(vm)


def test_a_small_fault_under_a_huge_leaf_may_take_the_rest_of_it_away():
    """A write maps a 2 MiB leaf from the slot it looked up before dirty logging started; a
    read in the logging slot, begun before, then maps 4K under it: kvmppc_create_pte removes
    the huge leaf (kvmppc_unmap_pte) and the rest of it refaults, which the downgrade oracle
    counts as a fault's unmap (``fault_block_unmapped``), not a downgrade (found by kvmcore
    swarm, seed 2)."""
    from kvmcore.explore import parse, replay

    scn = parse("""
[[slot]]
pages = 512
kind = "hugetlb_2m"
[[flow]]
op = "write"
page = 0
[[flow]]
op = "log_dirty"
[[flow]]
op = "read"
page = 310
vcpu = 1
""")
    run = replay(scn, "ppc_radix", "A3.B2.C1.A1.C3")
    assert run.failure is None
    assert run.world.vm.stats["fault_block_unmapped"] == 1
