"""Facts that differ by architecture and that a backend states in its ArchInfo (issue 17):
the errno of an ioctl the arch does not build, the fault path's staleness rule; and the
regressions random call sequences found (each holds on every backend)."""

from __future__ import annotations

import errno

import pytest

from kvmcore import KvmError
from kvmcore.conformance.helpers import finish, pattern, step_until
from kvmcore.host import SigBus
from kvmcore.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

GPA = 0x1000_0000
MiB = 1 << 20

#: Linux's default case of kvm_arch_vm_ioctl / kvm_arch_vcpu_ioctl, per architecture
#: (x86.c; arm64 arm.c; powerpc.c and book3s_hv.c), for the backends that model them.
LINUX_FALLBACK = {
    "x86_tdp": (errno.ENOTTY, errno.ENOTTY),
    "arm64_stage2": (errno.EINVAL, errno.EINVAL),
    "ppc_radix": (errno.ENOTTY, errno.EINVAL),
}


def _errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(KvmError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def test_missing_ioctls_answer_the_arch_fallback(make_vm):
    """Every ioctl a backend may lack answers kvm_arch_vm_ioctl's (VM ioctls) or
    kvm_arch_vcpu_ioctl's (vCPU ioctls) default errno; KVM_ENABLE_CAP of a capability the arch
    lacks is EINVAL everywhere (kvm_vm_ioctl_enable_cap's default)."""
    vm = make_vm()
    info = vm.arch_info
    vm_err, vcpu_err = LINUX_FALLBACK.get(info.name, (info.vm_ioctl_errno,
                                                      info.vcpu_ioctl_errno))
    assert (info.vm_ioctl_errno, info.vcpu_ioctl_errno) == (vm_err, vcpu_err)
    caps = info.capabilities
    vcpu = vm.create_vcpu(0)
    calls = []
    if "memory_attributes" not in caps:
        # attributes=0 too: the ioctl itself does not exist, whatever its arguments.
        calls += [(vm_err, vm.set_memory_attributes, GPA, 4096, 0),
                  (vm_err, vm.set_memory_attributes, GPA, 4096, 1 << 3)]
    if "gmem" not in caps:
        calls.append((vm_err, vm.create_guest_memfd, MiB))
    if "manual_dirty_protect" not in caps:
        calls += [(vm_err, vm.clear_dirty_log, 0, 0, 64, []),
                  (errno.EINVAL, vm.enable_dirty_log_manual_protect)]
    if "pre_fault" not in caps:
        calls.append((vcpu_err, vcpu.pre_fault_memory, GPA, 4096))
    if "dirty_ring" not in caps:
        calls.append((errno.EINVAL, vm.enable_dirty_ring, 1 << 16))
    for want, fn, *args in calls:
        assert _errno_of(fn, *args) == want, fn.__name__


def test_fault_during_an_invalidation_of_another_gfn(guest, host):
    """x86 is_page_fault_stale uses mmu_invalidate_retry_gfn: an invalidation in progress of
    another page does not stop the fault. arm64 user_mem_abort and ppc kvmppc_create_pte use
    mmu_invalidate_retry: the fault retries until no invalidation is in progress."""
    vm = guest.vm
    page = vm.page_size
    hva = guest.slot(0, GPA, 16 * page)
    host.write(hva + 2 * page, pattern(1))
    steps = guest.vcpu.step_access("read", GPA + 2 * page, 8, private=False)
    step_until(steps, "pf_lock_wait")
    stale = vm.stats["fault_retry_stale"]
    with host.invalidating(hva + 8 * page, page):
        try:
            point = next(steps)
            while point != "pf_retry_wait":     # the backend's own install points
                point = next(steps)
        except StopIteration as stop:
            point, data = None, stop.value
        if vm.arch_info.fault_retry_gfn:
            assert point is None and data == pattern(1)
            assert vm.stats["fault_retry_stale"] == stale
        else:
            assert point == "pf_retry_wait"          # retried: faults again until it ends
            assert vm.stats["fault_retry_stale"] == stale + 1
            assert vm.lookup(GPA + 2 * page) is None and not steps.runnable
    if point is not None:
        assert finish(steps) == pattern(1)
    assert vm.lookup(GPA + 2 * page) is not None


@pytest.mark.requires("gmem", "private_mem")
def test_gmem_mmap_on_a_vm_with_private_memory(make_vm, host):
    """kvm_gmem_get_supported_flags: MMAP whatever the VM type; INIT_SHARED only where
    kvm_arch_supports_gmem_init_shared (x86: not with private memory). Without INIT_SHARED
    the file is private: a host access through the mapping gets SIGBUS
    (kvm_gmem_fault_user_mapping)."""
    vm = make_vm()
    size = 16 * vm.page_size
    if "gmem_mmap" not in vm.arch_info.capabilities:     # no guest_memfd mmap on this arch
        assert _errno_of(vm.create_guest_memfd, size, GUEST_MEMFD_FLAG_MMAP) == errno.EINVAL
        return
    gmem = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP)
    hva = gmem.mmap()
    with pytest.raises(SigBus):
        host.read(hva, 8)
    with pytest.raises(SigBus):
        host.write(hva + vm.page_size, b"x")
    if "gmem_mmap" not in vm.capabilities:       # a VM type with private memory
        assert _errno_of(vm.create_guest_memfd, size,
                         GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) == errno.EINVAL


# ----------------------------------------------------------------------- regressions

def test_shared_page_read_then_write(make_vm, host):
    """A MAP_SHARED page is mapped host-read-only by a read fault (do_read_fault); the
    guest's write then makes it writable without a notifier (wp_page_shared), and KVM
    replaces its read-only leaf by a writable one of the same pfn."""
    _shared_page_then_write(make_vm(vm_type="default"), host, "read")


@pytest.mark.requires("pre_fault")
def test_shared_page_pre_fault_then_write(make_vm, host):
    """The same after KVM_PRE_FAULT_MEMORY, which maps as a read fault."""
    _shared_page_then_write(make_vm(vm_type="default"), host, "pre_fault")


def _shared_page_then_write(vm, host, first: str) -> None:
    base = 1 << 30
    hva = host.mmap(4 * MiB, kind="shared")
    vm.set_user_memory_region(0, base, 4 * MiB, hva)
    vcpu = vm.create_vcpu(0)
    gpa = base + 0x1000 if vm.page_size == 4096 else base + vm.page_size
    if first == "read":
        assert vcpu.read(gpa, 1) == b"\0"
    else:
        page = vm.page_size
        assert vcpu.pre_fault_memory(gpa, page)[1] == 0
    vcpu.write(gpa, b"x")
    assert host.read(hva + gpa - base, 1) == b"x"
    vm.check_invariants()
    m = vm.lookup(gpa)
    assert m is not None and m.writable


@pytest.mark.requires("hugepage_2m")
def test_thp_partly_dropped_then_refaulted(make_vm, host):
    """madvise(DONTNEED) of part of a THP splits the host PMD and drops those pages; a fault
    on the last page of that 2 MiB range must map 4 KiB (the host maps PAGE_SIZE there), so
    a later host write to a dropped page is what the guest reads."""
    vm = make_vm(vm_type="default")     # shared memory: the same on every VM type
    pmd = host.pmd_size
    base = 4 << 30
    hva = host.mmap(4 * pmd, thp=True)
    vm.set_user_memory_region(0, base, 4 * pmd, hva)
    vcpu = vm.create_vcpu(0)
    page = vm.page_size
    vcpu.read(base + pmd + (pmd // 2 & ~(page - 1)), 1)
    host.madvise_dontneed(hva + pmd, max(page, 0x10000))
    vcpu.read(base + 2 * pmd - page, 1)
    vm.check_invariants()
    host.write(hva + pmd, b"HOST")
    assert vcpu.read(base + pmd, 4) == b"HOST"


@pytest.mark.requires("hugepage_2m")
def test_thp_split_then_fault_on_the_last_page(make_vm, host):
    """split_huge_page: the host maps PAGE_SIZE PTEs; a fault on the range's last page maps
    no block larger than that."""
    vm = make_vm(vm_type="default")
    pmd = host.pmd_size
    base = 4 << 30
    hva = host.mmap(4 * pmd, thp=True)
    vm.set_user_memory_region(0, base, 4 * pmd, hva)
    vcpu = vm.create_vcpu(0)
    page = vm.page_size
    vcpu.write(base, b"A")
    host.split_huge_page(hva)
    assert vcpu.read(base + pmd - page, 1) == b"\0"
    m = vm.lookup(base + pmd - page)
    assert m is not None and m.size == page
    vm.check_invariants()
    assert vcpu.read(base, 1) == b"A"
