"""The MMU notifier a VM registers with its host's mm (kvm_mmu_notifier_ops) and
kvm_mmu_unmap_gfn_range (virt/kvm/kvm_main.c; reference §2.4-2.5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from .hva import kvm_handle_hva_range
from .records import GfnRange

if TYPE_CHECKING:
    from .kvm import Kvm

logger = structlog.get_logger(__name__)


def kvm_mmu_unmap_gfn_range(vm: Kvm, rng: GfnRange) -> bool:
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

    def __init__(self, vm: Kvm):
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


def _unmap_handler(vm: Kvm, rng: GfnRange) -> bool:
    return kvm_mmu_unmap_gfn_range(vm, rng)


def _age_handler(vm: Kvm, rng: GfnRange) -> bool:
    return bool(vm.hook.age_gfn(vm=vm, range=rng))


def _test_age_handler(vm: Kvm, rng: GfnRange) -> bool:
    return bool(vm.hook.test_age_gfn(vm=vm, range=rng))
