"""X86TdpBackend: the kvmcore hooks of the x86 TDP MMU with EPT (arch/x86/kvm/mmu/*.c,
arch/x86/kvm/x86.c, vmx/*.c, svm/sev.c).

VM options (``VM(arch="x86_tdp", vm_type=..., **options)``):

- ``tdp_level`` (4 or 5): the root level (kvm_mmu_get_tdp_level); a TDX VM's shared bit is
  47 with 4 levels and 51 with 5.
- ``pml`` (True, Linux's enable_pml default on CPUs with PML): dirty logging through
  page-modification logging instead of write protection; needs A/D bits, so
  ``ad_disabled=True`` turns it off unless ``pml=True`` is given explicitly (EINVAL).
- ``pml_drain_on_exit`` (True): KVM drains the PML buffer on every VM exit, and each
  ``vcpu.read/write/fetch`` is one KVM_RUN, so a logged GPA reaches the bitmap / ring when the
  access returns. False models a guest that keeps running: the buffer is drained only when
  full (PML-full exit) or by ``sync_dirty_log``.
- ``ad_disabled`` (False): EPT without A/D bits (enable_ept_ad_bits=0): aging and the fast
  path use access-tracked SPTEs.
- ``eager_page_split`` (True), ``nx_huge_pages`` (False), ``hugepage_1g`` (True: the CPU has
  1G EPT pages, else max_huge_page_level is 2M), ``slot_zap_all_quirk`` (True:
  KVM_X86_QUIRK_SLOT_ZAP_ALL for DEFAULT_VM memslot deletion), ``mmio_caching`` (True:
  enable_mmio_caching), ``smm`` (True: CONFIG_KVM_SMM, a second memslot address space for
  DEFAULT_VM; False: one, as a kernel without SMM, whose KVM_CAP_MULTI_ADDRESS_SPACE is 0).

Simplifications (each also noted where it applies): no shadow paging, nested EPT (L2 roots,
SPTE_TDP_AD_WRPROT_ONLY) or page tracking; the NX huge-page recovery worker and
disallowed_hugepage_adjust are not modelled (nx_huge_pages only strips X from huge leaves and
maps exec faults at 4K); SNP keeps the EPT format (NPT entries are not modelled, the RMP is);
a TD is always RUNNABLE with an HKID and TDX MMIO is not cached in the shared EPT; SMM is
only the vCPU's address space (no SMRAM, RSM or SMI). The fault's exchanges under the read
lock, a zap's lock drops and TDX's removal steps are race points (tdp_mmu.py, tdx.py); the
fast path's lockless exchange (fast_page_fault) and the SEAMCALLs between freezing a mirror
SPTE and publishing it run in one stretch, so no walk meets a FROZEN_SPTE in a live table
between two points; RCU-deferred freeing is immediate.
"""

from __future__ import annotations

import errno
import functools
import heapq
from types import GeneratorType

import attrs
import structlog
from kvmcore import hookimpl
from kvmcore.arch import ArchInfo, Mapping, VmOption, vm_options
from kvmcore.errors import KvmError
from kvmcore.hookspecs import SLOT_FLUSH_LOCK_WAIT
from kvmcore.locks import READ, WRITE, drive, stepping
from kvmcore.memslots import dirty_logging_toggled
from kvmcore.radix import PERM_A, PERM_D, PERM_R, PERM_W, PERM_X
from kvmcore.records import MISCONFIG, PERMISSION
from kvmcore.records import GfnRange
from kvmcore.uapi import (
    KVM_FILTER_PRIVATE,
    KVM_FILTER_SHARED,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MR_CREATE,
    KVM_MR_FLAGS_ONLY,
    KVM_MR_MOVE,
    KVM_PFN_NOSLOT,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    is_error_noslot_pfn,
)

from . import invariants, mmu
from .ept import PFERR_PRESENT_MASK, ept_translate
from .pml import PmlBuffer, vmx_flush_pml_buffer
from .sev import Rmp
from .spte import (
    KVM_HPAGE_SIZE,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    MMIO_SPTE_GEN_MASK,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_ROOT_4LEVEL,
    PT64_ROOT_5LEVEL,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_generation,
    is_access_track_spte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    level_for_size,
    make_mmio_spte,
    make_spte,
    restore_acc_track_spte,
    shadow_mmu_writable_mask,
    spte_to_pfn,
)
from .tdp_mmu import (
    X86_DLOG_LOCK_WAIT,
    X86_FAST_PF_CMPXCHG,
    X86_ZAP_INVALIDATED_LOCK_WAIT,
    ZAP_YIELD_GFNS,
    KVM_DIRECT_ROOTS,
    KVM_INVALID_ROOTS,
    KVM_MIRROR_ROOTS,
    KVM_VALID_ROOTS,
    TdpMmu,
    TdpRoot,
    is_access_allowed,
)
from .tdx import Tdx

logger = structlog.get_logger(__name__)

KVM_X86_DEFAULT_VM = "default"
KVM_X86_SW_PROTECTED_VM = "sw_protected"
KVM_X86_SNP_VM = "snp"
KVM_X86_TDX_VM = "tdx"

# pfncache: KVM_X86 selects HAVE_KVM_PFNCACHE (kvmclock, Xen's shared pages).
_COMMON = {"memory_attributes", "dirty_log", "manual_dirty_protect", "initially_set",
           "dirty_ring", "pml", "hugepage_2m", "hugepage_1g", "pre_fault", "aging", "gmem",
           "pfncache"}

#: Found by the explorer in 6.18's code (no fix upstream that the model knows of).
PRE_FAULT_OBSOLETE_ROOT_WHY = (
    "arch/x86/kvm/mmu/mmu.c:kvm_tdp_map_page (6.18, from kvm_arch_vcpu_pre_fault_memory) — "
    "its retry loop never reloads the root: a KVM_PRE_FAULT_MEMORY that starts while a "
    "DEFAULT_VM memslot deletion waits in its first synchronize_srcu, and whose fault then "
    "meets the root kvm_mmu_zap_all_fast made obsolete, retries (is_page_fault_stale) until "
    "a signal, while the deletion's second synchronize_srcu waits for its kvm->srcu "
    "(kvm_mmu_reload drops obsolete roots, 20a6cff3b283, but runs once per range)")

ARCH_INFO = ArchInfo(
    name="x86_tdp",
    page_sizes=(1 << 12, 1 << 21, 1 << 30),
    levels=4,
    vm_types={
        # DEFAULT_VM: no private memory; guest_memfd only as shared, mmap-able memory.
        KVM_X86_DEFAULT_VM: _COMMON | {"readonly_mem", "gmem_mmap"},
        KVM_X86_SW_PROTECTED_VM: _COMMON | {"readonly_mem", "private_mem"},
        # Protected state: no read-only memslots (kvm_arch_has_readonly_mem), no SMM.
        KVM_X86_SNP_VM: _COMMON | {"private_mem"},
        # Separate private (mirror / S-EPT) and shared (direct) roots.
        KVM_X86_TDX_VM: _COMMON | {"private_mem", "private_alias"},
    },
    nr_address_spaces=2,
    # KVM_INTERNAL_MEM_SLOTS: APIC access page, identity map, TSS.
    internal_mem_slots=3,
    # arch/x86/kvm/Kconfig selects KVM_MMU_LOCKLESS_AGING (the TDP MMU ages under RCU) and
    # KVM_ELIDE_TLB_FLUSH_IF_YOUNG (clear_flush_young does not flush).
    mmu_lockless_aging=True,
    elide_tlb_flush_if_young=True,
    description="x86 TDP MMU with EPT entries; TDX mirror roots, SNP RMP, SW-protected VMs",
    known_divergences={
        "test_race_scenario_is_clean_in_every_interleaving[pre_fault_vs_other_slot_delete]":
            PRE_FAULT_OBSOLETE_ROOT_WHY},
)

OPTIONS = {
    "tdp_level": VmOption(PT64_ROOT_4LEVEL, (PT64_ROOT_4LEVEL, PT64_ROOT_5LEVEL),
                          "TDP root level (4 or 5, tdp_root_level)"),
    "pml": VmOption(True, doc="enable_pml: dirty logging through PML"),
    "ad_disabled": VmOption(False, doc="EPT without A/D bits (enable_ept_ad_bits=0)"),
    "eager_page_split": VmOption(True, doc="eager_page_split module parameter"),
    "nx_huge_pages": VmOption(False, doc="nx_huge_pages module parameter"),
    "hugepage_1g": VmOption(True, doc="1 GiB leaves (tdp_mmu max level)"),
    "slot_zap_all_quirk": VmOption(True, doc="KVM_X86_QUIRK_SLOT_ZAP_ALL"),
    "mmio_caching": VmOption(True, doc="enable_mmio_caching"),
    "pml_drain_on_exit": VmOption(True, doc="PML buffer drained on every exit"),
    "smm": VmOption(True, doc="CONFIG_KVM_SMM: a second address space"),
}


def kvm_gfn_range_filter_to_root_types(has_mirror: bool, attr_filter: int) -> int:
    """tdp_mmu.h: without mirrored TDP every filter means the direct roots."""
    if not has_mirror:
        return KVM_DIRECT_ROOTS
    types = 0
    if attr_filter & KVM_FILTER_PRIVATE:
        types |= KVM_MIRROR_ROOTS
    if attr_filter & KVM_FILTER_SHARED:
        types |= KVM_DIRECT_ROOTS
    return types



@functools.cache
def _arch_info(nr_as: int, pml: bool) -> ArchInfo:
    """ARCH_INFO for a VM with ``nr_as`` address spaces, without PML when ``pml`` is off
    (enable_pml=0 or no A/D bits: cpu_dirty_log_size 0); one record per combination."""
    vm_types = dict(ARCH_INFO.vm_types)
    if not pml:
        vm_types = {t: caps - {"pml"} for t, caps in vm_types.items()}
    return attrs.evolve(ARCH_INFO, nr_address_spaces=nr_as, vm_types=vm_types)


class X86TdpBackend:
    """One instance per VM. ``arch_info`` is per instance because ``nr_address_spaces``
    depends on the VM type (kvm_arch_nr_memslot_as_ids: 1 with private memory, else 2)."""

    arch_info = ARCH_INFO
    OPTIONS = OPTIONS

    def __init__(self, vm_type: str = KVM_X86_DEFAULT_VM, **options):
        if vm_type not in ARCH_INFO.vm_types:
            raise KvmError(errno.EINVAL, f"vm_type={vm_type!r}: x86_tdp supports "
                                         f"{sorted(ARCH_INFO.vm_types)}")
        opts = vm_options("x86_tdp", OPTIONS, options)
        if opts["ad_disabled"] and "pml" not in options:
            opts["pml"] = False
        if opts["pml"] and opts["ad_disabled"]:
            raise KvmError(errno.EINVAL, "pml=True needs EPT A/D bits (ad_disabled=False)")
        self.vm_type = vm_type
        self.options = opts
        self.root_level = opts["tdp_level"]
        self.pml = opts["pml"]
        self.ad_disabled = opts["ad_disabled"]
        self.eager_page_split = opts["eager_page_split"]
        self.nx_huge_pages = opts["nx_huge_pages"]
        self.max_huge_page_level = PG_LEVEL_1G if opts["hugepage_1g"] else PG_LEVEL_2M
        self.slot_zap_all_quirk = opts["slot_zap_all_quirk"]
        self.enable_mmio_caching = opts["mmio_caching"]
        self.pml_drain_on_exit = opts["pml_drain_on_exit"]
        self.has_private_mem = vm_type != KVM_X86_DEFAULT_VM
        self.tdx = Tdx(self.root_level) if vm_type == KVM_X86_TDX_VM else None
        self.rmp = Rmp() if vm_type == KVM_X86_SNP_VM else None
        # TDX keeps MMIO out of the shared EPT (the guest takes #VE and asks the VMM).
        self.shadow_mmio_value = None if self.tdx is not None else 0x6
        # kvm_arch_nr_memslot_as_ids: SMM's address space exists only with CONFIG_KVM_SMM.
        nr_as = 1 if self.has_private_mem or not opts["smm"] else 2
        self.arch_info = _arch_info(nr_as, self.pml)
        self.nr_address_spaces = nr_as
        self.tdp = TdpMmu(self, self.root_level)
        self.direct_roots: dict[int, TdpRoot] = {}
        self.mirror_roots: dict[int, TdpRoot] = {}
        self._spte_templates: dict[tuple, int] = {}
        self.removal_log = self.tdx.records if self.tdx is not None else []
        if self.tdx is None and self.rmp is None:
            # No vendor private_max_mapping_level (DEFAULT_VM has no private faults, SW-
            # protected VMs have no cap) and nothing to prepare: leave the core's faultin_pfn
            # unwrapped so its hot-path binding skips pluggy (a plain attribute hides the
            # class's hookimpl from registration).
            self.faultin_pfn = None

    # ------------------------------------------------------------------ helpers
    @property
    def max_gpa_bits(self) -> int:
        return 48 if self.root_level == PT64_ROOT_4LEVEL else 52

    def pml_logging(self, vm) -> bool:
        """PML logs writes while any memslot has dirty logging on
        (vmx_update_cpu_dirty_logging reads kvm->nr_memslots_dirty_logging)."""
        return self.pml and vm.nr_memslots_dirty_logging > 0

    def access_is_private(self, vm, gfn: int, access) -> bool:
        """Fault private-ness for VMs with one table (§3.2): SW-protected takes the gfn's
        attribute (kvm_mmu_page_fault ORs PFERR_PRIVATE_ACCESS into an EPT violation's error
        code, which VMX never sets itself, so an access's stated intent cannot change it),
        SNP uses the C-bit the access carries, DEFAULT_VM never."""
        if self.vm_type == KVM_X86_SW_PROTECTED_VM:
            return vm.kvm_mem_is_private(gfn)
        if self.vm_type == KVM_X86_SNP_VM:
            return bool(access.private)
        return False

    def fault_root(self, vm, fault) -> TdpRoot:
        """tdp_mmu_get_root_for_fault: the mirror root for a TDX private access, else the
        root the faulting vCPU runs on (vcpu->arch.mmu->root.hpa). That is the one it loaded
        when it last entered the guest: a fault in flight keeps it after
        kvm_mmu_zap_all_fast has made it invalid (is_page_fault_stale then retries)."""
        if self.tdx is not None:
            return (self.mirror_roots if fault.is_private else self.direct_roots)[fault.as_id]
        vcpu = fault.vcpu
        if vcpu is None:
            return self.direct_roots[fault.as_id]
        return vcpu.arch["roots"].get(fault.as_id) or self.kvm_mmu_reload(vm, vcpu)

    def kvm_mmu_free_obsolete_roots(self, vm, vcpu) -> None:
        """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (kvm_mmu_free_obsolete_roots): put every root of
        the vCPU that kvm_mmu_zap_all_fast made invalid, its current one and the other
        address space's (which Linux keeps among its prev_roots). The request is pending
        while the vCPU holds such a root."""
        roots = vcpu.arch["roots"]
        for as_id, old in list(roots.items()):
            if old.invalid:
                del roots[as_id]
                self.tdp.kvm_tdp_mmu_put_root(old)

    def kvm_mmu_reload(self, vm, vcpu) -> TdpRoot:
        """kvm_mmu_reload: the obsolete roots first (it processes the request itself since
        20a6cff3b283, 6.15, being called outside vcpu_enter_guest by KVM_PRE_FAULT_MEMORY),
        then kvm_mmu_load if the vCPU has no root: the valid root of its address space,
        with the vCPU's reference (a TD's roots are never made obsolete: its vCPUs use the
        VM's)."""
        self.kvm_mmu_free_obsolete_roots(vm, vcpu)
        roots = vcpu.arch["roots"]
        as_id = vcpu.as_id
        root = roots.get(as_id)
        if root is None:
            root = roots[as_id] = self.direct_roots[as_id]
            root.refs += 1
        return root

    @hookimpl
    def mmu_reload(self, vm, vcpu) -> None:
        self.kvm_mmu_reload(vm, vcpu)

    @staticmethod
    def is_obsolete_sp(root: TdpRoot) -> bool:
        """is_obsolete_sp for a TDP MMU root: role.invalid (TDP MMU pages do not use the MMU
        generation)."""
        return root.invalid

    def _alloc_roots(self) -> None:
        """mmu_alloc_direct_roots: the mirror root first (TDX), then the direct root."""
        bits = self.tdx.shared_gfn_bit if self.tdx is not None else 0
        for as_id in range(self.nr_address_spaces):
            if self.tdx is not None and as_id not in self.mirror_roots:
                self.mirror_roots[as_id] = self.tdp.alloc_root(as_id, True, 0)
            if as_id not in self.direct_roots:
                self.direct_roots[as_id] = self.tdp.alloc_root(as_id, False, bits)

    def remove_external_spte(self, vm, gfn: int, level: int, old: int):
        """kvm_x86_ops.remove_external_spte (tdx_sept_remove_private_spte), a flow."""
        return self.tdx.remove_private_spte(vm, gfn, level, old)

    def set_external_spte_present(self, vm, table, idx, gfn, level, old, new, child_pa):
        return self.tdx.set_external_spte_present(vm, table, idx, gfn, level, old, new,
                                                  child_pa)

    def pml_log(self, vm, vcpu, gpa: int) -> None:
        if vcpu is None:
            return
        buf = vcpu.arch.get("pml")
        if buf is None:
            buf = vcpu.arch["pml"] = PmlBuffer()
        if buf.full:
            # EXIT_REASON_PML_FULL: KVM drains, then the guest retries the write.
            vm.stats["x86_tdp.pml_full"] += 1
            vm.trace("x86_tdp.pml_full", vcpu=vcpu.id)
            vmx_flush_pml_buffer(vm, vcpu, buf)
        buf.log(gpa)
        if self.pml_drain_on_exit:
            vmx_flush_pml_buffer(vm, vcpu, buf)

    def gfn_is_private_mapping(self, vm, gfn: int, pfn: int) -> bool:
        """Mapping.private for a single-table VM: guest-owned in the RMP (SNP), the gfn's
        attribute (SW-protected: conversions zap the old kind)."""
        if self.rmp is not None:
            return self.rmp.is_private(pfn)
        if self.vm_type == KVM_X86_SW_PROTECTED_VM:
            return vm.kvm_mem_is_private(gfn)
        return False

    # ------------------------------------------------------------------ life cycle
    @hookimpl
    def init_vm(self, vm):
        self._alloc_roots()
        vm.root_entry_shift = self.tdp.geometry.shifts[0]
        if self.pml:
            # kvm_x86_ops.cpu_dirty_log_size: entries a vCPU may hold before KVM sees them.
            vm.cpu_dirty_log_size = 512

    @hookimpl
    def vcpu_create(self, vm, vcpu):
        # The root each address space's vCPU runs on, loaded at its first entry.
        vcpu.arch["roots"] = {}
        if self.pml:
            vcpu.arch["pml"] = PmlBuffer()

    @hookimpl
    def set_vcpu_events(self, vm, vcpu, smm):
        """kvm_vcpu_ioctl_x86_set_vcpu_events, KVM_VCPUEVENT_VALID_SMM: a change of mode is
        kvm_smm_changed (HF_SMM_MASK). VM types with private memory have one memslot address
        space (kvm_arch_nr_memslot_as_ids) and SEV-ES/SNP and TDX do not offer
        KVM_CAP_X86_SMM; the model refuses SMM for all of them rather than run a vCPU over an
        address space that can hold no memslot."""
        if smm is None or smm == vcpu.arch.get("smm", False):
            return True
        if smm and self.nr_address_spaces < 2:
            raise KvmError(errno.EINVAL, f"smm=True: a {self.vm_type} VM has no SMM address "
                                         "space")
        buf = vcpu.arch.get("pml")
        if buf is not None and len(buf):
            # Linux drains PML on every exit, so no entry logged in one mode is read back in
            # the other; the model drains only when full or synced, so it drains here.
            vmx_flush_pml_buffer(vm, vcpu, buf)
        vcpu.arch["smm"] = smm
        return True

    @hookimpl
    def vcpu_memslots_id(self, vm, vcpu):
        """kvm_arch_vcpu_memslots_id: 1 in SMM."""
        return 1 if vcpu.arch.get("smm", False) else 0

    @hookimpl
    def flush_shadow_all(self, vm):
        """kvm_tdp_mmu_zap_all: direct and invalid roots only, whole roots, no flush; a TD's
        private memory goes with the TD, not with the MMU notifier's release. The caller
        holds kvm->mmu_lock for write; run in one stretch (Linux may yield between entries,
        but nothing runs in the model while a VM goes away)."""
        for root in self.tdp.roots_of(KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS):
            drive(self.tdp.tdp_mmu_zap_root(vm, root, shared=False))
        return True

    # ------------------------------------------------------------------ fault path
    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        return ept_translate(self, vm, vcpu, gpa, access)

    @hookimpl
    def fault_retries_locally(self, vm, fault):
        """A TD's private faults retry in tdx_handle_ept_violation (``Tdx.local_retry``)."""
        return self.tdx is not None and self.tdx.local_retry(vm, fault)

    @hookimpl
    def fast_page_fault(self, vm, fault):
        """mmu.c fast_page_fault (and handle_mmio_page_fault for RSVD faults), with no
        mmu_lock: read the last SPTE, compute the fix, then try_cmpxchg64 it
        (fast_pf_fix_direct_spte). A stepped fault stops before the exchange
        (``x86_fast_pf_cmpxchg``), a flow: if the SPTE changed meanwhile the exchange fails
        and the walk starts again, at most 4 retries, then the slow path."""
        if fault.kind == MISCONFIG:
            return self.handle_mmio_page_fault(vm, fault)
        # page_fault_can_be_fast
        if self.has_private_mem and fault.is_private != vm.kvm_mem_is_private(fault.gfn):
            return None
        present = (bool(fault.error_code & PFERR_PRESENT_MASK) if fault.error_code
                   else fault.kind == PERMISSION)
        if not present:
            if not self.ad_disabled:
                return None
        elif not fault.write:
            return None
        if fault.is_private and self.tdx is not None:
            return None
        fix = self._fast_pf_fix(vm, fault)
        if type(fix) is not tuple:
            return fix
        if stepping():
            return self._fast_pf_retry(vm, fault, fix)
        return self.fast_pf_fix_direct_spte(vm, fault, *fix)

    def _fast_pf_fix(self, vm, fault):
        """One pass of fast_page_fault's loop: ``(table, idx, level, old, new)`` to exchange,
        RET_PF_SPURIOUS, or None for the slow path."""
        if fault.as_id not in self.direct_roots:
            return None
        root = self.fault_root(vm, fault)
        table, idx, level, spte = self.tdp.get_last_spte(root, fault.gfn)
        if not spte & SPTE_MMU_PRESENT_MASK or not is_last_spte(spte, level):
            return None
        if is_access_allowed(fault.write, fault.exec, spte):
            return RET_PF_SPURIOUS
        new = spte
        if is_access_track_spte(spte):
            new = restore_acc_track_spte(new)
        slot = fault.slot
        if fault.write and is_mmu_writable_spte(spte):
            new |= PT_WRITABLE_MASK
            if level > PG_LEVEL_4K and slot is not None and \
                    slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                return None
        if new == spte or not is_access_allowed(fault.write, fault.exec, new):
            return None
        return table, idx, level, spte, new

    def _fast_pf_retry(self, vm, fault, fix):
        for _retry in range(5):
            yield X86_FAST_PF_CMPXCHG
            if fix[0][fix[1]] == fix[3]:
                return self.fast_pf_fix_direct_spte(vm, fault, *fix)
            vm.stats["x86_tdp.fast_pf_cmpxchg_failed"] += 1
            fix = self._fast_pf_fix(vm, fault)
            if type(fix) is not tuple:
                return fix
        return None

    def fast_pf_fix_direct_spte(self, vm, fault, table, idx, level, old, new) -> int:
        """mmu.c fast_pf_fix_direct_spte, once the exchange succeeded: a page made writable
        is marked dirty."""
        gfn = fault.gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1)
        table[idx] = new
        self.tdp.handle_changed_spte(vm, self.fault_root(vm, fault), gfn, old, new, level)
        if new & PT_WRITABLE_MASK and not old & PT_WRITABLE_MASK and fault.slot is not None:
            vm.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        vm.stats["x86_tdp.fast_pf_fixed"] += 1
        return RET_PF_FIXED

    def handle_mmio_page_fault(self, vm, fault):
        """mmu.c handle_mmio_page_fault: a current-generation MMIO SPTE emulates; a stale one
        goes to the slow path (RET_PF_INVALID -> None); a zapped one retries."""
        if fault.as_id not in self.direct_roots:
            return None
        _t, _i, _level, spte = self.tdp.get_last_spte(self.fault_root(vm, fault), fault.gfn)
        if self.shadow_mmio_value is not None and is_mmio_spte(spte, self.shadow_mmio_value,
                                                               self.enable_mmio_caching):
            gen = vm.memslot_generation(fault.as_id)
            if not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS and \
                    gen & MMIO_SPTE_GEN_MASK == get_mmio_spte_generation(spte):
                vm.stats["x86_tdp.mmio_spte_hit"] += 1
                return RET_PF_EMULATE
            vm.stats["x86_tdp.mmio_spte_stale"] += 1
            return None
        return RET_PF_RETRY

    @hookimpl
    def handle_noslot_fault(self, vm, fault):
        """kvm_handle_noslot_fault + the MMIO branch of tdp_mmu_map_handle_target_level.
        With MMIO caching the fault goes on like any other (kvm_tdp_mmu_page_fault):
        is_page_fault_stale under the read lock, where a root kvm_mmu_zap_all_fast made
        obsolete retries (the vCPU caches on its next attempt, on the root it then loads;
        the invalidation-sequence test is only for a fault with a memslot), then
        kvm_tdp_mmu_map. (Linux decides to emulate without caching before it takes the
        lock; the model holds it then too.)"""
        if (not self.enable_mmio_caching or self.shadow_mmio_value is None
                or fault.gfn >= 1 << (self.max_gpa_bits - 12)
                or fault.as_id not in self.direct_roots):
            return RET_PF_EMULATE
        root = self.fault_root(vm, fault)
        if self.is_obsolete_sp(root):
            vm.stats["x86_tdp.fault_obsolete_root"] += 1
            return RET_PF_RETRY
        gen = vm.memslot_generation(fault.as_id)
        spte = make_mmio_spte(fault.gfn, gen & MMIO_SPTE_GEN_MASK, self.shadow_mmio_value)
        # The same walk as any fault (kvm_tdp_mmu_map), whose target-level step writes the
        # MMIO SPTE instead of a leaf; the core runs this hook plainly, so its exchanges do
        # not pause.
        r = self.tdp.kvm_tdp_mmu_map(vm, fault, root, PG_LEVEL_4K, KVM_PFN_NOSLOT,
                                     lambda old, level: (spte, False, True))
        return drive(r) if type(r) is GeneratorType else r

    @hookimpl(wrapper=True)
    def faultin_pfn(self, vm, fault):
        """kvm_mmu_faultin_pfn_private's level cap (kvm_max_private_mapping_level with the
        vendor's private_max_mapping_level / gmem_max_mapping_level): TDX 4K, SNP the RMP
        entry's size; and SNP's sev_gmem_prepare for a page first handed to the guest."""
        result = yield
        if result != RET_PF_CONTINUE:
            return result
        if fault.is_private:
            max_level = min(level_for_size(fault.max_size), KVM_MAX_HUGEPAGE_LEVEL)
            order = (fault.max_size.bit_length() - 13) if fault.max_size > 4096 else 0
            if self.rmp is not None:
                self.rmp.sev_gmem_prepare(fault.pfn, fault.gfn, order)
            if max_level > PG_LEVEL_4K:
                if self.tdx is not None:
                    max_level = PG_LEVEL_4K
                elif self.rmp is not None:
                    max_level = min(max_level, self.rmp.sev_gmem_max_mapping_level(fault.pfn))
            fault.max_size = min(fault.max_size, KVM_HPAGE_SIZE(max_level))
        elif self.rmp is not None and self.rmp.is_private(fault.pfn):
            self.rmp.rmp_make_shared(fault.pfn)
        return result

    def kvm_mmu_hugepage_adjust(self, vm, fault) -> int:
        """mmu.c kvm_mmu_hugepage_adjust: returns the goal level and aligns fault.pfn."""
        slot = fault.slot
        private_like = fault.is_private or (slot is not None and slot.gmem_only)
        backing_level = min(level_for_size(fault.max_size), KVM_MAX_HUGEPAGE_LEVEL)
        fault.max_level = backing_level if private_like else KVM_MAX_HUGEPAGE_LEVEL
        if backing_level == PG_LEVEL_4K:
            # 4K backing (the common case): each check below would end at 4K too.
            return PG_LEVEL_4K
        huge_page_disallowed = fault.exec and self.nx_huge_pages
        if fault.max_level == PG_LEVEL_4K or is_error_noslot_pfn(fault.pfn) or slot is None:
            return PG_LEVEL_4K
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return PG_LEVEL_4K
        req_level = mmu.kvm_mmu_max_mapping_level_(
            vm, slot, fault.gfn, fault.max_level, private_like, self.max_huge_page_level,
            host_level=backing_level)
        if req_level == PG_LEVEL_4K or huge_page_disallowed:
            return PG_LEVEL_4K
        mask = KVM_PAGES_PER_HPAGE(req_level) - 1
        if (fault.gfn & mask) != (fault.pfn & mask):
            self.tdp.bug(vm, f"hugepage_adjust: gfn {fault.gfn:#x} and pfn {fault.pfn:#x} "
                             f"not congruent at level {req_level}")
            return PG_LEVEL_4K
        fault.pfn &= ~mask
        return req_level

    @hookimpl
    def map_leaf(self, vm, fault):
        """kvm_tdp_mmu_map after kvm_mmu_hugepage_adjust: a RET_PF_* code, or a flow that
        pauses at ``x86_pf_link_cmpxchg`` / ``x86_pf_leaf_cmpxchg`` when the fault is stepped
        (tdp_mmu.py). First is_page_fault_stale's test of the root (the core's check, in the
        same stretch under the lock, is the invalidation sequence's): a root that
        kvm_mmu_zap_all_fast made obsolete while the fault was in flight retries, and the
        vCPU loads the new root as it enters the guest again (a955cad84cda: installing into
        the old root after kvm_tdp_mmu_zap_invalidated_roots passed it leaks the tables)."""
        root = self.fault_root(vm, fault)
        if self.is_obsolete_sp(root):
            vm.stats["x86_tdp.fault_obsolete_root"] += 1
            return RET_PF_RETRY
        goal = self.kvm_mmu_hugepage_adjust(vm, fault)
        fault.goal_level = goal
        fault.goal_size = KVM_HPAGE_SIZE(goal)
        pfn = fault.pfn
        slot = fault.slot
        logging = slot is not None and bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
        host_writable = fault.map_writable
        prefetch = fault.prefetch
        host_mmio = not fault.cacheable
        templates = self._spte_templates

        def make_leaf(old, level):
            # make_spte's result is its pfn-0 value OR pfn << 12 (nothing else depends on the
            # pfn, and the old SPTE only matters for write-tracked gfns, which TDP never has),
            # so build each combination once per VM.
            key = (level, host_writable, prefetch, host_mmio)
            template = templates.get(key)
            if template is None:
                template = templates[key] = make_spte(
                    level=level, pfn=0, host_writable=host_writable,
                    prefetch=prefetch, ad_disabled=self.ad_disabled,
                    is_host_mmio=host_mmio, nx_huge_pages=self.nx_huge_pages)[0]
            new = template | pfn << 12
            if new & PT_WRITABLE_MASK and logging:
                if level > PG_LEVEL_4K:
                    self.tdp.bug(vm, "writable huge SPTE in a dirty-logged slot")
                vm.mark_page_dirty_in_slot(slot, fault.gfn)
            return new, False, False

        if self.rmp is not None and not fault.is_private and self.rmp.is_private(pfn):
            self.rmp.rmp_make_shared(pfn)
        return self.tdp.kvm_tdp_mmu_map(vm, fault, root, goal, pfn, make_leaf)

    # ------------------------------------------------------------------ zapping
    def roots_for_range(self, range: GfnRange, types_extra: int = 0) -> list[TdpRoot]:
        types = kvm_gfn_range_filter_to_root_types(self.tdx is not None, range.attr_filter)
        return self.tdp.roots_of(types | types_extra, range.slot.as_id)

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        """kvm_unmap_gfn_range -> kvm_tdp_mmu_unmap_gfn_range: filter -> root types, plus
        invalid roots, of the range's address space, each zapped by tdp_mmu_zap_leafs with
        ``can_yield = range.may_block``. A flow where it may pause (a range that may block
        and spans two yield regions, or mirror roots: TDX's removal steps); else a plain
        zap, which is what the flow would do without a point on its way."""
        roots = self.roots_for_range(range, KVM_INVALID_ROOTS)
        start, end = range.start, range.end
        pauses = range.may_block and start // ZAP_YIELD_GFNS != (end - 1) // ZAP_YIELD_GFNS
        if not pauses:
            for root in roots:
                if root.is_mirror:
                    pauses = True
                    break
        if pauses:
            return self._unmap_gfn_range(vm, range, roots)
        flush = False
        zap_leafs_locked = self.tdp.zap_leafs_locked
        for root in roots:
            flush |= zap_leafs_locked(vm, root, start, end)
        return flush

    def _unmap_gfn_range(self, vm, range, roots):
        flush = False
        for root in roots:
            flush = yield from self.tdp.tdp_mmu_zap_leafs(vm, root, range.start, range.end,
                                                          range.may_block, flush)
        return flush

    def kvm_mmu_zap_all_fast(self, vm):
        """mmu.c kvm_mmu_zap_all_fast, a flow. Under kvm->mmu_lock for write
        (``slot_flush_lock_wait``): invalidate the direct roots (never mirror roots: the S-EPT
        cannot be zapped fast) and make every vCPU drop its root
        (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS): each vCPU loads the new root when it next enters
        the guest (``kvm_mmu_reload``), a fault in flight keeps the old one and retries
        (``map_leaf``); the model allocates the new roots here and flushes the vCPUs' TLBs,
        standing for the flush a new root gets on load. Then, the write lock dropped,
        kvm_tdp_mmu_zap_invalidated_roots with ``shared``: under the lock for read
        (``x86_zap_invalidated_lock_wait``) the old roots are zapped whole and the TDP MMU's
        reference put (the last vCPU to reload frees each), while faults run beside it and
        an MMU notifier, which zaps invalid roots too, waits, unless the zap yields
        (``tdp_zap_yield``: cond_resched_rwlock_read between two regions)."""
        lock = vm.mmu_lock
        yield from lock.write_lock(SLOT_FLUSH_LOCK_WAIT)
        try:
            old = [r for r in self.tdp.roots if not r.is_mirror and not r.invalid]
            for root in old:
                root.invalid = True
            self.direct_roots = {}
            self._alloc_roots()
            vm.flush_remote_tlbs()
        finally:
            lock.write_unlock()
        vm.stats["x86_tdp.zap_all_fast"] += 1
        vm.trace("x86_tdp.zap_all_fast")
        yield from lock.read_lock(X86_ZAP_INVALIDATED_LOCK_WAIT)
        try:
            for root in old:
                yield from self.tdp.tdp_mmu_zap_root(vm, root, shared=True)
                root.zapped = True
                self.tdp.kvm_tdp_mmu_put_root(root)
        finally:
            lock.read_unlock()

    @hookimpl
    def flush_shadow_memslot(self, vm, slot):
        """kvm_arch_flush_shadow_memslot: DEFAULT_VM with KVM_X86_QUIRK_SLOT_ZAP_ALL zaps
        everything fast; other VMs zap the slot, both aliases, and flush
        (kvm_mmu_zap_memslot): the core's default (None: not handled here)."""
        if self.vm_type == KVM_X86_DEFAULT_VM and self.slot_zap_all_quirk:
            return self.kvm_mmu_zap_all_fast(vm)
        return None

    # ------------------------------------------------------------------ memslots
    @hookimpl
    def prepare_memory_region(self, vm, old, new, change):
        """x86.c kvm_arch_prepare_memory_region."""
        if change in (KVM_MR_CREATE, KVM_MR_MOVE):
            last = new.base_gfn + new.npages - 1
            if last >= 1 << (self.max_gpa_bits - 12):
                raise KvmError(errno.EINVAL, f"guest_phys_addr: the slot ends beyond the "
                                             f"{self.max_gpa_bits}-bit guest physical space")
            if self.tdx is not None and last & self.tdx.shared_gfn_bit:
                raise KvmError(errno.EINVAL, "guest_phys_addr: a TDX memslot may not include "
                                             f"the shared bit {self.tdx.shared_bit}")
            mmu.kvm_alloc_memslot_metadata(new)
            if self.has_private_mem:
                mmu.kvm_mmu_init_memslot_memory_attributes(vm, new)
        elif change == KVM_MR_FLAGS_ONLY and old is not None and new is not None:
            if new.arch is not old.arch:
                new.arch.update(old.arch)

    @hookimpl
    def commit_memory_region(self, vm, old, new, change):
        """x86.c kvm_arch_commit_memory_region -> kvm_mmu_slot_apply_flags (a flow when dirty
        logging is toggled: recovering huge pages, or starting to log), and
        kvm_arch_memslots_updated's MMIO generation wrap check."""
        new_flags = new.flags if new is not None else 0
        as_id = (new or old).as_id
        gen = vm.memslot_generation(as_id)
        if gen & MMIO_SPTE_GEN_MASK == 0 and gen:
            # kvm_mmu_invalidate_mmio_sptes: the masked generation wrapped.
            vm.stats["x86_tdp.mmio_gen_wrap"] += 1
            drive(self.kvm_mmu_zap_all_fast(vm))
        if change != KVM_MR_FLAGS_ONLY or new_flags & KVM_MEM_READONLY:
            return
        toggled = dirty_logging_toggled(old, new)
        if toggled < 0:
            return self._shared_step(vm, self.kvm_mmu_recover_huge_pages, vm, new, first=True)
        if toggled and not vm.dirty_log_manual_protect_and_init_set():
            return self.kvm_mmu_slot_apply_flags(vm, new)
        return None

    def kvm_mmu_slot_apply_flags(self, vm, slot):
        """x86.c kvm_mmu_slot_apply_flags when logging starts, a flow: each step takes
        kvm->mmu_lock for read and drops it (``x86_dlog_lock_wait`` before every step but
        the first, which runs right after the commit's own point), so faults run beside
        them and a notifier's zap between them: eager split (kvm_mmu_slot_try_split_huge_pages),
        then with PML clear the D bits (kvm_mmu_slot_leaf_clear_dirty) and write-protect the
        huge leaves, else write-protect every leaf (kvm_mmu_slot_remove_write_access); then the
        memslot's TLB flush with no mmu_lock held (slots_lock, still held, keeps the dirty-log
        ioctls out until it is done). The write protection and D-bit clearing yield the
        lock between 2 MiB regions too (``x86_dlog_yield``, tdp_mmu_iter_cond_resched)."""
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        first = True
        if self.eager_page_split:
            yield from self._shared_step(vm, self.split_slot, vm, slot, start, end, READ,
                                         first=True)
            first = False
        if self.pml:
            yield from self._shared_step(vm, self._each_root, vm, slot,
                                         self.tdp.clear_dirty_gfn_range, start, end,
                                         self.ad_disabled, first=first)
            yield from self._shared_step(vm, self._each_root, vm, slot,
                                         self.tdp.wrprot_gfn_range, start, end, PG_LEVEL_2M)
        else:
            yield from self._shared_step(vm, self._each_root, vm, slot,
                                         self.tdp.wrprot_gfn_range, start, end, PG_LEVEL_4K,
                                         first=first)
        vm.flush_remote_tlbs_memslot(slot)

    def _each_root(self, vm, slot, fn, *args):
        """The flow ``fn(vm, root, *args)`` on every valid root of ``slot``'s address space
        (for_each_valid_tdp_mmu_root_yield_safe: a root invalidated while an earlier one's
        walk yielded is skipped)."""
        for root in self.tdp.roots_of(KVM_VALID_ROOTS, slot.as_id):
            if not root.invalid:
                yield from fn(vm, root, *args)

    @staticmethod
    def _shared_step(vm, fn, *args, first: bool = False):
        """``fn(*args)`` under kvm->mmu_lock for read, taken at ``x86_dlog_lock_wait``, or at
        once for a ``first`` step when it is free (the commit's point came just before)."""
        lock = vm.mmu_lock
        if first:
            yield from lock.take(READ, X86_DLOG_LOCK_WAIT)
        else:
            yield from lock.read_lock(X86_DLOG_LOCK_WAIT)
        try:
            r = fn(*args)
            if type(r) is GeneratorType:
                yield from r
        finally:
            lock.read_unlock()

    def split_slot(self, vm, slot, start: int, end: int, mode: str):
        """kvm_tdp_mmu_try_split_huge_pages to 4K over [start, end) of ``slot``, a flow under
        kvm->mmu_lock held in ``mode``, which each split drops to allocate its table."""
        for root in self.tdp.roots_of(KVM_DIRECT_ROOTS, slot.as_id):
            yield from self.tdp.split_huge_pages_range(vm, root, start, end, PG_LEVEL_4K, mode)

    def kvm_mmu_max_mapping_level(self, vm, slot, gfn: int) -> int:
        is_private = slot.has_gmem and vm.kvm_mem_is_private(gfn)
        host_level = None
        if slot.gmem_only or is_private:
            return PG_LEVEL_4K
        return mmu.kvm_mmu_max_mapping_level_(vm, slot, gfn, KVM_MAX_HUGEPAGE_LEVEL,
                                               is_private, self.max_huge_page_level,
                                               host_level)

    def kvm_mmu_recover_huge_pages(self, vm, slot) -> None:
        """mmu.c kvm_mmu_recover_huge_pages: collapse tables back into huge leaves after dirty
        logging, then flush the memslot if anything changed; under kvm->mmu_lock for read
        (the commit takes it). Private/gmem-only gfns stay 4K (their order is not known
        without a fault)."""
        changed = False
        for root in self.tdp.roots_of(KVM_DIRECT_ROOTS, slot.as_id):
            changed |= self.tdp.recover_huge_pages_range(
                vm, root, slot, lambda g: self.kvm_mmu_max_mapping_level(vm, slot, g))
        if changed:
            vm.flush_remote_tlbs_memslot(slot)

    # ------------------------------------------------------------------ attributes
    @hookimpl
    def pre_set_memory_attributes(self, vm, range):
        """mmu.c kvm_arch_pre_set_memory_attributes (§6.3): the x86 part, widening the
        invalidation to the huge pages that straddle the range and are not MIXED; then the
        core's default zaps the old kind (None: not handled here)."""
        if not self.has_private_mem:
            vm.stats["x86_tdp.warn_pre_set_no_private_mem"] += 1
            return False
        slot = range.slot
        slot_end = slot.base_gfn + slot.npages
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            nr = KVM_PAGES_PER_HPAGE(level)
            for gfn in {range.start & ~(nr - 1), (range.end - 1) & ~(nr - 1)}:
                straddles = gfn < range.start or gfn + nr > range.end
                if straddles and gfn >= slot.base_gfn and gfn + nr <= slot_end and \
                        not mmu.hugepage_test_mixed(slot, gfn, level):
                    vm.mmu_invalidate_range_add(gfn, gfn + nr)
        return None

    @hookimpl
    def post_set_memory_attributes(self, vm, range):
        if not self.has_private_mem:
            return False
        mmu.kvm_arch_post_set_memory_attributes(vm, range.slot, range.start, range.end,
                                                range.arg)
        return False

    # ------------------------------------------------------------------ aging
    def _age(self, vm, range, test_only: bool) -> bool:
        young = False
        types = kvm_gfn_range_filter_to_root_types(self.tdx is not None, range.attr_filter)
        for root in self.tdp.roots_of(types, range.slot.as_id):
            young |= self.tdp.age_gfn_range(vm, root, range.start, range.end, test_only)
            if young and test_only:
                break
        return young

    @hookimpl
    def age_gfn(self, vm, range):
        return self._age(vm, range, False)

    @hookimpl
    def test_age_gfn(self, vm, range):
        return self._age(vm, range, True)

    # ------------------------------------------------------------------ dirty logging
    @hookimpl
    def sync_dirty_log(self, vm, slot):
        """kvm_arch_sync_dirty_log: kick vCPUs so their PML buffers are drained.
        Simplified: Linux only kicks (kvm_vcpu_kick does not wait), and each vCPU drains its
        buffer at its next VM exit (vmx_flush_pml_buffer), which may come after the bitmap
        was read; the model drains them here, as if every vCPU had exited first."""
        for vcpu in vm.vcpus:
            buf = vcpu.arch.get("pml")
            if buf is not None and len(buf):
                vmx_flush_pml_buffer(vm, vcpu, buf)

    @hookimpl
    def dirty_pending_gfns(self, vm, slot):
        """GPAs still in vCPUs' PML buffers (what sync_dirty_log would log now)."""
        out = []
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        for vcpu in vm.vcpus:
            buf = vcpu.arch.get("pml")
            if buf is not None and len(buf):
                out.extend(g for g in buf.pending_gfns() if start <= g < end)
        return out

    @hookimpl
    def enable_log_dirty_pt_masked(self, vm, slot, gfn_offset, mask):
        """mmu.c kvm_arch_mmu_enable_log_dirty_pt_masked, under kvm->mmu_lock for write: a
        flow when the slot was initially all dirty (the huge pages around the mask are split
        eagerly, which drops the lock, then write-protected)."""
        if not mask:
            return None
        base = slot.base_gfn + gfn_offset
        if vm.dirty_log_manual_protect_and_init_set():
            return self._protect_huge_then_masked(vm, slot, base, mask)
        self._clear_dirty_pt_masked(vm, slot, base, mask)
        return None

    def _protect_huge_then_masked(self, vm, slot, base: int, mask: int):
        start = base + (mask & -mask).bit_length() - 1
        end = base + mask.bit_length() - 1
        if self.eager_page_split:
            yield from self.split_slot(vm, slot, start, end + 1, WRITE)
        for root in self.tdp.roots_of(KVM_VALID_ROOTS, slot.as_id):
            self.write_protect_gfn(vm, root, start, PG_LEVEL_2M)
            if (start << 12) + (1 << 21) - 1 >> 21 != (end << 12) + (1 << 21) - 1 >> 21:
                self.write_protect_gfn(vm, root, end, PG_LEVEL_2M)
        self._clear_dirty_pt_masked(vm, slot, base, mask)

    def _clear_dirty_pt_masked(self, vm, slot, base: int, mask: int) -> None:
        """kvm_mmu_clear_dirty_pt_masked (PML: clear D) or kvm_mmu_write_protect_pt_masked."""
        for root in self.tdp.roots_of(KVM_VALID_ROOTS, slot.as_id):
            self.tdp.clear_dirty_pt_masked(vm, root, base, mask,
                                           wrprot=not self.pml or self.ad_disabled)

    def write_protect_gfn(self, vm, root, gfn: int, min_level: int) -> bool:
        """tdp_mmu.c write_protect_gfn: clear W and MMU-writable (write tracking); needs a
        flush, which the GET/CLEAR caller does."""
        return drive(self.tdp.clear_spte_bits(vm, root, gfn, gfn + 1, PT_WRITABLE_MASK |
                                              shadow_mmu_writable_mask, min_level))

    # ------------------------------------------------------------------ introspection
    def _root_leaves(self, vm, root: TdpRoot, start: int, end: int) -> list[Mapping]:
        perms = self.tdp.fmt.perms
        # A mirror leaf is private; for one-table VMs the RMP or the attribute says.
        per_gfn = self.has_private_mem and self.tdx is None
        out = []
        for table, idx, level, gfn in self.tdp.iter_leaves(root, start, end, snapshot=True):
            spte = table[idx]
            pfn = spte_to_pfn(spte)
            p = perms(spte)
            out.append(Mapping(gfn, KVM_HPAGE_SIZE(level), pfn, bool(p & PERM_R),
                               bool(p & PERM_W), bool(p & PERM_X), root.is_mirror or (
                                   per_gfn and self.gfn_is_private_mapping(vm, gfn, pfn)),
                               bool(p & PERM_A), bool(p & PERM_D), level, spte,
                               bool(spte & shadow_mmu_writable_mask)))
        return out

    @hookimpl
    def leaves(self, vm, start, end, as_id):
        """Present leaves of ``as_id``, shared (direct root) before private (mirror)."""
        shared = self._root_leaves(vm, self.direct_roots[as_id], start, end)
        if self.tdx is None:
            return iter(shared)
        private = self._root_leaves(vm, self.mirror_roots[as_id], start, end)
        return heapq.merge(shared, private, key=lambda m: (m.gfn, m.private))

    @hookimpl
    def stale_leaves(self, vm):
        """The leaves of the invalid roots, which kvm_tdp_mmu_unmap_gfn_range zaps too."""
        return [m for root in self.tdp.roots if root.invalid
                for m in self._root_leaves(vm, root, 0, KVM_PAGES_PER_HPAGE(root.level + 1))]

    @hookimpl
    def page_table_bytes(self, vm):
        return self.tdp.store.bytes_used

    @hookimpl
    def check_invariants(self, vm):
        return invariants.check_invariants(self, vm)
