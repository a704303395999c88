"""KVM_CHECK_EXTENSION and KVM_ENABLE_CAP on a VM, and ``KernelConfig``: what a kernel build
offers, as data a model VM is configured with.

A backend's ArchInfo says what its architecture can do in the newest Linux the model follows;
a real kernel may have less compiled in (no CONFIG_KVM_SMM, no memory attributes) or switched
off (no TDP, so no KVM_PRE_FAULT_MEMORY). ``VM(..., kconfig=KernelConfig(...))`` gives a model
VM the answers such a kernel gives, so that the differential test against /dev/kvm
(kvmcore.kernel) compares like with like.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import attrs

from .errors import KvmError
from .memslots import kvm_user_mem_slots
from .uapi import (
    KVM_CAP_CHECK_EXTENSION_VM,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_ENABLE_CAP_VM,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_PRE_FAULT_MEMORY,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_USER_MEMORY,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_MAX_VCPU_IDS,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
)

if TYPE_CHECKING:
    from .kvm import Kvm

#: x86's KVM_CREATE_VM type numbers for the model's VM type names (KVM_CAP_VM_TYPES is x86's).
X86_VM_TYPE_NUMBERS = {"default": KVM_X86_DEFAULT_VM, "sw_protected": KVM_X86_SW_PROTECTED_VM,
                       "snp": KVM_X86_SNP_VM, "tdx": KVM_X86_TDX_VM}

_U32 = 1 << 32
_U64 = 1 << 64


def _frozen(value) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen
class KernelConfig:
    """What a kernel build offers, where it offers less than the backend's ArchInfo.

    - ``vm_types``: the VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES); None: all of the
      backend's.
    - ``not_built``: capability names whose code is not in the kernel at all: their ioctls are
      ENOTTY (``memory_attributes`` without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES) and their
      KVM_CHECK_EXTENSION answers 0.
    - ``disabled``: capability names the kernel has built but gives no VM (``pre_fault`` on an
      x86 host without TDP: KVM_PRE_FAULT_MEMORY exists and answers EOPNOTSUPP).

    - ``tdp``: False for an x86 host without two-dimensional paging (enable_ept/npt off, or
      a vendor module such as PVM that has none): no VM gets ``pre_fault``
      (KVM_CAP_PRE_FAULT_MEMORY is tdp_enabled), and KVM_PRE_FAULT_MEMORY fails as the shadow
      MMU makes it fail (see ``pre_fault_unsupported``).

    SMM (a second memslot address space) is a backend option (x86 ``smm=False``), because
    it changes the backend's roots, not only the answers.
    """

    vm_types: frozenset[str] | None = attrs.field(default=None, converter=attrs.converters
                                                  .optional(_frozen))
    not_built: frozenset[str] = attrs.field(factory=frozenset, converter=_frozen)
    disabled: frozenset[str] = attrs.field(factory=frozenset, converter=_frozen)
    tdp: bool = True

    def check_vm_type(self, vm_type: str) -> None:
        """KVM_CREATE_VM's kvm_is_vm_type_supported: a type this kernel lacks is EINVAL."""
        if self.vm_types is not None and vm_type not in self.vm_types:
            raise KvmError(errno.EINVAL, f"vm_type={vm_type!r}: this kernel supports "
                                         f"{', '.join(sorted(self.vm_types))}")

    def apply(self, arch_caps: frozenset[str], vm_caps: frozenset[str]):
        """The (arch, VM) capability sets of a VM on this kernel."""
        disabled = self.disabled if self.tdp else self.disabled | {"pre_fault"}
        return arch_caps - self.not_built, vm_caps - self.not_built - disabled


def pre_fault_unsupported(vm: Kvm) -> KvmError:
    """The error of KVM_PRE_FAULT_MEMORY (valid arguments) on a VM without ``pre_fault``.

    Linux's x86 kvm_arch_vcpu_pre_fault_memory: EOPNOTSUPP where pre_fault_allowed is false
    (protected VMs before finalization). Without TDP pre_fault_allowed is still true for a
    default VM: kvm_mmu_reload loads the shadow MMU first, which fails with ENOSPC while the VM
    has no MMU-page budget (make_mmu_pages_available; the budget, n_max_mmu_pages, is set when
    the first memslot is created or deleted), and then kvm_tdp_map_page refuses a non-direct
    MMU: EOPNOTSUPP. The model has no shadow MMU; it keeps only these two answers."""
    kconfig = vm.kconfig
    if kconfig is not None and not kconfig.tdp:
        if not any(s.generation != s.as_id for s in vm.memslot_sets):
            return KvmError(errno.ENOSPC, "pre_fault_memory: the shadow MMU has no pages yet "
                                          "(no memslot was ever created)")
        return KvmError(errno.EOPNOTSUPP, "pre_fault_memory: the MMU is not two-dimensional "
                                          "(no TDP)")
    return KvmError(errno.EOPNOTSUPP, f"pre_fault_memory: not supported for VM type "
                                      f"{vm.vm_type!r}")


def kvm_vm_ioctl_check_extension(vm: Kvm, cap: int) -> int:
    """KVM_CHECK_EXTENSION on a VM fd: kvm_vm_ioctl_check_extension_generic and the arch's
    kvm_vm_ioctl_check_extension, for the capabilities the model has. Unknown ones are 0, as
    in Linux.

    Simplifications: the dirty-ring answers follow the model, which offers both the TSO and
    the ACQ_REL ring wherever it offers one (Linux: x86 both, arm64 ACQ_REL only); VM_TYPES is
    answered for x86 only (the other arches do not offer it).
    """
    if not isinstance(cap, int) or isinstance(cap, bool):
        raise KvmError(errno.EINVAL, f"cap={cap!r} is not an integer")
    caps, arch_caps = vm.capabilities, vm.arch_capabilities
    if cap in (KVM_CAP_USER_MEMORY, KVM_CAP_USER_MEMORY2, KVM_CAP_ENABLE_CAP_VM,
               KVM_CAP_CHECK_EXTENSION_VM):
        return 1
    if cap == KVM_CAP_NR_MEMSLOTS:
        return kvm_user_mem_slots(vm.arch_info)
    if cap == KVM_CAP_MAX_VCPU_ID:
        return KVM_MAX_VCPU_IDS
    if cap == KVM_CAP_MULTI_ADDRESS_SPACE:
        # Compiled only where KVM_MAX_NR_ADDRESS_SPACES > 1 (x86 with CONFIG_KVM_SMM).
        return vm.nr_address_spaces if vm.arch_info.nr_address_spaces > 1 else 0
    if cap == KVM_CAP_READONLY_MEM:
        return int("readonly_mem" in caps)
    if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        if "manual_dirty_protect" not in arch_caps:
            return 0
        if "initially_set" in arch_caps:
            return KVM_DIRTY_LOG_MANUAL_CAPS
        return KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if cap in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        return KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE if "dirty_ring" in arch_caps else 0
    if cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
        return 0
    if cap == KVM_CAP_MEMORY_ATTRIBUTES:
        if "memory_attributes" not in arch_caps:
            return 0
        from .attributes import supported_mem_attributes

        return supported_mem_attributes(vm.capabilities)
    if cap == KVM_CAP_GUEST_MEMFD:
        return int("gmem" in caps)
    if cap == KVM_CAP_GUEST_MEMFD_FLAGS:
        if "gmem" not in arch_caps:
            return 0
        from .gmem import kvm_gmem_get_supported_flags

        return kvm_gmem_get_supported_flags(vm)
    if cap == KVM_CAP_VM_TYPES:
        return _vm_types_mask(vm)
    if cap == KVM_CAP_PRE_FAULT_MEMORY:
        return int("pre_fault" in caps)
    return 0


def _vm_types_mask(vm: Kvm) -> int:
    """x86 kvm_caps.supported_vm_types: BIT(type) of every type KVM_CREATE_VM accepts."""
    if vm.arch_info.name != "x86_tdp":
        return 0
    types = vm.arch_info.vm_types
    if vm.kconfig is not None and vm.kconfig.vm_types is not None:
        types = [t for t in types if t in vm.kconfig.vm_types]
    return sum(1 << X86_VM_TYPE_NUMBERS[t] for t in types if t in X86_VM_TYPE_NUMBERS)


def kvm_vm_ioctl_enable_cap(vm: Kvm, cap: int, args=(), flags: int = 0) -> None:
    """KVM_ENABLE_CAP on a VM fd (kvm_vm_ioctl_enable_cap_generic, then the arch's
    kvm_vm_ioctl_enable_cap), for the capabilities the model has: MANUAL_DIRTY_LOG_PROTECT2
    and the dirty ring (TSO or ACQ_REL). Anything else is EINVAL, as an unknown capability is
    in Linux."""
    from . import dirty as _dirty

    for name, value, bits in (("cap", cap, 32), ("flags", flags, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
            raise KvmError(errno.EINVAL, f"{name}={value!r} is not a u{bits}")
    args = list(args) + [0] * (4 - len(args))
    for i, value in enumerate(args):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64:
            raise KvmError(errno.EINVAL, f"args[{i}]={value!r} is not a u64")
    vm._check_open()
    if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and "manual_dirty_protect" in vm.arch_capabilities:
        if flags:
            raise KvmError(errno.EINVAL, f"flags={flags:#x} must be 0")
        _dirty.enable_manual_protect(vm, args[0])
        return
    if cap in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        if not kvm_vm_ioctl_check_extension(vm, cap):
            raise KvmError(errno.EINVAL, f"cap={cap}: this VM has no dirty ring")
        # kvm_vm_ioctl_enable_dirty_log_ring takes the size as a u32.
        _dirty.enable_dirty_ring(vm, args[0] % _U32)
        return
    raise KvmError(errno.EINVAL, f"cap={cap}: not a capability this VM can enable")
