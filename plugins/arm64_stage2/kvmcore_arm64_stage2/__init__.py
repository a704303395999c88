"""kvmcore backend for the arm64 stage-2 MMU (entry point ``arm64_stage2``).

Modules follow Linux's layout: ``geometry`` (asm/stage2_pgtable.h, kvm_get_vtcr), ``pgtable``
(hyp/pgtable.c: descriptors, walkers, break-before-make), ``mmu`` (mmu.c: the abort path),
``backend`` (the hook implementations), ``invariants`` (reference §10), ``frames`` (base pages
larger than the host model's 4 KiB frames).
"""

from .backend import Arm64Stage2Backend
from .geometry import Stage2Geometry

__all__ = ["Arm64Stage2Backend", "Stage2Geometry"]
