"""kvmcore backend for x86's TDP MMU with EPT: the entry format (spte), roots and the map /
zap / split walks (tdp_mmu), the fault-path policy (mmu), the hardware walk (ept), TDX mirror
roots (tdx), SNP's RMP (sev), page-modification logging (pml) and the hooks (backend)."""

from .backend import ARCH_INFO, X86TdpBackend

__all__ = ["X86TdpBackend", "ARCH_INFO"]
