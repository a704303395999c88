"""FlatBackend: the simplest correct backend.

Leaves live in a sorted map (gfn -> leaf), 4 KiB, 2 MiB or 1 GiB, with no hardware format. It
is what the core's own tests run on, the oracle of the conformance state machine, and the
example to read before writing a real backend. It is not an entry point: use
``VM(arch=FlatBackend)`` or ``--arch kvmcore.testing:FlatBackend``.

Its policies are Linux's where architectures agree, and arm64's where they differ:
a read fault maps writable when the host allows it, except in a dirty-logged slot, where read
faults map read-only and the first write adds W through ``relax_perms`` and logs the page;
enabling logging write-protects the slot; the private/shared filter is ignored (one table,
like x86 VMs without TDX's mirror root). The ``page_size`` option (4096, 16384 or 65536, the
host's PAGE_SIZE; default: the host's) sets the base leaf, so the suite can run the core at
every base page without a hardware format.
"""

from __future__ import annotations

import errno

import attrs
from sortedcontainers import SortedDict

from . import hookimpl
from .arch import ArchInfo, Mapping
from .errors import KvmError
from .radix import WriteProtectDirtyLog, mapping_size
from .records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Translation, Violation
from .uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    PAGE_SHIFT,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    SZ_1G,
    SZ_2M,
    SZ_4K,
)

_COMMON = frozenset({"readonly_mem", "dirty_log", "manual_dirty_protect", "initially_set",
                     "dirty_ring", "hugepage_2m", "hugepage_1g", "relax_perms", "pre_fault",
                     "aging", "memory_attributes", "gmem", "gmem_mmap", "pfncache"})


@attrs.define(slots=True, eq=False)
class Leaf:
    gfn: int
    size: int
    pfn: int
    writable: bool
    executable: bool
    private: bool
    young: bool
    dirty: bool

    @property
    def end(self) -> int:
        return self.gfn + (self.size >> PAGE_SHIFT)


class FlatBackend(WriteProtectDirtyLog):
    """A backend with no page-table format: one sorted map of leaves per address space."""

    arch_info = ArchInfo(
        name="flat",
        page_sizes=(SZ_4K, SZ_2M, SZ_1G),
        levels=1,
        vm_types={"default": _COMMON, "sw_protected": _COMMON | {"private_mem"}},
        nr_address_spaces=2,
        description="reference backend: leaves in a sorted map, no hardware format",
        base_page_option="page_size",
    )

    def __init__(self, vm_type: str = "default", page_size: int = SZ_4K, **options):
        if options:
            raise KvmError(errno.EINVAL, f"flat backend takes only page_size: "
                                         f"{sorted(options)}")
        self.vm_type = vm_type
        self.base = page_size
        if page_size != SZ_4K:
            self.arch_info = attrs.evolve(self.arch_info, page_sizes=(page_size, SZ_2M, SZ_1G))
        self.roots: list[SortedDict] = []

    # ------------------------------------------------------------------ helpers

    def _find(self, root: SortedDict, gfn: int) -> Leaf | None:
        idx = root.bisect_right(gfn) - 1
        if idx < 0:
            return None
        leaf = root.peekitem(idx)[1]
        return leaf if gfn < leaf.end else None

    def _overlapping(self, root: SortedDict, start: int, end: int) -> list[Leaf]:
        out = []
        idx = max(root.bisect_right(start) - 1, 0)
        keys = root.keys()
        while idx < len(keys):
            leaf = root[keys[idx]]
            if leaf.gfn >= end:
                break
            if leaf.end > start:
                out.append(leaf)
            idx += 1
        return out

    def _is_private(self, vm, gfn: int, access_private) -> bool:
        if self.vm_type != "sw_protected":
            return False
        return vm.kvm_mem_is_private(gfn)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def init_vm(self, vm):
        self.roots = [SortedDict() for _ in range(vm.nr_address_spaces)]
        # No tables: leaves of different 1 GiB ranges (the largest leaf) never meet.
        vm.root_entry_shift = 30

    @hookimpl
    def set_vcpu_events(self, vm, vcpu, smm):
        """Address space 1 as x86's SMM: ``smm`` switches the vCPU to it and back."""
        if smm is not None:
            vcpu.arch["smm"] = smm
        return True

    @hookimpl
    def vcpu_memslots_id(self, vm, vcpu):
        return 1 if vcpu.arch.get("smm") else 0

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        gfn = gpa >> PAGE_SHIFT
        private = self._is_private(vm, gfn, access.private)
        leaf = self._find(self.roots[vcpu.as_id], gfn)
        if leaf is None:
            return Violation(NOT_PRESENT, gfn, private)
        if not leaf.young:
            return Violation(ACCESS_FLAG, gfn, private, 0, leaf.size)
        if (access.write and not leaf.writable) or (access.exec and not leaf.executable):
            return Violation(PERMISSION, gfn, private, 0, leaf.size)
        if access.write:
            leaf.dirty = True
        return Translation(gfn, leaf.pfn + gfn - leaf.gfn, leaf.size, True, leaf.writable,
                           leaf.executable, leaf.dirty, leaf.private)

    @hookimpl
    def fast_page_fault(self, vm, fault):
        """The access-flag fault of an aged leaf: set young in place (arm64 mkyoung)."""
        if fault.kind != ACCESS_FLAG:
            return None
        leaf = self._find(self.roots[fault.as_id], fault.gfn)
        if leaf is None:
            return None
        leaf.young = True
        return RET_PF_FIXED

    @hookimpl
    def map_leaf(self, vm, fault):
        root = self.roots[fault.as_id]
        slot = fault.slot
        logging = self.logging(slot)
        size = mapping_size(vm, fault, self.arch_info.page_sizes, logging, pfnmap_blocks=True)
        npages = size >> PAGE_SHIFT
        start = fault.gfn & ~(npages - 1)
        pfn = fault.pfn - (fault.gfn - start)
        writable = self.writable(fault)
        existing = self._overlapping(root, start, start + npages)
        if (len(existing) == 1 and existing[0].gfn == start and existing[0].size == size
                and existing[0].pfn == pfn):
            leaf = existing[0]
            if (fault.write and not leaf.writable) or (fault.exec and not leaf.executable):
                leaf.writable |= writable
            else:
                return RET_PF_SPURIOUS
        else:
            for old in existing:
                del root[old.gfn]
                if old.size > size:         # as arm64's map walk: the rest refaults lazily
                    vm.stats["fault_block_unmapped"] += 1
            if existing:
                lo = min(old.gfn for old in existing)
                vm.flush_remote_tlbs_range(lo, max(old.end for old in existing) - lo)
            leaf = Leaf(start, size, pfn, writable, True, fault.is_private,
                        not fault.prefetch, fault.write and writable)
            root[start] = leaf
        if leaf.writable and logging:
            leaf.dirty = True
            for gfn in range(leaf.gfn, leaf.end):
                vm.mark_page_dirty_in_slot(slot, gfn)
        return RET_PF_FIXED

    @hookimpl
    def relax_perms(self, vm, fault):
        leaf = self._find(self.roots[fault.as_id], fault.gfn)
        if leaf is None or leaf.size != fault.fault_size:
            return None
        if fault.write:
            if not fault.map_writable:
                return None
            leaf.writable = True
            if fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                if leaf.size != self.base:
                    return None
                for gfn in range(leaf.gfn, leaf.end):
                    vm.mark_page_dirty_in_slot(fault.slot, gfn)
        if fault.exec:
            leaf.executable = True
        return RET_PF_FIXED

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        root = self.roots[range.slot.as_id]
        zapped = self._overlapping(root, range.start, range.end)
        for leaf in zapped:
            del root[leaf.gfn]
        vm.stats["leaves_zapped"] += len(zapped)
        return bool(zapped)

    @hookimpl
    def flush_shadow_all(self, vm):
        for root in self.roots:
            root.clear()
        return True

    @hookimpl
    def age_gfn(self, vm, range):
        young = False
        for leaf in self._overlapping(self.roots[range.slot.as_id], range.start, range.end):
            if leaf.young:
                leaf.young = False
                young = True
        return young

    @hookimpl
    def test_age_gfn(self, vm, range):
        return any(leaf.young for leaf in self._overlapping(self.roots[range.slot.as_id],
                                                             range.start, range.end))

    def wrprotect_gfns(self, vm, as_id, start, end) -> bool:
        leaves = self._overlapping(self.roots[as_id], start, end)
        for leaf in leaves:
            leaf.writable = False
        return bool(leaves)

    def wrprotect_mask(self, vm, slot, base_gfn, mask) -> bool:
        while mask:
            low = mask & -mask
            leaf = self._find(self.roots[slot.as_id], base_gfn + low.bit_length() - 1)
            if leaf is not None:
                leaf.writable = leaf.dirty = False
            mask ^= low
        return True

    @hookimpl
    def leaves(self, vm, start, end, as_id):
        for leaf in self._overlapping(self.roots[as_id], start, end):
            yield Mapping(leaf.gfn, leaf.size, leaf.pfn, True, leaf.writable,
                          leaf.executable, leaf.private, leaf.young, leaf.dirty, 0, 0)

    @hookimpl
    def check_invariants(self, vm):
        problems = []
        for root in self.roots:
            prev_end = 0
            for gfn, leaf in root.items():
                if gfn != leaf.gfn:
                    problems.append(f"flat: leaf keyed {gfn:#x} says gfn {leaf.gfn:#x}")
                if leaf.gfn < prev_end:
                    problems.append(f"flat: leaves overlap at gfn {leaf.gfn:#x}")
                if leaf.gfn % (leaf.size >> PAGE_SHIFT) or leaf.pfn % (leaf.size >> PAGE_SHIFT):
                    problems.append(f"flat: leaf at gfn {leaf.gfn:#x} is not aligned to its "
                                    f"size {leaf.size:#x}")
                prev_end = leaf.end
        return problems


class VmFactory:
    """``make(**options)``: VMs of one backend on one host; ``close()`` checks each one's
    invariants and closes it. The ``make_vm`` fixture of a backend's own tests::

        @pytest.fixture
        def make_vm(host):
            make = VmFactory("riscv_gstage", host)
            yield make
            make.close()
    """

    def __init__(self, arch, host):
        self.arch, self.host, self.vms = arch, host, []

    def __call__(self, **options):
        from .vm import VM

        vm = VM(arch=self.arch, host=self.host, **options)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in self.vms:
            vm.check_invariants()
            vm.close()

