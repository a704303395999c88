"""Swarm testing: random race scenarios, each one explored, to find the interleavings no
written scenario covers.

Each scenario draws its flows from a random subset of the operations the backend's VM type
offers (swarm testing, Groce et al., ISSTA 2012: leaving features out of a test lets the
others go deeper than one mix of everything would), on one or two memslots of a random kind,
with accesses before the flows start, on pages chosen from a few so that the flows meet.
A failure on a model without mutants is a bug of the model or a race of Linux itself; with
a mutant on, the number of scenarios it takes to find it measures the swarm. A scenario that
fails with mutants on is explored again without them (the same search and budget): one that
fails there too is not the mutants' finding, and says so (``Finding.without_mutants``), so a
model bug or a race of Linux cannot pass for a mutant's in a measure of the swarm's power.

A backend's declared departures from the common contract (``ArchInfo.known_divergences``)
include ``explore:<oracle kind>[:<text>]`` entries (RISC-V: ``explore:downgrade``; ppc:
``explore:invariant:crosses the end of slot``): a failure they cover (``declared``) is
listed as declared, not as a finding.

Guided (``guided=True``, ``kvmcore swarm --guided``): the scenarios that opened race windows
no earlier one did (``Window``, named by operation) make a corpus, and every other scenario
after the first is one of them with one change (a flow drawn again, moved to another page,
added, dropped, or two flows swapped), as a coverage-guided fuzzer keeps what reached new
code (syzkaller's corpus; for interleavings, KRACE's and Snowboard's coverage of what ran
concurrently). The fresh scenarios are those of the unguided swarm with the same seed.

Every scenario is a TOML text of the race-scenario format (``scenario.py``) with its number
in its name: ``kvmcore swarm --out DIR`` writes each finding's file, which
``kvmcore explore FILE --replay ID`` replays; the same seed gives the same scenarios.
"""

from __future__ import annotations

import random
import time
import tomllib

import attrs

from ..errors import KvmError
from .scenario import GPC_OPS, HOST_OPS, NAMES, THP_OPS, RaceScenarioError, dumps, parse
from .search import Failure, explore, is_bound

#: Pages a flow may name: a few low ones, so that flows meet on them, and one anywhere.
HOT_PAGES = 3
#: Host mapping kinds of a slot, with the page counts each allows (hugetlb and THP: whole
#: 2 MiB pages of 4 KiB base pages; a scenario counts base pages). "thp" is anonymous memory
#: with transparent huge pages.
SLOT_KINDS = {"anon": (4, 16, 1024), "shared": (16, 1024), "pfnmap": (16, 1024),
              "hugetlb_2m": (512, 1024), "thp": (512, 1024)}
#: The host operations on any slot (a THP slot adds THP_OPS).
ANY_HOST_OPS = tuple(op for op in HOST_OPS if op not in THP_OPS)
SLOT_OPS = ("delete_slot", "move_slot", "log_dirty")
#: Host operations that change nothing on a slot of a kind, not drawn for it: Linux refuses
#: MADV_DONTNEED on VM_PFNMAP (madvise_dontneed_free_valid_vma: EINVAL), reclaim never ages a
#: VM_PFNMAP page (it has no rmap), memory_failure ignores a pfn that is no online RAM
#: (pfn_to_online_page), and the model migrates only anonymous and shared pages.
NOT_ON_KIND = {"pfnmap": ("madvise_dontneed", "migrate", "age", "poison"),
               "hugetlb_2m": ("migrate",)}


@attrs.frozen
class Finding:
    """A scenario with a failing schedule."""
    index: int
    name: str
    text: str
    vm_type: str
    failure: Failure
    #: The backend's declared reason, when the failure is a divergence it declares.
    declared: str | None = None
    #: With mutants on: the first failure of the same scenario explored without them (the
    #: same search, the same budget), None when that is clean: a finding with one is the
    #: model's or Linux's, not the mutants'.
    without_mutants: Failure | None = None


@attrs.define
class SwarmResult:
    arch: str
    seed: int
    mutants: tuple
    scenarios: int = 0          # explored
    refused: int = 0            # whose setup the model refused (KvmError): not explored
    schedules: int = 0
    seconds: float = 0.0
    findings: list = attrs.field(factory=list)
    declared: list = attrs.field(factory=list)
    #: The race windows the scenarios opened (``Window``s with each flow named by its
    #: operation, so that scenarios share them), and how many each explored scenario added
    #: first: a long tail of zeros says more scenarios of this kind add little.
    windows: set = attrs.field(factory=set)
    new_windows: list = attrs.field(factory=list)
    #: Guided: the scenarios that were a corpus scenario changed (the others are drawn fresh).
    mutated: int = 0

    def summary(self) -> dict:
        return {"arch": self.arch, "seed": self.seed, "mutants": list(self.mutants),
                "scenarios": self.scenarios, "refused": self.refused,
                "schedules": self.schedules, "seconds": round(self.seconds, 3),
                "windows": len(self.windows), "new_windows": self.new_windows,
                "mutated": self.mutated,
                "findings": [_finding(f) for f in self.findings],
                "declared": [_finding(f) for f in self.declared]}


def _finding(f: Finding) -> dict:
    return {"scenario": f.name, "vm_type": f.vm_type, **f.failure.summary(),
            **({"declared": f.declared} if f.declared else {}),
            **({"without_mutants": f.without_mutants.summary()} if f.without_mutants else {})}


def declared(divergences, failure: Failure) -> str | None:
    """The reason a backend's ``known_divergences`` gives for ``failure``: a key
    ``explore:<kind>`` covers every failure of that oracle, ``explore:<kind>:<text>`` one
    whose every problem (the ``; ``-separated parts of its message) contains ``text``."""
    problems = failure.message.split(": ", 1)[-1].split("; ")
    for key, why in divergences.items():
        scope, _, rest = key.partition(":")
        kind, _, text = rest.partition(":")
        if scope == "explore" and kind == failure.kind and \
                all(text in p for p in problems):
            return why
    return None


def vm_type_caps(arch, options: dict | None = None) -> dict[str, frozenset]:
    """The capabilities of each VM type of ``arch``, read from VMs (a backend may claim
    per VM option)."""
    return _probe(arch, options)[1]


def _probe(arch, options: dict | None):
    """``(ArchInfo, {vm_type: capabilities})`` of ``arch``'s VMs with ``options`` (a
    backend describes itself per VM option: ppc's huge_past_slot=False declares nothing)."""
    from ..vm import VM

    probe = VM(arch=arch, **(options or {}))
    caps = {}
    for vm_type in probe.arch_info.vm_types:
        vm = probe if vm_type == probe.vm_type else VM(arch=arch, vm_type=vm_type,
                                                      **(options or {}))
        caps[vm_type] = frozenset(vm.capabilities)
        if vm is not probe:
            vm.close()
    probe.close()
    return probe.arch_info, caps


def generate(rng: random.Random, vm_type: str, caps: frozenset, name: str,
             preemption_bound: int | None = None) -> str:
    """A random race scenario for a VM of type ``vm_type`` with capabilities ``caps``
    (declaring ``preemption_bound`` if given: it draws nothing)."""
    # A guest_memfd slot: private memory where the VM type has it, else one with
    # GUEST_MEMFD_FLAG_MMAP whose own mmap is the slot's userspace_addr (6.18 gives the
    # flag only to VM types without private memory).
    gmem = "gmem" in caps and rng.random() < 0.5
    mmap = gmem and "private_mem" not in caps
    private = gmem and not mmap and rng.random() < 0.6
    kind = "anon" if gmem else rng.choice(list(SLOT_KINDS))
    pages = {0: rng.choice(SLOT_KINDS[kind])}
    # A dirty ring logs the writes to the slots with KVM_MEM_LOG_DIRTY_PAGES, and then
    # KVM_GET_DIRTY_LOG has no bitmap to read.
    ring = "dirty_ring" in caps and not gmem and kind != "pfnmap" and rng.random() < 0.2
    logging = ring or ("dirty_log" in caps and not gmem and kind != "pfnmap" and
                       rng.random() < 0.3)
    # Sometimes a second slot: most often an alias of the first (its host pages at another
    # gpa: one host change, two gfn ranges to invalidate), else a small one of its own.
    alias = None
    if not gmem and rng.random() < 0.25:
        alias = rng.random() < 0.6
        pages[1] = rng.choice([n for n in (4, 16, pages[0]) if n <= pages[0]]) if alias \
            else 16
    # KVM's own mapping of a page (a gfn_to_pfn_cache), where the arch has one.
    gpc = "pfncache" in caps and not gmem and kind != "pfnmap" and rng.random() < 0.3
    # The operations this scenario may draw from: a random half of what the VM offers.
    offered = _ops_offered(kind, gmem, gpc, private, ring, logging, caps)
    offered = rng.sample(offered, max(1, len(offered) // 2))
    ops = ["read", "write"] * 2 + offered
    hot = [(0, rng.randrange(min(pages[0], 4))) for _ in range(HOT_PAGES - 1)] + \
        [(0, rng.randrange(pages[0]))]
    if alias is not None:
        hot += [(1, rng.randrange(min(pages[1], 4)))]

    vm = {"vm_type": vm_type}
    if ring:
        vm["dirty_ring"] = 65536
    if logging and not ring and "manual_dirty_protect" in caps and rng.random() < 0.5:
        vm["manual_protect"] = True
    slot0 = {"slot": 0, "gpa": 0, "pages": pages[0]}
    # A THP range faulted in whole, or populated and split to PTEs for khugepaged.
    if kind == "thp":
        slot0["thp"] = rng.choice((True, "split"))
    else:
        slot0["kind"] = kind
    if gmem:
        slot0["guest_memfd"] = "mmap" if mmap else True
    slot0.update((key, True) for key, on in (
        ("private", private), ("log_dirty", logging),
        ("populate", kind != "pfnmap" and rng.random() < 0.3)) if on)
    slots = [slot0]
    if alias is not None:
        # At 4 GiB: above slot 0 at every base page size.
        slots.append({"slot": 1, "gpa": 1 << 32, "pages": pages[1],
                      **({"alias": 0} if alias else {"kind": "anon"}),
                      **({"log_dirty": True} if logging else {})})
    accesses = []
    if gpc and rng.random() < 0.5:             # a cache already valid when the flows start
        accesses.append(_on_page("gpc_activate", *rng.choice(hot)))
    for _ in range(rng.randrange(3)):
        slot, page = rng.choice(hot)
        accesses.append(_on_page(rng.choice(("read", "write")), slot, page))
        if private:
            accesses[-1]["private"] = True
    flows = []
    for i in range(rng.choice((2, 2, 2, 3))):
        # A scenario with a pfn cache is about it: its first flow uses the cache, and a
        # deactivation races a user of the cache, which the setup made active.
        if gpc and i == 0:
            op = rng.choice(GPC_OPS)
        elif gpc and i == 1 and flows[0]["op"] == "gpc_deactivate":
            op = rng.choice(("gpc_read", "gpc_write"))
        else:
            op = rng.choice(ops)
        flows.append(_flow(rng, op, pages, hot, private))
    if flows[0]["op"] == "gpc_deactivate" and all(a["op"] != "gpc_activate"
                                                  for a in accesses):
        accesses.insert(0, _on_page("gpc_activate", *hot[0]))
    if alias is not None and rng.random() < 0.3:
        # At 512 GiB: a root-level entry of its own on x86 (4-level EPT), so a zap of a
        # whole root yields between the two slots, which the setup has both mapped. Drawn
        # last: the rest is as it was.
        slots[1]["gpa"] = 1 << 39
        mapped = {a.get("slot", 0) for a in accesses if a["op"] in ("read", "write")}
        for slot in {0, 1} - mapped:
            accesses.append(_on_page("write", *next(h for h in hot if h[0] == slot)))
    head = {"name": name} if preemption_bound is None else \
        {"name": name, "preemption_bound": preemption_bound}
    return dumps({**head, "vm": vm, "slot": slots, "access": accesses, "flow": flows})


def _on_page(op: str, slot: int, page: int) -> dict:
    return {"op": op, "page": page, **({"slot": slot} if slot else {})}


def _flow(rng: random.Random, op: str, pages: dict, hot: list, private: bool) -> dict:
    slot, page = rng.choice(hot)
    if op in SLOT_OPS + ("get_dirty_log", "clear_dirty_log"):
        slot = rng.choice(sorted(pages))
    flow = {"op": op, **({"slot": slot} if slot else {})}
    if op == "gpc_activate":
        flow["page"] = page
    elif op in ("read", "write"):
        flow["page"] = page
        if private and rng.random() < 0.7:
            flow["private"] = True
        if rng.random() < 0.3:
            flow["vcpu"] = rng.randrange(2)
    elif op == "set_memory_attributes":
        flow.update(page=page, pages=rng.choice((1, 2, 512)), attributes=rng.choice((0, 8)))
    elif op == "punch_hole":
        flow.update(page=page, pages=rng.choice((1, 2)))
    elif op == "pre_fault":
        flow.update(page=page, pages=rng.choice((1, 4)))
    elif op == "move_slot":
        flow["gpa"] = rng.choice((pages[slot], 2 * pages[slot], 4096)) * 4096
    elif op in ("munmap", "madvise_dontneed", "age"):
        flow.update(page=page, pages=rng.choice((1, 2, pages[slot] - page)))
    elif op in ("mprotect", "migrate", "host_write", "poison") + THP_OPS:
        flow["page"] = page
        if op == "mprotect":
            flow["prot"] = rng.choice(("r", "", "rw"))
        if op == "poison" and private and rng.random() < 0.5:
            flow["private"] = True          # a machine check on the guest_memfd folio
    return flow


def _ops_offered(kind: str, gmem: bool, gpc: bool, private: bool, ring: bool, logging: bool,
                 caps: frozenset) -> list[str]:
    """The operations besides guest accesses that a scenario on a slot of ``kind`` offers
    (guest_memfd, a pfn cache, private memory, a dirty ring or a dirty log as drawn)."""
    ops = [op for op in ANY_HOST_OPS if op not in NOT_ON_KIND.get(kind, ())] + list(SLOT_OPS)
    if gmem:
        ops.append("punch_hole")
        if "private_mem" in caps:
            # Not a GUEST_MEMFD_FLAG_MMAP file: the slot's mapping of one holds it open.
            ops.append("close_gmem")
    if kind == "thp":
        ops += THP_OPS
    if gpc:
        ops += GPC_OPS
    if private:
        ops.append("set_memory_attributes")
    if ring:
        ops.append("reset_dirty_rings")
    elif logging:
        ops += ["get_dirty_log", "clear_dirty_log"]
    if "pre_fault" in caps:
        ops.append("pre_fault")
    return ops


def _offered(doc: dict, caps: frozenset) -> list[str]:
    """Every operation ``generate`` could have drawn for the scenario ``doc``, read from what
    it drew (its slot's kind, its VM's features), for a change to draw from."""
    slot0 = doc["slot"][0]
    kind = "thp" if "thp" in slot0 else slot0.get("kind", "anon")
    gpc = any(item["op"] in GPC_OPS for item in doc.get("access", []) + doc["flow"])
    return ["read", "write"] + _ops_offered(
        kind, "guest_memfd" in slot0, gpc, bool(slot0.get("private")),
        bool(doc["vm"].get("dirty_ring")), bool(slot0.get("log_dirty")), caps)


def mutate(rng: random.Random, text: str, caps: frozenset, name: str) -> str:
    """``text`` (a swarm scenario) with one change drawn by ``rng``: a flow drawn again (from
    the operations ``generate`` could have offered it), moved to another page, a flow added
    (to two) or dropped (from three), or two flows swapped (the letters, so the order the
    search tries them, change); named ``name``, with a comment saying what changed."""
    doc = tomllib.loads(text)
    flows = doc["flow"]
    pages = {slot["slot"]: slot["pages"] for slot in doc["slot"]}
    hot = sorted({(item.get("slot", 0), item["page"]) for item in doc.get("access", []) + flows
                  if "page" in item} or {(0, 0)})
    private = bool(doc["slot"][0].get("private"))
    paged = [i for i, flow in enumerate(flows) if "page" in flow]
    changes = ["redraw", "swap"] + (["page"] if paged else []) + \
        (["add"] if len(flows) < 3 else ["drop"])
    change = rng.choice(changes)
    i = rng.randrange(len(flows))
    if change == "redraw":
        flows[i] = _flow(rng, rng.choice(_offered(doc, caps)), pages, hot, private)
    elif change == "page":
        flow = flows[rng.choice(paged)]
        slot = flow.get("slot", 0)
        # Mostly a low page, where the other flows meet it.
        flow["page"] = rng.randrange(min(pages[slot], 4) if rng.random() < 0.7
                                     else pages[slot])
    elif change == "swap":
        j = (i + 1 + rng.randrange(len(flows) - 1)) % len(flows)
        flows[i], flows[j] = flows[j], flows[i]
    elif change == "add":
        flows.insert(rng.randrange(len(flows) + 1),
                     _flow(rng, rng.choice(_offered(doc, caps)), pages, hot, private))
    else:
        del flows[i]
    old = doc["name"]
    doc["name"] = name
    return f"# {old} with one change ({change})\n" + dumps(doc)


def swarm(arch, scenarios: int = 100, seed: int = 0, max_schedules: int = 300,
          mutants=(), options: dict | None = None, stop_at_first: bool = False,
          progress=None, strategy: str = "dfs", depth: int = 3,
          preemption_bound: int | None = 2, guided: bool = False) -> SwarmResult:
    """Generate ``scenarios`` random scenarios for ``arch`` (scenario ``k`` from
    ``random.Random(f"{seed}:{k}")``, on a VM type drawn from the backend's) and explore
    each for up to ``max_schedules`` schedules with ``mutants`` on: depth first, or with
    ``strategy="pct"`` by random priorities of bug depth ``depth`` (seeded by ``k``), which
    spreads a small budget over the whole tree where depth first varies its last steps.
    ``preemption_bound`` (dfs; None: no bound): each scenario declares it, and its search
    runs the schedules with at most that many preemptions (``explore``). Two by default:
    every known bug of the built-in scenarios needs at most two, and a bounded search of
    three flows reaches what depth first leaves for ever beyond its budget (docs/races.md).
    With ``mutants``, a failing scenario is explored again without them (``Finding.
    without_mutants``), and ``stop_at_first`` stops at the first that is clean there: the
    first finding that is the mutants'. ``guided``: every other scenario after the first
    changes one from the corpus of those that opened new race windows (``mutate``; the
    module docstring). ``progress(k)`` is called after each one."""
    if not is_bound(preemption_bound):
        raise ValueError(f"preemption_bound={preemption_bound!r}: a non-negative number "
                         "or None")
    if strategy != "dfs":
        preemption_bound = None
    info, caps = _probe(arch, options)
    result = SwarmResult(info.name, seed, tuple(mutants))
    corpus: list = []           # (text, vm_type, new windows) of the scenarios kept
    t0 = time.perf_counter()
    for k in range(scenarios):
        rng = random.Random(f"{seed}:{k}")
        vm_type = rng.choice(sorted(caps))
        name = f"swarm-{seed}-{k}"
        text = None
        if guided and corpus:
            grng = random.Random(f"{seed}:{k}:guided")
            if grng.random() < 0.5:
                base, vm_type, _ = grng.choices(corpus, [n for *_, n in corpus])[0]
                text = mutate(grng, base, caps[vm_type], name)
                result.mutated += 1
        if text is None:
            text = generate(rng, vm_type, caps[vm_type], name, preemption_bound)
        search = dict(options=options, strategy=strategy, max_schedules=max_schedules,
                      seed=k, depth=depth)
        try:
            scn = parse(text)
            r = explore(scn, arch, vm_type, mutants=mutants, coverage=True, **search)
        except (KvmError, RaceScenarioError):
            # Refused at setup, or (a change) by the format: not explored.
            result.refused += 1
        else:
            result.scenarios += 1
            result.schedules += r.schedules
            ops = {NAMES[i]: flow["op"] for i, flow in enumerate(scn.flows)}
            new = {attrs.evolve(w, stands=ops[w.stands], runs=ops[w.runs])
                   for w in r.windows} - result.windows
            result.windows |= new
            result.new_windows.append(len(new))
            if new and guided:
                corpus.append((text, vm_type, len(new)))
            if r.failures:
                failure = r.failures[0]
                why = declared(info.known_divergences, failure)
                unmutated = None
                if mutants and why is None:
                    again = explore(scn, arch, vm_type, **search)
                    unmutated = again.failures[0] if again.failures else None
                finding = Finding(k, name, text, vm_type, failure, why, unmutated)
                (result.declared if why else result.findings).append(finding)
        if progress is not None:
            progress(k + 1)
        if stop_at_first and any(f.without_mutants is None for f in result.findings):
            break
    result.seconds = time.perf_counter() - t0
    return result
