"""arm64's mutants for the race explorer (entry-point group ``kvmcore.mutants``: each the
fields of a ``kvmcore.explore.Mutant`` but its name): the two
halves of the 2020 fix for two vCPUs faulting on one stage-2 entry (seed 5), each switchable.

* ``arm64_map_replaces_perms``: the map walker's filter of a permission-only change
  (stage2_pte_needs_update, commit 694d071f8d85) taken away. A read fault that took its pfn
  before another vCPU's write fault installed a writable leaf replaces that leaf, through a
  break-before-make, by a read-only one: the write that completed has lost its mapping
  without an invalidation (the explorer's downgrade oracle).
* ``arm64_relax_perms_only``: user_mem_abort's relax-vs-map choice before commit 7d894834a305
  (mmu.py): a write permission fault in a dirty-logged slot goes to the map walker, which
  leaves a permission-only change alone, so a write that finds another vCPU's read-only leaf
  re-faults for ever (the explorer's livelock oracle).
"""

from __future__ import annotations

from unittest.mock import patch


from .backend import Arm64Stage2Backend
from .pgtable import Stage2PageTable, kvm_pte_valid

SCENARIOS = ("two_faults_one_entry",)


def _map_replaces_perms():
    def needs_update(old: int, new: int) -> bool:
        return not kvm_pte_valid(old) or not kvm_pte_valid(new) or old != new

    return patch.object(Stage2PageTable, "pte_needs_update", staticmethod(needs_update))


def _relax_perms_only():
    return patch.object(Arm64Stage2Backend, "relax_perms_only", True)


ARM64_MAP_REPLACES_PERMS = dict(
    seed="seed 5: two vCPUs' faults on one stage-2 entry",
    what="the map walker replaces a valid leaf whose only difference is its permissions (no "
    "stage2_pte_needs_update filter): a racing read fault downgrades a write's leaf",
    patch=_map_replaces_perms, scenarios=SCENARIOS, arch="arm64_stage2")

ARM64_RELAX_PERMS_ONLY = dict(
    seed="seed 5: two vCPUs' faults on one stage-2 entry",
    what="user_mem_abort before 7d894834a305: a write permission fault in a dirty-logged slot "
    "goes to the map walker, which leaves it alone: the write re-faults for ever",
    patch=_relax_perms_only, scenarios=SCENARIOS, arch="arm64_stage2")
