"""Call sequences for the differential test: a hand corpus after the KVM selftests
(set_memory_region_test, guest_memfd_test, dirty_log_test's ioctl paths) and a hypothesis
strategy generating VM-level calls with valid and invalid arguments.

Calls are tuples (see kvmcore.kernel.diff): userspace addresses are ``("mem", offset)`` into
the side's own mapping or ``("raw", address)``; guest_memfd arguments are the index of one the
sequence created, ``"none"`` (not an fd) or ``"vmfd"`` (an fd that is not a guest_memfd).
"""

from __future__ import annotations

from ..uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)
from .profile import PROFILE_CAPS, cap_number

MAX_VCPUS_PER_SEQUENCE = 2

KiB, MiB = 1 << 10, 1 << 20
U64 = 1 << 64
TASK_SIZE_MAX = (1 << 47) - 4096
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
GMEM = KVM_MEM_GUEST_MEMFD
MANUAL = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INIT_SET = KVM_DIRTY_LOG_INITIALLY_SET
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE
MEM0 = ("mem", 0)


def region(slot, gpa, size, flags=0, uaddr=MEM0):
    return ("set_region", slot, flags, gpa, size, uaddr)


def region2(slot, gpa, size, flags=0, uaddr=MEM0, gmem="none", gmem_off=0):
    return ("set_region2", slot, flags, gpa, size, uaddr, gmem, gmem_off)


def _set_memory_region_test():
    """set_memory_region_test: invalid flags, zero-sized and overlapping regions, slot
    limits, delete and move, invalid guest_memfd bindings."""
    seqs = [
        # test_invalid_memory_region_flags: every flag bit, v1 and v2.
        tuple(region(0, 0, 2 * MiB, 1 << bit) for bit in range(32)),
        tuple(region2(0, 0, 2 * MiB, 1 << bit) for bit in range(32)),
        # test_zero_memory_regions: deleting what does not exist.
        (region(0, 0, 0), region(5, MiB, 0)),
        # Overlaps (EEXIST), an identical re-set (no-op), move, flags-only, delete.
        (region(0, 0, 2 * MiB), region(1, MiB, 2 * MiB, uaddr=("mem", 2 * MiB)),
         region(1, 2 * MiB, 2 * MiB, uaddr=("mem", 2 * MiB)), region(0, 0, 2 * MiB),
         region(0, 0, 4 * MiB), region(0, 0, 2 * MiB, uaddr=("mem", 4096)),
         region(0, 8 * MiB, 2 * MiB), region(0, 8 * MiB, 2 * MiB, LOG),
         region(0, 8 * MiB, 2 * MiB, RO), region(0, 8 * MiB, 0), region(0, 8 * MiB, 0)),
        # Alignment and access_ok().
        (region(0, 1, 4096), region(0, 0, 4097), region(0, 0, 4096, uaddr=("mem", 1)),
         region(0, 0, 4096, uaddr=("raw", TASK_SIZE_MAX - 4096)),
         region(0, 0, 8192, uaddr=("raw", TASK_SIZE_MAX - 4096)),
         region(0, U64 - 4096, 4096), region(0, U64 - 8192, 4096)),
        # Slot ids and address spaces.
        (region(32763, 0, 4096), region(32764, MiB, 4096), region(0x7FFF, MiB, 4096),
         region(1 << 16, 0, 4096), region((1 << 16) | 1, 0, 4096), region(0xFFFFFFFF, 0, 4096)),
        # test_invalid_guest_memfd / test_add_overlapping_private_memory_regions.
        (("create_gmem", 4 * MiB, 0), region2(0, 0, 2 * MiB, GMEM, gmem="none"),
         region2(0, 0, 2 * MiB, GMEM, gmem="vmfd"), region2(0, 0, 2 * MiB, GMEM, gmem=0,
                                                            gmem_off=1),
         region2(0, 0, 2 * MiB, GMEM, gmem=0, gmem_off=4 * MiB),
         region2(0, 0, 2 * MiB, GMEM, gmem=0, gmem_off=3 * MiB),
         region2(0, 0, 2 * MiB, GMEM, gmem=0), region2(1, 2 * MiB, 2 * MiB, GMEM, gmem=0),
         region2(1, 2 * MiB, 2 * MiB, GMEM, gmem=0, gmem_off=2 * MiB),
         region2(0, 0, 2 * MiB, GMEM | LOG, gmem=0), region2(2, 8 * MiB, 2 * MiB, GMEM | RO,
                                                             gmem=0),
         region2(0, 4 * MiB, 2 * MiB, GMEM, gmem=0), region2(0, 0, 0),
         region2(0, 0, 2 * MiB, GMEM, gmem=0)),
        # v1 cannot bind guest_memfd.
        (("create_gmem", 2 * MiB, 0), region(0, 0, 2 * MiB, GMEM)),
        # Memory attributes (KVM_SET_MEMORY_ATTRIBUTES).
        (("set_attributes", 0, 4096, 0, 0), ("set_attributes", 0, 4096,
                                              KVM_MEMORY_ATTRIBUTE_PRIVATE, 0),
         ("set_attributes", 0, 4096, 0, 1), ("set_attributes", 1, 4096, 0, 0)),
    ]
    return seqs


def _guest_memfd_test():
    """guest_memfd_test: create with bad sizes and flags, fallocate modes and ranges."""
    gm = GUEST_MEMFD_FLAG_MMAP
    shared = GUEST_MEMFD_FLAG_INIT_SHARED
    return [
        (("create_gmem", 0, 0), ("create_gmem", 4097, 0), ("create_gmem", 1, 0),
         ("create_gmem", 4096, 1 << 2), ("create_gmem", 4096, 1 << 63),
         ("create_gmem", 4096, gm), ("create_gmem", 4096, gm | shared),
         ("create_gmem", 4096, shared), ("create_gmem", U64 - 4096, 0)),
        (("create_gmem", 4 * MiB, 0), ("fallocate", 0, 0, 0, 4096),
         ("fallocate", 0, KEEP, 0, 4096), ("fallocate", 0, KEEP, 0, 4 * MiB),
         ("fallocate", 0, KEEP, 4 * MiB - 4096, 8192), ("fallocate", 0, KEEP, 1, 4096),
         ("fallocate", 0, KEEP, 0, 1), ("fallocate", 0, KEEP | PUNCH, 0, 4096),
         ("fallocate", 0, PUNCH, 0, 4096), ("fallocate", 0, KEEP | PUNCH, 4 * MiB, 4096),
         ("fallocate", 0, KEEP | PUNCH, 0, 8 * MiB), ("fallocate", 0, KEEP | 0x8, 0, 4096),
         ("fallocate", 0, KEEP, 0, 0)),
        # test_create_guest_memfd_multiple.
        (("create_gmem", 4096, 0), ("create_gmem", 8192, 0),
         region2(0, 0, 4096, GMEM, gmem=0), region2(1, 4096, 8192, GMEM, gmem=1),
         ("fallocate", 1, KEEP | PUNCH, 0, 8192)),
    ]


def _dirty_log_test():
    """dirty_log_test's ioctl paths: manual protect with INITIALLY_SET, GET/CLEAR, the ring
    (and that GET_DIRTY_LOG is ENXIO with it), the ring after vCPUs exist."""
    mp2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    ring = KVM_CAP_DIRTY_LOG_RING
    return [
        (("enable_cap", mp2, MANUAL | INIT_SET, 0), region(0, 0, 512 * KiB, LOG),
         ("get_dirty_log", 0), ("clear_dirty_log", 0, 0, 64, (0, 1, 5, 63)),
         ("get_dirty_log", 0), ("clear_dirty_log", 0, 0, 128, tuple(range(64, 128))),
         ("get_dirty_log", 0), ("clear_dirty_log", 0, 1, 64, ()),
         ("clear_dirty_log", 0, 64, 63, ()), ("clear_dirty_log", 0, 64, 64, ()),
         ("clear_dirty_log", 0, 0, 129, ()), ("clear_dirty_log", 0, 64, 64, ()),
         ("clear_dirty_log", 1, 0, 64, ()), ("get_dirty_log", 1), ("get_dirty_log", 1 << 16),
         region(0, 0, 512 * KiB, 0), ("get_dirty_log", 0)),
        (region(0, 0, 512 * KiB, LOG), ("get_dirty_log", 0),
         ("clear_dirty_log", 0, 0, 64, (3,)), ("enable_cap", mp2, MANUAL, 0),
         ("enable_cap", mp2, INIT_SET, 0), ("enable_cap", mp2, 4, 0),
         ("enable_cap", mp2, MANUAL, 1), ("enable_cap", mp2, 0, 0)),
        (("enable_cap", ring, 65536, 0), region(0, 0, 512 * KiB, LOG), ("get_dirty_log", 0),
         ("clear_dirty_log", 0, 0, 64, ()), ("enable_cap", ring, 65536, 0),
         ("create_vcpu", 0), ("reset_dirty_rings",),
         ("enable_cap", KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1, 0)),
        (("reset_dirty_rings",), ("enable_cap", ring, 0, 0), ("enable_cap", ring, 4096 + 16, 0),
         ("enable_cap", ring, 512, 0), ("enable_cap", ring, 2 * MiB, 0),
         ("enable_cap", KVM_CAP_DIRTY_LOG_RING_ACQ_REL, (1 << 32) + 65536, 0),
         ("create_vcpu", 0), ("enable_cap", ring, 65536, 0), ("create_vcpu", 0),
         ("create_vcpu", 4096), ("create_vcpu", 1)),
        (("create_vcpu", 0), ("pre_fault", 0, 0, 4096, 1), ("pre_fault", 0, 1, 4096, 0),
         ("pre_fault", 0, 0, 0, 0), region(0, 0, 2 * MiB), ("pre_fault", 0, 0, 4096, 0),
         ("pre_fault", 0, 0, 4096, 0)),
    ]


def hand_corpus() -> list[tuple]:
    """Every hand-written sequence, with the profile's KVM_CHECK_EXTENSION questions first."""
    caps = (tuple(("check_extension", cap_number(n)) for n in PROFILE_CAPS)
            + (("check_extension", 100000), ("check_extension", 4096)),)
    return [*caps, *_set_memory_region_test(), *_guest_memfd_test(), *_dirty_log_test()]


def sequences(max_calls: int = 12):
    """A hypothesis strategy of runnable call sequences."""
    from hypothesis import strategies as st

    slot = st.sampled_from([0, 1, 2, 7, 32763, 32764, 1 << 16, (1 << 16) | 1])
    flags = st.sampled_from([0, LOG, RO, LOG | RO, GMEM, GMEM | LOG, GMEM | RO, 8, 1 << 16])
    gpa = st.sampled_from([0, 4096, MiB, 2 * MiB, 1 << 30, 1, U64 - 4096, 1 << 52])
    size = st.sampled_from([0, 4096, 64 * KiB, 2 * MiB, 4097, 1 << 26, U64 - 4096])
    uaddr = st.sampled_from([MEM0, ("mem", 4096), ("mem", 1), ("mem", 2 * MiB),
                             ("raw", TASK_SIZE_MAX - 4096), ("raw", 4096), ("raw", 1 << 63)])
    gmem_ref = st.sampled_from([0, 1, "none", "vmfd"])
    gmem_off = st.sampled_from([0, 4096, 2 * MiB, 1, U64 - 4096])
    gsize = st.sampled_from([0, 4096, 2 * MiB, 4 * MiB, 4097, 1 << 40, 1 << 63])
    gflags = st.sampled_from([0, 1, 2, 3, 4, 1 << 63])
    fmode = st.sampled_from([0, KEEP, PUNCH, KEEP | PUNCH, KEEP | 0x8, 0x10])
    foff = st.sampled_from([0, 4096, 2 * MiB, 4 * MiB, 1, 1 << 40])
    flen = st.sampled_from([0, 4096, 2 * MiB, 1, 8 * MiB])
    caps = st.sampled_from([cap_number(n) for n in PROFILE_CAPS] + [100000, 4096])
    ecap = st.sampled_from([KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING,
                            KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                            9999])
    earg = st.sampled_from([0, 1, 2, 3, 4, 4096, 65536, 1 << 20, 1 << 21, 3 << 12,
                            (1 << 32) + 65536])
    small = st.sampled_from([0, 1])
    log_slot = st.sampled_from([0, 1, 7, 1 << 16, 40000])
    first = st.sampled_from([0, 64, 1, 128, 16384])
    npages = st.sampled_from([0, 1, 64, 63, 128, 16, 16384])
    pages = st.lists(st.integers(0, 63), max_size=4).map(lambda xs: tuple(sorted(set(xs))))

    def clear(args):
        s, f, n, rel = args
        return ("clear_dirty_log", s, f, n, tuple(f + r for r in rel if r < n))

    call = st.one_of(
        st.tuples(st.just("check_extension"), caps),
        st.tuples(st.just("set_region"), slot, flags, gpa, size, uaddr),
        st.tuples(st.just("set_region2"), slot, flags, gpa, size, uaddr, gmem_ref, gmem_off),
        st.tuples(st.just("create_gmem"), gsize, gflags),
        st.tuples(st.just("fallocate"), small, fmode, foff, flen),
        st.tuples(st.just("set_attributes"), gpa, size,
                  st.sampled_from([0, KVM_MEMORY_ATTRIBUTE_PRIVATE, 1]), small),
        st.tuples(st.just("enable_cap"), ecap, earg, small),
        st.tuples(st.just("get_dirty_log"), log_slot),
        st.tuples(log_slot, first, npages, pages).map(clear),
        st.tuples(st.just("create_vcpu"), st.sampled_from([0, 1, 4095, 4096])),
        st.tuples(st.just("pre_fault"), small, gpa, size, small),
        st.just(("reset_dirty_rings",)),
    )
    return st.lists(call, min_size=1, max_size=max_calls).map(tuple).filter(runnable)


def runnable(seq) -> bool:
    """Whether a sequence only refers to guest_memfds / vCPUs it created (both sides would
    otherwise fail in the harness, not in KVM) and stays within the vCPU budget."""
    gmems = vcpus = 0
    for call in seq:
        op = call[0]
        if op == "fallocate" and call[1] >= gmems:
            return False
        if op == "pre_fault" and call[1] >= vcpus:
            return False
        if op == "create_gmem":
            gmems += 1
        if op == "create_vcpu":
            vcpus += 1
            if vcpus > MAX_VCPUS_PER_SEQUENCE:
                return False
    return True
