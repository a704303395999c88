"""Helpers for conformance tests: the ``guest`` fixture's object and exact-expectation checks.

Everything here goes through the public surface of API.md only.
"""

from __future__ import annotations

import errno as _errno

import pytest

from kvmcore import KvmError, MemoryFaultExit, MmioExit
from kvmcore.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
)

PAGE = 4096
#: The largest base page of any backend (arm64 64K granule, ppc 64K pages): a size or offset
#: that is a multiple of it is aligned at every base page.
MAX_PAGE = 65536
SZ_2M = 2 << 20
SZ_1G = 1 << 30
EFAULT = _errno.EFAULT
EHWPOISON = getattr(_errno, "EHWPOISON", 133)


def gfn(gpa: int) -> int:
    return gpa >> 12


def pattern(tag: int, n: int = 8) -> bytes:
    """Recognisable, non-zero bytes: different tags never collide."""
    return bytes(((tag * 131 + i * 7 + 1) & 0xFF) or 1 for i in range(n))


def base_page(vm) -> int:
    """The VM's base page in bytes: its host's PAGE_SIZE (4 KiB unless the run's VM options
    ask for more)."""
    return vm.page_size


def base_page_gfns(vm, gpa: int, slot_base_gpa: int | None = None,
                   slot_size: int | None = None) -> list[int]:
    """Slot-relative page offsets that a write at ``gpa`` reports in a dirty log: every 4 KiB
    gfn of the base page that holds it (API.md: larger base pages report whole pages), clipped
    to the slot."""
    bp = base_page(vm)
    start = gpa & ~(bp - 1)
    gfns = range(start >> 12, (start + bp) >> 12)
    if slot_base_gpa is None:
        return list(gfns)
    lo, hi = slot_base_gpa >> 12, (slot_base_gpa + slot_size) >> 12
    return [g - lo for g in gfns if lo <= g < hi]


def expect_errno(err: int, fn, *args, **kwargs) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, (
        f"expected errno {_errno.errorcode.get(err, err)}, got {info.value}")
    return info.value


def state(vm, gfns=()) -> tuple:
    """What a failed call must leave unchanged: every present leaf, and the attributes of
    ``gfns``."""
    return (tuple(vm.mappings()), tuple(vm.get_memory_attributes(g) for g in gfns))


def expect_errno_unchanged(vm, err: int, fn, *args, gfns=(), **kwargs) -> KvmError:
    before = state(vm, gfns)
    e = expect_errno(err, fn, *args, **kwargs)
    assert state(vm, gfns) == before, "a failed call changed the VM's state"
    return e


def expect_memory_fault(page: int, fn, *args, gpa: int, exit_private: bool, err: int = EFAULT,
                        **kwargs) -> MemoryFaultExit:
    """KVM_EXIT_MEMORY_FAULT for the base page (``page`` bytes) at ``gpa``: flags exactly
    PRIVATE or 0, gpa the page's gpa, size PAGE_SIZE (kvm_mmu_prepare_memory_fault_exit),
    KVM_RUN's errno ``err``."""
    with pytest.raises(MemoryFaultExit) as info:
        fn(*args, **kwargs)
    e = info.value
    assert (e.flags, e.gpa, e.size, e.errno) == (
        KVM_MEMORY_EXIT_FLAG_PRIVATE if exit_private else 0, gpa & ~(page - 1), page, err)
    return e


def expect_error_pfn(vm, fn, *args, gpa: int, **kwargs) -> None:
    """A fault whose hva gives no page (KVM_PFN_ERR_FAULT): KVM_EXIT_MEMORY_FAULT (flags 0, the
    base page, EFAULT) where the arch reports it so (x86 kvm_handle_error_pfn,
    ``ArchInfo.error_pfn_memory_fault``), else KVM_RUN's -EFAULT alone (arm64, ppc, riscv)."""
    if vm.arch_info.error_pfn_memory_fault:
        expect_memory_fault(vm.page_size, fn, *args, gpa=gpa, exit_private=False, **kwargs)
    else:
        expect_errno(_errno.EFAULT, fn, *args, **kwargs)


def expect_mmio(fn, gpa: int, length: int, data: bytes | None, *args, **kwargs) -> MmioExit:
    """KVM_EXIT_MMIO with exactly these fields (a read carries no data)."""
    with pytest.raises(MmioExit) as info:
        fn(*args, **kwargs)
    e = info.value
    assert (e.phys_addr, e.length, e.is_write, e.data) == (gpa, length, data is not None, data)
    return e


def leaf(vm, gpa: int, private: bool = False):
    return vm.lookup(gpa, private=private) if private else vm.lookup(gpa)


def covers(m, gpa: int) -> bool:
    return m is not None and m.gfn <= gpa >> 12 < m.gfn + (m.size >> 12)


def leaves_in(vm, gpa: int, size: int) -> list:
    lo, hi = gpa >> 12, (gpa + size) >> 12
    return [m for m in vm.mappings() if m.gfn < hi and m.gfn + (m.size >> 12) > lo]


def leaves_outside(vm, gpa: int, size: int) -> list:
    lo, hi = gpa >> 12, (gpa + size) >> 12
    return [m for m in vm.mappings() if not (m.gfn < hi and m.gfn + (m.size >> 12) > lo)]


def step_until(steps, point: str) -> None:
    """Drive a flow (``vcpu.step_access``, ``vm.steps.*``) until it stops at race point
    ``point`` ("pf_seq_snapshot": mmu_invalidate_seq read; "pf_lock_wait": pfn resolved,
    MMU lock not taken)."""
    while next(steps) != point:
        pass


def finish(steps):
    """Drive an access generator to its end; returns what the access returns (or raises its
    exit)."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


class Guest:
    """A VM under test with its vCPU 0 (created on first use, so a test can still enable the
    dirty ring first) and helpers that back memslots with host memory."""

    def __init__(self, vm, host, arch):
        self.vm, self.host, self.arch = vm, host, arch

    @property
    def vcpu(self):
        for v in self.vm.vcpus:
            if v.id == 0:
                return v
        return self.vm.create_vcpu(0)

    def slot(self, slot: int, gpa: int, size: int, flags: int = 0, kind: str = "anon",
             prot: str = "rw", hva: int | None = None, **mmap_kw) -> int:
        """Map ``size`` bytes of host memory and make them memslot ``slot`` at ``gpa``;
        returns the hva."""
        if hva is None:
            hva = self.host.mmap(size, prot=prot, kind=kind, **mmap_kw)
        self.vm.set_user_memory_region(slot, gpa, size, hva, flags)
        return hva

    def gmem_flags(self) -> int:
        """Flags for a guest_memfd that any slot of this VM type accepts: without private
        memory a guest_memfd slot can only be gmem-only (arm64 refuses others in
        kvm_arch_prepare_memory_region), so it gets GUEST_MEMFD_FLAG_MMAP when the VM type
        offers it; with private memory, none (shared pages come from userspace_addr)."""
        caps = self.vm.capabilities
        if "private_mem" not in caps and "gmem_mmap" in caps:
            return GUEST_MEMFD_FLAG_MMAP
        return 0

    def new_gmem(self, size: int, flags: int | None = None, **kwargs):
        return self.vm.create_guest_memfd(size, self.gmem_flags() if flags is None else flags,
                                          **kwargs)

    def gmem_slot(self, slot: int, gpa: int, size: int, gmem_flags: int | None = None,
                  flags: int = 0, gmem=None, offset: int = 0):
        """A KVM_MEM_GUEST_MEMFD slot: a fresh guest_memfd of ``size`` (unless one is given)
        and anonymous shared backing; returns (gmem, hva)."""
        if gmem is None:
            gmem = self.new_gmem(size + offset, gmem_flags)
        hva = self.host.mmap(size, prot="rw", kind="anon")
        self.vm.set_user_memory_region(slot, gpa, size, hva, flags | KVM_MEM_GUEST_MEMFD,
                                       guest_memfd=gmem, guest_memfd_offset=offset)
        return gmem, hva

    def make_private(self, gpa: int, size: int) -> None:
        self.vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def make_shared(self, gpa: int, size: int) -> None:
        self.vm.set_memory_attributes(gpa, size, 0)

    # Guest accesses, with the private intent stated (never "as the VM type decides", so the
    # same test means the same thing on sw_protected, SNP and TDX).
    def read(self, gpa: int, n: int = 8, private: bool = False) -> bytes:
        return self.vcpu.read(gpa, n, private=private)

    def write(self, gpa: int, data: bytes, private: bool = False) -> None:
        self.vcpu.write(gpa, data, private=private)

    def fetch(self, gpa: int, private: bool = False):
        return self.vcpu.fetch(gpa, private=private)


__all__ = ["Guest", "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED"]


def snapshot(vm, max_gfns: int = 256) -> tuple:
    """What a failed call must leave unchanged, read without changing anything: the memslots
    of every address space with their dirty bitmaps (the set bits, as ``get_dirty_log`` would
    report them, read without the GET's clearing), the memory attributes of each slot's first
    ``max_gfns`` gfns, every present leaf of every address space, and the dirty rings' pending
    entries."""
    slots, attributes, leaves = [], [], []
    for as_id in range(vm.nr_address_spaces):
        for s in vm.memslots(as_id):
            bitmap = s.dirty_bitmap
            slots.append((s.slot_id, s.base_gfn, s.npages, s.userspace_addr, s.flags,
                          None if bitmap is None else tuple(bitmap.pages())))
            attributes.append(tuple(vm.get_memory_attributes(g) for g in
                                    range(s.base_gfn, s.base_gfn + min(s.npages, max_gfns))))
        leaves.append(tuple(vm.mappings(as_id=as_id)))
    rings = tuple(frozenset(v.dirty_ring.pending()) if v.dirty_ring is not None else None
                  for v in vm.vcpus)
    return tuple(slots), tuple(attributes), tuple(leaves), rings
