"""The backend's check_invariants hook: each VM-level arm64 invariant is reported when the state
breaks it (so the checker would catch a backend that broke it), and LOCKED entries behave as
invalid to the hardware walk."""

from __future__ import annotations

import pytest
from kvmcore import InvariantError, MemoryFaultExit
from kvmcore.records import Access, NOT_PRESENT
from kvmcore.uapi import (GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
                          KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES)

from conftest import GPA, SZ_2M, backend_of, check
from kvmcore_arm64_stage2.invariants import check_vm
from kvmcore_arm64_stage2.pgtable import KVM_INVALID_PTE_LOCKED, PAGE_S2_MEMATTR

PAGE = 4096


def _problems(vm):
    return check_vm(backend_of(vm), vm)


def test_clean_state_has_no_problems(vm, host):
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    assert _problems(vm) == []


def test_writable_block_in_logging_slot_is_reported(vm, host):
    vm.enable_dirty_log_manual_protect(initially_set=True)
    hva = host.mmap(2 * SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)
    vm.create_vcpu(0).write(GPA, b"x")
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva, KVM_MEM_LOG_DIRTY_PAGES)
    assert _problems(vm) == [], "legal while initially-set defers the protection"
    vm.manual_dirty_log_protect = 0          # as if commit had skipped kvm_mmu_wp_memory_region
    assert any("writable block in a dirty-logging slot" in p for p in _problems(vm))
    vm.set_user_memory_region(0, GPA, 2 * SZ_2M, hva)


def test_device_memattr_over_ram_is_reported(vm, host):
    hva = host.mmap(4 * PAGE)
    vm.set_user_memory_region(0, GPA, 4 * PAGE, hva)
    vm.create_vcpu(0).read(GPA, 1)
    pgt = backend_of(vm).pgt
    _, table, idx, pte = pgt.pt.lookup(GPA)
    table[idx] = (pte & ~(0xF << 2)) | PAGE_S2_MEMATTR("device", True) | (1 << 54)
    assert any("Device memory type over ordinary RAM" in p for p in _problems(vm))
    table[idx] = pte


@pytest.mark.parametrize("granule", [4096, 65536])
def test_leaf_on_another_host_page_is_reported(make_vm, granule):
    """A leaf whose output address is not the host page of its IPA (a missed invalidation)
    is caught by the core's leaf check, at every granule."""
    vm = make_vm(granule=granule)
    host = vm.host
    hva = host.mmap(2 * granule)
    vm.set_user_memory_region(0, GPA, 2 * granule, hva)
    vm.create_vcpu(0).write(GPA + 8, b"x")
    pgt = backend_of(vm).pgt
    _, table, idx, pte = pgt.pt.lookup(GPA)
    other = host.alloc_frames(granule >> 12) << 12
    table[idx] = (pte & ~pgt.fmt.addr_mask) | pgt.fmt.phys_to_pte(other)
    with pytest.raises(InvariantError, match="a missed invalidation"):
        check(vm)
    table[idx] = pte


def test_locked_entry_is_a_translation_fault_and_an_invariant_violation(vm, host):
    hva = host.mmap(4 * PAGE)
    vm.set_user_memory_region(0, GPA, 4 * PAGE, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.read(GPA, 1)
    pgt = backend_of(vm).pgt
    _, table, idx, pte = pgt.pt.lookup(GPA)
    table[idx] = KVM_INVALID_PTE_LOCKED
    v = vm.translate(vm=vm, vcpu=vcpu, gpa=GPA, access=Access("read"))
    assert v.kind == NOT_PRESENT and v.level == 3
    with pytest.raises(InvariantError):
        vm.check_invariants()
    table[idx] = pte


@pytest.mark.parametrize("granule", [16384, 65536])
def test_large_granule_leaves_map_the_right_host_frames(make_vm, granule):
    """Each 4 KiB of a 16K/64K page is the host's page at that hva: data written by the host
    is read by the guest and vice versa, in every 4 KiB."""
    vm = make_vm(granule=granule)
    host = vm.host
    n = granule // PAGE
    hva = host.mmap(2 * granule)
    vm.set_user_memory_region(0, GPA, 2 * granule, hva)
    vcpu = vm.create_vcpu(0)
    for i in range(n):
        host.write(hva + i * PAGE + 8, bytes([i + 1]) * 4)
    for i in range(n):
        assert vcpu.read(GPA + i * PAGE + 8, 4) == bytes([i + 1]) * 4
    assert len(list(vm.mappings())) == 1 and vm.lookup(GPA).size == granule
    vcpu.write(GPA + granule + 3 * PAGE, b"guest")
    assert host.read(hva + granule + 3 * PAGE, 5) == b"guest"
    check(vm)


def test_64k_host_invalidation_unmaps_the_whole_base_page(make_vm):
    """The host zaps 64K pages: a DONTNEED of one page drops that stage-2 page, and the
    guest then sees the fresh (zero) host page, not the old frames; the other page stays."""
    vm = make_vm(granule=65536)
    host = vm.host
    hva = host.mmap(2 * 65536)
    vm.set_user_memory_region(0, GPA, 2 * 65536, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 3 * PAGE, b"a")
    vcpu.write(GPA + 65536 + 3 * PAGE, b"b")
    host.madvise_dontneed(hva, 65536)
    assert vm.lookup(GPA) is None and vm.lookup(GPA + 65536) is not None
    assert vcpu.read(GPA + 3 * PAGE, 1) == b"\0"
    assert vcpu.read(GPA + 65536 + 3 * PAGE, 1) == b"b"


def test_64k_migration_moves_the_leaf_to_the_new_page(make_vm):
    vm = make_vm(granule=65536)
    host = vm.host
    hva = host.mmap(2 * 65536)
    vm.set_user_memory_region(0, GPA, 2 * 65536, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(GPA + 5 * PAGE, b"m")
    old = vm.lookup(GPA).pfn
    new = host.migrate(hva + 5 * PAGE) - 5
    assert new != old and new % 16 == 0 and vm.lookup(GPA) is None
    assert vcpu.read(GPA + 5 * PAGE, 1) == b"m"
    assert vm.lookup(GPA).pfn == new


def test_gmem_get_pfn_failure_is_a_shared_memory_fault_exit(vm, host):
    gmem = vm.create_guest_memfd(4 * PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    vm.set_user_memory_region(0, GPA, 4 * PAGE, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    gmem.close()
    with pytest.raises(MemoryFaultExit) as e:
        vm.create_vcpu(0).read(GPA, 1)
    assert e.value.private is False and e.value.gpa == GPA
