"""Checks of the whole model state against what Linux guarantees (reference core.md §9), plus
every backend's own ``check_invariants``. Used by ``vm.check_invariants()``, the tests and the
conformance suite. Nothing here changes state.

Huge leaves are checked at their first, middle and last page: the host and guest_memfd hand
out physically contiguous huge pages, so a mismatch anywhere shows at one of those.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

from .uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
)

if TYPE_CHECKING:
    from .kvm import Kvm

#: An end gfn past every gfn (the leaves hook costs what is mapped, not the range's size).
EVERY_GFN = 1 << 52


def check_vm(vm: Kvm, leaves: list | None = None) -> list[str]:
    """Every broken invariant of ``vm``'s state. ``leaves``: the present leaves of each
    address space (``vm.mappings(as_id=...)`` as lists), when the caller already has them."""
    if leaves is None:
        leaves = all_leaves(vm)
    problems: list[str] = [f"{use}: the memslot was freed (kvm_free_memslot)"
                           for use in vm.freed_slot_uses]
    problems += _check_memslots(vm)
    problems += _check_invalidation(vm)
    problems += _check_attributes(vm)
    problems += _check_gmem(vm)
    problems += _check_leaves(vm, leaves)
    problems += _check_rings(vm)
    if vm.gpc_list:
        problems += _check_gpcs(vm)
    problems += _check_tlbs(vm, leaves)
    problems += _check_destroyed(vm)
    for found in vm.arch_check_invariants(vm=vm):
        problems += list(found or ())
    return problems


def _check_tlbs(vm: Kvm, leaves: list) -> list[str]:
    """Every vCPU TLB entry is backed by a present leaf with the same frame and at least its
    write permission: what a zap removes is flushed before the zapping flow lets go of
    kvm->mmu_lock (notifiers, memslot flushes) or of slots_lock (dirty-log GET/CLEAR flush
    after dropping mmu_lock), or by a flow that owes its flush after dropping both (the
    dirty-ring reset, ``vm.flushes_owed``). Until then a stale entry may legitimately remain,
    so the check waits for them."""
    if vm.mmu_lock.held or vm.slots_lock.held or vm.flushes_owed or vm.closed:
        return []
    out = []
    logged = _Logged(vm)
    # The leaves of each address space are in gfn order; those that may cover a gfn start
    # less than the largest leaf's size below it. Indexed for the address spaces of vCPUs
    # whose TLB holds entries (after a flush, none does).
    index: dict[int, tuple[list, list[int], int]] = {}
    for vcpu in vm.vcpus:
        if not vcpu.tlb:
            continue
        if vcpu.as_id not in index:
            per_as = leaves[vcpu.as_id]
            index[vcpu.as_id] = (per_as, [m.gfn for m in per_as],
                                 max((m.npages for m in per_as), default=1))
        per_as, gfns, span = index[vcpu.as_id]
        for (_page, _intent), (gfn, pfn, writable, _x, dirty) in list(vcpu.tlb.items()):
            near = per_as[bisect_left(gfns, gfn - span + 1):bisect_right(gfns, gfn)]
            # An aged leaf may have lost its permissions to access tracking (x86 with A/D
            # disabled), and aging does not flush: only the frame must agree then. A dirty
            # entry needs a dirty leaf: one whose D bit was cleared (PML dirty logging) but
            # not flushed lets writes through unlogged. A writable entry may outlive W on an
            # MMU-writable leaf (aging, then a read fault restoring the access-tracked leaf
            # without W): whatever clears MMU-writable flushes, and so does the dirty-log
            # ioctl that un-records the gfn (kvm_mmu_slot_apply_flags' comment), so the
            # write it lets through must still be recorded.
            if not any(m.gfn <= gfn < m.gfn + m.npages and m.pfn + gfn - m.gfn == pfn
                       and (not m.young or ((m.writable or not writable)
                                            and (m.dirty or not dirty))
                            or m.mmu_writable and logged.recorded(vcpu.as_id, gfn))
                       for m in near):
                out.append(f"vcpu {vcpu.id}: TLB entry gfn {gfn:#x} -> pfn {pfn:#x}"
                           f"{' writable' if writable else ''}{' dirty' if dirty else ''} has "
                           "no present leaf like it behind it (a change without its TLB "
                           "flush)")
    return out


def _check_destroyed(vm: Kvm) -> list[str]:
    """A destroyed VM (kvm_destroy_vm) has no page tables left on any architecture: the
    notifier's release zaps them where kvm_arch_flush_shadow_all does (x86, arm64), and
    kvm_arch_destroy_vm frees the rest (ppc: kvmppc_free_radix)."""
    if not vm.closed:
        return []
    left = [m for as_id in range(vm.nr_address_spaces)
            for m in vm.leaves(vm=vm, start=0, end=EVERY_GFN, as_id=as_id)]
    return [f"the VM was closed but {len(left)} leaves remain"] if left else []


def _check_memslots(vm: Kvm) -> list[str]:
    out = []
    total = 0
    updating = vm.slots_lock.held
    for slots in vm.memslot_sets:
        gen = slots.generation
        if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS and not updating:
            out.append(f"as {slots.as_id}: generation {gen:#x} still marked in flux")
        if gen % vm.nr_address_spaces != slots.as_id:
            out.append(f"as {slots.as_id}: generation {gen} is not congruent to its as_id")
        prev = None
        for slot in slots:
            total += slot.npages
            if slot.npages <= 0:
                out.append(f"slot {slot.slot_id:#x} has no pages")
            if slot.invalid and not updating:
                out.append(f"slot {slot.slot_id:#x} is still INVALID outside an update")
            if prev is not None and slot.base_gfn < prev.end_gfn:
                out.append(f"slots {prev.slot_id:#x} and {slot.slot_id:#x} overlap")
            if slots.by_id.get(slot.id) is not slot:
                out.append(f"slot {slot.slot_id:#x} is not in the id index")
            prev = slot
    if total != vm.nr_memslot_pages and not updating:
        out.append(f"nr_memslot_pages is {vm.nr_memslot_pages}, slots hold {total}")
    return out


def _check_invalidation(vm: Kvm) -> list[str]:
    """mmu_invalidate_in_progress counts the invalidations between their begin and end: each
    is one of an MMU notifier's start..end (counted in mn_active_invalidate_count first), an
    attribute change (under slots_lock) or a guest_memfd invalidation (under its inode's
    invalidate lock). More than those is a begin whose end will never come: faults on its
    range retry for ever."""
    out = []
    inv = vm.mmu_invalidate
    if inv.in_progress < 0:
        out.append(f"mmu_invalidate_in_progress is {inv.in_progress}")
    elif inv.in_progress > vm.mn_active_invalidate_count and not vm.slots_lock.held and \
            not any(g.inode.invalidate_lock.holders() for g in vm.gmem_files):
        out.append(f"mmu_invalidate_in_progress is {inv.in_progress} but only "
                   f"{vm.mn_active_invalidate_count} invalidations are active: one began "
                   "and will never end")
    return out


def _check_attributes(vm: Kvm) -> list[str]:
    out = []
    prev = None
    for s, e, v in vm.attributes.runs():
        if not v:
            out.append(f"attributes: a zero run is stored at gfn {s:#x}")
        if v & ~KVM_MEMORY_ATTRIBUTE_PRIVATE:
            out.append(f"attributes: unsupported bits {v:#x} at gfn {s:#x}")
        if prev is not None and (prev[1] > s or (prev[1] == s and prev[2] == v)):
            out.append(f"attributes: runs at gfn {prev[0]:#x} and {s:#x} overlap or are not "
                       "merged")
        prev = (s, e, v)
    return out


def _check_gmem(vm: Kvm) -> list[str]:
    out = []
    for gmem in vm.gmem_files:
        if gmem.closed or gmem.dying:
            # kvm_gmem_release takes the file from its slots before it zaps and unbinds.
            continue
        prev_end = 0
        for start, end, slot in gmem.bindings:
            if start < prev_end:
                out.append(f"guest_memfd: page {start} is bound twice")
            if end > gmem.inode.npages:
                out.append(f"guest_memfd: binding [{start}, {end}) is beyond i_size")
            if slot.gmem_file is not gmem or slot.gmem_pgoff != start:
                out.append(f"guest_memfd: slot {slot.slot_id:#x} does not point back at its "
                           "binding")
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES or slot.readonly:
                out.append(f"guest_memfd slot {slot.slot_id:#x} logs dirty pages or is "
                           "read-only")
            prev_end = end
    return out


def _backing_pfn(vm: Kvm, slot, gfn: int, private: bool):
    """What the leaf for ``gfn`` must map now: ``(pfn, writable_allowed, max_size)``, or a
    string saying why nothing may be mapped."""
    if private or slot.gmem_only:
        gmem = slot.gmem_file or _releasing(vm, slot)
        if gmem is None or gmem.closed:
            return "its guest_memfd was released"
        index = slot.gmem_index(gfn)
        inode = gmem.inode
        pfn = inode.frame_of(index)
        if pfn is None:
            return f"guest_memfd page {index} is not allocated (punched?)"
        if index in inode.poisoned and index not in inode.poison_pending:
            # kvm_gmem_get_pfn fails with -EHWPOISON once the error's invalidation began.
            return f"guest_memfd page {index} is hardware-poisoned"
        return pfn, not slot.readonly, 4096 << gmem.inode.order
    frame = host_frame(vm.host, slot.gfn_to_hva(gfn))
    if type(frame) is str:
        return frame
    pfn, writable, size = frame
    return pfn, writable and not slot.readonly, size


def _releasing(vm: Kvm, slot):
    """The guest_memfd whose release has taken it from ``slot`` but not zapped and unbound
    yet (kvm_gmem_release: the slot's leaves stay until its invalidation zaps them), or
    None."""
    return next((f for f in vm.gmem_files if f.dying and not f.closed
                 and any(s is slot for _b, _e, s in f.bindings)), None)


def host_frame(host, hva: int):
    """The frame the host maps at ``hva`` now: ``(pfn, writable, size)``, or a string saying
    there is none."""
    pte = host.lookup_pte(hva)
    linear = host.linear_pfnmap(hva)
    if linear is not None:
        # A fresh fault populates a missing PTE with the linear pfn (fixup_user_fault); a
        # page not populated has no host protection to check (an mprotect changes the VMA
        # before its notifiers run).
        pfn, block = linear
        return (pfn, True, block) if pte is None else (pte[0], pte[1], block)
    if pte is None:
        return f"the host has no page at hva {hva:#x}"
    return pte


def _check_gpcs(vm: Kvm) -> list[str]:
    """A valid pfn cache maps the frame the host maps at its hva now, once no MMU-notifier
    invalidation is between its start and end (the start made the caches it covers invalid
    before the host changed anything; a refresh that raced it retries)."""
    out = []
    if vm.mn_active_invalidate_count:
        return out
    for gpc in vm.gpc_list:
        if not gpc.valid:
            continue
        where = f"pfn cache of gpa {gpc.gpa:#x} (hva {gpc.uhva:#x})"
        if not gpc.active:
            out.append(f"{where}: valid but not active")
        frame = host_frame(vm.host, gpc.uhva)
        if type(frame) is str or frame[0] != gpc.pfn:
            now = "no page" if type(frame) is str else f"pfn {frame[0]:#x}"
            out.append(f"{where}: valid with pfn {gpc.pfn:#x}, but the host maps {now} there "
                       "(a missed invalidation)")
    return out


def all_leaves(vm: Kvm) -> list[list]:
    """The present leaves of every address space, one list per ``as_id``: ``vm.mappings``
    of every gfn, straight from the bound ``leaves`` hook (its arguments need no checks)."""
    leaves = vm.leaves
    return [list(leaves(vm=vm, start=0, end=EVERY_GFN, as_id=a))
            for a in range(vm.nr_address_spaces)]


def _check_leaves(vm: Kvm, leaves: list) -> list[str]:
    out = []
    if not any(leaves):
        return out
    inv = vm.mmu_invalidate
    logged = _Logged(vm)
    private_vm = "private_mem" in vm.capabilities
    for as_id, m in ((a, m) for a, per_as in enumerate(leaves) for m in per_as):
        where = f"leaf gfn {m.gfn:#x} size {m.size:#x}"
        npages = m.npages
        if m.gfn % npages or m.pfn % npages:
            out.append(f"{where}: not aligned to its size (pfn {m.pfn:#x})")
        slot = vm.leaf_memslot(m.gfn, as_id)
        if slot is None:
            out.append(f"{where}: no live memslot maps it")
            continue
        if m.gfn + npages > slot.end_gfn:
            out.append(f"{where}: crosses the end of slot {slot.slot_id:#x}")
        attr = vm.attributes.get(m.gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE
        if npages > 1 and not vm.attributes.has(m.gfn, m.gfn + npages,
                                                KVM_MEMORY_ATTRIBUTE_PRIVATE, attr):
            out.append(f"{where}: the attributes under the huge leaf are mixed")
        private = bool(attr)
        if private_vm and m.private != private:
            out.append(f"{where}: private={m.private} but the gfn's attribute says "
                       f"{'private' if private else 'shared'}")
        if not private_vm and m.private:
            out.append(f"{where}: a private leaf in a VM without private memory")
        for gfn in sorted({m.gfn, m.gfn + npages // 2, m.gfn + npages - 1}):
            if inv.in_progress and inv.range_start <= gfn < inv.range_end:
                continue
            if slot.invalid or not slot.contains(gfn):
                continue
            want = _backing_pfn(vm, slot, gfn, private)
            got = m.pfn + gfn - m.gfn
            if isinstance(want, str):
                out.append(f"{where}: maps pfn {got:#x} for gfn {gfn:#x} but {want}")
                continue
            pfn, writable_ok, max_size = want
            if pfn != got:
                out.append(f"{where}: maps pfn {got:#x} for gfn {gfn:#x}, the backing gives "
                           f"{pfn:#x} (a missed invalidation)")
            if m.writable and not writable_ok:
                out.append(f"{where}: writable, but the slot or host mapping is read-only")
            if m.size > max_size:
                out.append(f"{where}: larger than its backing's {max_size:#x} mapping")
        # Every page of a writable leaf of a logging slot is logged -- except a block mapped
        # while the slot has no bitmap (dirty ring alone): arm64's memslot_is_logging is
        # false then, so user_mem_abort maps a block and marks one gfn for the whole write;
        # and while an ioctl holds slots_lock (a memslot update before its commit
        # write-protects, a dirty-log GET/CLEAR between its steps).
        if m.writable and m.dirty and slot.flags & KVM_MEM_LOG_DIRTY_PAGES and (
                slot.dirty_bitmap is not None or m.size <= vm.page_size) and \
                not vm.slots_lock.held:
            for gfn in range(m.gfn, m.gfn + npages):
                if not logged.in_slot(slot, gfn):
                    out.append(f"{where}: dirty and writable in a dirty-logged slot, but gfn "
                               f"{gfn:#x} is neither logged nor pending")
                    break
    return list(dict.fromkeys(out))     # a leaf's problem at each page it checks, once


class _Logged:
    """Whether a gfn's write is recorded for dirty logging: set in its slot's bitmap, in a
    dirty ring entry not yet reset, or pending in a vCPU's PML buffer (read once, when first
    asked)."""

    def __init__(self, vm: Kvm):
        self.vm = vm
        self.ring: set | None = None
        self.pending: dict[int, set[int]] = {}

    def recorded(self, as_id: int, gfn: int) -> bool:
        """Recorded, or its memslot does not log dirty pages."""
        slot = self.vm.leaf_memslot(gfn, as_id)
        return slot is not None and (not slot.flags & KVM_MEM_LOG_DIRTY_PAGES
                                     or self.in_slot(slot, gfn))

    def in_slot(self, slot, gfn: int) -> bool:
        rel = gfn - slot.base_gfn
        if slot.dirty_bitmap is not None and slot.dirty_bitmap.test(rel):
            return True
        vm = self.vm
        if self.ring is None:
            self.ring = set()
            for vcpu in vm.vcpus:
                if vcpu.dirty_ring is not None:
                    self.ring |= vcpu.dirty_ring.pending()
        if (slot.slot_id, rel) in self.ring:
            return True
        if slot.slot_id not in self.pending:
            self.pending[slot.slot_id] = {g for found in vm.hook.dirty_pending_gfns(
                vm=vm, slot=slot) for g in (found or ())}
        return gfn in self.pending[slot.slot_id]


def _check_rings(vm: Kvm) -> list[str]:
    out = []
    for vcpu in vm.vcpus:
        ring = vcpu.dirty_ring
        if ring is not None and not 0 <= ring.used <= ring.size:
            out.append(f"vcpu {vcpu.id}: dirty ring holds {ring.used} of {ring.size}")
    return out

