"""Base pages larger than the host's 4 KiB frames (16K and 64K granules).

A Linux host running a 16K/64K-granule stage-2 has PAGE_SIZE equal to the granule, so one
stage-2 page is one physically contiguous host page. The model's host (kvmcore.host) has
4 KiB frames only; the 4 KiB pieces of one guest base page are contiguous only when the backing
made them so (THP, hugetlb, a device range).

What the model does: when the pieces are contiguous and aligned, the leaf's output address is
their real physical address. Otherwise the leaf carries a *granule frame*: a physical address
in a window the backend owns (``GRANULE_FRAME_BASE``), standing for "the host page made of these
4 KiB frames", and the backend keeps which frames those are. The descriptor format is
untouched; only the meaning of such an output address is the backend's. Identical frame lists
share one granule frame, so re-mapping the same memory yields the same descriptor (the map
path's "same mapping" rule then applies as on hardware).
"""

from __future__ import annotations

#: A window of the modelled PA space below 2^48 (the OA field's limit) and below the page-table
#: window, far above the host's frames.
GRANULE_FRAME_BASE = 1 << 46
GRANULE_FRAME_END = 1 << 47


class GranuleFrames:
    def __init__(self, granule: int):
        self.granule = granule
        self.npieces = granule >> 12
        self._next = GRANULE_FRAME_BASE
        self._free: list[int] = []
        self.by_pa: dict[int, tuple[int, ...]] = {}
        self.by_pfns: dict[tuple[int, ...], int] = {}
        self.refs: dict[int, int] = {}
        self._fresh: list[int] = []

    @staticmethod
    def is_frame(pa: int) -> bool:
        return GRANULE_FRAME_BASE <= pa < GRANULE_FRAME_END

    def phys_for(self, pfns: tuple[int, ...]) -> int:
        """The output address for a base page made of these host frames."""
        first = pfns[0]
        if first % self.npieces == 0 and all(p == first + i for i, p in enumerate(pfns)):
            return first << 12
        pa = self.by_pfns.get(pfns)
        if pa is None:
            if self._free:
                pa = self._free.pop()
            else:
                pa = self._next
                self._next += self.granule
            self.by_pfns[pfns] = pa
            self.by_pa[pa] = pfns
            self.refs[pa] = 0
            self._fresh.append(pa)
        return pa

    def pfn(self, pa: int, offset: int) -> int:
        """Host frame of the 4 KiB at ``offset`` bytes into the page at output address
        ``pa``."""
        if self.is_frame(pa):
            return self.by_pa[pa][offset >> 12]
        return (pa + offset) >> 12

    def get(self, pa: int) -> None:
        if self.is_frame(pa):
            self.refs[pa] += 1

    def put(self, pa: int) -> None:
        if self.is_frame(pa) and pa in self.refs:
            self.refs[pa] -= 1
            if self.refs[pa] <= 0:
                self.release(pa)

    def release(self, pa: int) -> None:
        pfns = self.by_pa.pop(pa)
        del self.by_pfns[pfns]
        del self.refs[pa]
        self._free.append(pa)

    def drop_unused(self) -> None:
        """Forget frames made since the last call that no leaf took (a map attempt that
        changed nothing)."""
        fresh, self._fresh = self._fresh, []
        for pa in fresh:
            if self.refs.get(pa, 1) <= 0:
                self.release(pa)
