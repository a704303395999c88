"""The ``kvmcore`` command: archs, run, conformance, bench.

This is the only place that configures structlog: a console renderer on a terminal, JSON lines
otherwise, and ``--trace FILE`` sends the VM's structured events to FILE as JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click
import structlog

from .errors import KvmError


class UserError(click.ClickException):
    """A user's mistake (bad scenario, unknown arch): one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"kvmcore: error: {self.format_message()}", err=True)


def _configure_logging(level: str, trace_file=None) -> None:
    numeric = getattr(logging, level.upper())
    if trace_file is not None:
        processors = [structlog.processors.add_log_level,
                      structlog.processors.TimeStamper(fmt="iso"),
                      structlog.processors.JSONRenderer(sort_keys=False)]
        structlog.configure(processors=processors,
                            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                            logger_factory=structlog.WriteLoggerFactory(trace_file),
                            cache_logger_on_first_use=False)
        return
    renderer = (structlog.dev.ConsoleRenderer() if sys.stderr.isatty()
                else structlog.processors.JSONRenderer())
    structlog.configure(processors=[structlog.processors.add_log_level,
                                    structlog.processors.TimeStamper(fmt="iso"), renderer],
                        wrapper_class=structlog.make_filtering_bound_logger(numeric),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        cache_logger_on_first_use=False)


def _quiet_unless_asked() -> None:
    """explore and swarm run the same flows thousands of times: what the model logs on the
    way (a Linux WARN, a refused map) would repeat once per schedule, so they show it only
    at a ``--log-level`` given explicitly; their oracles report what went wrong."""
    root = click.get_current_context().find_root()
    if root.get_parameter_source("log_level") is click.core.ParameterSource.DEFAULT:
        _configure_logging("critical")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmcore")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Threshold for log messages on stderr.")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """kvmcore: an executable, pluggable model of the Linux KVM MMU."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level
    _configure_logging(log_level)


# --------------------------------------------------------------------------- archs

def _arch_rows() -> list[dict]:
    from .plugins import installed_backends

    rows = []
    for name, ep in installed_backends().items():
        try:
            cls = ep.load()
            info = cls.arch_info
        except Exception as e:  # a broken plugin is reported, not fatal
            rows.append({"arch": name, "error": f"{type(e).__name__}: {e}"})
            continue
        dist = ep.dist
        rows.append({"arch": name, "distribution": dist.name if dist else "?",
                     "version": dist.version if dist else "?",
                     "vm_types": {t: sorted(c) for t, c in info.vm_types.items()},
                     "page_sizes": list(info.page_sizes), "levels": info.levels,
                     "address_spaces": info.nr_address_spaces,
                     "known_divergences": dict(info.known_divergences),
                     "options": {n: {"default": o.default, "choices": o.choices, "doc": o.doc}
                                 for n, o in getattr(cls, "OPTIONS", {}).items()}})
    return rows


def _option(name: str, o: dict) -> str:
    choices = f" of {'/'.join(map(str, o['choices']))}" if o["choices"] else ""
    return f"{name}={o['default']!r}{choices}" + (f" ({o['doc']})" if o["doc"] else "")


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--kernel", "kernel", is_flag=True,
              help="Also show the running kernel's KVM profile beside the backend's.")
def archs(as_json: bool, kernel: bool) -> None:
    """List the installed architecture backends and what they claim."""
    if kernel:
        _kernel_profile(as_json)
        return
    rows = _arch_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no backend installed (pip install kvmcore-x86-tdp, for example)")
        return
    if not sys.stdout.isatty():
        for r in rows:
            if "error" in r:
                click.echo(f"{r['arch']}: cannot load it: {r['error']}")
                continue
            click.echo(f"{r['arch']} ({r['distribution']} {r['version']}): pages "
                       f"{' '.join(_size(p) for p in r['page_sizes'])}, {r['levels']} levels, "
                       f"{r['address_spaces']} address space(s)")
            for vm_type, caps in r["vm_types"].items():
                click.echo(f"  {vm_type}: {', '.join(caps)}")
            for name, o in r["options"].items():
                click.echo(f"  option {_option(name, o)}")
            for test, why in r["known_divergences"].items():
                click.echo(f"  known divergence {test}: {why}")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="kvmcore backends")
    for col in ("arch", "distribution", "version", "page sizes", "VM types: capabilities"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["arch"], "", "", "", f"[red]{r['error']}")
            continue
        types = "\n".join([f"{t}: {', '.join(c)}" for t, c in r["vm_types"].items()]
                          + [f"[cyan]option[/] {escape(_option(n, o))}"
                             for n, o in r["options"].items()]
                          + [f"[yellow]known divergence[/] {escape(t)}: {escape(why)}"
                             for t, why in r["known_divergences"].items()])
        table.add_row(r["arch"], r["distribution"], r["version"],
                      " ".join(_size(p) for p in r["page_sizes"]), types)
    Console().print(table)


def _kernel_profile(as_json: bool, arch: str = "x86_tdp") -> None:
    """``archs --kernel``: the KVM_CHECK_EXTENSION answers of /dev/kvm, of the backend's
    default VM, and of the model VM configured like the kernel."""
    from . import VM
    from .kernel import kvmdev
    from .kernel.profile import KernelProfile, model_profile

    ok, why = kvmdev.available()
    if not ok:
        raise UserError(f"--kernel: {why}")
    profile = KernelProfile.read()
    backend = model_profile(VM(arch))
    configured = model_profile(VM(arch, **profile.vm_kwargs(arch)))
    if as_json:
        kwargs = profile.vm_kwargs(arch)
        kconfig = kwargs.pop("kconfig")
        click.echo(json.dumps({"kernel": profile.as_dict(), "arch": arch,
                               "backend": backend, "configured": configured,
                               "vm_options": kwargs,
                               "kconfig": {"vm_types": sorted(kconfig.vm_types or ()),
                                           "not_built": sorted(kconfig.not_built),
                                           "disabled": sorted(kconfig.disabled),
                                           "tdp": kconfig.tdp}}, indent=2))
        return
    click.echo(f"kernel {profile.release} (/dev/kvm) beside {arch}")
    click.echo(f"  {'KVM_CAP_':28} {'kernel':>10} {arch + ' default':>18} {'configured':>10}")
    for name, value in profile.vm.items():
        mark = "" if configured[name] == value else "  <- differs"
        click.echo(f"  {name:28} {value:>10} {backend[name]:>18} {configured[name]:>10}{mark}")
    click.echo(f"  model configured as: VM({arch!r}, "
               + ", ".join(f"{k}={v!r}" for k, v in profile.vm_kwargs(arch).items()) + ")")


# --------------------------------------------------------------------------- diff

@main.command()
@click.option("--calls", default=2000, show_default=True,
              help="Generated calls to compare (after the hand corpus).")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated sequences.")
@click.option("--no-corpus", is_flag=True, help="Skip the hand-written corpus.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(calls: int, seed: int, no_corpus: bool, as_json: bool) -> None:
    """Run the same VM-level ioctls on /dev/kvm and on the model (x86_tdp configured like the
    running kernel) and compare errno and returned values. Exit 1 on a difference."""
    from .kernel import kvmdev
    from .kernel.diff import Differ, run_generated, run_hand_corpus

    ok, why = kvmdev.available()
    if not ok:
        raise UserError(f"diff needs a usable /dev/kvm: {why}")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise UserError("diff needs hypothesis (pip install 'kvmcore[test]')") from None
    with Differ() as differ:
        hand = 0 if no_corpus else run_hand_corpus(differ)
        generated = run_generated(differ, calls, seed) if calls > 0 else 0
        rows = differ.table()
        found = differ.differences
        if as_json:
            click.echo(json.dumps({
                "kernel": differ.profile.as_dict(), "hand_calls": hand,
                "generated_calls": generated,
                "per_ioctl": {n: {"calls": c, "agree": a} for n, c, a in rows},
                "differences": [d.format() for d in found]}, indent=2))
        else:
            click.echo(f"kernel {differ.profile.release}: {hand} hand-corpus calls, "
                       f"{generated} generated calls (seed {seed})")
            click.echo(f"  {'ioctl':32} {'calls':>7} {'agree':>7}")
            for name, n, agree in rows:
                click.echo(f"  {name:32} {n:>7} {agree:>7}")
            for d in found:
                click.echo("\nDIFFERENCE\n" + d.format())
            if not found:
                click.echo("0 differences")
    if found:
        raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------- run

def default_arch() -> str:
    from .plugins import installed_backends

    names = list(installed_backends())
    if "x86_tdp" in names:
        return "x86_tdp"
    if names:
        return names[0]
    return "kvmcore.testing:FlatBackend"


@main.command()
@click.argument("scenario", required=False)
@click.option("--arch", help="Backend: an installed name or module:Class "
                             "(default: x86_tdp if installed, else the first installed).")
@click.option("--vm-type", help="VM type (default: the scenario's, or the one claiming most of "
                                "what it needs).")
@click.option("--seed", type=int, help="Seed for random access patterns.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, writable=True),
              help="Write every fault, exit, zap, conversion and notifier event as JSON lines.")
@click.option("--picture", type=click.Path(dir_okay=False, writable=True),
              help="Draw the guest-physical map to a .png or .svg file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def run(ctx, scenario, arch, vm_type, seed, trace_path, picture, as_json) -> None:
    """Run SCENARIO (a TOML file, or a built-in: confidential, basic). Without one, the
    built-in "confidential" guest of 4 GiB boots."""
    from . import scenario as sc

    try:
        spec = sc.load(scenario or "confidential")
    except sc.ScenarioError as e:
        raise UserError(str(e)) from None
    arch = arch or spec.vm["arch"] or default_arch()
    if picture:
        _check_picture(picture)
    try:
        trace_file = open(trace_path, "w") if trace_path else None  # noqa: SIM115
    except OSError as e:
        raise UserError(f"--trace {trace_path}: cannot write it ({e.strerror})") from None
    try:
        if trace_file is not None:
            _configure_logging(ctx.obj["log_level"], trace_file)
        try:
            runner = sc.Runner(spec, arch, vm_type, seed, trace=trace_file is not None)
        except KvmError as e:
            raise UserError(f"{spec.path}: {e.strerror}") from None
        try:
            result = _run_with_progress(runner, quiet=as_json)
        except sc.ScenarioError as e:
            raise UserError(str(e)) from None
    finally:
        if trace_file is not None:
            trace_file.close()
            _configure_logging(ctx.obj["log_level"])
    if picture:
        from .picture import draw

        try:
            draw(result.vm, picture, title=f"{spec.name} on {result.arch} ({result.vm_type})")
        except ImportError as e:
            raise UserError(f"--picture needs matplotlib (pip install 'kvmcore[picture]'): "
                            f"{e}") from None
    summary = summarize(result)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if result.failures:
        raise click.exceptions.Exit(1)


def _check_picture(picture: str) -> None:
    """Refuse a picture that cannot be drawn before the run, so that its summary is not lost."""
    if Path(picture).suffix.lower() not in (".png", ".svg"):
        raise UserError(f"--picture {picture}: use a .png or .svg file name")
    if not Path(picture).resolve().parent.is_dir():
        raise UserError(f"--picture {picture}: its directory does not exist")
    try:
        import matplotlib  # noqa: F401 - only whether it imports
    except ImportError as e:
        raise UserError(f"--picture needs matplotlib (pip install 'kvmcore[picture]'): "
                        f"{e}") from None


def _bound(ctx, param, value):
    """--preemption-bound: a non-negative number, ``none``, or the scenario's (not given)."""
    if value is None:
        return "scenario"
    if value.lower() == "none":
        return None
    try:
        n = int(value, 0)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r} is not a non-negative number or none")
    return n


def _exhausted(result) -> str:
    if not result.exhausted:
        return ""
    if result.preemption_bound is None:
        return " (all)"
    return f" (all with at most {result.preemption_bound} preemptions)"


def _backend_names(names) -> None:
    """Refuse, as one line, a --arch that names no backend (sc.backend_class)."""
    from .scenario import backend_class

    for name in names:
        try:
            backend_class(name)
        except KvmError as e:
            raise UserError(f"--arch {name}: {e.strerror}") from None


@main.command()
@click.argument("scenario", required=False)
@click.option("--arch", help="Backend: an installed name or module:Class (default: x86_tdp if "
                             "installed).")
@click.option("--vm-type", help="VM type (default: the scenario's, or the first that has "
                                "what it requires).")
@click.option("--strategy", type=click.Choice(["dfs", "pct"]), default="dfs", show_default=True,
              help="dfs: every schedule; pct: randomized priority schedules.")
@click.option("--max-schedules", default=100_000, show_default=True,
              help="Stop after this many schedules.")
@click.option("--time", "seconds", type=float, help="Stop after this many seconds.")
@click.option("--seed", default=0, show_default=True, help="Seed of the pct strategy.")
@click.option("--depth", default=3, show_default=True, help="Bug depth d of the pct strategy.")
@click.option("--preemption-bound", "bound", metavar="N|none", callback=_bound,
              help="dfs: only the schedules with at most N preemptions (a switch away from a "
                   "flow that could go on); none: every schedule. Default: the scenario's "
                   "preemption_bound, else none.")
@click.option("--mutant", "mutants", multiple=True,
              help="Switch a seed bug on (repeatable); --list-mutants names them.")
@click.option("--list-mutants", is_flag=True, help="List the mutants and exit.")
@click.option("--replay", "replay_id", help="Run one schedule by its id (e.g. A2.B1.A1) and "
                                            "print its trace.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False),
              help="With --replay: write the trace as JSON lines to this file.")
@click.option("--picture", type=click.Path(dir_okay=False),
              help="With --replay: draw the schedule as swim lanes into this PNG (needs "
                   "matplotlib).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Search in this many local processes (same schedule ids and totals).")
@click.option("--dask", "dask_address", metavar="ADDRESS",
              help="Shard the search over the Dask scheduler at ADDRESS (pip install "
                   "'kvmcore[dask]').")
@click.option("--vm-option", "vm_options", multiple=True, metavar="KEY=VALUE",
              help="A VM option of the backend (repeatable), e.g. wp_whole_leaves=True.")
@click.option("--minimize", "minimize_path", type=click.Path(dir_okay=False),
              help="When a schedule fails, write the smallest scenario found that still fails "
                   "an oracle of the same kind to this file (docs/races.md).")
@click.option("--coverage", is_flag=True,
              help="Also report the race windows the schedules opened: each stretch of a "
                   "flow that ran while another stood at a race point.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def explore(scenario, arch, vm_type, strategy, max_schedules, seconds, seed, depth, bound,
            mutants, list_mutants, replay_id, trace_path, picture, workers, dask_address,
            vm_options, minimize_path, coverage, as_json) -> None:
    """Search the interleavings of a race SCENARIO (a TOML file or a built-in name; without
    one, list the built-in ones). Exit code 1 when a schedule fails an oracle."""
    from . import explore as ex

    _quiet_unless_asked()

    if list_mutants:
        for m in ex.MUTANTS.values():
            where = f" [{m.arch}]" if m.arch else ""
            click.echo(f"{m.name:32} {m.seed}{where}: {m.what}")
        return
    if scenario is None:
        click.echo("built-in race scenarios: " + ", ".join(
            name + (" (a race of Linux)" if ex.load(name).linux_race is not None else "")
            for name in ex.builtin_names()))
        return
    unknown = [m for m in mutants if m not in ex.MUTANTS]
    if unknown:
        raise UserError(f"--mutant {unknown[0]}: not one of {', '.join(ex.MUTANTS)}")
    try:
        text, path = ex.read_text(scenario)
        scn = ex.parse(text, path)
    except ex.RaceScenarioError as e:
        raise UserError(str(e)) from None
    arch = arch or scn.vm.get("arch") or default_arch()
    _backend_names([arch])
    options = _vm_options(vm_options)
    try:
        if not ex.supports(scn, arch):
            raise UserError(f"{scn.path}: {arch} has no VM type with "
                            f"{', '.join(scn.vm.get('requires', ()))}")
        vm_type = vm_type or ex.choose_vm_type(scn, arch)
        if replay_id:
            if picture:
                _check_picture(picture)
            run = ex.replay(scn, arch, replay_id, vm_type, options, mutants=mutants)
            _print_replay(run, trace_path)
            if picture:
                from .explore.picture import draw

                draw(run, scn, picture, f"{scn.name} on {arch}: {replay_id}")
                click.echo(f"picture: {picture}")
            if run.failure is not None:
                sys.exit(1)
            return
        if dask_address:
            try:
                import distributed  # noqa: F401 - only whether it imports
            except ImportError as e:
                raise UserError(f"--dask needs distributed (pip install 'kvmcore[dask]'): "
                                f"{e}") from None
        with _progress("schedules", max_schedules, as_json or max_schedules < 5000,
                       lambda result: result.schedules) as progress:
            result = ex.explore(scn, arch, vm_type, options, strategy=strategy,
                                max_schedules=max_schedules, seconds=seconds, seed=seed,
                                depth=depth, mutants=mutants, workers=workers,
                                dask=dask_address or None, progress=progress,
                                preemption_bound=bound, coverage=coverage)
            minimized = None
            if minimize_path and result.failures:
                # A candidate must fail within about the effort the original took.
                minimized = _minimize(Path(minimize_path), text, scenario, arch, vm_type,
                                      options, mutants, vm_options, strategy=strategy,
                                      seed=seed, depth=depth, preemption_bound=bound,
                                      max_schedules=max(300, 2 * result.schedules))
    except (ex.RaceScenarioError, ValueError) as e:
        raise UserError(str(e)) from None
    except KvmError as e:
        raise UserError(f"{scenario}: {e}") from None
    summary = result.summary()
    if minimized is not None:
        summary["minimized"] = minimized
    if scn.linux_race is not None:
        summary["linux_race"] = scn.linux_race
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{summary['scenario']} on {summary['arch']} ({vm_type}), {strategy}"
                   f"{' with ' + ', '.join(mutants) if mutants else ''}: "
                   f"{summary['schedules']} schedules"
                   f"{_exhausted(result)}, {summary['steps']} steps in "
                   f"{summary['seconds']} s ({summary['schedules_per_s']}/s), "
                   f"{summary['distinct_end_states']} distinct end states")
        for f in summary["failures"]:
            click.echo(f"  FAILED {f['kind']} in schedule {f['schedule']}: {f['message']}")
            click.echo("  replay: " + _replay_command(scenario, arch, f["schedule"], mutants,
                                                      vm_options))
        if summary["failures"] and scn.linux_race is not None:
            click.echo(f"  a race of Linux itself, as the scenario says: {scn.linux_race}")
        if minimized is not None:
            click.echo(f"  minimized ({minimized['explorations']} explorations, "
                       f"{minimized['seconds']} s): {minimized['file']}")
            click.echo(f"  replay: {minimized['replay']}")
        if coverage:
            _print_windows(result.windows, scn)
    if not result.clean:
        sys.exit(1)


def _print_windows(windows, scn) -> None:
    """The race windows of a search, a line per flow and point it stood at: the stretches of
    the other flows that ran meanwhile (``from->to``)."""
    from .explore.scenario import NAMES

    ops = {NAMES[i]: f"{NAMES[i]} ({f['op']})" for i, f in enumerate(scn.flows)}
    click.echo(f"  {len(windows)} race windows opened (a flow stands at a point while "
               "another runs a stretch):")
    stands: dict = {}
    for w in sorted(windows):
        stands.setdefault((w.stands, w.at), {}).setdefault(w.runs, []).append(
            f"{w.start}->{w.end}")
    for (flow, at), runs in stands.items():
        click.echo(f"    {ops[flow]} at {at}: " + "; ".join(
            f"{ops[other]} {', '.join(stretches)}" for other, stretches in runs.items()))


@main.command()
@click.option("--arch", help="Backend: an installed name or module:Class (default: x86_tdp if "
                             "installed).")
@click.option("--scenarios", type=click.IntRange(min=1), default=100, show_default=True,
              help="Random scenarios to generate and explore.")
@click.option("--seed", default=0, show_default=True,
              help="Seed: the same seed gives the same scenarios.")
@click.option("--max-schedules", type=click.IntRange(min=1), default=300, show_default=True,
              help="Schedules explored per scenario.")
@click.option("--strategy", type=click.Choice(["dfs", "pct"]), default="dfs", show_default=True,
              help="dfs: the first schedules depth first; pct: randomized priority schedules "
                   "(seeded by the scenario's number).")
@click.option("--depth", type=click.IntRange(min=1), default=3, show_default=True,
              help="Bug depth d of the pct strategy.")
@click.option("--preemption-bound", "bound", metavar="N|none", default="2",
              show_default=True, callback=_bound,
              help="dfs: each scenario declares this bound and its search runs only the "
                   "schedules with at most that many preemptions; none: every schedule "
                   "(pct ignores it).")
@click.option("--mutant", "mutants", multiple=True,
              help="Switch a seed bug on (repeatable): how soon the swarm finds it.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write each failing scenario to DIR/<name>.toml, for kvmcore explore.")
@click.option("--minimize", is_flag=True,
              help="With --out: also write each failing scenario minimized, to "
                   "DIR/<name>.min.toml (the smallest that still fails the same way).")
@click.option("--stop-at-first", is_flag=True,
              help="Stop at the first failing scenario (with --mutant: the first that is "
                   "clean without the mutants).")
@click.option("--guided", is_flag=True,
              help="Coverage-guided: every other scenario after the first changes one of "
                   "those that opened race windows no earlier one did.")
@click.option("--vm-option", "vm_options", multiple=True, metavar="KEY=VALUE",
              help="A VM option of the backend (repeatable), e.g. wp_whole_leaves=True.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def swarm(arch, scenarios, seed, max_schedules, strategy, depth, bound, mutants, out_dir,
          minimize, stop_at_first, guided, vm_options, as_json) -> None:
    """Explore random race scenarios (swarm testing): each draws its flows from a random
    subset of what the backend offers. Exit code 1 when one fails an oracle; a failure of
    a kind the backend declares as a divergence from Linux's common contract is listed,
    not counted. With --mutant, a failing scenario is explored again without the mutants:
    one that fails there too is marked as not the mutants' finding."""
    from . import explore as ex
    from .explore.swarm import swarm as run_swarm

    _quiet_unless_asked()

    unknown = [m for m in mutants if m not in ex.MUTANTS]
    if unknown:
        raise UserError(f"--mutant {unknown[0]}: not one of {', '.join(ex.MUTANTS)}")
    if minimize and not out_dir:
        raise UserError("--minimize: needs --out DIR to write the minimized scenarios to")
    arch = arch or default_arch()
    _backend_names([arch])
    out = Path(out_dir) if out_dir else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out_dir}: {e.strerror}") from None
    options = _vm_options(vm_options)
    try:
        with _progress("scenarios", scenarios, as_json) as progress:
            result = run_swarm(arch, scenarios, seed, max_schedules, mutants, options,
                               stop_at_first=stop_at_first, progress=progress,
                               strategy=strategy, depth=depth, preemption_bound=bound,
                               guided=guided)
    except KvmError as e:
        raise UserError(str(e)) from None
    files, smaller = {}, {}
    for f in result.findings + result.declared:
        if out is not None:
            files[f.index] = path = out / f"{f.name}.toml"
            path.write_text(f.text)
    if minimize:
        with _progress("minimizing", len(result.findings), as_json) as progress:
            for n, f in enumerate(result.findings, 1):
                smaller[f.index] = _minimize(
                    out / f"{f.name}.min.toml", f.text, str(files[f.index]), arch, f.vm_type,
                    options, mutants, vm_options, strategy=strategy, seed=f.index,
                    depth=depth, max_schedules=max_schedules)
                if progress is not None:
                    progress(n)
    if as_json:
        summary = result.summary()
        for item, f in zip(summary["findings"] + summary["declared"],
                           result.findings + result.declared, strict=True):
            if f.index in files:
                item["file"] = str(files[f.index])
            if f.index in smaller:
                item["minimized"] = smaller[f.index]
        click.echo(json.dumps(summary, indent=2))
    else:
        unmutated = sum(f.without_mutants is not None for f in result.findings)
        click.echo(f"swarm on {result.arch}{' with ' + ', '.join(mutants) if mutants else ''}"
                   f", seed {seed}: {result.scenarios} scenarios explored"
                   f"{f' ({result.refused} refused at setup)' if result.refused else ''}, "
                   f"{result.schedules} schedules in {result.seconds:.1f} s"
                   f"{f' ({result.mutated} of them changed corpus scenarios)' if guided else ''}"
                   f", {len(result.findings)} failing"
                   f"{f' ({unmutated} also without the mutants)' if unmutated else ''}")
        tail = result.new_windows[len(result.new_windows) * 3 // 4:]
        click.echo(f"  {len(result.windows)} race windows opened (by operation and point; "
                   f"the last {len(tail)} scenarios opened {sum(tail)} new)")
        for f in result.findings + result.declared:
            label = "declared divergence" if f.declared else "FAILED"
            click.echo(f"  {label} {f.failure.kind} in {f.name} ({f.vm_type}), schedule "
                       f"{f.failure.id}: {f.failure.message}")
            if f.without_mutants is not None:
                click.echo(f"  not the mutants': it fails without them too "
                           f"({f.without_mutants.kind}, schedule {f.without_mutants.id})")
            if f.index in files:
                click.echo("  replay: " + _replay_command(files[f.index], arch, f.failure.id,
                                                          mutants, vm_options))
            if f.index in smaller:
                click.echo(f"  minimized: {smaller[f.index]['file']}")
                click.echo(f"  replay: {smaller[f.index]['replay']}")
    if result.findings:
        sys.exit(1)


def _replay_command(scenario, arch: str, schedule: str, mutants, vm_options) -> str:
    return (f"kvmcore explore {scenario} --arch {arch} --replay {schedule}"
            + "".join(f" --mutant {m}" for m in mutants)
            + "".join(f" --vm-option {o}" for o in vm_options))


def _minimize(path: Path, text: str, source: str, arch: str, vm_type: str, options: dict,
              mutants, vm_options, **budget) -> dict:
    """Minimize the failing scenario ``text`` (from ``source``) and write it to ``path``
    with a header saying where it came from and how it fails; what was done, as a dict."""
    from .explore.minimize import minimize

    m = minimize(text, arch, vm_type, options, mutants, **budget)
    replay = _replay_command(path, arch, m.failure.id, mutants, vm_options)
    message = " ".join(m.failure.message.split())
    header = (f"# Minimized from {source} on {arch}"
              f"{' with ' + ', '.join(mutants) if mutants else ''} ({m.tests} explorations): "
              f"it fails {m.failure.kind}, as the original did in schedule {m.original.id}.\n"
              f"# {message}\n# replay: {replay}\n")
    try:
        path.write_text(header + m.text)
    except OSError as e:
        raise UserError(f"--minimize {path}: {e.strerror}") from None
    return {"file": str(path), "kind": m.failure.kind, "schedule": m.failure.id,
            "replay": replay, "explorations": m.tests, "seconds": round(m.seconds, 3)}


def _vm_options(pairs) -> dict:
    """``--vm-option KEY=VALUE``s as a dict (``arch.option_value``)."""
    from .arch import option_value

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--vm-option {pair!r}: expected KEY=VALUE")
        options[key] = option_value(value)
    return options


@contextlib.contextmanager
def _progress(what: str, total: int, quiet: bool, count=None):
    """A rich progress bar on stderr (a terminal only, unless ``quiet``): yields the callback
    that moves it to ``count(x)`` (``x`` itself by default), or None."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda x: bar.update(task, completed=x if count is None else count(x))


def _print_replay(run, trace_path) -> None:
    if trace_path:
        try:
            with open(trace_path, "w") as out:
                for event in run.trace:
                    out.write(json.dumps(event, default=repr) + "\n")
        except OSError as e:
            raise UserError(f"--trace {trace_path}: cannot write it ({e.strerror})") from None
    for event in run.trace:
        if "point" in event:
            holds = ", ".join(event["holds"]) or "-"
            click.echo(f"  {event['flow']}  {event['point']:28} holds {holds}")
        else:
            click.echo(f"  {event['flow']}  ends: {event['end']}")
    if run.failure is not None:
        click.echo(f"FAILED {run.failure.kind} at step {len(run.failure.schedule)} "
                   f"({run.failure.id}): {run.failure.message}")
    else:
        click.echo("passed: every oracle holds")


def _run_with_progress(runner, quiet: bool):
    total = runner.total_accesses()
    if quiet or total < 20000 or not sys.stderr.isatty():
        return runner.run()
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("guest accesses", total=total)
        runner.progress = lambda n: progress.advance(task, n)
        return runner.run()


def summarize(result) -> dict:
    stats = result.stats
    faults = {k[len("fault_"):]: v for k, v in stats.items()
              if k.startswith("fault_") and k[len("fault_"):] in (
                  "not_present", "permission", "access_flag", "misconfig")}
    return {
        "scenario": result.scenario, "arch": result.arch, "vm_type": result.vm_type,
        "steps": result.steps_run, "accesses": result.accesses,
        "faults": stats.get("faults", 0), "faults_by_kind": faults,
        "retries": stats.get("fault_retry", 0),
        "exits": dict(result.exits),
        "zaps": stats.get("zap_ranges", 0),
        "tlb_flushes": stats.get("tlb_flush", 0) + stats.get("tlb_flush_range", 0),
        "mappings_by_size": {_size(k): v for k, v in sorted(result.mappings_by_size.items())},
        "table_bytes": result.table_bytes,
        "wall_s": round(result.wall_s, 3),
        "skipped": result.skipped, "failures": result.failures,
    }


def _print_summary(s: dict) -> None:
    lines = [
        f"{s['scenario']} on {s['arch']} ({s['vm_type']}): {s['steps']} steps, "
        f"{s['accesses']} guest accesses in {s['wall_s']} s",
        f"  faults      {s['faults']}  "
        + "  ".join(f"{k}={v}" for k, v in s["faults_by_kind"].items())
        + f"  retries={s['retries']}",
        "  exits       " + ("  ".join(f"{k}={v}" for k, v in s["exits"].items()) or "none"),
        f"  zaps        {s['zaps']}    TLB flushes {s['tlb_flushes']}",
        "  mappings    " + ("  ".join(f"{k}: {v}" for k, v in s["mappings_by_size"].items())
                            or "none"),
        f"  tables      {s['table_bytes']} bytes",
    ]
    for item in s["skipped"]:
        lines.append(f"  skipped     {item}")
    for item in s["failures"]:
        lines.append(f"  FAILED      {item}")
    click.echo("\n".join(lines))


# --------------------------------------------------------------------------- conformance

@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--arch", "arch_names", multiple=True,
              help="Backend to test (repeatable; default: every installed one).")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def conformance(arch_names, pytest_args) -> None:
    """Run the cross-architecture conformance suite (extra arguments go to pytest)."""
    try:
        import hypothesis  # noqa: F401 - the suite's state machines need it
        import pytest
    except ImportError as e:
        raise UserError(f"conformance needs pytest and hypothesis (pip install "
                        f"'kvmcore[test]'): {e}") from None
    # Before pytest: an unknown backend would error every test of the suite.
    _backend_names(arch_names)
    args = ["-p", "kvmcore.conformance"]
    for name in arch_names:
        args += ["--arch", name]
    raise SystemExit(pytest.main(args + list(pytest_args)))


# --------------------------------------------------------------------------- bench

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--arch", "arch_names", multiple=True,
              help="Backends to measure (default: every installed one).")
@click.option("--rounds", type=click.IntRange(1, 100), default=7, show_default=True,
              help="Rounds of the interleaved fault figures.")
@click.option("--memory-mib", type=click.IntRange(0, 1 << 20), default=1024,
              show_default=True, help="Guest memory read for bytes_per_page (0: skip it).")
def bench(as_json: bool, arch_names, rounds: int, memory_mib: int) -> None:
    """Measure the project's performance figures, each as a ratio within one run."""
    from .bench.run import run_all

    _backend_names(arch_names)
    figures = run_all(list(arch_names) or None, memory_size=memory_mib << 20, rounds=rounds)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    for section, values in figures.items():
        click.echo(section)
        for k, v in values.items():
            if isinstance(v, dict) and set(v) == {"ratio", "spread"}:
                v = f"{v['ratio']}  (rounds {v['spread'][0]}..{v['spread'][1]})"
            click.echo(f"  {k:48} {v}")


# --------------------------------------------------------------------------- new-arch

@main.command("new-arch")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Where to write the distribution (default: ./kvmcore-NAME).")
def new_arch(name: str, directory: str | None) -> None:
    """Write a new backend distribution NAME that passes the conformance suite."""
    from .scaffold.new_arch import write_plugin

    target = Path(directory or f"kvmcore-{name.replace('_', '-')}")
    try:
        files = write_plugin(name, target)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(f"wrote {len(files)} files in {target}; next: pip install -e {target} && "
               f"kvmcore conformance --arch {name}")
