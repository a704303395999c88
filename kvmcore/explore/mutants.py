"""The seed threads' bugs, as switchable deviations from Linux (``--mutant NAME``).

Each mutant is a context manager that changes one thing the flows do, for the duration of an
exploration; ``MUTANTS`` documents what each takes away. The explorer must find every one of
them in the built-in race scenarios, and must find nothing without them.

The core's mutants are here; a backend adds those of its own hardware (a TDX removal order, a
stage-2 walker's choice) under the entry-point group ``kvmcore.mutants``: name = the mutant's
name, value = a dict of the other ``Mutant`` fields (``seed``, ``what``, ``patch``,
``scenarios``, ``arch``; a backend module imports no tool), read once per process on first use
of ``MUTANTS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from unittest.mock import patch

import attrs

MUTANT_GROUP = "kvmcore.mutants"


@attrs.frozen
class Mutant:
    name: str
    seed: str
    what: str
    patch: object         # () -> context manager
    scenarios: tuple      # built-in race scenarios that must catch it
    #: The backend whose code it changes (None: the core's).
    arch: str | None = None


def _no_stale_check():
    from .. import fault

    return patch.object(fault, "is_page_fault_stale", lambda vm, f: False)


def _pfnmap_no_retry():
    """Seed 2: a VM_IO | VM_PFNMAP pfn (hva_to_pfn_remapped, no page reference to hold) used
    without the mmu_invalidate retry the other pages get."""
    from .. import fault

    real = fault.is_page_fault_stale
    return patch.object(fault, "is_page_fault_stale",
                    lambda vm, f: False if f.pfnmap else real(vm, f))


def _no_flush_on_zap():
    from .. import mmu_notifier

    real = mmu_notifier.kvm_unmap_gfn_range

    def no_flush(vm, rng):
        yield from real(vm, rng)
        return False

    return patch.object(mmu_notifier, "kvm_unmap_gfn_range", no_flush)


def _without_flush(module, name: str, flush: str = "flush_remote_tlbs_memslot"):
    """The flow ``module.name`` (the VM its first argument) with the VM's ``flush``
    (kvm_flush_remote_tlbs_memslot unless named) a no-op while it runs; other flows, which
    run while it is paused, still flush."""
    from ..locks import with_attribute

    real = getattr(module, name)

    def no_flush(vm, *args):
        return (yield from with_attribute(real(vm, *args), vm, flush, lambda *_args: None))

    return patch.object(module, name, no_flush)


def _dirty_clear_no_flush():
    from .. import dirty

    return _without_flush(dirty, "kvm_clear_dirty_log_protect")


def _ring_reset_no_flush():
    """KVM_RESET_DIRTY_RINGS without the kvm_flush_remote_tlbs that follows the re-protection
    of the reset entries (kvm_vm_ioctl_reset_dirty_pages)."""
    from .. import dirty

    return _without_flush(dirty, "reset_dirty_rings", "flush_remote_tlbs")


def _log_dirty_no_flush():
    """The memslot flush that follows the write protection (or the clearing of D bits) when
    dirty logging starts (kvm_arch_commit_memory_region), taken away."""
    from .. import set_memory_region

    return _without_flush(set_memory_region, "kvm_commit_memory_region")


def _not_waiting_at(owner, name: str, point: str):
    """``owner.name``, a flow that waits and takes its race point last, returning at once
    when that point is ``point``."""
    real = getattr(owner, name)

    def skip(*args):
        if args[-1] != point:
            return (yield from real(*args))
        return None

    return patch.object(owner, name, skip)


def _swap_without_mn_wait():
    """kvm_swap_active_memslots before 52ac8b358b0c ("KVM: Block memslot updates across
    range_start() and range_end()", 2021): a memslot update publishes its set while an
    MMU-notifier invalidation is between start and end, so the two may see different
    memslots and begin an invalidation they never end (or end one never begun)."""
    from .. import set_memory_region

    return _not_waiting_at(set_memory_region, "wait_until", set_memory_region.SLOT_SWAP_WAIT_MN)


def _swap_without_srcu_sync():
    """kvm_swap_active_memslots without synchronize_srcu_expedited: the update goes on to
    zap the old slot while faults that looked it up still run, and may install after the
    zap."""
    from .. import set_memory_region
    from ..locks import Srcu

    return _not_waiting_at(Srcu, "synchronize", set_memory_region.SLOT_SRCU_SYNC)


@contextlib.contextmanager
def _gmem_end_before_truncate():
    """kvm_gmem_punch_hole ending the invalidation before truncate_inode_pages_range: a fault
    that snapshots the new mmu_invalidate_seq and gets the folio before it is truncated
    installs a pfn that is freed next."""
    from ..gmem import GmemInode

    begin, end = GmemInode.invalidate_begin, GmemInode.invalidate_end

    def begin_and_end(self, start, stop):
        yield from begin(self, start, stop)
        yield from end(self, start, stop)

    def no_end(self, start, stop):
        return
        yield

    with patch.multiple(GmemInode, invalidate_begin=begin_and_end, invalidate_end=no_end):
        yield


@contextlib.contextmanager
def _notifier_without_invalidation():
    """Seed 3: the hva-range operator form used for the notifier's zap, which implies no
    mmu_invalidate_begin/end: a fault that raced the zap is not made stale."""
    from .. import mmu_notifier

    cls = mmu_notifier.KvmMmuNotifier
    start, end = cls.invalidate_range_start, cls.invalidate_range_end

    def start_without(self, s, e, blockable=True):
        vm = self.vm
        vm.mn_active_invalidate_count += 1
        yield from mmu_notifier.kvm_handle_hva_range(
            vm, s, e, mmu_notifier.kvm_unmap_gfn_range, flush_on_ret=True,
            point=mmu_notifier.MN_START_LOCK_WAIT)

    def end_without(self, s, e):
        self.vm.mn_active_invalidate_count -= 1
        return
        yield

    cls.invalidate_range_start, cls.invalidate_range_end = start_without, end_without
    try:
        yield
    finally:
        cls.invalidate_range_start, cls.invalidate_range_end = start, end


def _gpc_retry_in_progress():
    """hva_to_pfn_retry before c496097d2c0b ("KVM: Fix race between mmu_notifier
    invalidation and pfncache refresh", 2022): the retry tested mmu_invalidate_in_progress,
    which the notifier raises under mmu_lock only after it has invalidated the caches, so a
    refresh between the two keeps a pfn the host frees next."""
    from .. import pfncache

    def retry(vm, mmu_seq):
        return bool(vm.mmu_invalidate.in_progress) or vm.mmu_invalidate.seq != mmu_seq

    return patch.object(pfncache, "mmu_notifier_retry_cache", retry)


def _prefault_retries_invalid_slot():
    """kvm_mmu_faultin_pfn before 3ccbf6f47098 ("KVM: x86/mmu: Return -EAGAIN if userspace
    deletes/moves memslot during prefault", 6.18): a pre-fault on a slot being deleted or
    moved retries as a vCPU's fault does, and kvm_tdp_map_page loops on the retry holding
    kvm->srcu, which the update's synchronize_srcu waits for."""
    from .. import fault
    from ..uapi import RET_PF_RETRY

    return patch.object(fault, "kvm_faultin_invalid_slot", lambda f: RET_PF_RETRY)


@contextlib.contextmanager
def _gpc_refresh_inactive():
    """kvm_gpc_check and __kvm_gpc_refresh before ecbcf030b456 ("KVM: Reject attempts to
    consume or refresh inactive gfn_to_pfn_cache", 2022): neither tests ``active``. The
    refresh of an inactive cache runs as an active one's: the flag reads True for its
    length, which nothing else can see (deactivate and activate wait for the refresh_lock
    it holds; the mutated check ignores the flag; the notifier walks kvm->gpc_list)."""
    from ..pfncache import GfnToPfnCache

    check, refresh = GfnToPfnCache.check, GfnToPfnCache._refresh

    def check_inactive(self, length):
        was, self.active = self.active, True
        try:
            return check(self, length)
        finally:
            self.active = was

    def refresh_inactive(self, gpa):
        if self.active:
            return (yield from refresh(self, gpa))
        self.active = True
        try:
            return (yield from refresh(self, gpa))
        finally:
            self.active = False

    with patch.object(GfnToPfnCache, "check", check_inactive), \
            patch.object(GfnToPfnCache, "_refresh", refresh_inactive):
        yield


class _NoLock:
    """A refresh_lock that serialises nothing."""

    def take(self, mode, point):
        return
        yield

    def unlock(self) -> None:
        pass


@contextlib.contextmanager
def _gpc_refresh_unserialized():
    """kvm_gpc_refresh before 93984f19e7bc ("KVM: Fully serialize gfn=>pfn cache refresh via
    mutex", 2022): two refreshes interleave around their sleeping hva_to_pfn, and the one that
    finishes last stores its pfn under the other's gpa."""
    from ..pfncache import GfnToPfnCache

    init = GfnToPfnCache.__init__

    def unserialized(self, vm):
        init(self, vm)
        self.refresh_lock = _NoLock()

    with patch.object(GfnToPfnCache, "__init__", unserialized):
        yield


_CORE = {m.name: m for m in (
    Mutant("no_stale_check", "seed 1: private fault vs conversion",
           "the fault installs without is_page_fault_stale (mmu_invalidate_retry[_gfn])",
           _no_stale_check, ("private_fault_vs_conversion", "fault_vs_munmap",
                             "fault_vs_thp_collapse", "fault_vs_thp_split",
                             "private_fault_vs_gmem_release", "fault_vs_memory_failure",
                             "private_fault_vs_memory_failure")),
    Mutant("pfnmap_no_retry", "seed 2: a PFNMAP pfn racing an invalidation",
           "a VM_IO | VM_PFNMAP pfn is installed without the mmu_invalidate retry",
           _pfnmap_no_retry, ("pfnmap_fault_vs_munmap",)),
    Mutant("notifier_without_invalidation", "seed 3: the hva-range operator",
           "the MMU notifier zaps through the operator form: no mmu_invalidate_begin/end",
           _notifier_without_invalidation, ("fault_vs_munmap", "write_vs_mprotect")),
    Mutant("no_flush_on_zap", "zap without its remote TLB flush",
           "kvm_unmap_gfn_range never asks for kvm_flush_remote_tlbs",
           _no_flush_on_zap, ("fault_vs_munmap",)),
    Mutant("dirty_clear_no_flush", "dirty-log clear that skips the flush",
           "kvm_clear_dirty_log_protect does not flush the memslot's TLBs",
           _dirty_clear_no_flush, ("write_vs_clear_dirty_log",)),
    Mutant("swap_without_mn_wait", "a memslot update between a notifier's start and end",
           "kvm_swap_active_memslots publishes the new memslots without waiting for "
           "mn_active_invalidate_count to reach 0",
           _swap_without_mn_wait, ("munmap_vs_slot_delete",)),
    Mutant("swap_without_srcu_sync", "a memslot update that does not wait for SRCU readers",
           "kvm_swap_active_memslots does not synchronize_srcu: faults that looked up the old "
           "slot run past the update's zap",
           _swap_without_srcu_sync, ("fault_vs_slot_delete",)),
    Mutant("ring_reset_no_flush", "a dirty-ring reset that skips the flush",
           "kvm_vm_ioctl_reset_dirty_pages re-protects the reset gfns but does not flush",
           _ring_reset_no_flush, ("write_vs_ring_reset",)),
    Mutant("gmem_end_before_truncate", "a hole punch that ends its invalidation early",
           "kvm_gmem_punch_hole ends the invalidation before the folios are truncated",
           _gmem_end_before_truncate, ("private_fault_vs_punch_hole",)),
    Mutant("gpc_retry_in_progress", "a pfn cache refresh racing an invalidation",
           "hva_to_pfn_retry tests mmu_invalidate_in_progress, not mn_active_invalidate_count",
           _gpc_retry_in_progress, ("gpc_refresh_vs_munmap",)),
    Mutant("gpc_refresh_unserialized", "two pfn cache refreshes at once",
           "kvm_gpc_refresh without gpc->refresh_lock", _gpc_refresh_unserialized,
           ("two_gpc_activates",)),
    Mutant("gpc_refresh_inactive", "a pfn cache used after its deactivation",
           "kvm_gpc_check and kvm_gpc_refresh before ecbcf030b456 do not reject an inactive "
           "cache: a refresh after kvm_gpc_deactivate makes it valid off kvm->gpc_list, "
           "where no invalidation reaches it", _gpc_refresh_inactive,
           ("gpc_read_vs_deactivate",)),
    Mutant("prefault_retries_invalid_slot", "a pre-fault racing a memslot deletion",
           "KVM_PRE_FAULT_MEMORY retries on a slot being deleted (before 3ccbf6f47098) while "
           "holding kvm->srcu, which the deletion's synchronize_srcu waits for",
           _prefault_retries_invalid_slot, ("pre_fault_vs_slot_delete",)),
    Mutant("log_dirty_no_flush", "dirty logging started without its flush",
           "kvm_arch_commit_memory_region protects the slot but does not flush its TLBs",
           _log_dirty_no_flush, ("write_vs_log_dirty", "block_read_vs_log_dirty_write",
                                 "writes_vs_log_dirty_two_regions")),
)}


class _Registry(Mapping):
    """The core's mutants, then the installed backends' (entry points not block-listed by
    KVMCORE_DISABLE_PLUGINS), loaded on first use."""

    def __init__(self):
        self._all: dict[str, Mutant] | None = None

    def _load(self) -> dict[str, Mutant]:
        if self._all is None:
            from ..plugins import blocked_names, entry_points_of

            found = dict(_CORE)
            blocked = blocked_names()
            for name, ep in entry_points_of(MUTANT_GROUP).items():
                if name in blocked or name in found:
                    continue
                fields = ep.load()
                try:
                    found[name] = Mutant(name=name, **fields)
                except TypeError as e:
                    raise TypeError(f"entry point {MUTANT_GROUP}:{name} ({ep.value}): not the "
                                    f"fields of a Mutant: {e}") from None
            self._all = found
        return self._all

    def __getitem__(self, name: str) -> Mutant:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


MUTANTS: Mapping[str, Mutant] = _Registry()
