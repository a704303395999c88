"""vCPU exits: why a guest access did not complete.

Each exit is raised by ``Vcpu.read/write/fetch`` the way KVM_RUN returns to userspace with
``kvm_run->exit_reason`` filled in. They are exceptions so that an access either completes or
says exactly why it stopped.
"""

from __future__ import annotations

import errno

from .errors import EHWPOISON
from .uapi import (
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
)


class VcpuExit(Exception):
    """Base of every exit. ``exit_reason`` is KVM's KVM_EXIT_* number (0 when the exit is not
    a kvm_run exit but a signal or an exception injected into the guest)."""

    exit_reason: int = 0
    #: errno that KVM_RUN returns with this exit (0: KVM_RUN returned 0).
    errno: int = 0

    def fields(self) -> dict:
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                          else f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}({inner})"

    __str__ = __repr__


class MemoryFaultExit(VcpuExit):
    """KVM_EXIT_MEMORY_FAULT (kvm_prepare_memory_fault_exit): KVM_RUN returns -1 with errno
    EFAULT, or EHWPOISON for poisoned guest_memfd memory. ``flags`` holds only
    KVM_MEMORY_EXIT_FLAG_PRIVATE; ``[gpa, gpa + size)`` is the faulting range."""

    exit_reason = KVM_EXIT_MEMORY_FAULT

    def __init__(self, flags: int, gpa: int, size: int, err: int = errno.EFAULT):
        super().__init__()
        self.flags, self.gpa, self.size, self.errno = flags, gpa, size, err

    @property
    def private(self) -> bool:
        return bool(self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)

    def fields(self) -> dict:
        return {"flags": self.flags, "gpa": self.gpa, "size": self.size, "errno": self.errno}


class MmioExit(VcpuExit):
    """KVM_EXIT_MMIO: no memslot covers the address, or a write hit a read-only memslot.
    ``data`` is what the guest wrote (writes) or ``None`` (reads: userspace supplies it)."""

    exit_reason = KVM_EXIT_MMIO

    def __init__(self, phys_addr: int, length: int, is_write: bool, data: bytes | None = None):
        super().__init__()
        self.phys_addr, self.length, self.is_write, self.data = phys_addr, length, is_write, data

    def fields(self) -> dict:
        return {"phys_addr": self.phys_addr, "length": self.length, "is_write": self.is_write,
                "data": self.data}


class DirtyRingFullExit(VcpuExit):
    """KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring reached its soft limit
    (kvm_dirty_ring_check_request); the vCPU cannot run until KVM_RESET_DIRTY_RINGS."""

    exit_reason = KVM_EXIT_DIRTY_RING_FULL


class HwPoisonSignal(VcpuExit):
    """SIGBUS (BUS_MCEERR_AR) sent to the vCPU thread for poisoned host memory
    (kvm_send_hwpoison_signal). The model raises it where the vCPU thread would take the signal."""

    errno = EHWPOISON

    def __init__(self, hva: int, lsb: int):
        super().__init__()
        self.hva, self.lsb = hva, lsb

    def fields(self) -> dict:
        return {"hva": self.hva, "lsb": self.lsb}


class GuestAbort(VcpuExit):
    """Not a userspace exit: KVM injected an exception into the guest instead of completing the
    access (arm64: an instruction abort for execution from device memory or from no memslot;
    an external abort for an IPA beyond the VM's IPA size). ``kind`` names it."""

    def __init__(self, kind: str, gpa: int):
        super().__init__()
        self.kind, self.gpa = kind, gpa

    def fields(self) -> dict:
        return {"kind": self.kind, "gpa": self.gpa}


def memory_fault_exit(vm, fault, err: int = errno.EFAULT) -> MemoryFaultExit:
    """kvm_mmu_prepare_memory_fault_exit: the faulting page (gfn << PAGE_SHIFT, PAGE_SIZE),
    i.e. the whole base page holding the 4 KiB gfn when PAGE_SIZE is larger."""
    flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
    size = vm.page_size
    return MemoryFaultExit(flags, (fault.gfn << PAGE_SHIFT) & ~(size - 1), size, err)
