"""gfn_to_pfn_cache (virt/kvm/pfncache.c): KVM's own kernel mapping of one guest page.

KVM writes some guest pages itself, outside any vCPU access: the kvmclock page, Xen's
shared_info, vcpu_info and runstate areas (x86 selects CONFIG_HAVE_KVM_PFNCACHE). A cache
holds the gpa, the memslot generation and hva it was translated through, and the pfn
(``khva`` in Linux) without a page reference: only MMU-notifier invalidation keeps the pfn
honest, so a refresh that races an invalidation must retry, and an invalidation marks the
cache invalid before the host changes its page table.

Locks: ``refresh_lock`` (a mutex) serialises refreshes, across the sleeping hva_to_pfn;
``gpc->lock`` (an rwlock taken with IRQs off) is never held across a race point in Linux, so
the model's stretches under it are atomic and it has no lock object. The race points of a
refresh: the mutex (``gpc_refresh_lock_wait``); after the seq snapshot with gpc->lock dropped
(``gpc_hva_to_pfn``), GUP's mmap lock (``mmap_lock_wait``); the pfn in hand, before gpc->lock
is taken again (``gpc_relock``); and, where ``mmu_notifier_retry_cache`` says an invalidation
is in progress, a wait for it to end (``gpc_retry_wait``): Linux loops, looking the pfn up
again each time, and every turn until the invalidation ends changes nothing, so the model
waits once (as a fault does at ``pf_retry_wait``).

The model follows upstream 6.18 (the range-based retry David Woodhouse proposed in 2024,
``gpc_invalidations_pending``, is not upstream). GPA-based caches only
(``kvm_gpc_activate_hva`` is not modelled); no guest_memfd-backed caches (upstream has none).

Arguments are checked as every public call's are (a wrong type is TypeError, an access that
does not fit in the page KvmError EINVAL, nothing changed); what Linux's functions return
(0, -EINVAL for an inactive cache, -EFAULT for a gpa without a slot or page) is returned.

The user's access (``read`` / ``write``) is the pattern every user writes
(kvm_setup_guest_pvclock, kvm_xen_update_runstate_guest): under gpc->lock for read, while
``kvm_gpc_check`` fails, drop it and ``kvm_gpc_refresh``; then copy through the mapping, and
for a write mark the page dirty.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import structlog

from .args import buffer, integer, u64
from .errors import KvmError
from .host import MMAP_LOCK_WAIT
from .locks import READ, WRITE, Mutex, Steps, steppable, stepping, wait_until
from .pfn import hva_to_pfn
from .uapi import KVM_PFN_ERR_FAULT, PAGE_SHIFT, is_error_noslot_pfn

if TYPE_CHECKING:
    from .kvm import Kvm

logger = structlog.get_logger(__name__)

GPC_REFRESH_LOCK_WAIT = "gpc_refresh_lock_wait"
GPC_HVA_TO_PFN = "gpc_hva_to_pfn"
GPC_RELOCK = "gpc_relock"
GPC_RETRY_WAIT = "gpc_retry_wait"
#: An hva no memslot gives (KVM_HVA_ERR_BAD).
KVM_HVA_ERR_BAD = -1


class GfnToPfnCache:
    """struct gfn_to_pfn_cache (kvm_gpc_init): inactive until ``activate``. While ``valid``,
    ``pfn`` is the host's 4 KiB frame at ``uhva`` (Linux keeps the PAGE_SIZE page's pfn and
    a kernel address at the offset: the same byte)."""

    flow_label = "gpc"

    def __init__(self, vm: Kvm):
        self.kvm = vm
        self.gpa: int | None = None             # INVALID_GPA
        self.uhva = KVM_HVA_ERR_BAD
        self.memslot = None
        self.generation = -1
        self.pfn = KVM_PFN_ERR_FAULT
        self.active = False
        self.valid = False
        self.refresh_lock = Mutex("gpc_refresh_lock")

    def __repr__(self) -> str:
        gpa = "none" if self.gpa is None else f"{self.gpa:#x}"
        return (f"<GfnToPfnCache gpa={gpa} pfn={self.pfn:#x} active={self.active} "
                f"valid={self.valid}>")

    @property
    def steps(self) -> Steps:
        """The flows started as steppable ``Flow`` objects (``gpc.steps.refresh(8)``)."""
        return Steps(self)

    # ------------------------------------------------------------------ the API

    def check(self, length: int) -> bool:
        """kvm_gpc_check (the caller holds gpc->lock for read): the cache is active, made
        under the current memslot generation, with an hva, the access fits in its page, and
        it is valid."""
        vm = self.kvm
        return (self.active and self.gpa is not None
                and self.generation == vm.memslot_generation()
                and self.uhva != KVM_HVA_ERR_BAD
                and _valid_len(vm, self.gpa, length)
                and self.valid)

    @steppable
    def activate(self, gpa: int, length: int):
        """kvm_gpc_activate: put an inactive cache on the VM's list (where the notifier finds
        it) before marking it active, so that no refresh maps a pfn the notifier cannot
        reach; then refresh it for ``gpa``. Returns 0 or -errno."""
        _check_len(self.kvm, u64("gpa", gpa), length)
        yield from self.refresh_lock.take(WRITE, GPC_REFRESH_LOCK_WAIT)
        try:
            if not self.active:
                if self.valid:
                    raise KvmError(errno.EIO, "kvm_gpc_activate: an inactive cache is valid "
                                              "(KVM_BUG_ON)")
                self.kvm.gpc_list.append(self)          # under kvm->gpc_lock
                self.active = True                      # under gpc->lock for write
            return (yield from self._refresh(gpa))
        finally:
            self.refresh_lock.unlock()

    @steppable
    def refresh(self, length: int):
        """kvm_gpc_refresh: serialised by refresh_lock, translate the cache's gpa again where
        the memslot generation or the hva changed, and look the pfn up again where the
        cache is not valid. Returns 0 or -errno (-EINVAL inactive, -EFAULT no slot or page)."""
        _check_len(self.kvm, self.gpa or 0, length)
        yield from self.refresh_lock.take(WRITE, GPC_REFRESH_LOCK_WAIT)
        try:
            if self.gpa is None:
                return -errno.EINVAL
            return (yield from self._refresh(self.gpa))
        finally:
            self.refresh_lock.unlock()

    @steppable
    def deactivate(self):
        """kvm_gpc_deactivate: inactive and invalid first (a refresh now fails), then off the
        VM's list, where the notifier stops looking at it. The gpa, hva and generation stay."""
        yield from self.refresh_lock.take(WRITE, GPC_REFRESH_LOCK_WAIT)
        try:
            if self.active:
                self.active = self.valid = False
                self.pfn = KVM_PFN_ERR_FAULT
                self.kvm.gpc_list.remove(self)
        finally:
            self.refresh_lock.unlock()

    @steppable
    def read(self, length: int):
        """A user's read of ``length`` bytes at the cache's gpa through its mapping, refreshing
        it while ``check`` fails. Returns the bytes, or -errno from a failed refresh."""
        _check_len(self.kvm, self.gpa or 0, length)
        while not self.check(length):
            r = yield from self.refresh.flow(length)
            if r:
                return r
        return _copy(self.kvm.host, self.pfn, self.uhva, length)

    @steppable
    def write(self, data: bytes):
        """A user's write through the mapping (kvm_setup_guest_pvclock's pattern): refresh
        while ``check`` fails, copy, mark the page dirty in the cache's memslot. Returns 0 or
        -errno from a failed refresh."""
        data = buffer("data", data)
        _check_len(self.kvm, self.gpa or 0, len(data), "data")
        while not self.check(len(data)):
            r = yield from self.refresh.flow(len(data))
            if r:
                return r
        vm = self.kvm
        _copy(vm.host, self.pfn, self.uhva, len(data), data)
        # mark_page_dirty_in_slot(gpa >> PAGE_SHIFT): every 4 KiB gfn of the base page.
        first = (self.gpa & -vm.page_size) >> PAGE_SHIFT
        for gfn in range(first, first + (vm.page_size >> PAGE_SHIFT)):
            vm.mark_page_dirty_in_slot(self.memslot, gfn)
        return 0

    # ------------------------------------------------------------------ __kvm_gpc_refresh

    def _refresh(self, gpa: int):
        """__kvm_gpc_refresh with refresh_lock held; its first part under gpc->lock."""
        if not self.active:
            return -errno.EINVAL
        vm = self.kvm
        mask = vm.page_size - 1
        old_uhva = self.uhva & ~mask if self.uhva != KVM_HVA_ERR_BAD else None
        hva_change = False
        generation = vm.memslot_generation()
        if self.gpa != gpa or self.generation != generation or self.uhva == KVM_HVA_ERR_BAD:
            gfn = gpa >> PAGE_SHIFT
            self.gpa, self.generation = gpa, generation
            self.memslot = vm.gfn_to_memslot(gfn)
            self.uhva = (KVM_HVA_ERR_BAD if self.memslot is None
                         else self.memslot.gfn_to_hva(gfn) + (gpa & 0xFFF))
            if self.uhva == KVM_HVA_ERR_BAD:
                return self._failed(-errno.EFAULT)
            hva_change = self.uhva & ~mask != old_uhva
        if self.valid and not hva_change:
            return 0
        r = yield from hva_to_pfn_retry(self)
        return self._failed(r) if r else 0

    def _failed(self, ret: int) -> int:
        """A failed refresh leaves the cache invalid with no pfn (the gpa, hva and generation
        may still be good)."""
        self.valid = False
        self.pfn = KVM_PFN_ERR_FAULT
        return ret


def _valid_len(vm: Kvm, gpa: int, length: int) -> bool:
    """kvm_gpc_is_valid_len: the access fits in the (PAGE_SIZE) page at ``gpa``."""
    return length >= 0 and (gpa & (vm.page_size - 1)) + length <= vm.page_size


def _check_len(vm: Kvm, gpa: int, length, name: str = "length") -> None:
    """The argument check of every call: an access of 1 byte or more that fits in the page
    (kvm_gpc_is_valid_len's -EINVAL, raised here as the bad input it is)."""
    if name == "length":
        integer(name, length)
    if length <= 0 or not _valid_len(vm, gpa, length):
        raise KvmError(errno.EINVAL, f"{name}: {length} bytes at gpa {gpa:#x} do not fit in "
                                     f"its {vm.page_size:#x}-byte page")


def _copy(host, pfn: int, hva: int, n: int, data: bytes | None = None):
    """Read (or write ``data``) ``n`` bytes at ``hva``'s frame ``pfn`` through the cache's
    kernel mapping: the frames of one host page are consecutive."""
    out, off = [], hva & 0xFFF
    while n:
        chunk = min(n, 4096 - off)
        if data is None:
            out.append(host.read_frame(pfn, off, chunk))
        else:
            host.write_frame(pfn, off, data[:chunk])
            data = data[chunk:]
        pfn, off, n = pfn + 1, 0, n - chunk
    return b"".join(out) if data is None else None


def mmu_notifier_retry_cache(vm: Kvm, mmu_seq: int) -> bool:
    """Whether the pfn just looked up may be stale: an MMU notifier is between its start and
    end (mn_active_invalidate_count, raised before the caches are invalidated, where
    mmu_invalidate_in_progress is raised only later, under mmu_lock: c496097d2c0b), or one
    ended since the snapshot (mmu_invalidate_seq)."""
    if vm.mn_active_invalidate_count:
        return True
    return vm.mmu_invalidate.seq != mmu_seq


def hva_to_pfn_retry(gpc: GfnToPfnCache):
    """hva_to_pfn_retry, entered and left with gpc->lock held for write (the model's stretches
    between the points): invalid while the lock is dropped; the seq snapshot, then a writable
    hva_to_pfn under the mmap lock (a COW break first, as GUP for write does); the lock again,
    and the lookup again while ``mmu_notifier_retry_cache`` says so. Returns 0 or -EFAULT.
    The pfn is kept without a page reference (kvm_release_page_unused)."""
    vm = gpc.kvm
    gpc.valid = False
    while True:
        mmu_seq = vm.mmu_invalidate.seq
        if stepping():
            yield GPC_HVA_TO_PFN
        pfn = yield from _hva_to_pfn_writable(vm, gpc.uhva)
        if is_error_noslot_pfn(pfn):
            return -errno.EFAULT
        if stepping():
            yield GPC_RELOCK
        if gpc.valid:
            # WARN_ON_ONCE: another refresh completed meanwhile (refresh_lock prevents it).
            logger.warning("gpc.valid_during_refresh", gpa=gpc.gpa)
        if not mmu_notifier_retry_cache(vm, mmu_seq):
            break
        vm.stats["gpc_refresh_retry"] += 1
        if vm.mn_active_invalidate_count:
            yield from wait_until(lambda: not vm.mn_active_invalidate_count,
                                  "the MMU-notifier invalidations in progress to end",
                                  GPC_RETRY_WAIT)
    gpc.valid = True
    gpc.pfn = pfn
    return 0


def _hva_to_pfn_writable(vm: Kvm, hva: int):
    """hva_to_pfn(uhva, write): get_user_pages for write under mm->mmap_lock for read,
    waiting for it at ``mmap_lock_wait``; the frame at ``hva``, or a KVM_PFN_ERR_*."""
    host = vm.host
    lock = host.mmap_lock
    if not lock.try_lock(READ):
        yield from lock.read_lock(MMAP_LOCK_WAIT)
    try:
        cow = host.wp_fault(hva)
        if cow is not None:
            yield from cow
        pfn, _writable = hva_to_pfn(vm, hva, True, True)
    finally:
        lock.read_unlock()
    return pfn


def gfn_to_pfn_cache_invalidate_start(vm: Kvm, start: int, end: int) -> None:
    """The MMU notifier's start hook for the caches, run after mn_active_invalidate_count is
    raised and before kvm->mmu_lock is taken: every valid cache whose hva is in
    ``[start, end)`` becomes invalid (a look under gpc->lock for read, then again for
    write: one stretch in the model)."""
    for gpc in vm.gpc_list:
        if gpc.valid and not is_error_noslot_pfn(gpc.pfn) and start <= gpc.uhva < end:
            gpc.valid = False
            vm.stats["gpc_invalidate"] += 1
