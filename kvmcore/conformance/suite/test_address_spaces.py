"""Memslot address spaces: a vCPU accesses the address space kvm_arch_vcpu_memslots_id names
(x86: 1 in SMM, entered with KVM_SET_VCPU_EVENTS), and each one has its own memslots and
mappings (reference/core.md §1.1; kvm_vcpu_memslots, kvm_smm_changed)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import (expect_errno, expect_errno_unchanged, expect_mmio,
                                        pattern, state)
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

GPA = 0x10_0000
SMM = 1 << 16  # as_id 1 in a slot number's high bits
EINVAL = errno.EINVAL


@pytest.fixture
def two_spaces(guest):
    if guest.vm.nr_address_spaces < 2:
        pytest.skip("one memslot address space")
    return guest


def test_a_vcpu_in_smm_uses_the_second_address_space(two_spaces, host):
    """The same gpa is two memslots: the vCPU reaches the one of its address space, and each
    address space's mapping points at its own host page."""
    guest = two_spaces
    page = guest.vm.page_size
    hva0 = guest.slot(0, GPA, 4 * page)
    hva1 = guest.slot(SMM | 0, GPA, 4 * page)
    guest.write(GPA, pattern(1))
    guest.vcpu.set_vcpu_events(smm=True)
    assert guest.vcpu.as_id == 1
    assert guest.read(GPA) == bytes(8)
    guest.write(GPA, pattern(2))
    assert host.read(hva1, 8) == pattern(2)
    assert host.read(hva0, 8) == pattern(1)
    smm_leaf = guest.vm.lookup(GPA, as_id=1)
    assert smm_leaf is not None and smm_leaf.pfn != guest.vm.lookup(GPA).pfn
    guest.vcpu.set_vcpu_events(smm=False)
    assert guest.vcpu.as_id == 0
    assert guest.read(GPA) == pattern(1)
    guest.vm.check_invariants()


def test_smm_without_a_slot_is_mmio(two_spaces):
    """A slot in address space 0 does not serve a vCPU in SMM: its access is MMIO."""
    guest = two_spaces
    guest.slot(0, GPA, 4 * guest.vm.page_size)
    guest.vcpu.set_vcpu_events(smm=True)
    expect_mmio(guest.read, GPA, 8, None, GPA)
    assert list(guest.vm.mappings(as_id=1)) == []


def test_deleting_the_smm_slot(two_spaces):
    """Deleting the SMM slot zaps its mappings (x86's SLOT_ZAP_ALL quirk zaps every root, so
    address space 0's may go too) and leaves address space 0's memory as it was."""
    guest = two_spaces
    page = guest.vm.page_size
    guest.slot(0, GPA, 4 * page)
    guest.slot(SMM | 0, GPA, 4 * page)
    guest.write(GPA, pattern(1))
    guest.vcpu.set_vcpu_events(smm=True)
    guest.write(GPA, pattern(2))
    guest.vm.set_user_memory_region(SMM | 0, GPA, 0, 0)
    assert guest.vm.lookup(GPA, as_id=1) is None
    expect_mmio(guest.read, GPA, 8, None, GPA)
    guest.vcpu.set_vcpu_events(smm=False)
    assert guest.read(GPA) == pattern(1)
    guest.vm.check_invariants()


def test_dirty_log_of_an_smm_slot(two_spaces):
    """A write in SMM dirties the SMM slot's log, not the log of address space 0's slot."""
    guest = two_spaces
    page = guest.vm.page_size
    guest.slot(0, GPA, 4 * page, flags=KVM_MEM_LOG_DIRTY_PAGES)
    guest.slot(SMM | 0, GPA, 4 * page, flags=KVM_MEM_LOG_DIRTY_PAGES)
    guest.vcpu.set_vcpu_events(smm=True)
    guest.write(GPA + page, pattern(3))
    guest.vcpu.set_vcpu_events(smm=False)
    per = page >> 12
    assert guest.vm.get_dirty_log(SMM | 0) == list(range(per, 2 * per))
    assert guest.vm.get_dirty_log(0) == []


def test_leaving_smm_drops_the_smm_translations(two_spaces):
    """kvm_smm_changed resets the MMU context: a translation cached in SMM does not serve the
    vCPU once it has left, even for a gpa it used in both modes."""
    guest = two_spaces
    page = guest.vm.page_size
    guest.slot(0, GPA, 4 * page)
    guest.slot(SMM | 0, GPA, 4 * page)
    guest.vcpu.set_vcpu_events(smm=True)
    guest.write(GPA, pattern(4))
    assert guest.read(GPA) == pattern(4)
    guest.vcpu.set_vcpu_events(smm=False)
    assert guest.read(GPA) == bytes(8)
    guest.vcpu.set_vcpu_events(smm=True)
    assert guest.read(GPA) == pattern(4)


def test_entering_smm_with_one_address_space_is_einval(guest):
    """Without a second address space (arm64, Power, x86 VM types with private memory) a vCPU
    cannot enter SMM; the call changes nothing."""
    if guest.vm.nr_address_spaces >= 2:
        pytest.skip("the VM has an SMM address space")
    guest.slot(0, GPA, 4 * guest.vm.page_size)
    expect_errno_unchanged(guest.vm, EINVAL, guest.vcpu.set_vcpu_events, smm=True)
    assert guest.vcpu.as_id == 0
    guest.vcpu.set_vcpu_events(smm=False)
    guest.write(GPA, pattern(5))
    assert guest.read(GPA) == pattern(5)


@pytest.mark.parametrize("smm", ["yes", 1])
def test_set_vcpu_events_checks_smm(guest, smm):
    """smm is a bool: anything else is a TypeError naming it (docs/api.md, Arguments)."""
    before = state(guest.vm)
    with pytest.raises(TypeError, match="smm"):
        guest.vcpu.set_vcpu_events(smm=smm)
    assert state(guest.vm) == before
    assert guest.vcpu.as_id == 0


def test_mappings_checks_as_id(guest):
    vm = guest.vm
    for bad in (-1, vm.nr_address_spaces):
        expect_errno(EINVAL, vm.mappings, as_id=bad)
        expect_errno(EINVAL, vm.lookup, GPA, as_id=bad)
        expect_errno(EINVAL, vm.memslots, as_id=bad)
    for bad in (True, "0", None):
        for call in (vm.mappings, vm.memslots):
            with pytest.raises(TypeError, match="as_id"):
                call(as_id=bad)
        with pytest.raises(TypeError, match="as_id"):
            vm.lookup(GPA, as_id=bad)


@pytest.mark.requires("pre_fault")
def test_pre_fault_in_smm_maps_the_smm_slot(two_spaces):
    """KVM_PRE_FAULT_MEMORY looks up the vCPU's memslots (kvm_vcpu_gfn_to_memslot): in SMM,
    address space 1's."""
    guest = two_spaces
    page = guest.vm.page_size
    guest.slot(0, GPA, 4 * page)
    guest.slot(SMM | 0, GPA, 4 * page)
    guest.vcpu.set_vcpu_events(smm=True)
    assert guest.vcpu.pre_fault_memory(GPA, page) == (GPA + page, 0)
    assert guest.vm.lookup(GPA, as_id=1) is not None
    assert guest.vm.lookup(GPA) is None
