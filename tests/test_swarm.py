"""Swarm testing: random race scenarios (kvmcore.explore.swarm, ``kvmcore swarm``)."""

from __future__ import annotations

import json
import random
import re
import tomllib

import attrs
import pytest
from click.testing import CliRunner

from kvmcore import fault
from kvmcore.cli import main
from kvmcore.explore import parse, replay
from kvmcore.explore.swarm import generate, mutate, swarm, vm_type_caps
from kvmcore.testing import FlatBackend

FLAT = "kvmcore.testing:FlatBackend"


def test_scenarios_are_valid_and_the_seed_fixes_them():
    caps = vm_type_caps(FLAT)
    texts = []
    for k in range(400):
        rng = random.Random(f"7:{k}")
        vm_type = rng.choice(sorted(caps))
        text = generate(rng, vm_type, caps[vm_type], f"swarm-7-{k}")
        scn = parse(text)
        assert scn.name == f"swarm-7-{k}" and 2 <= len(scn.flows) <= 3
        texts.append(text)
    assert len(set(texts)) == len(texts)
    # Every slot kind, THP among them (whole or split for khugepaged), with its operations,
    # the pfn cache's (flat, as x86, has CONFIG_HAVE_KVM_PFNCACHE) and KVM_PRE_FAULT_MEMORY.
    for key in ('kind = "pfnmap"', 'kind = "hugetlb_2m"', "thp = true", 'thp = "split"',
                'op = "collapse_huge_page"', 'op = "split_huge_page"', "alias = 0",
                'op = "gpc_activate"', 'op = "gpc_read"', 'op = "gpc_write"',
                'op = "pre_fault"'):
        assert any(key in t for t in texts), key
    assert not any("huge_page" in t and "thp" not in t for t in texts)
    # A memory error names its page (a hot one, as the other flows' are), and on private
    # memory sometimes the guest_memfd folio's.
    poisons = [f for d in map(tomllib.loads, texts) for f in d["flow"] if f["op"] == "poison"]
    assert poisons and all("page" in f for f in poisons)
    assert any(f.get("private") for f in poisons)
    # A deactivation of the pfn cache races a user of it, on a cache the setup activated.
    deactivating = [d for d in map(tomllib.loads, texts)
                    if d["flow"][0]["op"] == "gpc_deactivate"]
    assert deactivating and all(
        d["flow"][1]["op"] in ("gpc_read", "gpc_write") and
        any(a["op"] == "gpc_activate" for a in d["access"]) for d in deactivating)
    # Nothing Linux refuses on, or never does to, a VM_PFNMAP range.
    pfnmap = [t for t in texts if 'kind = "pfnmap"' in t]
    assert pfnmap and not any(f'op = "{op}"' in t for t in pfnmap
                              for op in ("madvise_dontneed", "migrate", "age"))
    assert any('op = "munmap"' in t for t in pfnmap)
    # A second slot at 512 GiB comes with a page of each slot mapped at setup.
    far = [d for d in map(tomllib.loads, texts)
           if len(d["slot"]) == 2 and d["slot"][1]["gpa"] == 1 << 39]
    assert far and all({a.get("slot", 0) for a in d["access"] if a["op"] in ("read", "write")}
                       == {0, 1} for d in far)
    again = swarm(FLAT, scenarios=5, seed=7, max_schedules=5)
    assert again.scenarios + again.refused == 5
    assert swarm(FLAT, scenarios=5, seed=7, max_schedules=5).summary()["schedules"] == \
        again.schedules


def test_the_model_is_clean_under_the_swarm():
    """A regression net: every bug the swarm has found in the model stays fixed (each also
    has its own test)."""
    result = swarm(FLAT, scenarios=40, seed=0)
    assert result.scenarios > 30 and result.schedules > 10 * result.scenarios
    assert result.findings == [], result.findings[0].text
    # The race windows the scenarios opened, named by operation: each counted once, by the
    # scenario that opened it first.
    assert len(result.new_windows) == result.scenarios
    assert sum(result.new_windows) == len(result.windows) == result.summary()["windows"]
    ops = {w.stands for w in result.windows} | {w.runs for w in result.windows}
    assert {"read", "write", "munmap"} <= ops and not ops & {"A", "B", "C"}


def test_the_swarm_finds_a_mutant_and_its_scenario_replays():
    result = swarm(FLAT, scenarios=50, seed=0, mutants=("no_flush_on_zap",),
                   stop_at_first=True)
    finding = result.findings[0]
    assert finding.failure.kind == "invariant" and "TLB" in finding.failure.message
    run = replay(parse(finding.text), FLAT, finding.failure.id, finding.vm_type,
                 mutants=("no_flush_on_zap",))
    assert run.failure is not None and run.failure.kind == "invariant"


def test_a_finding_that_fails_without_the_mutants_is_not_theirs(monkeypatch):
    """With mutants on, each failing scenario is explored again without them: under a model
    bug of its own (the stale-fault check gone for good, not as a mutant), the swarm marks
    the findings that fail without the mutant too and stops at the first that does not."""
    found = swarm(FLAT, scenarios=30, seed=5, mutants=("log_dirty_no_flush",),
                  stop_at_first=True)
    assert [(f.index, f.without_mutants) for f in found.findings] == [(17, None)]
    monkeypatch.setattr(fault, "is_page_fault_stale", lambda vm, f: False)
    result = swarm(FLAT, scenarios=30, seed=5, mutants=("log_dirty_no_flush",),
                   stop_at_first=True)
    model_bug, first = result.findings
    assert (model_bug.index, first.index) == (16, 17) and first.without_mutants is None
    assert model_bug.without_mutants.kind == "invariant"
    again = replay(parse(model_bug.text), FLAT, model_bug.without_mutants.id, model_bug.vm_type)
    assert again.failure is not None and again.failure.kind == "invariant"
    item = result.summary()["findings"][0]
    assert item["without_mutants"]["schedule"] == model_bug.without_mutants.id
    assert "without_mutants" not in result.summary()["findings"][1]
    r = CliRunner().invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "30", "--seed", "5",
                                  "--mutant", "log_dirty_no_flush", "--stop-at-first"])
    assert r.exit_code == 1 and "2 failing (1 also without the mutants)" in r.output
    assert "not the mutants': it fails without them too (invariant, schedule" in r.output


def test_a_bounded_swarm_draws_the_same_scenarios_and_declares_its_bound():
    """``preemption_bound`` (2 by default) draws nothing: the scenarios are the unbounded
    swarm's with the key added; each is searched within it, and the swarm finds the mutant
    in the same scenario (the bug needs one preemption)."""
    caps = vm_type_caps(FLAT)
    for k in range(50):
        a, b = (generate(random.Random(f"3:{k}"), "default", caps["default"], "s", bound)
                for bound in (None, 1))
        assert b == a.replace('name = "s"\n', 'name = "s"\npreemption_bound = 1\n')
        assert parse(b).preemption_bound == 1
    bounded = swarm(FLAT, scenarios=50, seed=0, mutants=("no_flush_on_zap",),
                    stop_at_first=True)
    free = swarm(FLAT, scenarios=50, seed=0, mutants=("no_flush_on_zap",), stop_at_first=True,
                 preemption_bound=None)
    assert bounded.findings[0].index == free.findings[0].index
    assert "preemption_bound = 2" in bounded.findings[0].text
    assert "preemption_bound" not in free.findings[0].text
    clean = swarm(FLAT, scenarios=8, seed=0)
    assert clean.findings == [] and \
        clean.schedules < swarm(FLAT, scenarios=8, seed=0, preemption_bound=None).schedules
    pct = swarm(FLAT, scenarios=2, seed=0, strategy="pct", max_schedules=5)
    assert pct.schedules == 10                   # pct ignores the bound
    for bad in (-1, True, "2"):
        with pytest.raises(ValueError, match="preemption_bound="):
            swarm(FLAT, scenarios=1, preemption_bound=bad)
    for arg, ok in (("none", True), ("1", True), ("-1", False), ("x", False)):
        r = CliRunner().invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "3",
                                      "--preemption-bound", arg, "--json"])
        assert (r.exit_code == 0) is ok, (arg, r.output)
        if ok:
            assert json.loads(r.output)["scenarios"] == 3
        else:
            assert r.exit_code == 2 and "not a non-negative number or none" in r.output


def test_mutate_makes_one_change_that_parses():
    """A corpus scenario with one change: each kind is drawn, the result parses, keeps two
    or three flows and the rest of the scenario, and says what it came from."""
    caps = vm_type_caps(FLAT)
    seen = set()
    for k in range(200):
        rng = random.Random(f"5:{k}")
        vm_type = rng.choice(sorted(caps))
        text = generate(rng, vm_type, caps[vm_type], f"swarm-5-{k}", 2)
        again = mutate(random.Random(k), text, caps[vm_type], "child")
        assert again == mutate(random.Random(k), text, caps[vm_type], "child")
        change = re.match(r"# swarm-5-\d+ with one change \((\w+)\)\n", again).group(1)
        seen.add(change)
        scn, before = parse(again), parse(text)
        assert scn.name == "child" and 2 <= len(scn.flows) <= 3
        assert (scn.vm["vm_type"], scn.slots, scn.accesses, scn.preemption_bound) == \
            (before.vm["vm_type"], before.slots, before.accesses, before.preemption_bound)
        if change == "swap":
            # A store's default offset goes with its place (8 times the flow's number).
            assert sorted(str(f | {"offset": 0}) for f in scn.flows) == \
                sorted(str(f | {"offset": 0}) for f in before.flows)
        elif change in ("add", "drop"):
            assert abs(len(scn.flows) - len(before.flows)) == 1
    assert seen == {"redraw", "page", "swap", "add", "drop"}


def test_a_guided_swarm_changes_what_opened_new_windows():
    """Guided, every other scenario after the first changes one that opened new race
    windows; the others are the unguided swarm's, and the same seed gives the same run."""
    plain = swarm(FLAT, scenarios=30, seed=0, max_schedules=50)
    guided = swarm(FLAT, scenarios=30, seed=0, max_schedules=50, guided=True)
    assert plain.mutated == 0 and 5 < guided.mutated < 25
    assert guided.summary() | {"seconds": 0} == \
        swarm(FLAT, scenarios=30, seed=0, max_schedules=50, guided=True).summary() | \
        {"seconds": 0}
    # Scenario 0 is drawn fresh either way (the corpus is empty before it).
    assert guided.new_windows[0] == plain.new_windows[0]
    found = swarm(FLAT, scenarios=50, seed=0, mutants=("no_flush_on_zap",),
                  stop_at_first=True, guided=True)
    assert found.findings and found.findings[-1].without_mutants is None
    r = CliRunner().invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "6", "--guided",
                                  "--max-schedules", "20", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["mutated"] > 0


class DeclaringFlat(FlatBackend):
    arch_info = attrs.evolve(FlatBackend.arch_info, known_divergences={
        "explore:invariant": "a test's declared divergence"})


def test_a_declared_kind_is_listed_not_counted():
    result = swarm(DeclaringFlat, scenarios=20, seed=0, mutants=("no_flush_on_zap",))
    assert result.findings == [] and result.declared
    assert result.declared[0].declared == "a test's declared divergence"
    assert result.summary()["declared"][0]["declared"] == "a test's declared divergence"


def test_cli_writes_the_failing_scenarios_and_exits_1(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "30",
                             "--mutant", "no_flush_on_zap", "--stop-at-first",
                             "--out", str(tmp_path), "--json"])
    assert r.exit_code == 1, r.output
    summary = json.loads(r.output)
    item = summary["findings"][0]
    r = runner.invoke(main, ["explore", item["file"], "--arch", FLAT, "--replay",
                             item["schedule"], "--mutant", "no_flush_on_zap"])
    assert r.exit_code == 1 and "FAILED invariant" in r.output
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "3"])
    assert r.exit_code == 0 and "3 scenarios explored" in r.output
    assert re.search(r"\d+ race windows opened \(by operation and point; the last 1 "
                     r"scenarios opened \d+ new\)", r.output)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    for args in (["--mutant", "nope"], ["--arch", "nope"], ["--scenarios", "0"],
                 ["--out", str(tmp_path / "f" / "x")]):
        if args[0] == "--out":
            (tmp_path / "f").write_text("")
        r = runner.invoke(main, ["swarm", *args])
        assert r.exit_code == 2, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_pct_spreads_the_budget_and_finds_the_mutant_too():
    result = swarm(FLAT, scenarios=30, seed=0, max_schedules=100, strategy="pct",
                   mutants=("no_flush_on_zap",), stop_at_first=True)
    finding = result.findings[0]
    run = replay(parse(finding.text), FLAT, finding.failure.id, finding.vm_type,
                 mutants=("no_flush_on_zap",))
    assert run.failure is not None and run.failure.kind == finding.failure.kind
    assert swarm(FLAT, scenarios=10, seed=0, max_schedules=50, strategy="pct").findings == []


def test_a_declared_text_covers_only_failures_whose_every_problem_says_it():
    from kvmcore.explore import Failure
    from kvmcore.explore.swarm import declared

    ppc = {"explore:invariant:crosses the end of slot": "ppc's quirk"}
    one = Failure("invariant", "after B: leaf gfn 0x100000: crosses the end of slot 0x1", [])
    two = Failure("invariant", "after B: leaf gfn 0x100000: crosses the end of slot 0x1; "
                               "leaf gfn 0x5: maps pfn 0x9, the backing gives 0x7", [])
    assert declared(ppc, one) == "ppc's quirk" and declared(ppc, two) is None
    assert declared({"explore:invariant": "all"}, two) == "all"
    assert declared({"explore:downgrade": "riscv"}, two) is None
    assert declared({"test_x": "a conformance test"}, one) is None


def test_cli_passes_vm_options_and_refuses_bad_ones(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "3",
                             "--vm-option", "page_size=65536"])
    assert r.exit_code == 0 and "3 scenarios explored" in r.output
    for bad in ("page_size", "nope=1"):
        r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "1",
                                 "--vm-option", bad])
        assert r.exit_code == 2, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    path = tmp_path / "s.toml"
    path.write_text("[[slot]]\n[[flow]]\nop = 'read'\n")
    r = runner.invoke(main, ["explore", str(path), "--arch", FLAT,
                             "--vm-option", "page_size=65536"])
    assert r.exit_code == 0 and "1 schedules (all)" in r.output
    r = runner.invoke(main, ["explore", str(path), "--arch", FLAT, "--vm-option", "nope=1"])
    assert r.exit_code == 2


def test_the_model_logs_only_at_a_log_level_asked_for(monkeypatch):
    """explore and swarm replay the same flows per schedule: what the model logs (a Linux
    WARN a backend prints) would repeat thousands of times, so it shows only when
    --log-level is given."""
    import importlib

    import structlog

    sw = importlib.import_module("kvmcore.explore.swarm")   # the module, not the function

    real = sw.explore

    def warning_explore(*args, **kwargs):
        structlog.get_logger("kvmcore.test").warning("model.warn_once_per_schedule")
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "explore", warning_explore)
    runner = CliRunner()
    r = runner.invoke(main, ["swarm", "--arch", FLAT, "--scenarios", "2",
                             "--max-schedules", "2"])
    assert r.exit_code == 0 and "model.warn_once_per_schedule" not in r.output
    r = runner.invoke(main, ["--log-level", "warning", "swarm", "--arch", FLAT,
                             "--scenarios", "2", "--max-schedules", "2"])
    assert r.exit_code == 0 and r.output.count("model.warn_once_per_schedule") == 2
