"""KVM_SET_USER_MEMORY_REGION2: kvm_set_memory_region -> kvm_set_memslot (virt/kvm/kvm_main.c;
shared/reference/core.md §1).

Linux keeps two copies of each memslot set and swaps them under SRCU so that vCPUs read a stable
set while the writer edits the other. The model edits one set per address space in place; what
the two copies buy in Linux — the INVALID copy published before a DELETE/MOVE zaps, and a
generation that changes on every swap — is kept exactly.
"""

from __future__ import annotations

import errno
from types import GeneratorType
from typing import TYPE_CHECKING

from .args import unsigned
from .dirty import prepare_dirty_bitmap
from .errors import KvmError
from .gmem import kvm_gmem_bind, kvm_gmem_unbind, kvm_gmem_unbind_now
from .locks import wait_until
from .memslots import CHANGE_NAMES, TASK_SIZE, U64, Memslot, kvm_user_mem_slots
from .uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_MR_CREATE,
    KVM_MR_DELETE,
    KVM_MR_FLAGS_ONLY,
    KVM_MR_MOVE,
    PAGE_SHIFT,
)

if TYPE_CHECKING:
    from .kvm import Kvm


def _einval(message: str) -> KvmError:
    return KvmError(errno.EINVAL, message)


def check_memory_region_flags(vm: Kvm, flags: int) -> None:
    """check_memory_region_flags: LOG_DIRTY_PAGES, GUEST_MEMFD where guest_memfd exists (and
    then no dirty logging), READONLY where the arch has read-only memory (never with gmem)."""
    caps = vm.capabilities
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if "gmem" in caps:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    if "readonly_mem" in caps and not flags & KVM_MEM_GUEST_MEMFD:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        raise _einval(f"flags={flags:#x}: bits {flags & ~valid:#x} are not valid for this VM"
                      + (" (guest_memfd slots cannot log dirty pages or be read-only)"
                         if flags & KVM_MEM_GUEST_MEMFD else ""))


def kvm_set_memory_region(vm: Kvm, slot: int, flags: int, guest_phys_addr: int,
                          memory_size: int, userspace_addr: int, guest_memfd=None,
                          guest_memfd_offset: int = 0):
    """kvm_vm_ioctl_set_memory_region, a flow: the rest under kvm->slots_lock."""
    yield from vm.slots_lock.lock(SLOTS_LOCK_WAIT)
    try:
        return (yield from _kvm_set_memory_region(vm, slot, flags, guest_phys_addr,
                                                  memory_size, userspace_addr, guest_memfd,
                                                  guest_memfd_offset))
    finally:
        vm.slots_lock.unlock()


def _kvm_set_memory_region(vm: Kvm, slot: int, flags: int, guest_phys_addr: int,
                           memory_size: int, userspace_addr: int, guest_memfd=None,
                           guest_memfd_offset: int = 0):
    """KVM_SET_USER_MEMORY_REGION2: kvm_vm_ioctl_set_memory_region + kvm_set_memory_region,
    every check in Linux's order (reference §1.2-1.3), then kvm_set_memslot."""
    for name, value, bits in (("slot", slot, 32), ("flags", flags, 32),
                              ("guest_phys_addr", guest_phys_addr, 64),
                              ("memory_size", memory_size, 64),
                              ("userspace_addr", userspace_addr, 64),
                              ("guest_memfd_offset", guest_memfd_offset, 64)):
        unsigned(name, value, bits)
    user_slots = kvm_user_mem_slots(vm.arch_info)
    if slot & 0xFFFF >= user_slots:
        raise _einval(f"slot={slot:#x}: id {slot & 0xFFFF} is not a user memslot "
                      f"(< {user_slots})")
    as_id, id_ = slot >> 16, slot & 0xFFFF
    check_memory_region_flags(vm, flags)
    mask = vm.page_size - 1  # PAGE_SIZE: the host's, which may be 16K or 64K
    if memory_size & mask:
        raise _einval(f"memory_size={memory_size:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if guest_phys_addr & mask:
        raise _einval(f"guest_phys_addr={guest_phys_addr:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if userspace_addr & mask:
        raise _einval(f"userspace_addr={userspace_addr:#x} is not aligned to PAGE_SIZE "
                      f"{vm.page_size:#x}")
    if userspace_addr + memory_size > TASK_SIZE:
        raise _einval(f"userspace_addr={userspace_addr:#x}+memory_size fails access_ok()")
    if flags & KVM_MEM_GUEST_MEMFD and (guest_memfd_offset & mask
                                        or guest_memfd_offset + memory_size >= U64):
        raise _einval(f"guest_memfd_offset={guest_memfd_offset:#x} is not aligned to "
                      f"PAGE_SIZE {vm.page_size:#x} or offset + size wraps")
    if as_id >= vm.nr_address_spaces or id_ >= KVM_MEM_SLOTS_NUM:
        raise _einval(f"slot={slot:#x}: address space {as_id} does not exist "
                      f"(this VM has {vm.nr_address_spaces})")
    if guest_phys_addr + memory_size >= U64:
        raise _einval("guest_phys_addr + memory_size wraps")
    npages = memory_size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise _einval(f"memory_size={memory_size:#x} exceeds KVM_MEM_MAX_NR_PAGES pages")
    slots = vm.memslot_sets[as_id]
    old = slots.by_id.get(id_)
    base_gfn = guest_phys_addr >> PAGE_SHIFT
    if not memory_size:
        if old is None or not old.npages:
            raise _einval(f"slot={slot:#x}: cannot delete a slot that does not exist")
        if vm.nr_memslot_pages < old.npages:
            raise KvmError(errno.EIO, "nr_memslot_pages underflow")
        change = KVM_MR_DELETE
        new = None
    else:
        if old is None:
            if vm.nr_memslot_pages + npages >= U64:
                raise _einval("memory_size: total memslot pages would wrap")
            change = KVM_MR_CREATE
        else:
            if flags & KVM_MEM_GUEST_MEMFD:
                raise _einval(f"slot={slot:#x}: guest_memfd memslots are immutable")
            if (userspace_addr != old.userspace_addr or npages != old.npages
                    or (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)):
                raise _einval(f"slot={slot:#x}: a memslot cannot be resized, change its "
                              "userspace_addr, or toggle READONLY/GUEST_MEMFD")
            if base_gfn != old.base_gfn:
                change = KVM_MR_MOVE
            elif flags != old.flags & 0xFFFF:
                change = KVM_MR_FLAGS_ONLY
            else:
                return
        if change in (KVM_MR_CREATE, KVM_MR_MOVE):
            other = slots.overlapping(base_gfn, npages, id_)
            if other is not None:
                raise KvmError(errno.EEXIST,
                               f"guest_phys_addr={guest_phys_addr:#x}: overlaps slot "
                               f"{other.slot_id:#x} [{other.base_gfn << PAGE_SHIFT:#x}, "
                               f"{other.end_gfn << PAGE_SHIFT:#x})")
        new = Memslot(as_id, id_, base_gfn, npages, flags, userspace_addr)
        if change == KVM_MR_FLAGS_ONLY:
            # The arch metadata (lpage_info, ...) depends on base_gfn only: FLAGS_ONLY keeps it,
            # MOVE gets it anew from the backend's prepare_memory_region.
            new.arch = old.arch
    if new is not None and flags & KVM_MEM_GUEST_MEMFD:
        yield from kvm_gmem_bind(vm, new, guest_memfd, guest_memfd_offset)
    try:
        yield from kvm_set_memslot(vm, old, new, change)
    except GeneratorExit:
        if new is not None:
            kvm_gmem_unbind_now(new)
        raise
    except BaseException:
        if new is not None and new.gmem_file is not None:
            yield from kvm_gmem_unbind(new)
        raise


#: Race points of a memslot update (reference/races.md §5): waiting for slots_lock; waiting
#: for MMU-notifier invalidations to end before a swap; after a swap is published, waiting
#: for the SRCU readers (faults) that started before it; the arch's flush of the old slot
#: (``hookspecs.SLOT_FLUSH_LOCK_WAIT`` and the backend's own points); waiting for kvm->mmu_lock
#: before the arch commit, which takes it.
SLOTS_LOCK_WAIT = "slots_lock_wait"
SLOT_SWAP_WAIT_MN = "slot_swap_wait_mn"
SLOT_SRCU_SYNC = "slot_srcu_sync"
SLOT_COMMIT = "slot_commit"


def kvm_swap_active_memslots(vm: Kvm, as_id: int, publish):
    """kvm_swap_active_memslots, a flow: mark the generation in flux, wait until no
    MMU-notifier invalidation is between start and end (``slot_swap_wait_mn``), publish the
    new set (``publish()``), wait for every SRCU reader that started before
    (``slot_srcu_sync``: a fault that looked the old slot up runs to its end), then the new
    generation."""
    slots = vm.memslot_sets[as_id]
    slots.generation |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    if vm.mn_active_invalidate_count:
        yield from wait_until(lambda: not vm.mn_active_invalidate_count,
                              "mn_active_invalidate_count == 0", SLOT_SWAP_WAIT_MN)
    publish()
    slots.last_used_slot = None
    yield from vm.srcu.synchronize(SLOT_SRCU_SYNC)
    slots.generation = ((slots.generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
                        + vm.nr_address_spaces)


def kvm_commit_memory_region(vm: Kvm, old: Memslot | None, new: Memslot | None,
                             change: int):
    """kvm_commit_memory_region, a flow, once the new memslots are installed: the page and
    dirty-logging counts, then kvm_arch_commit_memory_region (which takes kvm->mmu_lock
    itself where it needs it: ``slot_commit`` waits until it is free), then a deleted
    slot's kvm_free_memslot (a guest_memfd unbind)."""
    if change == KVM_MR_DELETE:
        vm.nr_memslot_pages -= old.npages
    elif change == KVM_MR_CREATE:
        vm.nr_memslot_pages += new.npages
    old_log = bool(old and old.flags & KVM_MEM_LOG_DIRTY_PAGES)
    new_log = bool(new and new.flags & KVM_MEM_LOG_DIRTY_PAGES)
    vm.nr_memslots_dirty_logging += new_log - old_log
    yield from vm.mmu_lock.wait_free(SLOT_COMMIT)
    for r in vm.hook.commit_memory_region(vm=vm, old=old, new=new, change=change):
        if type(r) is GeneratorType:
            yield from r
    if change == KVM_MR_DELETE:
        # kvm_free_memslot: the guest_memfd binding goes, then the slot itself.
        if old.gmem_file is not None:
            yield from kvm_gmem_unbind(old)
        old.freed = True


def kvm_set_memslot(vm: Kvm, old: Memslot | None, new: Memslot | None, change: int):
    """kvm_set_memslot, a flow (slots_lock held): invalidate (DELETE/MOVE: publish an INVALID
    copy, wait for the faults that may still use the old one, then flush it under
    kvm->mmu_lock), prepare, install, commit (reference §1.4)."""
    as_id = (old or new).as_id
    slots = vm.memslot_sets[as_id]
    invalid = None
    if change in (KVM_MR_DELETE, KVM_MR_MOVE):
        invalid = old.evolve(flags=old.flags | KVM_MEMSLOT_INVALID)
        yield from kvm_swap_active_memslots(vm, as_id, lambda: slots.replace(old, invalid))
        # kvm_arch_flush_shadow_memslot takes kvm->mmu_lock itself, as each arch needs it.
        r = vm.hook.flush_shadow_memslot(vm=vm, slot=old)
        if type(r) is GeneratorType:
            yield from r
    try:
        if change != KVM_MR_DELETE:
            prepare_dirty_bitmap(vm, old, new)
        vm.hook.prepare_memory_region(vm=vm, old=old, new=new, change=change)
    except Exception:
        # kvm_activate_memslot puts the old slot back: a swap, which waits for the notifier
        # invalidations in progress like any other.
        if invalid is not None:
            yield from kvm_swap_active_memslots(vm, as_id, lambda: slots.replace(invalid, old))
        raise
    if change == KVM_MR_CREATE:
        publish = lambda: slots.replace(None, new)  # noqa: E731
    elif change == KVM_MR_DELETE:
        publish = lambda: slots.replace(invalid, None)  # noqa: E731
    elif change == KVM_MR_MOVE:
        publish = lambda: slots.replace(invalid, new)  # noqa: E731
    else:
        publish = lambda: slots.replace(old, new)  # noqa: E731
    yield from kvm_swap_active_memslots(vm, as_id, publish)
    yield from kvm_commit_memory_region(vm, old, new, change)
    vm.stats[f"memslot_{CHANGE_NAMES[change]}"] += 1
    vm.trace(f"memslot.{CHANGE_NAMES[change]}", slot=(old or new).slot_id,
             gpa=(new or old).base_gfn << PAGE_SHIFT, size=(new or old).npages << PAGE_SHIFT,
             flags=(new or old).flags)
