"""The simulated host mm and what it reports to MMU notifiers."""

import errno

import attrs

import pytest
from conftest import MiB

from kvmcore import KvmError
from kvmcore.host import HostMemory
from kvmcore.uapi import SZ_1G
from kvmcore.host import SigBus, SigSegv


class Recorder:
    def __init__(self):
        self.calls = []

    def invalidate_range_start(self, start, end):
        self.calls.append(("start", start, end))

    def invalidate_range_end(self, start, end):
        self.calls.append(("end", start, end))

    def release(self):
        self.calls.append(("release",))


@pytest.fixture
def rec(host):
    r = Recorder()
    host.register_notifier(r)
    return r


def test_mmap_errors(host):
    for kw, err in ((dict(length=4095), errno.EINVAL), (dict(length=MiB, kind="bogus"),
                                                         errno.EINVAL),
                    (dict(length=MiB, kind="pfnmap"), errno.EINVAL),
                    (dict(length=MiB, prot="rq"), errno.EINVAL),
                    (dict(length=MiB, kind="shared", thp=True), errno.EINVAL),
                    (dict(length=4096, kind="hugetlb_2m"), errno.EINVAL)):
        with pytest.raises(KvmError) as e:
            host.mmap(**kw)
        assert e.value.errno == err, kw
    hva = host.mmap(MiB)
    with pytest.raises(KvmError) as e:
        host.mmap(MiB, addr=hva)
    assert e.value.errno == errno.EEXIST


def test_zero_page_then_cow_notifies(host, rec):
    hva = host.mmap(MiB)
    assert host.read(hva, 4) == bytes(4)
    assert host.lookup_pte(hva)[0] == host.zero_pfn
    host.write(hva, b"data")
    assert rec.calls == [("start", hva, hva + 4096), ("end", hva, hva + 4096)]
    assert host.read(hva, 4) == b"data"


def test_shared_read_maps_readonly_write_upgrades_without_notifier(host, rec):
    hva = host.mmap(MiB, kind="shared")
    host.read(hva, 1)
    pfn, writable, _ = host.lookup_pte(hva)
    assert not writable
    host.write(hva, b"x")
    assert host.lookup_pte(hva)[:2] == (pfn, True) and rec.calls == []


def test_dontneed_anon_loses_data_shared_keeps_it(host):
    anon, shared = host.mmap(MiB), host.mmap(MiB, kind="shared")
    for hva in (anon, shared):
        host.write(hva, b"keep")
        host.madvise_dontneed(hva, MiB)
        assert host.lookup_pte(hva) is None
    assert host.read(anon, 4) == bytes(4)
    assert host.read(shared, 4) == b"keep"


def test_peek_reads_what_a_read_would_see_without_faulting(host):
    """HostMemory.peek, the lost-write oracle's reader: the mapped frame's bytes, else what a
    fault would map (zeros for anonymous memory, the file's page, the device's frame), and
    nothing is faulted in; None where no VMA is."""
    anon, shared = host.mmap(MiB), host.mmap(MiB, kind="shared")
    inside_huge = host.mmap(4 * MiB, kind="hugetlb_2m") + MiB + 0x3010
    for hva in (anon, shared, inside_huge):
        host.write(hva, b"keep")
        assert host.peek(hva, 4) == b"keep"
    for hva in (anon, shared):
        host.madvise_dontneed(hva, 4096)
    assert host.lookup_pte(anon) is None and host.peek(anon, 4) == bytes(4)
    assert host.lookup_pte(shared) is None and host.peek(shared, 4) == b"keep"
    assert host.peek(shared + 0x1000, 4) == bytes(4) and host.lookup_pte(shared + 0x1000) is None
    host.munmap(inside_huge & ~(2 * MiB - 1), 2 * MiB)
    assert host.peek(inside_huge, 4) is None
    dev = host.mmap(MiB, kind="pfnmap", pfn=0x80000)
    host.write_frame(0x80002, 8, b"bar0")
    assert host.peek(dev + 0x2008, 4) == b"bar0" and host.lookup_pte(dev + 0x2008) is None


def test_peek_reads_a_guest_memfd_mapping_from_its_folio():
    from kvmcore.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP
    from kvmcore.vm import VM

    vm = VM(arch="kvmcore.testing:FlatBackend")
    gmem = vm.create_guest_memfd(MiB, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    hva = gmem.mmap()
    assert vm.host.peek(hva + 0x5008, 4) == bytes(4) and not gmem.inode.folios
    vm.host.write(hva + 0x5008, b"gmem")
    vm.host.madvise_dontneed(hva, MiB)                # the folio stays in the file
    assert vm.host.lookup_pte(hva + 0x5008) is None and vm.host.peek(hva + 0x5008, 4) == b"gmem"


def test_thp_split_and_collapse(host, rec):
    hva = host.mmap(4 * MiB, thp=True)
    host.write(hva + 0x1000, b"huge")
    assert host.host_mapping_size(hva) == 2 * MiB
    host.split_huge_page(hva)
    assert host.host_mapping_size(hva + 0x1000) == 4096
    assert host.read(hva + 0x1000, 4) == b"huge"
    for i in range(512):
        host.read(hva + i * 4096, 1)
    new = host.collapse_huge_page(hva)
    assert host.lookup_pte(hva)[0] == new and host.read(hva + 0x1000, 4) == b"huge"
    assert [c[0] for c in rec.calls] == ["start", "end", "start", "end"]


def test_migrate_moves_contents(host, rec):
    hva = host.mmap(MiB)
    host.write(hva, b"move")
    old = host.lookup_pte(hva)[0]
    new = host.migrate(hva)
    assert new != old and host.lookup_pte(hva)[0] == new and host.read(hva, 4) == b"move"
    assert rec.calls[0] == ("start", hva, hva + 4096)


def test_mprotect_notifies_on_every_change(host, rec):
    """change_protection notifies (MMU_NOTIFY_PROTECTION_VMA) whether a permission goes or
    comes; an exclusive anonymous page is writable again at once (can_change_pte_writable),
    the zero page is not; an unchanged protection does nothing."""
    hva = host.mmap(MiB)
    host.write(hva, b"x")
    host.read(hva + 0x1000, 1)                          # the zero page
    host.mprotect(hva, MiB, "r")
    assert not host.lookup_pte(hva)[1] and len(rec.calls) == 2
    with pytest.raises(SigSegv):
        host.write(hva, b"y")
    host.mprotect(hva, MiB, "rw")
    assert rec.calls[2:] == [("start", hva, hva + MiB), ("end", hva, hva + MiB)]
    assert host.lookup_pte(hva)[1] and not host.lookup_pte(hva + 0x1000)[1]
    host.mprotect(hva, MiB, "rw")
    assert len(rec.calls) == 4
    host.write(hva, b"y")
    assert len(rec.calls) == 4                          # no COW: the page was exclusive


def test_mprotect_none_keeps_the_pages(host, rec):
    """PROT_NONE makes protnone entries: no access and no GUP goes through them, but the
    page stays, with its contents, for the next mprotect (change_pte_range)."""
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"anon")
    host.write(hva + MiB, b"huge")
    pfn, _, size = host.lookup_pte(hva)
    host.mprotect(hva, 2 * MiB, "")
    assert host.lookup_pte(hva) == (pfn, False, size)
    assert host.gup_fast(hva, False) is None
    with pytest.raises(SigSegv):
        host.read(hva, 1)
    with pytest.raises(OSError):
        host.gup(hva, False)
    host.mprotect(hva, 2 * MiB, "rw")
    assert host.lookup_pte(hva) == (pfn, True, size)
    assert host.read(hva, 4) == b"anon" and host.read(hva + MiB, 4) == b"huge"


def test_mprotect_notifies_from_the_first_page_table(host, rec):
    """The invalidation starts at the first 1 GiB with page tables (change_pud_range), and
    none fires over a range that never had any; hugetlb notifies its whole range."""
    hva = host.mmap(3 * SZ_1G)
    host.mprotect(hva, 3 * SZ_1G, "r")
    assert rec.calls == []
    host.read(hva + SZ_1G + 0x5000, 1)
    host.mprotect(hva, 3 * SZ_1G, "rw")
    assert rec.calls == [("start", hva + SZ_1G, hva + 3 * SZ_1G),
                         ("end", hva + SZ_1G, hva + 3 * SZ_1G)]
    rec.calls.clear()
    huge = host.mmap(4 * MiB, kind="hugetlb_2m")
    host.mprotect(huge, 4 * MiB, "r")
    assert rec.calls == [("start", huge, huge + 4 * MiB), ("end", huge, huge + 4 * MiB)]


def test_mprotect_writenotify_page_writable_again_only_if_dirty(host):
    """A writenotify file page goes back to writable on mprotect only if it is dirty (a
    write went through); a clean one waits for its write fault (wp_page_shared)."""
    hva = host.mmap(MiB, kind="shared")
    host.write(hva, b"d")
    host.read(hva + 0x1000, 1)
    host.mprotect(hva, MiB, "r")
    host.mprotect(hva, MiB, "rw")
    assert host.lookup_pte(hva)[1] and not host.lookup_pte(hva + 0x1000)[1]


def test_mprotect_splits_a_thp_across_the_vma_edge(host, rec):
    """mprotect of part of a THP splits it with the VMA (__split_vma ->
    vma_adjust_trans_huge: the whole huge range notified on its own), then changes only the
    pages inside, their range notified; the rest stay writable."""
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")
    host.mprotect(hva, 0x1000, "r")
    assert host.lookup_pte(hva)[1:] == (False, 4096)
    assert host.lookup_pte(hva + 0x1000)[1:] == (True, 4096)
    assert rec.calls == [("start", hva, hva + 2 * MiB), ("end", hva, hva + 2 * MiB),
                         ("start", hva, hva + 0x1000), ("end", hva, hva + 0x1000)]


def test_munmap_and_dontneed_split_a_thp_across_the_edge_with_its_own_invalidation(host, rec):
    """The notifiers see the range itself and, on their own, the whole range of a THP
    across its edge (__split_huge_pmd): munmap splits it with the VMA, under the mmap lock
    for write, before unmap_region's invalidation; MADV_DONTNEED when its zap meets it,
    nested inside its own."""
    hva = host.mmap(4 * MiB, thp=True)
    host.write(hva, b"x")
    host.write(hva + 2 * MiB, b"y")
    rec.calls.clear()
    page = hva + 2 * MiB - 0x1000
    host.munmap(page, 0x1000)
    assert rec.calls == [("start", hva, hva + 2 * MiB), ("end", hva, hva + 2 * MiB),
                         ("start", page, page + 0x1000), ("end", page, page + 0x1000)]
    rec.calls.clear()
    page = hva + 2 * MiB
    host.madvise_dontneed(page, 0x1000)
    assert rec.calls == [("start", page, page + 0x1000), ("start", page, page + 2 * MiB),
                         ("end", page, page + 2 * MiB), ("end", page, page + 0x1000)]
    assert host.host_mapping_size(page + 0x1000) == 0x1000
    assert host.read(page, 1) == b"\0" and host.read(hva, 1) == b"x"


def test_a_thp_split_while_it_migrates_gets_the_new_frames_in_its_ptes(host, rec):
    """A migration of a THP that an mprotect of one page splits inside its notifier window
    moves the folio where it is mapped when it takes the page-table lock: each PTE the split
    left gets its new frame, with its own bits; none keeps a frame the migration frees."""
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")
    host.write(hva + MiB, b"y")
    old = host.lookup_pte(hva)[0]
    host.freed = set()
    flow = host.steps.migrate(hva)
    while next(flow) != "mn_host_window":
        pass
    host.mprotect(hva, 0x1000, "r")              # splits the THP with the VMA
    flow.run()
    new = flow.result
    assert new != old and host.lookup_pte(hva) == (new, False, 0x1000)
    assert host.lookup_pte(hva + MiB) == (new + 256, True, 0x1000)
    assert all(host.lookup_pte(hva + i * 0x1000)[0] == new + i for i in range(512))
    assert host.read(hva, 1) == b"x" and host.read(hva + MiB, 1) == b"y"
    assert old in host.freed and new not in host.freed


def test_munmap_splits_vmas(host, rec):
    hva = host.mmap(3 * MiB)
    host.munmap(hva + MiB, MiB)
    assert host.find_vma(hva) and host.find_vma(hva + 2 * MiB)
    assert host.find_vma(hva + MiB) is None
    with pytest.raises(SigSegv):
        host.read(hva + MiB, 1)


def test_dontneed_leaves_the_ptes_of_a_vma_a_munmap_detached(host):
    """madvise(MADV_DONTNEED) zaps the VMAs of its range as the tree holds them under its
    mmap lock, one by one; one a munmap has detached (the munmap holds the lock for read
    across its notifiers, then zaps and frees its PTEs) is a hole to it. It zapped the
    whole range, so the munmap found no PTE to free and the page was lost (the swarm's
    lost-page oracle, seed 17, the 51st)."""
    host.freed = set()
    hva = host.mmap(16 * 4096)
    host.write(hva + 7 * 4096, b"x")
    pfn = host.lookup_pte(hva + 7 * 4096)[0]
    unmap = host.steps.munmap(hva + 7 * 4096, 4096)
    assert next(unmap) == "mn_host_window"          # detached, the PTE still there
    host.madvise_dontneed(hva + 4096, 15 * 4096)
    assert host.lookup_pte(hva + 7 * 4096) is not None
    assert host.lookup_pte(hva + 6 * 4096) is None
    unmap.run()
    assert host.lookup_pte(hva + 7 * 4096) is None and pfn in host.freed


def test_poison(host, rec):
    hva = host.mmap(MiB)
    host.write(hva, b"x")
    host.poison(hva)
    with pytest.raises(SigBus):
        host.read(hva, 1)
    host.read(hva + 4096, 1)


@pytest.mark.parametrize("kind", ["thp", "hugetlb_2m"])
def test_poison_in_a_huge_page_notifies_its_whole_range(host, rec, kind):
    """memory_failure splits a THP before it unmaps the poisoned page (try_to_split_thp_page:
    the PMD's split invalidates its range), then unmaps that page alone
    (hwpoison_user_mappings), and try_to_unmap_one's range for a hugetlb page is the huge
    page: a secondary MMU is never told about part of a huge mapping."""
    hva = host.mmap(4 * MiB, thp=True) if kind == "thp" else host.mmap(4 * MiB, kind=kind)
    host.write(hva + 2 * MiB, b"x")
    assert host.host_mapping_size(hva + 2 * MiB) == 2 * MiB
    rec.calls.clear()
    page = hva + 2 * MiB + 0x3000
    host.poison(page)
    huge = [("start", hva + 2 * MiB, hva + 4 * MiB), ("end", hva + 2 * MiB, hva + 4 * MiB)]
    assert rec.calls == huge + ([("start", page, page + 0x1000), ("end", page, page + 0x1000)]
                                if kind == "thp" else [])
    with pytest.raises(SigBus):
        host.read(hva + 2 * MiB + 0x3000, 1)
    # The rest of a THP stays mapped; a hugetlb page is poisoned whole.
    if kind == "thp":
        assert host.read(hva + 2 * MiB, 1) == b"x"
    else:
        with pytest.raises(SigBus):
            host.read(hva + 2 * MiB, 1)
    assert host.read(hva, 1) == b"\0"


def test_munmap_drops_hwpoison_entries():
    """A hwpoison entry is a PTE: munmap takes it away, and a new mapping at the same
    address gets a fresh page (a hugetlb page's entry too)."""
    host = HostMemory()
    for kind in ("anon", "hugetlb_2m"):
        hva = host.mmap(2 * MiB, kind=kind)
        host.write(hva + 0x5000, b"x")
        host.poison(hva + 0x5000)
        with pytest.raises(SigBus):
            host.read(hva + 0x5000, 1)
        host.munmap(hva, 2 * MiB)
        assert host.mmap(2 * MiB, kind=kind, addr=hva) == hva
        assert host.read(hva + 0x5000, 1) == b"\0"
        host.munmap(hva, 2 * MiB)


def test_dontneed_never_splits_a_hugetlb_page(host, rec):
    """madvise_dontneed_free_valid_vma: a start inside a hugetlb page is EINVAL, an end
    inside one is rounded down to its start (nothing zapped, nothing notified, if that
    leaves nothing)."""
    hva = host.mmap(4 * MiB, kind="hugetlb_2m")
    host.write(hva, b"a")
    host.write(hva + 2 * MiB, b"b")
    rec.calls.clear()
    with pytest.raises(KvmError) as e:
        host.madvise_dontneed(hva + 0x1000, 0x1000)
    assert e.value.errno == errno.EINVAL and rec.calls == []
    host.madvise_dontneed(hva + 2 * MiB, 0x1000)
    assert rec.calls == [] and host.host_mapping_size(hva + 2 * MiB) == 2 * MiB
    host.madvise_dontneed(hva, 2 * MiB + 0x1000)
    assert rec.calls == [("start", hva, hva + 2 * MiB), ("end", hva, hva + 2 * MiB)]
    assert host.lookup_pte(hva) is None
    assert host.host_mapping_size(hva + 2 * MiB) == 2 * MiB
    assert host.read(hva + 2 * MiB, 1) == b"b"


class AgeRecorder(Recorder):
    """Records each aging callback's range; ``on_first`` runs inside the first one."""

    def __init__(self, on_first=None):
        super().__init__()
        self.on_first = on_first

    def _age(self, name, start, end):
        self.calls.append((name, start, end))
        if self.on_first is not None:
            self.on_first, run = None, self.on_first
            run()
        return True

    def clear_flush_young(self, start, end):
        return self._age("clear_flush_young", start, end)

    def clear_young(self, start, end):
        return self._age("clear_young", start, end)

    def test_young(self, start, end):
        return self._age("test_young", start, end)


def _thp_then_pages(host):
    """A THP at ``hva`` (the second PMD of its VMA never touched), then 4 KiB pages 0 and 2
    of an anonymous VMA right after it."""
    hva = host.mmap(4 * MiB, thp=True)
    host.write(hva + 0x5000, b"huge")
    small = host.mmap(MiB, addr=hva + 4 * MiB)
    host.write(small, b"a")
    host.write(small + 0x2000, b"b")
    assert host.host_mapping_size(hva) == 2 * MiB
    return hva, small


@pytest.mark.parametrize("flush,name", [(True, "clear_flush_young"),
                                        (False, "clear_young")])
def test_age_notifies_once_per_host_mapping(host, flush, name):
    """folio_referenced_one asks per mapping: a PTE for its page, a PMD-mapped THP for the
    PMD's whole range (even if the aged range covers part of it); hvas with no entry are
    not asked about."""
    hva, small = _thp_then_pages(host)
    rec = AgeRecorder()
    host.register_notifier(rec)
    assert host.age(hva + MiB, 3 * MiB + 0x3000, flush=flush) is True
    assert rec.calls == [(name, hva, hva + 2 * MiB), (name, small, small + 0x1000),
                         (name, small + 0x2000, small + 0x3000)]
    rec.calls.clear()
    assert host.age(hva + 2 * MiB, MiB, flush=flush) is False     # nothing mapped
    assert rec.calls == []


def test_test_young_asks_at_the_first_page_of_each_mapping(host):
    """mmu_notifier_test_young takes one address: one page per PTE, a THP's first page."""
    hva, small = _thp_then_pages(host)
    rec = AgeRecorder()
    host.register_notifier(rec)
    assert host.test_young(hva, 4 * MiB + 0x3000) is True
    assert rec.calls == [("test_young", hva, hva + 0x1000), ("test_young", small, small + 0x1000),
                         ("test_young", small + 0x2000, small + 0x3000)]


def test_age_skips_a_mapping_gone_before_its_turn(host):
    """The entries are looked up again before their turn: a page unmapped meanwhile (by
    another flow, here from inside the first callback) is not asked about."""
    _hva, small = _thp_then_pages(host)
    rec = AgeRecorder(on_first=lambda: host.madvise_dontneed(small + 0x2000, 0x1000))
    host.register_notifier(rec)
    host.age(small, 0x3000)
    assert [c for c in rec.calls if c[0] == "clear_flush_young"] == [
        ("clear_flush_young", small, small + 0x1000)]


def test_pfnmap_gup_refused_follow_after_fixup(host):
    hva = host.mmap(MiB, kind="pfnmap", pfn=0x80000)
    assert host.gup_fast(hva, False) is None
    with pytest.raises(OSError) as e:
        host.gup(hva, False)
    assert e.value.errno == errno.EFAULT
    assert host.follow_pfnmap(hva) is None
    assert host.fixup_user_fault(hva, False) is True
    assert host.follow_pfnmap(hva) == (0x80000, True)


# --------------------------------------------------------------------------- PAGE_SIZE > 4K

K64 = 64 * 1024


def test_host_page_size_einval():
    for bad in (8192, 2 * MiB, "4096"):
        with pytest.raises(KvmError) as e:
            HostMemory(page_size=bad)
        assert e.value.errno == errno.EINVAL and "page_size" in str(e.value)
    with pytest.raises(KvmError) as e:
        HostMemory(page_size=K64, pmd_size=K64)
    assert e.value.errno == errno.EINVAL and "pmd_size" in str(e.value)


def test_64k_host_maps_whole_aligned_pages():
    """One host page is 16 aligned consecutive 4 KiB frames, mapped by one PTE of 64 KiB."""
    host = HostMemory(page_size=K64)
    hva = host.mmap(4 * K64)
    host.write(hva + K64 + 0x1234, b"abc")
    first, writable, size = host.lookup_pte(hva + K64)
    assert (writable, size) == (True, K64) and first % 16 == 0
    assert host.lookup_pte(hva + K64 + 0xF000)[0] == first + 15
    assert host.read_frame(first + 1, 0x234, 3) == b"abc"
    assert host.lookup_pte(hva) is None            # only the touched page is present
    assert host.read(hva, 4) == bytes(4)           # the zero page: one 64 KiB page too
    assert host.lookup_pte(hva + 0x8000)[0] == host.zero_pfn + 8


def test_64k_host_refuses_sub_page_ranges(rec):
    host = HostMemory(page_size=K64)
    hva = host.mmap(2 * K64)
    for call in (lambda: host.munmap(hva + 4096, 4096), lambda: host.mmap(4096),
                 lambda: host.madvise_dontneed(hva, 4096)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EINVAL


def test_64k_host_thp_is_the_pmd_size():
    """The PMD maps PAGE_SIZE**2 / 8: 512 MiB with 64 KiB pages (Power radix says 2 MiB)."""
    host = HostMemory(page_size=K64)
    assert host.pmd_size == 512 * MiB
    hva = host.mmap(512 * MiB, thp=True)
    host.write(hva + 3 * K64, b"x")
    assert host.host_mapping_size(hva) == 512 * MiB
    host.madvise_dontneed(hva + K64, K64)          # a partial zap splits into 64 KiB PTEs
    assert host.host_mapping_size(hva + 3 * K64) == K64
    assert host.read(hva + 3 * K64, 1) == b"x" and host.read(hva + K64, 1) == b"\0"
    assert HostMemory(page_size=K64, pmd_size=2 * MiB).pmd_size == 2 * MiB


def test_64k_host_poison_takes_the_whole_page():
    host = HostMemory(page_size=K64)
    hva = host.mmap(2 * K64)
    host.write(hva, b"x")
    host.poison(hva + 0x3000)
    for off in (0, 0xF000):
        with pytest.raises(SigBus):
            host.read(hva + off, 1)
    assert host.read(hva + K64, 1) == b"\0"


def test_vm_base_page_follows_its_host():
    """A VM's base page is its host's PAGE_SIZE: the option defaults to the host's, a
    disagreeing option is EINVAL, and so is a 64 KiB host for a 4 KiB-only backend."""
    from kvmcore import VM
    from kvmcore.testing import FlatBackend
    from kvmcore.vm import host_for

    host = HostMemory(page_size=K64)
    vm = VM(arch=FlatBackend, host=host)
    assert vm.page_size == K64 and vm.options == {"page_size": K64}
    with pytest.raises(KvmError) as e:
        VM(arch=FlatBackend, host=host, page_size=4096)
    assert e.value.errno == errno.EINVAL and "page_size=4096" in str(e.value)
    assert VM(arch=FlatBackend, page_size=16384).host.page_size == 16384
    assert host_for(FlatBackend, {"page_size": K64}).page_size == K64
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, 0x10000, 4096, host.mmap(K64))
    assert e.value.errno == errno.EINVAL and "memory_size" in str(e.value)

    class FourKOnly(FlatBackend):
        arch_info = attrs.evolve(FlatBackend.arch_info, base_page_option=None)

    with pytest.raises(KvmError) as e:
        VM(arch=FourKOnly, host=host)
    assert e.value.errno == errno.EINVAL and "4 KiB pages only" in str(e.value)


def test_pre_fault_alignment_is_page_size():
    """KVM_PRE_FAULT_MEMORY checks PAGE_ALIGNED: on a 64 KiB host a 4 KiB-aligned gpa is
    EINVAL, and a whole page is processed in one step."""
    from kvmcore import VM
    from kvmcore.testing import FlatBackend

    vm = VM(arch=FlatBackend, page_size=K64)
    vm.set_user_memory_region(0, 0, 4 * K64, vm.host.mmap(4 * K64))
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as e:
        vcpu.pre_fault_memory(0x1000, K64)
    assert e.value.errno == errno.EINVAL and "PAGE_SIZE" in str(e.value)
    assert vcpu.pre_fault_memory(K64, K64) == (2 * K64, 0)
    assert vm.lookup(K64).size == K64


def test_hwpoison_signal_names_the_base_page():
    """kvm_send_hwpoison_signal: the hva of the faulting page (gfn_to_hva of gpa >>
    PAGE_SHIFT) and lsb PAGE_SHIFT, also for an access in the middle of a 64 KiB page."""
    from kvmcore import VM, HwPoisonSignal
    from kvmcore.testing import FlatBackend

    vm = VM(arch=FlatBackend, page_size=K64)
    hva = vm.host.mmap(4 * K64)
    vm.set_user_memory_region(0, 0, 4 * K64, hva)
    vm.host.write(hva + K64, b"x")
    vm.host.poison(hva + K64 + 0x5000)
    with pytest.raises(HwPoisonSignal) as e:
        vm.create_vcpu(0).read(K64 + 0x3008, 1)
    assert (e.value.hva, e.value.lsb) == (hva + K64, 16)


def test_pte_pages_hold_one_word_per_page():
    """The PAGE_SIZE level of the host page table is PTE pages of 8-byte words (frame
    address | bits), keyed by page index like the huge levels' dicts; ranged clears and
    changes cross PTE pages; GUP-fast refuses a special PTE."""
    from kvmcore.host import _PTE_WRITE, PteTable, _word

    t = PteTable(512)
    t[5] = _word(0x1234, True)
    t[512 + 7] = _word(0x99, False)
    assert t.get(5) == 0x1234 << 12 | 0x43 and t.get(519) == 0x99 << 12 | 1
    assert 6 not in t and t.get(6) == 0
    assert [k for k, _w in t.items()] == [5, 519] and t.keys_in(0, 600) == [5, 519]
    t.modify_range(0, 1024, lambda w: w & ~_PTE_WRITE)
    assert t.get(5) == 0x1234 << 12 | 0x41 and t.get(519) == 0x99 << 12 | 1
    t.clear_range(6, 1024)
    assert t.keys_in(0, 1024) == [5] and t.pop(5) >> 12 == 0x1234 and t.pop(5) == 0
    assert len(t.pages) == 2 and all(len(p) == 512 for p in t.pages.values())
    host = HostMemory()
    hva = host.mmap(1 << 20, kind="pfnmap", pfn=0x80000)
    assert host.gup_fast(hva, False) is None
    host.fixup_user_fault(hva, False)
    assert host.follow_pfnmap(hva) == (0x80000, True) and host.gup_fast(hva, False) is None


def test_dontneed_of_a_pfnmap_range_is_einval(host, rec):
    """madvise_dontneed_free_valid_vma forbids VM_PFNMAP: EINVAL, nothing notified."""
    hva = host.mmap(4 * 4096, kind="pfnmap", pfn=0x80000)
    rec.calls.clear()
    with pytest.raises(KvmError) as e:
        host.madvise_dontneed(hva, 4096)
    assert e.value.errno == errno.EINVAL and "VM_PFNMAP" in str(e.value) and rec.calls == []


def test_munmap_detaches_the_vmas_before_its_notifiers_run(host, rec):
    """vms_gather_munmap_vmas detaches the VMAs under the mmap lock before unmap_region's
    notifiers: in the window a GUP that needs the VMA fails with EFAULT, while GUP-fast,
    which walks the page table alone, still finds the PTE until it is zapped."""
    hva = host.mmap(MiB)
    host.write(hva, b"x")
    pfn = host.lookup_pte(hva)[0]
    unmap = host.steps.munmap(hva, MiB)
    while next(unmap) != "mn_host_window":
        pass
    assert host.find_vma(hva) is None
    with pytest.raises(OSError) as e:
        host.gup(hva + 4096, False)
    assert e.value.errno == errno.EFAULT
    assert host.gup_fast(hva, False) == (pfn, True)
    unmap.run()
    assert host.gup_fast(hva, False) is None
    assert rec.calls == [("start", hva, hva + MiB), ("end", hva, hva + MiB)]


def test_poison_of_an_untouched_page_leaves_the_zero_page_alone(host, rec):
    """An untouched anonymous page is the shared zero page, a reserved page that
    memory_failure ignores: no mapping is unmapped or notified, and other mappings of the
    zero page read on."""
    a, b = host.mmap(MiB), host.mmap(MiB)
    assert host.read(b + 4096, 1) == b"\0"
    host.poison(a)
    assert rec.calls == []
    assert host.read(b + 4096, 1) == b"\0"
    assert host.lookup_pte(b + 4096)[0] == host.zero_pfn


def test_mprotect_holds_mmap_lock_for_write_so_gup_waits(vm, host):
    """mprotect holds mm->mmap_lock for write throughout: a KVM fault's get_user_pages, even
    for a page outside the range (whose gfn no invalidation covers), waits for it at
    mmap_lock_wait, and a VMM access would block."""
    from kvmcore.locks import WouldBlock

    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    host.write(hva, b"x")                 # page tables: change_protection notifies
    change = host.steps.mprotect(hva, 0x10000, "r")
    while change.point != "mn_host_window":
        next(change)
    assert "mmap_lock(write)" in change.holds
    with pytest.raises(WouldBlock):
        host.read(hva + 0x80000, 1)
    fault = vm.create_vcpu(0).step_access("write", 0x80000, b"y")
    while fault.runnable:
        next(fault)
    assert fault.point == "mmap_lock_wait" and fault.waits_for.startswith("mmap_lock")
    change.run()
    fault.run()
    assert vm.lookup(0x80000).writable and host.read(hva + 0x80000, 1) == b"y"
    assert not host.mmap_lock.held


def test_munmap_downgrades_mmap_lock_for_its_notifiers(vm, host):
    """munmap detaches the VMAs under mmap_lock for write, then downgrades it to read for
    the notifiers (vms_complete_munmap_vmas): a VMM access elsewhere runs in that window."""
    hva = host.mmap(MiB)
    other = host.mmap(MiB)
    unmap = host.steps.munmap(hva, MiB)
    while unmap.point != "mn_host_window":
        next(unmap)
    assert "mmap_lock(read)" in unmap.holds
    assert host.read(other, 1) == b"\0"
    unmap.run()
    assert not host.mmap_lock.held


def test_collapse_holds_mmap_lock_for_write(host):
    """khugepaged's collapse_huge_page takes mm->mmap_lock for write around its
    invalidation: a paused collapse holds it, and a VMM access would block."""
    from kvmcore.locks import WouldBlock

    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")                      # a THP
    host.split_huge_page(hva)                  # its PAGE_SIZE pages, all present
    collapse = host.steps.collapse_huge_page(hva)
    while collapse.point != "mn_host_window":
        next(collapse)
    assert "mmap_lock(write)" in collapse.holds
    with pytest.raises(WouldBlock):
        host.read(hva, 1)
    collapse.run()
    assert host.lookup_pte(hva)[2] == 2 * MiB and host.read(hva, 1) == b"x"
    assert not host.mmap_lock.held


def test_collapse_frees_the_small_pages_and_ends_the_invalidation_before_the_new_pmd(host):
    """collapse_huge_page clears the old PTEs inside its notifier range and ends it before
    the copy and set_pmd_at (the mmap lock keeps faults out until then); the old pages go
    back to the allocator, so a stage-2 entry still holding one is a use-after-free."""
    seen = []

    class AtEnd(Recorder):
        def invalidate_range_end(self, start, end):
            seen.append((host.lookup_pte(start), host.lookup_pte(start + 0x1000)))

    host.register_notifier(AtEnd())
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")
    host.split_huge_page(hva)
    small = host.lookup_pte(hva + 0x1000)[0]
    host.freed = set()
    seen.clear()
    new = host.collapse_huge_page(hva)
    assert seen == [(None, None)]
    assert small in host.freed and host.zero_pfn not in host.freed
    assert host.lookup_pte(hva + 0x1000) == (new + 1, True, 2 * MiB)


def test_a_split_finds_its_thp_split_already_by_an_mprotect_in_its_window(host):
    """__split_huge_pmd looks at the PMD under its lock after the notifiers start: an
    mprotect of part of the THP that ran meanwhile split it, so there is nothing left to do
    (the model's split raised KeyError there; found by kvmcore swarm)."""
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")
    split = host.steps.split_huge_page(hva)
    while split.point != "mn_host_window":
        next(split)
    host.mprotect(hva + 0x2000, 0x1000, "r")
    split.run()
    assert host.lookup_pte(hva)[1:] == (True, 4096)
    assert host.lookup_pte(hva + 0x2000)[1:] == (False, 4096)


def test_a_collapse_that_loses_a_page_in_its_window_puts_the_ptes_back(host):
    """A page unmapped by memory_failure while the collapse's PTEs are cleared: the
    isolation fails (khugepaged_max_ptes_none 0 in the model), the other PTEs go back."""
    hva = host.mmap(2 * MiB, thp=True)
    host.write(hva, b"x")
    host.split_huge_page(hva)
    before = {i: host.lookup_pte(hva + i * 4096) for i in range(512)}
    collapse = host.steps.collapse_huge_page(hva)
    while collapse.point != "mn_host_window":
        next(collapse)
    host.poison(hva + 0x5000)
    with pytest.raises(KvmError) as e:
        collapse.run()
    assert e.value.errno == errno.EAGAIN and not host.mmap_lock.held
    assert host.lookup_pte(hva + 0x5000) is None
    assert all(host.lookup_pte(hva + i * 4096) == before[i] for i in range(512) if i != 5)


def test_mmap_takes_mmap_lock_for_write(host):
    """mmap(2) runs do_mmap under mm->mmap_lock for write (vm_mmap_pgoff): while a paused
    munmap holds it, even for read across its notifiers, a plain mmap() would block; it
    changes nothing then, and succeeds once the munmap has finished."""
    from kvmcore.locks import WouldBlock

    hva = host.mmap(MiB)
    host.write(hva, b"x")
    unmap = host.steps.munmap(hva, MiB)
    while unmap.point != "mn_host_window":
        next(unmap)
    assert "mmap_lock(read)" in unmap.holds
    vmas = list(host.vmas)
    with pytest.raises(WouldBlock):
        host.mmap(MiB)
    assert list(host.vmas) == vmas
    unmap.run()
    other = host.mmap(MiB)
    assert host.read(other, 1) == b"\0" and not host.mmap_lock.held


def test_mmap_without_room_changes_nothing(host):
    """An mmap that finds no room below TASK_SIZE fails with ENOMEM and leaves the address
    space as it was: the next mmap still finds room."""
    from kvmcore.host import TASK_SIZE

    first = host.mmap(MiB)
    with pytest.raises(KvmError) as e:
        host.mmap(TASK_SIZE)
    assert e.value.errno == errno.ENOMEM
    assert host.mmap(MiB) > first


def test_vmm_write_refaults_when_dontneed_takes_its_cow_page(vm, host):
    """A VMM write that breaks COW sleeps in the break's notifiers; a madvise(DONTNEED)
    (mmap lock for read too) that runs meanwhile zaps the new page: the store faults again,
    as the CPU's would, instead of writing through a PTE that is gone."""
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    assert host.read(hva, 1) == b"\0"                  # the zero page: the write breaks COW
    write = host.steps.write(hva, b"V")
    while write.point != "mn_end_lock_wait":
        next(write)
    host.madvise_dontneed(hva, host.page_size)
    assert host.lookup_pte(hva) is None
    write.run()
    assert host.read(hva, 1) == b"V" and host.lookup_pte(hva)[1]
    vm.check_invariants()


def test_mprotect_to_the_same_protection_changes_nothing(host, rec):
    """mprotect_fixup returns early for a VMA whose flags would not change: it is not
    split and no notifier fires (a VM_PFNMAP block stays one VMA, as arm64's
    get_vma_page_shift sees it)."""
    for kind, kw in (("anon", {}), ("pfnmap", {"pfn": 0x20_0000})):
        hva = host.mmap(2 * MiB, kind=kind, **kw)
        host.read(hva, 1)
        rec.calls.clear()
        host.mprotect(hva + 4096, 4096, "rw")
        assert rec.calls == []
        assert [(v.start, v.end) for v in host.vmas_in(hva, hva + 2 * MiB)] == \
            [(hva, hva + 2 * MiB)]
        host.mprotect(hva + 4096, 4096, "r")          # a change splits and notifies
        assert len(host.vmas_in(hva, hva + 2 * MiB)) == 3 and rec.calls


def test_a_thp_made_inside_a_dontneed_window_is_split_under_its_own_invalidation(host, rec):
    """MADV_DONTNEED holds the mmap lock for read, so a fault may make a THP across the end
    of its range after it notified the range; the zap splits it, and __split_huge_pmd
    invalidates the whole huge range inside the DONTNEED's (the range's own pages go, the
    others stay as PAGE_SIZE entries)."""
    hva = host.mmap(2 * MiB, thp=True)
    start, end = hva + 2 * MiB - 16 * 4096, hva + 2 * MiB - 4096
    flow = host.steps.madvise_dontneed(start, end - start)
    while next(flow) != "mn_host_window":
        pass
    host.write(hva, b"x")                        # handle_mm_fault: the whole THP
    assert host.lookup_pte(hva)[2] == 2 * MiB
    flow.run()
    assert rec.calls == [("start", start, end), ("start", hva, hva + 2 * MiB),
                         ("end", hva, hva + 2 * MiB), ("end", start, end)]
    assert host.lookup_pte(hva)[2] == 4096 and host.lookup_pte(start) is None
    assert host.lookup_pte(end)[2] == 4096 and host.read(hva, 1) == b"x"


def test_a_thp_made_while_a_dontneed_splits_the_other_edge_is_split_too(host, rec):
    """A DONTNEED across two THP ranges splits the THP at its start; while that split
    waits, a fault makes the THP at its end: the zap splits that one too, with its own
    invalidation, before any page goes (none is split silently under a KVM 2 MiB leaf)."""
    hva = host.mmap(4 * MiB, thp=True)
    host.write(hva, b"x")
    start, end = hva + 2 * MiB - 4096, hva + 2 * MiB + 4096
    flow = host.steps.madvise_dontneed(start, end - start)
    assert next(flow) == "mn_host_window"        # the DONTNEED's own invalidation
    assert next(flow) == "mn_host_window"        # the split of [hva, hva + 2 MiB)
    host.write(hva + 3 * MiB, b"y")              # a THP at the range's end
    assert host.lookup_pte(end)[2] == 2 * MiB
    flow.run()
    first, second = (hva, hva + 2 * MiB), (hva + 2 * MiB, hva + 4 * MiB)
    assert rec.calls == [("start", start, end), ("start", *first), ("end", *first),
                         ("start", *second), ("end", *second), ("end", start, end)]
    assert host.lookup_pte(start) is None and host.lookup_pte(end - 4096) is None
    assert host.lookup_pte(end)[2] == 4096 and host.read(hva + 3 * MiB, 1) == b"y"


def test_a_cow_break_that_lost_the_race_keeps_the_winners_page(vm, host):
    """wp_page_copy installs its new page only if the PTE is still the one it faulted on
    (pte_same under the PTE lock, after invalidate_range_start): two writes that both found
    the zero page break COW once, and the first one's data stays. Before, the second COW
    put a fresh page over the first's, and its bytes were lost."""
    hva = host.mmap(MiB)
    vm.set_user_memory_region(0, 0, MiB, hva)
    assert host.read(hva, 1) == b"\0"                        # the zero page
    first = host.steps.write(hva, b"a")
    second = host.steps.write(hva + 8, b"b")
    while first.point != "mn_host_window":
        next(first)
    while second.point != "mn_host_window":                # found the zero page too
        next(second)
    first.run()
    pfn = host.lookup_pte(hva)[0]
    second.run()
    assert host.lookup_pte(hva)[0] == pfn
    assert host.read(hva, 9) == b"a" + b"\0" * 7 + b"b"
    assert not host.mmap_lock.held
