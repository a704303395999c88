"""The explorer's oracles beyond ``vm.check_invariants()``: what must hold in every schedule.

- **Use after free**: no leaf, no vCPU TLB entry and no valid pfn cache reaches a frame the
  host gave back (``HostMemory.freed``: anonymous pages unmapped or migrated away, truncated
  guest_memfd folios), nor a leaf of a page table KVM still holds though no vCPU walks it
  (the ``stale_leaves`` hook: x86's invalid roots being zapped). Linux frees a page only
  after invalidate_range_start has zapped (every root, valid or not) and flushed (and made
  the pfn caches over it invalid), so this holds at every step, whatever locks are held.
- **No stale access**: an access that completed (a vCPU's read or write, a pfn cache's) went
  to the frame the host maps at its hva at that moment (where a VM_PFNMAP range has no PTE
  yet, the device page its VMA places there: arm64 maps such a range in blocks by the VMA's
  geometry, get_vma_page_shift), or to guest_memfd's folio of its gfn: every way a frame
  leaves an hva (an unmap, a migration, a COW break, a collapse, a truncation) zaps KVM's
  mappings and flushes in invalidate_range_start, before the host's page table changes, so
  no translation a vCPU or a pfn cache still uses reaches an old frame, even where it is not
  freed (the shared zero page a COW break replaced, a page a migration copied from and has
  not freed yet). The symptom a guest sees: a read of bytes the host no longer holds there,
  a write the host never sees.
- **No unreachable cache**: a valid pfn cache is on kvm->gpc_list, where the MMU notifier
  finds it (kvm_gpc_activate puts it there before it is active; kvm_gpc_deactivate makes it
  invalid before it takes it off, and a refresh of an inactive cache fails).
- **No private leak**: no shared (non-private) leaf maps a page of a guest_memfd that is not
  shared (without GUEST_MEMFD_FLAG_INIT_SHARED): a shared access never reaches private memory.
- **No downgrade without an invalidation**: once an access completed, the leaf it used stays
  present (and writable, for a write) until something that may take it away has run: an
  invalidation (mmu_invalidate_seq or _in_progress moves), a zap, aging, a dirty-log
  write-protect, a memslot update. This is how the arm64 break-before-make race of 2020 shows:
  a vCPU that raced another's fault replaced its valid writable entry by a read-only one.
- **No lost page**: at the end, every anonymous page the host allocated while the flows ran
  is mapped by a host PTE or was freed (or poisoned). A host operation that put a page over
  another without freeing it (a COW break that lost a race installing its copy over the
  winner's: wp_page_copy's pte_same check) loses what was written there.
- **No lost write**: at the end, the bytes of every store that completed (a vCPU's write, the
  VMM's, a pfn cache's; each flow stores at bytes of its own, see ``scenario.py``) are where
  it stored them: in the page the host maps at its hva now (or would map: a file's page,
  guest_memfd's folio), or, for a private write, in guest_memfd's folio. A page copied
  (migration, a THP collapse, a COW break) must carry what was written before it was
  unmapped, and a write that went to the old frame through a stale translation afterwards
  is lost. Not checked: a store on a page that a flow may discard (MADV_DONTNEED, munmap, a
  memory error, a punched hole) or, for a private write, convert (a conversion may take the
  page's contents: TDX clears a removed private page); a store another completed store
  overlaps in part. Where stores overlap whole, the end must hold one of them.
- **Dirty-log completeness**: at the end, every guest write that completed after the last
  dirty-log ioctl (GET, CLEAR, or the memslot update that turned logging on) returned is
  reported by a KVM_GET_DIRTY_LOG or the dirty rings: KVM's contract with live migration.
  Linux's exception: with a dirty ring and no bitmap, arm64 and RISC-V map a block and
  report one gfn of it (a hugetlb block's first, the faulting one of a THP on arm64) for a
  write anywhere in it.

Each check returns None or ``(kind, message)``.
"""

from __future__ import annotations

from ..invariants import all_leaves, host_frame
from ..uapi import GUEST_MEMFD_FLAG_INIT_SHARED, KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, PAGE_SIZE
from .scenario import READ_BYTES

#: Statistics that count something allowed to take a leaf away or write-protect it:
#: ``fault_block_unmapped``, a backend's fault that replaced a valid block by an empty table
#: (arm64's stage2_map_walk_leaf, ppc's kvmppc_create_pte: a 4K fault under a block of a slot
#: that logs now) or broke a table to make a block (arm64's stage2_map_walk_table_pre).
_TAKES_AWAY = ("zap_ranges", "mn_clear_young", "mn_clear_flush_young", "get_dirty_log",
               "clear_dirty_log", "fault_block_unmapped")
DIRTY_OPS = ("get_dirty_log", "clear_dirty_log", "log_dirty", "reset_dirty_rings")


class Oracles:
    """The oracles' state for one run of a scenario (a ``World``)."""

    def __init__(self, world):
        self.world = world
        world.host.freed = set()
        world.host.anon_allocs = []       # the setup's pages are not the flows' to lose
        #: Completed accesses whose leaf must stay: (gpa, private, writable, as_id, epoch).
        self.used: list = []
        #: Stretches run by flows other than guest accesses: any of them may be the part of
        #: an ioctl or host operation that takes leaves away (a dirty-log write-protect runs
        #: before the ioctl counts itself).
        self.other_steps = 0
        self._access = [f["op"] in ("read", "write") for f in world.scn_flows]
        #: Completed stores: (flow, where, data); ``where`` is ("hva", hva) or ("gmem",
        #: inode, byte offset in the file).
        self.stores: list = []

    def epoch(self) -> tuple:
        vm = self.world.vm
        inv = vm.mmu_invalidate
        stats = vm.stats
        return (self.other_steps, inv.seq, inv.in_progress, *(stats[k] for k in _TAKES_AWAY),
                *(s.generation for s in vm.memslot_sets))

    def flow_ended(self, i: int, outcome: tuple, leaves: list | None = None) -> None:
        """Flow ``i`` has just ended with ``outcome``. ``leaves``: the present leaves per
        address space now, if the caller has them (else each leaf is looked up)."""
        f = self.world.scn_flows[i]
        # A pfn cache's write returns -errno when its refresh failed: it stored nothing.
        if f["op"] in ("host_write", "gpc_write") and outcome[0] == "ok" and not outcome[1]:
            world = self.world
            hva = (world._hva(f) + f["offset"] if f["op"] == "host_write"
                   else world.gpcs[f.get("gpc", 0)].uhva)
            self.stores.append((i, ("hva", hva), world.data(f)))
        if f["op"] in ("read", "write") and outcome[0] == "ok":
            # The leaf the access used: of its intent, or of the gfn's attribute where the
            # VM type takes privateness from the attributes (sw_protected, arm64).
            as_id, gpa = self.world.vcpu_of(i).as_id, f["gpa"]
            # A write through a TLB entry whose leaf was already write-protected (a dirty-log
            # clear between its zap and its flush) claims only what the leaf had.
            for private in (bool(f.get("private", False)), not f.get("private", False)):
                m = (self.world.vm.lookup(gpa, private=private, as_id=as_id) if leaves is None
                     else _leaf_at(leaves[as_id], gpa >> PAGE_SHIFT, private))
                if m is not None:
                    self.used.append((gpa, private, m.writable, as_id, self.epoch()))
                    if f["op"] == "write":
                        self._stored(i, f, private, as_id)
                    break

    def _stored(self, i: int, f: dict, private: bool, as_id: int) -> None:
        """Record where vCPU write ``i`` stored, by the slot and privateness its leaf has."""
        gpa = f["gpa"]
        slot = self.world.vm.leaf_memslot(gpa >> PAGE_SHIFT, as_id)
        if slot is None:
            return
        if private:
            # The scenario's file for the slot: a release may have taken it from the slot
            # already (the store went through a leaf its zap had not reached).
            gmem = self.world.gmem_of(slot)
            where = ("gmem", gmem.inode,
                     (slot.gmem_index(gpa >> PAGE_SHIFT) << PAGE_SHIFT) + gpa % PAGE_SIZE)
        else:
            where = ("hva", slot.gfn_to_hva(gpa >> PAGE_SHIFT) + gpa % PAGE_SIZE)
        self.stores.append((i, where, self.world.data(f)))

    def stale_access(self, i: int, outcome: tuple):
        """Flow ``i`` has just ended with ``outcome``: if it is an access that completed,
        the frame it went through, unless the host (or guest_memfd) holds the page there
        now (see the module docstring), as ``(kind, message)``; else None. The frame is the
        vCPU's TLB entry for the page (hit or filled by the access: no other flow ran since),
        or the pfn cache's."""
        f = self.world.scn_flows[i]
        op = f["op"]
        if outcome[0] != "ok":
            return None
        world, host = self.world, self.world.host
        name = world.flows[i].name
        if op in ("gpc_read", "gpc_write"):
            if outcome[1] != 0 if op == "gpc_write" else type(outcome[1]) is not bytes:
                return None                 # -errno: a refresh failed, nothing copied
            gpc = world.gpcs[f.get("gpc", 0)]
            frame = host_frame(host, gpc.uhva)
            if type(frame) is str or frame[0] != gpc.pfn:
                return ("stale-access", f"{name} went through the pfn cache's pfn "
                        f"{gpc.pfn:#x}, but the host maps its hva {gpc.uhva:#x} to "
                        f"{_frame_name(frame)}")
            return None
        if op not in ("read", "write"):
            return None
        vcpu = world.vcpu_of(i)
        gpa, private = f["gpa"], f.get("private", False)
        n = len(world.data(f)) if op == "write" else f.get("n", READ_BYTES)
        for page in range(gpa >> PAGE_SHIFT, ((gpa + n - 1) >> PAGE_SHIFT) + 1):
            e = vcpu.tlb.get((page, private))
            if e is None:
                continue                    # a later page's fill evicted it (TLB_ENTRIES)
            gfn, pfn = e[0], e[1]
            # A slot being deleted or moved keeps its INVALID copy until its flush is done.
            slot = world.vm.memslot_sets[vcpu.as_id].search(gfn)
            if slot is None:
                return ("stale-access", f"{name} went to gpa {gfn << PAGE_SHIFT:#x} "
                        f"through pfn {pfn:#x}, but no memslot covers it")
            # What a fault would map there: the host's frame (for a VM_PFNMAP range, its
            # device page even where no PTE is populated yet: arm64 maps such a range in
            # blocks by the VMA's geometry), else guest_memfd's folio.
            hva = slot.gfn_to_hva(gfn)
            frame = host_frame(host, hva)
            if type(frame) is not str and frame[0] == pfn:
                continue
            gmem = world.gmem_of(slot)
            folio = None if gmem is None else gmem.inode.frame_of(slot.gmem_index(gfn))
            if folio == pfn:
                continue
            return ("stale-access", f"{name} went to gpa {gfn << PAGE_SHIFT:#x} through pfn "
                    f"{pfn:#x}, but the host maps its hva {hva:#x} to {_frame_name(frame)}"
                    + ("" if gmem is None else
                       f" and guest_memfd's folio is {'none' if folio is None else hex(folio)}"))
        return None

    def use_after_free(self, leaves: list | None = None):
        """A valid pfn cache the notifier cannot reach, use after free, and a shared leaf
        that reaches a private guest_memfd page (one pass over ``leaves``, the present
        leaves per address space, only when the host has freed a frame or guest_memfd holds
        one)."""
        host = self.world.host
        vm = self.world.vm
        for gpc in self.world.gpcs.values():
            if gpc.valid and gpc not in vm.gpc_list:
                return ("unreachable-cache", f"the pfn cache of gpa {gpc.gpa:#x} is valid "
                        f"(pfn {gpc.pfn:#x}) but not on kvm->gpc_list: no invalidation "
                        "reaches it")
        freed, gmem = host.freed, host.gmem_frames
        if not freed and not gmem:
            return None
        if leaves is None:
            leaves = all_leaves(vm)
        if freed:
            for gpc in vm.gpc_list:
                if gpc.valid and gpc.pfn in freed:
                    return ("use-after-free", f"the pfn cache of gpa {gpc.gpa:#x} is valid "
                            f"with pfn {gpc.pfn:#x}, a frame the host has freed")
            for vcpu in vm.vcpus:
                for (gfn, pfn, _w, _x, _d) in vcpu.tlb.values():
                    if pfn in freed:
                        return ("use-after-free", f"vcpu {vcpu.id} TLB entry gfn {gfn:#x} -> "
                                f"pfn {pfn:#x}, a frame the host has freed")
        for per_as in leaves:
            for m in per_as:
                frames = range(m.pfn, m.pfn + m.npages)
                if freed and not freed.isdisjoint(frames):
                    return ("use-after-free", f"leaf gfn {m.gfn:#x} -> pfn {m.pfn:#x} maps a "
                            "frame the host has freed")
                if gmem and not m.private:
                    owner = gmem.get(m.pfn)
                    if owner is not None and not owner[0].flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                        return ("private-leak", f"shared leaf gfn {m.gfn:#x} -> pfn "
                                f"{m.pfn:#x} maps a private guest_memfd page")
        if freed:
            for m in vm.hook.stale_leaves(vm=vm):
                if not freed.isdisjoint(range(m.pfn, m.pfn + m.npages)):
                    return ("use-after-free", f"leaf gfn {m.gfn:#x} -> pfn {m.pfn:#x} of a "
                            "page table no vCPU walks any more (not zapped yet) maps a frame "
                            "the host has freed")
        return None

    def count_step(self, i: int) -> None:
        """Flow ``i`` has just run a stretch (the bookkeeping of ``downgrade``)."""
        if not self._access[i]:
            self.other_steps += 1

    def downgrade(self, i: int, leaves: list | None = None):
        """Flow ``i`` has just run a stretch. ``leaves``: the present leaves per address
        space, as ``use_after_free`` takes them (the leaf each claim names is looked up in
        them: the state they were enumerated from is the state now)."""
        self.count_step(i)
        if not self.used:
            return None
        now = self.epoch()
        if leaves is None:
            leaves = all_leaves(self.world.vm)
        keep = []
        for rec in self.used:
            gpa, private, writable, as_id, epoch = rec
            if epoch != now:
                continue           # something that may take it away ran: nothing to claim
            keep.append(rec)
            m = _leaf_at(leaves[as_id], gpa >> PAGE_SHIFT, private)
            if m is None or (writable and not m.writable):
                self.used = keep
                return ("downgrade", f"the leaf of gpa {gpa:#x} that a completed "
                        "access used is "
                        f"{'gone' if m is None else 'read-only'}, with no invalidation, zap, "
                        "aging or write-protect since")
        self.used = keep
        return None

    def lost_page(self):
        """An anonymous page allocated while the flows ran that no host PTE maps and that was
        not freed (see the module docstring), or None."""
        host = self.world.host
        freed, poisoned, step = host.freed, host.poisoned, host.nr_frames
        # A THP split since maps (or frees) its frames one PAGE_SIZE page at a time.
        kept = [pages for pages in (range(pfn, pfn + frames, step)
                                    for pfn, frames in host.anon_allocs)
                if not any(p in freed or p in poisoned for p in pages)]
        if not kept:
            return None
        mapped = host.mapped_pfns()
        for pages in kept:
            if mapped.isdisjoint(pages):
                return ("lost-page", f"the anonymous page at pfn {pages.start:#x} "
                        f"({len(pages)} pages) is neither mapped by the host nor freed")
        return None

    def lost_write(self):
        """A completed store whose bytes are not where it stored them at the end (see the
        module docstring), or None."""
        if not self.stores:
            return None
        discards = self._discards()
        for i, where, data in self.stores:
            end = where[-1] + len(data)
            if any(d[:-2] == where[:-1] and d[-2] < end and where[-1] < d[-1]
                   for d in discards):
                continue
            others = [(w, d) for j, w, d in self.stores if j != i and w[:-1] == where[:-1]
                      and w[-1] < end and where[-1] < w[-1] + len(d)]
            if any(w != where or len(d) != len(data) for w, d in others):
                continue                        # overlapped in part: no single answer
            now = self._peek(where, len(data))
            if now is None or now == data or now in {d for _w, d in others}:
                continue
            name = self.world.flows[i].name
            at = (f"hva {where[1]:#x}" if where[0] == "hva"
                  else f"byte {where[2]:#x} of its guest_memfd")
            return ("lost-write", f"{name} stored {data!r} at {at} and completed, but "
                    f"{now!r} is there at the end")
        return None

    def _peek(self, where: tuple, n: int) -> bytes | None:
        host = self.world.host
        if where[0] == "hva":
            return host.peek(where[1], n)
        inode, pos = where[1], where[2]
        pfn = inode.frame_of(pos >> PAGE_SHIFT)
        return bytes(n) if pfn is None else host.read_frame(pfn, pos % PAGE_SIZE, n)

    def _discards(self) -> list:
        """The ranges of memory a flow of the scenario may discard, as ``(*where without its
        offset, start, end)``: the hvas of a MADV_DONTNEED, a munmap or a memory error (its
        page is gone: a later touch is SIGBUS), a punched hole's bytes of guest_memfd (and of
        its mmap) or a memory error's in it, and the private memory of a conversion's
        gpas."""
        world = self.world
        out = []
        for f in world.scn_flows:
            op = f["op"]
            private_error = op == "poison" and f.get("private", False)
            if op in ("madvise_dontneed", "munmap", "poison") and not private_error or (
                    op == "punch_hole" and world.slots[f.get("slot", 0)]["gmem_mmap"]):
                hva = world._hva(f)
                out.append(("hva", hva, hva + f.get("pages", 1) * world.page))
            if op == "punch_hole" or private_error:
                start = f.get("page", 0) * world.page
                out.append(("gmem", world.gmems[f.get("slot", 0)].inode, start,
                            start + f.get("pages", 1) * world.page))
            if op == "set_memory_attributes":
                for s in world.slots.values():
                    gmem = world.gmems[s["slot"]]
                    lo = max(f["gpa"], s["gpa"])
                    hi = min(f["gpa"] + f.get("size", world.page),
                             s["gpa"] + s["pages"] * world.page)
                    if gmem is not None and lo < hi:
                        out.append(("gmem", gmem.inode, lo - s["gpa"], hi - s["gpa"]))
        return out

    def at_end(self, run):
        """No lost page, no lost write, then dirty-log completeness (see the module
        docstring)."""
        problem = self.lost_page() or self.lost_write()
        if problem:
            return problem
        world = self.world
        vm = world.vm
        flows = world.scn_flows
        last = max((run.ended_at.get(j, -1) for j, f in enumerate(flows)
                    if f["op"] in DIRTY_OPS), default=-1)
        reported: dict[int, set[int]] = {}
        for i, f in enumerate(flows):
            if f["op"] != "write" or run.outcomes.get(i, ("",))[0] != "ok" or \
                    run.ended_at[i] <= last:
                continue
            gfn = f["gpa"] >> PAGE_SHIFT
            slot = vm.leaf_memslot(gfn)
            if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                continue
            if slot.slot_id not in reported:
                # KVM_GET_DIRTY_LOG write-protects what it reports: the end state is not the
                # state the oracles checked last any more.
                run.leaves = None
                reported[slot.slot_id] = self._reported(slot)
            if gfn - slot.base_gfn not in reported[slot.slot_id] and \
                    not self._block_marked(slot, gfn, reported[slot.slot_id]):
                return ("dirty-log", f"the write to gpa {f['gpa']:#x} completed after the last "
                        "dirty-log ioctl returned, but the next get does not report it")
        return None

    def _block_marked(self, slot, gfn: int, reported: set[int]) -> bool:
        """A write through a block of a logging slot that has no bitmap (a dirty ring alone),
        one of whose gfns is reported: arm64 and RISC-V test logging by the bitmap
        (memslot_is_logging), so their fault maps the block writable and marks one gfn for
        all of it -- user_mem_abort's gfn, taken after a hugetlb block rounded the ipa down
        but before transparent_hugepage_adjust does, so a THP's faulting gfn, even for a
        read -- as the core invariant allows (invariants.py); x86 tests the flag."""
        if slot.dirty_bitmap is not None:
            return False
        m = self.world.vm.lookup(gfn << PAGE_SHIFT)
        if m is None or m.size <= self.world.vm.page_size:
            return False
        first = m.gfn - slot.base_gfn
        return any(first <= g < first + m.npages for g in reported)

    def _reported(self, slot) -> set[int]:
        vm = self.world.vm
        out = set()
        if slot.dirty_bitmap is not None:
            out.update(vm.get_dirty_log(slot.slot_id))
        for vcpu in vm.vcpus:
            if vcpu.dirty_ring is not None:
                out.update(off for sid, off in vcpu.dirty_ring.pending()
                           if sid == slot.slot_id)
        return out


def _leaf_at(leaves: list, gfn: int, private: bool):
    """``vm.lookup``'s answer from an enumeration of the leaves (ascending by gfn): the
    first leaf of this privateness that covers ``gfn``."""
    for m in leaves:
        if m.gfn > gfn:
            break
        if m.private == private and gfn < m.gfn + m.npages:
            return m
    return None


def _frame_name(frame) -> str:
    """``host_frame``'s answer as the stale-access oracle's message names it."""
    return "nothing" if type(frame) is str else f"pfn {frame[0]:#x}"
