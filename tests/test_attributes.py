"""KVM_SET_MEMORY_ATTRIBUTES (reference §4): validation order, the no-op rule, the
invalidation bracket, stored as ranges; and a hypothesis model of the range map."""

import errno

import pytest
from conftest import GiB, MiB, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcore import KvmError
from kvmcore.attributes import AttributeRanges
from kvmcore.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE

TiB = 1 << 40


@pytest.mark.parametrize("address, size, attributes, flags, fragment", [
    (0, 4096, 0, 1, "flags"),
    (0, 4096, 1 << 4, 0, "unsupported"),
    (0, 0, PRIVATE, 0, "size"),
    ((1 << 64) - 4096, 4096, PRIVATE, 0, "wraps"),
    (0x800, 4096, PRIVATE, 0, "aligned to PAGE_SIZE"),
    (0, 0x800, PRIVATE, 0, "aligned to PAGE_SIZE"),
])
def test_validation(pvm, address, size, attributes, flags, fragment):
    before = snapshot(pvm)
    with pytest.raises(KvmError, match=fragment) as e:
        pvm.set_memory_attributes(address, size, attributes, flags)
    assert e.value.errno == errno.EINVAL
    assert snapshot(pvm) == before


def test_flags_checked_before_attributes(pvm):
    with pytest.raises(KvmError, match="flags"):
        pvm.set_memory_attributes(0x800, 0, 1 << 9, 1)


def test_private_unsupported_without_private_memory(vm):
    with pytest.raises(KvmError) as e:
        vm.set_memory_attributes(0, 4096, PRIVATE)
    assert e.value.errno == errno.EINVAL
    vm.set_memory_attributes(0, 4096, 0)   # zero is always valid: a no-op


def test_no_slot_no_invalidation_one_run(pvm):
    pvm.set_memory_attributes(0, TiB, PRIVATE)
    assert pvm.mmu_invalidate_seq == 0            # no memslot intersects: no bracket
    assert list(pvm.attributes.runs()) == [(0, TiB >> 12, PRIVATE)]
    assert pvm.get_memory_attributes((TiB >> 12) - 1) == PRIVATE
    assert pvm.get_memory_attributes(TiB >> 12) == 0
    pvm.set_memory_attributes(0, TiB, 0)
    assert len(pvm.attributes) == 0


def test_noop_does_not_invalidate(pvm, host):
    hva = host.mmap(2 * MiB)
    pvm.set_user_memory_region(0, 0, 2 * MiB, hva)
    pvm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert pvm.mmu_invalidate_seq == 1
    pvm.set_memory_attributes(0, MiB, PRIVATE)
    assert pvm.mmu_invalidate_seq == 1 and pvm.stats["set_memory_attributes"] == 1


def test_conversion_zaps_old_kind_only_in_range(pvm, host):
    hva = host.mmap(4 * MiB)
    pvm.set_user_memory_region(0, 0, 4 * MiB, hva)
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0, b"a")
    vcpu.write(0x200000, b"b")
    assert {m.gfn for m in pvm.mappings()} == {0, 0x200}
    pvm.set_memory_attributes(0, 4096, PRIVATE)
    assert {m.gfn for m in pvm.mappings()} == {0x200}
    assert pvm.mmu_invalidate_in_progress == 0


def test_huge_leaf_needs_uniform_attributes(pvm, host):
    hva = host.mmap(4 * MiB, thp=True)
    pvm.set_user_memory_region(0, 0, 4 * MiB, hva)
    pvm.set_memory_attributes(0x1000, 4096, PRIVATE)   # gfn 1 private: 2M block mixed
    vcpu = pvm.create_vcpu(0)
    vcpu.write(0x3000, b"x")
    assert pvm.lookup(0x3000).size == 4096
    vcpu.write(0x200000, b"y")
    assert pvm.lookup(0x200000).size == 2 * MiB


def test_large_conversion_is_one_entry(pvm, host):
    hva = host.mmap(GiB)
    pvm.set_user_memory_region(0, 0, GiB, hva)
    for i in range(0, 64):
        pvm.set_memory_attributes(i * 2 * MiB, MiB, PRIVATE)
    assert len(pvm.attributes) == 64
    pvm.set_memory_attributes(0, GiB, PRIVATE)
    assert len(pvm.attributes) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 16), st.sampled_from([0, 8, 9])),
                max_size=30),
       st.lists(st.tuples(st.integers(0, 70), st.integers(1, 20), st.sampled_from([0, 8]),
                          st.sampled_from([8, ~0])), max_size=10))
def test_ranges_match_a_per_gfn_model(ops, queries):
    ranges, model = AttributeRanges(), {}
    for start, n, value in ops:
        ranges.set(start, start + n, value)
        for g in range(start, start + n):
            model[g] = value
    for g in range(0, 90):
        assert ranges.get(g) == model.get(g, 0)
    runs = list(ranges.runs())
    for (_s1, e1, v1), (s2, _e2, v2) in zip(runs, runs[1:], strict=False):
        assert e1 <= s2 and not (e1 == s2 and v1 == v2)
    assert all(v for _s, _e, v in runs)
    for start, n, attrs, mask in queries:
        mask &= 8
        expect = not attrs & ~mask and all(model.get(g, 0) & mask == attrs
                                           for g in range(start, start + n))
        assert ranges.has(start, start + n, mask, attrs) == expect
