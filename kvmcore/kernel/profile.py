"""The running kernel's KVM profile: its KVM_CHECK_EXTENSION answers, and the model VM
configured to give the same ones."""

from __future__ import annotations

import errno
import os

import attrs

from .. import uapi
from ..capabilities import X86_VM_TYPE_NUMBERS, KernelConfig
from . import kvmdev

#: The capabilities a profile reads (the uapi names without KVM_CAP_).
PROFILE_CAPS = ("VM_TYPES", "NR_MEMSLOTS", "MULTI_ADDRESS_SPACE", "MEMORY_ATTRIBUTES",
                "GUEST_MEMFD", "GUEST_MEMFD_FLAGS", "READONLY_MEM", "MANUAL_DIRTY_LOG_PROTECT2",
                "DIRTY_LOG_RING", "DIRTY_LOG_RING_ACQ_REL", "DIRTY_LOG_RING_WITH_BITMAP",
                "PRE_FAULT_MEMORY", "USER_MEMORY2", "MAX_VCPU_ID")


def cap_number(name: str) -> int:
    return getattr(uapi, f"KVM_CAP_{name}")


@attrs.frozen
class KernelProfile:
    """``release``: uname -r; ``system``: KVM_CHECK_EXTENSION on /dev/kvm; ``vm``: on a
    default VM's fd; ``pre_fault_ioctl``: whether KVM_PRE_FAULT_MEMORY exists (not ENOTTY);
    ``ring_min_bytes``: the smallest dirty ring KVM_ENABLE_CAP accepts (0: no ring). No cap
    tells whether the CPU logs dirty pages itself (x86 PML): the ring's reserved entries do
    (kvm_dirty_ring_get_rsvd_entries: 64 + kvm_cpu_dirty_log_size, 512 with PML), so a
    4 KiB ring is accepted exactly when there is no PML."""

    release: str
    system: dict[str, int]
    vm: dict[str, int]
    pre_fault_ioctl: bool
    ring_min_bytes: int = 0

    @classmethod
    def read(cls) -> KernelProfile:
        """Ask the running kernel (one VM and one vCPU, closed again)."""
        with kvmdev.Kvm() as kvm:
            system = {n: kvm.check_extension(cap_number(n)) for n in PROFILE_CAPS}
            with kvm.create_vm() as vm:
                vm_caps = {n: vm.check_extension(cap_number(n)) for n in PROFILE_CAPS}
                with vm.create_vcpu(0) as vcpu:
                    try:
                        # flags=1 is EINVAL where the ioctl exists: nothing is mapped.
                        vcpu.pre_fault_memory(0, 4096, flags=1)
                        pre_fault_ioctl = True
                    except OSError as e:
                        pre_fault_ioctl = e.errno != errno.ENOTTY
            ring_min = 0
            if system["DIRTY_LOG_RING"]:
                for size in (4096, 8192, 16384, 32768):
                    with kvm.create_vm() as vm:
                        try:
                            vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, size)
                        except OSError:
                            continue
                    ring_min = size
                    break
        return cls(os.uname().release, system, vm_caps, pre_fault_ioctl, ring_min)

    def kernel_config(self) -> KernelConfig:
        """The model's configuration for this kernel: what it did not build is ``not_built``
        (ENOTTY), what it built but gives no VM is ``disabled``."""
        s = self.system
        not_built, disabled = set(), set()
        if not s["MEMORY_ATTRIBUTES"]:
            not_built.add("memory_attributes")
        if not s["GUEST_MEMFD"]:
            not_built |= {"gmem", "gmem_mmap"}
        elif not s["GUEST_MEMFD_FLAGS"] & uapi.GUEST_MEMFD_FLAG_MMAP:
            not_built.add("gmem_mmap")
        if not s["READONLY_MEM"]:
            not_built.add("readonly_mem")
        if not s["MANUAL_DIRTY_LOG_PROTECT2"]:
            not_built |= {"manual_dirty_protect", "initially_set"}
        elif not s["MANUAL_DIRTY_LOG_PROTECT2"] & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
            not_built.add("initially_set")
        if not (s["DIRTY_LOG_RING"] or s["DIRTY_LOG_RING_ACQ_REL"]):
            not_built.add("dirty_ring")
        tdp = True
        if not s["PRE_FAULT_MEMORY"]:
            if not self.pre_fault_ioctl:
                not_built.add("pre_fault")
            elif s["VM_TYPES"]:
                # x86 builds the ioctl always and answers the cap with tdp_enabled.
                tdp = False
            else:
                disabled.add("pre_fault")
        vm_types = {name for name, number in X86_VM_TYPE_NUMBERS.items()
                    if s["VM_TYPES"] >> number & 1} or {"default"}
        return KernelConfig(vm_types=vm_types, not_built=not_built, disabled=disabled,
                            tdp=tdp)

    def vm_kwargs(self, arch: str = "x86_tdp") -> dict:
        """Keyword arguments of ``kvmcore.VM`` for a model VM like this kernel's."""
        kwargs = {"kconfig": self.kernel_config()}
        if arch == "x86_tdp":
            if self.system["MULTI_ADDRESS_SPACE"] < 2:
                kwargs["smm"] = False
            if self.ring_min_bytes and self.ring_min_bytes < 9216:
                # 64 + 512 PML entries of 16 bytes would not fit: this host has no PML.
                kwargs["pml"] = False
        return kwargs

    def as_dict(self) -> dict:
        return {"release": self.release, "system": dict(self.system), "vm": dict(self.vm),
                "pre_fault_ioctl": self.pre_fault_ioctl, "ring_min_bytes": self.ring_min_bytes}


def model_profile(vm) -> dict[str, int]:
    """A model VM's answers to the profile's capabilities (its ``check_extension``)."""
    return {n: vm.check_extension(cap_number(n)) for n in PROFILE_CAPS}
