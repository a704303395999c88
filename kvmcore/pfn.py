"""gfn -> hva -> pfn (virt/kvm/kvm_main.c kvm_follow_pfn / hva_to_pfn; reference §7).

Results are a pfn or one of the KVM_PFN_ERR_* values, as in Linux; ``writable`` says whether a
writable mapping was obtained (map_writable).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .errors import EHWPOISON
from .uapi import (
    KVM_PFN_ERR_FAULT,
    KVM_PFN_ERR_HWPOISON,
    KVM_PFN_ERR_RO_FAULT,
    KVM_PFN_NOSLOT,
)

if TYPE_CHECKING:
    from .memslots import Memslot
    from .kvm import Kvm

EAGAIN = -errno.EAGAIN
#: hva_to_pfn_remapped retries while the driver's fault handler keeps dropping the mmap lock;
#: a bound keeps a misbehaving model from spinning for ever.
MAX_REMAPPED_RETRIES = 8


def kvm_follow_pfn(vm: Kvm, slot: Memslot | None, gfn: int, write: bool,
                   want_writable: bool = True) -> tuple[int, bool, int]:
    """kvm_follow_pfn: ``(pfn, writable, hva)``. A read-only slot never yields a writable
    mapping, and a write to it is KVM_PFN_ERR_RO_FAULT; no or an INVALID slot is
    KVM_PFN_NOSLOT."""
    if slot is None or slot.invalid:
        return KVM_PFN_NOSLOT, False, 0
    hva = slot.gfn_to_hva(gfn)
    if slot.readonly:
        if write:
            return KVM_PFN_ERR_RO_FAULT, False, hva
        want_writable = False
    pfn, writable = hva_to_pfn(vm, hva, write, want_writable)
    return pfn, writable, hva


def hva_to_pfn(vm: Kvm, hva: int, write: bool, want_writable: bool) -> tuple[int, bool]:
    """hva_to_pfn: fast path (writes, or reads that want a writable mapping), slow path (GUP
    with FOLL_HWPOISON, then a writable GUP-fast upgrade for reads), then the VMA: VM_IO |
    VM_PFNMAP goes through hva_to_pfn_remapped with its -EAGAIN retry."""
    host = vm.host
    if write or want_writable:
        got = host.gup_fast(hva, True)
        if got is not None:
            return got[0], True
    try:
        pfn = host.gup(hva, write)
    except OSError as e:
        if e.errno == EHWPOISON:
            return KVM_PFN_ERR_HWPOISON, False
    else:
        writable = write
        if not write and want_writable:
            got = host.gup_fast(hva, True)
            if got is not None:
                pfn, writable = got[0], True
        return pfn, writable
    for _attempt in range(MAX_REMAPPED_RETRIES):
        vma = host.find_vma(hva)
        if vma is None or not vma.io_pfnmap:
            return KVM_PFN_ERR_FAULT, False
        r = hva_to_pfn_remapped(vm, hva, write)
        if r == EAGAIN:
            vm.stats["hva_to_pfn_remapped_retry"] += 1
            continue
        if isinstance(r, int):
            return KVM_PFN_ERR_FAULT, False
        # kvm_resolve_pfn reports the PTE's writability only to a caller that asked for it:
        # a read-only slot's kvm_follow_pfn dropped its map_writable.
        return r[0], r[1] and (write or want_writable)
    return KVM_PFN_ERR_FAULT, False


def hva_to_pfn_remapped(vm: Kvm, hva: int, write: bool):
    """hva_to_pfn_remapped: follow the PTE of a VM_IO|VM_PFNMAP page; if it is not there,
    fixup_user_fault() populates it and, having dropped the mmap lock, asks for a retry. No
    page reference is taken: MMU notifiers keep the mapping honest."""
    host = vm.host
    pte = host.follow_pfnmap(hva)
    if pte is None:
        try:
            unlocked = host.fixup_user_fault(hva, write)
        except OSError as e:
            return -e.errno
        vm.stats["hva_to_pfn_fixup"] += 1
        if unlocked:
            return EAGAIN
        pte = host.follow_pfnmap(hva)
        if pte is None:
            return -errno.EFAULT
    pfn, writable = pte
    if write and not writable:
        return KVM_PFN_ERR_RO_FAULT, False
    return pfn, writable
