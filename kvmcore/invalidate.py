"""MMU invalidation bookkeeping and the MMU-notifier callbacks (reference §2.3-2.5).

``mmu_invalidate_seq`` / ``mmu_invalidate_in_progress`` / the accumulated range live on the VM;
this module holds the operations on them and the notifier a VM registers with its host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from .hva import GfnRange, kvm_handle_hva_range

if TYPE_CHECKING:
    from .vm import VM

logger = structlog.get_logger(__name__)

INVALID_GPA = (1 << 64) - 1


class InvalidateState:
    """The VM's invalidation fields (struct kvm): seq, in_progress and the range union."""

    __slots__ = ("seq", "in_progress", "range_start", "range_end", "ranges_added",
                 "fault_retry")

    def __init__(self, fault_retry_gfn: bool = True):
        self.seq = 0
        self.in_progress = 0
        self.range_start = INVALID_GPA
        self.range_end = INVALID_GPA
        self.ranges_added = 0
        #: The fault path's check, ``(seq, gfn) -> stale``, chosen once per VM from
        #: ArchInfo.fault_retry_gfn: x86's retry_gfn, or arm64/ppc's retry (gfn ignored).
        self.fault_retry = self.retry_gfn if fault_retry_gfn else self._retry_any

    def begin(self) -> None:
        """kvm_mmu_invalidate_begin (MMU lock held)."""
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = self.range_end = INVALID_GPA
            self.ranges_added = 0

    def range_add(self, start: int, end: int) -> None:
        """kvm_mmu_invalidate_range_add: the union only grows until every overlapping
        invalidation has ended."""
        if not self.in_progress:
            raise AssertionError("kvm_mmu_invalidate_range_add outside an invalidation")
        if self.range_start == INVALID_GPA:
            self.range_start, self.range_end = start, end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)
        self.ranges_added += 1

    def end(self) -> None:
        """kvm_mmu_invalidate_end: seq++ before in_progress--, so a fault that saw the old
        seq is stale from here on."""
        if self.range_start == INVALID_GPA:
            raise AssertionError("kvm_mmu_invalidate_end with no range added since begin")
        self.seq += 1
        self.in_progress -= 1
        if self.in_progress < 0:
            raise AssertionError("KVM_BUG_ON: mmu_invalidate_in_progress < 0")

    def retry(self, seq: int) -> bool:
        """mmu_invalidate_retry."""
        return bool(self.in_progress) or self.seq != seq

    def _retry_any(self, seq: int, _gfn: int) -> bool:
        """mmu_invalidate_retry in the shape of retry_gfn, for fault_retry."""
        return bool(self.in_progress) or self.seq != seq

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn (MMU lock held): an invalidation in progress of *this*
        gfn, or any that completed since the snapshot."""
        if self.in_progress:
            if self.range_start == INVALID_GPA or self.range_end == INVALID_GPA:
                return True
            if self.range_start <= gfn < self.range_end:
                return True
        return self.seq != seq


def kvm_mmu_unmap_gfn_range(vm: VM, rng: GfnRange) -> bool:
    """kvm_mmu_unmap_gfn_range: add the range to the invalidation, then the arch zap."""
    vm.mmu_invalidate.range_add(rng.start, rng.end)
    flush = bool(vm.hook.unmap_gfn_range(vm=vm, range=rng))
    vm.stats["zap_ranges"] += 1
    if vm.events is not None:
        vm.trace("mmu.zap", slot=rng.slot.slot_id, gfn=rng.start, npages=rng.npages,
                 attr_filter=rng.attr_filter, flush=flush)
    return flush


class KvmMmuNotifier:
    """kvm_mmu_notifier_ops: what a VM registers with its host's mm."""

    def __init__(self, vm: VM):
        self.vm = vm

    def invalidate_range_start(self, start: int, end: int, blockable: bool = True) -> None:
        vm = self.vm
        vm.mn_active_invalidate_count += 1
        _ret, found = kvm_handle_hva_range(vm, start, end, _unmap_handler,
                                           on_lock=vm.mmu_invalidate_begin,
                                           flush_on_ret=True, may_block=blockable)
        vm.stats["mn_invalidate_start"] += 1
        vm.trace("notifier.invalidate_start", hva=start, length=end - start, slots=found)

    def invalidate_range_end(self, start: int, end: int) -> None:
        vm = self.vm
        kvm_handle_hva_range(vm, start, end, None, on_lock=vm.mmu_invalidate_end)
        if vm.mn_active_invalidate_count <= 0:
            raise AssertionError("invalidate_range_end without a start")
        vm.mn_active_invalidate_count -= 1
        vm.trace("notifier.invalidate_end", hva=start, length=end - start)

    def clear_flush_young(self, start: int, end: int) -> bool:
        """Reclaim's clear_flush_young. Linux flushes when a leaf was young unless
        CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG (x86 sets it); the model flushes, which only makes
        the next access re-walk."""
        young, _ = kvm_handle_hva_range(self.vm, start, end, _age_handler, flush_on_ret=True)
        self.vm.stats["mn_clear_flush_young"] += 1
        return young

    def clear_young(self, start: int, end: int) -> bool:
        young, _ = kvm_handle_hva_range(self.vm, start, end, _age_handler)
        self.vm.stats["mn_clear_young"] += 1
        return young

    def test_young(self, start: int, end: int) -> bool:
        young, _ = kvm_handle_hva_range(self.vm, start, start + 1, _test_age_handler)
        return young

    def release(self) -> None:
        """The mm is going away: kvm_flush_shadow_all."""
        vm = self.vm
        with vm.mmu_lock:
            vm.hook.flush_shadow_all(vm=vm)


def _unmap_handler(vm: VM, rng: GfnRange) -> bool:
    return kvm_mmu_unmap_gfn_range(vm, rng)


def _age_handler(vm: VM, rng: GfnRange) -> bool:
    return bool(vm.hook.age_gfn(vm=vm, range=rng))


def _test_age_handler(vm: VM, rng: GfnRange) -> bool:
    return bool(vm.hook.test_age_gfn(vm=vm, range=rng))
