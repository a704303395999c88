"""The race explorer: search the interleavings of a race scenario's flows at Linux's race
points, check oracles after every step, and report failing schedules by a short id that
replays (docs/races.md).

```python
from kvmcore.explore import explore, load
explore(load("private_fault_vs_conversion"), "x86_tdp").assert_clean()
```
"""

from __future__ import annotations

from .minimize import Minimized, minimize
from .mutants import MUTANTS, Mutant
from .scenario import (RaceScenario, RaceScenarioError, builtin_names, dumps, load, parse,
                       read_text)
from .search import (Failure, Result, Window, choose_vm_type, explore, parse_schedule_id,
                     replay, schedule_id, supports)
from .swarm import Finding, SwarmResult, swarm

__all__ = ["MUTANTS", "Failure", "Finding", "Minimized", "Mutant", "RaceScenario",
           "RaceScenarioError", "Result", "SwarmResult", "Window", "builtin_names",
           "choose_vm_type", "dumps", "explore", "load", "minimize", "parse",
           "parse_schedule_id", "read_text", "replay", "schedule_id", "supports", "swarm"]
