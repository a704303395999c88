"""Scenario minimization (kvmcore.explore.minimize, ``--minimize``) and the format's writer."""

from __future__ import annotations

import json
import tomllib

import pytest
from click.testing import CliRunner

from kvmcore.cli import main
from kvmcore.explore import (RaceScenarioError, builtin_names, dumps, explore, minimize, parse,
                             read_text)

FLAT = "kvmcore.testing:FlatBackend"

#: The pfnmap race of pfnmap_fault_vs_munmap, buried in what a swarm scenario adds: a second
#: slot with its own write, a setup read of another page, dirty logging, manual protection,
#: a wider munmap and a vCPU number.
PADDED = """\
name = "padded"
[vm]
manual_protect = true
[[slot]]
slot = 0
gpa = 0x0
pages = 16
kind = "pfnmap"
log_dirty = true
[[slot]]
slot = 1
gpa = 0x100000
pages = 16
populate = true
[[access]]
op = "write"
page = 3
slot = 1
[[access]]
op = "read"
page = 11
[[flow]]
op = "read"
page = 9
vcpu = 1
[[flow]]
op = "write"
page = 2
slot = 1
[[flow]]
op = "munmap"
page = 6
pages = 8
"""


@pytest.mark.parametrize("name", builtin_names())
def test_the_writer_gives_back_the_same_scenario(name):
    text, path = read_text(name)
    again = dumps(tomllib.loads(text))
    a, b = parse(text, path), parse(again, path)
    assert (a.name, a.vm, a.slots, a.accesses, a.flows, a.preemption_bound, a.linux_race) == \
        (b.name, b.vm, b.slots, b.accesses, b.flows, b.preemption_bound, b.linux_race)


def test_a_padded_finding_comes_down_to_the_written_race():
    m = minimize(PADDED, FLAT, mutants=("pfnmap_no_retry",))
    assert m.original.kind == m.failure.kind == "invariant"
    doc = tomllib.loads(m.text)
    assert doc["name"] == "padded-min" and "vm" not in doc and "access" not in doc
    assert doc["slot"] == [{"slot": 0, "gpa": 0, "pages": 1, "kind": "pfnmap"}]
    assert doc["flow"] == [{"op": "read", "page": 0}, {"op": "munmap", "page": 0}]
    # It fails as reported, and only with the bug.
    r = explore(parse(m.text), FLAT, mutants=("pfnmap_no_retry",), max_schedules=300)
    assert r.failures and r.failures[0].id == m.failure.id
    assert explore(parse(m.text), FLAT).clean
    assert 1 < m.tests < 100


def test_a_bound_the_search_was_given_is_kept_in_the_minimized_scenario():
    """The candidates are explored with the bound the finding was made with, and the file
    says so (its replay and a later search mean the same thing); None takes a declared one
    away."""
    m = minimize(PADDED, FLAT, mutants=("pfnmap_no_retry",), preemption_bound=1)
    assert tomllib.loads(m.text)["preemption_bound"] == 1
    assert parse(m.text).preemption_bound == 1
    m = minimize("preemption_bound = 3\n" + PADDED, FLAT, mutants=("pfnmap_no_retry",),
                 preemption_bound=None)
    assert "preemption_bound" not in tomllib.loads(m.text)
    m = minimize("preemption_bound = 3\n" + PADDED, FLAT, mutants=("pfnmap_no_retry",))
    assert tomllib.loads(m.text)["preemption_bound"] == 3


def test_a_slot_placed_far_up_for_nothing_comes_down():
    """The pfnmap race on a second slot at 512 GiB (as the swarm places one) needs the slot,
    not its place: its gpa halves while it still fails and overlaps nothing."""
    far = PADDED.replace("gpa = 0x100000", "gpa = 0x8000000000").replace(
        'kind = "pfnmap"\n', "").replace("populate = true", 'kind = "pfnmap"')
    far = far.replace("page = 9\n", "page = 9\nslot = 1\n").replace(
        "pages = 8\n", "pages = 8\nslot = 1\n")
    m = minimize(far, FLAT, mutants=("pfnmap_no_retry",))
    doc = tomllib.loads(m.text)
    assert doc["slot"] == [{"slot": 0, "gpa": 0, "pages": 1},
                           {"slot": 1, "gpa": 0x1000, "pages": 1, "kind": "pfnmap"}]
    assert explore(parse(m.text), FLAT, mutants=("pfnmap_no_retry",)).failures


def test_a_scenario_that_does_not_fail_or_cannot_be_read_is_refused():
    with pytest.raises(ValueError, match="does not fail"):
        minimize(PADDED, FLAT)
    with pytest.raises(RaceScenarioError, match="needs at least one \\[\\[slot\\]\\]"):
        minimize("[[flow]]\nop = 'read'\n", FLAT)
    with pytest.raises(RaceScenarioError, match="flow 1: key 'op'"):
        minimize("[[slot]]\n[[flow]]\nop = 'fly'\n", FLAT)


def test_cli_explore_writes_the_minimized_scenario(tmp_path):
    src = tmp_path / "padded.toml"
    src.write_text(PADDED)
    out = tmp_path / "small.toml"
    runner = CliRunner()
    r = runner.invoke(main, ["explore", str(src), "--arch", FLAT, "--mutant",
                             "pfnmap_no_retry", "--minimize", str(out), "--json"])
    assert r.exit_code == 1, r.output
    done = json.loads(r.output)["minimized"]
    assert done["file"] == str(out) and done["kind"] == "invariant"
    text = out.read_text()
    assert text.startswith(f"# Minimized from {src} on {FLAT} with pfnmap_no_retry")
    assert len(parse(text).flows) == 2
    r = runner.invoke(main, done["replay"].split()[1:])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    # A clean exploration writes nothing.
    r = runner.invoke(main, ["explore", str(src), "--arch", FLAT, "--minimize",
                             str(tmp_path / "none.toml")])
    assert r.exit_code == 0 and not (tmp_path / "none.toml").exists()


def test_cli_swarm_minimizes_each_finding(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "30", "--mutant",
                             "no_flush_on_zap", "--stop-at-first", "--out", str(tmp_path),
                             "--minimize", "--json"])
    assert r.exit_code == 1, r.output
    item = json.loads(r.output)["findings"][0]
    small, big = parse(read_text(item["minimized"]["file"])[0]), parse(read_text(item["file"])[0])
    assert small.name == big.name + "-min"
    assert len(small.flows) <= len(big.flows) and len(small.accesses) <= len(big.accesses)
    r = runner.invoke(main, item["minimized"]["replay"].split()[1:])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "1", "--minimize"])
    assert r.exit_code == 2 and "--minimize: needs --out" in r.output
