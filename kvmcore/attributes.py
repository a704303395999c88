"""Memory attributes (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, reference §4).

Linux stores one xarray value per gfn; the model stores maximal runs ``[start, end) -> value``
of non-zero values, sorted by start, so converting 1 TiB is one entry and every query is a
bisection. Zero is "no entry", as in Linux.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE


U64 = 1 << 64


class AttributeRanges:
    """gfn -> attribute bits as non-overlapping, non-adjacent-equal runs.

    The runs are three parallel lists sorted by start, searched with ``bisect`` (C code), as
    ``MemslotSet``'s indexes are: a lookup is one bisection and an update one memmove of the
    runs after it, cheaper than a balanced tree at the few runs a VM's conversions leave (and
    a fresh VM, one per explored schedule, builds three empty lists)."""

    def __init__(self):
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._values: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def get(self, gfn: int) -> int:
        idx = bisect_right(self._starts, gfn) - 1
        if idx < 0 or gfn >= self._ends[idx]:
            return 0
        return self._values[idx]

    def runs(self, start: int = 0, end: int = U64) -> Iterator[tuple[int, int, int]]:
        """Runs intersecting ``[start, end)``, clipped to it: ``(start, end, value)``."""
        starts, ends, values = self._starts, self._ends, self._values
        for idx in range(max(bisect_right(starts, start) - 1, 0), len(starts)):
            s = starts[idx]
            if s >= end:
                break
            e = ends[idx]
            if e > start:
                yield max(s, start), min(e, end), values[idx]

    def has(self, start: int, end: int, mask: int, attrs_: int) -> bool:
        """kvm_range_has_memory_attributes with ``mask`` already limited to what is
        supported."""
        if attrs_ & ~mask:
            return False
        if end - start == 1:
            return (self.get(start) & mask) == attrs_
        if not attrs_:
            return not any(v & mask for _s, _e, v in self.runs(start, end))
        cursor = start
        for s, e, v in self.runs(start, end):
            if s != cursor or (v & mask) != attrs_:
                return False
            cursor = e
        return cursor == end

    def set(self, start: int, end: int, value: int) -> None:
        starts, ends, values = self._starts, self._ends, self._values
        # The runs [lo, hi) intersect [start, end): they are replaced by the parts of the edge
        # runs outside it and, for a value, the new run merged with an equal neighbour.
        lo = bisect_right(starts, start) - 1
        if lo < 0 or ends[lo] <= start:
            lo += 1
        hi = bisect_left(starts, end)
        left = (starts[lo], start, values[lo]) if lo < hi and starts[lo] < start else None
        right = (end, ends[hi - 1], values[hi - 1]) if lo < hi and ends[hi - 1] > end else None
        middle = None
        if value:
            new_s, new_e = start, end
            if left is not None and left[2] == value:
                new_s, left = left[0], None
            elif left is None and lo > 0 and ends[lo - 1] == start and values[lo - 1] == value:
                lo -= 1
                new_s = starts[lo]
            if right is not None and right[2] == value:
                new_e, right = right[1], None
            elif right is None and hi < len(starts) and starts[hi] == end and \
                    values[hi] == value:
                new_e = ends[hi]
                hi += 1
            middle = (new_s, new_e, value)
        pieces = [run for run in (left, middle, right) if run is not None]
        starts[lo:hi] = [s for s, _e, _v in pieces]
        ends[lo:hi] = [e for _s, e, _v in pieces]
        values[lo:hi] = [v for _s, _e, v in pieces]


def supported_mem_attributes(capabilities: frozenset[str]) -> int:
    """kvm_supported_mem_attributes, for a VM with these capabilities."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if "private_mem" in capabilities else 0
