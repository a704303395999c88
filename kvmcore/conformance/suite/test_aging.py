"""Aging: the clear_young notifier clears the accessed state of leaves without zapping them or
flushing; an access makes them young again (reference/core.md §2.4; arch aging hooks)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import pattern
from kvmcore.locks import Flow

pytestmark = pytest.mark.requires("aging")

GPA = 0xC00_0000
SLOT_PAGES = 16  # the usual slot, in base pages


def test_age_accessed_page_is_young(guest, host):
    """After a guest access, aging its hva reports young; the leaf stays mapped, now old."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(1))
    before = guest.vm.lookup(GPA + page)
    assert before.young
    assert host.age(hva + page, page) is True
    after = guest.vm.lookup(GPA + page)
    assert after is not None and not after.young
    assert (after.gfn, after.size, after.pfn, after.writable) == (
        before.gfn, before.size, before.pfn, before.writable)


def test_age_twice_without_access_is_old(guest, host):
    """A second aging with no access in between reports not young."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(2))
    assert host.age(hva, page) is True
    assert host.age(hva, page) is False


def test_access_makes_young_again(guest, host):
    """An access that walks the table after aging sets the accessed state again (hardware A /
    AF fault / R). Where clear_flush_young does not flush the TLBs (x86:
    CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG), the vCPU that used the page keeps its translation
    and its accesses leave the leaf old; another vCPU walks."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(3))
    flushes = guest.vm.stats["tlb_flush"]
    host.age(hva, page)
    assert guest.read(GPA) == pattern(3)
    vcpu = guest.vcpu
    if guest.vm.arch_info.elide_tlb_flush_if_young:
        assert guest.vm.stats["tlb_flush"] == flushes
        assert not guest.vm.lookup(GPA).young
        vcpu = guest.vm.create_vcpu(1)
        assert vcpu.read(GPA, len(pattern(3))) == pattern(3)
    else:
        assert guest.vm.stats["tlb_flush"] > flushes
    assert guest.vm.lookup(GPA).young
    assert host.age(hva, page) is True
    guest.vm.check_invariants()


def test_age_unmapped_range_is_old(guest, host):
    """Aging hvas with no leaf (or no slot) reports not young and maps nothing."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    assert host.age(hva, slot_size) is False
    other = host.mmap(slot_size)
    assert host.age(other, slot_size) is False
    assert list(guest.vm.mappings()) == []


def test_age_only_its_range(guest, host):
    """Aging one page leaves the other leaves young."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA, pattern(4))
    guest.write(GPA + 8 * page, pattern(5))
    host.age(hva, page)
    assert guest.vm.lookup(GPA + 8 * page).young


def test_test_young_reports_without_clearing(guest, host):
    """mmu_notifier_test_young (kvm_test_age_gfn): young after an access, still young after
    asking, old only once aged; the leaf is never touched."""
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, SLOT_PAGES * page)
    assert host.test_young(hva, page) is False           # nothing mapped
    guest.write(GPA, pattern(3))
    before = guest.vm.lookup(GPA)
    assert host.test_young(hva, page) is True
    assert host.test_young(hva, page) is True
    assert guest.vm.lookup(GPA) == before
    host.age(hva, page)
    assert host.test_young(hva, page) is False


def _holding_mmu_lock(vm):
    """A thread that takes kvm->mmu_lock for write and stops there (a zap's, say)."""
    yield from vm.mmu_lock.write_lock("holder_lock_wait")
    try:
        yield "holding"
    finally:
        vm.mmu_lock.write_unlock()


def test_aging_beside_a_flow_holding_mmu_lock(guest, host):
    """kvm_age_hva_range: where the arch selects CONFIG_KVM_MMU_LOCKLESS_AGING (x86, the TDP
    MMU ages under RCU) aging runs while another flow holds kvm->mmu_lock, and ages the
    leaves; elsewhere it takes the lock for write and waits."""
    page = guest.vm.page_size
    slot_size = SLOT_PAGES * page
    hva = guest.slot(0, GPA, slot_size)
    guest.write(GPA + page, pattern(3))
    holder = Flow("holder", _holding_mmu_lock(guest.vm))
    assert [next(holder), next(holder)] == ["holder_lock_wait", "holding"]
    age = host.steps.age(hva + page, page)
    if guest.vm.arch_info.mmu_lockless_aging:
        assert age.run() is True
        assert not guest.vm.lookup(GPA + page).young
    else:
        assert next(age) == "mn_age_lock_wait" and not age.runnable
    holder.run()
    if not age.done:
        assert age.run() is True
    assert not guest.vm.lookup(GPA + page).young
    guest.vm.check_invariants()
