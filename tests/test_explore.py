"""The race explorer: schedule ids, exhaustive search, the mutants it must find (each on the
backends where the core's mechanism is the only defence), shrinking and replay, the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvmcore.cli import main
from kvmcore.explore import (MUTANTS, builtin_names, explore, load, parse,
                             parse_schedule_id, replay, schedule_id, supports)
from kvmcore.plugins import installed_backends

FLAT = "kvmcore.testing:FlatBackend"
#: Where each mutant applies: the backends on which nothing else covers for what it removes
#: (ppc re-checks mmu_invalidate_retry in kvmppc_create_pte; arm64 and ppc invalidate their
#: TLBs inside the zap, so the core's flush is not theirs to lose).
APPLIES = {
    "no_stale_check": ["x86_tdp", "arm64_stage2", FLAT],
    "pfnmap_no_retry": ["x86_tdp", "arm64_stage2", FLAT],
    "notifier_without_invalidation": ["x86_tdp", "arm64_stage2", "ppc_radix", FLAT],
    "no_flush_on_zap": ["x86_tdp", FLAT],
    "dirty_clear_no_flush": ["x86_tdp", "arm64_stage2", FLAT],
}
CASES = [(m, s, a) for m, archs in APPLIES.items() for s in MUTANTS[m].scenarios
         for a in archs if not (s == "private_fault_vs_conversion" and a == "arm64_stage2")]


def _available(arch: str) -> bool:
    return ":" in arch or arch in installed_backends()


def test_schedule_ids_round_trip():
    assert schedule_id([0, 0, 1, 0, 2, 2, 2]) == "A2.B1.A1.C3"
    assert parse_schedule_id("A2.B1.A1.C3", 3) == [0, 0, 1, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="C1"):
        parse_schedule_id("A1.C1", 2)


def test_every_mutant_has_a_case():
    assert set(APPLIES) == set(MUTANTS)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_scenarios_are_clean_on_flat(name):
    scn = load(name)
    result = explore(scn, FLAT)
    result.assert_clean()
    assert result.exhausted and result.schedules > 1


@pytest.mark.parametrize("mutant, scenario, arch", CASES)
def test_each_mutant_is_found_and_its_shrunk_schedule_replays(mutant, scenario, arch):
    if not _available(arch):
        pytest.skip(f"{arch} is not installed")
    scn = load(scenario)
    if not supports(scn, arch):
        pytest.skip(f"{arch} cannot run {scenario}")
    result = explore(scn, arch, mutants=[mutant], max_schedules=1000)
    assert result.failures, f"{mutant} not found on {arch} in {result.schedules} schedules"
    assert result.schedules <= 1000
    failure = result.failures[0]
    again = replay(scn, arch, failure.id, mutants=[mutant])
    assert again.failure is not None and again.failure.kind == failure.kind
    assert again.failure.message == failure.message
    # Linux's code fails no oracle on that schedule; it may stop short of the schedule's end
    # where a Linux flow waits and the mutant's did not (the fault, made stale by a notifier
    # with its invalidation, waits at pf_retry_wait for the invalidation to end).
    clean = replay(scn, arch, failure.id).failure
    assert clean is None or clean.kind == "replay", clean


def test_a_scenario_error_names_the_item():
    with pytest.raises(ValueError, match="flow 1: key 'op'"):
        parse("[[slot]]\n[[flow]]\nop = 'fly'\n")


def test_cli_finds_a_mutant_and_replays_it(tmp_path):
    cli = CliRunner()
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                          "no_stale_check", "--json"])
    assert r.exit_code == 1, r.output
    failure = json.loads(r.output)["failures"][0]
    trace = tmp_path / "t.jsonl"
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                          "no_stale_check", "--replay", failure["schedule"], "--trace",
                          str(trace)])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events and {"flow", "name"} <= set(events[0])
    r = cli.invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT])
    assert r.exit_code == 0 and "(all)" in r.output


@pytest.mark.parametrize("args", [["nope.toml"], ["fault_vs_munmap", "--mutant", "nope"],
                                  ["fault_vs_munmap", "--replay", "Z9"],
                                  ["fault_vs_munmap", "--arch", "sparc64"]])
def test_cli_bad_input_is_one_line_and_exit_2(args):
    r = CliRunner().invoke(main, ["explore", *args, *(["--arch", FLAT] if "--arch" not in args
                                                       else [])])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.stderr.strip().startswith("kvmcore: error:")


def test_cli_replay_draws_the_schedule(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "race.png"
    r = CliRunner().invoke(main, ["explore", "fault_vs_munmap", "--arch", FLAT, "--mutant",
                                  "no_stale_check", "--replay", "A2.B4.A1", "--picture",
                                  str(picture)])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mutant", sorted(APPLIES))
def test_pct_finds_each_mutant_too(mutant):
    """The randomized strategy finds what the exhaustive one does, within 1000 schedules."""
    scn = load(MUTANTS[mutant].scenarios[0])
    arch = FLAT if FLAT in APPLIES[mutant] else APPLIES[mutant][0]
    result = explore(scn, arch, strategy="pct", seed=1, mutants=[mutant], max_schedules=1000)
    assert result.failures, f"pct missed {mutant} in {result.schedules} schedules"

