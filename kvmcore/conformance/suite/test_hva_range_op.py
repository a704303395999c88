"""vm.hva_range_op: the hva-range operator of the 2023 review ("KVM: Add HVA range operator"):
per intersecting memslot with its gfn range, stop at the first error and return it, no MMU
lock, no implied invalidation."""

from __future__ import annotations

from errno import EBUSY, EIO

import pytest

from kvmcore.conformance.helpers import snapshot

GPA = 0x100_0000


def _collect(results=None):
    seen = []

    def op(vm, rng):
        seen.append((rng.as_id, rng.slot.id, rng.start, rng.end, vm.mmu_invalidate_in_progress))
        return (results or {}).get(rng.slot.id, 0)
    return seen, op


def test_each_slot_with_its_gfn_range(guest):
    page = guest.vm.page_size
    hva = guest.host.mmap(8 * page)
    guest.slot(0, GPA, 4 * page, hva=hva)
    guest.slot(1, 2 * GPA, 4 * page, hva=hva + 4 * page)
    seen, op = _collect()
    # From the middle of slot 0's second page to one byte into slot 1's first page.
    start, end = hva + page + 1, hva + 4 * page + 1
    assert guest.vm.hva_range_op(start, end, op) == 0
    g0, g1 = GPA >> 12, 2 * GPA >> 12
    assert seen == [(0, 0, g0 + (page >> 12), g0 + (4 * page >> 12), 0),
                    (0, 1, g1, g1 + (page >> 12), 0)]


def test_stops_at_first_error_and_returns_it(guest):
    page = guest.vm.page_size
    hva = guest.host.mmap(3 * page)
    for i in range(3):
        guest.slot(i, GPA + i * 16 * page, page, hva=hva + i * page)
    seen, op = _collect({1: -EBUSY, 2: -EIO})
    assert guest.vm.hva_range_op(hva, hva + 3 * page, op) == -EBUSY
    assert [s[1] for s in seen] == [0, 1]


def test_no_mmu_lock_no_invalidation(guest):
    """The handler runs without the MMU lock (it can fault a page in itself) and nothing is
    invalidated: the leaves stay, mmu_invalidate_in_progress stays 0."""
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, 4 * page)
    guest.write(GPA, b"x")
    before = snapshot(guest.vm)
    calls = []

    def op(vm, rng):
        calls.append(vm.mmu_invalidate_in_progress)
        guest.read(GPA + page, 1)  # takes the MMU lock: would fail if it were held
        return 0
    assert guest.vm.hva_range_op(hva, hva + 4 * page, op) == 0
    assert calls == [0]
    slots, attrs, leaves, rings = snapshot(guest.vm)
    assert set(before[2][0]) <= set(leaves[0])


def test_empty_range_and_no_slot(guest):
    page = guest.vm.page_size
    hva = guest.slot(0, GPA, 4 * page)
    seen, op = _collect()
    assert guest.vm.hva_range_op(hva + page, hva + page, op) == 0
    other = guest.host.mmap(page)
    assert guest.vm.hva_range_op(other, other + page, op) == 0
    assert seen == []


def test_both_address_spaces(guest):
    """A host range backing a slot of each address space (x86 SMM) is visited in both, with
    its address space in the range."""
    vm = guest.vm
    if vm.nr_address_spaces < 2:
        pytest.skip("one memslot address space")
    page = vm.page_size
    hva = guest.host.mmap(4 * page)
    guest.slot(0, GPA, 4 * page, hva=hva)
    guest.slot(1 << 16 | 3, GPA, 4 * page, hva=hva)
    seen, op = _collect({3: -EBUSY})
    assert vm.hva_range_op(hva, hva + page, op) == -EBUSY
    assert [(s[0], s[1]) for s in seen] == [(0, 0), (1, 3)]
