"""Every built-in race scenario (kvmcore/scenarios/races), explored exhaustively on the backend
under test: no interleaving of its flows at their race points breaks an oracle (docs/races.md:
the invariants with the TLB check after every step, no crash, no deadlock, no livelock)."""

from __future__ import annotations

import pytest

from kvmcore.explore import builtin_names, explore, load


@pytest.mark.parametrize("name", builtin_names())
def test_race_scenario_is_clean_in_every_interleaving(arch, name):
    scn = load(name)
    required = set(scn.vm.get("requires", ()))
    from kvmcore.plugins import resolve_backend

    vm_types = resolve_backend(arch.config.backend).arch_info.vm_types
    vm_type = next((t for t, c in vm_types.items() if required <= c), None)
    if vm_type is None:
        pytest.skip(f"{arch.id} has no VM type with {sorted(required)}")
    result = explore(scn, arch.config.backend, vm_type, dict(arch.config.options),
                     max_schedules=5000)
    result.assert_clean()
    assert result.exhausted, f"{name}: more than 5000 schedules"
    assert result.schedules > 1


def test_random_race_scenarios_are_clean(arch):
    """``kvmcore swarm``: random scenarios over every host kind and operation the backend's
    VM types offer, each explored depth first: none fails an oracle (a kind the backend
    declares as ``explore:<kind>`` is its divergence, listed apart)."""
    from kvmcore.explore import swarm

    result = swarm(arch.config.backend, scenarios=25, seed=0, max_schedules=200,
                   options=dict(arch.config.options))
    assert result.scenarios >= 15, f"{result.refused} of 25 scenarios refused at setup"
    for f in result.findings:
        pytest.fail(f"{f.name} ({f.vm_type}): {f.failure.kind} in schedule {f.failure.id}: "
                    f"{f.failure.message}\n{f.text}")
