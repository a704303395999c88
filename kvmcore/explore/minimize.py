"""Scenario minimization: the smallest race scenario that still fails the way a larger one does.

A swarm finding is a random scenario: two or three flows, setup accesses, a second slot, a
dirty ring, on pages picked from a few. Most of it is beside the point. ``minimize`` takes it
apart one piece at a time, as delta debugging does (Zeller and Hildebrandt, "Simplifying and
isolating failure-inducing input", TSE 2002; C-Reduce's greedy passes): drop a flow, an
access, a slot; drop an optional key (populate, log_dirty, a vCPU number, a prot); make a
number smaller (a slot's pages or gpa, a range's pages, a page). A candidate is kept when
exploring it still fails an oracle of the same kind within the budget, and is not a failure
the backend declares as a divergence when the original was not one. Passes repeat until one
keeps nothing.

The result is a scenario of the same format, its failure (the schedule shrunk as ``explore``
shrinks it), and how many explorations it took. Each candidate is explored from scratch with the
same strategy and budget, so the result is deterministic; a candidate the model refuses
(a scenario that does not parse, a setup ``KvmError``) is not kept.
"""

from __future__ import annotations

import copy
import time
import tomllib

import attrs

from ..errors import KvmError
from .scenario import RaceScenarioError, dumps, parse
from .search import Failure, explore

#: Keys that may go, by table: each has a default that is the simpler scenario.
OPTIONAL_KEYS = {
    "vm": ("manual_protect", "dirty_ring", "vm_type"),
    "slot": ("populate", "log_dirty", "private", "kind", "alias", "guest_memfd"),
    "access": ("private", "slot", "gpc"),
    "flow": ("vcpu", "private", "prot", "pages", "slot", "gpc", "data", "attributes", "gpa"),
}
#: Smaller slot sizes to try, in base pages: a huge page's worth, a few pages, one.
SLOT_PAGES = (1, 2, 4, 16, 512)


@attrs.frozen
class Minimized:
    """A minimized scenario: its TOML ``text``, the ``failure`` it still has, the
    ``original`` failure, and the explorations (``tests``) and seconds it took."""
    text: str
    failure: Failure
    original: Failure
    tests: int
    seconds: float


def minimize(text: str, arch, vm_type: str | None = None, options: dict | None = None,
             mutants=(), max_schedules: int = 300, strategy: str = "dfs", seed: int = 0,
             depth: int = 3, progress=None,
             preemption_bound: int | None | str = "scenario") -> Minimized:
    """Minimize the race scenario ``text`` (TOML) on backend ``arch`` (with ``vm_type``,
    ``options`` and ``mutants`` as ``explore`` takes them): the smallest scenario found whose
    exploration (``strategy``, ``max_schedules``, ``seed``, ``depth``, ``preemption_bound``:
    written into each candidate unless ``"scenario"``) fails an oracle of the kind the
    original's first failure has. ``progress(tests)`` is called after each
    exploration. ``RaceScenarioError`` if ``text`` is not a race scenario, ``ValueError``
    if it does not fail within the budget."""
    from ..vm import VM
    from .swarm import declared

    t0 = time.perf_counter()
    parse(text)                         # a scenario that cannot be read says why, first
    doc = tomllib.loads(text)
    if vm_type is not None:
        doc.setdefault("vm", {})["vm_type"] = vm_type
    if preemption_bound != "scenario":
        doc.pop("preemption_bound", None)
        if preemption_bound is not None:
            doc["preemption_bound"] = preemption_bound
    probe = VM(arch=arch, **(options or {}))
    divergences = probe.arch_info.known_divergences
    probe.close()
    tests = 0
    seen: dict[str, Failure | None] = {}

    def first_failure(candidate: dict) -> Failure | None:
        nonlocal tests
        key = dumps(candidate)
        if key in seen:
            return seen[key]
        seen[key] = None
        try:
            scn = parse(key)
            r = explore(scn, arch, options=options, strategy=strategy,
                        max_schedules=max_schedules, seed=seed, depth=depth, mutants=mutants)
        except (RaceScenarioError, KvmError, ValueError):
            return None
        finally:
            tests += 1
            if progress is not None:
                progress(tests)
        seen[key] = r.failures[0] if r.failures else None
        return seen[key]

    original = first_failure(doc)
    if original is None:
        raise ValueError(f"the scenario does not fail within {max_schedules} schedules")
    allowed = declared(divergences, original) is not None

    def same(f: Failure | None) -> bool:
        return f is not None and f.kind == original.kind and (
            allowed or declared(divergences, f) is None)

    best = original
    kept = True
    while kept:
        kept = False
        candidates, i = list(_candidates(doc)), 0
        while i < len(candidates):
            f = first_failure(candidates[i])
            if same(f):
                # Go on from the same place among the smaller scenario's candidates.
                doc, best, kept = candidates[i], f, True
                candidates = list(_candidates(doc))
            else:
                i += 1
    if isinstance(doc.get("name"), str) and not doc["name"].endswith("-min"):
        doc["name"] += "-min"
    return Minimized(dumps(doc), best, original, tests, time.perf_counter() - t0)


def _candidates(doc: dict):
    """Smaller variants of ``doc``, the coarsest first: without a flow, an access, a slot
    (with the items on it), an optional key; with a smaller number (a slot's pages, then its
    gpa; a range's pages; a page)."""
    flows, accesses = doc.get("flow", []), doc.get("access", [])
    slots = doc.get("slot", [])
    if len(flows) > 1:
        for i in range(len(flows)):
            yield _without(doc, "flow", i)
    for i in range(len(accesses)):
        yield _without(doc, "access", i)
    for i, s in enumerate(slots[1:], 1):
        sid = s.get("slot", i)
        c = copy.deepcopy(doc)
        del c["slot"][i]
        for table in ("access", "flow"):
            if table in c:
                c[table] = [item for item in c[table] if item.get("slot", 0) != sid]
        if c.get("flow"):
            yield c
    for table, keys in OPTIONAL_KEYS.items():
        items = [doc.get(table, {})] if table == "vm" else doc.get(table, [])
        for i, item in enumerate(items):
            for key in keys:
                if key in item:
                    c = copy.deepcopy(doc)
                    del (c[table] if table == "vm" else c[table][i])[key]
                    yield c
    for i, s in enumerate(slots):
        if s.get("thp") == "split":
            yield _with(doc, "slot", i, "thp", True)
        elif s.get("thp") is True:
            yield _without_key(doc, "slot", i, "thp")
        for n in SLOT_PAGES:
            if n < s.get("pages", 16):
                yield _with(doc, "slot", i, "pages", n)
        # Half the gpa, while it stays page-aligned: a slot placed far up for nothing comes
        # down next to the others (one that overlaps them is refused, so not kept).
        if isinstance(s.get("gpa"), int) and s["gpa"] and s["gpa"] % 8192 == 0:
            yield _with(doc, "slot", i, "gpa", s["gpa"] // 2)
    used = sorted({item["page"] for item in accesses + flows if isinstance(item.get("page"), int)})
    # A page every item names at once, then one item's: flows meet where they did.
    for p in reversed(used):
        for q in [0] + used:
            if q < p:
                c = copy.deepcopy(doc)
                for item in c.get("access", []) + c.get("flow", []):
                    if item.get("page") == p:
                        item["page"] = q
                yield c
    for table in ("access", "flow"):
        for i, item in enumerate(doc.get(table, [])):
            for n in (1, 2):
                if isinstance(item.get("pages"), int) and n < item["pages"]:
                    yield _with(doc, table, i, "pages", n)
            if isinstance(item.get("page"), int):
                for p in [0] + used:
                    if p < item["page"]:
                        yield _with(doc, table, i, "page", p)


def _without(doc: dict, table: str, i: int) -> dict:
    c = copy.deepcopy(doc)
    del c[table][i]
    return c


def _with(doc: dict, table: str, i: int, key: str, value) -> dict:
    c = copy.deepcopy(doc)
    c[table][i][key] = value
    return c


def _without_key(doc: dict, table: str, i: int, key: str) -> dict:
    c = copy.deepcopy(doc)
    del c[table][i][key]
    return c
