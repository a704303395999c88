"""SMM: the second memslot address space (kvm_arch_vcpu_memslots_id), its own TDP root
(role.smm), and what a change of mode does to the vCPU (kvm_smm_changed)."""

from __future__ import annotations

import errno

import pytest
from kvmcore import KvmError
from kvmcore.exits import MmioExit
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import PAGE, SZ_2M
from kvmcore_x86_tdp import spte as S

SMM = 1 << 16


def test_a_vcpu_in_smm_faults_into_the_smm_root(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    g.slot(SMM | 1, 0, SZ_2M)
    g.vcpu.set_vcpu_events(smm=True)
    g.vcpu.write(3 * PAGE, b"s")
    smm_root, root = g.b.direct_roots[1], g.b.direct_roots[0]
    assert smm_root is not root and smm_root.as_id == 1
    assert S.is_shadow_present_pte(g.b.tdp.get_last_spte(smm_root, 3)[3])
    assert not S.is_shadow_present_pte(g.b.tdp.get_last_spte(root, 3)[3])
    assert [m.gfn for m in g.vm.mappings(as_id=1)] == [3]
    assert list(g.vm.mappings()) == []
    slot = g.vm.gfn_to_memslot(3, 1)
    m = g.vm.lookup(3 * PAGE, as_id=1)
    assert m.pfn == g.host.lookup_pte(slot.gfn_to_hva(3))[0]
    assert m.raw & S.SPTE_MMU_PRESENT_MASK
    assert g.events("vcpu.memslots_id") == [{"event": "vcpu.memslots_id", "vcpu": 0,
                                             "as_id": 1}]
    assert g.check()


def test_smm_mmio_spte_carries_the_smm_generation(make):
    """A no-slot access in SMM caches an MMIO SPTE in the SMM root, with the generation of
    address space 1 (odd: generations of address space n are n mod 2)."""
    g = make()
    g.slot(SMM | 0, 0, SZ_2M)
    g.vcpu.set_vcpu_events(smm=True)
    gen = g.vm.memslot_generation(1)
    assert gen % 2 == 1
    with pytest.raises(MmioExit):
        g.vcpu.read(SZ_2M, 8)
    spte = g.b.tdp.get_last_spte(g.b.direct_roots[1], SZ_2M // PAGE)[3]
    assert S.is_mmio_spte(spte)
    assert S.get_mmio_spte_generation(spte) == gen & S.MMIO_SPTE_GEN_MASK
    assert not S.is_mmio_spte(g.b.tdp.get_last_spte(g.b.direct_roots[0], SZ_2M // PAGE)[3])
    with pytest.raises(MmioExit):
        g.vcpu.read(SZ_2M, 8)
    assert g.vm.stats["x86_tdp.mmio_spte_hit"] == 1


def test_entering_smm_drains_pml_into_the_old_address_space(make):
    """The write was logged in address space 0: entering SMM before the buffer is drained must
    not credit it to the SMM slot at the same gpa (Linux drains PML on every exit)."""
    g = make(pml=True, pml_drain_on_exit=False)
    hva = g.slot(0, 0, SZ_2M)
    g.slot(SMM | 0, 0, SZ_2M, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.write(PAGE, b"x")
    g.vm.set_user_memory_region(0, 0, SZ_2M, hva, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.write(PAGE, b"y")        # D was cleared: the CPU logs the gpa in the PML buffer
    assert len(g.vcpu.arch["pml"]) == 1
    g.vcpu.set_vcpu_events(smm=True)
    assert len(g.vcpu.arch["pml"]) == 0
    assert g.vm.get_dirty_log(SMM | 0) == []
    assert g.vm.get_dirty_log(0) == [1]


@pytest.mark.parametrize("vm_type", ["sw_protected", "snp", "tdx"])
def test_vms_with_private_memory_have_no_smm(make, vm_type):
    g = make(vm_type=vm_type)
    assert g.vm.nr_address_spaces == 1
    with pytest.raises(KvmError) as info:
        g.vcpu.set_vcpu_events(smm=True)
    assert info.value.errno == errno.EINVAL and "SMM" in str(info.value)
    assert g.vcpu.as_id == 0 and "smm" not in g.vcpu.arch
    g.vcpu.set_vcpu_events(smm=False)


def test_setting_the_same_mode_keeps_the_tlb(make):
    g = make()
    g.slot(0, 0, SZ_2M)
    g.vcpu.write(0, b"x")
    assert g.vcpu.tlb
    g.vcpu.set_vcpu_events(smm=False)
    g.vcpu.set_vcpu_events()
    assert g.vcpu.tlb and g.events("vcpu.memslots_id") == []


def test_reentry_puts_the_obsolete_roots_of_both_address_spaces(make):
    """kvm_mmu_zap_all_fast obsoletes the SMM root too; the vCPU's next entry puts every
    obsolete root it holds (kvm_mmu_free_obsolete_roots: the current root and the previous
    ones), so neither outlives it, whichever mode it enters in."""
    g = make()
    hva = g.slot(0, 0, SZ_2M)
    g.slot(SMM | 1, 0, SZ_2M)
    g.vcpu.write(PAGE, b"n")
    g.vcpu.set_vcpu_events(smm=True)
    g.vcpu.write(PAGE, b"s")
    old = dict(g.vcpu.arch["roots"])
    assert sorted(old) == [0, 1] and all(r.refs == 2 for r in old.values())
    g.vm.set_user_memory_region(0, 0, 0, hva)          # DEFAULT_VM: kvm_mmu_zap_all_fast
    assert all(r.invalid and r.refs == 1 for r in old.values())
    g.vcpu.read(PAGE, 1)                               # enters in SMM
    assert not any(r in g.b.tdp.roots for r in old.values())
    assert g.vcpu.arch["roots"] == {1: g.b.direct_roots[1]}
    g.check()
