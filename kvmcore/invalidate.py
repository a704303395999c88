"""MMU invalidation bookkeeping (struct kvm's mmu_invalidate_* fields and the retry checks,
include/linux/kvm_host.h; reference §2.3)."""

from __future__ import annotations

INVALID_GPA = (1 << 64) - 1


class InvalidateState:
    """The VM's invalidation fields (struct kvm): seq, in_progress and the range union."""

    __slots__ = ("seq", "in_progress", "range_start", "range_end", "fault_retry_gfn",
                 "fault_retry")


    def __init__(self, fault_retry_gfn: bool = True):
        self.seq = 0
        self.in_progress = 0
        self.range_start = INVALID_GPA
        self.range_end = INVALID_GPA
        #: ArchInfo.fault_retry_gfn: whether only an invalidation of the fault's own gfn
        #: makes it retry (x86 mmu_invalidate_retry_gfn) or any (arm64, ppc
        #: mmu_invalidate_retry). ``fault_retry`` is the check, ``(seq, gfn) -> stale``,
        #: chosen once per VM.
        self.fault_retry_gfn = fault_retry_gfn
        self.fault_retry = self.retry_gfn if fault_retry_gfn else self._retry_any

    def begin(self) -> None:
        """kvm_mmu_invalidate_begin (MMU lock held)."""
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = self.range_end = INVALID_GPA

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

    def end(self) -> None:
        """kvm_mmu_invalidate_end: seq++ before in_progress--, so a fault that saw the old
        seq is stale from here on."""
        if self.range_start == INVALID_GPA:
            raise AssertionError("kvm_mmu_invalidate_end with no range added since begin")
        self.seq += 1
        self.in_progress -= 1
        if self.in_progress < 0:
            raise AssertionError("KVM_BUG_ON: mmu_invalidate_in_progress < 0")

    def seq_bump(self) -> None:
        """mmu_invalidate_seq++ alone (ppc kvmppc_radix_flush_memslot): every snapshot taken
        before it is stale; no invalidation begins or ends."""
        self.seq += 1

    def retry(self, seq: int) -> bool:
        """mmu_invalidate_retry."""
        return bool(self.in_progress) or self.seq != seq

    def in_progress_covers(self, gfn: int) -> bool:
        """An invalidation in progress makes a fault on ``gfn`` retry (this gfn's for x86,
        any for arm64 and ppc): the fault can only retry until it ends."""
        if not self.in_progress:
            return False
        if not self.fault_retry_gfn:
            return True
        if self.range_start == INVALID_GPA or self.range_end == INVALID_GPA:
            return True
        return self.range_start <= gfn < self.range_end

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
