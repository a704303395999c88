"""The hardware side: the EPT walk a vCPU's access performs, with the A/D updates, PML
logging, EPT violation vs misconfiguration, and the error code KVM derives from the exit
qualification (vmx/common.h __vmx_handle_ept_violation, vmx.c handle_ept_misconfig;
tdx.c tdx_handle_ept_violation; svm.c npf_interception for SNP's RMP faults).
"""

from __future__ import annotations

from kvmcore.records import ACCESS_FLAG, MISCONFIG, NOT_PRESENT, PERMISSION, Translation, Violation

from .spte import (
    EPT_ILLEGAL_MEMTYPES,
    PT_PAGE_SIZE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_MT_EPTE_SHIFT,
    VMX_EPT_RWX_MASK,
)

# PFERR bits (arch/x86/include/asm/kvm_host.h)
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_PK_MASK = 1 << 5
PFERR_SS_MASK = 1 << 6
PFERR_SGX_MASK = 1 << 15
PFERR_GUEST_RMP_MASK = 1 << 31
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PFERR_GUEST_ENC_MASK = 1 << 34
PFERR_GUEST_SIZEM_MASK = 1 << 35
PFERR_GUEST_VMPL_MASK = 1 << 36
PFERR_IMPLICIT_ACCESS = 1 << 48
PFERR_PRIVATE_ACCESS = 1 << 49
PFERR_SYNTHETIC_MASK = PFERR_IMPLICIT_ACCESS | PFERR_PRIVATE_ACCESS


def access_error_code(write: bool, exec_: bool) -> int:
    """__vmx_handle_ept_violation: a read reports PFERR_USER_MASK, a write PFERR_WRITE_MASK,
    a fetch PFERR_FETCH_MASK; the access was to the final guest-physical address."""
    if exec_:
        code = PFERR_FETCH_MASK
    elif write:
        code = PFERR_WRITE_MASK
    else:
        code = PFERR_USER_MASK
    return code | PFERR_GUEST_FINAL_MASK


def is_ept_misconfig(spte: int, leaf: bool) -> bool:
    """__reset_rsvds_bits_mask_ept: XWR 010b/110b, and an illegal memory type in a leaf."""
    rwx = spte & VMX_EPT_RWX_MASK
    if rwx in (0x2, 0x6):
        return True
    if leaf and (spte >> VMX_EPT_MT_EPTE_SHIFT) & 0x7 in EPT_ILLEGAL_MEMTYPES:
        return True
    return False


def ept_translate(backend, vm, vcpu, gpa: int, access) -> Translation | Violation:
    """One guest access through the EPT: private/shared per VM type, the root it uses, the
    walk, and on success the A/D (and PML) updates the CPU makes. The walk is the core's
    ``PageTable.lookup``, which descends through KVM's present non-leaf SPTEs; the CPU
    descends through any entry with R, W or X, but KVM writes every non-leaf SPTE present and
    RWX (invariant 6) and every other entry with neither, so the two walks end on the same
    entry, whose RWX decides below."""
    kind = access.kind
    write = kind == "write"
    exec_ = kind == "fetch"
    tdx = backend.tdx
    if tdx is not None:
        bit = 1 << tdx.shared_bit
        private = (not gpa & bit) if access.private is None else bool(access.private)
        gfn = (gpa & ~bit) >> 12
        # A TD has one address space: no SMM.
        root = backend.mirror_roots[0] if private else backend.direct_roots[0]
    else:
        gfn = gpa >> 12
        private = backend.access_is_private(vm, gfn, access) if backend.has_private_mem \
            else False
        # The root the vCPU runs on, reloaded at entry when a memslot update made it
        # obsolete (vcpu_enter_guest: the request, then kvm_mmu_reload).
        root = vcpu.arch["roots"].get(vcpu.as_id)
        if root is None or root.invalid:
            backend.kvm_mmu_free_obsolete_roots(vm, vcpu)
            root = backend.kvm_mmu_reload(vm, vcpu)
    pos, table, idx, spte = root.pt.lookup((gfn + root.gfn_bits) << 12)
    level = root.level - pos
    rwx = spte & VMX_EPT_RWX_MASK
    leaf = level == 1 or bool(spte & PT_PAGE_SIZE_MASK)
    if rwx == 0 or rwx == 0x2 or rwx == 0x6 or not (
            rwx & 0x4 if exec_ else rwx & 0x2 if write else rwx & 0x1) or (
            leaf and (spte >> VMX_EPT_MT_EPTE_SHIFT) & 0x7 in EPT_ILLEGAL_MEMTYPES):
        if root.is_mirror and tdx.removing:
            # The CPU walks the TDX module's S-EPT, not KVM's mirror: a page whose mirror
            # SPTE is zapped stays mapped there until TDH.MEM.RANGE.BLOCK.
            pfn = tdx.sept_translation(gfn)
            if pfn is not None:
                return Translation(gfn, pfn, 4096, True, True, True, True, True)
        return _violation(spte, rwx, leaf, level, gfn, private, write or (
            private and tdx is not None), exec_)
    size = 4096 << (9 * (level - 1))
    pfn = ((spte & SPTE_BASE_ADDR_MASK) >> 12) + (gfn & ((size >> 12) - 1))
    rmp = backend.rmp
    if rmp is not None and rmp.is_private(pfn) != private:
        err = access_error_code(write, exec_) | (PFERR_PRIVATE_ACCESS if private else 0)
        return Violation(PERMISSION, gfn, private, level, size,
                         err | PFERR_PRESENT_MASK | PFERR_GUEST_RMP_MASK |
                         (PFERR_GUEST_ENC_MASK if private else 0))
    writable = bool(rwx & 0x2)
    if root.is_mirror or (spte & SPTE_TDP_AD_MASK) == SPTE_TDP_AD_DISABLED:
        # No A/D in this table (or the TDX module's S-EPT, invisible to KVM): a TLB entry
        # from a read may serve writes.
        dirty = writable
    else:
        new = spte | VMX_EPT_ACCESS_BIT
        if write:
            new |= VMX_EPT_DIRTY_BIT
            if not spte & VMX_EPT_DIRTY_BIT and backend.pml_logging(vm):
                backend.pml_log(vm, vcpu, gfn << 12)
        if new != spte:
            table[idx] = new
        dirty = bool(new & VMX_EPT_DIRTY_BIT)
    return Translation(gfn, pfn, size, bool(rwx & 0x1), writable, bool(rwx & 0x4), dirty,
                       private)


def _violation(spte: int, rwx: int, leaf: bool, level: int, gfn: int, private: bool,
               write: bool, exec_: bool) -> Violation:
    """EPT violation (not present, access-tracked, permission) or misconfiguration, with the
    error code __vmx_handle_ept_violation / handle_ept_misconfig give kvm_mmu_page_fault."""
    size = 4096 << (9 * (level - 1))
    priv = PFERR_PRIVATE_ACCESS if private else 0
    if rwx == 0:
        err = access_error_code(write, exec_) | priv
        tracked = (spte & SPTE_MMU_PRESENT_MASK and leaf
                   and (spte & SPTE_TDP_AD_MASK) == SPTE_TDP_AD_DISABLED)
        return Violation(ACCESS_FLAG if tracked else NOT_PRESENT, gfn, private, level, size, err)
    if is_ept_misconfig(spte, leaf):
        return Violation(MISCONFIG, gfn, private, level, size, PFERR_RSVD_MASK | priv)
    err = access_error_code(write, exec_) | priv | PFERR_PRESENT_MASK
    return Violation(PERMISSION, gfn, private, level, size, err)
