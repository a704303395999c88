"""kvmcore backend: PowerPC Book3S HV partition-scoped radix MMU.

Entry point ``ppc_radix`` in group ``kvmcore.arch``. See ``backend.py`` for the VM options and
``book3s_64_mmu_radix.py`` for the flows (shared/reference/ppc_radix.md).
"""

from .backend import PpcRadixBackend

__version__ = "0.1.0"

__all__ = ["PpcRadixBackend"]
