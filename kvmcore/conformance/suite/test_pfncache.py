"""gfn_to_pfn_cache (virt/kvm/pfncache.c): KVM's own mapping of one guest page, kept honest by
the MMU notifier alone (reference/core.md has no section yet: the facts are Linux 6.18's
pfncache.c and kvm_mmu_notifier_invalidate_range_start; docs/races.md)."""

from __future__ import annotations

import errno

import pytest

from kvmcore.conformance.helpers import expect_errno, step_until
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES

pytestmark = pytest.mark.requires("pfncache")

GPA = 0x100_0000


def _cache(guest, gpa=GPA + 0x5008, pages=16, flags=0):
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, pages * page, flags)
    guest.host.write(hva + (gpa - GPA), b"guest!")
    gpc = guest.vm.gpc_init()
    assert gpc.activate(gpa, 8) == 0
    return gpc, hva


def test_a_cache_reads_and_writes_the_guest_page(guest):
    gpc, hva = _cache(guest)
    assert gpc.check(8) and gpc.read(6) == b"guest!"
    assert gpc.write(b"KVM") == 0
    assert guest.host.read(hva + 0x5008, 6) == b"KVMst!"


def test_the_notifier_invalidates_and_the_next_access_refreshes(guest):
    """migrate() moves the page: the notifier's start made the cache invalid before the host
    changed its PTE, and the next access looks the new pfn up."""
    gpc, hva = _cache(guest)
    old = gpc.pfn
    guest.host.migrate(hva + 0x5008)
    assert not gpc.check(8)
    assert gpc.read(6) == b"guest!" and gpc.pfn != old and gpc.check(8)
    guest.vm.check_invariants()


def test_a_refresh_of_an_unmapped_page_fails_and_leaves_it_invalid(guest):
    gpc, hva = _cache(guest)
    page = guest.vm.page_size
    guest.host.munmap(hva + (0x5008 & -page), page)
    assert gpc.read(6) == -errno.EFAULT and not gpc.valid


def test_a_memslot_update_makes_check_fail_until_a_refresh(guest):
    """The memslot generation is part of the cache: a new slot set fails kvm_gpc_check, and
    the refresh translates the gpa again (here to no slot at all: -EFAULT)."""
    gpc, _ = _cache(guest)
    guest.vm.set_user_memory_region(0, GPA, 0, 0)
    assert not gpc.check(8)
    assert gpc.refresh(8) == -errno.EFAULT and not gpc.valid


def test_a_write_through_the_cache_is_logged(guest):
    gpc, _ = _cache(guest, flags=KVM_MEM_LOG_DIRTY_PAGES)
    guest.vm.get_dirty_log(0)
    assert gpc.write(b"x") == 0
    page = guest.vm.page_size
    first = (0x5008 & -page) >> 12
    assert guest.vm.get_dirty_log(0) == list(range(first, first + page // 4096))


def test_inactive_and_too_long_accesses_are_refused(guest):
    """An access that does not fit in the page is bad input (EINVAL, nothing changes); an
    inactive cache refuses a refresh (kvm_gpc_refresh's -EINVAL)."""
    gpc, _ = _cache(guest)
    page = guest.vm.page_size
    for call, args in ((gpc.refresh, (page,)), (gpc.read, (0,)), (gpc.write, (bytes(page),)),
                       (gpc.activate, (GPA + page - 4, 8))):
        expect_errno(errno.EINVAL, call, *args)
        assert gpc.valid and gpc.gpa == GPA + 0x5008
    with pytest.raises(TypeError, match="gpa"):
        gpc.activate("0x5000", 8)
    with pytest.raises(TypeError, match="data"):
        gpc.write("text")
    gpc.deactivate()
    assert not gpc.check(8) and gpc.refresh(8) == -errno.EINVAL


def test_a_refresh_that_races_an_invalidation_waits_for_its_end(guest):
    """The refresh has its pfn; a munmap's notifier has started (the count raised, the cache
    already invalid) but not yet taken mmu_lock: mmu_notifier_retry_cache sees
    mn_active_invalidate_count and the refresh waits, then finds the page gone."""
    gpc, hva = _cache(guest)
    guest.host.migrate(hva + 0x5008)                    # invalid: the read will refresh
    read = gpc.steps.read(6)
    step_until(read, "gpc_relock")
    page = guest.vm.page_size
    unmap = guest.host.steps.munmap(hva + (0x5008 & -page), page)
    step_until(unmap, "mn_start_lock_wait")
    assert next(read) == "gpc_retry_wait" and not read.runnable
    unmap.run()
    assert read.run() == -errno.EFAULT and not gpc.valid
