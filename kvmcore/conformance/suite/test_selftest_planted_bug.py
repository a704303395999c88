"""Self-test of the suite: the state machine catches a planted bug.

``NoZapOnMunmap`` is the flat backend with one bug: its ``unmap_gfn_range`` does nothing when
the invalidation comes from ``munmap`` (a backend that forgets to zap on that notifier). The
state machine must fail on it, on an example that contains the munmap. This test runs once, on
the flat backend, whatever ``--arch`` says.

Finding the bug takes a fraction of a second; shrinking the example takes most of a minute, so
the ``ci`` profile stops at the first failing example, and the ``long`` profile
(``--hypothesis-profile=long``) also shrinks it and checks that it comes down to a few steps.
"""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings

from kvmcore import hookimpl
from kvmcore.conformance import machine, profiles
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
    shrink = settings.get_current_profile_name() == profiles.LONG
    phases = tuple(p for p in Phase if shrink or p is not Phase.shrink)
    with pytest.raises(AssertionError) as info:
        machine.run(cls, max_examples=1000, stateful_step_count=10, derandomize=True,
                    database=None, print_blob=False, phases=phases)
    names = [s[0] for s in steps]
    assert "munmap" in names, (names, info.value)
    if shrink:
        # The shrunk example: the two initial slots, an access, the munmap, the access that
        # sees the stale leaf (or the invariant that notices it).
        assert len(steps) <= 8, steps
    print("shrunk example:", steps, "->", info.value)
