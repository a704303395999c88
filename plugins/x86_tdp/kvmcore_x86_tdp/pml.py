"""Page-modification logging (arch/x86/kvm/vmx/vmx.c, vmx/main.c).

Each vCPU has a 512-entry buffer of GPAs that the CPU fills backwards from index 511
(PML_HEAD_INDEX) whenever it sets a D bit in a leaf of a root with A/D enabled. When the
index leaves the buffer the next logging attempt causes EXIT_REASON_PML_FULL instead, and
KVM drains the buffer into the dirty bitmap / ring (vmx_flush_pml_buffer) and resets the
index. KVM also drains on every VM exit and before reading dirty logs (kvm_arch_sync_dirty_log);
the model drains when full and in ``sync_dirty_log``.
"""

from __future__ import annotations

from array import array

PML_LOG_NR_ENTRIES = 512
PML_HEAD_INDEX = PML_LOG_NR_ENTRIES - 1


class PmlBuffer:
    __slots__ = ("gpas", "index")

    def __init__(self):
        self.gpas = array("Q", bytes(8 * PML_LOG_NR_ENTRIES))
        self.index = PML_HEAD_INDEX

    @property
    def full(self) -> bool:
        """The guest PML index wrapped below 0 (hardware stores it in 16 bits)."""
        return self.index < 0

    def __len__(self) -> int:
        return PML_HEAD_INDEX - self.index

    def log(self, gpa: int) -> None:
        self.gpas[self.index] = gpa & ~0xFFF
        self.index -= 1

    def pending_gfns(self) -> list[int]:
        """The logged gfns, without draining."""
        return [self.gpas[i] >> 12 for i in range(PML_HEAD_INDEX, self.index, -1)]

    def drain(self) -> list[int]:
        """The logged GPAs in the order they were written; resets the index."""
        out = [self.gpas[i] for i in range(PML_HEAD_INDEX, self.index, -1)]
        self.index = PML_HEAD_INDEX
        return out


def vmx_flush_pml_buffer(vm, vcpu, buf: PmlBuffer) -> int:
    """Mark every logged gfn dirty in its slot as ``vcpu`` (kvm_vcpu_mark_page_dirty: with
    dirty rings the entries go to that vCPU's ring, also when the drain happens outside
    KVM_RUN, e.g. in sync_dirty_log); returns how many."""
    gpas = buf.drain()
    as_id = vcpu.as_id  # kvm_vcpu_gfn_to_memslot: the vCPU's address space now
    for gpa in gpas:
        gfn = gpa >> 12
        slot = vm.gfn_to_memslot(gfn, as_id)
        if slot is not None:
            vm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    vm.stats["x86_tdp.pml_drained"] += len(gpas)
    return len(gpas)
