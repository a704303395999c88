"""Every built-in race scenario (kvmcore/scenarios/races), explored exhaustively on the backend
under test: no interleaving of its flows at their race points breaks an oracle (docs/races.md:
the invariants with the TLB check after every step, no crash, no deadlock, no livelock),
except in those that show a race of Linux itself (``linux_race``), which must fail."""

from __future__ import annotations

import pytest

from kvmcore.explore import builtin_names, explore, load


def _linux_race(name: str) -> bool:
    return load(name).linux_race is not None


@pytest.mark.parametrize("name", [n for n in builtin_names() if not _linux_race(n)])
def test_race_scenario_is_clean_in_every_interleaving(arch, name):
    result = _explore(arch, name)
    result.assert_clean()
    assert result.exhausted, f"{name}: more than 5000 schedules"
    assert result.schedules > 1


@pytest.mark.parametrize("name", [n for n in builtin_names() if _linux_race(n)])
def test_a_race_of_linux_is_found(arch, name):
    """A built-in scenario that shows a race of Linux itself (``linux_race``) fails: the
    backend follows the kernel there."""
    result = _explore(arch, name)
    assert result.failures, f"{name}: no schedule of {result.schedules} shows the race " \
        f"of Linux it was written for: {load(name).linux_race}"


def _explore(arch, name):
    scn = load(name)
    required = set(scn.vm.get("requires", ()))
    from kvmcore.plugins import resolve_backend

    vm_types = resolve_backend(arch.config.backend).arch_info.vm_types
    vm_type = next((t for t, c in vm_types.items() if required <= c), None)
    if vm_type is None:
        pytest.skip(f"{arch.id} has no VM type with {sorted(required)}")
    return explore(scn, arch.config.backend, vm_type, dict(arch.config.options),
                   max_schedules=5000)


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
