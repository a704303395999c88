"""The 2020 concurrent-translation-fault thread (Yanan Wang's RFC, Marc Zyngier's reply, commits
694d071f8d85 / 509552e65ae8): vCPU A write-faults and vCPU B read-faults on one gfn of a
dirty-logged slot (where read faults map read-only), interleaved at the core's race points in
both orders. Upstream's outcome, which the model must show: the map path never changes
permissions only, so the read fault never downgrades A's writable leaf; A's write that finds
B's read-only leaf comes back as a permission fault that relax_perms resolves in place (no
break-before-make); the only TLB invalidation is relax_perms' local one."""

from __future__ import annotations

import pytest
from kvmcore.fault import AFTER_SNAPSHOT, BEFORE_LOCK, run_to_completion
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

from conftest import GPA, backend_of
from kvmcore_arm64_stage2.pgtable import KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W

SIZE = 64 * 4096
TARGET = GPA + 5 * 4096


def _setup(make_vm, granule=4096):
    vm = make_vm(granule=granule)
    host = vm.host
    hva = host.mmap(SIZE)
    host.write(hva, bytes(SIZE))          # host pages exist and are writable
    vm.set_user_memory_region(0, GPA, SIZE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    b_ = backend_of(vm)
    b_.tlbi_log.clear()
    b_.pgt.events.clear()
    return vm, a, b, b_


def _advance_to(gen, point):
    while True:
        if next(gen) == point:
            return


def _bbm_on_valid_leaf(backend):
    return [e for e in backend.pgt.events if e.kind == "break" and e.old & 1]


@pytest.mark.parametrize("granule", [4096, 65536])
@pytest.mark.parametrize("point", [AFTER_SNAPSHOT, BEFORE_LOCK])
def test_write_then_read_interleaved_reader_finishes_first(make_vm, point, granule):
    """A (write) stops at the race point; B (read) maps the page read-only; A then maps RW over
    RO: a permission-only difference, so -EAGAIN and A re-faults with a permission fault that
    relax_perms resolves."""
    vm, a, b, backend = _setup(make_vm, granule)
    ga = a.step_access("write", TARGET, b"\xaa" * 8)
    _advance_to(ga, point)
    assert b.read(TARGET, 8) == bytes(8)
    leaf = vm.lookup(TARGET)
    assert leaf.readable and not leaf.writable, "logging: a read fault maps read-only"
    run_to_completion(ga)
    leaf = vm.lookup(TARGET)
    assert leaf.writable, "the leaf ends writable"
    assert _bbm_on_valid_leaf(backend) == [], "no break-before-make on a permission upgrade"
    assert vm.stats["relax_perms"] == 1
    assert {t.op for t in backend.tlbi_log} == {"vmid_ipa_nsh"}
    assert [(t.why, t.ipa, t.level) for t in backend.tlbi_log] == [
        ("relax_perms", TARGET & ~(granule - 1), 3)]
    assert b.read(TARGET, 8) == b"\xaa" * 8
    assert (TARGET - GPA) >> 12 in vm.get_dirty_log(0)


@pytest.mark.parametrize("granule", [4096, 65536])
@pytest.mark.parametrize("point", [AFTER_SNAPSHOT, BEFORE_LOCK])
def test_read_then_write_interleaved_writer_finishes_first(make_vm, point, granule):
    """B (read) stops at the race point; A (write) maps RW and logs the page; B then maps RO
    over RW: a permission-only difference the map path leaves alone — no downgrade."""
    vm, a, b, backend = _setup(make_vm, granule)
    gb = b.step_access("read", TARGET, 8)
    _advance_to(gb, point)
    a.write(TARGET, b"\xbb" * 8)
    assert vm.lookup(TARGET).writable
    before = vm.lookup(TARGET)
    assert run_to_completion(gb) == b"\xbb" * 8
    after = vm.lookup(TARGET)
    assert after == before, "the racing read fault changed nothing"
    assert after.writable
    assert _bbm_on_valid_leaf(backend) == []
    assert list(backend.tlbi_log) == [], "neither fault needed a TLB invalidation"
    assert vm.stats["arm64_fault_eagain"] >= 1
    assert (TARGET - GPA) >> 12 in vm.get_dirty_log(0)


def test_pre_2020_behaviour_would_have_downgraded(make_vm):
    """Control: the map walker's filter is what saves the writable leaf. With the filter
    disabled (stage2_pte_needs_update true for permission-only changes, as before
    694d071f8d85), the same interleaving downgrades W through BBM — so the tests above
    would fail on such a walker."""
    vm, a, b, backend = _setup(make_vm)
    pgt = backend.pgt
    pgt.pte_needs_update = lambda old, new: old != new
    gb = b.step_access("read", TARGET, 8)
    _advance_to(gb, BEFORE_LOCK)
    a.write(TARGET, b"\xcc" * 8)
    run_to_completion(gb)
    pte, _ = pgt.get_leaf(TARGET)
    assert not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert _bbm_on_valid_leaf(backend)
    assert "vmid_ipa" in {t.op for t in backend.tlbi_log}


def test_fault_meeting_a_locked_entry_retries_until_the_make(make_vm, host):
    """Invariant 6 at the vCPU level: while another CPU holds the entry LOCKED (its BBM
    window, planted here at a race point), vCPU A's translation fault finds LOCKED, writes
    nothing and re-enters; once the other CPU's make lands, A's access completes."""
    from kvmcore_arm64_stage2.pgtable import KVM_INVALID_PTE_LOCKED

    vm = make_vm()
    hva = host.mmap(SIZE)
    host.write(hva, b"\x11" * SIZE)
    vm.set_user_memory_region(0, GPA, SIZE, hva)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    b.read(TARGET, 1)
    backend = backend_of(vm)
    _, table, idx, good = backend.pgt.pt.lookup(TARGET)
    table[idx] = KVM_INVALID_PTE_LOCKED            # B broke the entry ...
    vm.flush_remote_tlbs()                         # ... and invalidated the TLBs
    ga = a.step_access("read", TARGET, 1)
    _advance_to(ga, BEFORE_LOCK)                   # A's translation fault, pfn resolved
    _advance_to(ga, AFTER_SNAPSHOT)                # map saw LOCKED: -EAGAIN, A re-faults
    assert table[idx] == KVM_INVALID_PTE_LOCKED, "A never overwrote the LOCKED entry"
    assert vm.stats["arm64_fault_eagain"] == 1
    table[idx] = good                              # B's release-store of the new entry
    assert run_to_completion(ga) == b"\x11"
    assert table[idx] == good
