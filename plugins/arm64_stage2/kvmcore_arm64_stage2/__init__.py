"""kvmcore backend for the arm64 stage-2 MMU (entry point ``arm64_stage2``).

Modules follow Linux's layout: ``geometry`` (asm/stage2_pgtable.h, kvm_get_vtcr), ``pgtable``
(hyp/pgtable.c: descriptors, walkers, break-before-make), ``mmu`` (mmu.c: the abort path),
``backend`` (the hook implementations), ``invariants`` (reference §10). The stage-2 granule is
the host's PAGE_SIZE (VM option ``granule``: 4 KiB, 16 KiB or 64 KiB).
"""

from .backend import Arm64Stage2Backend
from .geometry import Stage2Geometry

__all__ = ["Arm64Stage2Backend", "Stage2Geometry"]
