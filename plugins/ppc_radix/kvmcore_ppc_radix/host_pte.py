"""The host Linux PTE behind a fault (find_kvm_host_pte, arch/powerpc/include/asm/kvm_book3s_64.h).

Since v4.19 (71d29f43b633) the partition PTE is built from the host Linux PTE for RAM and IO
alike: its RPN, mapping size and cache attributes. ``find_kvm_host_pte`` reads the host page
table the way Linux's ``__find_linux_pte`` does: ``host.lookup_pte(hva)`` gives the mapping's
size (PAGE_SIZE, the PMD size, or a 2M/1G hugetlb page) and the frame under ``hva``, so the
RPN is the real first frame of that host page or block. The base page is the host's PAGE_SIZE
(4K or 64K), so a base-page leaf maps exactly one physically contiguous host page.

The model's host keeps no Linux PTE words, only ``(frame, writable, size)`` and the VMA; the
protection and attribute bits are rebuilt from them:

- V | L | R (the page was just faulted in) | READ | WRITE if the host PTE is writable | C if
  writable (the model's host has no clean writable PTEs: GUP-for-write or the write fault
  dirtied it) | EXEC if the VMA is executable;
- ATT: 0 for cacheable memory, 0x20 (``pgprot_noncached``, what vfio-pci and most drivers'
  remap_pfn_range use) for a VM_IO|VM_PFNMAP range. The core's Vma carries no cache mode, so
  a write-combining mapping (``pgprot_writecombine``, 0x30) is not modelled;
- _PAGE_SPECIAL for pfnmap ranges (remap_pfn_range installs special PTEs).
"""

from __future__ import annotations

from .pte import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_EXEC,
    _PAGE_PRESENT,
    _PAGE_READ,
    _PAGE_SPECIAL,
    _PAGE_WRITE,
    pfn_pte,
    pgprot_noncached,
)


def host_pgprot(vma, writable: bool) -> int:
    """The protection and attribute bits of the host PTE (see the module docstring)."""
    prot = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_READ
    if writable:
        prot |= _PAGE_WRITE | _PAGE_DIRTY
    if vma is None:
        return prot
    if "x" in vma.prot:
        prot |= _PAGE_EXEC
    if vma.io_pfnmap:
        prot = pgprot_noncached(prot) | _PAGE_SPECIAL
    return prot


def find_kvm_host_pte(vm, be, mmu_seq: int, hva: int):
    """find_kvm_host_pte(kvm, mmu_seq, ea, &shift), under mmu_lock: None when
    mmu_invalidate_retry(kvm, mmu_seq) or when the host has no PTE for ``hva`` (the caller
    resumes the guest, which re-faults); else ``(host_pte, shift)``, the host PTE in CPU order
    and log2 of the host mapping size (PAGE_SHIFT, the PMD shift, or a hugetlb page's)."""
    if be.mmu_invalidate_retry(vm, mmu_seq):
        return None
    host = vm.host
    e = host.lookup_pte(hva)
    if e is None:
        return None
    frame, writable, size = e
    first = frame - ((hva & (size - 1)) >> 12)        # the host page's / block's first frame
    prot = host_pgprot(host.find_vma(hva), writable)
    return pfn_pte(first << 12, prot, be.fmt.page_shift), size.bit_length() - 1
