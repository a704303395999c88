"""x86's mutants for the race explorer (entry-point group ``kvmcore.mutants``: each the
fields of a ``kvmcore.explore.Mutant`` but its name): seed 4, a TDX private zap racing a
conversion and the TLB flush.

* ``tdx_zap_shared_alias``: a zap asked for the private alias (a conversion to shared, a
  guest_memfd invalidation) walks the direct roots, the shared alias, instead of the mirror
  root (kvm_gfn_range_filter_to_root_types with the two filters exchanged): the private leaf
  and the TDX module's S-EPT entry survive the conversion, and the guest keeps reading its
  private page where the gfn is now shared.
* ``zap_yield_without_flush``: tdp_mmu_zap_leafs yielding kvm->mmu_lock with the flush of
  what it zapped still pending (it is done at the end instead), as before a835429cda91
  "KVM: x86/mmu: Ensure TLBs are flushed when yielding during GFN range zap" (2021): a
  notifier that runs meanwhile finds those SPTEs already zapped, so it flushes nothing, and
  the host frees a page a vCPU's TLB still reaches.
* ``tdx_remove_before_track``: tdx_sept_remove_private_spte doing TDH.MEM.PAGE.REMOVE right
  after BLOCK, before TDH.MEM.TRACK and the kick: the page leaves the TD while a vCPU's TLB
  may still translate to it (the TDX module refuses this with TDX_TLB_TRACKING_NOT_DONE; the
  model's check of the removal order reports it).
* ``obsolete_root_no_retry``: is_page_fault_stale without the obsolete-root test of
  a955cad84cda "KVM: x86/mmu: Retry page fault if root is invalidated by memslot update"
  (2021): a fault that entered on a root kvm_mmu_zap_all_fast has since made invalid
  installs into it once kvm_tdp_mmu_zap_invalidated_roots has zapped it; when the vCPU
  reloads, the root is freed and the page tables the fault linked below it leak.
* ``zap_root_restart_advances``: tdp_iter_next stepping on after tdp_iter_restart, as before
  3a0f64de479c "KVM: x86/mmu: Don't advance iterator after restart due to yielding"
  (2021): a pass of tdp_mmu_zap_root at the root's level cannot step down from the entry it
  restarted at, so it steps aside and never zaps the entry where it yielded; the tables
  below stay linked in a root that kvm_tdp_mmu_zap_invalidated_roots has zapped (and leak
  when it is freed).
* ``unmap_valid_roots_only``: kvm_tdp_mmu_unmap_gfn_range walking the valid roots only, as
  before d62007edf01f "KVM: x86/mmu: Zap _all_ roots when unmapping gfn range in TDP MMU"
  (2021): an MMU notifier that runs between kvm_mmu_zap_all_fast's invalidation and the
  zap of the invalid roots (or while that zap yields) returns with an invalid root still
  mapping the page the host then frees.
* ``reload_keeps_obsolete_root``: kvm_mmu_reload loading a root only when the vCPU has none,
  as before 20a6cff3b283 "KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()"
  (2025): the request to drop the roots kvm_mmu_zap_all_fast made obsolete is processed
  only by vcpu_enter_guest, so a KVM_PRE_FAULT_MEMORY after a memslot update keeps the
  obsolete root, whose every fault is stale, and retries for ever.
* ``tdx_local_retry_invalid_slot``: tdx_handle_ept_violation retrying a private fault
  locally (kvm->srcu held) whatever made it retry, as before 2bc2694fe20b "KVM: TDX: Do not
  retry locally when the retry is caused by invalid memslot" (2025): a fault that a hole
  punch's invalidation made retry, on a memslot being deleted, keeps kvm->srcu while the
  deletion waits for it in synchronize_srcu: a deadlock.
"""

from __future__ import annotations

from unittest.mock import patch

from kvmcore.locks import with_attribute
from kvmcore.uapi import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED

from . import backend
from .spte import KVM_PAGES_PER_HPAGE, spte_to_pfn
from .tdp_mmu import TdpMmu
from .tdx import TDX_BLOCK, TDX_PAGE_REMOVE, TDX_TRACK_KICK, Tdx

SCENARIOS = ("tdx_conversion_vs_private_read",)


def _zap_yield_without_flush():
    real = TdpMmu.tdp_mmu_zap_leafs

    def zap_leafs(self, vm, root, start, end, can_yield, flush):
        """The real walk with kvm_flush_remote_tlbs deferred while it runs: a flush it asks
        for before yielding is owed to its caller instead."""
        deferred = []
        owed = yield from with_attribute(real(self, vm, root, start, end, can_yield, flush),
                                         vm, "flush_remote_tlbs", lambda: deferred.append(1))
        return bool(owed or deferred)

    return patch.object(TdpMmu, "tdp_mmu_zap_leafs", zap_leafs)


def _obsolete_root_no_retry():
    return patch.object(backend.X86TdpBackend, "is_obsolete_sp", staticmethod(lambda root: False))


def _zap_root_restart_advances():
    def restart(root, gfn: int, min_level: int) -> int:
        return gfn + KVM_PAGES_PER_HPAGE(min_level) if min_level == root.level else gfn

    return patch.object(TdpMmu, "tdp_iter_restart", staticmethod(restart))


def _unmap_valid_roots_only():
    real = backend.X86TdpBackend.roots_for_range

    def roots_for_range(self, range, types_extra: int = 0):
        return real(self, range)

    return patch.object(backend.X86TdpBackend, "roots_for_range", roots_for_range)


def _reload_keeps_obsolete_root():
    def kvm_mmu_reload(self, vm, vcpu):
        roots = vcpu.arch["roots"]
        root = roots.get(vcpu.as_id)
        if root is None:
            root = roots[vcpu.as_id] = self.direct_roots[vcpu.as_id]
            root.refs += 1
        return root

    return patch.object(backend.X86TdpBackend, "kvm_mmu_reload", kvm_mmu_reload)


def _tdx_local_retry_invalid_slot():
    return patch.object(Tdx, "local_retry", staticmethod(lambda vm, fault: fault.is_private))


def _zap_shared_alias():
    real = backend.kvm_gfn_range_filter_to_root_types

    def swapped(has_mirror: bool, attr_filter: int) -> int:
        both = KVM_FILTER_PRIVATE | KVM_FILTER_SHARED
        if attr_filter & both != both:
            attr_filter ^= both
        return real(has_mirror, attr_filter)

    return patch.object(backend, "kvm_gfn_range_filter_to_root_types", swapped)


def _remove_before_track():
    def remove_private_spte(self, vm, gfn: int, level: int, old: int):
        if not self.hkid_assigned:
            raise AssertionError("KVM bug: removing a private page from a TD without HKID")
        self.removing.add(gfn)
        yield TDX_BLOCK
        self.tdx_sept_zap_private_spte(vm, gfn, level)
        yield TDX_PAGE_REMOVE
        self.tdx_sept_drop_private_spte(vm, gfn, level, spte_to_pfn(old))
        yield TDX_TRACK_KICK
        self.tdx_track(vm, gfn, level)
        self.removing.discard(gfn)

    return patch.object(Tdx, "remove_private_spte", remove_private_spte)


TDX_ZAP_SHARED_ALIAS = dict(
    seed="seed 4: a TDX private zap racing a conversion",
    what="a private-alias zap (conversion to shared, guest_memfd invalidation) walks the direct "
    "roots instead of the mirror root: the private leaf outlives the conversion",
    patch=_zap_shared_alias, scenarios=SCENARIOS, arch="x86_tdp")

TDX_REMOVE_BEFORE_TRACK = dict(
    seed="seed 4: a TDX private zap racing the flush",
    what="tdx_sept_remove_private_spte removes the page (TDH.MEM.PAGE.REMOVE) before TDH.MEM.TRACK "
    "and the kick: a vCPU's TLB may still reach it",
    patch=_remove_before_track, scenarios=SCENARIOS, arch="x86_tdp")

ZAP_YIELD_WITHOUT_FLUSH = dict(
    seed="a zap that yields with its flush pending",
    what="tdp_mmu_zap_leafs drops kvm->mmu_lock before flushing what it zapped (before "
    "a835429cda91): a notifier meanwhile zaps nothing, flushes nothing and frees the page",
    patch=_zap_yield_without_flush, scenarios=("munmap_vs_dontneed",), arch="x86_tdp")

OBSOLETE_ROOT_NO_RETRY = dict(
    seed="a fault racing a memslot update's fast zap",
    what="is_page_fault_stale without its obsolete-root test (before a955cad84cda): a fault "
    "that entered on a root kvm_mmu_zap_all_fast made invalid installs into it after "
    "kvm_tdp_mmu_zap_invalidated_roots zapped it, and its page tables leak",
    patch=_obsolete_root_no_retry, scenarios=("fault_vs_other_slot_delete",), arch="x86_tdp")

ZAP_ROOT_RESTART_ADVANCES = dict(
    seed="a memslot update's zap of the old roots, yielding",
    what="tdp_mmu_zap_root's root-level pass steps past the entry it yielded at (before "
    "3a0f64de479c): the tables below it stay linked in a root said to be zapped",
    patch=_zap_root_restart_advances, scenarios=("munmap_vs_other_slot_delete",),
    arch="x86_tdp")

UNMAP_VALID_ROOTS_ONLY = dict(
    seed="an MMU notifier racing a memslot update's fast zap",
    what="kvm_tdp_mmu_unmap_gfn_range skips the invalid roots (before d62007edf01f): a "
    "notifier returns while a root kvm_mmu_zap_all_fast invalidated still maps the page",
    patch=_unmap_valid_roots_only, scenarios=("munmap_vs_other_slot_delete",), arch="x86_tdp")

TDX_LOCAL_RETRY_INVALID_SLOT = dict(
    seed="a TDX private fault racing a hole punch and a memslot deletion",
    what="tdx_handle_ept_violation retries a private fault locally, kvm->srcu held, on a "
    "memslot being deleted (before 2bc2694fe20b): the fault waits for the deletion, whose "
    "synchronize_srcu waits for the fault",
    patch=_tdx_local_retry_invalid_slot,
    scenarios=("tdx_private_read_vs_punch_and_delete",), arch="x86_tdp")

RELOAD_KEEPS_OBSOLETE_ROOT = dict(
    seed="KVM_PRE_FAULT_MEMORY after a memslot update's fast zap",
    what="kvm_mmu_reload leaves KVM_REQ_MMU_FREE_OBSOLETE_ROOTS to vcpu_enter_guest (before "
    "20a6cff3b283): a pre-fault keeps the root kvm_mmu_zap_all_fast made obsolete, finds "
    "every fault stale and retries for ever",
    patch=_reload_keeps_obsolete_root, scenarios=("pre_fault_vs_other_slot_delete",),
    arch="x86_tdp")
