"""kvm_age_gfn / kvm_test_age_gfn (arch/riscv/kvm/mmu.c): the one leaf at the range's start,
whatever the range, WARN when it is not one PAGE_SIZE, PMD_SIZE or PUD_SIZE. The host asks
one mapping at a time (folio_referenced_one), so a THP over dirty logging's 4 KiB leaves
has only its first leaf aged."""

from __future__ import annotations

from kvmcore.records import GfnRange
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmcore.uapi import SZ_2M

from conftest import GPA, entry

A = 64


def _thp_under_small_leaves(vm, host, pages):
    """A THP-backed slot logging dirty pages: the host maps a PMD, the G-stage 4 KiB leaves
    (young: A is preset) at ``pages``."""
    hva = host.mmap(SZ_2M, thp=True)
    vm.set_user_memory_region(0, GPA, SZ_2M, hva, LOG)
    cpu = vm.create_vcpu(0)
    for page in pages:
        cpu.write(GPA + page * 4096, b"x")
    assert host.host_mapping_size(hva) == SZ_2M
    assert all(entry(vm, GPA + page * 4096)[0] == 0 for page in pages)
    return hva


def test_aging_a_huge_host_page_ages_only_the_leaf_at_its_start(vm, host):
    hva = _thp_under_small_leaves(vm, host, (0, 5))
    assert host.test_young(hva, SZ_2M) is True
    assert host.age(hva, SZ_2M) is True                      # one PMD: one kvm_age_gfn
    assert not entry(vm, GPA)[1] & A
    assert entry(vm, GPA + 0x5000)[1] & A                    # never looked at
    assert host.age(hva, SZ_2M) is False
    assert host.test_young(hva, SZ_2M) is False
    assert vm.stats["riscv_age_range_warn"] == 0 and vm.backend.warnings == []


def test_no_leaf_at_the_start_is_not_young(vm, host):
    hva = _thp_under_small_leaves(vm, host, (5,))
    assert host.test_young(hva, SZ_2M) is False
    assert host.age(hva, SZ_2M) is False
    assert entry(vm, GPA + 0x5000)[1] & A


def test_a_range_of_another_length_warns_and_looks_at_its_start(vm, host):
    """Called with three pages (no Linux caller does): WARN_ON, then the leaf at the start
    alone, as for any range."""
    _thp_under_small_leaves(vm, host, (0, 1, 2))
    slot = vm.gfn_to_memslot(GPA >> 12)
    three = GfnRange(slot, GPA >> 12, (GPA >> 12) + 3)
    assert vm.hook.test_age_gfn(vm=vm, range=three) is True
    assert vm.hook.age_gfn(vm=vm, range=three) is True
    assert [bool(entry(vm, GPA + i * 4096)[1] & A) for i in range(3)] == [False, True, True]
    assert vm.stats["riscv_age_range_warn"] == 2
    assert len(vm.backend.warnings) == 2 and "kvm_age_gfn" in vm.backend.warnings[1]
