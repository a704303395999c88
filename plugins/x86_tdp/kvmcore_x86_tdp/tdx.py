"""TDX: the shared bit, the mirror (S-EPT) root's external updates and the order of private
page removal (arch/x86/kvm/vmx/tdx.c, arch/x86/kvm/mmu/tdp_mmu.c set_external_spte_present).

The TDX module is modelled as a record of SEAMCALLs plus its copy of the S-EPT leaves
(``sept``: gfn -> pfn) and linked S-EPT tables, so a test can see that KVM's mirror and the
module's S-EPT agree and that every private leaf went BLOCK -> TRACK (+ kick) -> REMOVE ->
WBINVD. The TD is always RUNNABLE with an HKID (no pre-finalization PAGE.ADD path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import structlog

from .spte import FROZEN_SPTE, PG_LEVEL_4K, spte_to_pfn

if TYPE_CHECKING:
    from kvmcore.kvm import Kvm

logger = structlog.get_logger(__name__)

#: GPA bit that marks a shared access (TDX_SHARED_BIT_PWL_4 / _PWL_5), by root level.
TDX_SHARED_BIT = {4: 47, 5: 51}

TDH_MEM_SEPT_ADD = "TDH.MEM.SEPT.ADD"
TDH_MEM_PAGE_AUG = "TDH.MEM.PAGE.AUG"
TDH_MEM_RANGE_BLOCK = "TDH.MEM.RANGE.BLOCK"
TDH_MEM_TRACK = "TDH.MEM.TRACK"
KICK = "KVM_REQ_OUTSIDE_GUEST_MODE"
TDH_MEM_PAGE_REMOVE = "TDH.MEM.PAGE.REMOVE"
TDH_PHYMEM_PAGE_WBINVD = "TDH.PHYMEM.PAGE.WBINVD"

#: Race points of a private page's removal (tdx_sept_remove_private_spte): before BLOCK,
#: before TRACK and the kick, before PAGE.REMOVE. The zapping flow holds kvm->mmu_lock for
#: write at each (reference/races.md §7).
TDX_BLOCK = "tdx_block"
TDX_TRACK_KICK = "tdx_track_kick"
TDX_PAGE_REMOVE = "tdx_page_remove"
RACE_POINTS = (TDX_BLOCK, TDX_TRACK_KICK, TDX_PAGE_REMOVE)

#: The removal sequence of one private leaf (tdx_sept_remove_private_spte).
REMOVAL_ORDER = (TDH_MEM_RANGE_BLOCK, TDH_MEM_TRACK, KICK, TDH_MEM_PAGE_REMOVE,
                 TDH_PHYMEM_PAGE_WBINVD)

TRACE_NAMES = {
    TDH_MEM_SEPT_ADD: "tdx.sept_add", TDH_MEM_PAGE_AUG: "tdx.page_aug",
    TDH_MEM_RANGE_BLOCK: "tdx.block", TDH_MEM_TRACK: "tdx.track", KICK: "tdx.kick",
    TDH_MEM_PAGE_REMOVE: "tdx.remove", TDH_PHYMEM_PAGE_WBINVD: "tdx.wbinvd",
}


@attrs.frozen(slots=True)
class SeamcallRecord:
    op: str
    gfn: int
    level: int = PG_LEVEL_4K
    pfn: int | None = None


class TdxBusy(Exception):
    """TDX_OPERAND_BUSY from a SEAMCALL (tests inject it with ``fail_next``)."""


class Tdx:
    """Per-TD state: the shared bit, the HKID, the TDX module's S-EPT and the SEAMCALL log."""

    def __init__(self, root_level: int):
        self.shared_bit = TDX_SHARED_BIT[root_level]
        #: kvm_gfn_direct_bits: the shared bit as a gfn bit.
        self.shared_gfn_bit = 1 << (self.shared_bit - 12)
        self.hkid_assigned = True
        self.records: list[SeamcallRecord] = []
        self.sept: dict[int, int] = {}
        self.sept_tables: set[tuple[int, int]] = set()
        self.blocked: set[int] = set()
        #: Gfns whose removal (BLOCK, TRACK + kick, REMOVE) a paused flow is in the middle of.
        self.removing: set[int] = set()
        #: SEAMCALL names that fail once with OPERAND_BUSY (fault injection for tests).
        self.fail_next: set[str] = set()

    @staticmethod
    def local_retry(vm: Kvm, fault) -> bool:
        """tdx_handle_ept_violation's loop: a fault on a private gpa that returned
        RET_PF_RETRY is taken again inside the handler (local_retry, against the TDX
        module's zero-step mitigation; kvm->srcu stays held), unless the gfn's memslot is
        being deleted or moved (2bc2694fe20b, 6.18): its synchronize_srcu would wait for the
        handler while the handler waits for it. (A pending event or signal also ends the
        loop in Linux; the model has neither.)"""
        if not fault.is_private:
            return False
        slot = vm.memslot_sets[fault.as_id].search(fault.gfn)
        return slot is None or not slot.invalid

    def seamcall(self, vm: Kvm, op: str, gfn: int, level: int = PG_LEVEL_4K,
                 pfn: int | None = None) -> None:
        if op in self.fail_next:
            self.fail_next.discard(op)
            vm.stats["x86_tdp.tdx_busy"] += 1
            raise TdxBusy(op)
        self.records.append(SeamcallRecord(op, gfn, level, pfn))
        vm.trace(TRACE_NAMES[op], gpa=gfn << 12, level=level)

    # ------------------------------------------------------------------ install
    def set_external_spte_present(self, vm: Kvm, table, idx: int, gfn: int, level: int,
                                  old: int, new: int, child_pa: int | None) -> bool:
        """tdp_mmu.c set_external_spte_present: freeze the mirror SPTE, tell the TDX module
        (tdx_sept_link_private_spt / tdx_sept_set_private_spte), then publish ``new``; on
        failure restore ``old``."""
        if old & (1 << 11):
            raise AssertionError("KVM bug: set_external_spte_present over a present SPTE")
        table[idx] = FROZEN_SPTE
        try:
            if child_pa is not None:
                self.seamcall(vm, TDH_MEM_SEPT_ADD, gfn, level)
                self.sept_tables.add((gfn, level - 1))
            else:
                if level != PG_LEVEL_4K:
                    raise AssertionError("KVM bug: TDX private leaf above 4K")
                self.seamcall(vm, TDH_MEM_PAGE_AUG, gfn, level, spte_to_pfn(new))
                self.sept[gfn] = spte_to_pfn(new)
        except TdxBusy:
            table[idx] = old
            return False
        table[idx] = new
        return True

    # ------------------------------------------------------------------ removal
    def remove_private_spte(self, vm: Kvm, gfn: int, level: int, old: int):
        """tdx_sept_remove_private_spte, as a flow (KVM holds kvm->mmu_lock for write and has
        already made the mirror SPTE non-present): BLOCK (tdx_sept_zap_private_spte), TRACK
        and the kick (tdx_track), then REMOVE and WBINVD (tdx_sept_drop_private_spte). It
        pauses before each of the three steps, at ``tdx_block``, ``tdx_track_kick`` and
        ``tdx_page_remove``: until BLOCK the TDX module's S-EPT still maps the page, so a
        vCPU's walk still finds it; until the kick a vCPU may still use what its TLB holds;
        the page is only removed once every vCPU has left guest mode and so will flush its
        private TLB on the next TD entry (the new TD epoch). Faults are held off by the write
        lock throughout. A busy SEAMCALL is retried once with vCPU entry blocked
        (tdx_no_vcpus_enter_start/stop)."""
        if not self.hkid_assigned:
            raise AssertionError("KVM bug: removing a private page from a TD without HKID")
        self.removing.add(gfn)
        yield TDX_BLOCK
        self.tdx_sept_zap_private_spte(vm, gfn, level)
        yield TDX_TRACK_KICK
        self.tdx_track(vm, gfn, level)
        yield TDX_PAGE_REMOVE
        self.tdx_sept_drop_private_spte(vm, gfn, level, spte_to_pfn(old))
        self.removing.discard(gfn)

    def tdx_sept_zap_private_spte(self, vm: Kvm, gfn: int, level: int) -> None:
        """TDH.MEM.RANGE.BLOCK: the S-EPT entry stops giving new translations."""
        self._retry(vm, TDH_MEM_RANGE_BLOCK, gfn, level)
        self.blocked.add(gfn)

    def tdx_track(self, vm: Kvm, gfn: int, level: int) -> None:
        """TDH.MEM.TRACK, then kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE): every
        vCPU leaves guest mode, and its next TD entry flushes the private TLB."""
        self._retry(vm, TDH_MEM_TRACK, gfn, level)
        self.seamcall(vm, KICK, gfn, level)
        vm.flush_remote_tlbs_range(gfn, 1)

    def tdx_sept_drop_private_spte(self, vm: Kvm, gfn: int, level: int, pfn: int) -> None:
        """TDH.MEM.PAGE.REMOVE, then TDH.PHYMEM.PAGE.WBINVD of the page."""
        self._retry(vm, TDH_MEM_PAGE_REMOVE, gfn, level, pfn)
        self.sept.pop(gfn, None)
        self.blocked.discard(gfn)
        self.seamcall(vm, TDH_PHYMEM_PAGE_WBINVD, gfn, level, pfn)

    def _retry(self, vm: Kvm, op: str, gfn: int, level: int, pfn: int | None = None) -> None:
        try:
            self.seamcall(vm, op, gfn, level, pfn)
        except TdxBusy:
            vm.stats["x86_tdp.tdx_no_vcpus_enter"] += 1
            self.seamcall(vm, op, gfn, level, pfn)

    def sept_translation(self, gfn: int) -> int | None:
        """The pfn the TDX module's S-EPT still maps for ``gfn`` while KVM removes it (its
        mirror SPTE already zapped, BLOCK not yet done), else None: what a vCPU's walk of a
        private gfn finds once the mirror is empty."""
        if gfn in self.removing and gfn not in self.blocked:
            return self.sept.get(gfn)
        return None

    # ------------------------------------------------------------------ checks
    def removal_order_problems(self, in_flight=()) -> list[str]:
        """Every PAGE.REMOVE is preceded, for that gfn and since its last AUG, by exactly
        BLOCK, TRACK, kick in that order and followed by WBINVD; a removal may stop part way
        only for the gfns of ``in_flight`` (a flow paused in it)."""
        problems = []
        seq: dict[int, list[str]] = {}
        for rec in self.records:
            if rec.op in (TDH_MEM_SEPT_ADD,):
                continue
            if rec.op == TDH_MEM_PAGE_AUG:
                if seq.get(rec.gfn):
                    problems.append(f"TDX gfn {rec.gfn:#x}: AUG after an incomplete removal "
                                    f"{seq[rec.gfn]}")
                seq[rec.gfn] = []
                continue
            s = seq.setdefault(rec.gfn, [])
            s.append(rec.op)
            if list(REMOVAL_ORDER[:len(s)]) != s:
                problems.append(f"TDX gfn {rec.gfn:#x}: private removal order {s}, Linux "
                                f"requires {list(REMOVAL_ORDER)}")
                seq[rec.gfn] = []
            elif len(s) == len(REMOVAL_ORDER):
                seq[rec.gfn] = []
        for gfn, s in seq.items():
            if s and gfn not in in_flight:
                problems.append(f"TDX gfn {gfn:#x}: removal stopped after {s}")
        return problems
