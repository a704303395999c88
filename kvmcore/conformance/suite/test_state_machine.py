"""The state machine: random memory lives on the backend under test, compared step by step
with the flat reference backend, invariants after every step (see kvmcore.conformance.machine).

The CI profile runs a small derandomized campaign; ``--hypothesis-profile=long`` a long one."""

from __future__ import annotations

import pytest

from kvmcore.conformance import machine


def test_state_machine_matches_flat(arch):
    """Every step's guest-visible result equals the flat backend's; invariants hold."""
    cls = machine.make_machine(arch.config.backend, arch.vm_type, dict(arch.config.options),
                               arch.capabilities)
    machine.run(cls)


@pytest.mark.requires("private_mem", "gmem")
def test_state_machine_private(arch):
    """The same on the VM type with private memory (conversions, private accesses, hole
    punches)."""
    cls = machine.make_machine(arch.config.backend, arch.vm_type, dict(arch.config.options),
                               arch.capabilities)
    machine.run(cls)
