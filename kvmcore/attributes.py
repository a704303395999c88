"""Memory attributes (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, reference §4).

Linux stores one xarray value per gfn; the model stores maximal runs ``[start, end) -> value``
of non-zero values in a sorted map, so converting 1 TiB is one entry and every query is a
bisection. Zero is "no entry", as in Linux.
"""

from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

from .uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE


U64 = 1 << 64


class AttributeRanges:
    """gfn -> attribute bits as non-overlapping, non-adjacent-equal runs."""

    def __init__(self):
        self._runs = SortedDict()  # start -> (end, value)

    def __len__(self) -> int:
        return len(self._runs)

    def __bool__(self) -> bool:
        return bool(self._runs)

    def get(self, gfn: int) -> int:
        runs = self._runs
        idx = runs.bisect_right(gfn) - 1
        if idx < 0:
            return 0
        _start, (end, value) = runs.peekitem(idx)
        return value if gfn < end else 0

    def runs(self, start: int = 0, end: int = U64) -> Iterator[tuple[int, int, int]]:
        """Runs intersecting ``[start, end)``, clipped to it: ``(start, end, value)``."""
        runs = self._runs
        # The starts in order from the run that may straddle ``start``: one iterator over the
        # map's sorted keys (the whole map when that is its first run), not an index per key.
        first = runs.bisect_right(start) - 1
        for s in runs.islice(first) if first > 0 else runs:
            if s >= end:
                break
            e, v = runs[s]
            if e > start:
                yield max(s, start), min(e, end), v

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
        runs = self._runs
        # Split the runs that straddle the edges, drop everything inside, merge neighbours.
        for s, _e, v in list(self.runs(start, end)):
            key = runs.keys()[runs.bisect_right(s) - 1]
            orig_e, _ = runs.pop(key)
            if key < start:
                runs[key] = (start, v)
            if orig_e > end:
                runs[end] = (orig_e, v)
        if value:
            new_s, new_e = start, end
            idx = runs.bisect_right(start) - 1
            if idx >= 0:
                ps, (pe, pv) = runs.peekitem(idx)
                if pe == start and pv == value:
                    del runs[ps]
                    new_s = ps
            nxt = runs.get(end)
            if nxt is not None and nxt[1] == value:
                del runs[end]
                new_e = nxt[0]
            runs[new_s] = (new_e, value)


def supported_mem_attributes(capabilities: frozenset[str]) -> int:
    """kvm_supported_mem_attributes, for a VM with these capabilities."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if "private_mem" in capabilities else 0
