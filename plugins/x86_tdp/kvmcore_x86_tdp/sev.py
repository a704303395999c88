"""SEV-SNP: the RMP as far as the MMU sees it (arch/x86/kvm/svm/sev.c).

The RMP records, per host pfn, whether the page is guest-owned (assigned) and at which page
size. ``sev_gmem_prepare`` assigns a guest_memfd page when it is first handed to the guest
(the model does it when a private fault resolves its pfn, as the core has no
kvm_arch_gmem_prepare hook), at 2M when the folio allows it and the whole 2M pfn range is
still shared (is_large_rmp_possible). ``sev_gmem_max_mapping_level`` caps private mappings at
the RMP entry's size. The hardware's RMP check on a nested page-table walk is in
``ept.translate``: a private (C-bit) access to a page that is not guest-owned, or a shared
access to a guest-owned page, is an #NPF with PFERR_GUEST_RMP_MASK.

Simplification: SNP runs on AMD NPT, whose entries are x86 PTEs; this backend keeps its EPT
format for every VM type and models only the RMP rules.
"""

from __future__ import annotations

from .spte import KVM_PAGES_PER_HPAGE, PG_LEVEL_2M, PG_LEVEL_4K


class Rmp:
    def __init__(self):
        #: pfn -> RMP page level of the guest-owned page.
        self.assigned: dict[int, int] = {}

    def is_private(self, pfn: int) -> bool:
        return pfn in self.assigned

    def is_large_rmp_possible(self, pfn: int, max_order: int) -> bool:
        if max_order < 9:
            return False
        base = pfn & ~(KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) - 1)
        return not any(p in self.assigned for p in range(base, base + 512))

    def sev_gmem_prepare(self, pfn: int, gfn: int, max_order: int) -> None:
        """Make ``pfn`` guest-owned (rmp_make_private), at 2M when possible."""
        if pfn in self.assigned:
            return
        if self.is_large_rmp_possible(pfn, max_order) and (pfn - gfn) % 512 == 0:
            base = pfn & ~511
            for p in range(base, base + 512):
                self.assigned[p] = PG_LEVEL_2M
        else:
            self.assigned[pfn] = PG_LEVEL_4K

    def rmp_make_shared(self, pfn: int) -> None:
        """kvm_arch_gmem_invalidate when the host reuses a frame as shared memory."""
        level = self.assigned.pop(pfn, None)
        if level == PG_LEVEL_2M:
            base = pfn & ~511
            for p in range(base, base + 512):
                if self.assigned.get(p) == PG_LEVEL_2M:
                    self.assigned[p] = PG_LEVEL_4K

    def sev_gmem_max_mapping_level(self, pfn: int) -> int:
        """The RMP entry's page size (4K when the page is not assigned)."""
        return self.assigned.get(pfn, PG_LEVEL_4K)
