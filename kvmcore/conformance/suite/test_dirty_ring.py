"""The dirty ring: enabling with its size errnos, push/harvest/reset counts, the soft-full
exit, and bitmap exclusivity (reference/core.md §6.5; invariants 17, 18)."""

from __future__ import annotations

import errno

import pytest

from kvmcore import DirtyRingFullExit
from kvmcore.conformance.helpers import PAGE, base_page_gfns, expect_errno, pattern
from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES as LOG

pytestmark = pytest.mark.requires("dirty_ring")

GPA = 0x800_0000
EINVAL, E2BIG, ENXIO = errno.EINVAL, errno.E2BIG, errno.ENXIO
RING = 1 << 16  # 4096 entries: larger than every architecture's reserve


@pytest.mark.parametrize("size,err", [
    pytest.param(0, EINVAL, id="zero"),
    pytest.param(3 * PAGE, EINVAL, id="not-power-of-two"),
    pytest.param(PAGE // 2, EINVAL, id="below-page"),
    pytest.param(2 << 20, E2BIG, id="above-65536-entries"),
])
def test_enable_size_errors(vm, size, err):
    """kvm_vm_ioctl_enable_dirty_log_ring: 0 / not a power of two / below a page or the
    reserved entries: EINVAL; more than 65536 entries: E2BIG."""
    expect_errno(err, vm.enable_dirty_ring, size)


def test_enable_twice_einval(vm):
    """The ring size is fixed once set."""
    vm.enable_dirty_ring(RING)
    expect_errno(EINVAL, vm.enable_dirty_ring, RING)


def test_enable_after_vcpu_einval(vm):
    """The ring must be enabled before any vCPU exists."""
    vm.create_vcpu(0)
    expect_errno(EINVAL, vm.enable_dirty_ring, RING)


def test_reset_without_ring_einval(vm):
    """KVM_RESET_DIRTY_RINGS without a ring: EINVAL."""
    expect_errno(EINVAL, vm.reset_dirty_rings)


def test_bitmap_ioctls_enxio_with_ring(guest):
    """With a ring and no bitmap, GET (and CLEAR) is ENXIO."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0, GPA, 64 * page, LOG)
    expect_errno(ENXIO, guest.vm.get_dirty_log, 0)


def _entries(vm, slot, gpas, base=GPA, size=None):
    """Ring entries for writes at ``gpas``: every 4 KiB gfn of each written base page."""
    size = 64 * vm.page_size if size is None else size
    out = []
    for gpa in gpas:
        out += [(slot, off) for off in base_page_gfns(vm, gpa, base, size)]
    return out


def test_write_pushes_entry(guest):
    """A write to a logging slot pushes (slot, offset) on the running vCPU's ring; harvest
    returns the entries in ring order."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(2, GPA, 64 * page, LOG)
    guest.write(GPA + 5 * page, pattern(1))
    guest.write(GPA + 9 * page, pattern(2))
    assert guest.vcpu.harvest_dirty_ring() == _entries(guest.vm, 2, [GPA + 5 * page,
                                                                     GPA + 9 * page])


def test_slot_field_has_as_id(guest, host):
    """The entry's slot is (as_id << 16) | id; a slot in address space 0 has as_id 0."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0x31, GPA, 64 * page, LOG)
    guest.write(GPA, pattern(3))
    assert [s for s, _ in guest.vcpu.harvest_dirty_ring()] == [0x31] * len(
        base_page_gfns(guest.vm, GPA, GPA, 64 * page))


def test_reset_counts_harvested_only(guest):
    """RESET resets exactly the harvested entries and returns their number; a second RESET
    returns 0."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0, GPA, 64 * page, LOG)
    guest.write(GPA, pattern(1))
    guest.write(GPA + 16 * page, pattern(2))
    harvested = guest.vcpu.harvest_dirty_ring()
    guest.write(GPA + 32 * page, pattern(3))  # pushed, not harvested
    assert guest.vm.reset_dirty_rings() == len(harvested)
    assert guest.vm.reset_dirty_rings() == 0
    later = guest.vcpu.harvest_dirty_ring()
    assert later == _entries(guest.vm, 0, [GPA + 32 * page])
    assert guest.vm.reset_dirty_rings() == len(later)


def test_redirty_after_reset(guest):
    """RESET re-arms tracking of the reset gfns: writing the page again pushes it again."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0, GPA, 64 * page, LOG)
    guest.write(GPA + 3 * page, pattern(1))
    guest.vcpu.harvest_dirty_ring()
    guest.vm.reset_dirty_rings()
    guest.write(GPA + 3 * page, pattern(2))
    assert guest.vcpu.harvest_dirty_ring() == _entries(guest.vm, 0, [GPA + 3 * page])


def test_non_logging_slot_not_pushed(guest):
    """A slot without LOG_DIRTY_PAGES pushes nothing."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0, GPA, 64 * page)
    guest.write(GPA, pattern(1))
    assert guest.vcpu.harvest_dirty_ring() == []


def test_soft_full_exit(guest, arch, host):
    """When used >= soft_limit (entries - 64 - the CPU's dirty-log buffer: 512 with PML), the
    vCPU exits KVM_EXIT_DIRTY_RING_FULL before entering the guest again: the write whose fault
    pushed the entry that reached the limit does not happen; after harvest + reset it runs
    again."""
    page = guest.vm.page_size
    ring = RING  # 4096 entries of 16 bytes
    entries = ring // 16
    soft_limit = entries - 64 - (512 if arch.has("pml") else 0)
    per_write = page >> 12  # every 4 KiB gfn of the written base page is pushed
    guest.vm.enable_dirty_ring(ring)
    npages = soft_limit // per_write + 2
    hva = guest.slot(0, GPA, npages * page, LOG)
    pushed = 0
    stride = page
    n = -1
    with pytest.raises(DirtyRingFullExit):
        while True:
            n += 1
            pushed += per_write         # the write's fault pushes before the vCPU exits
            guest.write(GPA + n * stride, b"\x01")
            assert pushed < soft_limit + per_write + 1
    assert pushed >= soft_limit
    assert pushed - per_write < soft_limit
    # The blocked write did not happen.
    assert host.read(hva + n * stride, 1) == b"\x00"
    harvested = guest.vcpu.harvest_dirty_ring()
    assert len(harvested) == pushed
    guest.vm.reset_dirty_rings()
    guest.write(GPA + n * stride, b"\x02")
    assert guest.read(GPA + n * stride, 1) == b"\x02"


def test_one_long_write_exits_when_the_ring_fills(guest, arch, host):
    """kvm_dirty_ring_check_request runs before every guest entry, so after each fault: a
    single write over several pages that crosses the ring's soft limit exits
    KVM_EXIT_DIRTY_RING_FULL in the middle, the ring never overflows, and the pages from the
    one whose fault reached the limit on are untouched."""
    page = guest.vm.page_size
    ring = RING
    entries = ring // 16
    soft_limit = entries - 64 - (512 if arch.has("pml") else 0)
    per_write = page >> 12
    pre = soft_limit // per_write - 4
    guest.vm.enable_dirty_ring(ring)
    hva = guest.slot(0, GPA, (pre + 8) * page, LOG)
    for i in range(pre):
        guest.write(GPA + i * page, b"\x01")
    with pytest.raises(DirtyRingFullExit):
        guest.write(GPA + pre * page, b"\x03" * (8 * page))
    harvested = guest.vcpu.harvest_dirty_ring()
    assert soft_limit <= len(harvested) < soft_limit + per_write
    done = len(harvested) // per_write - 1          # the last page faulted, not written
    assert host.read(hva + (done - 1) * page, 1) == b"\x03"
    assert host.read(hva + done * page, 1) == b"\x00"
    guest.vm.reset_dirty_rings()
    guest.write(GPA + done * page, b"\x03" * ((pre + 8 - done) * page))
    assert host.read(hva + (pre + 7) * page, 1) == b"\x03"


def test_enable_size_below_reserved_entries(vm, arch):
    """The ring must hold more than the reserved entries (64 + the CPU's dirty-log buffer,
    512 with PML): one page (256 entries) is EINVAL with PML and accepted without."""
    page = vm.page_size
    if arch.has("pml"):
        expect_errno(EINVAL, vm.enable_dirty_ring, page)
        vm.enable_dirty_ring(16 * page)
    else:
        vm.enable_dirty_ring(page)
    expect_errno(EINVAL, vm.enable_dirty_ring, RING)


@pytest.mark.requires("manual_dirty_protect")
def test_clear_dirty_log_enxio_with_ring(guest):
    """With a ring and no bitmap, CLEAR is ENXIO too (its first check)."""
    page = guest.vm.page_size
    guest.vm.enable_dirty_ring(RING)
    guest.slot(0, GPA, 64 * page, LOG)
    expect_errno(ENXIO, guest.vm.clear_dirty_log, 0, 0, 64, [])
