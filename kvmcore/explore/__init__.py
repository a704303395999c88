"""The race explorer: search the interleavings of a race scenario's flows at Linux's race
points, check oracles after every step, and report failing schedules by a short id that
replays (docs/races.md).

```python
from kvmcore.explore import explore, load
explore(load("private_fault_vs_conversion"), "x86_tdp").assert_clean()
```
"""

from __future__ import annotations

from .mutants import MUTANTS, Mutant
from .scenario import RaceScenario, RaceScenarioError, builtin_names, load, parse
from .search import (Failure, Result, choose_vm_type, explore, parse_schedule_id, replay,
                     schedule_id, supports)
from .swarm import Finding, SwarmResult, swarm

__all__ = ["MUTANTS", "Failure", "Finding", "Mutant", "RaceScenario", "RaceScenarioError",
           "Result", "SwarmResult", "builtin_names", "choose_vm_type", "explore", "load",
           "parse", "parse_schedule_id", "replay", "schedule_id", "supports", "swarm"]
