"""Bad input to every public call (docs/api.md, "Arguments"): a wrong Python type is a TypeError
naming the argument, a wrong value of the right type Linux's errno; both change nothing. And a
closed VM: every ioctl-shaped call of it, its vCPUs and its files is EBADF and changes nothing;
close leaves no leaf on any backend."""

from __future__ import annotations

from errno import EBADF, EINVAL, ENOTTY

import pytest

from kvmcore import KvmError
from kvmcore.conformance.helpers import pattern, snapshot
from kvmcore.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEM_LOG_DIRTY_PAGES
from kvmcore.vm import MAX_ACCESS, MAX_GPA

GPA = 0x10_0000
NPAGES = 8


class Ctx:
    """A populated VM: slot 0 (dirty-logged where the arch logs) with written pages, slot 1,
    a guest_memfd where the VM type has one."""

    def __init__(self, guest):
        self.guest, self.vm, self.host = guest, guest.vm, guest.host
        page = self.page = self.vm.page_size
        caps = self.vm.capabilities
        flags = KVM_MEM_LOG_DIRTY_PAGES if "dirty_log" in caps else 0
        self.hva = guest.slot(0, GPA, NPAGES * page, flags)
        guest.slot(1, GPA + 2 * NPAGES * page, NPAGES * page)
        self.vcpu = guest.vcpu
        for i in range(0, NPAGES, 2):
            self.vcpu.write(GPA + i * page, pattern(i), private=False)
        self.gmem = guest.new_gmem(4 * page) if "gmem" in caps else None


@pytest.fixture
def ctx(guest):
    return Ctx(guest)


P = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

#: (id, capability the call needs or None, call(ctx), the argument a TypeError names)
WRONG_TYPES = [
    ("slot", None, lambda c: c.vm.set_user_memory_region("0", 0, c.page, c.hva), "slot"),
    ("gpa-float", None, lambda c: c.vm.set_user_memory_region(5, 1.0, c.page, c.hva),
     "guest_phys_addr"),
    ("memsize-none", None, lambda c: c.vm.set_user_memory_region(5, 0, None, c.hva),
     "memory_size"),
    ("uaddr-str", None, lambda c: c.vm.set_user_memory_region(5, 0, c.page, "x"),
     "userspace_addr"),
    ("mem-flags-bool", None,
     lambda c: c.vm.set_user_memory_region(5, 0, c.page, c.hva, flags=True), "flags"),
    ("gmem-size", "gmem", lambda c: c.vm.create_guest_memfd(str(c.page)), "size"),
    ("gmem-flags", "gmem", lambda c: c.vm.create_guest_memfd(c.page, flags=None), "flags"),
    ("attr-address", "memory_attributes",
     lambda c: c.vm.set_memory_attributes("0", c.page, 0), "address"),
    ("attr-attributes", "memory_attributes",
     lambda c: c.vm.set_memory_attributes(GPA, c.page, True), "attributes"),
    ("get-attr-none", None, lambda c: c.vm.get_memory_attributes(None), "gfn"),
    ("initially-set", "manual_dirty_protect",
     lambda c: c.vm.enable_dirty_log_manual_protect(initially_set="no"), "initially_set"),
    ("manual-enable", "manual_dirty_protect",
     lambda c: c.vm.enable_dirty_log_manual_protect(enable=1), "enable"),
    ("get-log-slot", "dirty_log", lambda c: c.vm.get_dirty_log("0"), "slot"),
    ("clear-pages-none", "manual_dirty_protect",
     lambda c: c.vm.clear_dirty_log(0, 0, NPAGES, None), "pages"),
    ("clear-pages-str", "manual_dirty_protect",
     lambda c: c.vm.clear_dirty_log(0, 0, NPAGES, ["1"]), "pages"),
    ("clear-first", "manual_dirty_protect",
     lambda c: c.vm.clear_dirty_log(0, 0.0, NPAGES, []), "first_page"),
    ("ring-size", "dirty_ring", lambda c: c.vm.enable_dirty_ring("4096"), "size_bytes"),
    ("vcpu-id", None, lambda c: c.vm.create_vcpu("1"), "vcpu_id"),
    ("mappings-start", None, lambda c: list(c.vm.mappings(start_gpa="0")), "start_gpa"),
    ("lookup-gpa", None, lambda c: c.vm.lookup(None), "gpa"),
    ("lookup-private", None, lambda c: c.vm.lookup(GPA, private="yes"), "private"),
    ("memslots-as-id", None, lambda c: c.vm.memslots("0"), "as_id"),
    ("op-start", None, lambda c: c.vm.hva_range_op("0", 1, lambda v, r: 0), "hva_start"),
    ("op-handler", None, lambda c: c.vm.hva_range_op(0, 1, None), "handler"),
    ("write-int", None, lambda c: c.vcpu.write(GPA, 3), "data"),
    ("write-huge-int", None, lambda c: c.vcpu.write(GPA, 1 << 40), "data"),
    ("write-str", None, lambda c: c.vcpu.write(GPA, "abc"), "data"),
    ("read-n", None, lambda c: c.vcpu.read(GPA, "8"), "n"),
    ("read-gpa", None, lambda c: c.vcpu.read(float(GPA), 8), "gpa"),
    ("read-private", None, lambda c: c.vcpu.read(GPA, 8, private="yes"), "private"),
    ("write-private", None, lambda c: c.vcpu.write(GPA, b"x", private=1), "private"),
    ("fetch-n", None, lambda c: c.vcpu.fetch(GPA, n=None), "n"),
    ("step-gpa", None, lambda c: next(c.vcpu.step_access("read", "0", 8)), "gpa"),
    ("smm", None, lambda c: c.vcpu.set_vcpu_events(smm="yes"), "smm"),
    ("pre-fault-gpa", "pre_fault", lambda c: c.vcpu.pre_fault_memory("0", c.page), "gpa"),
    ("pre-fault-flags", "pre_fault",
     lambda c: c.vcpu.pre_fault_memory(GPA, c.page, flags=True), "flags"),
    ("mmap-length", None, lambda c: c.host.mmap(str(c.page)), "length"),
    ("mmap-prot", None, lambda c: c.host.mmap(c.page, prot=7), "prot"),
    ("mmap-kind", None, lambda c: c.host.mmap(c.page, kind=None), "kind"),
    ("mmap-thp", None, lambda c: c.host.mmap(c.page, thp="yes"), "thp"),
    ("munmap-length", None, lambda c: c.host.munmap(c.hva, str(c.page)), "length"),
    ("mprotect-prot", None, lambda c: c.host.mprotect(c.hva, c.page, 1), "prot"),
    ("dontneed-hva", None, lambda c: c.host.madvise_dontneed(None, c.page), "hva"),
    ("migrate-float", None, lambda c: c.host.migrate(1.5), "hva"),
    ("migrate-str", None, lambda c: c.host.migrate("x"), "hva"),
    ("poison-none", None, lambda c: c.host.poison(None), "hva"),
    ("split-str", None, lambda c: c.host.split_huge_page("x"), "hva"),
    ("collapse-float", None, lambda c: c.host.collapse_huge_page(1.5), "hva"),
    ("memory-failure", None, lambda c: c.host.memory_failure("1"), "pfn"),
    ("host-read-n", None, lambda c: c.host.read(c.hva, "8"), "n"),
    ("host-write-int", None, lambda c: c.host.write(c.hva, 3), "data"),
    ("age-flush", None, lambda c: c.host.age(c.hva, c.page, flush="no"), "flush"),
    ("fallocate-mode", "gmem", lambda c: c.gmem.fallocate("3", 0, c.page), "mode"),
    ("fallocate-offset", "gmem", lambda c: c.gmem.fallocate(P, None, c.page), "offset"),
]

#: (id, capability or None, call(ctx), errno)
WRONG_VALUES = [
    ("slot-neg", None, lambda c: c.vm.set_user_memory_region(-1, 0, c.page, c.hva), EINVAL),
    ("slot-u32", None, lambda c: c.vm.set_user_memory_region(1 << 32, 0, c.page, c.hva),
     EINVAL),
    ("gpa-neg", None, lambda c: c.vm.set_user_memory_region(5, -c.page, c.page, c.hva),
     EINVAL),
    ("size-u64", None, lambda c: c.vm.set_user_memory_region(5, 0, 1 << 64, c.hva), EINVAL),
    ("mem-flags-u32", None,
     lambda c: c.vm.set_user_memory_region(5, 0, c.page, c.hva, flags=1 << 32), EINVAL),
    ("gmem-size-neg", "gmem", lambda c: c.vm.create_guest_memfd(-c.page), EINVAL),
    ("attr-size-neg", "memory_attributes",
     lambda c: c.vm.set_memory_attributes(GPA, -c.page, 0), EINVAL),
    ("get-attr-neg", None, lambda c: c.vm.get_memory_attributes(-1), EINVAL),
    ("get-attr-u64", None, lambda c: c.vm.get_memory_attributes(1 << 64), EINVAL),
    ("get-log-neg", "dirty_log", lambda c: c.vm.get_dirty_log(-1), EINVAL),
    ("get-log-u32", "dirty_log", lambda c: c.vm.get_dirty_log(1 << 32), EINVAL),
    ("clear-num-u32", "manual_dirty_protect",
     lambda c: c.vm.clear_dirty_log(0, 0, 1 << 32, []), EINVAL),
    ("clear-page-neg", "manual_dirty_protect",
     lambda c: c.vm.clear_dirty_log(0, 0, NPAGES, [-1]), EINVAL),
    ("vcpu-id-neg", None, lambda c: c.vm.create_vcpu(-1), EINVAL),
    ("memslots-neg", None, lambda c: c.vm.memslots(-1), EINVAL),
    ("memslots-high", None, lambda c: c.vm.memslots(5), EINVAL),
    ("op-reversed", None, lambda c: c.vm.hva_range_op(c.hva + 1, c.hva, lambda v, r: 0),
     EINVAL),
    ("op-neg", None, lambda c: c.vm.hva_range_op(-1, c.hva, lambda v, r: 0), EINVAL),
    ("read-zero", None, lambda c: c.vcpu.read(GPA, 0), EINVAL),
    ("read-neg", None, lambda c: c.vcpu.read(GPA, -1), EINVAL),
    ("read-huge", None, lambda c: c.vcpu.read(GPA, MAX_ACCESS + 1), EINVAL),
    ("read-past-max-gpa", None, lambda c: c.vcpu.read(MAX_GPA - 4, 8), EINVAL),
    ("read-gpa-neg", None, lambda c: c.vcpu.read(-1, 8), EINVAL),
    ("write-empty", None, lambda c: c.vcpu.write(GPA, b""), EINVAL),
    ("pre-fault-neg", "pre_fault", lambda c: c.vcpu.pre_fault_memory(GPA, -c.page), EINVAL),
    ("pre-fault-u64", "pre_fault",
     lambda c: c.vcpu.pre_fault_memory(1 << 64, c.page), EINVAL),
    ("mmap-zero", None, lambda c: c.host.mmap(0), EINVAL),
    ("mmap-neg", None, lambda c: c.host.mmap(-c.page), EINVAL),
    ("munmap-neg", None, lambda c: c.host.munmap(-c.page, c.page), EINVAL),
    ("munmap-zero", None, lambda c: c.host.munmap(c.hva, 0), EINVAL),
    ("mprotect-bad", None, lambda c: c.host.mprotect(c.hva, c.page, "q"), EINVAL),
    ("migrate-neg", None, lambda c: c.host.migrate(-1), EINVAL),
    ("memory-failure-neg", None, lambda c: c.host.memory_failure(-1), EINVAL),
    ("host-read-neg", None, lambda c: c.host.read(c.hva, -1), EINVAL),
    ("fallocate-neg", "gmem", lambda c: c.gmem.fallocate(P, -c.page, c.page), EINVAL),
    ("fallocate-zero", "gmem", lambda c: c.gmem.fallocate(P, 0, 0), EINVAL),
    ("fallocate-loff", "gmem", lambda c: c.gmem.fallocate(P, 1 << 63, c.page), EINVAL),
]


def _needs(c: Ctx, cap: str | None) -> None:
    if cap is not None and cap not in c.vm.capabilities:
        pytest.skip(f"the VM does not claim {cap}")


@pytest.mark.parametrize("cap, call, name", [case[1:] for case in WRONG_TYPES],
                         ids=[case[0] for case in WRONG_TYPES])
def test_wrong_type_is_type_error_naming_it(ctx, cap, call, name):
    _needs(ctx, cap)
    before = snapshot(ctx.vm)
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call(ctx)
    assert snapshot(ctx.vm) == before


@pytest.mark.parametrize("cap, call, err", [case[1:] for case in WRONG_VALUES],
                         ids=[case[0] for case in WRONG_VALUES])
def test_wrong_value_is_linux_errno(ctx, cap, call, err):
    _needs(ctx, cap)
    before = snapshot(ctx.vm)
    with pytest.raises(KvmError) as info:
        call(ctx)
    assert info.value.errno == err, str(info.value)
    assert snapshot(ctx.vm) == before


def test_boundary_values_that_are_valid(ctx):
    """The top of each range is accepted: the largest gfn has no attributes, as_id
    nr_address_spaces - 1 is an address space, a read of a whole slot works."""
    vm = ctx.vm
    assert vm.get_memory_attributes((1 << 64) - 1) == 0
    assert vm.memslots(vm.nr_address_spaces - 1) is not None
    assert ctx.vcpu.read(GPA, NPAGES * ctx.page, private=False)[:8] == pattern(0)
    assert vm.hva_range_op(ctx.hva, ctx.hva, lambda v, r: -EINVAL) == 0


def test_clear_dirty_log_is_enotty_before_reading_pages(ctx):
    """Where the arch has no KVM_CLEAR_DIRTY_LOG (ppc) the ioctl is ENOTTY whatever its
    arguments: ``pages`` is not even read."""
    if "manual_dirty_protect" in ctx.vm.arch_capabilities:
        pytest.skip("the arch has KVM_CLEAR_DIRTY_LOG")
    before = snapshot(ctx.vm)
    with pytest.raises(KvmError) as info:
        ctx.vm.clear_dirty_log(0, 0, NPAGES, None)
    assert info.value.errno == ENOTTY
    assert snapshot(ctx.vm) == before


# --------------------------------------------------------------------------- closed VM

CLOSED_CALLS = [
    ("set_user_memory_region", lambda c: c.vm.set_user_memory_region(5, 0, c.page, c.hva)),
    ("create_guest_memfd", lambda c: c.vm.create_guest_memfd(c.page)),
    ("set_memory_attributes", lambda c: c.vm.set_memory_attributes(GPA, c.page, 0)),
    ("enable_dirty_log_manual_protect", lambda c: c.vm.enable_dirty_log_manual_protect()),
    ("get_dirty_log", lambda c: c.vm.get_dirty_log(0)),
    ("clear_dirty_log", lambda c: c.vm.clear_dirty_log(0, 0, NPAGES, [0])),
    ("enable_dirty_ring", lambda c: c.vm.enable_dirty_ring(1 << 16)),
    ("reset_dirty_rings", lambda c: c.vm.reset_dirty_rings()),
    ("create_vcpu", lambda c: c.vm.create_vcpu(1)),
    ("hva_range_op", lambda c: c.vm.hva_range_op(c.hva, c.hva + c.page, lambda v, r: 0)),
    ("read", lambda c: c.vcpu.read(GPA, 8)),
    ("write", lambda c: c.vcpu.write(GPA, b"x")),
    ("fetch", lambda c: c.vcpu.fetch(GPA)),
    ("step_access", lambda c: next(c.vcpu.step_access("read", GPA, 8))),
    ("set_vcpu_events", lambda c: c.vcpu.set_vcpu_events(smm=False)),
    ("pre_fault_memory", lambda c: c.vcpu.pre_fault_memory(GPA, c.page)),
    ("harvest_dirty_ring", lambda c: c.vcpu.harvest_dirty_ring()),
]


@pytest.mark.parametrize("call", [c[1] for c in CLOSED_CALLS], ids=[c[0] for c in CLOSED_CALLS])
def test_closed_vm_refuses_everything(ctx, call):
    """Linux's fd is gone: EBADF, before any other check, and nothing changes. x86's
    pre_fault_memory used to install a leaf here; get_dirty_log returned the bitmap."""
    ctx.vm.close()
    before = snapshot(ctx.vm)
    with pytest.raises(KvmError) as info:
        call(ctx)
    assert info.value.errno == EBADF, str(info.value)
    assert snapshot(ctx.vm) == before


@pytest.mark.requires("dirty_ring")
@pytest.mark.parametrize("call", ["reset", "harvest"])
def test_closed_vm_dirty_ring_calls_are_ebadf(guest, call):
    """With the ring enabled, its calls on a closed VM are EBADF (they were EINVAL)."""
    guest.vm.enable_dirty_ring(1 << 16)
    guest.slot(0, GPA, NPAGES * guest.vm.page_size, KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = guest.vcpu
    vcpu.write(GPA, b"x", private=False)
    guest.vm.close()
    before = snapshot(guest.vm)
    with pytest.raises(KvmError) as info:
        guest.vm.reset_dirty_rings() if call == "reset" else vcpu.harvest_dirty_ring()
    assert info.value.errno == EBADF
    assert snapshot(guest.vm) == before


def test_closed_guest_memfd_is_ebadf(ctx):
    _needs(ctx, "gmem")
    ctx.vm.close()
    for call in (lambda: ctx.gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, ctx.page), ctx.gmem.mmap):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == EBADF


def test_close_leaves_no_leaf(ctx):
    """kvm_destroy_vm: the notifier's release (kvm_arch_flush_shadow_all, empty on ppc) and
    then kvm_arch_destroy_vm (ppc: kvmppc_free_radix) leave no mapping on any backend."""
    assert list(ctx.vm.mappings())
    ctx.vm.close()
    for as_id in range(ctx.vm.nr_address_spaces):
        assert list(ctx.vm.mappings(as_id=as_id)) == []
    ctx.vm.close()  # a second close does nothing
