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

Beside the walker: ``iter_present``, the same order as a lazy iterator (x86's
``for_each_tdp_pte``), and ``lookup``, the hardware's walk of one address.

Entries are stored in CPU byte order; a backend whose hardware is big-endian (Power) converts
at its boundary (``kvmcore.radix``). No two walkers run at the same instant (no SMP memory
ordering): Linux's cmpxchg updates are plain stores, and where another flow may come between
a walker's read of an entry and its exchange, the visit yields a race point (``walk_steps``)
and re-reads the entry after it.
"""

from __future__ import annotations

import functools
from array import array
from bisect import bisect_left
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
    fills new tables with SHADOW_NONPRESENT_VALUE, not 0 — and ``table_bits = (mask, value)``
    when an entry above the last level links a table exactly if ``pte & mask == value``:
    ``lookup``, the walker and ``iter_present`` then test that inline instead of calling
    ``is_valid`` and ``is_table`` (still called for the entries that do not link a table); a
    third element says where the table is without a ``table_address`` call: an int
    ``addr_mask`` (the table is at ``pte & addr_mask``) or a mapping from the entry to the
    table's address (a cache, for entries whose address is not a mask of their bits: Power's
    big-endian directory entries)."""

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
        # The format's table_bits: the test of a table link, and where the table it links is
        # (``pte & amask``, else ``addr_of[pte]``, else a ``table_address`` call).
        tmask, tvalue, where = (*getattr(fmt, "table_bits", (None, None)), None)[:3]
        amask = where if isinstance(where, int) else None
        addr_of = None if where is None or isinstance(where, int) else where
        #: What ``lookup`` reads per level, computed once: shifts, index masks, level ids, the
        #: last position, the table_bits.
        self._per_level = (geometry.shifts, tuple((1 << b) - 1 for b in geometry.bits),
                           geometry.level_ids, geometry.nlevels - 1,
                           (tmask, tvalue, amask, addr_of))
        self._last_pos = geometry.nlevels - 1
        self._ia_end = 1 << geometry.ia_bits
        #: What ``_walk_table`` reads at every level, in one tuple.
        self._walk_consts = (fmt, store.tables, geometry.shifts, geometry.level_ids,
                             self._last_pos, self.empty, tmask, tvalue, amask, addr_of)

    # ------------------------------------------------------------------ walking

    def walk(self, start: int, end: int, visitor: Visitor, flags: int = LEAF,
             arg: object = None, visit_invalid: bool = False) -> object:
        """Visit the entries covering ``[start, end)`` (input addresses in bytes).

        ``flags`` selects the visits (``LEAF``, ``TABLE_PRE``, ``TABLE_POST``); invalid entries
        are visited as leaves only with ``visit_invalid`` (mapping needs them, zapping does
        not, so zaps cost what is mapped). The first truthy visitor result stops the walk and
        is returned. (``walk_steps`` run to its end: its visits never yield here.)"""
        return _run_plain(self.walk_steps(start, end, visitor, flags, arg, visit_invalid))

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
        # A format's table_bits test a table link inline (no is_valid / is_table calls).
        fmt, tables, shifts, level_ids, final_pos, empty, tmask, tvalue, amask, addr_of = \
            self._walk_consts
        table = tables[table_pa]
        shift = shifts[pos]
        size = 1 << shift
        level = level_ids[pos]
        last_pos = pos == final_pos
        start, end = ctx.start, ctx.end
        first = (start - base) >> shift if start > base else 0
        last = (end - base + size - 1) >> shift
        if last > len(table):
            last = len(table)
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
            is_table = not last_pos and (
                pte & tmask == tvalue if tmask is not None else
                fmt.is_valid(pte, level) and fmt.is_table(pte, level))
            if flags & TABLE_PRE if is_table else flags & LEAF and (
                    visit_invalid or fmt.is_valid(pte, level)):
                ctx.flags = TABLE_PRE if is_table else LEAF
                r = visitor(ctx)
                if type(r) is GeneratorType:
                    r = yield from r
                if r and (stop is None or stop(r)):
                    return r
                if table[idx] != pte:
                    pte = table[idx]
                    is_table = not last_pos and (
                        pte & tmask == tvalue if tmask is not None else
                        fmt.is_valid(pte, level) and fmt.is_table(pte, level))
            if not is_table:
                continue
            r = yield from self._walk_table(
                ctx, pte & amask if amask else addr_of[pte] if addr_of is not None else
                fmt.table_address(pte, level), pos + 1, addr,
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

    def walk_subtree(self, table_pa: int, pos: int, base: int, visitor: Visitor,
                     flags: int = LEAF) -> object:
        """``walk`` over the table at ``table_pa`` (position ``pos``, mapping from ``base``)
        and the tables below it, whether the tree still links it or not: Power empties a
        subtree after unlinking it (kvmppc_unmap_free_pmd after pud_clear)."""
        g = self.geometry
        end = base + (1 << (g.shifts[pos] + g.bits[pos]))
        ctx = WalkContext(self.store, g, self.fmt, self.store[table_pa], table_pa, 0, pos,
                          g.level_ids[pos], base, 0, 0, 0, base, end)
        return _run_plain(self._walk_table(ctx, table_pa, pos, base, visitor, flags, False,
                                           None))

    def lookup(self, addr: int) -> tuple[int, array, int, int]:
        """The last entry a hardware walk of ``addr`` reads: ``(pos, table, index, pte)`` —
        a leaf, or the invalid entry where the walk stopped. The hot path of ``translate``."""
        fmt, tables = self.fmt, self.store.tables
        table = tables[self.root]
        shifts, masks, levels, last, (tmask, tvalue, amask, addr_of) = self._per_level
        pos = 0
        while True:
            idx = (addr >> shifts[pos]) & masks[pos]
            pte = table[idx]
            if pos == last or not pte:
                return pos, table, idx, pte
            if tmask is None:
                level = levels[pos]
                if not fmt.is_valid(pte, level) or not fmt.is_table(pte, level):
                    return pos, table, idx, pte
                table = tables[fmt.table_address(pte, level)]
            elif pte & tmask != tvalue:
                return pos, table, idx, pte
            elif amask:
                table = tables[pte & amask]
            elif addr_of is not None:
                table = tables[addr_of[pte]]
            else:
                table = tables[fmt.table_address(pte, levels[pos])]
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

    def iter_present(self, start: int, end: int, leaves_only: bool = False,
                     snapshot: bool = False, max_pos: int | None = None
                     ) -> Iterator[tuple[array, int, int, int, int]]:
        """Every valid entry touching ``[start, end)`` in address order, a table entry before
        the entries below it, as ``(table, index, pos, addr, pte)``: the Python form of x86's
        ``for_each_tdp_pte`` for code that is not a visitor (``leaves_only``: only entries
        that map, for_each_tdp_pte_min_level).

        Lazy, as Linux's iterator: a table is read when the iteration reaches it, each entry
        when the iteration gets to it (spans of empty entries are skipped ``_CHUNK``, then 8,
        at a time, at C speed). A caller that drops the MMU lock between two entries therefore
        sees what other flows changed in the tables it has not passed yet; if a table on its
        path may have been freed meanwhile, it starts a new iteration from where it stopped
        (the tdp_iter restart from the root).

        ``snapshot``: for a caller that changes nothing and lets no other flow run while it
        iterates (an enumeration of the leaves, an invariant check): each table's present
        entries are found when the iteration enters it, by the walker's scan, which a table
        unchanged since its last scan does not repeat.

        ``max_pos``: entries at that depth (0: the root table's) are the deepest visited, each
        yielded whether it maps or links a table, which is not entered: for_each_tdp_pte_min_level
        with a level above the last (a zap that removes whole tables at that level)."""
        fmt, tables = self.fmt, self.store.tables
        shifts, _masks, level_ids, last_pos, (tmask, tvalue, amask, addr_of) = self._per_level
        if max_pos is not None and max_pos < last_pos:
            last_pos = max_pos
        if end > self._ia_end:
            end = self._ia_end
        if start >= end:
            return
        empty = self.empty
        is_valid, is_table = fmt.is_valid, fmt.is_table
        # Frames of (table, pos, base address, next index, the index iterator it was left
        # in) of the tables a descent left: a table's entries are found once, on entry.
        stack = [(tables[self.root], 0, 0, start >> shifts[0], None)]
        while stack:
            table, pos, base, idx, it = stack.pop()
            while True:
                shift, level = shifts[pos], level_ids[pos]
                stop = (end - base + (1 << shift) - 1) >> shift
                if stop > len(table):
                    stop = len(table)
                if it is None:
                    # A few entries are read one by one; more are skipped at C speed.
                    it = iter(range(idx, stop) if stop - idx <= 16 else
                              _present(table, idx, stop, empty) if snapshot else
                              _nonempty_from(table, idx, stop, empty, *_blank_spans(empty)))
                for idx in it:  # noqa: B020
                    pte = table[idx]
                    if pte == empty:
                        continue
                    addr = base + (idx << shift)
                    if pos < last_pos and (pte & tmask == tvalue if tmask is not None else
                                           is_valid(pte, level) and is_table(pte, level)):
                        if not leaves_only:
                            yield table, idx, pos, addr, pte
                        break
                    if is_valid(pte, level):
                        yield table, idx, pos, addr, pte
                else:
                    break
                # Descend into the table at ``idx``; its parent waits on the stack if the range
                # goes on past it.
                if idx + 1 < stop:
                    stack.append((table, pos, base, idx + 1, it))
                table, pos, base = tables[pte & amask if amask else addr_of[pte]
                                          if addr_of is not None else
                                          fmt.table_address(pte, level)], pos + 1, addr
                idx = (start - addr) >> shifts[pos] if start > addr else 0
                it = None

    def tables(self) -> Iterator[tuple[int, int]]:
        """Every table reachable from the root, as ``(table_pa, pos)``, root first."""
        g, fmt, store = self.geometry, self.fmt, self.store
        stack = [(self.root, 0)]
        while stack:
            pa, pos = stack.pop()
            if pa not in store:
                continue            # a corrupt link: the table's parent entry says where
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


def _nonempty_from(table: array, idx: int, stop: int, empty: int, blank: array,
                   blank8: array) -> Iterator[int]:
    """The indices in ``[idx, stop)`` of entries that are not ``empty``, each found when the
    caller asks for it (``iter_present``'s lazy order): spans of empty entries are skipped
    ``_CHUNK``, then 8, at a time, compared at C speed."""
    while idx < stop:
        if table[idx] != empty:
            yield idx
            idx += 1
        elif not idx % _CHUNK and idx + _CHUNK <= stop and table[idx:idx + _CHUNK] == blank:
            idx += _CHUNK
        elif not idx % 8 and idx + 8 <= stop and table[idx:idx + 8] == blank8:
            idx += 8
        else:
            idx += 1


def _run_plain(walk) -> object:
    """A walk whose visits return no generator, run to its end: its result."""
    try:
        next(walk)
    except StopIteration as done:
        return done.value
    walk.close()
    raise RuntimeError("a visit of a plain walk yielded: use walk_steps")


def present_indices(table: array, empty: int = 0) -> list[int]:
    """Indices of the entries of ``table`` that are not ``empty`` (a format's non-present
    value), found at C speed: for code that scans whole tables outside the walker."""
    return _present(table, 0, len(table), empty)


#: Entries per chunk of ``iter_present``'s skip over empty spans.
_CHUNK = 64
#: Present entries ``_present`` finds one big-int step each before it reads the rest of the
#: span entry by entry (one step costs about what reading 30 entries does).
_DENSE = 8


@functools.lru_cache(maxsize=64)
def _empty_span(empty: int, n: int) -> tuple[bytes, int]:
    """``n`` entries of ``empty`` (in this machine's byte order) as bytes and as an int."""
    raw = array("Q", [empty]).tobytes() * n
    return raw, int.from_bytes(raw, "little")


@functools.cache
def _blank_spans(empty: int) -> tuple[array, array]:
    """Runs of ``_CHUNK`` and of 8 ``empty`` entries: ``iter_present`` skips spans of empty
    entries by comparing them at C speed."""
    return array("Q", [empty]) * _CHUNK, array("Q", [empty]) * 8


def _present(table: array, first: int, last: int, empty: int) -> list[int]:
    """Indices in ``[first, last)`` of the entries that are not ``empty``, read before the
    visits (an entry a visitor fills in this table is not visited). At C speed: a table whose
    bytes are those of its last scan (``_SEEN``) reuses it; otherwise the table is compared
    with an empty one, then XOR-ed with it as one big int whose lowest set bit gives the
    next present entry; past a few entries the rest is read entry by entry."""
    raw = table.tobytes()
    seen = _SEEN.get(id(table))
    if seen is None or seen[0] != raw or seen[1] != empty:
        found = _scan(table, raw, empty)
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        if len(raw) <= _SEEN_BIG:
            _SEEN[id(table)] = (raw, empty, found)
    else:
        found = seen[2]
    if first or last < len(table):
        return found[bisect_left(found, first):bisect_left(found, last)]
    return found[:]


#: The last scan of each table, keyed by ``id``: a table whose bytes have not changed since
#: (one C-speed compare) has the same present entries. The explorer's oracles walk every
#: table after every step, and a step changes few of them.
_SEEN: dict[int, tuple[bytes, int, list[int]]] = {}
_SEEN_MAX = 256
#: Tables bigger than this (bytes) are not remembered: at most 256 x 4 KiB, about 1 MiB.
_SEEN_BIG = 4096


def _scan(table: array, raw: bytes, empty: int) -> list[int]:
    """``_present``'s scan of a whole table: a big table (Power's 64 KiB root, arm64's
    concatenated roots) a ``_SPAN`` of entries at a time, each span compared with an empty
    one first, so that the big-int steps cost what a 4 KiB table's do."""
    n = len(table)
    if n <= _SPAN:
        return _scan_span(table, raw, empty, 0, n)
    if raw == _empty_span(empty, n)[0]:
        return []
    blank = _empty_span(empty, _SPAN)[0]
    found: list[int] = []
    for base in range(0, n, _SPAN):
        last = min(base + _SPAN, n)
        span = raw[base * 8:last * 8]
        if last - base < _SPAN or span != blank:
            found += _scan_span(table, span, empty, base, last)
    return found


#: Entries per span of a big table's scan (a 4 KiB table's worth).
_SPAN = 512


def _scan_span(table: array, raw, empty: int, base: int, last: int) -> list[int]:
    """The present entries of ``table[base:last]``, whose bytes are ``raw``."""
    blank, blank_int = _empty_span(empty, last - base)
    if raw == blank:
        return []
    x = int.from_bytes(raw, "little") ^ blank_int
    found: list[int] = []
    while x:
        if len(found) == _DENSE:
            found.extend([i for i, v in zip(range(base, last), table[base:last], strict=True)
                          if v != empty])
            break
        i = ((x & -x).bit_length() - 1) >> 6
        found.append(base + i)
        x >>= (i + 1) << 6
        base += i + 1
    return found
