"""kvmcore backend for RISC-V G-stage translation (entry point ``riscv_gstage``).

``gstage`` is the entry format (asm/pgtable-bits.h, asm/kvm_gstage.h, kvm/gstage.c);
``backend`` the hooks, after arch/riscv/kvm/mmu.c. docs/arch/riscv_gstage.md is the fact
sheet.
"""

from .backend import RiscvGstageBackend
from .gstage import GstageFormat

__all__ = ["GstageFormat", "RiscvGstageBackend"]
