"""Fuzzing the public surface: random sequences of calls with valid and invalid arguments
(wrong types, boundary values, closed VMs and files). Every failure is a KvmError with an errno
or a TypeError and leaves memslots, attributes, mappings and dirty logs as they were; guest
exits and host signals are results of accesses; ``check_invariants()`` holds after every
successful call. Anything else is a bug.

Budget: the ``ci`` hypothesis profile (the suite's default: 25 sequences per backend); run
``--hypothesis-profile=long`` for 1000 longer ones."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmcore import HostMemory, KvmError, VcpuExit
from kvmcore.conformance.helpers import snapshot
from kvmcore.host import SigBus, SigSegv
from kvmcore.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

GPA = 0x100_0000
NPAGES = 8
WRONG_TYPES = [None, "0", 1.5, True, b"\0"]


def ints(*good):
    """Good values, boundary values and wrong types."""
    return st.sampled_from(list(good) + [-1, 1 << 32, 1 << 64, (1 << 64) - 1]
                           + WRONG_TYPES)


class World:
    def __init__(self, vm, host):
        self.vm, self.host = vm, host
        self.page = page = vm.page_size
        self.hva = host.mmap(4 * NPAGES * page)
        self.vcpu = vm.create_vcpu(0)
        self.gmems = []


def _ops(w: World):
    page, hva, vm, vcpu, host = w.page, w.hva, w.vm, w.vcpu, w.host
    gpas = [GPA, GPA + page, GPA + NPAGES * page, 0, GPA + 3]
    slot = ints(0, 1, 2, 1 << 16)
    gpa = ints(*gpas)
    size = ints(page, NPAGES * page, 0)
    uaddr = ints(hva, hva + NPAGES * page, hva + 3)
    flags = ints(0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)
    gmem = st.sampled_from([None] + w.gmems) if w.gmems else st.just(None)
    return {
        "set_user_memory_region": (vm.set_user_memory_region, st.tuples(
            slot, gpa, size, uaddr, flags)),
        "set_memory_attributes": (vm.set_memory_attributes, st.tuples(
            gpa, size, ints(0, KVM_MEMORY_ATTRIBUTE_PRIVATE))),
        "get_memory_attributes": (vm.get_memory_attributes, st.tuples(ints(GPA >> 12))),
        "create_guest_memfd": (w_create_gmem(w), st.tuples(size, ints(0))),
        "fallocate": (w_fallocate, st.tuples(gmem, ints(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                                      FALLOC_FL_KEEP_SIZE), ints(0, page),
                                             size)),
        "enable_manual_protect": (vm.enable_dirty_log_manual_protect,
                                  st.tuples(st.sampled_from([False, True, "no", 1]))),
        "get_dirty_log": (vm.get_dirty_log, st.tuples(slot)),
        "clear_dirty_log": (vm.clear_dirty_log, st.tuples(
            slot, ints(0, 64), ints(NPAGES, 64),
            st.one_of(st.lists(ints(0, 1, 7), max_size=3), st.sampled_from(WRONG_TYPES)))),
        "reset_dirty_rings": (vm.reset_dirty_rings, st.tuples()),
        "read": (vcpu.read, st.tuples(gpa, ints(1, 8, page + 8))),
        "write": (vcpu.write, st.tuples(gpa, st.one_of(
            st.binary(min_size=0, max_size=16), ints(3)))),
        "fetch": (vcpu.fetch, st.tuples(gpa)),
        "pre_fault_memory": (vcpu.pre_fault_memory, st.tuples(gpa, size)),
        "hva_range_op": (vm.hva_range_op, st.tuples(
            uaddr, uaddr, st.sampled_from([lambda v, r: 0, lambda v, r: -16, None]))),
        "munmap": (host.munmap, st.tuples(uaddr, size)),
        "madvise_dontneed": (host.madvise_dontneed, st.tuples(uaddr, size)),
        "migrate": (host.migrate, st.tuples(uaddr)),
        "host_write": (host.write, st.tuples(uaddr, st.one_of(st.binary(max_size=8),
                                                              ints(3)))),
        "close_gmem": (lambda g: g.close() if g is not None else None, st.tuples(gmem)),
        "close": (vm.close, st.tuples()),
    }


def w_create_gmem(w: World):
    def create(size, flags):
        g = w.vm.create_guest_memfd(size, flags)
        w.gmems.append(g)
        return g
    return create


def w_fallocate(gmem, mode, offset, length):
    if gmem is not None:
        gmem.fallocate(mode, offset, length)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_calls_fail_cleanly(make_vm, host, data):
    vm = make_vm(host=HostMemory(host.page_size, host.pmd_size))  # a fresh host per sequence
    w = World(vm, vm.host)
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        ops = _ops(w)
        name = data.draw(st.sampled_from(sorted(ops)), label="op")
        fn, args = ops[name]
        args = data.draw(args, label=name)
        before = snapshot(vm)
        try:
            fn(*args)
        except (VcpuExit, SigSegv, SigBus):
            continue  # results of an access: state may have changed as Linux's would
        except KvmError as e:
            assert isinstance(e.errno, int) and e.errno > 0, f"{name}{args!r}: {e!r}"
            assert snapshot(vm) == before, f"{name}{args!r} failed ({e}) and changed state"
            continue
        except TypeError as e:
            assert snapshot(vm) == before, f"{name}{args!r} failed ({e}) and changed state"
            continue
        vm.check_invariants()

