"""ArchInfo.known_divergences: the conformance suite turns each into a strict xfail with its
reason, the state machine accepts a declared errno for a step, ``kvmcore archs`` lists them."""

from __future__ import annotations

import json
import textwrap

import attrs
from click.testing import CliRunner

import kvmcore.cli as cli_mod
from kvmcore.conformance import SUITE_DIR
from kvmcore.testing import FlatBackend

pytest_plugins = ["pytester"]

BACKEND = '''
import attrs
from kvmcore import hookimpl
from kvmcore.testing import FlatBackend


class Diverging(FlatBackend):
    """Maps every leaf read-only and never relaxes: a write livelocks, so the write test
    fails, as declared; the read test passes, and a divergence declared for it would be an
    unexpected pass."""

    arch_info = attrs.evolve(FlatBackend.arch_info, known_divergences={{
        "test_faults.py::test_write_fault_installs_writable_leaf": "Linux x:y — why",
        {extra}
    }})

    @hookimpl
    def map_leaf(self, vm, fault):
        fault.map_writable = False
        return super().map_leaf(vm, fault)

    @hookimpl
    def relax_perms(self, vm, fault):
        return None
'''


def _run(pytester, extra=""):
    # A module name of its own per test: an in-process run keeps what the last one imported.
    module = f"diverging_{abs(hash(extra))}"
    pytester.makepyfile(**{module: textwrap.dedent(BACKEND.format(extra=extra))})
    pytester.syspathinsert()
    # Only the suite's test_faults.py: the whole suite would import modules whose names this
    # process already holds from tests/ (test_gmem, test_memslots).
    return pytester.runpytest_inprocess(
        "-p", "kvmcore.conformance", "--arch", f"{module}:Diverging", "-p", "no:cacheprovider",
        str(SUITE_DIR / "test_faults.py"),
        "-k", "test_write_fault_installs_writable_leaf or test_read_fault_installs_readable",
        "-rxX")


def test_a_declared_divergence_is_a_strict_xfail_with_its_reason(pytester):
    result = _run(pytester)
    result.assert_outcomes(passed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*test_write_fault_installs_writable_leaf*"
                                 "known divergence: Linux x:y — why*"])


def test_a_divergence_that_no_longer_diverges_fails(pytester):
    result = _run(pytester, '"test_read_fault_installs_readable_leaf": "gone",')
    result.assert_outcomes(failed=1, xfailed=1)


def test_archs_lists_known_divergences(monkeypatch):
    info = attrs.evolve(FlatBackend.arch_info, known_divergences={"test_x": "Linux a.c:f — b"})
    backend = type("B", (FlatBackend,), {"arch_info": info})

    class EntryPoint:
        dist = None

        @staticmethod
        def load():
            return backend

    monkeypatch.setattr("kvmcore.plugins.installed_backends", lambda: {"b": EntryPoint})
    rows = json.loads(CliRunner().invoke(cli_mod.main, ["archs", "--json"]).output)
    assert rows[0]["known_divergences"] == {"test_x": "Linux a.c:f — b"}
    out = CliRunner().invoke(cli_mod.main, ["archs"]).output
    assert "known divergence test_x: Linux a.c:f — b" in out
