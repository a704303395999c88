"""The MMU notifier a VM registers with its host's mm (kvm_mmu_notifier_ops) and
kvm_mmu_unmap_gfn_range (virt/kvm/kvm_main.c; reference §2.4-2.5)."""

from __future__ import annotations

from types import GeneratorType
from typing import TYPE_CHECKING

import structlog

from .hva import kvm_handle_hva_range
from .pfncache import gfn_to_pfn_cache_invalidate_start
from .records import GfnRange

if TYPE_CHECKING:
    from .kvm import Kvm

logger = structlog.get_logger(__name__)


#: Race points of an invalidation (reference/races.md §2): waiting for kvm->mmu_lock in
#: invalidate_range_start and _end (only when a memslot overlaps the range), and the host's
#: window between start and end, where it changes its PTEs with no KVM lock held.
MN_START_LOCK_WAIT = "mn_start_lock_wait"
MN_HOST_WINDOW = "mn_host_window"
MN_END_LOCK_WAIT = "mn_end_lock_wait"
MN_AGE_LOCK_WAIT = "mn_age_lock_wait"
#: Aging where CONFIG_KVM_MMU_LOCKLESS_AGING (ArchInfo.mmu_lockless_aging): under kvm->srcu
#: only, before the walk, which faults holding mmu_lock for read and zaps may run beside.
MN_AGE_LOCKLESS = "mn_age_lockless"


def kvm_unmap_gfn_range(vm: Kvm, rng: GfnRange):
    """kvm_unmap_gfn_range: the arch zap of ``rng`` (under kvm->mmu_lock for write), counted
    and traced. A flow: the backend's zap may yield (TDX's BLOCK / TRACK / REMOVE). Returns
    whether the caller must flush the TLBs."""
    flush = vm.unmap_gfn_range(vm=vm, range=rng)
    if type(flush) is GeneratorType:
        flush = yield from flush
    flush = bool(flush)
    vm.stats["zap_ranges"] += 1
    if vm.events is not None:
        vm.trace("mmu.zap", slot=rng.slot.slot_id, gfn=rng.start, npages=rng.npages,
                 attr_filter=rng.attr_filter, flush=flush)
    return flush


def kvm_mmu_unmap_gfn_range(vm: Kvm, rng: GfnRange):
    """kvm_mmu_unmap_gfn_range: add the range to the invalidation, then the arch zap. The
    range is added when this is called; the zap is the flow returned (kvm_unmap_gfn_range's
    own generator, which the caller runs)."""
    vm.mmu_invalidate.range_add(rng.start, rng.end)
    return kvm_unmap_gfn_range(vm, rng)


class KvmMmuNotifier:
    """kvm_mmu_notifier_ops: what a VM registers with its host's mm. Each callback is a flow
    (a generator) that the host's operation runs inside its own."""

    def __init__(self, vm: Kvm):
        self.vm = vm

    def invalidate_range_start(self, start: int, end: int, blockable: bool = True):
        """kvm_mmu_notifier_invalidate_range_start: count the invalidation (a memslot swap
        now waits for it), then under kvm->mmu_lock begin it and zap every overlapping slot's
        shared alias, flushing before the lock is dropped."""
        vm = self.vm
        vm.mn_active_invalidate_count += 1
        # The pfn caches first, without mmu_lock: their refresh tests the count raised above,
        # not mmu_invalidate_in_progress, which is raised only under the lock.
        if vm.gpc_list:
            gfn_to_pfn_cache_invalidate_start(vm, start, end)
        _ret, found = yield from kvm_handle_hva_range(
            vm, start, end, kvm_mmu_unmap_gfn_range, on_lock=vm.mmu_invalidate_begin,
            flush_on_ret=True, may_block=blockable, point=MN_START_LOCK_WAIT)
        vm.stats["mn_invalidate_start"] += 1
        if vm.events is not None:
            vm.trace("notifier.invalidate_start", hva=start, length=end - start, slots=found)

    def invalidate_range_end(self, start: int, end: int):
        """kvm_mmu_notifier_invalidate_range_end: end the invalidation (seq++) under the lock,
        then uncount it."""
        vm = self.vm
        yield from kvm_handle_hva_range(vm, start, end, None, on_lock=vm.mmu_invalidate_end,
                                        point=MN_END_LOCK_WAIT)
        if vm.mn_active_invalidate_count <= 0:
            raise AssertionError("invalidate_range_end without a start")
        vm.mn_active_invalidate_count -= 1
        if vm.events is not None:
            vm.trace("notifier.invalidate_end", hva=start, length=end - start)

    def clear_flush_young(self, start: int, end: int):
        """Reclaim's clear_flush_young (kvm_mmu_notifier_clear_flush_young), asked per host
        mapping: one page or one huge page (``HostMemory.age``). It flushes the TLBs when a
        leaf was young, unless the arch selects CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG (x86,
        ``ArchInfo.elide_tlb_flush_if_young``): there a vCPU keeps its cached translation, and
        its accesses through it leave the leaf old, which costs reclaim only some precision."""
        young, _ = yield from self._age(start, end, _age_handler,
                                        not self.vm.arch_info.elide_tlb_flush_if_young)
        self.vm.stats["mn_clear_flush_young"] += 1
        return young

    def clear_young(self, start: int, end: int):
        """kvm_mmu_notifier_clear_young (page_idle, DAMON): as ``clear_flush_young``, no
        flush."""
        young, _ = yield from self._age(start, end, _age_handler, False)
        self.vm.stats["mn_clear_young"] += 1
        return young

    def test_young(self, start: int, end: int):
        """kvm_mmu_notifier_test_young (khugepaged, DAMON): whether any secondary mapping of
        the range is young, changing nothing and flushing nothing. Linux's notifier takes one
        address and looks at [address, address + 1), one page: the host passes that page."""
        young, _ = yield from self._age(start, end, _test_age_handler, False)
        return young

    def _age(self, start: int, end: int, handler, flush: bool):
        """kvm_age_hva_range: the walk under kvm->mmu_lock for write (``mn_age_lock_wait``),
        or, where the arch selects CONFIG_KVM_MMU_LOCKLESS_AGING (x86), under kvm->srcu only
        (``mn_age_lockless``): the backend's aging then runs beside faults that hold the lock
        for read, and beside zaps, updating one entry at a time atomically. The model updates
        each entry in one step, so aging never loses a compare-and-exchange; a fault whose
        compare-and-exchange meets an entry aging changed retries."""
        lockless = self.vm.arch_info.mmu_lockless_aging
        return kvm_handle_hva_range(self.vm, start, end, handler, flush_on_ret=flush,
                                    lockless=lockless,
                                    point=MN_AGE_LOCKLESS if lockless else MN_AGE_LOCK_WAIT)

    def release(self) -> None:
        """The mm is going away: kvm_flush_shadow_all (no vCPU runs any more)."""
        vm = self.vm
        with vm.mmu_lock:
            vm.hook.flush_shadow_all(vm=vm)


def _age_handler(vm: Kvm, rng: GfnRange) -> bool:
    return bool(vm.hook.age_gfn(vm=vm, range=rng))


def _test_age_handler(vm: Kvm, rng: GfnRange) -> bool:
    return bool(vm.hook.test_age_gfn(vm=vm, range=rng))
