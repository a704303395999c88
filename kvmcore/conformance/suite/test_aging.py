"""Aging: the clear_young notifier clears the accessed state of leaves without zapping them or
flushing; an access makes them young again (reference/core.md §2.4; arch aging hooks)."""

from __future__ import annotations

import pytest

from kvmcore.conformance.helpers import PAGE, pattern

pytestmark = pytest.mark.requires("aging")

GPA = 0xC00_0000
SIZE = 16 * PAGE


def test_age_accessed_page_is_young(guest, host):
    """After a guest access, aging its hva reports young; the leaf stays mapped, now old."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA + PAGE, pattern(1))
    before = guest.vm.lookup(GPA + PAGE)
    assert before.young
    assert host.age(hva + PAGE, PAGE) is True
    after = guest.vm.lookup(GPA + PAGE)
    assert after is not None and not after.young
    assert (after.gfn, after.size, after.pfn, after.writable) == (
        before.gfn, before.size, before.pfn, before.writable)


def test_age_twice_without_access_is_old(guest, host):
    """A second aging with no access in between reports not young."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(2))
    assert host.age(hva, PAGE) is True
    assert host.age(hva, PAGE) is False


def test_access_makes_young_again(guest, host):
    """An access after aging sets the accessed state again (hardware A / AF fault / R)."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(3))
    host.age(hva, PAGE)
    assert guest.read(GPA) == pattern(3)
    assert guest.vm.lookup(GPA).young
    assert host.age(hva, PAGE) is True


def test_age_unmapped_range_is_old(guest, host):
    """Aging hvas with no leaf (or no slot) reports not young and maps nothing."""
    hva = guest.slot(0, GPA, SIZE)
    assert host.age(hva, SIZE) is False
    other = host.mmap(SIZE)
    assert host.age(other, SIZE) is False
    assert list(guest.vm.mappings()) == []


def test_age_only_its_range(guest, host):
    """Aging one page leaves the other leaves young."""
    hva = guest.slot(0, GPA, SIZE)
    guest.write(GPA, pattern(4))
    guest.write(GPA + 8 * PAGE, pattern(5))
    host.age(hva, PAGE)
    assert guest.vm.lookup(GPA + 8 * PAGE).young
