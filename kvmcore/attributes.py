"""Memory attributes (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, reference §4).

Linux stores one xarray value per gfn; the model stores maximal runs ``[start, end) -> value``
of non-zero values in a sorted map, so converting 1 TiB is one entry and every query is a
bisection. Zero is "no entry", as in Linux.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from .errors import KvmError
from .hva import GfnRange
from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT

if TYPE_CHECKING:
    from .vm import VM

U64 = 1 << 64


class AttributeRanges:
    """gfn -> attribute bits as non-overlapping, non-adjacent-equal runs."""

    def __init__(self):
        self._runs = SortedDict()  # start -> (end, value)

    def __len__(self) -> int:
        return len(self._runs)

    def __bool__(self) -> bool:
        return bool(self._runs)

    def get(self, gfn: int) -> int:
        runs = self._runs
        idx = runs.bisect_right(gfn) - 1
        if idx < 0:
            return 0
        _start, (end, value) = runs.peekitem(idx)
        return value if gfn < end else 0

    def runs(self, start: int = 0, end: int = U64) -> Iterator[tuple[int, int, int]]:
        """Runs intersecting ``[start, end)``, clipped to it: ``(start, end, value)``."""
        runs = self._runs
        idx = max(runs.bisect_right(start) - 1, 0)
        keys = runs.keys()
        while idx < len(keys):
            s = keys[idx]
            if s >= end:
                break
            e, v = runs[s]
            if e > start:
                yield max(s, start), min(e, end), v
            idx += 1

    def has(self, start: int, end: int, mask: int, attrs_: int) -> bool:
        """kvm_range_has_memory_attributes with ``mask`` already limited to what is
        supported."""
        if attrs_ & ~mask:
            return False
        if end - start == 1:
            return (self.get(start) & mask) == attrs_
        if not attrs_:
            return not any(v & mask for _s, _e, v in self.runs(start, end))
        cursor = start
        for s, e, v in self.runs(start, end):
            if s != cursor or (v & mask) != attrs_:
                return False
            cursor = e
        return cursor == end

    def set(self, start: int, end: int, value: int) -> None:
        runs = self._runs
        # Split the runs that straddle the edges, drop everything inside, merge neighbours.
        for s, _e, v in list(self.runs(start, end)):
            key = runs.keys()[runs.bisect_right(s) - 1]
            orig_e, _ = runs.pop(key)
            if key < start:
                runs[key] = (start, v)
            if orig_e > end:
                runs[end] = (orig_e, v)
        if value:
            new_s, new_e = start, end
            idx = runs.bisect_right(start) - 1
            if idx >= 0:
                ps, (pe, pv) = runs.peekitem(idx)
                if pe == start and pv == value:
                    del runs[ps]
                    new_s = ps
            nxt = runs.get(end)
            if nxt is not None and nxt[1] == value:
                del runs[end]
                new_e = nxt[0]
            runs[new_s] = (new_e, value)


def supported_mem_attributes(vm: VM) -> int:
    """kvm_supported_mem_attributes."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if "private_mem" in vm.capabilities else 0


def kvm_vm_ioctl_set_mem_attributes(vm: VM, address: int, size: int, attributes: int,
                                    flags: int) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES: validation in Linux's order, then
    kvm_vm_set_mem_attributes."""
    if "memory_attributes" not in vm.arch_capabilities:
        # Not built: kvm_vm_ioctl hands it to kvm_arch_vm_ioctl, whose default answers.
        raise KvmError(vm.arch_info.vm_ioctl_errno, f"set_memory_attributes: "
                       f"{vm.arch_info.name} has no KVM_SET_MEMORY_ATTRIBUTES")
    for name, value in (("address", address), ("size", size), ("attributes", attributes),
                        ("flags", flags)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < U64:
            raise KvmError(errno.EINVAL, f"{name}={value!r} is not a u64")
    if flags:
        raise KvmError(errno.EINVAL, f"flags={flags:#x} must be 0")
    supported = supported_mem_attributes(vm)
    if attributes & ~supported:
        raise KvmError(errno.EINVAL, f"attributes={attributes:#x}: unsupported bits "
                                     f"{attributes & ~supported:#x} for this VM")
    if not size or address + size >= U64:
        raise KvmError(errno.EINVAL, f"size={size:#x}: zero, or address + size wraps")
    if address & (vm.page_size - 1) or size & (vm.page_size - 1):
        raise KvmError(errno.EINVAL, f"address={address:#x} or size={size:#x} is not "
                                     f"aligned to PAGE_SIZE {vm.page_size:#x}")
    kvm_vm_set_mem_attributes(vm, address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT,
                              attributes)


def kvm_vm_set_mem_attributes(vm: VM, start: int, end: int, attributes: int) -> None:
    """kvm_vm_set_mem_attributes: no-op check, pre_set per slot inside an invalidation (the
    handler adds the range, then calls the arch hook), store, post_set, end."""
    from .hva import kvm_handle_gfn_range

    if vm.range_has_memory_attributes(start, end, U64 - 1, attributes):
        return

    def pre_set(vm_, rng: GfnRange) -> bool:
        vm_.mmu_invalidate_range_add(rng.start, rng.end)
        return vm_.hook.pre_set_memory_attributes(vm=vm_, range=rng)

    def post_set(vm_, rng: GfnRange) -> bool:
        return vm_.hook.post_set_memory_attributes(vm=vm_, range=rng)

    kvm_handle_gfn_range(vm, start, end, pre_set, on_lock=vm.mmu_invalidate_begin,
                         flush_on_ret=True, may_block=True, arg=attributes)
    vm.attributes.set(start, end, attributes)
    kvm_handle_gfn_range(vm, start, end, post_set, on_lock=vm.mmu_invalidate_end,
                         flush_on_ret=False, may_block=True, arg=attributes)
    vm.stats["set_memory_attributes"] += 1
    vm.trace("attributes.set", gfn=start, npages=end - start, attributes=attributes)


def private_runs(vm: VM, start: int, end: int) -> Iterator[tuple[int, int]]:
    for s, e, v in vm.attributes.runs(start, end):
        if v & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            yield s, e
