"""guest_memfd (virt/kvm/guest_memfd.c; reference §3).

``GmemInode`` is the memory (i_size, flags, folios); ``GuestMemfd`` is one VM's file on it
with its bindings to memslots. ``folio_order`` (> 0) models huge-folio-backed guest_memfd,
which is in flight upstream: upstream's kvm_gmem_get_pfn always reports order 0.

Page indices are in 4 KiB frames, like the API's gfns; on a host with a larger PAGE_SIZE a
folio of order 0 is one host page, so ``GmemInode.order`` (in frames) is
``folio_order + log2(PAGE_SIZE / 4096)`` and every size and offset is PAGE_SIZE-aligned.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import structlog
from sortedcontainers import SortedKeyList

from .args import integer, u64
from .errors import EHWPOISON, KvmError
from .host import SigBus
from .locks import RwLock, Steps, steppable, wait_until
from .records import GfnRange
from .hva import kvm_handle_ranges
from .mmu_notifier import kvm_mmu_unmap_gfn_range
from .uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_FILTER_PRIVATE,
    KVM_FILTER_SHARED,
    KVM_MEMSLOT_GMEM_ONLY,
    PAGE_SHIFT,
)

if TYPE_CHECKING:
    from .memslots import Memslot
    from .kvm import Kvm

logger = structlog.get_logger(__name__)

MAX_FOLIO_ORDER = 18  # 1 GiB of 4 KiB frames

#: Race points of the guest_memfd flows: waiting for the inode's invalidate lock (punch hole,
#: allocation, memory error, release), release waiting for kvm->slots_lock, and a memslot
#: update's bind and unbind waiting for the invalidate lock.
GMEM_INVAL_LOCK_WAIT = "gmem_inval_lock_wait"
GMEM_SLOTS_LOCK_WAIT = "gmem_slots_lock_wait"
GMEM_BIND_LOCK_WAIT = "gmem_bind_lock_wait"
GMEM_UNBIND_LOCK_WAIT = "gmem_unbind_lock_wait"
GMEM_LAST_FPUT_WAIT = "gmem_last_fput_wait"


class GmemInode:
    """The guest_memfd inode: its size, flags, folios (index of the first page -> pfn) and
    the files (one per VM) that view it. Memory outlives the files."""

    def __init__(self, host, size: int, flags: int, folio_order: int):
        self.host = host
        self.size = size
        self.flags = flags
        self.folio_order = folio_order
        #: log2 of the 4 KiB frames per folio.
        self.order = folio_order + host.page_shift - PAGE_SHIFT
        self.folios: dict[int, int] = {}
        self.poisoned: set[int] = set()
        #: Poisoned pages whose error handler has not invalidated them yet (memory_failure
        #: sets the flag first): a leaf mapped before may stay until the invalidation begins.
        self.poison_pending: set[int] = set()
        self.files: list[GuestMemfd] = []
        #: filemap_invalidate_lock of the inode's mapping, an rw_semaphore: punch hole, release,
        #: bind and unbind take it for write, allocation and a memory error for read
        #: (kvm_gmem_get_pfn does not take it).
        self.invalidate_lock = RwLock("gmem_invalidate_lock")

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def invalidate_filter(self) -> int:
        """kvm_gmem_get_invalidate_filter."""
        return KVM_FILTER_SHARED if self.flags & GUEST_MEMFD_FLAG_INIT_SHARED else \
            KVM_FILTER_PRIVATE

    def folio_of(self, index: int) -> tuple[int, int] | None:
        base = index & ~((1 << self.order) - 1)
        pfn = self.folios.get(base)
        return None if pfn is None else (base, pfn)

    def folio_pages(self, index: int) -> range:
        """The page indices of the folio that holds (or would hold) page ``index``."""
        base = index & ~((1 << self.order) - 1)
        return range(base, base + (1 << self.order))

    def frame_of(self, index: int) -> int | None:
        """The 4 KiB frame holding page ``index``, if its folio is allocated (a checker's
        look: nothing is allocated)."""
        found = self.folio_of(index)
        return None if found is None else found[1] + index - found[0]

    def get_folio(self, index: int) -> tuple[int, int]:
        """kvm_gmem_get_folio: the folio containing ``index`` (allocated zeroed on first use)."""
        found = self.folio_of(index)
        if found is not None:
            return found
        pages = self.folio_pages(index)
        pfn = self.host.alloc_frames(len(pages))
        self.folios[pages.start] = pfn
        for i, page in enumerate(pages):
            self.host.gmem_frames[pfn + i] = (self, page)
        return pages.start, pfn

    def fault_user_mapping(self, index: int) -> int:
        """kvm_gmem_fault_user_mapping: a host touch of an mmap()ed guest_memfd page."""
        if index >= self.npages:
            raise SigBus(f"guest_memfd: page {index} is beyond i_size")
        if not self.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            raise SigBus(f"guest_memfd: page {index} is private (no INIT_SHARED)")
        if self.folio_order:
            raise SigBus("guest_memfd: large folios cannot be mapped to userspace")
        if index in self.poisoned:
            raise SigBus(f"guest_memfd: page {index} is hardware-poisoned")
        base, pfn = self.get_folio(index)
        return pfn + index - base

    def invalidate_begin(self, start: int, end: int):
        """kvm_gmem_invalidate_begin: every file (VM) viewing the inode."""
        for f in list(self.files):
            yield from f.invalidate_begin(start, end, self.invalidate_filter())

    def invalidate_end(self, start: int, end: int):
        for f in list(self.files):
            yield from f.invalidate_end(start, end)

    def punch_hole(self, start: int, end: int):
        """kvm_gmem_punch_hole, a flow: under the inode's invalidate lock, invalidate (zap),
        truncate, end. Folios entirely inside go; the covered pages of a folio that straddles
        an edge are zeroed (truncate_inode_pages_range zeroes what it cannot drop). Race
        points: ``gmem_inval_lock_wait``, the begin's and end's mmu_lock waits, and
        ``gmem_begin_done`` (zapped, not yet truncated: a fault gets the old folio, then
        retries at the mmu_lock)."""
        yield from self.invalidate_lock.write_lock(GMEM_INVAL_LOCK_WAIT)
        try:
            yield from self.invalidate_begin(start, end)
            yield "gmem_begin_done"
            self._truncate(start, end)
            yield from self._zap_host_ptes(start, end)
            yield from self.invalidate_end(start, end)
        finally:
            self.invalidate_lock.write_unlock()

    def _truncate(self, start: int, end: int) -> None:
        """truncate_inode_pages_range."""
        size = 1 << self.order
        for base in [b for b in self.folios if b + size > start and b < end]:
            pfn = self.folios[base]
            if start <= base and base + size <= end:
                del self.folios[base]
                if self.host.freed is not None:
                    self.host.freed.update(range(pfn, pfn + size))
                for i in range(size):
                    self.host.gmem_frames.pop(pfn + i, None)
                    self.host.frames.pop(pfn + i, None)
                    self.poisoned.discard(base + i)
                    self.poison_pending.discard(base + i)
            else:
                for i in range(max(start, base) - base, min(end, base + size) - base):
                    self.host.frames.pop(pfn + i, None)

    def _zap_host_ptes(self, start: int, end: int):
        """Truncation unmaps the pages from userspace mappings of the file too."""
        for vma in list(self.host.vmas):
            if vma.backing is self:
                lo = max(start, vma.pgoff)
                hi = min(end, vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT))
                if lo < hi:
                    hva = vma.start + ((lo - vma.pgoff) << PAGE_SHIFT)
                    length = (hi - lo) << PAGE_SHIFT
                    yield from self.host._invalidate_start(hva, length)
                    self.host._zap_ptes(hva, hva + length)
                    yield from self.host._invalidate_end(hva, length)

    def mark_poisoned(self, index: int) -> None:
        """The hwpoison flag of the folio holding page ``index``, which memory_failure sets
        before anything else: kvm_gmem_get_pfn fails with -EHWPOISON from then on, while a
        leaf mapped before may stay until the error handler's invalidation begins
        (``poison_pending``)."""
        pages = self.folio_pages(index)
        self.poisoned.update(pages)
        self.poison_pending.update(pages)

    def error_folio(self, index: int):
        """kvm_gmem_error_folio, a flow (memory_failure has marked the folio): under the
        invalidate lock taken shared (two memory errors, or one and an allocation, run
        together), invalidate the folio's range, do not truncate; later get_pfn gives
        -EHWPOISON."""
        pages = self.folio_pages(index)
        yield from self.invalidate_lock.read_lock(GMEM_INVAL_LOCK_WAIT)
        try:
            yield from self.invalidate_begin(pages.start, pages.stop)
            self.poison_pending.difference_update(pages)
            yield from self.invalidate_end(pages.start, pages.stop)
        finally:
            self.invalidate_lock.read_unlock()


class GuestMemfd:
    """A guest_memfd file (KVM_CREATE_GUEST_MEMFD): one VM's view of a GmemInode, with the
    memslots bound to its page ranges."""

    def __init__(self, vm: Kvm, inode: GmemInode):
        self.vm = vm
        self.inode = inode
        self.bindings = SortedKeyList(key=lambda b: b[0])  # (start, end, slot)
        self.closed = False
        #: close(2) took the fd away: a new syscall on it is EBADF.
        self.fd_closed = False
        #: Syscalls on the file in flight, each holding a reference (fdget): a fallocate.
        self.refs = 0
        #: The last reference was dropped and release (``close``) has begun.
        self.dying = False
        inode.files.append(self)

    @property
    def size(self) -> int:
        return self.inode.size

    @property
    def flags(self) -> int:
        return self.inode.flags

    def __repr__(self) -> str:
        return (f"GuestMemfd(size={self.size:#x}, flags={self.flags:#x}, "
                f"folio_order={self.inode.folio_order}{', closed' if self.closed else ''})")

    # ------------------------------------------------------------------ bindings

    def bindings_in(self, start: int, end: int) -> list:
        idx = max(self.bindings.bisect_key_right(start) - 1, 0)
        out = []
        while idx < len(self.bindings):
            b = self.bindings[idx]
            if b[0] >= end:
                break
            if b[1] > start:
                out.append(b)
            idx += 1
        return out

    def binding_at(self, index: int):
        found = self.bindings_in(index, index + 1)
        return found[0][2] if found else None

    def invalidate_begin(self, start: int, end: int, attr_filter: int):
        """__kvm_gmem_invalidate_begin, a flow: at the first bound slot, wait for kvm->mmu_lock
        (``gmem_begin_lock_wait``) and begin the invalidation; zap each binding's gfns of the
        filter's alias; flush before unlocking. No SRCU: bindings are stable under the
        inode's invalidate lock."""
        vm = self.vm
        ranges = (GfnRange(slot, slot.base_gfn + max(b_start, start) - slot.gmem_pgoff,
                           slot.base_gfn + min(b_end, end) - slot.gmem_pgoff, 0, attr_filter,
                           True, False)
                  for b_start, b_end, slot in self.bindings_in(start, end))
        yield from kvm_handle_ranges(vm, ranges, kvm_mmu_unmap_gfn_range,
                                     on_lock=vm.mmu_invalidate_begin, flush_on_ret=True,
                                     point="gmem_begin_lock_wait")

    def invalidate_end(self, start: int, end: int):
        """__kvm_gmem_invalidate_end, a flow: end the invalidation under kvm->mmu_lock when a
        slot is bound in the range (``gmem_end_lock_wait``)."""
        if self.bindings_in(start, end):
            lock = self.vm.mmu_lock
            yield from lock.write_lock("gmem_end_lock_wait")
            try:
                self.vm.mmu_invalidate_end()
            finally:
                lock.write_unlock()

    # ------------------------------------------------------------------ file operations

    flow_label = "gmem"

    @property
    def steps(self) -> Steps:
        """This file's operations started as steppable ``Flow`` objects
        (``gmem.steps.fallocate(mode, offset, length)``, ``gmem.steps.close()``)."""
        return Steps(self)

    @steppable
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the file (kvm_gmem_fallocate)."""
        self._check_open()
        integer("mode", mode)
        integer("offset", offset)
        integer("length", length)
        # mode is a C int and offset, length are loff_t: a value that does not fit would
        # arrive wrapped, i.e. negative (EINVAL below) or as other mode bits (EOPNOTSUPP).
        if not -(1 << 31) <= mode < 1 << 31:
            raise KvmError(errno.EOPNOTSUPP, f"mode={mode:#x} does not fit in an int")
        if offset < 0 or length <= 0 or offset >= 1 << 63 or length >= 1 << 63:
            raise KvmError(errno.EINVAL, f"offset={offset}, length={length}: vfs_fallocate "
                                         "needs offset >= 0 and length > 0")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, f"mode={mode:#x}: FALLOC_FL_KEEP_SIZE is required")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, f"mode={mode:#x}: only KEEP_SIZE|PUNCH_HOLE")
        mask = self.vm.page_size - 1
        if offset & mask or length & mask:
            raise KvmError(errno.EINVAL, f"offset={offset:#x} or length={length:#x} is not "
                                         f"aligned to PAGE_SIZE {mask + 1:#x}")
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if not mode & FALLOC_FL_PUNCH_HOLE and offset + length > self.size:
            raise KvmError(errno.EINVAL, f"offset={offset:#x} + length={length:#x} is beyond "
                                         f"the file's size {self.size:#x}")
        # The syscall's reference (fdget): a close meanwhile is not the last fput.
        self.refs += 1
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                yield from self.inode.punch_hole(start, min(end, self.inode.npages))
                self.vm.stats["gmem_punch_hole"] += 1
                self.vm.trace("gmem.punch_hole", offset=offset, length=length)
                return
            # kvm_gmem_allocate: the invalidate lock shared, so allocations run together but
            # not beside a punch hole.
            lock = self.inode.invalidate_lock
            yield from lock.read_lock(GMEM_INVAL_LOCK_WAIT)
            try:
                for index in range(start, end, 1 << self.inode.order):
                    self.inode.get_folio(index)
            finally:
                lock.read_unlock()
        finally:
            self.refs -= 1

    def mmap(self) -> int:
        """mmap(2) of the file, MAP_SHARED (kvm_gmem_mmap): needs GUEST_MEMFD_FLAG_MMAP."""
        self._check_open()
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise KvmError(errno.ENODEV, "guest_memfd was created without "
                                         "GUEST_MEMFD_FLAG_MMAP")
        return self.vm.host.mmap(self.size, "rw", kind="gmem", backing=self.inode)

    @steppable
    def close(self) -> None:
        """close(2) of the file's fd, its last: the fd goes at once (a fallocate or a bind
        gets EBADF), and the last reference with it, or, while a syscall on the file holds
        one (a fallocate in flight), when that returns (``gmem_last_fput_wait``). Then the
        release (kvm_gmem_release): under kvm->slots_lock (so that no memslot update unbinds
        and frees a slot while release walks the bindings), then the inode's invalidate
        lock, bound slots lose the file and every mapping from it is zapped; the inode's
        memory stays. From the last reference on the file is ``dying``: an unbind no longer
        takes its invalidate lock (kvm_gmem_unbind when get_file_active fails) and
        kvm_gmem_get_pfn fails (EFAULT), while the mappings made before stay until release
        zaps them."""
        if self.closed or self.fd_closed:
            return
        self.fd_closed = True
        if self.refs:
            yield from wait_until(lambda: not self.refs, "the syscalls on the file to drop "
                                  "their references", GMEM_LAST_FPUT_WAIT)
        self.dying = True
        inode, slots_lock = self.inode, self.vm.slots_lock
        yield from slots_lock.lock(GMEM_SLOTS_LOCK_WAIT)
        try:
            yield from inode.invalidate_lock.write_lock(GMEM_INVAL_LOCK_WAIT)
            try:
                for _s, _e, slot in list(self.bindings):
                    slot.gmem_file = None
                everything = 1 << 62
                yield from self.invalidate_begin(0, everything, inode.invalidate_filter())
                yield from self.invalidate_end(0, everything)
                inode.files.remove(self)
            finally:
                inode.invalidate_lock.write_unlock()
        finally:
            slots_lock.unlock()
        self.bindings.clear()
        self.closed = True
        self.vm.trace("gmem.release", size=self.size)

    def _check_open(self) -> None:
        if self.fd_closed:
            raise KvmError(errno.EBADF, "guest_memfd is closed")


def kvm_gmem_create(vm: Kvm, size: int, flags: int, folio_order: int = 0) -> GuestMemfd:
    """KVM_CREATE_GUEST_MEMFD (kvm_gmem_create / __kvm_gmem_create)."""
    if "gmem" not in vm.capabilities:
        # Not built: kvm_arch_vm_ioctl's default answers (ENOTTY or EINVAL).
        err = vm.arch_info.vm_ioctl_errno if "gmem" not in vm.arch_capabilities else errno.EINVAL
        raise KvmError(err, f"create_guest_memfd: {vm.arch_info.name} VM type "
                            f"{vm.vm_type!r} has no guest_memfd")
    u64("size", size)
    u64("flags", flags)
    integer("folio_order", folio_order)
    supported = kvm_gmem_get_supported_flags(vm)
    if flags & ~supported:
        raise KvmError(errno.EINVAL, f"flags={flags:#x}: unsupported bits "
                                     f"{flags & ~supported:#x}")
    # args->size is a u64 that kvm_gmem_create reads into a loff_t: 2^63 and up are negative.
    if size <= 0 or size >= 1 << 63 or size & (vm.page_size - 1):
        raise KvmError(errno.EINVAL, f"size={size:#x} is not a positive multiple of PAGE_SIZE "
                                     f"{vm.page_size:#x} (as a signed loff_t)")
    max_order = MAX_FOLIO_ORDER - (vm.host.page_shift - PAGE_SHIFT)
    if not 0 <= folio_order <= max_order or size % (vm.page_size << folio_order):
        raise KvmError(errno.EINVAL, f"folio_order={folio_order}: must be 0..{max_order} "
                                     "and divide the size")
    inode = GmemInode(vm.host, size, flags, folio_order)
    gmem = GuestMemfd(vm, inode)
    vm.gmem_files.append(gmem)
    vm.trace("gmem.create", size=size, flags=flags, order=folio_order)
    return gmem


def kvm_gmem_get_supported_flags(vm: Kvm) -> int:
    """kvm_gmem_get_supported_flags. MMAP on every VM of an arch whose guest_memfd can be
    mmapped (Linux: always), private memory or not; INIT_SHARED with it where
    kvm_arch_supports_gmem_init_shared() holds, which on x86 (the only arch with private
    memory) means the VM has no private memory. Without INIT_SHARED every page of the file
    is private to the host, so a host access through the mapping gets SIGBUS
    (kvm_gmem_fault_user_mapping)."""
    flags = 0
    if "gmem_mmap" in vm.arch_capabilities:
        flags |= GUEST_MEMFD_FLAG_MMAP
        if "private_mem" not in vm.capabilities:
            flags |= GUEST_MEMFD_FLAG_INIT_SHARED
    return flags


def kvm_gmem_bind(vm: Kvm, slot: Memslot, gmem, offset: int):
    """kvm_gmem_bind, a flow: before the slot is visible; one binding per file page. The
    file is checked first (EBADF, EINVAL), then, under the inode's invalidate lock taken for
    write (``gmem_bind_lock_wait``), that the range is unbound (EINVAL) and the binding
    stored: a punch hole or release never sees the bindings change between its begin and
    its end."""
    if gmem is None or (isinstance(gmem, GuestMemfd) and gmem.fd_closed):
        raise KvmError(errno.EBADF, "guest_memfd: not an open file")
    if not isinstance(gmem, GuestMemfd):
        raise KvmError(errno.EINVAL, f"guest_memfd={gmem!r} is not a guest_memfd")
    if gmem.vm is not vm:
        raise KvmError(errno.EINVAL, "guest_memfd belongs to another VM")
    size = slot.npages << PAGE_SHIFT
    if offset < 0 or offset & (vm.page_size - 1) or offset + size > gmem.size:
        raise KvmError(errno.EINVAL, f"guest_memfd_offset={offset:#x} + size {size:#x} is "
                                     f"beyond the file's size {gmem.size:#x}")
    lock = gmem.inode.invalidate_lock
    yield from lock.write_lock(GMEM_BIND_LOCK_WAIT)
    try:
        start = offset >> PAGE_SHIFT
        if gmem.bindings_in(start, start + slot.npages):
            raise KvmError(errno.EINVAL, f"guest_memfd_offset={offset:#x}: that range of the "
                                         "file is already bound to another memslot")
        slot.gmem_file = gmem
        slot.gmem_pgoff = start
        if gmem.flags & GUEST_MEMFD_FLAG_MMAP:
            slot.flags |= KVM_MEMSLOT_GMEM_ONLY
        gmem.bindings.add((start, start + slot.npages, slot))
    finally:
        lock.write_unlock()


def kvm_gmem_unbind(slot: Memslot):
    """kvm_gmem_unbind, a flow: the slot's binding goes under the inode's invalidate lock
    (``gmem_unbind_lock_wait``), or without it when the file is dying (release holds
    slots_lock for its whole walk, which the caller holds too; a memory error's invalidation
    holds only the invalidate lock, which is how ``gmem_error_vs_dying_unbind`` races)."""
    gmem = slot.gmem_file
    if gmem is None:
        return
    if gmem.dying:
        _unbind(gmem, slot)
        return
    yield from unbind_locked(gmem, slot)


def unbind_locked(gmem: GuestMemfd, slot: Memslot):
    """The binding of ``slot`` goes under the inode's invalidate lock, a flow."""
    lock = gmem.inode.invalidate_lock
    yield from lock.write_lock(GMEM_UNBIND_LOCK_WAIT)
    try:
        _unbind(gmem, slot)
    finally:
        lock.write_unlock()


def kvm_gmem_unbind_now(slot: Memslot) -> None:
    """kvm_gmem_unbind where the caller cannot wait (a memslot update being abandoned: its
    flow is closed as a killed thread, which cannot sleep for the lock)."""
    if slot.gmem_file is not None:
        _unbind(slot.gmem_file, slot)


def _unbind(gmem: GuestMemfd, slot: Memslot) -> None:
    for b in gmem.bindings_in(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages):
        if b[2] is slot:
            gmem.bindings.remove(b)
    slot.gmem_file = None


def kvm_gmem_get_pfn(vm: Kvm, slot: Memslot, gfn: int) -> tuple[int, int]:
    """kvm_gmem_get_pfn: ``(pfn, max_order)``; KvmError EFAULT (no live file), EIO (not
    bound to this slot), EHWPOISON (poisoned folio)."""
    gmem = slot.gmem_file
    if gmem is None or gmem.closed or gmem.dying:
        # kvm_gmem_get_file: get_file_active fails from the last fput on, before release.
        raise KvmError(errno.EFAULT, "guest_memfd: the slot's file was released")
    index = slot.gmem_index(gfn)
    if gmem.binding_at(index) is not slot:
        raise KvmError(errno.EIO, f"guest_memfd: page {index} is not bound to this slot")
    inode = gmem.inode
    base, pfn = inode.get_folio(index)
    if index in inode.poisoned:
        raise KvmError(EHWPOISON, f"guest_memfd: page {index} is hardware-poisoned")
    return pfn + (index - base), inode.order
