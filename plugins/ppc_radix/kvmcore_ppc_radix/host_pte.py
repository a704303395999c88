"""The host Linux PTE behind a fault (find_kvm_host_pte, arch/powerpc/include/asm/kvm_book3s_64.h).

Since v4.19 (71d29f43b633) the partition PTE is built from the host Linux PTE for RAM and IO
alike: its RPN, mapping size and cache attributes. The model's host keeps no Linux PTE words, so
this module rebuilds the one Linux would read from what the core's generic hva -> pfn found:
``fault.pfn``, ``fault.max_size`` (the host mapping level), ``fault.map_writable``,
``fault.pfnmap`` / ``fault.cacheable`` and the host VMA (``fault.host_vma``):

- V | L | R (the page was just faulted in) | READ | WRITE if writable | C if writable
  (GUP-for-write dirtied it) | EXEC if the VMA is executable;
- ATT: 0 for cacheable memory, 0x20 (``pgprot_noncached``, what vfio-pci and most drivers'
  remap_pfn_range use) for a non-cacheable VM_IO|VM_PFNMAP range, 0x30 when the VMA is
  write-combining (``pgprot_writecombine``);
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
    pgprot_writecombine,
)
from .radix import PMD_SHIFT, PUD_SHIFT


def host_shift_of(max_size: int, page_shift: int) -> int:
    """The host PTE level: 30 for a PUD leaf, 21 for a PMD leaf, else PAGE_SHIFT."""
    if max_size >= 1 << PUD_SHIFT:
        return PUD_SHIFT
    if max_size >= 1 << PMD_SHIFT:
        return PMD_SHIFT
    return page_shift


def _vma_attr(vma, *names, default=None):
    for name in names:
        value = getattr(vma, name, None)
        if value is not None:
            return value
    return default


def host_pgprot(fault) -> int:
    """The protection and attribute bits of the host PTE (see the module docstring)."""
    prot = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_READ
    if fault.map_writable:
        prot |= _PAGE_WRITE | _PAGE_DIRTY
    vma = fault.host_vma
    vprot = _vma_attr(vma, "prot", default="") if vma is not None else ""
    if isinstance(vprot, str) and "x" in vprot:
        prot |= _PAGE_EXEC
    cache = _vma_attr(vma, "cache", "cache_mode", "pgprot_cache", default=None) \
        if vma is not None else None
    if cache in ("wc", "writecombine", "tolerant"):
        prot = pgprot_writecombine(prot)
    elif cache in ("uc", "noncached", "guarded") or (
            cache is None and (fault.pfnmap or not fault.cacheable)):
        prot = pgprot_noncached(prot)
    if fault.pfnmap:
        prot |= _PAGE_SPECIAL
    return prot


def find_kvm_host_pte(vm, be, fault):
    """Under mmu_lock: None when mmu_invalidate_retry(kvm, mmu_seq) (the caller resumes the
    guest), else ``(host_pte, shift, upgrade_write)`` with the host PTE in CPU order."""
    if be.mmu_invalidate_retry(vm, fault.mmu_seq):
        return None
    page_shift = be.cfg.page_shift
    shift = host_shift_of(fault.max_size, page_shift)
    pa = (fault.pfn << 12) & ~((1 << shift) - 1)
    return pfn_pte(pa, host_pgprot(fault), page_shift), shift, bool(fault.map_writable)


def host_base_page_contiguous(host, block: int, page_size: int) -> bool:
    """Whether the 4 KiB host PTEs of ``[block, block + page_size)`` form one naturally
    aligned physical block (what a 64K-page host's single PTE would map)."""
    n = page_size >> 12
    first = host.lookup_pte(block)
    if first is None or first[0] % n:
        return False
    if first[2] >= page_size:
        return True
    for i in range(1, n):
        e = host.lookup_pte(block + (i << 12))
        if e is None or e[0] != first[0] + i:
            return False
    return True


def make_host_base_page_writable(host, block: int, page_size: int) -> bool:
    """One 64K host PTE has one W bit: when the faulting 4 KiB page is writable, make its
    siblings writable too (wp_page_reuse: same pfns, no notifier). False if the host refuses
    for any of them (the leaf is then mapped read-only)."""
    for i in range(page_size >> 12):
        addr = block + (i << 12)
        e = host.lookup_pte(addr)
        if e is not None and e[1]:
            continue
        try:
            host.handle_mm_fault(addr, True)
        except Exception:  # SigSegv / SigBus: the host will not make it writable
            return False
    return True


def make_host_base_page(vm, be, hva: int) -> bool:
    """Emulate a host whose PAGE_SIZE is the backend's base page (ppc64's 64K kernels).

    The core's host has 4 KiB pages; a 64K partition leaf maps one physically contiguous, 64K
    aligned block, which a 64K-page host would always provide. When the block under ``hva``
    is not such a block, populate it as one: a VM_IO|VM_PFNMAP range runs the driver's fault
    handler for each missing page (device pfns are contiguous); anonymous and shared 4K
    memory is moved into a fresh aligned block (contents copied) inside an MMU-notifier
    invalidation, as a collapse would. Returns True when the host changed (the fault then
    retries, since the invalidation bumped mmu_invalidate_seq)."""
    host = vm.host
    page_size = be.cfg.page_size
    block = hva & ~(page_size - 1)
    if host_base_page_contiguous(host, block, page_size):
        return False
    vma = host.find_vma(hva)
    if vma is None or block < vma.start or block + page_size > vma.end:
        return False
    n = page_size >> 12
    if vma.kind == "pfnmap":
        for i in range(n):
            if host.lookup_pte(block + (i << 12)) is None:
                host.handle_mm_fault(block + (i << 12), False)
        vm.stats["ppc_host_64k_populate"] += 1
        return True
    if vma.kind not in ("anon", "shared"):
        return False
    writable = "w" in vma.prot
    new = host.alloc_frames(n)
    with host.invalidating(block, page_size):
        for i in range(n):
            addr = block + (i << 12)
            e = host.lookup_pte(addr)
            if e is not None and e[0] != host.zero_pfn:
                host.copy_frames(e[0], new + i, 1)
            elif vma.kind == "shared" and vma.backing is not None:
                old = vma.backing.pages.get(vma.pgoff_of(addr))
                if old is not None:
                    host.copy_frames(old, new + i, 1)
            host._set_pte(addr, new + i, writable)
            if vma.kind == "shared" and vma.backing is not None:
                vma.backing.pages[vma.pgoff_of(addr)] = new + i
    vm.stats["ppc_host_64k_collapse"] += 1
    return True
