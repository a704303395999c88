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
        #: SEAMCALL names that fail once with OPERAND_BUSY (fault injection for tests).
        self.fail_next: set[str] = set()

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
    def remove_private_spte(self, vm: Kvm, gfn: int, level: int, old: int) -> None:
        """tdx_sept_remove_private_spte: BLOCK, TRACK + kick (the next TD entry starts a new
        epoch, which flushes the private TLB), REMOVE, WBINVD. A busy SEAMCALL is retried once
        with vCPU entry blocked (tdx_no_vcpus_enter_start/stop)."""
        if not self.hkid_assigned:
            raise AssertionError("KVM bug: removing a private page from a TD without HKID")
        self._retry(vm, TDH_MEM_RANGE_BLOCK, gfn, level)
        self.blocked.add(gfn)
        self._retry(vm, TDH_MEM_TRACK, gfn, level)
        self.seamcall(vm, KICK, gfn, level)
        vm.flush_remote_tlbs_range(gfn, 1)
        self._retry(vm, TDH_MEM_PAGE_REMOVE, gfn, level, spte_to_pfn(old))
        self.sept.pop(gfn, None)
        self.blocked.discard(gfn)
        self.seamcall(vm, TDH_PHYMEM_PAGE_WBINVD, gfn, level, spte_to_pfn(old))

    def _retry(self, vm: Kvm, op: str, gfn: int, level: int, pfn: int | None = None) -> None:
        try:
            self.seamcall(vm, op, gfn, level, pfn)
        except TdxBusy:
            vm.stats["x86_tdp.tdx_no_vcpus_enter"] += 1
            self.seamcall(vm, op, gfn, level, pfn)

    # ------------------------------------------------------------------ checks
    def removal_order_problems(self) -> list[str]:
        """Every PAGE.REMOVE is preceded, for that gfn and since its last AUG, by exactly
        BLOCK, TRACK, kick in that order and followed by WBINVD."""
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
            if s:
                problems.append(f"TDX gfn {gfn:#x}: removal stopped after {s}")
        return problems
