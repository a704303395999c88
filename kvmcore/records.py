"""The records that cross the hook boundary: a guest access, the hardware walk's answer, the
fault being handled (struct kvm_page_fault) and a gfn range (struct kvm_gfn_range).

Vocabulary only: these import nothing of the core's state or flows, so backends, the core and
tools share them without an import cycle.
"""

from __future__ import annotations

import attrs

from .uapi import KVM_FILTER_SHARED

# Violation kinds: how the hardware reports a failed walk.
NOT_PRESENT = "not_present"     # EPT violation on a non-present entry, stage-2 translation fault
PERMISSION = "permission"       # present leaf without the needed permission
ACCESS_FLAG = "access_flag"     # arm64 AF=0 / x86 access-tracked / Power R=0 (or C=0 on write)
MISCONFIG = "misconfig"         # x86 EPT misconfiguration (MMIO SPTE); RSVD in PFERR terms
VIOLATION_KINDS = (NOT_PRESENT, PERMISSION, ACCESS_FLAG, MISCONFIG)

READ, WRITE, FETCH = "read", "write", "fetch"


#: The hot records (a fault builds two or three): slotted attrs classes with a plain
#: ``__init__`` (a frozen one costs three times as much per instance). Treat them as
#: immutable; they compare and hash by their fields.
record = attrs.define(slots=True, unsafe_hash=True)


@record
class Access:
    """One guest access: ``kind`` is read, write or fetch; ``private`` the explicit private
    intent (SNP C-bit, TDX alias) or None for "as the VM type decides". ``write`` and
    ``exec`` say which kind it is."""

    kind: str
    private: bool | None = None
    write: bool = attrs.field(init=False, eq=False, repr=False)
    exec: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        self.write = self.kind == WRITE
        self.exec = self.kind == FETCH


@record
class Translation:
    """A successful hardware walk: the 4 KiB page at ``gfn`` is host frame ``pfn``, through a
    leaf of ``size`` bytes with these permissions; ``dirty`` is the leaf's dirty state after
    the access (a TLB entry filled by a read cannot serve a write that must set D)."""

    gfn: int
    pfn: int
    size: int
    readable: bool
    writable: bool
    executable: bool
    dirty: bool = False
    private: bool = False


@record
class Violation:
    """A failed walk, as the hardware reports it. ``gfn`` excludes alias bits; ``private`` is
    the fault's is_private; ``level``/``size`` are those of the entry that faulted (the leaf for
    a permission or access-flag fault: arm64's fault granule) or None/0; ``error_code`` the
    hardware's raw syndrome where it has one (x86 PFERR bits, arm64 ESR FSC, Power DSISR)."""

    kind: str
    gfn: int
    private: bool = False
    level: int | None = None
    size: int = 0
    error_code: int = 0

    @property
    def present(self) -> bool:
        return self.kind in (PERMISSION, ACCESS_FLAG)


@attrs.define(slots=True, eq=False)
class PageFault:
    """The fault being handled (x86 struct kvm_page_fault; arm64 keeps the same facts in
    user_mem_abort's locals).

    Set once by whoever builds it: ``addr`` (the gpa as the guest issued it), ``gfn`` (without
    alias bits), ``write``/``exec``, ``is_private``, ``prefetch``, ``kind``/``level``/
    ``fault_size`` (from the violation). Set by the flow: ``slot``, ``mmu_seq``; by
    ``faultin_pfn``: ``hva``, ``pfn``, ``map_writable``, ``max_size`` (the backing's largest
    mapping in bytes), ``pfnmap``, ``cacheable``; by the backend: ``max_level``, ``goal_level``
    (its own level numbers) and ``goal_size``, ``arch``: whatever else its fault handler
    keeps from one step to the next (what Linux keeps in user_mem_abort's or
    kvmppc_book3s_instantiate_page's locals), and ``after_unlock``: ``(point, fn, args)``,
    what the fault does once it has dropped kvm->mmu_lock (arm64's mark_page_dirty_in_slot
    after kvm_fault_unlock), run by the core after pausing at ``point``.
    """

    addr: int
    gfn: int
    write: bool = False
    exec: bool = False
    is_private: bool = False
    prefetch: bool = False
    kind: str = NOT_PRESENT
    level: int | None = None
    fault_size: int = 0
    error_code: int = 0
    as_id: int = 0
    vcpu: object = None
    slot: object = None
    mmu_seq: int = 0
    hva: int = 0
    pfn: int = 0
    map_writable: bool = False
    max_size: int = 4096
    pfnmap: bool = False
    cacheable: bool = True
    max_level: int = 0
    goal_level: int = 0
    goal_size: int = 4096
    host_vma: object = None
    arch: object = None
    after_unlock: tuple | None = None

    @property
    def read(self) -> bool:
        return not (self.write or self.exec)

    @property
    def gpa(self) -> int:
        return self.gfn << 12

    @property
    def present(self) -> bool:
        return self.kind in (PERMISSION, ACCESS_FLAG)



@attrs.frozen(slots=True)
class GfnRange:
    """struct kvm_gfn_range: ``[start, end)`` in 4 KiB gfns, all inside ``slot``.

    ``arg`` carries the new attributes for the attribute hooks; ``attr_filter`` says which
    alias a zap concerns (KVM_FILTER_SHARED / KVM_FILTER_PRIVATE, or both); ``may_block``
    and ``lockless`` are copied from the caller. Backends derive a changed copy with
    ``attrs.evolve``."""

    slot: object
    start: int
    end: int
    arg: int = 0
    attr_filter: int = KVM_FILTER_SHARED
    may_block: bool = False
    lockless: bool = False

    @property
    def npages(self) -> int:
        return self.end - self.start

    @property
    def as_id(self) -> int:
        return self.slot.as_id
