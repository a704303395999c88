"""Self-test of the model: a backend that zaps without asking for the remote TLB flush is
caught.

``NoFlushOnZap`` is the flat backend with one bug: its ``unmap_gfn_range`` zaps the leaves
but reports that no flush is needed (what kvm_unmap_gfn_range's return value tells the core).
vCPU TLB entries are state, kept until a flush: so after the host drops a page, a vCPU still
reads the freed page's old contents through its stale entry, and ``check_invariants`` reports
the entry that no leaf backs. The correct flat backend reads the new page. This test runs
once, on the flat backend, whatever ``--arch`` says.
"""

from __future__ import annotations

import pytest

from kvmcore import VM, HostMemory, InvariantError, hookimpl
from kvmcore.testing import FlatBackend


class NoFlushOnZap(FlatBackend):
    """FlatBackend that never asks for the TLB flush its zaps need."""

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        super().unmap_gfn_range(vm, range)
        return False


def _guest(backend):
    host = HostMemory()
    vm = VM(arch=backend, host=host)
    hva = host.mmap(1 << 20)
    vm.set_user_memory_region(0, 0, 1 << 20, hva)
    vcpu = vm.create_vcpu(0)
    vcpu.write(0x3000, b"secret")
    host.madvise_dontneed(hva + 0x3000, 0x1000)          # the page is freed
    return vm, vcpu


def test_the_correct_backend_reads_the_new_page():
    vm, vcpu = _guest(FlatBackend)
    assert vcpu.read(0x3000, 6) == bytes(6)
    vm.check_invariants()


def test_a_zap_without_its_flush_leaves_a_vcpu_reading_stale_data():
    vm, vcpu = _guest(NoFlushOnZap)
    with pytest.raises(InvariantError, match="TLB entry gfn 0x3 .* no present leaf"):
        vm.check_invariants()
    assert vcpu.read(0x3000, 6) == b"secret"            # through the stale TLB entry
