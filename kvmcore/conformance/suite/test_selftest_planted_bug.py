"""Self-test of the suite: the state machine catches a planted bug.

``NoZapOnMunmap`` is the flat backend with one bug: its ``unmap_gfn_range`` does nothing when
the invalidation comes from ``munmap`` (a backend that forgets to zap on that notifier). The
state machine must fail on it, and hypothesis must shrink the failure to a short example
that contains the munmap. This test runs once, on the flat backend, whatever ``--arch`` says.
"""

from __future__ import annotations

import pytest

from kvmcore import hookimpl
from kvmcore.conformance import machine
from kvmcore.testing import FlatBackend


class NoZapOnMunmap(FlatBackend):
    """FlatBackend that forgets to zap the leaves of an unmapped hva range."""

    @hookimpl
    def unmap_gfn_range(self, vm, range):
        if machine.called_from("munmap"):
            return False
        return super().unmap_gfn_range(vm, range)


def test_state_machine_catches_missing_zap_on_munmap():
    steps: list = []
    cls = machine.make_machine(NoZapOnMunmap, "default", {},
                               FlatBackend.arch_info.vm_types["default"], record=steps)
    with pytest.raises(AssertionError) as info:
        machine.run(cls, max_examples=1000, stateful_step_count=10, derandomize=True,
                    database=None, print_blob=False)
    names = [s[0] for s in steps]
    # The shrunk example: the two initial slots, an access, the munmap, the access that sees
    # the stale leaf (or the invariant that notices it).
    assert "munmap" in names, (names, info.value)
    assert len(steps) <= 8, steps
    print("shrunk example:", steps, "->", info.value)
