"""The simulated host: physical frames, VMAs, the host page table, GUP, and MMU notifiers.

A small, honest model of the parts of Linux's mm that KVM depends on:

- frames are numbered from a bump allocator (never reused, so a stale pfn is never somebody
  else's page) and get contents lazily (an untouched frame reads as zeros);
- an untouched private anonymous page read maps the shared zero page read-only, and a later
  write breaks COW to a new frame, firing the MMU notifiers for that page (do_wp_page);
- MAP_SHARED memory (``shared``, hugetlb, guest_memfd mmap) keeps its pages in a backing
  object, so zapping a PTE (madvise DONTNEED) does not lose them;
- VM_IO|VM_PFNMAP ranges (``pfnmap``) are populated on first touch by the driver's fault
  handler; GUP refuses them, KVM follows the PTE (hva_to_pfn_remapped);
- every change that Linux reports to MMU notifiers is reported to each registered VM with its
  hva range, bracketed by invalidate_range_start / end;
- the host page table holds Linux-like words (frame address | present, writable, special,
  protnone, dirty): mprotect(PROT_NONE) keeps the pages behind protnone entries, and a later
  mprotect gives them back.

PAGE_SIZE is the host kernel's (``HostMemory(page_size=...)``: 4 KiB, 16 KiB or 64 KiB, as an
arm64 or Power kernel is built), and it is the base page of every VM on this host, as in Linux.
Frame numbers stay in 4 KiB units whatever PAGE_SIZE is (``pfn = phys >> 12``, like the API's
gfns), so one host page is ``page_size >> 12`` consecutive frames, aligned to that count. The
host page table has one table per mapping size: PAGE_SIZE, the PMD size (THP;
PAGE_SIZE^2 / 8 unless the architecture says otherwise: 2 MiB, 32 MiB, 512 MiB) and the
hugetlb sizes.

Simplifications, stated: no swap, no fork (so no shared COW pages other than the zero page),
no NUMA; THP uses no huge zero page (a read of an untouched THP range allocates the huge page);
private hugetlb mappings behave like shared ones; ``hugetlb_2m`` and ``hugetlb_1g`` exist on
every host (an arm64 kernel with 64 KiB pages has 2 MiB through contiguous PTEs but no 1 GiB
size); mmap lays mappings out upwards from 4 GiB, aligning those of 2 MiB or more to 2 MiB (the
PMD size when they span one, 1 GiB for hugetlb_1g).
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from types import GeneratorType

import attrs
import structlog
from sortedcontainers import SortedKeyList

from .args import buffer, flag, integer, string, u64
from .errors import EHWPOISON, KvmError
from .locks import READ, WRITE, RwLock, Steps, drive, steppable, stepping
from .uapi import PAGE_SHIFT, PAGE_SIZE, SZ_1G, SZ_2M

logger = structlog.get_logger(__name__)

KINDS = ("anon", "shared", "hugetlb_2m", "hugetlb_1g", "pfnmap", "gmem")
#: PAGE_SIZE values a host kernel can be built with (x86: 4K; arm64: 4K, 16K, 64K; Power:
#: 4K, 64K).
HOST_PAGE_SIZES = (4096, 16384, 65536)
_HUGETLB = {"hugetlb_2m": SZ_2M, "hugetlb_1g": SZ_1G}
MMAP_BASE = 1 << 32
#: A host operation, or a KVM fault's get_user_pages, waits for mm->mmap_lock, which a
#: paused host operation holds (mprotect, munmap's detach and a THP collapse for write;
#: madvise, a VMM access and GUP for read).
MMAP_LOCK_WAIT = "mmap_lock_wait"
#: The range one P4D entry maps (512 GiB with 4-level paging, where it is the PGD's).
_P4D_SIZE = 1 << 39
TASK_SIZE = (1 << 47) - PAGE_SIZE


class SigSegv(Exception):
    """A host access to an address with no VMA, or against the VMA's protection."""


class SigBus(Exception):
    """A host access to a page that cannot be faulted in (private guest_memfd page, past the
    end of a file, poisoned)."""


@attrs.define(eq=False)
class Backing:
    """Pages of a MAP_SHARED object (shmem, hugetlbfs file) by offset in 4 KiB frames: one
    entry per page of ``page_size`` (the host's, or the huge page size), keyed by its first
    offset."""

    page_size: int = PAGE_SIZE
    pages: dict = attrs.Factory(dict)


@attrs.define(eq=False)
class Vma:
    start: int
    end: int
    prot: str
    kind: str
    page_size: int = PAGE_SIZE  # the host's PAGE_SIZE, or the hugetlb page size
    thp: bool = False
    pfn: int = 0              # pfnmap: device pfn (4 KiB frames) of ``start``
    backing: object = None    # Backing, or a guest_memfd inode
    pgoff: int = 0            # offset of ``start`` in the backing, in 4 KiB frames
    #: VM_IO | VM_PFNMAP (``kind`` "pfnmap", which never changes): read on every fault.
    io_pfnmap: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        self.io_pfnmap = self.kind == "pfnmap"

    @property
    def shared(self) -> bool:
        return self.kind != "anon"

    def pgoff_of(self, hva: int) -> int:
        return self.pgoff + ((hva - self.start) >> PAGE_SHIFT)

    def pfnmap_pfn(self, hva: int) -> int:
        """A VM_PFNMAP VMA maps its device pfns linearly (remap_pfn_range, or a driver's fault
        handler such as vfio-pci's): the 4 KiB frame at ``hva``, populated or not yet."""
        return self.pfn + ((hva - self.start) >> PAGE_SHIFT)


#: Bits of a host page-table word besides the frame's physical address (pfn << 12): present,
#: writable, special (a VM_IO|VM_PFNMAP page, which GUP-fast refuses: pte_special), protnone
#: (a PROT_NONE mapping's entry: present for the mm, which keeps the page, but no access
#: goes through it: pte_protnone) and dirty (pte_dirty: a write went through, which lets
#: mprotect make a writenotify file page writable again, can_change_pte_writable). Every
#: level uses this word: a PTE, a THP's PMD, a hugetlb page's entry.
_PTE_PRESENT = 1 << 0
_PTE_WRITE = 1 << 1
_PTE_SPECIAL = 1 << 2
_PTE_PROTNONE = 1 << 3
_PTE_DIRTY = 1 << 6


class PteTable:
    """The PAGE_SIZE level of the host page table: one PTE page (``array('Q')``, a PMD's worth
    of entries) per PMD-sized hva range that ever had a PTE, each entry a host page-table word
    (see ``_PTE_PRESENT``), as Linux's PTE pages hold them: 8 bytes per mapped page. Keys are
    page indexes (``hva >> page_shift``); read like the dicts of the huge levels (key ->
    word, 0 for none). PTE pages are never freed: a zap leaves its PTE page, as Linux's
    does until munmap's free_pgtables."""

    __slots__ = ("pages", "bits", "mask", "_empty")

    def __init__(self, entries_per_page: int):
        #: PMD index -> PTE page.
        self.pages: dict[int, array] = {}
        self.bits = entries_per_page.bit_length() - 1
        self.mask = entries_per_page - 1
        self._empty = bytes(8 * entries_per_page)

    def get(self, key: int, default: int = 0) -> int:
        """The word of page index ``key`` (``default`` when there is none)."""
        page = self.pages.get(key >> self.bits)
        w = 0 if page is None else page[key & self.mask]
        return w or default

    def __setitem__(self, key: int, word: int) -> None:
        page = self.pages.get(key >> self.bits)
        if page is None:
            page = self.pages[key >> self.bits] = array("Q", self._empty)
        page[key & self.mask] = word

    def __contains__(self, key: int) -> bool:
        return bool(self.get(key))

    def pop(self, key: int) -> int:
        """Clear page index ``key``'s entry; return its word (0: there was none)."""
        page = self.pages.get(key >> self.bits)
        if page is None:
            return 0
        w, page[key & self.mask] = page[key & self.mask], 0
        return w

    def _pmds(self, lo: int, hi: int):
        """The PMD indexes with a PTE page that page indexes ``[lo, hi)`` touch."""
        first, last = lo >> self.bits, (hi - 1) >> self.bits
        if last - first <= len(self.pages):
            return [k for k in range(first, last + 1) if k in self.pages]
        return sorted(k for k in self.pages if first <= k <= last)

    def _spans(self, lo: int, hi: int):
        """``(PTE page, first, last)`` for each PTE page under page indexes ``[lo, hi)``."""
        if hi <= lo:
            return
        bits, mask = self.bits, self.mask
        for pmd in self._pmds(lo, hi):
            base = pmd << bits
            yield self.pages[pmd], max(lo - base, 0), min(hi - base, mask + 1)

    def clear_range(self, lo: int, hi: int) -> None:
        """Clear the entries of page indexes ``[lo, hi)`` (zap_pte_range)."""
        for page, first, last in self._spans(lo, hi):
            page[first:last] = array("Q", bytes(8 * (last - first)))

    def modify_range(self, lo: int, hi: int, modify) -> None:
        """Replace each present entry of page indexes ``[lo, hi)`` by ``modify(word)``
        (change_pte_range)."""
        for page, first, last in self._spans(lo, hi):
            for i in range(first, last):
                if page[i]:
                    page[i] = modify(page[i])

    def keys_in(self, lo: int, hi: int) -> list[int]:
        """The page indexes in ``[lo, hi)`` that have an entry, ascending."""
        out: list[int] = []
        if hi <= lo:
            return out
        bits, mask = self.bits, self.mask
        for pmd in self._pmds(lo, hi):
            page = self.pages[pmd]
            base = pmd << bits
            first, last = max(lo - base, 0), min(hi - base, mask + 1)
            out.extend(base + i for i in range(first, last) if page[i])
        return out

    def items(self):
        """``(page index, word)`` of every entry."""
        bits = self.bits
        for pmd, page in list(self.pages.items()):
            base = pmd << bits
            for i, w in enumerate(page):
                if w:
                    yield base + i, w


def _word(pfn: int, writable: bool, special: bool = False) -> int:
    """A present entry for frame ``pfn``; a writable one is dirty, as every writable entry
    the model makes comes from a write fault or a mapping made writable (and so dirty) at
    fault time (do_anonymous_page, hugetlb's make_huge_pte, do_huge_pmd_anonymous_page)."""
    return (pfn << PAGE_SHIFT | _PTE_PRESENT | (_PTE_WRITE | _PTE_DIRTY if writable else 0)
            | (_PTE_SPECIAL if special else 0))


def _check_prot(prot: str) -> str:
    if set(string("prot", prot)) - set("rwx"):
        raise KvmError(errno.EINVAL, f"prot={prot!r}: use a combination of 'r', 'w', 'x'")
    return "".join(c for c in "rwx" if c in prot)


class HostMemory:
    """A host mm with its physical memory. Public calls are those of API.md.

    ``page_size`` is the kernel's PAGE_SIZE (4096, 16384 or 65536); ``pmd_size`` the size a
    PMD entry maps, i.e. the THP size (default PAGE_SIZE * PAGE_SIZE / 8: a table page holds
    PAGE_SIZE / 8 entries, as on x86 and arm64; Power radix with 64 KiB pages has 2 MiB).
    """

    def __init__(self, page_size: int = PAGE_SIZE, pmd_size: int | None = None):
        if page_size not in HOST_PAGE_SIZES:
            raise KvmError(errno.EINVAL, f"page_size={page_size!r}: a kernel's PAGE_SIZE is "
                                         f"one of {', '.join(map(str, HOST_PAGE_SIZES))}")
        if pmd_size is None:
            pmd_size = page_size * page_size // 8
        if (not isinstance(pmd_size, int) or pmd_size <= page_size
                or pmd_size & (pmd_size - 1)):
            raise KvmError(errno.EINVAL, f"pmd_size={pmd_size!r}: a power of two above "
                                         f"page_size {page_size:#x}")
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.pmd_size = pmd_size
        #: 4 KiB frames per host page.
        self.nr_frames = page_size >> PAGE_SHIFT
        self._next_pfn = 0x1000
        self.frames: dict[int, bytearray] = {}
        self.poisoned: set[int] = set()        # first frame of each poisoned host page
        #: First frame of each folio a migration has taken off the LRU (folio_isolate_lru):
        #: another migration of it fails with EBUSY until the first is done.
        self.isolated: set[int] = set()
        self.zero_pfn = self._alloc(self.nr_frames)
        self.vmas = SortedKeyList(key=lambda v: v.start)
        #: mm->mmap_lock (taken where Linux takes it, except by the rmap-driven operations,
        #: migrate, poison, aging and THP split, which do not; khugepaged's collapse takes it
        #: for write).
        self.mmap_lock = RwLock("mmap_lock")
        #: The VMAs a munmap has detached and whose PTEs its notifiers have not zapped yet.
        self.detached: list[Vma] = []
        self._last_vma: Vma | None = None  # mmap's vmacache: faults come in runs
        # The host page table: per mapping size, hva >> shift -> (first frame, writable).
        # ``ptes`` is the PAGE_SIZE level (PTE pages, see PteTable); ``_huge`` the others
        # (dicts of PMD / PUD entries), smallest first.
        self.ptes = PteTable(pmd_size // page_size)
        self._pte_pages = self.ptes.pages
        self._pte_mask = self.ptes.mask
        self._pmd_shift = pmd_size.bit_length() - 1
        self._huge: list[tuple[int, int, dict]] = [
            (size, size.bit_length() - 1, {})
            for size in sorted({pmd_size, SZ_2M, SZ_1G}) if size > page_size]
        self._tables = {page_size: self.ptes} | {size: t for size, _s, t in self._huge}
        self.hwpoison_pages: set[int] = set()  # hva >> page_shift of poisoned user pages
        #: base hva -> size of each hugetlb page whose mapping is a hwpoison entry (the huge
        #: page is poisoned whole: an access anywhere in it is SIGBUS).
        self.hwpoison_huge: dict[int, int] = {}
        self._next_hva = MMAP_BASE
        self.notifiers: list = []
        self.gmem_frames: dict[int, tuple[object, int]] = {}
        #: Frames given back to the allocator (anonymous pages unmapped or migrated away,
        #: truncated guest_memfd folios), recorded only when a checker sets it to a set (the
        #: race explorer's use-after-free oracle): the bump allocator never reuses a frame,
        #: so a frame in here that a leaf or TLB entry still maps is a use after free.
        self.freed: set[int] | None = None
        #: ``(first frame, frames)`` of every anonymous page allocated, recorded only when a
        #: checker sets it to a list (the race explorer's lost-page oracle): an anonymous
        #: page that no PTE maps and that was not freed is lost to the allocator.
        self.anon_allocs: list[tuple[int, int]] | None = None

    def __repr__(self) -> str:
        return f"HostMemory(page_size={self.page_size}, pmd_size={self.pmd_size:#x})"

    # ------------------------------------------------------------------ frames

    def _alloc(self, npages: int) -> int:
        pfn = (self._next_pfn + npages - 1) & ~(npages - 1)
        self._next_pfn = pfn + npages
        return pfn

    def _alloc_anon(self, npages: int) -> int:
        pfn = self._alloc(npages)
        if self.anon_allocs is not None:
            self.anon_allocs.append((pfn, npages))
        return pfn

    def alloc_frames(self, npages: int) -> int:
        """Allocate ``npages`` contiguous 4 KiB frames aligned to ``npages`` (a power of
        two)."""
        return self._alloc(npages)

    def page_of(self, pfn: int) -> int:
        """The first frame of the host page holding frame ``pfn``."""
        return pfn & ~(self.nr_frames - 1)

    def frame(self, pfn: int) -> bytearray:
        page = self.frames.get(pfn)
        if page is None:
            page = self.frames[pfn] = bytearray(PAGE_SIZE)
        return page

    def read_frame(self, pfn: int, offset: int, n: int) -> bytes:
        page = self.frames.get(pfn)
        return bytes(n) if page is None else bytes(page[offset:offset + n])

    def write_frame(self, pfn: int, offset: int, data: bytes) -> None:
        if self.page_of(pfn) == self.zero_pfn:
            raise AssertionError("write to the zero page")
        self.frame(pfn)[offset:offset + len(data)] = data

    def copy_frames(self, src: int, dst: int, npages: int) -> None:
        for i in range(npages):
            page = self.frames.get(src + i)
            if page is not None:
                self.frames[dst + i] = bytearray(page)

    # ------------------------------------------------------------------ notifiers

    def register_notifier(self, notifier) -> None:
        self.notifiers.append(notifier)

    def unregister_notifier(self, notifier) -> None:
        if notifier in self.notifiers:
            self.notifiers.remove(notifier)
            notifier.release()

    @contextmanager
    def invalidating(self, hva: int, length: int) -> Iterator[None]:
        """mmu_notifier_invalidate_range_start / _end around a change of ``[hva, hva+length)``.
        Public so that a test can hold an invalidation open while other flows run (the
        steppable host operations, ``host.steps.munmap(...)``, pause inside theirs)."""
        integer("hva", hva)
        integer("length", length)
        drive(self._invalidate_start(hva, length))
        try:
            yield
        finally:
            drive(self._invalidate_end(hva, length))

    def _invalidate_start(self, hva: int, length: int):
        """mmu_notifier_invalidate_range_start on every registered VM, then the window in
        which the host changes its page table with no KVM lock held (``mn_host_window``).
        A callback's result is run as ``_flow`` would, without a generator of its own."""
        end = hva + length
        for n in list(self.notifiers):
            r = n.invalidate_range_start(hva, end)
            if type(r) is GeneratorType:
                yield from r
        if stepping():      # a point that waits for nothing: only a stepped flow stops
            yield "mn_host_window"

    def _invalidate_end(self, hva: int, length: int):
        """mmu_notifier_invalidate_range_end on every registered VM (each result as in
        ``_invalidate_start``)."""
        end = hva + length
        for n in list(self.notifiers):
            r = n.invalidate_range_end(hva, end)
            if type(r) is GeneratorType:
                yield from r

    flow_label = "host"

    @property
    def steps(self) -> Steps:
        """This host's mm operations started as steppable ``Flow`` objects
        (``host.steps.munmap(hva, length)``; see ``kvmcore.locks``)."""
        return Steps(self)

    # ------------------------------------------------------------------ VMAs

    def find_vma(self, hva: int) -> Vma | None:
        vma = self._last_vma
        if vma is not None and vma.start <= hva < vma.end:
            return vma
        idx = self.vmas.bisect_key_right(hva) - 1
        if idx < 0:
            return None
        vma = self.vmas[idx]
        if hva < vma.end:
            self._last_vma = vma
            return vma
        return None

    def _forget_hwpoison(self, start: int, end: int) -> None:
        """munmap drops the hwpoison entries of ``[start, end)`` with the other PTEs: a new
        mapping there gets fresh pages (a hugetlb page's entry goes with its whole page:
        munmap of hugetlb is aligned to it)."""
        shift = self.page_shift
        if self.hwpoison_pages:
            self.hwpoison_pages -= {k for k in self.hwpoison_pages
                                    if start >> shift <= k < end >> shift}
        for base in [b for b in self.hwpoison_huge if start <= b < end]:
            del self.hwpoison_huge[base]

    def _forget(self, vma: Vma) -> None:
        self.vmas.remove(vma)
        self._last_vma = None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        idx = max(self.vmas.bisect_key_right(start) - 1, 0)
        out = []
        while idx < len(self.vmas):
            vma = self.vmas[idx]
            if vma.start >= end:
                break
            if vma.end > start:
                out.append(vma)
            idx += 1
        return out

    def mmap(self, length: int, prot: str = "rw", kind: str = "anon", thp: bool = False,
             pfn: int | None = None, addr: int | None = None, backing=None,
             pgoff: int = 0) -> int:
        """mmap(2). ``kind``: anon, shared, hugetlb_2m, hugetlb_1g, pfnmap (VM_IO|VM_PFNMAP,
        ``pfn=`` is the device pfn of the first page, in 4 KiB frames). ``shared`` is a
        MAP_SHARED mapping of a file whose filesystem tracks dirty pages
        (vma_wants_writenotify: a read fault maps read-only, the first write makes the PTE
        writable); shmem and memfd, which map writable on a read fault, are not modelled.
        ``addr`` asks for a fixed address (MAP_FIXED_NOREPLACE: EEXIST if taken). Returns
        the hva."""
        integer("length", length)
        string("kind", kind)
        flag("thp", thp)
        for name, value in (("pfn", pfn), ("addr", addr)):
            if value is not None:
                integer(name, value)
        integer("pgoff", pgoff)
        prot = _check_prot(prot)
        if kind not in KINDS or (kind == "gmem" and backing is None):
            raise KvmError(errno.EINVAL, f"kind={kind!r}: one of {', '.join(KINDS[:-1])}")
        page = _HUGETLB.get(kind, self.page_size)
        if not isinstance(length, int) or length <= 0 or length % page:
            raise KvmError(errno.EINVAL, f"length={length!r}: not a positive multiple of "
                                         f"{page:#x}")
        if kind == "pfnmap":
            if not isinstance(pfn, int) or pfn < 0 or pfn % self.nr_frames:
                raise KvmError(errno.EINVAL, f"pfn={pfn!r}: a pfnmap mapping needs the device "
                                             f"pfn, aligned to the {self.page_size}-byte page")
        elif pfn is not None:
            raise KvmError(errno.EINVAL, f"pfn: only for kind='pfnmap', not {kind!r}")
        if thp and kind != "anon":
            raise KvmError(errno.EINVAL, "thp: transparent huge pages are for kind='anon'")
        if addr is not None and (addr % page or addr <= 0):
            raise KvmError(errno.EINVAL, f"addr={addr!r}: not aligned to {page:#x}")
        # do_mmap runs under mmap_lock for write (vm_mmap_pgoff): a plain call, so it
        # raises WouldBlock, having changed nothing, while a paused flow holds the lock.
        with self.mmap_lock(WRITE):
            fixed = addr is not None
            if not fixed:
                align = SZ_1G if kind == "hugetlb_1g" else self.pmd_size if (
                    length >= self.pmd_size) else SZ_2M if length >= SZ_2M else self.page_size
                align = max(align, page)
                addr = (self._next_hva + align - 1) & ~(align - 1)
            elif self.vmas_in(addr, addr + length):
                raise KvmError(errno.EEXIST, f"addr={addr:#x}: the range is already mapped")
            if addr + length > TASK_SIZE:
                raise KvmError(errno.ENOMEM, f"length={length:#x}: no room below TASK_SIZE")
            if not fixed:
                self._next_hva = addr + length + self.page_size  # a guard gap after it
            if backing is None and kind in ("shared", "hugetlb_2m", "hugetlb_1g"):
                backing = Backing(page)
            self.vmas.add(Vma(addr, addr + length, prot, kind, page, thp, pfn or 0, backing,
                              pgoff))
        return addr

    def _check_range(self, name: str, hva: int, length: int) -> None:
        integer("hva", hva)
        integer("length", length)
        if hva < 0:
            raise KvmError(errno.EINVAL, f"{name}: hva={hva:#x} is negative")
        if not isinstance(hva, int) or hva % self.page_size:
            raise KvmError(errno.EINVAL, f"{name}: hva={hva!r} is not aligned to the "
                                         f"{self.page_size}-byte page")
        if not isinstance(length, int) or length <= 0 or length % self.page_size:
            raise KvmError(errno.EINVAL, f"{name}: length={length!r} is not a positive "
                                         "multiple of the page size")

    def _split_vmas(self, start: int, end: int, prot: str | None = None):
        """Split VMAs at ``start`` and ``end`` (__split_vma, under the mmap lock for write);
        return those inside. With ``prot``, only those whose protection differs
        (mprotect_fixup leaves the others whole). A transparent huge page across a cut is
        split first, with its own invalidation (vma_adjust_trans_huge -> __split_huge_pmd),
        so that none straddles a VMA's edge. Both pieces are new objects: a fault that read
        a VMA under the mmap lock (its bounds, for vma_pagesize) keeps what it read, as
        Linux keeps it in locals."""
        for vma in self.vmas_in(start, end):
            if vma.prot == prot:
                continue
            for cut in (start, end):
                if vma.start < cut < vma.end:
                    if cut % vma.page_size:
                        raise KvmError(errno.EINVAL, f"hva={cut:#x}: not aligned to the "
                                                     "hugetlb page size")
                    for size, hshift, table in self._huge:
                        if cut >> hshift in table and cut % size:
                            yield from self._split_huge_pmd(cut & ~(size - 1), size)
                    self._forget(vma)
                    right = attrs.evolve(vma, start=cut, pfn=vma.pfn + (
                        (cut - vma.start) >> PAGE_SHIFT if vma.kind == "pfnmap" else 0),
                        pgoff=vma.pgoff_of(cut))
                    left = attrs.evolve(vma, end=cut)
                    self.vmas.add(left)
                    self.vmas.add(right)
                    vma = right if cut == start else left
        return self.vmas_in(start, end)

    # ------------------------------------------------------------------ host page table

    def _entry_word(self, hva: int) -> tuple[int, int] | None:
        """The host page-table entry covering ``hva``: ``(word, size)``."""
        page = self._pte_pages.get(hva >> self._pmd_shift)
        if page is not None:
            w = page[(hva >> self.page_shift) & self._pte_mask]
            if w:
                return w, self.page_size
        for size, shift, table in self._huge:
            w = table.get(hva >> shift)
            if w:
                return w, size
        return None

    def lookup_pte(self, hva: int) -> tuple[int, bool, int] | None:
        """The host mapping of ``hva``: ``(frame of its 4 KiB, writable, mapping size)``.
        A PROT_NONE entry is there (pte_present), never writable: a walk of the page table
        finds it, as follow_pfnmap_start and __find_linux_pte do; GUP does not use it."""
        page = self._pte_pages.get(hva >> self._pmd_shift)
        if page is not None:
            w = page[(hva >> self.page_shift) & self._pte_mask]
            if w:
                return ((w >> PAGE_SHIFT) + ((hva & (self.page_size - 1)) >> PAGE_SHIFT),
                        bool(w & _PTE_WRITE), self.page_size)
        for size, shift, table in self._huge:
            w = table.get(hva >> shift)
            if w:
                return ((w >> PAGE_SHIFT) + ((hva & (size - 1)) >> PAGE_SHIFT),
                        bool(w & _PTE_WRITE), size)
        return None

    def peek(self, hva: int, n: int) -> bytes | None:
        """The ``n`` bytes (within one 4 KiB frame) a VMM read at ``hva`` would see now, for a
        checker: read without faulting anything in (the mapped frame's; else what a fault
        would map: zeros for anonymous memory or a file page not allocated yet, the file's
        page, the device's frame). None where no VMA is."""
        off = hva & (PAGE_SIZE - 1)
        pte = self.lookup_pte(hva)
        if pte is not None:
            return self.read_frame(pte[0], off, n)
        vma = self.find_vma(hva)
        if vma is None:
            return None
        if vma.kind == "anon":
            return bytes(n)
        if vma.kind == "pfnmap":
            return self.read_frame(vma.pfnmap_pfn(hva), off, n)
        index = vma.pgoff_of(hva)
        if vma.kind == "gmem":
            pfn = vma.backing.frame_of(index)
        else:
            # A file's pages are keyed by the first offset of each (huge) page.
            first = vma.pgoff_of(hva & ~(vma.page_size - 1))
            pfn = vma.backing.pages.get(first)
            pfn = None if pfn is None else pfn + index - first
        return bytes(n) if pfn is None else self.read_frame(pfn, off, n)

    def mapped_pfns(self) -> set[int]:
        """The first frame of every entry of the host page table (what some PTE, PMD or PUD
        maps), for a checker: Linux would ask each folio's rmap."""
        return {w >> PAGE_SHIFT for table in self._tables.values() for _key, w in table.items()}

    def host_mapping_size(self, hva: int) -> int:
        """host_pfn_mapping_level / get_user_mapping_size: the size of the host mapping."""
        e = self.lookup_pte(hva)
        return e[2] if e else self.page_size

    def _zap_ptes(self, start: int, end: int, vmas: list | None = None) -> None:
        """Drop host PTEs in ``[start, end)``; a huge entry partly inside is split first into
        PAGE_SIZE entries (split_huge_pmd), whose outside part stays. ``vmas``: the VMAs of
        the range when they are no longer in the tree (munmap detached them first)."""
        shift = self.page_shift
        lo, hi = start >> shift, end >> shift
        if self.freed is not None:
            self._record_freed(start, end, vmas)
        self.ptes.clear_range(lo, hi)
        for size, hshift, table in self._huge:
            for key in _huge_keys(table, hshift, start, end):
                w = table.pop(key, 0)
                if w:
                    self._split_word(key << hshift, size, w, start, end)

    def _split_word(self, base: int, size: int, word: int, start: int = 0,
                    end: int = 0) -> None:
        """Map the huge page of ``word`` at ``base`` by PAGE_SIZE entries with its bits
        (__split_huge_pmd_locked), leaving out those in ``[start, end)``."""
        shift = self.page_shift
        for off in range(0, size, self.page_size):
            if not start <= base + off < end:
                # The word is the frame's address | bits: the next page's is ``off`` further.
                self.ptes[(base + off) >> shift] = word + off

    def _record_freed(self, start: int, end: int, vmas: list | None = None) -> None:
        """The anonymous frames that dropping the PTEs of ``[start, end)`` frees: private
        pages (not the zero page, not a file's pages, which stay in their backing), and huge
        pages wholly inside (a partly covered one is split and stays)."""
        for vma in self.vmas_in(start, end) if vmas is None else vmas:
            if vma.kind != "anon":
                continue
            lo, hi = max(start, vma.start), min(end, vma.end)
            for size, table in self._tables.items():
                shift = size.bit_length() - 1
                for key in range(lo >> shift, ((hi - 1) >> shift) + 1):
                    pfn = table.get(key, 0) >> PAGE_SHIFT
                    if pfn and pfn != self.zero_pfn and \
                            lo <= key << shift and (key + 1) << shift <= hi:
                        self.freed.update(range(pfn, pfn + (size >> PAGE_SHIFT)))

    def _huge_across_edges(self, start: int, end: int) -> list[tuple[int, int]]:
        """``(base, size)`` of each huge entry that ``[start, end)`` covers in part, in
        address order: one can only hold an edge of the range."""
        found = set()
        for size, hshift, table in self._huge:
            for edge in (start, end - 1):
                key = edge >> hshift
                if key in table:
                    base = key << hshift
                    if base < start or base + size > end:
                        found.add((base, size))
        return sorted(found)

    def _split_huge_pmd(self, base: int, size: int):
        """__split_huge_pmd: the huge entry at ``base`` becomes PAGE_SIZE entries on the same
        frames inside an invalidation of its whole range (the mapping size of every page in
        it changes); under the PMD lock it looks at the entry again, so one that another
        split took meanwhile leaves it nothing to do."""
        yield from self._invalidate_start(base, size)
        word = self._tables[size].pop(base >> (size.bit_length() - 1), 0)
        if word:
            self._split_word(base, size, word)
        yield from self._invalidate_end(base, size)

    def _set_pte(self, hva: int, pfn: int, writable: bool, size: int | None = None,
                 special: bool = False) -> None:
        """Map the page of ``size`` (PAGE_SIZE by default) at ``hva`` to frames from ``pfn``;
        ``special``: a VM_IO|VM_PFNMAP page (pte_special)."""
        if size is None or size == self.page_size:
            # _word's, inline: every fault-in comes here
            self.ptes[hva >> self.page_shift] = (
                pfn << PAGE_SHIFT | _PTE_PRESENT | (_PTE_WRITE | _PTE_DIRTY if writable else 0)
                | (_PTE_SPECIAL if special else 0))
            return
        self._tables[size][hva >> (size.bit_length() - 1)] = _word(pfn, writable)

    # ------------------------------------------------------------------ faults

    def handle_mm_fault(self, hva: int, write: bool, vma: Vma | None = None) -> None:
        """Make ``hva`` present (and writable for a write), as a user fault would; ``vma`` is
        the caller's find_vma(hva) when it has it. Raises SigSegv (no VMA, protection) or
        SigBus (hwpoison, gmem rules). A COW break runs its invalidation within the caller's
        stretch (get_user_pages from a KVM fault)."""
        cow = self._handle_mm_fault(hva, write, vma)
        if cow is not None:
            drive(cow)

    def _handle_mm_fault(self, hva: int, write: bool, vma: Vma | None = None):
        """handle_mm_fault: None when the page is there, or the flow still to run (a
        generator) when it needs a COW break, which yields at its invalidation's race
        points."""
        if vma is None:
            vma = self.find_vma(hva)
        if vma is None:
            raise SigSegv(f"hva={hva:#x}: no mapping")
        if (write and "w" not in vma.prot) or (not write and "r" not in vma.prot):
            raise SigSegv(f"hva={hva:#x}: {'write' if write else 'read'} not allowed by "
                          f"prot {vma.prot!r}")
        if hva >> self.page_shift in self.hwpoison_pages or (
                self.hwpoison_huge and vma.kind in _HUGETLB
                and hva & ~(vma.page_size - 1) in self.hwpoison_huge):
            raise SigBus(f"hva={hva:#x}: hardware-poisoned page")
        e = self._entry_word(hva)
        if e is not None:
            w, size = e
            pfn = w >> PAGE_SHIFT
            piece = pfn + ((hva & (size - 1)) >> PAGE_SHIFT)
            if self.page_of(piece) in self.poisoned:
                raise SigBus(f"hva={hva:#x}: hardware-poisoned page")
            if not write or w & _PTE_WRITE:
                return None
            if vma.kind == "anon" and pfn == self.zero_pfn:
                return self._cow_break(vma, hva)
            # wp_page_reuse: an exclusive or shared page just becomes writable (and dirty);
            # the pfn does not change, so no notifier fires.
            self._tables[size][hva >> (size.bit_length() - 1)] = w | _PTE_WRITE | _PTE_DIRTY
            return None
        self._fault_in(vma, hva, write)
        return None

    def wp_fault(self, hva: int):
        """The flow of a write fault's COW break at ``hva`` (do_wp_page on the shared zero page
        of a writable anonymous VMA: a new frame inside an invalidation), or None when a write
        GUP there would not break COW. KVM's fault runs it as part of its own flow, where its
        get_user_pages would (see fault_faultin), so the invalidation can wait for the MMU
        lock a paused flow holds.

        The zero page is only ever mapped by a PTE (no huge zero page), so the PTE word alone
        says whether there is one to break: read in place, as gup_fast reads it."""
        page = self._pte_pages.get(hva >> self._pmd_shift)
        if page is None:
            return None
        w = page[(hva >> self.page_shift) & self._pte_mask]
        if not w or w & _PTE_WRITE or w >> PAGE_SHIFT != self.zero_pfn:
            return None
        vma = self.find_vma(hva)
        if vma is None or vma.kind != "anon" or "w" not in vma.prot:
            return None
        return self._cow_break(vma, hva)

    def _cow_break(self, vma: Vma, hva: int):
        """do_wp_page on the shared zero page (wp_page_copy): a new frame, inside an
        invalidation, installed only if the PTE is still the one the fault found (pte_same
        under the PTE lock): another write may have broken the same COW, or a DONTNEED
        zapped the page, while this one waited in invalidate_range_start. Then nothing is
        installed and the caller's access faults again. The model takes the new frame at the
        PTE lock; Linux allocates it before the notifier and frees it on a lost race, and no
        one else sees the frame meanwhile."""
        page = hva & ~(self.page_size - 1)
        key = page >> self.page_shift
        orig = self.ptes.get(key)
        yield from self._invalidate_start(page, self.page_size)
        if self.ptes.get(key) == orig:
            self._set_pte(page, self._alloc_anon(self.nr_frames), True)
        yield from self._invalidate_end(page, self.page_size)

    def _fault_in(self, vma: Vma, hva: int, write: bool) -> None:
        writable = "w" in vma.prot
        kind = vma.kind
        page = hva & ~(self.page_size - 1)
        if kind == "anon":
            pmd = self.pmd_size
            block = hva & ~(pmd - 1)
            shift = self.page_shift
            if (vma.thp and block >= vma.start and block + pmd <= vma.end
                    and not self.ptes.keys_in(block >> shift, (block + pmd) >> shift)):
                self._set_pte(block, self._alloc_anon(pmd >> PAGE_SHIFT), writable, pmd)
            elif write:
                self._set_pte(page, self._alloc_anon(self.nr_frames), True)
            else:
                self._set_pte(page, self.zero_pfn, False)
        elif kind == "pfnmap":
            self._set_pte(page, vma.pfnmap_pfn(page), writable, special=True)
        elif kind == "gmem":
            # A MAP_SHARED mapping with no writenotify (no page_mkwrite, no writeback): its
            # page protection is writable, so even a read fault maps writable
            # (set_pte_range with the VMA's vm_page_prot).
            pfn = vma.backing.fault_user_mapping(vma.pgoff_of(page))
            self._set_pte(page, pfn, writable)
        else:
            size = vma.page_size
            base = hva & ~(size - 1)
            off = vma.pgoff_of(base)
            pfn = vma.backing.pages.get(off)
            if pfn is None:
                pfn = vma.backing.pages[off] = self._alloc(size >> PAGE_SHIFT)
            # A writenotify file mapping's small pages are mapped read-only on a read fault and
            # made writable on the first write (do_read_fault / wp_page_shared); hugetlb maps
            # with the VMA's prot.
            self._set_pte(base, pfn, writable and (write or kind != "shared"), size)

    # ------------------------------------------------------------------ GUP

    def gup_fast(self, hva: int, write: bool) -> tuple[int, bool] | None:
        """get_user_pages_fast_only: a walk of the page table alone (no VMA), which never
        faults and fails on special (VM_PFNMAP) PTEs, PROT_NONE entries (pte_protnone) and
        poisoned pages."""
        page = self._pte_pages.get(hva >> self._pmd_shift)
        w = 0 if page is None else page[(hva >> self.page_shift) & self._pte_mask]
        size = self.page_size
        if not w:
            e = self._entry_word(hva)
            if e is None:
                return None
            w, size = e
        if w & (_PTE_SPECIAL | _PTE_PROTNONE) or (write and not w & _PTE_WRITE):
            return None
        pfn = (w >> PAGE_SHIFT) + ((hva & (size - 1)) >> PAGE_SHIFT)
        if self.poisoned and self.page_of(pfn) in self.poisoned:
            return None
        return pfn, bool(w & _PTE_WRITE)

    def gup(self, hva: int, write: bool) -> int:
        """get_user_pages_unlocked with FOLL_HWPOISON: faults the page in. Raises
        ``OSError`` with EFAULT (no VMA, VM_IO|VM_PFNMAP, protection) or EHWPOISON. It takes
        the mmap lock for read in Linux; here its caller does (a KVM fault's faultin,
        which may have to wait for it)."""
        vma = self.find_vma(hva)
        if vma is None or vma.io_pfnmap:
            raise OSError(errno.EFAULT, f"hva={hva:#x}: GUP refuses this address")
        try:
            self.handle_mm_fault(hva, write, vma)
        except SigSegv as e:
            raise OSError(errno.EFAULT, str(e)) from None
        except SigBus as e:
            err = EHWPOISON if "poison" in str(e) else errno.EFAULT
            raise OSError(err, str(e)) from None
        return self.lookup_pte(hva)[0]

    def follow_pfnmap(self, hva: int) -> tuple[int, bool] | None:
        """follow_pfnmap_start: the PTE of a VM_IO|VM_PFNMAP page, if populated."""
        e = self.lookup_pte(hva)
        return None if e is None else (e[0], e[1])

    def fixup_user_fault(self, hva: int, write: bool) -> bool:
        """fixup_user_fault: runs the driver's fault handler. Returns ``unlocked``: the handler
        dropped the mmap lock (the model always says so when it had to populate the page, so
        KVM takes its -EAGAIN retry, as with a device driver that sleeps)."""
        try:
            self.handle_mm_fault(hva, write)
        except (SigSegv, SigBus) as e:
            raise OSError(errno.EFAULT, str(e)) from None
        return True

    # ------------------------------------------------------------------ public mm calls

    @steppable
    def munmap(self, hva: int, length: int) -> None:
        """munmap(2): the VMAs are split at the range's edges and detached
        (vms_gather_munmap_vmas, under the mmap lock for write; a THP across an edge is
        split with its own invalidation), then the lock is downgraded to read
        (vms_complete_munmap_vmas), so a GUP in the notifiers' window runs and finds no VMA
        (EFAULT); unmap_region fires the notifiers for the range and the PTEs go."""
        self._check_range("munmap", hva, length)
        end = hva + length
        if not self.vmas_in(hva, end):
            return
        yield from self.mmap_lock.take(WRITE, MMAP_LOCK_WAIT)
        lock, mode, gone = self.mmap_lock, WRITE, []
        try:
            gone = yield from self._split_vmas(hva, end)
            for vma in gone:
                self._forget(vma)
            self.detached += gone
            lock.downgrade()
            mode = READ
            yield from self._invalidate_start(hva, length)
            self._zap_ptes(hva, end, gone)
            self._forget_detached(gone)
            self._forget_hwpoison(hva, end)
            yield from self._invalidate_end(hva, length)
        finally:
            (lock.write_unlock if mode == WRITE else lock.read_unlock)()
            self._forget_detached(gone)

    def _forget_detached(self, gone: list[Vma]) -> None:
        if gone and self.detached:
            self.detached = [v for v in self.detached if v not in gone]

    def linear_pfnmap(self, hva: int) -> tuple[int, int] | None:
        """The VM_PFNMAP mapping at ``hva``, for the leaf check: None where there is none,
        else the pfn its driver maps there, populated or not (it maps device pfns linearly:
        remap_pfn_range, or a fault handler such as vfio-pci's), and the largest naturally
        aligned block around ``hva`` that the linear mapping covers with its device address
        aligned alike, as much as one leaf may map (arm64's get_vma_page_shift takes its
        PUD or PMD block from the VMA alone). The pieces mprotect or munmap cut from one
        mapping stay one linear range, and the VMAs a munmap detached are mapped until its
        notifiers have zapped their PTEs."""
        def at(addr):
            vma = self.find_vma(addr)
            if vma is None:
                vma = next((v for v in self.detached if v.start <= addr < v.end), None)
            return vma if vma is not None and vma.io_pfnmap else None

        vma = at(hva)
        if vma is None:
            return None
        pfn = vma.pfnmap_pfn(hva)
        lo, hi = vma.start, vma.end
        while (v := at(lo - 1)) is not None and v.pfnmap_pfn(lo - 1) + 1 == vma.pfnmap_pfn(lo):
            lo = v.start
        while (v := at(hi)) is not None and v.pfnmap_pfn(hi) == vma.pfnmap_pfn(hi):
            hi = v.end
        size, pa = self.page_size, pfn << PAGE_SHIFT | hva & (PAGE_SIZE - 1)
        while True:
            block = size << 1
            base = hva & ~(block - 1)
            if (hva ^ pa) & (block - 1) or base < lo or base + block > hi:
                return pfn, size
            size = block

    @steppable
    def mprotect(self, hva: int, length: int, prot: str) -> None:
        """mprotect(2) (do_mprotect_pkey): every VMA of the range whose protection changes
        takes the new one, then its page-table entries change (mprotect_fixup ->
        change_protection) inside an MMU-notifier invalidation (MMU_NOTIFY_PROTECTION_VMA),
        whether a permission goes or comes:

        - PROT_NONE (neither ``r`` nor ``w``) keeps every page, as protnone entries that no
          access and no GUP goes through; a later mprotect gives them back;
        - read-only clears the writable bit;
        - read-write makes an entry writable where a write fault would not have to do more
          (can_change_pte_writable): an exclusive anonymous page (any but the zero page: no
          fork here), a writenotify file page already dirty; a VMA with no writenotify
          (hugetlb, VM_PFNMAP, guest_memfd) gets writable entries from its new page
          protection. The others stay read-only until a write faults.

        The invalidation covers the VMA's range from the first 1 GiB with page tables
        (change_pud_range starts it at the first PUD that is not none; the model's PTE pages
        are never freed, so "has page tables" means "was ever mapped"), and none fires
        when there are none; hugetlb always notifies the whole range
        (hugetlb_change_protection). A THP across the range's edge was split with the VMA
        (``_split_vmas``).

        The mmap lock is held for write throughout (``mmap_lock_wait`` when a GUP or another
        host operation holds it), so a KVM fault's get_user_pages waits for the end.

        Simplified: the range is checked whole before any VMA changes (Linux changes those
        before a hole, then fails ENOMEM); VMAs are not merged back."""
        prot = _check_prot(prot)
        self._check_range("mprotect", hva, length)
        end = hva + length
        vmas = self.vmas_in(hva, end)
        covered = hva
        for vma in vmas:
            if vma.start > covered:
                break
            covered = vma.end
        if not vmas or covered < end:
            raise KvmError(errno.ENOMEM, f"mprotect: [{hva:#x}, {end:#x}) is not fully mapped")
        yield from self.mmap_lock.take(WRITE, MMAP_LOCK_WAIT)
        try:
            for vma in (yield from self._split_vmas(hva, end, prot)):
                if vma.prot != prot:
                    vma.prot = prot
                    yield from self._change_protection(vma)
        finally:
            self.mmap_lock.write_unlock()

    def _change_protection(self, vma: Vma):
        """change_protection of ``vma`` (wholly inside the mprotect range) to its ``prot``."""
        start, end = vma.start, vma.end
        if vma.kind in _HUGETLB:
            ranges = [(start, end - start)]
        else:
            ranges = []
            for chunk in range(start & ~(_P4D_SIZE - 1), end, _P4D_SIZE):
                lo, hi = max(start, chunk), min(end, chunk + _P4D_SIZE)
                first = self._first_pud_in_use(lo, hi)
                if first is not None:
                    ranges.append((first, hi - first))
        modify = self._pte_modify(vma)
        for nstart, nlen in ranges:
            yield from self._invalidate_start(nstart, nlen)
            lo, hi = max(start, nstart), min(end, nstart + nlen)
            for _size, hshift, table in self._huge:
                for key in _huge_keys(table, hshift, lo, hi):
                    w = table.get(key)
                    if w:
                        table[key] = modify(w)
            self.ptes.modify_range(lo >> self.page_shift, hi >> self.page_shift, modify)
            yield from self._invalidate_end(nstart, nlen)

    def _first_pud_in_use(self, start: int, end: int) -> int | None:
        """The first address of ``[start, end)`` whose 1 GiB has page tables (a PUD entry that
        is not none), or None."""
        shift = self.page_shift
        pmd_keys = self.ptes._pmds(start >> shift, ((end - 1) >> shift) + 1)
        gibs = [(k << self._pmd_shift) >> 30 for k in pmd_keys[:1]]
        for _size, hshift, table in self._huge:
            gibs += [(k << hshift) >> 30 for k in _huge_keys(table, hshift, start, end)
                     if k in table][:1]
        return max(start, min(gibs) << 30) if gibs else None

    def _pte_modify(self, vma: Vma):
        """The change to each present entry of ``vma`` for its new ``prot``: pte_modify, and
        pte_mkwrite where can_change_pte_writable allows (MM_CP_TRY_CHANGE_WRITABLE)."""
        prot = vma.prot
        if "r" not in prot and "w" not in prot:
            return lambda w: w & ~_PTE_WRITE | _PTE_PROTNONE
        if "w" not in prot:
            return lambda w: w & ~(_PTE_WRITE | _PTE_PROTNONE)
        if vma.kind == "anon":
            zero = self.zero_pfn
            return lambda w: w & ~_PTE_PROTNONE | (
                _PTE_WRITE if w >> PAGE_SHIFT != zero else 0)
        if vma.kind == "shared":
            return lambda w: w & ~_PTE_PROTNONE | (_PTE_WRITE if w & _PTE_DIRTY else 0)
        return lambda w: w & ~_PTE_PROTNONE | _PTE_WRITE

    @steppable
    def madvise_dontneed(self, hva: int, length: int) -> None:
        """madvise(MADV_DONTNEED): notifiers fire, PTEs go; anonymous pages are freed (the next
        touch sees zeros), shared ones stay in their backing.

        A hugetlb page is never split (madvise_dontneed_free_valid_vma): a range starting
        inside one is EINVAL, and one ending inside one stops at its start (the end is
        rounded down to the huge page size), so nothing may be left to do. The model checks
        the start before it zaps anything, where Linux would have zapped the VMAs before
        the failing one; so with a VM_PFNMAP mapping in the range (EINVAL too)."""
        self._check_range("madvise_dontneed", hva, length)
        end = hva + length
        vmas = self.vmas_in(hva, end)
        if not vmas:
            raise KvmError(errno.ENOMEM, f"madvise_dontneed: hva={hva:#x} is not mapped")
        pfnmap = next((v for v in vmas if v.kind == "pfnmap"), None)
        if pfnmap is not None:
            raise KvmError(errno.EINVAL, f"madvise_dontneed: hva={hva:#x}: the range holds a "
                                         f"VM_PFNMAP mapping at {pfnmap.start:#x}")
        first, last = vmas[0], vmas[-1]
        if first.kind in _HUGETLB and max(hva, first.start) % first.page_size:
            raise KvmError(errno.EINVAL, f"madvise_dontneed: hva={hva:#x} is inside a "
                                         f"{first.page_size:#x} hugetlb page")
        if last.kind in _HUGETLB and end < last.end:
            end = max(end & ~(last.page_size - 1), last.start)
        if end <= hva:
            return
        # madvise_lock: MADV_DONTNEED takes the mmap lock for read; madvise_walk_vmas then
        # zaps each VMA of the range as the tree holds it now, alone
        # (zap_page_range_single: an invalidation of its part), and skips a hole: the PTEs
        # of a VMA a munmap detached are the munmap's to zap (and free).
        yield from self.mmap_lock.take(READ, MMAP_LOCK_WAIT)
        try:
            for vma in self.vmas_in(hva, end):
                lo, hi = max(hva, vma.start), min(end, vma.end)
                yield from self._invalidate_start(lo, hi - lo)
                # The zap splits a THP across the part's edge (zap_pmd_range ->
                # __split_huge_pmd) inside this invalidation, with its own. A fault under
                # the same read lock may make one after this invalidation started, or while
                # a split waits: the zap looks at each edge when it gets there, so again
                # after every split, and zaps once none is left.
                while across := self._huge_across_edges(lo, hi):
                    yield from self._split_huge_pmd(*across[0])
                self._zap_ptes(lo, hi)
                yield from self._invalidate_end(lo, hi - lo)
        finally:
            self.mmap_lock.read_unlock()

    @steppable
    def migrate(self, hva: int) -> int:
        """Migrate the page (or transparent huge page) at ``hva`` to new frames, as NUMA
        balancing or compaction would: notifiers fire, contents move, and what maps the old
        frames when the page-table lock is taken maps the new ones. Returns the new frame
        of ``hva``'s 4 KiB. The folio is taken off the LRU first (folio_isolate_lru), so a
        second migration of it meanwhile fails with EBUSY, as move_pages reports it."""
        u64("hva", hva)
        vma = self.find_vma(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, f"migrate: hva={hva:#x} is not mapped")
        if vma.kind not in ("anon", "shared"):
            raise KvmError(errno.EINVAL, f"migrate: {vma.kind} pages do not migrate")
        e = self._entry_word(hva)
        if e is None or e[0] >> PAGE_SHIFT == self.zero_pfn:
            raise KvmError(errno.ENOENT, f"migrate: no page present at hva={hva:#x}")
        word, size = e
        old = word >> PAGE_SHIFT
        if old in self.isolated:
            raise KvmError(errno.EBUSY, f"migrate: the page at hva={hva:#x} is being migrated")
        base = hva & ~(size - 1)
        npages = size >> PAGE_SHIFT
        self.isolated.add(old)
        try:
            yield from self._invalidate_start(base, size)
            new = self._alloc(npages) if vma.kind == "shared" else self._alloc_anon(npages)
            self.copy_frames(old, new, npages)
            # Under the page-table lock, as try_to_migrate_one's page_vma_mapped_walk: the
            # folio moves where it is mapped now. A THP split in the window (an mprotect or
            # munmap of part of it) left PTEs on its frames: each gets its new frame with its
            # own bits (remove_migration_pte); a zap in the window left nothing to remap.
            remapped = False
            for at, unit, first in self._mapped_units(base, base + size):
                if old <= first < old + npages:
                    table, key = self._tables[unit], at >> (unit.bit_length() - 1)
                    table[key] = (new + first - old) << PAGE_SHIFT | \
                        table.get(key) & (PAGE_SIZE - 1)
                    remapped = True
            if self.freed is not None:
                self.freed.update(range(old, old + npages))
                if not remapped and vma.kind == "anon":
                    # No mapping holds the new anonymous folio: it goes with the
                    # migration's own reference.
                    self.freed.update(range(new, new + npages))
            if vma.kind == "shared":
                vma.backing.pages[vma.pgoff_of(base)] = new
            yield from self._invalidate_end(base, size)
        finally:
            self.isolated.discard(old)
        return new + ((hva - base) >> PAGE_SHIFT)

    def _thp_block(self, hva: int, name: str) -> tuple[int, int]:
        u64("hva", hva)
        pmd = self.pmd_size
        base = hva & ~(pmd - 1)
        vma = self.find_vma(hva)
        if (vma is None or vma.kind != "anon" or not vma.thp or base < vma.start
                or base + pmd > vma.end):
            raise KvmError(errno.EINVAL, f"{name}: hva={hva:#x} is not in a THP-enabled, "
                                         f"{pmd:#x}-aligned anonymous range")
        return base, pmd

    @steppable
    def split_huge_page(self, hva: int) -> None:
        """split_huge_pmd: the THP at ``hva`` becomes PAGE_SIZE PTEs on the same frames; the
        notifiers fire for the PMD's range. As __split_huge_pmd does under the PMD lock, it
        looks at the PMD again once the notifiers have started: another split (a partial
        mprotect, munmap or DONTNEED in the window) leaves it nothing to do."""
        base, pmd = self._thp_block(hva, "split_huge_page")
        table, key = self._tables[pmd], base >> (pmd.bit_length() - 1)
        if not table.get(key):
            raise KvmError(errno.EINVAL, f"split_huge_page: no huge page at hva={hva:#x}")
        yield from self._split_huge_pmd(base, pmd)

    @steppable
    def collapse_huge_page(self, hva: int) -> int:
        """khugepaged's collapse_huge_page: the present PAGE_SIZE pages of a PMD-sized
        THP-enabled range become one new huge page (contents copied), under the mmap lock
        for write. As in Linux, the notifiers' range covers clearing the old PTEs
        (pmdp_collapse_flush) and ends before the copy and the new PMD: the mmap lock keeps
        every fault out until the PMD is set. The model collapses only a range whose every
        page is present (khugepaged_max_ptes_none = 0), checked under the lock and again
        once the PTEs are cleared (a page unmapped meanwhile, or one memory_failure has
        begun on and holds, makes __collapse_huge_page_isolate fail: the PTEs go back,
        EAGAIN). Returns the new pfn."""
        base, pmd = self._thp_block(hva, "collapse_huge_page")
        keys = range(base >> self.page_shift, (base + pmd) >> self.page_shift)
        yield from self.mmap_lock.take(WRITE, MMAP_LOCK_WAIT)
        try:
            if not all(k in self.ptes for k in keys):
                raise KvmError(errno.EAGAIN, "collapse_huge_page: not every page is present")
            yield from self._invalidate_start(base, pmd)
            old = [self.ptes.pop(key) for key in keys]
            yield from self._invalidate_end(base, pmd)
            # A page memory_failure holds (its reference fails is_refcount_suitable; copy_mc
            # would fail on it anyway) is not collapsed either.
            if not all(old) or any(self.page_of(w >> PAGE_SHIFT) in self.poisoned
                                   for w in old):
                for key, word in zip(keys, old, strict=True):
                    if word:
                        self.ptes[key] = word
                raise KvmError(errno.EAGAIN, "collapse_huge_page: a page went during the "
                                             "collapse, or is being poisoned")
            new = self._alloc_anon(pmd >> PAGE_SHIFT)
            for i, word in enumerate(old):
                pfn = word >> PAGE_SHIFT
                if pfn != self.zero_pfn:
                    self.copy_frames(pfn, new + i * self.nr_frames, self.nr_frames)
                    if self.freed is not None:      # the old pages go back to the allocator
                        self.freed.update(range(pfn, pfn + self.nr_frames))
            # mk_huge_pmd with the VMA's page protection: writable and dirty, or protnone.
            prot = self.find_vma(hva).prot
            self._tables[pmd][base >> (pmd.bit_length() - 1)] = _word(new, "w" in prot) | (
                _PTE_PROTNONE if "r" not in prot and "w" not in prot else 0)
        finally:
            self.mmap_lock.write_unlock()
        return new

    @steppable
    def poison(self, hva: int) -> None:
        """A memory error on the page at ``hva`` (memory_failure on its pfn), as
        madvise(MADV_HWPOISON) injects one: the page from get_user_pages_fast, whose slow path
        faults it in under the mmap lock for read (so it waits for a collapse or a munmap
        holding it for write), then memory_failure, which takes no mmap lock."""
        u64("hva", hva)
        if self.find_vma(hva) is None:
            raise KvmError(errno.EFAULT, f"poison: hva={hva:#x} is not mapped")
        e = self.lookup_pte(hva)
        if e is None:
            yield from self.mmap_lock.take(READ, MMAP_LOCK_WAIT)
            try:
                if self.find_vma(hva) is None:
                    raise KvmError(errno.EFAULT, f"poison: hva={hva:#x} is not mapped")
                cow = self._handle_mm_fault(hva, False)
                if cow is not None:
                    yield from cow
                e = self.lookup_pte(hva)
            finally:
                self.mmap_lock.read_unlock()
        yield from self.memory_failure.flow(e[0])

    @steppable
    def memory_failure(self, pfn: int) -> None:
        """memory_failure(pfn): the host page holding frame ``pfn`` is poisoned: it is
        unmapped from every user mapping (hwpoison_user_mappings; notifiers fire) and a
        later touch gets SIGBUS / -EHWPOISON; then a guest_memfd page goes to the file's
        error handler (truncate_error_folio -> kvm_gmem_error_folio: invalidate, no
        truncation).

        A THP holding the page is split first (try_to_split_thp_page: split_huge_page, whose
        PMD split invalidates the PMD's whole range), then only the poisoned page goes, in
        an invalidation of its own (hwpoison_user_mappings -> try_to_unmap).
        A hugetlb page is poisoned whole (try_memory_failure_hugetlb): try_to_unmap_one
        replaces its mapping by a hwpoison entry, with the huge page's range notified, and
        a later access anywhere in it is SIGBUS (VM_FAULT_HWPOISON_LARGE).

        The shared zero page is a reserved page: memory_failure ignores it (MF_IGNORED, no
        mapping unmapped or notified; the model has no machine check for a later read)."""
        first = self.page_of(u64("pfn", pfn))
        if first == self.zero_pfn:
            return
        self.poisoned.add(first)
        owner = self.gmem_frames.get(first)
        if owner is not None:
            owner[0].mark_poisoned(owner[1])
        last = first + self.nr_frames
        hvas = []
        for size, table in self._tables.items():
            shift = size.bit_length() - 1
            for key, w in table.items():
                pfn = w >> PAGE_SHIFT
                if pfn < last and first < pfn + (size >> PAGE_SHIFT):
                    hvas.append((key << shift) + ((first - pfn) << PAGE_SHIFT))
        for hva in hvas:
            vma = self.find_vma(hva)
            if vma is not None and vma.kind in _HUGETLB:
                base, size = hva & ~(vma.page_size - 1), vma.page_size
                yield from self._invalidate_start(base, size)
                self._zap_ptes(base, base + size)
                self.hwpoison_huge[base] = size
                yield from self._invalidate_end(base, size)
                continue
            for base, size in self._huge_across_edges(hva, hva + self.page_size):
                yield from self._split_huge_pmd(base, size)
            yield from self._invalidate_start(hva, self.page_size)
            self._zap_ptes(hva, hva + self.page_size)
            self.hwpoison_pages.add(hva >> self.page_shift)
            yield from self._invalidate_end(hva, self.page_size)
        if owner is not None:
            inode, index = owner
            yield from inode.error_folio(index)

    def read(self, hva: int, n: int) -> bytes:
        """A host (VMM) read of ``n`` bytes at ``hva``; faults pages in as needed, under the
        mmap lock for read (a plain call: WouldBlock while a paused operation holds it for
        write)."""
        self._check_io(hva, integer("n", n))
        out = bytearray()
        with self.mmap_lock(READ):
            for page_hva, off, chunk in _chunks(hva, n):
                self.handle_mm_fault(page_hva, False)
                out += self.read_frame(self.lookup_pte(page_hva)[0], off, chunk)
        return bytes(out)

    @steppable
    def write(self, hva: int, data: bytes) -> None:
        """A host (VMM) write at ``hva``; breaks COW as needed, its faults under the mmap lock
        for read."""
        data = buffer("data", data)
        self._check_io(hva, len(data))
        pos = 0
        yield from self.mmap_lock.take(READ, MMAP_LOCK_WAIT)
        try:
            for page_hva, off, chunk in _chunks(hva, len(data)):
                # A flow that ran in a COW break's notifier window (a DONTNEED, a migration)
                # may have taken the new page: the store faults again.
                while (cow := self._handle_mm_fault(page_hva, True)) is not None:
                    yield from cow
                self.write_frame(self.lookup_pte(page_hva)[0], off, data[pos:pos + chunk])
                pos += chunk
        finally:
            self.mmap_lock.read_unlock()

    def _check_io(self, hva: int, n: int) -> None:
        """A VMM access of ``n`` bytes at ``hva``: a negative length is EINVAL; an address
        outside the user address space has no VMA, so it is SIGSEGV like any unmapped one."""
        integer("hva", hva)
        if n < 0:
            raise KvmError(errno.EINVAL, f"n={n!r} is negative")
        if not 0 <= hva <= TASK_SIZE - n:
            raise SigSegv(f"hva={hva:#x}, n={n:#x}: outside the user address space")

    def _mapped_units(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``(hva, size, first frame)`` of every present host page-table entry touching
        ``[start, end)``, ascending: a PAGE_SIZE PTE, or a huge entry (a THP's PMD, a hugetlb
        page) whole, even when the range covers only part of it. Costs what is mapped, not
        the range's length."""
        shift = self.page_shift
        word = self.ptes.get
        units = [(key << shift, self.page_size, word(key) >> PAGE_SHIFT)
                 for key in self.ptes.keys_in(start >> shift, ((end - 1) >> shift) + 1)]
        for size, hshift, table in self._huge:
            units += [(key << hshift, size, w >> PAGE_SHIFT)
                      for key in _huge_keys(table, hshift, start, end)
                      if (w := table.get(key))]
        units.sort()
        return units

    def _still_mapped(self, hva: int, size: int, pfn: int) -> bool:
        """The entry ``_mapped_units`` found at ``hva`` is still there, same size and frame
        (page_vma_mapped_walk finds a folio only where it is still mapped)."""
        e = self._entry_word(hva)
        return e is not None and e[1] == size and e[0] >> PAGE_SHIFT == pfn

    @steppable
    def age(self, hva: int, length: int, flush: bool = True) -> bool:
        """Reclaim's referenced check on every VM of this host, one host mapping at a time:
        folio_referenced -> folio_referenced_one asks each mapping of a folio with
        ptep_clear_flush_young_notify (a PTE: one page) or pmdp_clear_flush_young_notify (a
        PMD-mapped THP: the PMD's whole range), so each mmu_notifier_clear_flush_young
        covers one host page or one huge page; ``flush=False`` asks with clear_young
        instead, as page_idle and DAMON do (ptep_ / pmdp_clear_young_notify). Every present
        entry touching ``[hva, hva+length)`` is asked about once, a huge one for its whole
        range; a page with no entry is not (reclaim reaches mappings through their folios'
        rmap). Entries are listed first and each is looked up again before its turn, so one
        unmapped or moved meanwhile is skipped, as by page_vma_mapped_walk. True if any
        secondary mapping was young.

        Simplified: the model has no LRU, so it asks about the zero page, VM_PFNMAP pages and
        hugetlb pages too (a hugetlb page as one entry), which Linux's reclaim never scans."""
        flag("flush", flush)
        self._check_range("age", hva, length)
        young = False
        for addr, size, pfn in self._mapped_units(hva, hva + length):
            if not self._still_mapped(addr, size, pfn):
                continue
            for n in list(self.notifiers):
                if flush:
                    young |= yield from _flow(n.clear_flush_young(addr, addr + size))
                else:
                    young |= yield from _flow(n.clear_young(addr, addr + size))
        return young

    @steppable
    def test_young(self, hva: int, length: int) -> bool:
        """mmu_notifier_test_young on every VM of this host, once per present entry touching
        ``[hva, hva+length)``, at the entry's first page: the notifier takes one address
        (include/linux/mmu_notifier.h; KVM looks at [address, address + 1), one page), and
        its callers ask once per mapping — khugepaged per PTE it scans
        (hpage_collapse_scan_pmd), DAMON per PTE or PMD mapping of a folio
        (damon_folio_young_one) — so a huge entry is asked about at its first page only.
        True if any answer was young; nothing is cleared."""
        self._check_range("test_young", hva, length)
        young = False
        for addr, size, pfn in self._mapped_units(hva, hva + length):
            if not self._still_mapped(addr, size, pfn):
                continue
            for n in list(self.notifiers):
                young |= yield from _flow(n.test_young(addr, addr + self.page_size))
        return young


def _huge_keys(table: dict, hshift: int, start: int, end: int):
    """The keys a huge-entry ``table`` (hva >> ``hshift`` -> entry) may hold for entries
    touching ``[start, end)``: the range's keys when they are few, else the table's own keys
    in it (a range far bigger than what is mapped costs what is mapped)."""
    lo, hi = start >> hshift, (end - 1) >> hshift
    if hi - lo < 4096:
        return range(lo, hi + 1)
    return sorted(k for k in table if lo <= k <= hi)


def _flow(result):
    """A notifier callback's result: KVM's callbacks are flows (generators) that run inside
    the host's operation; a plain callback (a recorder in a test) has simply returned."""
    if type(result) is GeneratorType:
        return (yield from result)
    return result


def _chunks(hva: int, n: int) -> Iterator[tuple[int, int, int]]:
    while n > 0:
        page = hva & ~(PAGE_SIZE - 1)
        off = hva - page
        chunk = min(n, PAGE_SIZE - off)
        yield page, off, chunk
        hva += chunk
        n -= chunk
