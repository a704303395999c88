"""Generic radix-table operations over a declared entry format, written once for every backend.

arm64's ``hyp/pgtable.c`` shows the split: the hardware format is declared, and map, unmap,
write-protect, mkyoung / test_clear_young and split are generic walks over it
(kvm_pgtable_stage2_map / _unmap / _wrprotect / _test_clear_young / _split). This module is
that split for kvmcore, on top of ``kvmcore.pgtable`` (its ``TableStore``, ``PageTable`` and
its one walker: no walk is written here again):

* ``RadixFormat`` — what a backend declares: geometry (levels, index bits, a larger or
  concatenated root), the levels that may hold leaves, valid / table / leaf tests, the output
  address, the permission and accessed / dirty bits, the non-present value, the byte order,
  ``make_leaf``, ``make_table`` and the child of a split block.
* ``RadixTable`` — the operations: ``map`` (descend and allocate, replace a table by a block
  freeing its subtree, split or drop a bigger block), ``unmap_range`` (whole leaves; returns
  the ``Span`` to flush), ``wrprotect``, ``wrprotect_mask``, ``split``, ``test_clear_young``,
  ``translate`` (the hardware walk), ``leaves`` / ``mappings``, ``present`` (an iterator over
  present entries, x86's for_each_tdp_pte), ``page_table_bytes`` and ``check`` (format
  invariants: table linkage, leaked tables, leaf levels and alignment). Leaves only over
  memslots and writable only where the host allows are the core's invariants
  (``kvmcore.invariants``), checked through the ``leaves`` hook for every backend.
* ``mapping_size`` — the mapping-size policy arm64, RISC-V and LoongArch share (mmu.c
  get_vma_page_shift / hugetlb_mapping_size, transparent_hugepage_adjust,
  fault_supports_stage2_huge_mapping).
* ``WriteProtectDirtyLog`` — dirty logging by write protection (kvm_arch_commit_memory_region,
  kvm_arch_mmu_enable_log_dirty_pt_masked, read-only read faults while logging, eager split).
* ``RadixBackend`` — the generic hook implementations over one ``RadixTable`` per address
  space; a backend subclasses it and writes its format and ``map_leaf`` policy.
"""

from __future__ import annotations

from array import array


from . import hookimpl
from .arch import Mapping, vm_options
from .memslots import dirty_logging_toggled
from .pgtable import LEAF, TABLE_POST, Geometry, PageTable, TableStore, present_indices
from .records import ACCESS_FLAG, NOT_PRESENT, PERMISSION, Translation, Violation
from .uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MR_DELETE, \
    RET_PF_FIXED

#: Logical permissions and state of a leaf, whatever the format's bits: read, write, execute,
#: accessed (young), dirty.
PERM_R, PERM_W, PERM_X, PERM_A, PERM_D = 1, 2, 4, 8, 16
PERM_RWX = PERM_R | PERM_W | PERM_X


def bswap64(value: int) -> int:
    return int.from_bytes(value.to_bytes(8, "little"), "big")


class RadixFormat:
    """A declared entry format. Subclass it and set ``geometry`` and ``leaf_levels``, the bit
    masks ``R``, ``W``, ``X`` (or ``XN``, an execute-never bit), ``A`` and ``D`` (0 where the
    format has none: no A means always young, no D means dirty == writable, as arm64 without
    DBM), ``empty`` (the non-present value: x86 SHADOW_NONPRESENT_VALUE), ``big_endian``
    (Power: entries are stored byte-swapped), and the methods below that have no default.
    Every method takes and returns entries in logical (CPU) order; ``RadixTable`` converts."""

    geometry: Geometry
    leaf_levels: frozenset = frozenset()
    empty = 0
    big_endian = False
    R = W = X = XN = A = D = 0

    def is_valid(self, pte: int, level: int) -> bool:
        raise NotImplementedError

    def is_table(self, pte: int, level: int) -> bool:
        """A valid entry that points to the next table (only asked above the last level)."""
        raise NotImplementedError

    def table_address(self, pte: int, level: int) -> int:
        raise NotImplementedError

    def output_address(self, pte: int, level: int) -> int:
        raise NotImplementedError

    def make_table(self, pa: int, level: int) -> int:
        raise NotImplementedError

    def make_leaf(self, pa: int, level: int, perms: int) -> int:
        """A leaf at ``level`` mapping physical address ``pa`` with ``perms`` (PERM_*)."""
        raise NotImplementedError

    def is_placeholder(self, pte: int, level: int) -> bool:
        """An entry neither empty nor valid that belongs there (x86: an MMIO SPTE, a frozen
        one): ``check`` leaves it to the backend's own invariants."""
        return False

    def is_leaf(self, pte: int, level: int) -> bool:
        return self.is_valid(pte, level) and (
            level == self.geometry.level_ids[-1] or not self.is_table(pte, level))

    def perm_bits(self, perms: int) -> int:
        bits = 0
        for flag, mask in ((PERM_R, self.R), (PERM_W, self.W), (PERM_X, self.X),
                           (PERM_A, self.A), (PERM_D, self.D)):
            if perms & flag:
                bits |= mask
        if self.XN and not perms & PERM_X:
            bits |= self.XN
        return bits

    def perms(self, pte: int) -> int:
        """The logical PERM_* of a leaf."""
        p = (PERM_R if pte & self.R else 0) | (PERM_W if pte & self.W else 0)
        if (pte & self.X) if self.X else not pte & self.XN:
            p |= PERM_X
        if not self.A or pte & self.A:
            p |= PERM_A
        if (pte & self.D) if self.D else pte & self.W:
            p |= PERM_D
        return p

    def with_perms(self, pte: int, perms: int) -> int:
        """``pte`` with its permission and A/D bits replaced by ``perms``."""
        mask = self.R | self.W | self.X | self.XN | self.A | self.D
        return (pte & ~mask) | self.perm_bits(perms)

    def split_child(self, pte: int, level: int, child_level: int, index: int) -> int:
        """Entry ``index`` of the table that replaces block ``pte`` (kvm_pgtable_stage2_split,
        make_child_pte): the same attributes, the output address advanced by ``index``
        children."""
        child_size = 1 << self.geometry.shifts[self.geometry.pos_of(child_level)]
        return self.make_leaf(self.output_address(pte, level) + index * child_size,
                              child_level, self.perms(pte))

    def stored(self):
        """The walker's view of entries as stored (``pgtable.EntryFormat``): the format
        itself, or, big-endian, its tests after a byte swap. A big-endian format whose tests
        are bit tests may return a view that tests the stored value in place (Power's
        pte_present on pte_raw)."""
        return _Stored(self) if self.big_endian else self


class _Stored:
    """The walker's view of a big-endian format: tests on the stored (swapped) value."""

    def __init__(self, fmt: RadixFormat):
        self.fmt = fmt
        self.empty = bswap64(fmt.empty)

    def is_valid(self, pte, level):
        return self.fmt.is_valid(bswap64(pte), level)

    def is_table(self, pte, level):
        return self.fmt.is_table(bswap64(pte), level)

    def table_address(self, pte, level):
        return self.fmt.table_address(bswap64(pte), level)


class Span:
    """The input-address range whose translations changed: what to flush (whole leaves);
    ``dropped``: the blocks a map replaced by a table without their other pages, which
    fault in again lazily."""

    __slots__ = ("lo", "hi", "dropped")

    def __init__(self):
        self.lo, self.hi = 1 << 64, 0
        self.dropped = 0

    def add(self, addr: int, size: int) -> None:
        self.lo, self.hi = min(self.lo, addr), max(self.hi, addr + size)

    def __bool__(self) -> bool:
        return self.hi > self.lo

    def flush(self, vm) -> bool:
        """kvm_flush_remote_tlbs_range over the span, if anything changed."""
        if self:
            vm.flush_remote_tlbs_range(self.lo >> 12, (self.hi - self.lo + 4095) >> 12)
        return bool(self)


_ident = int


class RadixTable:
    """One radix tree of a declared format and the generic operations on it. Addresses are
    input addresses in bytes; levels are the format's level ids."""

    #: ``on_update(addr, level, old, new)`` after a generic operation changed a leaf in place
    #: (wrprotect, test_clear_young): arm64 records each such store.
    on_update = None

    def __init__(self, fmt: RadixFormat, store: TableStore | None = None,
                 free_tables: bool = True):
        self.fmt = fmt
        self.g = g = fmt.geometry
        self.store = store if store is not None else TableStore()
        self.ld = self.st = bswap64 if fmt.big_endian else _ident
        self.pt = PageTable(self.store, g, fmt.stored())
        self._fill(self.pt.root)
        #: Linux arm64 frees tables an unmap empties; RISC-V keeps them until the VM dies.
        self.free_tables = free_tables
        self.size = {lvl: 1 << s for lvl, s in zip(g.level_ids, g.shifts, strict=True)}
        self.leaf_size = {lvl: self.size[lvl] for lvl in fmt.leaf_levels}
        self.level_of = {size: lvl for lvl, size in self.leaf_size.items()}
        #: By position: the length of the table an entry there may link (0 at the last).
        self.linked_len = [1 << bits for bits in g.bits[1:]] + [0]

    def _fill(self, pa: int) -> None:
        if self.fmt.empty:
            table = self.store[pa]
            table[:] = array("Q", [self.st(self.fmt.empty)]) * len(table)

    def _alloc(self, pos: int) -> int:
        pa = self.store.alloc(self.g.entries(pos))
        self._fill(pa)
        return pa

    # ------------------------------------------------------------------ lookups

    def lookup(self, addr: int) -> tuple[int, object, int, int]:
        """``(level, table, index, pte)`` of the last entry a hardware walk of ``addr`` reads."""
        pos, table, idx, raw = self.pt.lookup(addr)
        return self.g.level_ids[pos], table, idx, self.ld(raw)

    def get_leaf(self, addr: int):
        """``(level, table, index, pte)`` of the valid leaf mapping ``addr``, or None
        (kvm_riscv_gstage_get_leaf, kvm_pgtable_get_leaf)."""
        level, table, idx, pte = self.lookup(addr)
        return (level, table, idx, pte) if self.fmt.is_leaf(pte, level) else None

    def translate(self, gpa: int, access, hw_ad: bool, private: bool = False):
        """The hardware walk of one access: a Translation (setting A, and D on a write, when
        ``hw_ad``: hardware-updated accessed/dirty bits), or a Violation: not present,
        access flag (A clear, or D clear on a write, without ``hw_ad``), permission."""
        level, table, idx, pte = self.lookup(gpa)
        fmt, gfn = self.fmt, gpa >> 12
        if not fmt.is_leaf(pte, level):
            return Violation(NOT_PRESENT, gfn, private, level)
        size = self.size[level]
        perms = fmt.perms(pte)
        need = PERM_A | (PERM_D if access.write else 0)
        if perms & need != need:
            if not hw_ad:
                return Violation(ACCESS_FLAG, gfn, private, level, size)
            perms |= need
            pte = fmt.with_perms(pte, perms)
            table[idx] = self.st(pte)
        want = PERM_W if access.write else PERM_X if access.exec else PERM_R
        if not perms & want:
            return Violation(PERMISSION, gfn, private, level, size)
        pfn = (fmt.output_address(pte, level) + (gpa & (size - 1))) >> 12
        return Translation(gfn, pfn, size, bool(perms & PERM_R), bool(perms & PERM_W),
                           bool(perms & PERM_X), bool(perms & PERM_D), private)

    # ------------------------------------------------------------------ map and split

    def _split_entry(self, table, idx: int, pos: int, pte: int) -> None:
        """Replace block ``pte`` at ``table[idx]`` by a table of its children."""
        g, fmt = self.g, self.fmt
        level, child_level = g.level_ids[pos], g.level_ids[pos + 1]
        child = self._alloc(pos + 1)
        entries = self.store[child]
        st = self.st
        for i in range(len(entries)):
            entries[i] = st(fmt.split_child(pte, level, child_level, i))
        table[idx] = st(fmt.make_table(child, level))

    def map(self, addr: int, level: int, new: int, split: bool = False) -> Span:
        """Install leaf ``new`` at ``level`` for ``addr`` (kvm_pgtable_stage2_map,
        kvm_riscv_gstage_set_pte): allocate missing tables on the way; a bigger block on the
        way is split into children that keep mapping the rest (``split``: RISC-V map_page,
        eager split) or dropped (arm64: the rest re-faults); a table where the leaf goes is
        replaced and its subtree freed. Returns the span of valid translations replaced."""
        g, fmt, store, ld, st = self.g, self.fmt, self.store, self.ld, self.st
        span = Span()
        target = g.pos_of(level)
        table_pa = self.pt.root
        for pos in range(target):
            table, lvl = store[table_pa], g.level_ids[pos]
            idx = g.index(pos, addr)
            pte = ld(table[idx])
            if fmt.is_valid(pte, lvl) and not fmt.is_table(pte, lvl):
                span.add(addr & ~(self.size[lvl] - 1), self.size[lvl])
                if split:
                    self._split_entry(table, idx, pos, pte)
                else:
                    table[idx] = st(fmt.empty)
                    span.dropped += 1
                pte = ld(table[idx])
            if not fmt.is_valid(pte, lvl):
                table[idx] = st(pte := fmt.make_table(self._alloc(pos + 1), lvl))
            table_pa = fmt.table_address(pte, lvl)
        table = store[table_pa]
        idx = g.index(target, addr)
        old = ld(table[idx])
        if fmt.is_valid(old, level):
            if target < g.nlevels - 1 and fmt.is_table(old, level):
                self.pt.free_subtree(fmt.table_address(old, level), target + 1)
                span.add(addr & ~(self.size[level] - 1), self.size[level])
            elif old != new:
                span.add(addr & ~(self.size[level] - 1), self.size[level])
        table[idx] = st(new)
        return span

    def split(self, start: int, end: int, level: int | None = None) -> Span:
        """Split every block in ``[start, end)`` down to leaves of ``level`` (the smallest
        by default): kvm_pgtable_stage2_split, RISC-V mmu_split_huge_pages. The walker
        descends into each table it installs, so a 1G block becomes 4K leaves in one walk."""
        g, fmt, ld = self.g, self.fmt, self.ld
        target = g.pos_of(level if level is not None else min(self.leaf_size,
                                                               key=self.leaf_size.get))
        span = Span()

        def visit(ctx):
            pte = ld(ctx.pte)
            if ctx.pos < target and fmt.is_leaf(pte, ctx.level):
                self._split_entry(ctx.table, ctx.index, ctx.pos, pte)
                span.add(ctx.addr, ctx.size)

        self.pt.walk(start, end, visit, LEAF)
        return span

    # ------------------------------------------------------------------ unmap, protect, age

    def unmap_range(self, start: int, end: int) -> Span:
        """Clear every leaf touching ``[start, end)`` — whole leaves, so the span can be wider
        than the range — and free the tables that become empty (``free_tables``). Returns
        the span to flush."""
        fmt, store, st = self.fmt, self.store, self.st
        empty = st(fmt.empty)
        word = array("Q", [empty]).tobytes()
        span = Span()

        def visit(ctx):
            if ctx.flags == LEAF:
                ctx.set(empty)
                span.add(ctx.addr, ctx.size)
            elif self.free_tables:
                child = ctx.fmt.table_address(ctx.pte, ctx.level)
                table = store[child]
                if table.tobytes().count(word) == len(table):
                    store.free(child)
                    ctx.set(empty)

        self.pt.walk(start, end, visit, LEAF | TABLE_POST)
        return span

    def _update(self, start: int, end: int, change) -> Span:
        """Apply ``change(perms) -> perms`` to every leaf in the range; the span of those
        that changed."""
        fmt, ld, st, on_update = self.fmt, self.ld, self.st, self.on_update
        span = Span()

        def visit(ctx):
            pte = ld(ctx.pte)
            new = fmt.with_perms(pte, change(fmt.perms(pte)))
            if new != pte:
                ctx.set(st(new))
                span.add(ctx.addr, ctx.size)
                if on_update is not None:
                    on_update(ctx.addr, ctx.level, pte, new)

        self.pt.walk(start, end, visit, LEAF)
        return span

    def wrprotect(self, start: int, end: int) -> Span:
        """Clear W of every leaf in the range (kvm_pgtable_stage2_wrprotect,
        kvm_riscv_gstage_wp_range); D stays as it is."""
        return self._update(start, end, lambda p: p & ~PERM_W)

    def wrprotect_mask(self, base_gfn: int, mask: int) -> Span:
        """Write-protect the leaf of each gfn ``base_gfn + i`` for bit ``i`` of ``mask``
        (kvm_riscv_gstage_wp_pt_masked: a huge leaf once, whole)."""
        span = Span()
        while mask:
            addr = (base_gfn + (mask & -mask).bit_length() - 1) << 12
            leaf = self.get_leaf(addr)
            size = self.size[leaf[0]] if leaf is not None else 4096
            lo = addr & ~(size - 1)
            if leaf is not None:
                one = self._update(lo, lo + size, lambda p: p & ~PERM_W)
                if one:
                    span.add(one.lo, one.hi - one.lo)
            first = max((lo >> 12) - base_gfn, 0)
            last = min(((lo + size) >> 12) - base_gfn, 64)
            mask &= ~(((1 << (last - first)) - 1) << first)
        return span

    def test_clear_young(self, start: int, end: int, clear: bool) -> bool:
        """Whether any leaf in the range is young; clear A with ``clear``
        (kvm_pgtable_stage2_test_clear_young). No flush, as Linux."""
        fmt, ld, st, on_update = self.fmt, self.ld, self.st, self.on_update
        young = False

        def visit(ctx):
            nonlocal young
            pte = ld(ctx.pte)
            if fmt.perms(pte) & PERM_A:
                young = True
                if not clear:
                    return True
                new = fmt.with_perms(pte, fmt.perms(pte) & ~PERM_A)
                ctx.set(st(new))
                if on_update is not None:
                    on_update(ctx.addr, ctx.level, pte, new)
            return None

        self.pt.walk(start, end, visit, LEAF)
        return young

    # ------------------------------------------------------------------ introspection

    def present(self, start: int, end: int, snapshot: bool = False):
        """Every present entry touching the range, tables before what they hold, as
        ``(addr, level, pte, is_leaf)`` (x86 for_each_tdp_pte, for code that is not a
        visitor; ``PageTable.iter_present``, lazy unless ``snapshot``). Costs what is
        mapped."""
        ld, fmt, levels = self.ld, self.fmt, self.g.level_ids
        for _table, _idx, pos, addr, raw in self.pt.iter_present(start, end,
                                                                snapshot=snapshot):
            pte, level = ld(raw), levels[pos]
            yield addr, level, pte, fmt.is_leaf(pte, level)

    def leaves(self, start: int, end: int, snapshot: bool = False):
        """``(addr, level, pte)`` of every valid leaf touching ``[start, end)``, ascending."""
        return ((a, lvl, pte) for a, lvl, pte, leaf in self.present(start, end, snapshot)
                if leaf)

    def mappings(self, start_gfn: int, end_gfn: int, private: bool = False):
        """The leaves as the core's uniform ``Mapping`` records (``raw`` as stored)."""
        fmt = self.fmt
        for addr, level, pte in self.leaves(start_gfn << 12, end_gfn << 12, snapshot=True):
            p = fmt.perms(pte)
            yield Mapping(addr >> 12, self.size[level], fmt.output_address(pte, level) >> 12,
                          bool(p & PERM_R), bool(p & PERM_W), bool(p & PERM_X), private,
                          bool(p & PERM_A), bool(p & PERM_D), level, self.st(pte))

    def page_table_bytes(self) -> int:
        return self.store.bytes_used

    def check(self, name: str, entry=None, detached=()) -> list[str]:
        """Format invariants: every table entry points at a table of the next level's size,
        no table is unreachable (the store is this tree's alone), every other non-empty
        entry is a leaf at a leaf level, aligned to its size (``check_entries``, which says
        what ``entry`` and ``detached`` add)."""
        problems: list[str] = []
        for _ in check_entries([(name, self)], problems, entry, detached):
            pass
        return problems


def check_entries(trees, problems: list[str], entry=None, detached=()):
    """``RadixTable.check`` over ``trees``, ``(label, RadixTable)`` pairs that share one store
    (x86: the direct, mirror and invalid roots; a label names its tree in problems): appends
    to ``problems`` a table entry that does not point at a table of the next level's size, a
    table linked twice, tables reachable from no tree (leaked), a non-empty entry neither
    valid nor a placeholder, a leaf at a level without leaves or not aligned to its size;
    and yields every other non-empty entry as ``(label, level, addr, pte, is_leaf)`` (``pte``
    in logical order) for the backend's own invariants, so that it walks nothing again.

    A backend may also judge each non-empty entry in the pass, through ``entry(table_pa,
    pos, index, addr, pte)``: it returns its problems with the entry and the entry to check
    in its place — the entry itself, or for one the backend holds in the middle of an update
    (arm64's LOCKED entry in a break-before-make window) the entry it replaced — and then
    judges the entries that are not valid itself. ``detached``: ``(table_pa, pos, addr)`` of
    subtrees unlinked but not freed yet (arm64 frees them once no walk may be inside them),
    checked with the first tree as reachable."""
    seen, tables = set(), {}
    for n, (label, t) in enumerate(trees):
        g, fmt, ld, tables = t.g, t.fmt, t.ld, t.store.tables
        empty, leaf_size, swapped = t.st(fmt.empty), t.leaf_size, ld is not _ident
        is_valid, is_table, is_placeholder = fmt.is_valid, fmt.is_table, fmt.is_placeholder
        level_ids, shifts, linked_len = g.level_ids, g.shifts, t.linked_len
        stack = [(t.pt.root, 0, 0), *(detached if n == 0 else ())]
        while stack:
            pa, pos, base = stack.pop()
            if pa in seen:
                problems.append(f"{label}: the table at {pa:#x} is linked twice")
                continue
            seen.add(pa)
            table, level, shift = tables[pa], level_ids[pos], shifts[pos]
            child_len = linked_len[pos]
            for idx in present_indices(table, empty):
                pte = ld(table[idx]) if swapped else table[idx]
                addr = base + (idx << shift)
                if entry is not None:
                    found, pte = entry(pa, pos, idx, addr, pte)
                    problems += found
                leaf, problem = False, None
                if not is_valid(pte, level):
                    if entry is None and not is_placeholder(pte, level):
                        problems.append(f"{label}: entry {idx} of the level-{level} table at "
                                        f"{pa:#x} is invalid but not empty ({pte:#x})")
                        continue
                elif child_len and is_table(pte, level):
                    child = fmt.table_address(pte, level)
                    if len(tables.get(child, ())) == child_len:
                        stack.append((child, pos + 1, addr))
                    else:
                        problem = f"links {child:#x}, not a table of the next level"
                else:
                    leaf = True
                    size = leaf_size.get(level)
                    if size is None:
                        problem = "is a leaf at a level without leaves"
                    elif fmt.output_address(pte, level) % size:
                        problem = "is a leaf not aligned to its size"
                if problem:
                    problems.append(f"{label}: entry {idx} of the level-{level} table at "
                                    f"{pa:#x} {problem}")
                yield label, level, addr, pte, leaf
    leaked = len(tables) - len(seen)
    if leaked:
        where = "the root" if len(trees) == 1 else "any root"
        problems.append(f"{', '.join(str(label) for label, _ in trees)}: {leaked} table(s) are "
                        f"leaked, not reachable from {where}")


# --------------------------------------------------------------------------- policies


def mapping_size(vm, fault, sizes, logging: bool, pfnmap_blocks: bool = False) -> int:
    """The leaf size for ``fault`` from ``sizes`` (the table's leaf sizes, smallest first),
    as arm64 / RISC-V / LoongArch choose it (user_mem_abort, kvm_riscv_mmu_map): base pages
    while logging and for VM_PFNMAP (unless ``pfnmap_blocks``); hugetlb's page size falling
    through PUD -> PMD -> base page until the slot allows it (hugetlb_mapping_size,
    fault_supports_stage2_huge_mapping); otherwise THP up to the host's PMD only
    (transparent_hugepage_adjust); guest_memfd up to its folio. A size whose block would
    straddle mixed memory attributes, or whose host frames are not aligned, falls through."""
    base = sizes[0]
    vma = fault.host_vma
    if logging or (fault.pfnmap and not pfnmap_blocks):
        return base
    limit = fault.max_size
    if vma is not None and not vma.kind.startswith("hugetlb"):
        limit = min(limit, vm.host.pmd_size)
    gfn, slot = fault.gfn, fault.slot
    for size in reversed(sizes[1:]):
        npages = size >> 12
        start = gfn & ~(npages - 1)
        if (size > limit or not slot.supports_huge_mapping(gfn, size)
                or (fault.pfn - (gfn - start)) % npages):
            continue
        if vm.attributes:
            attr = vm.get_memory_attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE
            if not vm.range_has_memory_attributes(start, start + npages,
                                                  KVM_MEMORY_ATTRIBUTE_PRIVATE, attr):
                continue
        return size
    return base


class WriteProtectDirtyLog:
    """Dirty logging by write protection, for backends whose hardware keeps no dirty log
    (arm64, RISC-V, LoongArch): enabling logging write-protects the slot (and, with
    ``eager_split``, splits its blocks), GET/CLEAR re-protect what they report, read faults
    in a logging slot map read-only and a writable mapping marks its gfn dirty. The backend
    provides ``wrprotect_gfns(vm, as_id, start, end)``, ``wrprotect_mask(vm, slot,
    base_gfn, mask)`` and ``split_gfns(vm, as_id, start, end)``, each returning "flush
    needed"."""

    #: Split blocks when logging starts (RISC-V's later eager_page_split, arm64
    #: KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE; both off by default).
    eager_split = False

    @staticmethod
    def logging(slot) -> bool:
        """Whether faults in ``slot`` map for dirty tracking: LOG_DIRTY_PAGES on a slot that
        is not read-only (kvm_slot_dirty_track_enabled && !KVM_MEM_READONLY)."""
        return bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES) and not slot.readonly

    def writable(self, fault) -> bool:
        """map_writable, except that a read fault in a logging slot maps read-only so the
        first write traps and is logged."""
        return fault.map_writable and (fault.write or not self.logging(fault.slot))

    @hookimpl
    def commit_memory_region(self, vm, old, new, change):
        """kvm_arch_commit_memory_region: logging switched on (and not manual-protect with
        initially-all-set) write-protects the slot, flushes, then eager-splits."""
        if change == KVM_MR_DELETE or dirty_logging_toggled(old, new) <= 0 or \
                vm.dirty_log_manual_protect_and_init_set():
            return
        with vm.mmu_lock:
            flush = self.wrprotect_gfns(vm, new.as_id, new.base_gfn, new.end_gfn)
        if flush:
            vm.flush_remote_tlbs_memslot(new)
        if self.eager_split:
            with vm.mmu_lock:
                flush = self.split_gfns(vm, new.as_id, new.base_gfn, new.end_gfn)
            if flush:
                vm.flush_remote_tlbs_memslot(new)

    @hookimpl
    def enable_log_dirty_pt_masked(self, vm, slot, gfn_offset, mask):
        """kvm_arch_mmu_enable_log_dirty_pt_masked: re-protect the reported gfns; with
        manual protect and initially-all-set, eager-split [first, last] (the generic caller
        flushes)."""
        base = slot.base_gfn + gfn_offset
        self.wrprotect_mask(vm, slot, base, mask)
        if mask and self.eager_split and vm.dirty_log_manual_protect_and_init_set():
            first, last = (mask & -mask).bit_length() - 1, mask.bit_length() - 1
            self.split_gfns(vm, slot.as_id, base + first, base + last + 1)


class RadixBackend(WriteProtectDirtyLog):
    """The generic hooks of a backend whose tables are ``RadixTable`` s of one ``FORMAT``
    (one table per address space), dirty logging by write protection. A subclass sets
    ``arch_info``, ``FORMAT`` (a ``RadixFormat``; or overrides ``make_format``), ``OPTIONS``
    (name -> ``VmOption``: each becomes an attribute; others are EINVAL) and writes
    ``map_leaf`` (and whatever its hardware adds)."""

    FORMAT: RadixFormat
    OPTIONS: dict = {}
    #: Hardware sets A and D (x86 EPT A/D, RISC-V Svadu); else an access to a leaf without
    #: them faults (arm64 AF, RISC-V without Svadu).
    hw_ad = True
    free_tables = True

    def __init__(self, vm_type: str = "default", **options):
        for name, value in vm_options(self.arch_info.name, self.OPTIONS, options).items():
            setattr(self, name, value)
        self.vm_type = vm_type
        self.tables: list[RadixTable] = []

    __hash__ = object.__hash__

    def make_format(self) -> RadixFormat:
        return self.FORMAT

    def table(self, as_id: int) -> RadixTable:
        return self.tables[as_id]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.tables[0].leaf_size.values()))

    @hookimpl
    def init_vm(self, vm):
        fmt = self.make_format()
        self.tables = [RadixTable(fmt, free_tables=self.free_tables)
                       for _ in range(vm.nr_address_spaces)]
        vm.root_entry_shift = fmt.geometry.shifts[0]

    @hookimpl
    def translate(self, vm, vcpu, gpa, access):
        return self.tables[vcpu.as_id].translate(gpa, access, self.hw_ad)

    def install(self, vm, fault, size: int, perms: int, split: bool = False) -> int:
        """Map the leaf of ``size`` holding ``fault.gfn`` with ``perms``, flush what it
        replaced, and mark the gfn dirty when it is writable."""
        t = self.tables[fault.as_id]
        level = t.level_of[size]
        gpa = fault.gpa & ~(size - 1)
        pa = (fault.pfn << 12) - (fault.gpa - gpa)
        span = t.map(gpa, level, t.fmt.make_leaf(pa, level, perms), split)
        if span.dropped:        # what a completed access used may be gone: the oracles know
            vm.stats["fault_block_unmapped"] += span.dropped
        span.flush(vm)
        if perms & PERM_W:
            vm.mark_page_dirty_in_slot(fault.slot, fault.gfn)
        return RET_PF_FIXED

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        """kvm_unmap_gfn_range: zap the leaves, flush the span they covered (whole leaves);
        nothing left for the caller to flush."""
        self.tables[range.as_id].unmap_range(range.start << 12, range.end << 12).flush(vm)
        return False

    @hookimpl
    def flush_shadow_all(self, vm):
        for t in self.tables:
            t.unmap_range(0, 1 << t.g.ia_bits)
        vm.flush_remote_tlbs()
        return True

    @hookimpl
    def age_gfn(self, vm, range):
        return self.tables[range.as_id].test_clear_young(range.start << 12, range.end << 12,
                                                         True)

    @hookimpl
    def test_age_gfn(self, vm, range):
        return self.tables[range.as_id].test_clear_young(range.start << 12, range.end << 12,
                                                         False)

    def wrprotect_gfns(self, vm, as_id, start, end) -> bool:
        return bool(self.tables[as_id].wrprotect(start << 12, end << 12))

    def wrprotect_mask(self, vm, slot, base_gfn, mask) -> bool:
        return bool(self.tables[slot.as_id].wrprotect_mask(base_gfn, mask))

    def split_gfns(self, vm, as_id, start, end) -> bool:
        return bool(self.tables[as_id].split(start << 12, end << 12))

    @hookimpl
    def leaves(self, vm, start, end, as_id):
        return self.tables[as_id].mappings(start, end)

    @hookimpl
    def page_table_bytes(self, vm):
        return sum(t.page_table_bytes() for t in self.tables)

    @hookimpl
    def check_invariants(self, vm):
        return [p for i, t in enumerate(self.tables)
                for p in t.check(f"{self.arch_info.name} as {i}")]
