"""Searching the interleavings of a race scenario's flows.

A *schedule* is the sequence of flows chosen to run one stretch each (from one race point to
the next); its id writes runs of the same flow as the flow's letter and the run's length:
``A2.B1.A1`` runs two stretches of A, one of B, one of A. Every schedule is run on a fresh
world (VM creation costs a fraction of a millisecond), so the search keeps no model state:

- ``dfs``: every schedule, depth first: run the lowest runnable flow at each step, then
  backtrack to the deepest step with an untried runnable flow (stateless model checking);
  with a preemption bound N (``--preemption-bound``, or the scenario's), every schedule with
  at most N switches away from a flow that could have gone on;
- ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): random flow
  priorities, ``depth - 1`` random steps at which the running flow drops to the lowest
  priority; each schedule has probability >= 1/(n * k^(d-1)) of hitting a given bug of depth d.

Oracles (``oracles.py``), after every step: ``vm.check_invariants()`` (the core's and the
backend's: every leaf maps what a fresh fault would resolve now outside an invalidation in
progress, every TLB entry is backed by a leaf once no flow holds the MMU lock); an access that
completed went to the frame the host maps at its hva (or guest_memfd's folio); a valid pfn cache
is on kvm->gpc_list; no leaf or TLB entry reaches a frame the host freed; a leaf that a
completed access used is not taken away or made read-only without an invalidation; a flow
raising anything but a guest exit, KvmError or a host signal is a crash; no runnable flow while
some are unfinished is a deadlock; a flow still running after ``MAX_FLOW_STEPS`` stretches more
than it takes alone, or a vCPU access whose fault retried without progress until it gave up
(``FaultLivelock``), is a livelock. At the end, the invariants again; no lost page: every
anonymous page the host allocated while the flows ran is mapped or was freed; no lost write:
every store that completed is where it stored at the end; and dirty-log completeness: every
guest write that completed after the last dirty-log ioctl returned is reported by the next
KVM_GET_DIRTY_LOG or dirty ring harvest. A flow whose scenario lists how it may end (``expect``)
and that ends otherwise is ``unexpected``.
"""

from __future__ import annotations

import contextlib
import errno
import random
import re
import time

import attrs

from ..errors import FaultLivelock, InvariantError, KvmError
from ..exits import VcpuExit
from ..host import SigBus, SigSegv
from ..invariants import all_leaves, check_vm
from ..plugins import resolve_backend
from .oracles import Oracles
from .scenario import NAMES, RaceScenario, World, outcome_name

#: A flow that has run this many stretches more than it runs alone (``Explorer.budgets``)
#: in one schedule is reported as a livelock.
MAX_FLOW_STEPS = 200
#: A flow still running after this many stretches alone never ends: its budget is
#: MAX_FLOW_STEPS.
SOLO_CAP = 100_000


@attrs.define
class Failure:
    kind: str            # invariant, crash, deadlock, livelock
    message: str
    schedule: list

    @property
    def id(self) -> str:
        return schedule_id(self.schedule)

    def summary(self) -> dict:
        return {"kind": self.kind, "schedule": self.id, "message": self.message}


@attrs.define
class Result:
    scenario: str
    arch: str
    strategy: str
    mutants: tuple
    schedules: int = 0
    steps: int = 0
    seconds: float = 0.0
    end_states: set = attrs.field(factory=set)
    failures: list = attrs.field(factory=list)
    exhausted: bool = False
    #: dfs with the reduction: runs stopped because every runnable flow was asleep (each
    #: stands for a subtree of orderings equivalent to explored ones).
    pruned: int = 0
    #: dfs: at most this many preemptions per schedule (``exhausted``: every such schedule).
    preemption_bound: int | None = None
    #: With ``coverage``: the race windows the schedules opened (``Window``), else None.
    windows: set | None = None

    @property
    def schedules_per_second(self) -> float:
        return self.schedules / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        return not self.failures

    def assert_clean(self) -> None:
        if self.failures:
            f = self.failures[0]
            raise AssertionError(f"{self.scenario} on {self.arch}: {f.kind} in schedule "
                                 f"{f.id}: {f.message}")

    def summary(self) -> dict:
        return {"scenario": self.scenario, "arch": self.arch, "strategy": self.strategy,
                "mutants": list(self.mutants), "schedules": self.schedules,
                "exhausted": self.exhausted, "steps": self.steps,
                "seconds": round(self.seconds, 3),
                "schedules_per_s": round(self.schedules_per_second, 1),
                "distinct_end_states": len(self.end_states), "pruned": self.pruned,
                "preemption_bound": self.preemption_bound,
                "failures": [f.summary() for f in self.failures],
                **({} if self.windows is None else
                   {"windows": [attrs.asdict(w) for w in sorted(self.windows)]})}


@attrs.frozen(order=True)
class Window:
    """A race window a schedule opened: while flow ``stands`` was paused at its race point
    ``at`` (started, not ended), flow ``runs`` ran one stretch, from its point ``start`` (its
    first stretch: ``"start"``) to ``end`` (its last: ``"end"``). The code of that stretch
    ran inside the window: a fault standing at ``pf_seq_snapshot`` while a conversion runs
    from ``attr_pre_lock_wait`` to ``attr_store_window`` (its zap) is the interleaving of the
    seed threads' first race. Flows are named by their letters (``A``, ``B``, ...)."""
    stands: str
    at: str
    runs: str
    start: str
    end: str


def schedule_id(schedule: list) -> str:
    return ".".join(f"{NAMES[i]}{n}" for i, n in _blocks(schedule))


def parse_schedule_id(text: str, nflows: int) -> list:
    schedule = []
    for part in filter(None, text.strip().split(".")):
        m = re.fullmatch(r"([A-D])(\d+)", part)
        if m is None or NAMES.index(m.group(1)) >= nflows:
            raise ValueError(f"schedule id {text!r}: {part!r} is not a flow letter (A-"
                             f"{NAMES[nflows - 1]}) and a count")
        schedule += [NAMES.index(m.group(1))] * int(m.group(2))
    return schedule


@attrs.define
class Run:
    """One schedule run on a fresh world: the choices made, what was runnable at each step,
    and how it ended."""

    world: World
    schedule: list = attrs.field(factory=list)
    choices: list = attrs.field(factory=list)       # runnable flow indices at each step
    asleep: list = attrs.field(factory=list)        # the sleep set at each step (reduction)
    pruned: bool = False        # stopped where every runnable flow was asleep: no schedule
    outcomes: dict = attrs.field(factory=dict)
    ended_at: dict = attrs.field(factory=dict)      # flow index -> step at which it ended
    trace: list = attrs.field(factory=list)
    failure: Failure | None = None
    oracles: Oracles | None = None
    #: The present leaves of the state the oracles checked last (``all_leaves``), while it is
    #: the state now: the end state reads them.
    leaves: list | None = None
    #: With the Explorer's ``coverage``: the windows this run opened (``Window``).
    windows: set = attrs.field(factory=set)


class Explorer:
    """Runs schedules of one race scenario on one backend configuration."""

    def __init__(self, scn: RaceScenario, arch, vm_type: str, options: dict | None = None,
                 trace: bool = False, preemption_bound: int | None = None,
                 coverage: bool = False):
        self.scn = scn
        #: Record the race windows each run opens (``Run.windows``).
        self.coverage = coverage
        #: At most this many preemptions per schedule (``_run``); None: no bound.
        self.preemption_bound = preemption_bound
        self.arch = arch
        self.vm_type = vm_type
        self.options = dict(options or {})
        self.keep_trace = trace
        self._indep = None
        self._budgets = None
        #: The backend class, resolved once for every world of the search.
        self.backend = resolve_backend(arch)

    def independence(self, world: World) -> list:
        """``indep[i][j]``: flows i and j commute (the partial-order reduction's relation):
        both are guest accesses whose footprints (``World.footprint``) share nothing that one
        of them writes. Every other pair is dependent."""
        if self._indep is None:
            fps = [world.footprint(i) for i in range(len(world.flows))]
            self._indep = [[i != j and a is not None and b is not None and not any(
                k in b and "w" in (a[k], b[k]) for k in a) for j, b in enumerate(fps)]
                for i, a in enumerate(fps)]
        return self._indep

    def budgets(self) -> list[int]:
        """Per flow, the stretches after which it is reported as a livelock: MAX_FLOW_STEPS
        more than it runs alone from the setup state, plus one per page of its range. An
        aging or a zap of a large range stops at every mapping it meets, as Linux's loop
        does, and another flow may split a huge mapping it would have met once (a THP split
        by a DONTNEED) into a mapping per page: that is work, not a livelock."""
        if self._budgets is None:
            self._budgets = []
            for i in range(len(self.scn.flows)):
                world = World(self.scn, self.backend, self.vm_type, self.options)
                flow, n = world.flows[i], 0
                try:
                    while n < SOLO_CAP:
                        n += 1
                        next(flow)
                except Exception:  # noqa: BLE001 - it ended: returned, raised or crashed
                    pass
                for f in world.flows:
                    f.close()
                self._budgets.append(MAX_FLOW_STEPS + self.scn.flows[i].get("pages", 1) +
                                     (n if n < SOLO_CAP else 0))
        return self._budgets

    def run(self, prefix: list, policy=None, reduce: bool = False, checked: int = 0) -> Run:
        """``_run``, then the flows a failure or a pruned schedule left paused are closed (as
        if their threads were killed there: their ``finally`` blocks release their locks),
        now and each as its own flow, not later by the garbage collector in whatever order
        it finalizes a flow and its generators."""
        r = self._run(prefix, policy, reduce, checked)
        for flow in r.world.flows:
            flow.close()
        return r

    def _run(self, prefix: list, policy, reduce: bool, checked: int) -> Run:
        """Run ``prefix``, then ``policy(runnable, step) -> flow index`` (the lowest runnable
        flow by default) until every flow ends or a failure.

        ``checked``: the first steps of ``prefix`` whose states an earlier run of the same
        prefix has already checked (the model is deterministic, so the state after a prefix
        is always the same): the per-step oracles skip them, keeping only their bookkeeping.
        The depth-first search passes the depth it backtracked to, so each node of the
        schedule tree is checked once rather than once per schedule through it.

        ``reduce``: keep sleep sets (Godefroid's partial-order reduction): after the choice
        c at a step, a flow stays asleep while it commutes with what runs; a flow that was
        runnable and below c was explored before c in the depth-first order, so it falls
        asleep too. A step where every runnable flow is asleep would only repeat an
        explored ordering: the run stops there (``pruned``).

        With ``preemption_bound`` (Musuvathi and Qadeer's iterative context bounding, PLDI
        2007): a *preemption* is a switch away from a flow that could have gone on (not one
        that ended or waits for a lock or a grace period); once a schedule has made that many,
        the flow that ran last is the only choice while it can run. ``choices`` records the
        allowed flows, so the depth-first search tries no other."""
        r = Run(World(self.scn, self.backend, self.vm_type, self.options))
        r.oracles = Oracles(r.world)
        flows = r.world.flows
        indep = self.independence(r.world) if reduce else None
        asleep: set = set()
        steps_of = [0] * len(flows)
        step, replayed = 0, len(prefix)
        bound, preemptions, last = self.preemption_bound, 0, None
        while True:
            runnable = [i for i, f in enumerate(flows) if f.runnable]
            if bound is not None and preemptions >= bound and last in runnable:
                runnable = [last]
            if not runnable:
                if any(not f.done for f in flows):
                    r.failure = Failure("deadlock", "no flow can run: " + "; ".join(
                        f"{f.name} at {f.point} waits for {f.waits_for}"
                        for f in flows if not f.done), r.schedule)
                else:
                    # The state after the last step is the end state, and it was checked then
                    # (in this run, or in the earlier run whose prefix this one replays).
                    if not step:
                        self._check(r, "end")
                    if r.failure is None:
                        problem = r.oracles.at_end(r)
                        if problem:
                            r.failure = Failure(problem[0], "end: " + problem[1], r.schedule)
                return r
            if step < replayed:
                choice = prefix[step]
                if choice not in runnable:
                    r.failure = Failure("replay", f"step {step}: flow {NAMES[choice]} cannot "
                                        "run here", r.schedule)
                    return r
            elif indep is None:
                choice = policy(runnable, step) if policy else runnable[0]
            else:
                awake = [i for i in runnable if i not in asleep]
                if not awake:
                    r.pruned = True
                    return r
                choice = awake[0]
            r.choices.append(runnable)
            if indep is not None:
                r.asleep.append(asleep)
                row = indep[choice]
                # ``runnable`` is ascending: the flows before ``choice`` in it are below it.
                asleep = {t for t in asleep.union(runnable[:runnable.index(choice)])
                          if row[t]}
            r.schedule.append(choice)
            if bound is not None:
                if choice != last and last in runnable:
                    preemptions += 1
                last = choice
            step += 1
            steps_of[choice] += 1
            # The budgets are measured only when a flow runs long (most never do).
            if steps_of[choice] > MAX_FLOW_STEPS and steps_of[choice] > self.budgets()[choice]:
                r.failure = Failure("livelock", f"{flows[choice].name} ran "
                                    f"{self.budgets()[choice]} stretches without ending",
                                    list(r.schedule))
                return r
            start = (flows[choice].point or "start") if self.coverage else None
            ended = self._step(r, choice)
            if start is not None:
                # A stretch that ended the flow, or failed (the flow stops there), runs to "end".
                point = flows[choice].point
                end = point if point is not None and not ended and r.failure is None else "end"
                for i, f in enumerate(flows):
                    if i != choice and f.point is not None and not f.done:
                        r.windows.add(Window(NAMES[i], f.point, NAMES[choice], start, end))
            if step <= checked:
                if ended:
                    r.oracles.flow_ended(choice, r.outcomes[choice])
                r.oracles.count_step(choice)
            elif r.failure is None:
                self._check(r, f"after {NAMES[choice]}", choice, ended)
            if r.failure is not None:
                return r

    def _step(self, r: Run, i: int) -> bool:
        """Run a stretch of flow ``i``: True when the flow ended (``r.outcomes[i]``), for the
        oracles to record (``Oracles.flow_ended``)."""
        flow = r.world.flows[i]
        try:
            point = next(flow)
            if self.keep_trace:
                r.trace.append({"flow": NAMES[i], "name": flow.name, "point": point,
                                "holds": flow.holds})
        except StopIteration as stop:
            r.outcomes[i] = ("ok", _plain(stop.value))
            ended = outcome_name(None, stop.value)
        except FaultLivelock as e:
            r.failure = Failure("livelock", f"{flow.name}: {e}", list(r.schedule))
        except (VcpuExit, KvmError, SigBus, SigSegv) as e:
            r.outcomes[i] = ("raised", type(e).__name__, str(e))
            ended = outcome_name(e)
        except Exception as e:  # noqa: BLE001 - any other exception is a crash of the model
            r.failure = Failure("crash", f"{flow.name}: {type(e).__name__}: {e}",
                                list(r.schedule))
        if i not in r.outcomes:
            return False
        expect = r.world.scn_flows[i].get("expect")
        if expect is not None and ended not in expect:
            got = "" if len(r.outcomes[i]) < 3 else f" ({r.outcomes[i][2]})"
            r.failure = Failure("unexpected", f"{flow.name} ended with {ended}{got}; the "
                                f"scenario expects {' or '.join(expect)}", list(r.schedule))
        r.ended_at[i] = len(r.schedule)
        if self.keep_trace:
            r.trace.append({"flow": NAMES[i], "name": flow.name, "end": r.outcomes[i],
                            "outcome": ended})
        return True

    def _check(self, r: Run, when: str, stepped: int | None = None,
               ended: bool = False) -> None:
        """The oracles after a step (``ended``: the step ended flow ``stepped``, whose
        completed access the downgrade oracle records first): a use after free first (the
        most specific report: a stale TLB entry to a freed frame is also one no leaf backs),
        the invariants, then the downgrade check."""
        oracles = r.oracles
        vm = r.world.vm
        # One enumeration of the leaves serves every oracle of this step.
        r.leaves = leaves = all_leaves(vm)
        problem = None
        if ended:
            oracles.flow_ended(stepped, r.outcomes[stepped], leaves)
            problem = oracles.stale_access(stepped, r.outcomes[stepped])
        if problem is None:
            problem = oracles.use_after_free(leaves)
        if problem is None:
            found = check_vm(vm, leaves)
            if found:
                problem = ("invariant", str(InvariantError(found)))
        if problem is None and stepped is not None:
            problem = oracles.downgrade(stepped, leaves)
        if problem is not None:
            r.failure = Failure(problem[0], f"{when}: {problem[1]}", list(r.schedule))

    def end_state(self, r: Run):
        leaves = r.leaves if r.leaves is not None else all_leaves(r.world.vm)
        return (tuple(sorted(r.outcomes.items())),
                tuple((m.gfn, m.size, m.pfn, m.writable, m.private)
                      for per_as in leaves for m in per_as))


def _plain(value):
    """A flow's result as an end state holds it: hashable (a harvested page list becomes a
    tuple), or its repr."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, bytes | tuple | int | str | bool) or value is None:
        return value
    return repr(value)


def explore(scn: RaceScenario, arch, vm_type: str | None = None, options: dict | None = None,
            strategy: str = "dfs", max_schedules: int = 100_000, seconds: float | None = None,
            seed: int = 0, depth: int = 3, mutants=(), stop_at_first: bool = True,
            progress=None, workers: int = 1, dask: str | object | None = None,
            reduce: bool = True, preemption_bound: int | None | str = "scenario",
            coverage: bool = False) -> Result:
    """Explore ``scn`` on backend ``arch``; see the module docstring.

    ``workers`` > 1 runs the search in that many local processes, ``dask`` (a scheduler
    address or a ``distributed.Client``) on a Dask cluster: the search is cut into tasks
    (``dfs``: the subtrees under the schedule prefixes of a small frontier, in the order the
    single-process search visits them; ``pct``: ranges of schedule numbers, each schedule's
    random choices seeded by its number), and the results are merged in that order, so the
    schedule ids and the totals are those of a single-process run (``seconds`` apart).
    ``reduce`` (dfs): the partial-order reduction (sleep sets over the commuting guest
    accesses; ``Explorer.run``).

    ``preemption_bound`` (dfs): only the schedules with at most that many preemptions
    (``Explorer._run``); ``"scenario"``: the scenario's ``preemption_bound``; None: every
    schedule. A bounded search keeps no sleep sets: an ordering they prune may stand for
    one that needs more preemptions than the bound allows, and the class would be lost
    (Coons, Musuvathi and McKinley, OOPSLA 2013).

    ``coverage``: ``Result.windows``, the race windows the counted schedules opened
    (``Window``: which stretch of a flow ran while another stood at which point), the same
    from any number of workers."""
    vm_type = vm_type or choose_vm_type(scn, arch)
    if strategy not in ("dfs", "pct"):
        raise ValueError(f"strategy={strategy!r}: dfs or pct")
    if preemption_bound == "scenario":
        preemption_bound = scn.preemption_bound if strategy == "dfs" else None
    elif not is_bound(preemption_bound) or (preemption_bound is not None and
                                            strategy != "dfs"):
        raise ValueError(f"preemption_bound={preemption_bound!r}: a non-negative number, "
                         "for the dfs strategy")
    reduce = reduce and preemption_bound is None
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r}: a positive number of processes")
    result = Result(scn.name, _arch_name(arch), strategy, tuple(mutants),
                    preemption_bound=preemption_bound, windows=set() if coverage else None)
    spec = {"scn": scn, "arch": arch, "vm_type": vm_type, "options": dict(options or {}),
            "strategy": strategy, "seed": seed, "depth": depth, "mutants": tuple(mutants),
            "max_schedules": max_schedules, "seconds": seconds,
            "stop_at_first": stop_at_first, "reduce": reduce,
            "preemption_bound": preemption_bound, "coverage": coverage}
    t0 = time.perf_counter()
    with _mutated(mutants):
        ex = Explorer(scn, arch, vm_type, options, preemption_bound=preemption_bound,
                      coverage=coverage)
        if workers == 1 and dask is None:
            streams = [_records(ex, spec, None)]
        else:
            tasks = _plan(ex, spec, workers if dask is None else 16)
            streams = _run_tasks(spec, tasks, workers, dask)
        result.exhausted = _merge(result, streams, spec, progress)
        result.seconds = time.perf_counter() - t0
        if result.failures:
            result.failures = [_shrink(ex, f) for f in result.failures[:1]] + \
                result.failures[1:]
    return result


def is_bound(value) -> bool:
    """A preemption bound: None (none) or a non-negative int (a bool is no number here)."""
    return value is None or (type(value) is int and value >= 0)


@contextlib.contextmanager
def _mutated(mutants):
    from .mutants import MUTANTS

    with contextlib.ExitStack() as stack:
        for name in mutants:
            stack.enter_context(MUTANTS[name].patch())
        yield


def _records(ex: Explorer, spec: dict, task):
    """Run the schedules of ``task`` (None: the whole search), as records ``(steps,
    end state or None, Failure or None, windows)``, stopping where a single-process search
    would; ``windows``: with coverage, those the run opened that no earlier run of the task
    did (the merge counts each record's), else None."""
    deadline = None if spec["seconds"] is None else time.perf_counter() + spec["seconds"]
    if spec["strategy"] == "dfs":
        runs = _dfs(ex, [] if task is None else task, spec["reduce"])
    else:
        lo, hi = (0, None) if task is None else task
        runs = _pct(ex, spec["seed"], spec["depth"], lo, hi)
    n, seen = 0, set()
    for r in runs:
        if r.pruned:
            yield "pruned"
            continue
        n += 1
        new = None
        if ex.coverage:
            new = r.windows - seen
            seen |= new
        yield (len(r.schedule), None if r.failure else ex.end_state(r), r.failure, new)
        if (r.failure is not None and spec["stop_at_first"]) or n >= spec["max_schedules"] \
                or (deadline is not None and time.perf_counter() > deadline):
            yield None          # stopped before the end of the task
            return


def _merge(result: Result, streams, spec: dict, progress) -> bool:
    """Count the records of ``streams`` in order as one search; True when the search ran to
    its end (every dfs schedule)."""
    for stream in streams:
        for rec in stream:
            if rec is None:
                return False
            if rec == "pruned":
                result.pruned += 1
                continue
            steps, end_state, failure, windows = rec
            result.schedules += 1
            result.steps += steps
            if windows:
                result.windows |= windows
            if progress is not None:
                progress(result)
            if failure is not None:
                result.failures.append(failure)
                if spec["stop_at_first"]:
                    return False
            else:
                result.end_states.add(end_state)
            if result.schedules >= spec["max_schedules"]:
                return False
    return spec["strategy"] == "dfs"


def _plan(ex: Explorer, spec: dict, workers: int) -> list:
    """Tasks for ``workers`` processes, in the single-process search's order. dfs: expand the
    tree breadth first (one run per prefix tells the runnable flows at its next step) until
    there are 4 prefixes per worker; pct: ranges of schedule numbers."""
    if spec["strategy"] == "pct":
        total = spec["max_schedules"]
        chunk = max(1, -(-total // (4 * workers)))
        return [(lo, min(lo + chunk, total)) for lo in range(0, total, chunk)]
    frontier = [[]]
    for _level in range(64):
        if len(frontier) >= 4 * workers:
            break
        grown, deeper = [], False
        for prefix in frontier:
            r = ex.run(prefix, reduce=spec["reduce"])
            k = len(prefix)
            if r.failure is None and len(r.schedule) > k:
                asleep = r.asleep[k] if spec["reduce"] else ()
                grown += [prefix + [c] for c in r.choices[k] if c not in asleep]
                deeper = True
            elif r.pruned and len(r.schedule) == k:
                continue                    # every ordering under it is explored elsewhere
            else:
                grown.append(prefix)        # a whole schedule (or a failing one): its own task
        frontier = grown
        if not deeper:
            break
    return frontier


def _run_task(spec: dict, task) -> list:
    """One task in a worker process (or a Dask worker): its records."""
    with _mutated(spec["mutants"]):
        ex = Explorer(spec["scn"], spec["arch"], spec["vm_type"], spec["options"],
                      preemption_bound=spec["preemption_bound"], coverage=spec["coverage"])
        return list(_records(ex, spec, task))


def _run_tasks(spec: dict, tasks: list, workers: int, dask):
    """Each task's records, in task order, from a process pool or a Dask cluster."""
    if dask is not None:
        from distributed import Client

        client = dask if isinstance(dask, Client) else Client(dask)
        try:
            futures = client.map(_run_task, [spec] * len(tasks), tasks, pure=False)
            for future in futures:
                yield future.result()
        finally:
            if client is not dask:
                client.close()
        return
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_task, spec, task) for task in tasks]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _dfs(ex: Explorer, root: list, reduce: bool = True):
    """Every schedule that starts with ``root``, depth first (the lowest runnable flow
    first at each step); with ``reduce``, one per class of equivalent orderings (sleep sets,
    ``Explorer.run``), the pruned runs included so that they can be counted."""
    prefix: list = list(root)
    checked = 0
    while True:
        r = ex.run(prefix, reduce=reduce, checked=checked)
        yield r
        # Backtrack: the deepest step with a higher runnable flow neither tried nor asleep.
        for k in range(len(r.schedule) - 1, len(root) - 1, -1):
            asleep = r.asleep[k] if reduce else ()
            later = [i for i in r.choices[k] if i > r.schedule[k] and i not in asleep]
            if later:
                prefix = r.schedule[:k] + [later[0]]
                checked = k
                break
        else:
            return


def _pct(ex: Explorer, seed: int, depth: int, lo: int = 0, hi: int | None = None):
    """Schedules ``lo`` to ``hi`` of the PCT search: schedule 0 runs the lowest flow first
    (and measures the schedule length k); schedule i draws its priorities and its d - 1
    change points from a generator seeded by ``(seed, i)``, so any range runs anywhere."""
    first = ex.run([])
    n, k = len(ex.scn.flows), max(len(first.schedule), 1)
    i = lo
    if i == 0:
        yield first
        i = 1
    while hi is None or i < hi:
        rng = random.Random(f"{seed}:{i}")
        prio = list(range(depth, depth + n))
        rng.shuffle(prio)
        changes = {rng.randrange(k): depth - 1 - j for j in range(depth - 1)}

        def policy(runnable, step, prio=prio, changes=changes):
            best = max(runnable, key=prio.__getitem__)
            if step in changes:
                prio[best] = changes[step]
                best = max(runnable, key=prio.__getitem__)
            return best

        yield ex.run([], policy)
        i += 1


def _shrink(ex: Explorer, failure: Failure) -> Failure:
    """A shorter, simpler schedule with the same kind of failure: the failing prefix (the
    schedule stops at the failure), then fewer context switches (a run of one flow moved to
    join the flow's previous run), as long as it still fails the same way."""
    best = failure

    def fails(schedule):
        r = ex.run(schedule)
        return r.failure if r.failure is not None and r.failure.kind == failure.kind else None

    changed = True
    while changed:
        changed = False
        blocks = _blocks(best.schedule)
        for j in range(1, len(blocks)):
            flow = blocks[j][0]
            prev = max((i for i in range(j) if blocks[i][0] == flow), default=None)
            if prev is None:
                continue
            merged = blocks[:prev + 1] + blocks[prev + 1:j] + blocks[j + 1:]
            merged[prev] = [flow, blocks[prev][1] + blocks[j][1]]
            f = fails([b[0] for b in merged for _ in range(b[1])])
            if f is not None and len(_blocks(f.schedule)) < len(blocks):
                best, changed = f, True
                break
    return best


def _blocks(schedule: list) -> list:
    out = []
    for i in schedule:
        if out and out[-1][0] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def replay(scn: RaceScenario, arch, schedule: str | list, vm_type: str | None = None,
           options: dict | None = None, mutants=()) -> Run:
    """Run one schedule (an id such as ``A2.B1.A1`` or a list of flow indices) with a trace
    of every step; after the schedule, the lowest runnable flow runs until the end."""
    if isinstance(schedule, str):
        schedule = parse_schedule_id(schedule, len(scn.flows))
    ex = Explorer(scn, arch, vm_type or choose_vm_type(scn, arch), options, trace=True)
    with _mutated(mutants):
        return ex.run(schedule)


def choose_vm_type(scn: RaceScenario, arch) -> str:
    info = resolve_backend(arch).arch_info
    want = scn.vm.get("vm_type")
    if want is not None:
        return want
    required = set(scn.vm.get("requires", ()))
    for vm_type, caps in info.vm_types.items():
        if required <= caps:
            return vm_type
    raise KvmError(errno.EOPNOTSUPP, f"{info.name} has no VM type with {sorted(required)}")


def supports(scn: RaceScenario, arch) -> bool:
    info = resolve_backend(arch).arch_info
    required = set(scn.vm.get("requires", ()))
    return any(required <= caps for caps in info.vm_types.values())


def _arch_name(arch) -> str:
    return resolve_backend(arch).arch_info.name
