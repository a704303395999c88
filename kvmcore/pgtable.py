"""Radix page tables in their real binary format, and one walker with visitor callbacks.

Tables are ``array('Q')`` objects of ``2**bits`` 64-bit entries, identified by the physical
address an upper-level entry carries in its address bits, exactly as the hardware would follow
them. The entry format (valid, table vs block, output address, permissions) belongs to each
backend: it hands the walker an ``EntryFormat``. The walker is modelled on arm64's
``hyp/pgtable.c`` (``kvm_pgtable_walk`` / ``__kvm_pgtable_visit``): a visitor is called for
leaves and invalid entries (``LEAF``), for table entries before descending (``TABLE_PRE``) and
after (``TABLE_POST``); after a ``LEAF`` or ``TABLE_PRE`` visit the walker reloads the entry,
so a visitor that installs a table (a split) sees the walk continue inside it, and one that
replaces a table by a block does not descend into the freed table.

Entries are stored in CPU byte order; a backend whose hardware is big-endian (Power) converts
at its boundary. There is no concurrent walker here: Linux's cmpxchg updates are plain stores.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable, Iterator
from types import GeneratorType
from typing import Protocol

import attrs

# Visit flags (KVM_PGTABLE_WALK_LEAF / TABLE_PRE / TABLE_POST).
LEAF = 1 << 0
TABLE_PRE = 1 << 1
TABLE_POST = 1 << 2

#: Return value of a visitor that asks the walker to stop (anything truthy stops).
STOP = 1


class EntryFormat(Protocol):
    """What the walker needs to know about a backend's entries. A format may also define
    ``empty`` (default 0): the value of an entry that maps nothing and needs no visit — x86
    fills new tables with SHADOW_NONPRESENT_VALUE, not 0."""

    def is_valid(self, pte: int, level: int) -> bool: ...

    def is_table(self, pte: int, level: int) -> bool: ...

    def table_address(self, pte: int, level: int) -> int: ...


@attrs.frozen
class Geometry:
    """The shape of a radix tree, root first.

    ``shifts[i]`` is the address shift of an entry at position ``i`` (the log2 of the size it
    maps), ``bits[i]`` the index bits of the table at position ``i`` (the root's includes
    concatenated tables), ``level_ids[i]`` the backend's own name for that level (x86: 4..1,
    arm64: start level..3, Power: 0..3). ``ia_bits`` is the input-address size.
    """

    shifts: tuple[int, ...] = attrs.field(converter=tuple)
    bits: tuple[int, ...] = attrs.field(converter=tuple)
    level_ids: tuple[int, ...] = attrs.field(converter=tuple)
    ia_bits: int = 48

    def __attrs_post_init__(self):
        if not (len(self.shifts) == len(self.bits) == len(self.level_ids)):
            raise ValueError("Geometry: shifts, bits and level_ids differ in length")

    @property
    def nlevels(self) -> int:
        return len(self.shifts)

    def entries(self, pos: int) -> int:
        return 1 << self.bits[pos]

    def index(self, pos: int, addr: int) -> int:
        return (addr >> self.shifts[pos]) & ((1 << self.bits[pos]) - 1)

    def pos_of(self, level_id: int) -> int:
        return self.level_ids.index(level_id)


class TableStore:
    """Page-table memory: allocates tables at physical addresses aligned to their size (at
    least ``min_align``) and finds them by the address an entry carries.

    Addresses come from a region of their own above ``base``, so they never collide with the
    data frames the host hands out. ``bytes_used`` is the memory a real kernel would spend.
    """

    def __init__(self, base: int = 1 << 50, min_align: int = 256):
        self._next = base
        self._min_align = min_align
        self._free: dict[int, list[int]] = {}
        self.tables: dict[int, array] = {}
        self.bytes_used = 0

    def alloc(self, nentries: int) -> int:
        nbytes = nentries * 8
        free = self._free.get(nbytes)
        if free:
            pa = free.pop()
        else:
            align = max(nbytes, self._min_align)
            pa = (self._next + align - 1) & ~(align - 1)
            self._next = pa + align
        self.tables[pa] = array("Q", bytes(nbytes))
        self.bytes_used += nbytes
        return pa

    def free(self, pa: int) -> None:
        table = self.tables.pop(pa)
        nbytes = len(table) * 8
        self.bytes_used -= nbytes
        self._free.setdefault(nbytes, []).append(pa)

    def __getitem__(self, pa: int) -> array:
        return self.tables[pa]

    def __contains__(self, pa: int) -> bool:
        return pa in self.tables

    def __len__(self) -> int:
        return len(self.tables)


@attrs.define(slots=True, eq=False)
class WalkContext:
    """What a visitor sees (struct kvm_pgtable_visit_ctx): the entry ``table[index]`` at
    position ``pos`` (backend level ``level``), mapping ``[addr, addr + size)``; ``flags`` says
    which visit this is; ``arg`` is the caller's. A visitor changes the entry by storing into
    ``table[index]`` (or ``ctx.set(new)``)."""

    store: TableStore
    geometry: Geometry
    fmt: EntryFormat
    table: array
    table_pa: int
    index: int
    pos: int
    level: int
    addr: int
    size: int
    pte: int
    flags: int
    start: int
    end: int
    arg: object = None

    def set(self, new: int) -> None:
        self.table[self.index] = new
        self.pte = new

    @property
    def is_last_level(self) -> bool:
        return self.pos == self.geometry.nlevels - 1

    def covered(self) -> bool:
        """The entry's whole range lies inside the walk's ``[start, end)``."""
        return self.start <= self.addr and self.addr + self.size <= self.end


Visitor = Callable[[WalkContext], object]


class PageTable:
    """One radix tree: a root table in ``store`` and the geometry and entry format that give
    its entries meaning."""

    def __init__(self, store: TableStore, geometry: Geometry, fmt: EntryFormat):
        self.store = store
        self.geometry = geometry
        self.fmt = fmt
        self.empty = getattr(fmt, "empty", 0)
        self.root = store.alloc(geometry.entries(0))
        self._last_pos = geometry.nlevels - 1

    # ------------------------------------------------------------------ walking

    def walk(self, start: int, end: int, visitor: Visitor, flags: int = LEAF,
             arg: object = None, visit_invalid: bool = False) -> object:
        """Visit the entries covering ``[start, end)`` (input addresses in bytes).

        ``flags`` selects the visits (``LEAF``, ``TABLE_PRE``, ``TABLE_POST``); invalid entries
        are visited as leaves only with ``visit_invalid`` (mapping needs them, zapping does
        not, so zaps cost what is mapped). The first truthy visitor result stops the walk and
        is returned. (``walk_steps`` run to its end: its visits never yield here.)"""
        walk = self.walk_steps(start, end, visitor, flags, arg, visit_invalid)
        try:
            next(walk)
        except StopIteration as done:
            return done.value
        walk.close()
        raise RuntimeError("a visit of a plain walk yielded: use walk_steps")

    def walk_steps(self, start: int, end: int, visitor: Visitor, flags: int = LEAF,
                   arg: object = None, visit_invalid: bool = False,
                   stop: Callable[[object], bool] | None = None):
        """``walk`` as a generator (run it with ``yield from``), for a walk with race points
        (arm64's shared walks, where another walker may come between an entry's read and its
        compare-and-exchange): a visit may return a generator, which the walk runs with
        ``yield from`` and whose return value is the visit's result. A truthy result stops
        the walk when ``stop`` is None or ``stop(result)`` is true (arm64: -EAGAIN stops only
        a fault's walk). The walk returns the result that stopped it, else None; one whose
        visits return no generator never yields."""
        g = self.geometry
        end = min(end, 1 << g.ia_bits)
        if start >= end:
            return iter(())
        ctx = WalkContext(self.store, g, self.fmt, None, self.root, 0, 0, g.level_ids[0], 0, 0,
                          0, 0, start, end, arg)
        return self._walk_table(ctx, self.root, 0, 0, visitor, flags, visit_invalid, stop)

    def _walk_table(self, ctx: WalkContext, table_pa: int, pos: int, base: int,
                    visitor: Visitor, flags: int, visit_invalid: bool, stop):
        g, fmt = self.geometry, self.fmt
        table = self.store.tables[table_pa]
        shift = g.shifts[pos]
        size = 1 << shift
        level = g.level_ids[pos]
        last_pos = pos == self._last_pos
        first = (max(ctx.start, base) - base) >> shift
        last = min(len(table), (ctx.end - base + size - 1) >> shift)
        empty = self.empty
        indices = range(first, last)
        if not visit_invalid and last - first > 16:
            # Find the entries that are not empty at C speed: a walk costs what is mapped.
            indices = _present(table, first, last, empty)
        for idx in indices:
            pte = table[idx]
            if pte == empty and not visit_invalid:
                continue
            addr = base + (idx << shift)
            ctx.table, ctx.table_pa, ctx.index = table, table_pa, idx
            ctx.pos, ctx.level, ctx.addr, ctx.size, ctx.pte = pos, level, addr, size, pte
            valid = fmt.is_valid(pte, level)
            is_table = valid and not last_pos and fmt.is_table(pte, level)
            if flags & TABLE_PRE if is_table else flags & LEAF and (valid or visit_invalid):
                ctx.flags = TABLE_PRE if is_table else LEAF
                r = visitor(ctx)
                if type(r) is GeneratorType:
                    r = yield from r
                if r and (stop is None or stop(r)):
                    return r
                if table[idx] != pte:
                    pte = table[idx]
                    is_table = not last_pos and fmt.is_valid(pte, level) and fmt.is_table(
                        pte, level)
            if not is_table:
                continue
            r = yield from self._walk_table(ctx, fmt.table_address(pte, level), pos + 1, addr,
                                            visitor, flags, visit_invalid, stop)
            if r:
                return r
            if flags & TABLE_POST:
                ctx.table, ctx.table_pa, ctx.index, ctx.pos, ctx.level = (
                    table, table_pa, idx, pos, level)
                ctx.addr, ctx.size, ctx.pte, ctx.flags = addr, size, table[idx], TABLE_POST
                r = visitor(ctx)
                if type(r) is GeneratorType:
                    r = yield from r
                if r and (stop is None or stop(r)):
                    return r
        return None

    def lookup(self, addr: int) -> tuple[int, array, int, int]:
        """The last entry a hardware walk of ``addr`` reads: ``(pos, table, index, pte)`` —
        a leaf, or the invalid entry where the walk stopped. The hot path of ``translate``."""
        g, fmt, store = self.geometry, self.fmt, self.store
        table = store[self.root]
        last = g.nlevels - 1
        shifts, bits, levels = g.shifts, g.bits, g.level_ids
        pos = 0
        while True:
            idx = (addr >> shifts[pos]) & ((1 << bits[pos]) - 1)
            pte = table[idx]
            if pos == last or not pte:
                return pos, table, idx, pte
            level = levels[pos]
            if not fmt.is_valid(pte, level) or not fmt.is_table(pte, level):
                return pos, table, idx, pte
            table = store[fmt.table_address(pte, level)]
            pos += 1

    def path(self, addr: int) -> list[tuple[int, int, int]]:
        """Every entry a hardware walk of ``addr`` reads, as ``(pos, table_pa, index)``."""
        g, fmt, store = self.geometry, self.fmt, self.store
        out = []
        pa = self.root
        for pos in range(g.nlevels):
            idx = g.index(pos, addr)
            out.append((pos, pa, idx))
            pte = store[pa][idx]
            level = g.level_ids[pos]
            if pos == g.nlevels - 1 or not fmt.is_valid(pte, level) or not fmt.is_table(
                    pte, level):
                break
            pa = fmt.table_address(pte, level)
        return out

    def iter_present(self, start: int, end: int, leaves_only: bool = False
                     ) -> Iterator[tuple[array, int, int, int, int]]:
        """Every valid entry touching ``[start, end)`` in address order, a table entry before
        the entries below it, as ``(table, index, pos, addr, pte)``: the Python form of x86's
        ``for_each_tdp_pte`` for code that is not a visitor (``leaves_only``: only entries
        that map, for_each_tdp_pte_min_level).

        Lazy, as Linux's iterator: a table is read when the iteration reaches it, each entry
        when the iteration gets to it (spans of empty entries are skipped ``_CHUNK`` at a
        time, at C speed). A caller that drops the MMU lock between two entries therefore
        sees what other flows changed in the tables it has not passed yet; if a table on its
        path may have been freed meanwhile, it starts a new iteration from where it stopped
        (the tdp_iter restart from the root)."""
        g, fmt, tables = self.geometry, self.fmt, self.store.tables
        end = min(end, 1 << g.ia_bits)
        if start >= end:
            return
        empty = self.empty
        blank = array("Q", [empty]) * _CHUNK
        last_pos = g.nlevels - 1
        # Frames of (table, pos, base address, next index); the parent's frame waits under
        # its child's.
        stack = [(tables[self.root], 0, 0, start >> g.shifts[0])]
        while stack:
            table, pos, base, idx = stack.pop()
            shift = g.shifts[pos]
            level = g.level_ids[pos]
            stop = min(len(table), (end - base + (1 << shift) - 1) >> shift)
            while idx < stop:
                if not idx % _CHUNK and idx + _CHUNK <= stop and \
                        table[idx:idx + _CHUNK] == blank:
                    idx += _CHUNK
                    continue
                pte = table[idx]
                if pte == empty or not fmt.is_valid(pte, level):
                    idx += 1
                    continue
                addr = base + (idx << shift)
                if pos < last_pos and fmt.is_table(pte, level):
                    if not leaves_only:
                        yield table, idx, pos, addr, pte
                    stack.append((table, pos, base, idx + 1))
                    child_shift = g.shifts[pos + 1]
                    stack.append((tables[fmt.table_address(pte, level)], pos + 1, addr,
                                  (max(start, addr) - addr) >> child_shift))
                    break
                yield table, idx, pos, addr, pte
                idx += 1

    def tables(self) -> Iterator[tuple[int, int]]:
        """Every table reachable from the root, as ``(table_pa, pos)``, root first."""
        g, fmt, store = self.geometry, self.fmt, self.store
        stack = [(self.root, 0)]
        while stack:
            pa, pos = stack.pop()
            yield pa, pos
            if pos == g.nlevels - 1:
                continue
            level = g.level_ids[pos]
            for pte in store[pa]:
                if pte and fmt.is_valid(pte, level) and fmt.is_table(pte, level):
                    stack.append((fmt.table_address(pte, level), pos + 1))

    def free_subtree(self, table_pa: int, pos: int) -> None:
        """Free the table at ``table_pa`` and every table below it."""
        g, fmt, store = self.geometry, self.fmt, self.store
        if pos < g.nlevels - 1:
            level = g.level_ids[pos]
            for pte in store[table_pa]:
                if pte and fmt.is_valid(pte, level) and fmt.is_table(pte, level):
                    self.free_subtree(fmt.table_address(pte, level), pos + 1)
        store.free(table_pa)

    def destroy(self) -> None:
        self.free_subtree(self.root, 0)


def present_indices(table: array, empty: int = 0) -> list[int]:
    """Indices of the entries of ``table`` that are not ``empty`` (a format's non-present
    value), found at C speed: for code that scans whole tables outside the walker."""
    return _present(table, 0, len(table), empty)


#: Entries per chunk of ``_present``'s scan.
_CHUNK = 64
#: Present entries in a chunk above which ``_present`` reads the chunk entry by entry.
_BIGINT_MAX = 6


@functools.cache
def _empty_chunk(empty: int) -> tuple[bytes, int, bytes]:
    """A chunk of ``empty`` entries (in this machine's byte order) as bytes and as an int,
    and one empty entry's bytes."""
    word = array("Q", [empty]).tobytes()
    chunk = word * _CHUNK
    return chunk, int.from_bytes(chunk, "little"), word


@functools.lru_cache(maxsize=16)
def _empty_table(empty: int, n: int) -> bytes:
    return array("Q", [empty]).tobytes() * n


def _present(table: array, first: int, last: int, empty: int) -> list[int]:
    """Indices in ``[first, last)`` of the entries that are not ``empty``, read before the
    visits (an entry a visitor fills in this table is not visited). Spans of the table are
    compared with empty ones (C speed), halving those that differ down to chunks; in a chunk
    with few entries each is found as the lowest set bit of the chunk XOR an empty one (one
    big-int step per entry), a chunk with many is read entry by entry."""
    empty_chunk, empty_int, word = _empty_chunk(empty)
    raw = table.tobytes()
    n = len(table)
    blank = _empty_table(empty, n)
    found: list[int] = []
    spans = [(first - first % _CHUNK, min(n, last + (-last % _CHUNK)))]
    while spans:
        lo, hi = spans.pop()
        if raw[lo * 8:hi * 8] == blank[lo * 8:hi * 8]:
            continue
        if hi - lo > _CHUNK:
            mid = lo + max(1, (hi - lo) // (2 * _CHUNK)) * _CHUNK
            spans.append((mid, hi))
            spans.append((lo, mid))
            continue
        seg = raw[lo * 8:hi * 8]
        # Present entries estimated from a byte-level count of empty words (one may straddle
        # two entries); past a few, reading each entry beats one big-int step per entry.
        if hi - lo - seg.count(word) > _BIGINT_MAX:
            a, b = max(lo, first), min(hi, last)
            found.extend([i for i, v in zip(range(a, b), table[a:b], strict=True)
                          if v != empty])
            continue
        x = int.from_bytes(seg, "little") ^ (
            empty_int if hi - lo == _CHUNK else int.from_bytes(empty_chunk[:(hi - lo) * 8],
                                                               "little"))
        base = lo
        while x:
            i = ((x & -x).bit_length() - 1) >> 6
            if base + i >= last:
                break
            if base + i >= first:
                found.append(base + i)
            x >>= (i + 1) << 6
            base += i + 1
    return found


def table_is_empty(table: array) -> bool:
    """No entry of ``table`` is non-zero (a C-speed byte test)."""
    return not table.tobytes().strip(b"\x00")
