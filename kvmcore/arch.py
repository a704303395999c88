"""What a backend says about itself (ArchInfo) and about each leaf it maps (Mapping)."""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping as _MappingABC

import attrs

from .errors import KvmError

#: Capability names a backend may claim per VM type (API.md). The conformance suite tests what
#: is claimed and skips the rest.
KNOWN_CAPABILITIES = frozenset({
    "private_mem", "gmem", "gmem_mmap", "readonly_mem", "dirty_log", "manual_dirty_protect",
    "dirty_ring", "pml", "hugepage_2m", "hugepage_1g", "relax_perms", "pre_fault", "aging",
    "memory_attributes", "initially_set", "private_alias", "pfncache",
})


@attrs.frozen
class VmOption:
    """A declared VM option (``VM(arch, name=value)``): its default, the values it may take
    (None: any value of the default's type) and one line for ``kvmcore archs``."""

    default: object
    choices: tuple | None = None
    doc: str = ""

    def check(self, name: str, value) -> None:
        """EINVAL, naming the option, for a value of another type or outside ``choices``
        (True is not 1 here: a flag wants a bool, a size an int)."""
        if type(value) is not type(self.default):
            raise KvmError(_errno.EINVAL, f"{name}={value!r}: must be a "
                                          f"{type(self.default).__name__}")
        if self.choices is not None and value not in self.choices:
            raise KvmError(_errno.EINVAL, f"{name}={value!r}: one of "
                                          f"{', '.join(map(repr, self.choices))}")


def option_value(text: str):
    """A VM option's value written on a command line (``--vm-option KEY=VALUE``): a Python
    literal (``True``, ``16384``) as that literal, any other text as itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def vm_options(arch: str, declared: _MappingABC[str, VmOption], given: dict) -> dict:
    """Every declared option's value, ``given`` or its default, each checked; EINVAL for a
    name ``declared`` does not have. What a backend's ``__init__`` does with its options."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise KvmError(_errno.EINVAL, f"{', '.join(unknown)}: not a {arch} VM option (known: "
                                      f"{', '.join(sorted(declared)) or 'none'})")
    values = {}
    for name, opt in declared.items():
        value = given.get(name, opt.default)
        opt.check(name, value)
        values[name] = value
    return values


def _freeze_vm_types(value) -> dict[str, frozenset[str]]:
    return {str(k): frozenset(v) for k, v in dict(value).items()}


@attrs.frozen
class ArchInfo:
    """A backend's self-description.

    ``vm_types`` maps each VM type it supports (``"default"`` always) to the capabilities a VM
    of that type has; ``page_sizes`` are the leaf sizes (bytes) of the default configuration,
    smallest first; ``levels`` its page-table levels; ``nr_address_spaces`` the memslot
    address spaces of a VM (x86: 2, for SMM).

    The base page of a VM is its host's PAGE_SIZE, as in Linux. ``base_page_option`` names
    the VM option that selects it (arm64 ``granule``, ppc ``page_size``); a backend without
    one runs on 4 KiB hosts only. ``host_pmd_sizes`` gives, per PAGE_SIZE, the host PMD size
    where it is not PAGE_SIZE^2 / 8 (Power radix with 64 KiB pages: 2 MiB).

    ``vm_ioctl_errno`` / ``vcpu_ioctl_errno``: what an ioctl the architecture does not build
    answers. The generic kvm_vm_ioctl / kvm_vcpu_ioctl pass an ioctl they do not handle to
    kvm_arch_vm_ioctl / kvm_arch_vcpu_ioctl, whose default case is the arch's: x86 ENOTTY for
    both, arm64 EINVAL for both, ppc ENOTTY for VM and EINVAL for vCPU ioctls.

    ``fault_retry_gfn``: the fault path's staleness check. True (x86 is_page_fault_stale):
    mmu_invalidate_retry_gfn, so an invalidation in progress of another gfn does not stop the
    fault. False (arm64 user_mem_abort, ppc kvmppc_create_pte): mmu_invalidate_retry, any
    invalidation in progress makes the fault retry.

    ``invalid_slot_retry``: True (x86 kvm_mmu_faultin_pfn): the fault reads mmu_invalidate_seq
    and checks private/shared first; then a missing slot is MMIO and a slot being deleted or
    moved (KVM_MEMSLOT_INVALID) makes it retry until the update is done. False (arm64
    kvm_handle_guest_abort, ppc kvmppc_book3s_radix_page_fault, riscv
    vcpu_exit.c gstage_page_fault): the gfn's hva is looked up first, and neither a missing nor
    an INVALID slot has one (__gfn_to_hva_many): the access is MMIO, before any snapshot.
    ``error_pfn_memory_fault``: a fault whose hva gives no page (KVM_PFN_ERR_FAULT) exits
    KVM_EXIT_MEMORY_FAULT with -EFAULT (x86 kvm_handle_error_pfn); False: KVM_RUN fails with
    -EFAULT alone (arm64 user_mem_abort, ppc kvmppc_book3s_instantiate_page, riscv
    kvm_riscv_mmu_map).
    ``mmu_lockless_aging``: CONFIG_KVM_MMU_LOCKLESS_AGING (x86): the MMU notifier's aging
    callbacks walk without kvm->mmu_lock (kvm_age_hva_range's ``lockless``), beside faults
    and zaps; elsewhere they take it for write.
    ``elide_tlb_flush_if_young``: CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG (x86):
    kvm_mmu_notifier_clear_flush_young does not flush the TLBs after aging a young leaf, so a
    vCPU may keep using a translation aging made old (or access-tracked) until its next flush.
    ``faultin_retry_unsafe``: the fault tests mmu_invalidate_retry_gfn_unsafe before and after
    it gets the pfn and retries without taking mmu_lock (x86 kvm_mmu_faultin_pfn).

    ``hwpoison_sigbus``: a fault on a hardware-poisoned host page sends SIGBUS
    (kvm_send_hwpoison_signal: x86, arm64); False where the arch answers -EFAULT as for any
    error pfn (ppc kvmppc_book3s_instantiate_page). The backend implements it; this says so.
    ``hwpoison_lsb_vma``: the signal's si_addr_lsb is the VMA's page shift (the hugetlb page
    size: RISC-V kvm_riscv_mmu_map's vma_pageshift), not PAGE_SHIFT (x86
    kvm_send_hwpoison_signal); the core's default faultin_pfn reads it. arm64 clamps the shift
    to a stage-2 block size and says so in its own hook.

    ``known_divergences``: where Linux on this architecture departs from the common contract
    the conformance suite checks, ``{test: "Linux file:function — why"}``. ``test`` is a
    conformance test's name (``test_x``: every parametrization), its name with the other
    parameters (``test_x[pf_lock_wait]``), or either prefixed by its file
    (``test_races.py::test_x``); ``state_machine:<step>:<ERRNO>`` lets the state machine
    accept that errno from the backend for that step (the reference does not run it);
    ``explore:<oracle kind>`` makes ``kvmcore swarm`` list a random scenario that fails that
    oracle (``downgrade``, ``invariant``, ...) as a declared divergence, not a failure, and
    ``explore:<oracle kind>:<text>`` one whose every problem says ``text``. The
    suite reports each test as a strict xfail with that reason
    (an unexpected pass fails: the divergence is gone and the entry must go too);
    ``kvmcore archs`` lists them. Linux-exact behaviour is the default, not an option.
    """

    name: str
    page_sizes: tuple[int, ...] = attrs.field(converter=tuple)
    levels: int
    vm_types: _MappingABC[str, frozenset[str]] = attrs.field(converter=_freeze_vm_types,
                                                             hash=False)
    nr_address_spaces: int = 1
    description: str = ""
    #: KVM_INTERNAL_MEM_SLOTS: slot ids at the top that only the kernel uses (x86: 3, s390:
    #: 1); userspace gets KVM_USER_MEM_SLOTS = 32767 - this.
    internal_mem_slots: int = 0
    base_page_option: str | None = None
    host_pmd_sizes: _MappingABC[int, int] = attrs.field(factory=dict, converter=dict,
                                                        hash=False)
    #: KVM_HAVE_MMU_RWLOCK: kvm->mmu_lock is an rwlock (x86, arm64: faults take it for read)
    #: rather than a spinlock (ppc: every holder excludes every other).
    mmu_rwlock: bool = True
    vm_ioctl_errno: int = _errno.ENOTTY
    vcpu_ioctl_errno: int = _errno.ENOTTY
    fault_retry_gfn: bool = True
    invalid_slot_retry: bool = True
    faultin_retry_unsafe: bool = True
    mmu_lockless_aging: bool = False
    elide_tlb_flush_if_young: bool = False
    error_pfn_memory_fault: bool = True
    hwpoison_sigbus: bool = True
    hwpoison_lsb_vma: bool = False
    known_divergences: _MappingABC[str, str] = attrs.field(factory=dict, converter=dict,
                                                           hash=False)

    @vm_types.validator
    def _check_vm_types(self, _attr, value):
        if "default" not in value:
            raise ValueError(f"ArchInfo {self.name!r}: vm_types must include 'default'")
        # A misspelt capability would silently skip its conformance tests.
        for vm_type, caps in value.items():
            unknown = caps - KNOWN_CAPABILITIES
            if unknown:
                raise ValueError(f"ArchInfo {self.name!r}: VM type {vm_type!r} claims unknown "
                                 f"capabilities {sorted(unknown)}; known: "
                                 f"{', '.join(sorted(KNOWN_CAPABILITIES))}")

    @property
    def capabilities(self) -> frozenset[str]:
        """Every capability claimed by at least one VM type."""
        return frozenset().union(*self.vm_types.values())

    def capabilities_of(self, vm_type: str) -> frozenset[str]:
        return self.vm_types[vm_type]

    def base_page(self, options: _MappingABC) -> int | None:
        """The host PAGE_SIZE that VM ``options`` ask for, or None to follow the host."""
        if self.base_page_option is None:
            return 4096
        return options.get(self.base_page_option)


@attrs.frozen(slots=True)
class Mapping:
    """One present leaf of the stage-2 / TDP table, whatever its hardware format.

    ``gfn`` is the first 4 KiB frame it maps and ``size`` its size in bytes; ``pfn`` the host
    frame of its first page; ``private`` whether it is the private alias (TDX mirror root) or,
    for VMs whose private and shared pages share one table, whether it maps guest_memfd
    private memory; ``young``/``dirty`` the hardware accessed/dirty (R/C) state; ``level`` the
    backend's own level number; ``raw`` the entry as the hardware stores it.

    ``mmu_writable``: a write fault may make the leaf writable without kvm->mmu_lock, and
    whatever takes that right away flushes the TLBs (x86's MMU-writable bit, which
    fast_page_fault tests). A vCPU's TLB may then still hold a writable translation over a
    leaf that is not writable: one made before aging turned the leaf into an access-tracked
    one (x86 with A/D bits disabled), which does not flush.
    """

    gfn: int
    size: int
    pfn: int
    readable: bool
    writable: bool
    executable: bool
    private: bool = False
    young: bool = False
    dirty: bool = False
    level: int = 0
    raw: int = 0
    mmu_writable: bool = False

    @property
    def npages(self) -> int:
        return self.size >> 12

    @property
    def gpa(self) -> int:
        return self.gfn << 12
