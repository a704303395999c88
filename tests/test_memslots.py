"""KVM_SET_USER_MEMORY_REGION2: every check of reference §1.3 in order, the change kinds,
and the generation / INVALID-copy protocol of §1.4-1.5."""

import errno

import pytest
from conftest import MiB, snapshot

from kvmcore import KvmError, hookimpl
from kvmcore.memslots import TASK_SIZE
from kvmcore.uapi import (KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
                          KVM_MEMSLOT_INVALID)


def region(vm, slot, gpa, size, hva, flags=0, **kw):
    vm.set_user_memory_region(slot, gpa, size, hva, flags, **kw)


@pytest.mark.parametrize("args, message", [
    (dict(slot=32767, gpa=0, size=MiB), "not a user memslot"),
    (dict(slot=0, gpa=0, size=MiB, flags=1 << 5), "flags"),
    (dict(slot=0, gpa=0, size=MiB + 1), "memory_size"),
    (dict(slot=0, gpa=0x800, size=MiB), "guest_phys_addr"),
    (dict(slot=0, gpa=0, size=MiB, hva_off=0x10), "userspace_addr"),
    (dict(slot=2 << 16, gpa=0, size=MiB), "address space"),
    (dict(slot=0, gpa=(1 << 64) - MiB, size=MiB), "wraps"),
    (dict(slot=0, gpa=0, size=(1 << 31) << 12), "KVM_MEM_MAX_NR_PAGES"),
    (dict(slot=0, gpa=0, size=0), "does not exist"),
])
def test_validation_errno_and_message(vm, host, args, message):
    hva = host.mmap(2 * MiB)
    before = snapshot(vm)
    with pytest.raises(KvmError) as e:
        region(vm, args["slot"], args["gpa"], args["size"], hva + args.get("hva_off", 0),
               args.get("flags", 0))
    assert e.value.errno == errno.EINVAL
    assert message in str(e.value)
    assert snapshot(vm) == before


def test_userspace_addr_must_pass_access_ok(vm):
    with pytest.raises(KvmError) as e:
        region(vm, 0, 0, 2 * MiB, TASK_SIZE - MiB)
    assert e.value.errno == errno.EINVAL and "access_ok" in str(e.value)


def test_flags_check_comes_first(vm, host):
    # Both the flags and the size are bad: the flags check (step 1) wins, as in Linux.
    hva = host.mmap(MiB)
    with pytest.raises(KvmError, match="flags"):
        region(vm, 0, 0, MiB + 1, hva, 1 << 7)


def test_gmem_flag_forbids_dirty_logging_and_readonly(pvm, host):
    gmem = pvm.create_guest_memfd(MiB)
    hva = host.mmap(MiB)
    for flags in (KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES,
                  KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY):
        with pytest.raises(KvmError) as e:
            region(pvm, 0, 0, MiB, hva, flags, guest_memfd=gmem)
        assert e.value.errno == errno.EINVAL
    assert not list(pvm.all_memslots())


def test_gmem_offset_must_be_aligned(pvm, host):
    gmem = pvm.create_guest_memfd(2 * MiB)
    hva = host.mmap(MiB)
    with pytest.raises(KvmError, match="guest_memfd_offset") as e:
        region(pvm, 0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem,
               guest_memfd_offset=0x10)
    assert e.value.errno == errno.EINVAL


def test_overlap_is_eexist_in_same_address_space_only(vm, host):
    hva = host.mmap(4 * MiB)
    region(vm, 0, 0, 2 * MiB, hva)
    before = snapshot(vm)
    with pytest.raises(KvmError) as e:
        region(vm, 1, MiB, 2 * MiB, hva)
    assert e.value.errno == errno.EEXIST
    assert snapshot(vm) == before
    region(vm, (1 << 16) | 1, MiB, 2 * MiB, hva)  # address space 1 (SMM) may overlap
    assert [s.slot_id for s in vm.all_memslots()] == [0, (1 << 16) | 1]


def test_modify_rules(vm, host):
    hva = host.mmap(4 * MiB)
    region(vm, 0, 0, 2 * MiB, hva)
    for bad in (dict(size=MiB), dict(hva=hva + MiB), dict(flags=KVM_MEM_READONLY)):
        with pytest.raises(KvmError) as e:
            region(vm, 0, 0, bad.get("size", 2 * MiB), bad.get("hva", hva), bad.get("flags", 0))
        assert e.value.errno == errno.EINVAL
    gen = vm.memslot_generation()
    region(vm, 0, 0, 2 * MiB, hva)               # identical: a no-op, no generation change
    assert vm.memslot_generation() == gen
    region(vm, 0, 0, 2 * MiB, hva, KVM_MEM_LOG_DIRTY_PAGES)   # FLAGS_ONLY: one swap
    assert vm.memslot_generation() == gen + vm.nr_address_spaces
    assert vm.stats["memslot_flags_only"] == 1
    region(vm, 0, 64 * MiB, 2 * MiB, hva, KVM_MEM_LOG_DIRTY_PAGES)  # MOVE: two swaps
    assert vm.memslot_generation() == gen + 3 * vm.nr_address_spaces
    assert vm.gfn_to_memslot(0) is None and vm.gfn_to_memslot((64 * MiB) >> 12).id == 0


def test_gmem_slot_is_immutable(pvm, host):
    gmem = pvm.create_guest_memfd(MiB)
    hva = host.mmap(MiB)
    region(pvm, 0, 0, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    with pytest.raises(KvmError, match="immutable"):
        region(pvm, 0, 2 * MiB, MiB, hva, KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
    with pytest.raises(KvmError, match="cannot be resized"):
        region(pvm, 0, 2 * MiB, MiB, hva)
    region(pvm, 0, 0, 0, hva)  # delete is allowed and unbinds
    assert not gmem.bindings


def test_delete_publishes_invalid_copy_then_zaps(vm, host):
    hva = host.mmap(2 * MiB)
    region(vm, 0, 0, 2 * MiB, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(0, b"x")
    seen = []

    class Spy:
        @hookimpl(wrapper=True)
        def flush_shadow_memslot(self, vm, slot):
            live = vm.memslot_sets[0].by_id[slot.id]
            seen.append((live.flags & KVM_MEMSLOT_INVALID, vm.gfn_to_memslot(0),
                         len(list(vm.mappings()))))
            return (yield)

    vm.pm.register(Spy())
    region(vm, 0, 0, 0, hva)
    assert seen == [(KVM_MEMSLOT_INVALID, None, 1)]
    assert list(vm.mappings()) == []


def test_nr_memslot_pages_and_generation_parity(vm, host):
    hva = host.mmap(8 * MiB)
    for i in range(4):
        region(vm, i, i * 2 * MiB, 2 * MiB, hva + i * 2 * MiB)
    assert vm.nr_memslot_pages == 4 * 512
    region(vm, 2, 0, 0, 0)
    assert vm.nr_memslot_pages == 3 * 512
    assert vm.memslot_generation(0) % 2 == 0 and vm.memslot_generation(1) % 2 == 1


def test_many_slots_lookup(vm, host):
    hva = host.mmap(1024 * 4096)
    for i in range(1024):
        region(vm, i, i * 8192, 4096, hva + i * 4096)
    for i in (0, 1, 511, 1023):
        assert vm.gfn_to_memslot(i * 2).id == i
        assert vm.gfn_to_memslot(i * 2 + 1) is None
    assert [s.id for s in vm.memslot_sets[0].in_hva_range(hva + 4096 * 10,
                                                          hva + 4096 * 12)] == [10, 11]


def test_internal_slots_are_not_for_userspace(host):
    import attrs

    from kvmcore import VM
    from kvmcore.testing import FlatBackend

    class X86Like(FlatBackend):
        arch_info = attrs.evolve(FlatBackend.arch_info, internal_mem_slots=3)

    vm = VM(arch=X86Like, host=host)
    hva = host.mmap(MiB)
    with pytest.raises(KvmError, match="not a user memslot") as e:
        region(vm, 32764, 0, MiB, hva)
    assert e.value.errno == errno.EINVAL
    region(vm, 32763, 0, MiB, hva)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(32764)
    assert e.value.errno == errno.EINVAL
