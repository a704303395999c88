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
  hva range, bracketed by invalidate_range_start / end.

Simplifications, stated: no swap, no fork (so no shared COW pages other than the zero page),
no NUMA; THP uses no huge zero page (a read of an untouched THP range allocates the huge page);
private hugetlb mappings behave like shared ones; mmap lays mappings out upwards from 4 GiB,
aligning those of 2 MiB or more to 2 MiB (1 GiB for hugetlb_1g).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import structlog
from sortedcontainers import SortedKeyList

from .errors import EHWPOISON, KvmError
from .uapi import PAGE_SHIFT, PAGE_SIZE, SZ_1G, SZ_2M

logger = structlog.get_logger(__name__)

KINDS = ("anon", "shared", "hugetlb_2m", "hugetlb_1g", "pfnmap", "gmem")
MMAP_BASE = 1 << 32
TASK_SIZE = (1 << 47) - PAGE_SIZE


class SigSegv(Exception):
    """A host access to an address with no VMA, or against the VMA's protection."""


class SigBus(Exception):
    """A host access to a page that cannot be faulted in (private guest_memfd page, past the
    end of a file, poisoned)."""


@attrs.define(eq=False)
class Backing:
    """Pages of a MAP_SHARED object (shmem, hugetlbfs file) by page offset. Huge backings
    store one entry per huge page, keyed by its first offset."""

    page_size: int = PAGE_SIZE
    pages: dict = attrs.Factory(dict)


@attrs.define(eq=False)
class Vma:
    start: int
    end: int
    prot: str
    kind: str
    thp: bool = False
    pfn: int = 0              # pfnmap: device pfn of ``start``
    backing: object = None    # Backing, or a guest_memfd inode
    pgoff: int = 0            # page offset of ``start`` in the backing

    @property
    def io_pfnmap(self) -> bool:
        return self.kind == "pfnmap"

    @property
    def shared(self) -> bool:
        return self.kind != "anon"

    @property
    def page_size(self) -> int:
        return {"hugetlb_2m": SZ_2M, "hugetlb_1g": SZ_1G}.get(self.kind, PAGE_SIZE)

    def pgoff_of(self, hva: int) -> int:
        return self.pgoff + ((hva - self.start) >> PAGE_SHIFT)


def _check_prot(prot: str) -> str:
    if not isinstance(prot, str) or set(prot) - set("rwx"):
        raise KvmError(errno.EINVAL, f"prot={prot!r}: use a combination of 'r', 'w', 'x'")
    return "".join(c for c in "rwx" if c in prot)


class HostMemory:
    """A host mm with its physical memory. Public calls are those of API.md."""

    def __init__(self):
        self._next_pfn = 0x1000
        self.frames: dict[int, bytearray] = {}
        self.poisoned: set[int] = set()
        self.zero_pfn = self._alloc(1)
        self.vmas = SortedKeyList(key=lambda v: v.start)
        self._last_vma: Vma | None = None  # mmap's vmacache: faults come in runs
        # Host page table: 4K, 2M and 1G entries, each (pfn, writable).
        self.ptes: dict[int, tuple[int, bool]] = {}
        self.pmds: dict[int, tuple[int, bool]] = {}
        self.puds: dict[int, tuple[int, bool]] = {}
        self.hwpoison_vpns: set[int] = set()
        self._next_hva = MMAP_BASE
        self.notifiers: list = []
        self.gmem_frames: dict[int, tuple[object, int]] = {}

    # ------------------------------------------------------------------ frames

    def _alloc(self, npages: int) -> int:
        pfn = (self._next_pfn + npages - 1) & ~(npages - 1)
        self._next_pfn = pfn + npages
        return pfn

    def alloc_frames(self, npages: int) -> int:
        """Allocate ``npages`` contiguous frames aligned to ``npages`` (a power of two)."""
        return self._alloc(npages)

    def frame(self, pfn: int) -> bytearray:
        page = self.frames.get(pfn)
        if page is None:
            page = self.frames[pfn] = bytearray(PAGE_SIZE)
        return page

    def read_frame(self, pfn: int, offset: int, n: int) -> bytes:
        page = self.frames.get(pfn)
        return bytes(n) if page is None else bytes(page[offset:offset + n])

    def write_frame(self, pfn: int, offset: int, data: bytes) -> None:
        if pfn == self.zero_pfn:
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
        Public so that a test can hold an invalidation open while other flows run."""
        start, end = hva, hva + length
        for n in list(self.notifiers):
            n.invalidate_range_start(start, end)
        try:
            yield
        finally:
            for n in list(self.notifiers):
                n.invalidate_range_end(start, end)

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
        ``pfn=`` is the device pfn of the first page). ``addr`` asks for a fixed address
        (MAP_FIXED_NOREPLACE: EEXIST if taken). Returns the hva."""
        prot = _check_prot(prot)
        if kind not in KINDS or (kind == "gmem" and backing is None):
            raise KvmError(errno.EINVAL, f"kind={kind!r}: one of {', '.join(KINDS[:-1])}")
        page = {"hugetlb_2m": SZ_2M, "hugetlb_1g": SZ_1G}.get(kind, PAGE_SIZE)
        if not isinstance(length, int) or length <= 0 or length % page:
            raise KvmError(errno.EINVAL, f"length={length!r}: not a positive multiple of "
                                         f"{page:#x}")
        if kind == "pfnmap":
            if not isinstance(pfn, int) or pfn < 0:
                raise KvmError(errno.EINVAL, "pfn: a pfnmap mapping needs the device pfn")
        elif pfn is not None:
            raise KvmError(errno.EINVAL, f"pfn: only for kind='pfnmap', not {kind!r}")
        if thp and kind != "anon":
            raise KvmError(errno.EINVAL, "thp: transparent huge pages are for kind='anon'")
        if addr is None:
            align = SZ_1G if kind == "hugetlb_1g" else SZ_2M if length >= SZ_2M else PAGE_SIZE
            addr = (self._next_hva + align - 1) & ~(align - 1)
            self._next_hva = addr + length + PAGE_SIZE  # a guard gap between mappings
        else:
            if not isinstance(addr, int) or addr % page or addr <= 0:
                raise KvmError(errno.EINVAL, f"addr={addr!r}: not aligned to {page:#x}")
            if self.vmas_in(addr, addr + length):
                raise KvmError(errno.EEXIST, f"addr={addr:#x}: the range is already mapped")
        if addr + length > TASK_SIZE:
            raise KvmError(errno.ENOMEM, f"length={length:#x}: no room below TASK_SIZE")
        if backing is None and kind in ("shared", "hugetlb_2m", "hugetlb_1g"):
            backing = Backing(page)
        self.vmas.add(Vma(addr, addr + length, prot, kind, thp, pfn or 0, backing, pgoff))
        return addr

    def _check_range(self, name: str, hva: int, length: int) -> None:
        if not isinstance(hva, int) or hva % PAGE_SIZE:
            raise KvmError(errno.EINVAL, f"{name}: hva={hva!r} is not page-aligned")
        if not isinstance(length, int) or length <= 0 or length % PAGE_SIZE:
            raise KvmError(errno.EINVAL, f"{name}: length={length!r} is not a positive "
                                         "multiple of the page size")

    def _split_vmas(self, start: int, end: int) -> list[Vma]:
        """Split VMAs at ``start`` and ``end``; return those inside."""
        for vma in self.vmas_in(start, end):
            for cut in (start, end):
                if vma.start < cut < vma.end:
                    if vma.page_size > PAGE_SIZE and cut % vma.page_size:
                        raise KvmError(errno.EINVAL, f"hva={cut:#x}: not aligned to the "
                                                     "hugetlb page size")
                    self._forget(vma)
                    right = attrs.evolve(vma, start=cut, pfn=vma.pfn + (
                        (cut - vma.start) >> PAGE_SHIFT if vma.kind == "pfnmap" else 0),
                        pgoff=vma.pgoff_of(cut))
                    vma.end = cut
                    self.vmas.add(vma)
                    self.vmas.add(right)
                    if cut == start:
                        vma = right
        return self.vmas_in(start, end)

    # ------------------------------------------------------------------ host page table

    def lookup_pte(self, hva: int) -> tuple[int, bool, int] | None:
        """The host PTE mapping ``hva``: ``(pfn of that 4K page, writable, mapping size)``."""
        vpn = hva >> PAGE_SHIFT
        e = self.ptes.get(vpn)
        if e is not None:
            return e[0], e[1], PAGE_SIZE
        e = self.pmds.get(vpn >> 9)
        if e is not None:
            return e[0] + (vpn & 511), e[1], SZ_2M
        e = self.puds.get(vpn >> 18)
        if e is not None:
            return e[0] + (vpn & 0x3FFFF), e[1], SZ_1G
        return None

    def host_mapping_size(self, hva: int) -> int:
        """host_pfn_mapping_level / get_user_mapping_size: the size of the host mapping."""
        e = self.lookup_pte(hva)
        return e[2] if e else PAGE_SIZE

    def _zap_ptes(self, start: int, end: int) -> None:
        """Drop host PTEs in ``[start, end)``; a huge entry partly inside is split first."""
        for vpn in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT) if end - start <= (
                64 * SZ_2M) else ():
            self.ptes.pop(vpn, None)
        if end - start > 64 * SZ_2M:
            lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
            for vpn in [v for v in self.ptes if lo <= v < hi]:
                del self.ptes[vpn]
        for table, shift in ((self.pmds, 9), (self.puds, 18)):
            lo, hi = start >> (PAGE_SHIFT + shift), (end - 1) >> (PAGE_SHIFT + shift)
            keys = range(lo, hi + 1) if hi - lo < 4096 else [k for k in table if lo <= k <= hi]
            for key in keys:
                e = table.get(key)
                if e is None:
                    continue
                del table[key]
                base_vpn = key << shift
                for i in range(1 << shift):
                    hva = (base_vpn + i) << PAGE_SHIFT
                    if not start <= hva < end:
                        self.ptes[base_vpn + i] = (e[0] + i, e[1])

    def _set_pte(self, hva: int, pfn: int, writable: bool, size: int = PAGE_SIZE) -> None:
        vpn = hva >> PAGE_SHIFT
        if size == PAGE_SIZE:
            self.ptes[vpn] = (pfn, writable)
        elif size == SZ_2M:
            self.pmds[vpn >> 9] = (pfn, writable)
        else:
            self.puds[vpn >> 18] = (pfn, writable)

    # ------------------------------------------------------------------ faults

    def handle_mm_fault(self, hva: int, write: bool) -> None:
        """Make ``hva`` present (and writable for a write), as a user fault would.
        Raises SigSegv (no VMA, protection) or SigBus (hwpoison, gmem rules)."""
        vma = self.find_vma(hva)
        if vma is None:
            raise SigSegv(f"hva={hva:#x}: no mapping")
        if (write and "w" not in vma.prot) or (not write and "r" not in vma.prot):
            raise SigSegv(f"hva={hva:#x}: {'write' if write else 'read'} not allowed by "
                          f"prot {vma.prot!r}")
        if hva >> PAGE_SHIFT in self.hwpoison_vpns:
            raise SigBus(f"hva={hva:#x}: hardware-poisoned page")
        e = self.lookup_pte(hva)
        if e is not None:
            pfn, writable, size = e
            if pfn in self.poisoned:
                raise SigBus(f"hva={hva:#x}: hardware-poisoned page")
            if not write or writable:
                return
            if vma.kind == "anon" and pfn == self.zero_pfn:
                self._cow_break(vma, hva)
            else:
                # wp_page_reuse: an exclusive or shared page just becomes writable; the pfn
                # does not change, so no notifier fires.
                base = hva & ~(size - 1)
                self._set_pte(base, pfn - ((hva - base) >> PAGE_SHIFT), True, size)
            return
        self._fault_in(vma, hva, write)

    def _cow_break(self, vma: Vma, hva: int) -> None:
        page = hva & ~(PAGE_SIZE - 1)
        with self.invalidating(page, PAGE_SIZE):
            pfn = self._alloc(1)
            self.ptes[page >> PAGE_SHIFT] = (pfn, True)

    def _fault_in(self, vma: Vma, hva: int, write: bool) -> None:
        writable = "w" in vma.prot
        kind = vma.kind
        if kind == "anon":
            block = hva & ~(SZ_2M - 1)
            if (vma.thp and block >= vma.start and block + SZ_2M <= vma.end
                    and not any((block >> PAGE_SHIFT) + i in self.ptes for i in range(512))):
                self._set_pte(block, self._alloc(512), writable, SZ_2M)
            elif write:
                self._set_pte(hva & ~(PAGE_SIZE - 1), self._alloc(1), True)
            else:
                self._set_pte(hva & ~(PAGE_SIZE - 1), self.zero_pfn, False)
        elif kind == "pfnmap":
            page = hva & ~(PAGE_SIZE - 1)
            self._set_pte(page, vma.pfn + ((page - vma.start) >> PAGE_SHIFT), writable)
        elif kind == "gmem":
            inode = vma.backing
            pfn = inode.fault_user_mapping(vma.pgoff_of(hva))
            self._set_pte(hva & ~(PAGE_SIZE - 1), pfn, writable and write)
        else:
            size = vma.page_size
            base = hva & ~(size - 1)
            off = vma.pgoff_of(base)
            pfn = vma.backing.pages.get(off)
            if pfn is None:
                pfn = vma.backing.pages[off] = self._alloc(size >> PAGE_SHIFT)
            # Shared 4K pages are mapped read-only on a read fault and made writable on the
            # first write (do_read_fault / wp_page_shared); hugetlb maps with the VMA's prot.
            self._set_pte(base, pfn, writable and (write or size > PAGE_SIZE), size)

    # ------------------------------------------------------------------ GUP

    def gup_fast(self, hva: int, write: bool) -> tuple[int, bool] | None:
        """get_user_pages_fast_only: never faults; fails on special (VM_PFNMAP) PTEs."""
        vma = self.find_vma(hva)
        if vma is None or vma.io_pfnmap:
            return None
        e = self.lookup_pte(hva)
        if e is None or (write and not e[1]) or e[0] in self.poisoned:
            return None
        return e[0], e[1]

    def gup(self, hva: int, write: bool) -> int:
        """get_user_pages_unlocked with FOLL_HWPOISON: faults the page in. Raises
        ``OSError`` with EFAULT (no VMA, VM_IO|VM_PFNMAP, protection) or EHWPOISON."""
        vma = self.find_vma(hva)
        if vma is None or vma.io_pfnmap:
            raise OSError(errno.EFAULT, f"hva={hva:#x}: GUP refuses this address")
        try:
            self.handle_mm_fault(hva, write)
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

    def munmap(self, hva: int, length: int) -> None:
        """munmap(2): notifiers fire for the whole range, PTEs and VMAs go."""
        self._check_range("munmap", hva, length)
        end = hva + length
        if not self.vmas_in(hva, end):
            return
        self._split_vmas(hva, end)
        with self.invalidating(hva, length):
            self._zap_ptes(hva, end)
            for vma in self.vmas_in(hva, end):
                self._forget(vma)

    def mprotect(self, hva: int, length: int, prot: str) -> None:
        """mprotect(2): removing a permission fires the notifiers (change_protection) and
        downgrades the PTEs; adding one changes only the VMA (the next fault upgrades)."""
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
        vmas = self._split_vmas(hva, end)
        removes = any(set(v.prot) - set(prot) for v in vmas)
        if removes:
            with self.invalidating(hva, length):
                for vma in vmas:
                    vma.prot = prot
                self._downgrade(hva, end, prot)
        else:
            for vma in vmas:
                vma.prot = prot

    def _downgrade(self, start: int, end: int, prot: str) -> None:
        if "r" not in prot and "w" not in prot:
            self._zap_ptes(start, end)
            return
        if "w" in prot:
            return
        for table, shift in ((self.ptes, 0), (self.pmds, 9), (self.puds, 18)):
            lo, hi = start >> (PAGE_SHIFT + shift), (end - 1) >> (PAGE_SHIFT + shift)
            for key in [k for k in table if lo <= k <= hi]:
                pfn, _w = table[key]
                table[key] = (pfn, False)

    def madvise_dontneed(self, hva: int, length: int) -> None:
        """madvise(MADV_DONTNEED): notifiers fire, PTEs go; anonymous pages are freed (the next
        touch sees zeros), shared ones stay in their backing."""
        self._check_range("madvise_dontneed", hva, length)
        if not self.vmas_in(hva, hva + length):
            raise KvmError(errno.ENOMEM, f"madvise_dontneed: hva={hva:#x} is not mapped")
        with self.invalidating(hva, length):
            self._zap_ptes(hva, hva + length)

    def migrate(self, hva: int) -> int:
        """Migrate the page (or transparent huge page) at ``hva`` to new frames, as NUMA
        balancing or compaction would: notifiers fire, contents move. Returns the new pfn."""
        vma = self.find_vma(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, f"migrate: hva={hva:#x} is not mapped")
        if vma.kind not in ("anon", "shared"):
            raise KvmError(errno.EINVAL, f"migrate: {vma.kind} pages do not migrate")
        e = self.lookup_pte(hva)
        if e is None or e[0] == self.zero_pfn:
            raise KvmError(errno.ENOENT, f"migrate: no page present at hva={hva:#x}")
        pfn, writable, size = e
        base = hva & ~(size - 1)
        old = pfn - ((hva - base) >> PAGE_SHIFT)
        npages = size >> PAGE_SHIFT
        with self.invalidating(base, size):
            new = self._alloc(npages)
            self.copy_frames(old, new, npages)
            self._set_pte(base, new, writable, size)
            if vma.kind == "shared":
                vma.backing.pages[vma.pgoff_of(base)] = new
        return new + ((hva - base) >> PAGE_SHIFT)

    def split_huge_page(self, hva: int) -> None:
        """split_huge_pmd: the THP at ``hva`` becomes 512 4K PTEs on the same frames; the
        notifiers fire for the 2 MiB range."""
        base = hva & ~(SZ_2M - 1)
        e = self.pmds.get(base >> (PAGE_SHIFT + 9))
        if e is None:
            raise KvmError(errno.EINVAL, f"split_huge_page: no huge page at hva={hva:#x}")
        vma = self.find_vma(hva)
        if vma is None or vma.kind != "anon":
            raise KvmError(errno.EINVAL, "split_huge_page: only transparent huge pages split")
        with self.invalidating(base, SZ_2M):
            del self.pmds[base >> (PAGE_SHIFT + 9)]
            for i in range(512):
                self.ptes[(base >> PAGE_SHIFT) + i] = (e[0] + i, e[1])

    def collapse_huge_page(self, hva: int) -> int:
        """khugepaged's collapse_huge_page: 512 present 4K pages of a THP-enabled range become
        one new 2 MiB page (contents copied); the notifiers fire. Returns the new pfn."""
        base = hva & ~(SZ_2M - 1)
        vma = self.find_vma(hva)
        if (vma is None or vma.kind != "anon" or not vma.thp or base < vma.start
                or base + SZ_2M > vma.end):
            raise KvmError(errno.EINVAL, f"collapse_huge_page: hva={hva:#x} is not in a "
                                         "THP-enabled 2 MiB-aligned anonymous range")
        vpn = base >> PAGE_SHIFT
        if not all(vpn + i in self.ptes for i in range(512)):
            raise KvmError(errno.EAGAIN, "collapse_huge_page: not all 512 pages are present")
        with self.invalidating(base, SZ_2M):
            new = self._alloc(512)
            for i in range(512):
                pfn, _w = self.ptes.pop(vpn + i)
                if pfn != self.zero_pfn:
                    self.copy_frames(pfn, new + i, 1)
            self.pmds[vpn >> 9] = (new, "w" in vma.prot)
        return new

    def poison(self, hva: int) -> None:
        """A memory error on the page at ``hva`` (memory_failure on its pfn)."""
        e = self.lookup_pte(hva)
        vma = self.find_vma(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, f"poison: hva={hva:#x} is not mapped")
        if e is None:
            self.handle_mm_fault(hva, False)
            e = self.lookup_pte(hva)
        self.memory_failure(e[0])

    def memory_failure(self, pfn: int) -> None:
        """memory_failure(pfn): guest_memfd pages go to the file's error handler
        (kvm_gmem_error_folio: invalidate, no truncation); other pages are unmapped from
        every mapping (notifiers fire) and a later touch gets SIGBUS / -EHWPOISON."""
        self.poisoned.add(pfn)
        owner = self.gmem_frames.get(pfn)
        if owner is not None:
            inode, index = owner
            inode.error_folio(index)
            return
        hvas = [vpn << PAGE_SHIFT for vpn, e in self.ptes.items() if e[0] == pfn]
        for table, shift in ((self.pmds, 9), (self.puds, 18)):
            for key, e in table.items():
                if e[0] <= pfn < e[0] + (1 << shift):
                    hvas.append((key << (PAGE_SHIFT + shift)) + ((pfn - e[0]) << PAGE_SHIFT))
        for hva in hvas:
            with self.invalidating(hva, PAGE_SIZE):
                self._zap_ptes(hva, hva + PAGE_SIZE)
                self.hwpoison_vpns.add(hva >> PAGE_SHIFT)

    def read(self, hva: int, n: int) -> bytes:
        """A host (VMM) read of ``n`` bytes at ``hva``; faults pages in as needed."""
        out = bytearray()
        for page_hva, off, chunk in _chunks(hva, n):
            self.handle_mm_fault(page_hva, False)
            out += self.read_frame(self.lookup_pte(page_hva)[0], off, chunk)
        return bytes(out)

    def write(self, hva: int, data: bytes) -> None:
        """A host (VMM) write at ``hva``; breaks COW as needed."""
        data = bytes(data)
        pos = 0
        for page_hva, off, chunk in _chunks(hva, len(data)):
            self.handle_mm_fault(page_hva, True)
            self.write_frame(self.lookup_pte(page_hva)[0], off, data[pos:pos + chunk])
            pos += chunk

    def age(self, hva: int, length: int, flush: bool = True) -> bool:
        """Reclaim's referenced check (folio_referenced -> clear_flush_young, or clear_young
        with ``flush=False``, as MGLRU does) on every VM of this host. True if any secondary
        mapping was young."""
        self._check_range("age", hva, length)
        young = False
        for n in list(self.notifiers):
            if flush:
                young |= n.clear_flush_young(hva, hva + length)
            else:
                young |= n.clear_young(hva, hva + length)
        return young


def _chunks(hva: int, n: int) -> Iterator[tuple[int, int, int]]:
    while n > 0:
        page = hva & ~(PAGE_SIZE - 1)
        off = hva - page
        chunk = min(n, PAGE_SIZE - off)
        yield page, off, chunk
        hva += chunk
        n -= chunk
