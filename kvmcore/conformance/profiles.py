"""Hypothesis profiles of the conformance suite: ``ci`` (the default while the plugin is loaded:
derandomized, small, no deadline because a backend's first fault allocates tables) and ``long``
(``--hypothesis-profile=long``: many more and longer runs, random seeds, kept in the example
database so a failure replays)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

CI = "ci"
LONG = "long"

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register() -> None:
    settings.register_profile(CI, max_examples=25, stateful_step_count=25, deadline=None,
                              derandomize=True, database=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.register_profile(LONG, max_examples=1000, stateful_step_count=100, deadline=None,
                              print_blob=True, suppress_health_check=_SLOW_OK)


def load_default() -> None:
    settings.load_profile(CI)
