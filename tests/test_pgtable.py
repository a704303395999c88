"""kvmcore.pgtable: storage, geometry and the walker's visit order, on a toy 2-level format
(bit 0 valid, bit 1 table, address in bits 12..51)."""

from array import array

import pytest

from kvmcore.pgtable import LEAF, TABLE_POST, TABLE_PRE, Geometry, PageTable, TableStore

ADDR = ((1 << 52) - 1) & ~0xFFF


class Toy:
    def is_valid(self, pte, level):
        return bool(pte & 1)

    def is_table(self, pte, level):
        return bool(pte & 2)

    def table_address(self, pte, level):
        return pte & ADDR


GEO = Geometry(shifts=(21, 12), bits=(9, 9), level_ids=(1, 0), ia_bits=30)


def make():
    store = TableStore()
    pt = PageTable(store, GEO, Toy())
    return store, pt


def link(store, pt, idx):
    child = store.alloc(512)
    store[pt.root][idx] = child | 3
    return child


def test_alloc_is_aligned_and_accounted():
    store = TableStore(min_align=256)
    a, b = store.alloc(512), store.alloc(32)
    assert a % 4096 == 0 and b % 256 == 0 and store.bytes_used == 4096 + 256
    store.free(b)
    assert store.alloc(32) == b


def test_walk_order_and_zap_cost():
    store, pt = make()
    child = link(store, pt, 1)
    store[child][3] = (0x1234 << 12) | 1
    store[pt.root][5] = (0x8000 << 12) | 1       # a 2 MiB block
    seen = []
    pt.walk(0, 1 << 30, lambda c: seen.append((c.flags, c.level, c.addr)),
            LEAF | TABLE_PRE | TABLE_POST)
    assert seen == [(TABLE_PRE, 1, 2 << 20), (LEAF, 0, (2 << 20) + 3 * 4096),
                    (TABLE_POST, 1, 2 << 20), (LEAF, 1, 10 << 20)]


def test_visitor_installing_a_table_is_descended():
    store, pt = make()
    store[pt.root][0] = (0x8000 << 12) | 1       # block

    def split(ctx):
        if ctx.level == 1 and ctx.flags == LEAF:
            new = store.alloc(512)
            for i in range(512):
                store[new][i] = ((0x8000 + i) << 12) | 1
            ctx.set(new | 3)
        return None

    leaves = []
    pt.walk(0, 4096 * 2, lambda c: split(c) or leaves.append((c.level, c.pte >> 12)), LEAF)
    # The block was visited, replaced by a table, and the walk went on inside it.
    assert leaves[0][0] == 1 and leaves[1:] == [(0, 0x8000), (0, 0x8001)]
    assert pt.lookup(0x1000)[3] >> 12 == 0x8001


def test_lookup_stops_at_invalid_and_path():
    store, pt = make()
    child = link(store, pt, 0)
    store[child][7] = (0x42 << 12) | 1
    pos, _table, idx, pte = pt.lookup(7 * 4096)
    assert (pos, idx, pte >> 12) == (1, 7, 0x42)
    assert pt.lookup(4 << 20)[0] == 0
    assert [p[0] for p in pt.path(7 * 4096)] == [0, 1]
    assert sorted(pos for _pa, pos in pt.tables()) == [0, 1]
    pt.destroy()
    assert store.bytes_used == 0


def test_large_sparse_root_walk_visits_only_present_entries():
    store = TableStore()
    geo = Geometry(shifts=(39, 30, 21, 12), bits=(13, 9, 9, 9), level_ids=(0, 1, 2, 3),
                   ia_bits=52)
    pt = PageTable(store, geo, Toy())
    store[pt.root][8000] = (0x99 << 12) | 1      # a 512 GiB block, far up the root
    store[pt.root][3] = (0x77 << 12) | 1
    seen = []
    pt.walk(0, 1 << 52, lambda c: seen.append((c.index, c.pte >> 12)), LEAF)
    assert seen == [(3, 0x77), (8000, 0x99)]
    seen.clear()
    pt.walk(4 << 39, 9000 << 39, lambda c: seen.append(c.index), LEAF)
    assert seen == [8000]


def test_walk_skips_a_format_specific_empty_value():
    class NonZeroEmpty(Toy):
        empty = 1 << 63                            # like x86's SHADOW_NONPRESENT_VALUE

    store = TableStore()
    pt = PageTable(store, GEO, NonZeroEmpty())
    root = store[pt.root]
    for i in range(512):
        root[i] = 1 << 63
    root[300] = (0x55 << 12) | 1
    seen = []
    pt.walk(0, 1 << 30, lambda c: seen.append(c.index), LEAF)
    assert seen == [300]


@pytest.mark.parametrize("empty", [0, 1 << 63, 0x1234])
def test_present_indices_match_a_plain_scan(empty):
    """present_indices / the walker's scan (a compare with an empty table, each entry found
    as a set bit, or read one by one when many) find exactly the entries that are not empty,
    in order, in any range of a table of any size and density."""
    import random

    from kvmcore.pgtable import _present, present_indices

    rng = random.Random(empty)
    for _ in range(300):
        n = rng.choice([32, 64, 100, 200, 512, 520, 1000, 1024, 8192])
        table = array("Q", [empty]) * n
        for i in rng.sample(range(n), min(n, rng.choice([0, 1, 2, 5, 40, n // 2, n]))):
            table[i] = rng.getrandbits(64) | 1
            if table[i] == empty:
                table[i] ^= 2
        first = rng.randrange(n)
        last = rng.randrange(first, n + 1)
        assert _present(table, first, last, empty) == [
            i for i in range(first, last) if table[i] != empty]
        assert present_indices(table, empty) == [i for i in range(n) if table[i] != empty]


def test_a_remembered_scan_is_redone_when_the_table_changes():
    """The scan of a table is remembered by the table's identity and checked against its
    bytes: a table changed since (an entry set, cleared, or the same entry rewritten) is
    scanned again."""
    from kvmcore.pgtable import _present

    table = array("Q", bytes(4096))
    assert _present(table, 0, 512, 0) == []
    table[7] = 5
    assert _present(table, 0, 512, 0) == [7]
    table[300] = 9
    assert _present(table, 0, 512, 0) == [7, 300]
    assert _present(table, 8, 512, 0) == [300]
    table[7] = 0
    assert _present(table, 0, 512, 0) == [300]
    found = _present(table, 0, 512, 0)
    found.append(1)                             # a caller's list is its own
    assert _present(table, 0, 512, 0) == [300]


def _random_tree(rng):
    store, pt = make()
    for _ in range(rng.randint(0, 12)):
        idx = rng.randrange(512)
        pte = store[pt.root][idx]
        if pte & 1 and not pte & 2:
            continue
        if rng.random() < 0.3 and not pte & 1:
            store[pt.root][idx] = (idx << 21) | 1                  # a block
            continue
        child = pte & ADDR if pte & 1 else link(store, pt, idx)
        for j in rng.sample(range(512), rng.choice([1, 3, 100])):
            store[child][j] = (((idx << 9) | j) << 12) | 1
    return store, pt


def test_iter_present_yields_what_the_walker_visits():
    """iter_present (for_each_tdp_pte) gives the entries the visitor walk gives with LEAF |
    TABLE_PRE, in the same order, for any range; ``leaves_only`` drops the table entries;
    ``snapshot`` (each table's entries found on entry, by the walker's scan) gives the same."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        _store, pt = _random_tree(rng)
        start = rng.randrange(1 << 30)
        end = rng.choice([rng.randrange(start, (1 << 30) + 1), 1 << 40])
        want: list = []
        pt.walk(start, end, lambda c, out=want: out.append((c.pos, c.addr, c.pte)),
                LEAF | TABLE_PRE)
        got = [(pos, addr, pte) for _t, _i, pos, addr, pte in pt.iter_present(start, end)]
        assert got == want
        leaves = [(pos, addr) for _t, _i, pos, addr, pte in
                  pt.iter_present(start, end, leaves_only=True)]
        assert leaves == [(pos, addr) for pos, addr, pte in want if pos == 1 or not pte & 2]
        for leaves_only in (False, True):
            assert [e[2:] for e in pt.iter_present(start, end, leaves_only, snapshot=True)] \
                == [e[2:] for e in pt.iter_present(start, end, leaves_only)]


def test_iter_present_stops_at_max_pos():
    """``max_pos``: the entries at that depth are yielded, tables too, and not entered
    (for_each_tdp_pte_min_level above the last level); the ones above are the walk's."""
    import random

    rng = random.Random(11)
    for _ in range(100):
        _store, pt = _random_tree(rng)
        want: list = []
        pt.walk(0, 1 << 40, lambda c, out=want: out.append((c.pos, c.addr, c.pte)),
                LEAF | TABLE_PRE)
        got = [(pos, addr, pte) for _t, _i, pos, addr, pte in
               pt.iter_present(0, 1 << 40, max_pos=0)]
        assert got == [e for e in want if e[0] == 0]
        for leaves_only in (False, True):
            assert [e[2:] for e in pt.iter_present(0, 1 << 40, leaves_only, max_pos=1)] == \
                [e[2:] for e in pt.iter_present(0, 1 << 40, leaves_only)]


def test_iter_present_reads_each_entry_when_it_gets_there():
    """Lazy, as Linux's iterator: an entry set behind the iteration's position while it is
    paused is seen, one cleared is not, and the tuple gives the table and index to store
    into."""
    store, pt = make()
    child = link(store, pt, 0)
    store[child][1] = (1 << 12) | 1
    it = pt.iter_present(0, 1 << 30, leaves_only=True)
    table, idx, pos, addr, _pte = next(it)
    assert table is store[child] and (idx, pos, addr) == (1, 1, 1 << 12)
    store[child][400] = (400 << 12) | 1          # another flow maps a page further on
    store[pt.root][5] = (5 << 21) | 1            # and a block in the root
    store[child][2] = 0
    rest = [(pos, addr) for _t, _i, pos, addr, _p in it]
    assert rest == [(1, 400 << 12), (0, 5 << 21)]


class _AddressOf(dict):
    """Entry -> the table it links, filled on first use (as Power's stored NLBs)."""

    def __missing__(self, pte):
        addr = self[pte] = pte & ADDR
        return addr


class DeclaredWithMapping(Toy):
    """``table_bits`` whose third element maps an entry to its table."""

    def __init__(self):
        self.table_bits = (3, 3, _AddressOf())


def test_lookup_with_declared_table_bits_matches_the_format_tests():
    """A format that declares ``table_bits = (mask, value[, addr_mask or a mapping])`` gets
    the same lookups as one whose ``is_valid`` / ``is_table`` / ``table_address`` are
    called."""
    import random

    class Declared(Toy):
        table_bits = (3, 3)

    class DeclaredWithAddress(Toy):
        table_bits = (3, 3, ADDR)

    rng = random.Random(5)
    for _ in range(50):
        store, pt = _random_tree(rng)
        fast = [PageTable(store, GEO, fmt) for fmt in (Declared(), DeclaredWithAddress(),
                                                       DeclaredWithMapping())]
        for view in fast:
            view.root = pt.root                 # the same tree, read through another format
        for _ in range(20):
            addr = rng.randrange(1 << 30)
            want = pt.lookup(addr)
            for view in fast:
                got = view.lookup(addr)
                assert (got[0], got[1] is want[1], got[2], got[3]) == (
                    want[0], True, want[2], want[3])


def test_walk_and_iter_present_with_declared_table_bits_match_the_format_tests():
    """The walker and ``iter_present`` test a declared ``table_bits`` inline: the visits
    (flags, position, address, entry) and the iterated entries are those of a format whose
    tests are called, valid and invalid entries alike."""
    import random

    class Declared(Toy):
        table_bits = (3, 3)

    class DeclaredWithAddress(Toy):
        table_bits = (3, 3, ADDR)

    def visits(pt, start, end, visit_invalid):
        seen = []
        pt.walk(start, end, lambda ctx: seen.append((ctx.flags, ctx.pos, ctx.addr, ctx.pte)),
                LEAF | TABLE_PRE | TABLE_POST, visit_invalid=visit_invalid)
        return seen

    rng = random.Random(7)
    for _ in range(30):
        store, pt = _random_tree(rng)
        for table in list(store.tables.values()):
            for idx in rng.sample(range(512), 8):
                if not table[idx]:              # invalid entries, one with the table bit
                    table[idx] = rng.choice([1 << 12, (idx << 12) | 2])
        views = [PageTable(store, GEO, fmt) for fmt in (Declared(), DeclaredWithAddress(),
                                                        DeclaredWithMapping())]
        for view in views:
            view.root = pt.root
        for _ in range(10):
            start = rng.randrange(1 << 30)
            end = start + rng.choice([1, 1 << 12, 1 << 21, 1 << 30])
            for visit_invalid in (False, True):
                want = visits(pt, start, end, visit_invalid)
                assert all(visits(v, start, end, visit_invalid) == want for v in views)
            for leaves_only in (False, True):
                want = [e[2:] for e in pt.iter_present(start, end, leaves_only)]
                assert all([e[2:] for e in v.iter_present(start, end, leaves_only)] == want
                           for v in views)
