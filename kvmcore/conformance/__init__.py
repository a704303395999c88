"""kvmcore.conformance: the cross-architecture conformance suite, an opt-in pytest plugin.

It is not auto-loaded (no ``pytest11`` entry point); name it with ``-p``::

    python -m pytest -p kvmcore.conformance                        # every installed backend
    python -m pytest -p kvmcore.conformance --arch x86_tdp         # one installed backend
    python -m pytest -p kvmcore.conformance --arch x86_tdp --arch arm64_stage2
    python -m pytest -p kvmcore.conformance --arch kvmcore.testing:FlatBackend   # by class
    python -m pytest -p kvmcore.conformance --arch arm64_stage2 \\
        --arch arm64_stage2 --vm-option granule=65536              # two configurations
    python -m pytest -p kvmcore.conformance --each-vm-type     # every VM type that qualifies
    python -m pytest -p kvmcore.conformance --hypothesis-profile=long   # long state-machine runs

``--arch NAME`` is repeatable; NAME is an entry-point name of the group ``kvmcore.arch`` or
``module:Class`` for a backend under development. ``--vm-option KEY=VALUE`` (repeatable) adds a
VM option to the ``--arch`` given just before it (before any ``--arch``: to every backend);
values are parsed as Python literals when they are one (``65536``, ``0x10000``, ``True``).
Without ``--arch`` every installed backend runs; when none is installed the suite runs on
``kvmcore.testing:FlatBackend`` (the core's reference backend) and says so in the header.
Without test paths the plugin runs its own suite (``kvmcore/conformance/suite``); give paths or
``-k`` to select.

Fixtures: ``arch`` (one parameter per selected backend configuration, id = its name and
options), ``host`` (a fresh ``HostMemory`` whose PAGE_SIZE is the base page the options ask for,
e.g. 64 KiB with ``granule=65536``: ``kvmcore.vm.host_for``), ``make_vm(vm_type=None,
**options)`` (a VM factory: the VM type is the first one — ``"default"`` first — that claims
every capability the test requires; with ``--each-vm-type`` the test runs once per VM type that
claims them), ``vm`` and ``vcpu`` (one VM made by ``make_vm()`` and its vCPU 0), ``guest`` (a
:class:`~kvmcore.conformance.helpers.Guest`: a VM, a vCPU and helpers to back memslots). Races
are replayed with ``vcpu.step_access(kind, gpa, n_or_data, private=...)``, a generator that
yields the fault path's race points (``helpers.step_until`` / ``helpers.finish``).
After each test ``vm.check_invariants()`` runs on every VM the test made; a broken invariant
fails the test.

Capabilities are data: ``@pytest.mark.requires("private_mem", "hugepage_2m")`` skips the test
with the reason ``"<arch> does not claim <cap>"`` when no VM type of the backend claims them all;
a claimed capability's tests must pass. The suite has no other skips. Where Linux on one
architecture departs from the common contract, the backend declares it as data,
``ArchInfo.known_divergences = {"test_name": "Linux file:function — why"}``: the test is a
strict xfail with that reason on that backend, an ordinary test on the others. A known bug of
one backend may still be marked in a suite file, ``@pytest.mark.xfail_on("<ArchInfo.name>",
reason="...")``; no test uses it: keep such facts with the backend.

Hypothesis profiles: ``ci`` (the default while this plugin is loaded; derandomized, small) and
``long`` (``--hypothesis-profile=long``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from pathlib import Path

import attrs
import pytest

from ..arch import option_value
from . import profiles

# Registered at import (``-p`` imports the plugin before hypothesis's own pytest_configure
# loads ``--hypothesis-profile``), so that ``--hypothesis-profile=long`` finds the profile.
profiles.register()

SUITE_DIR = Path(__file__).parent / "suite"
ENTRY_POINT_GROUP = "kvmcore.arch"
FLAT_BACKEND = "kvmcore.testing:FlatBackend"

_DEST = "kvmcore_arch_specs"


# --------------------------------------------------------------------------- configuration

@attrs.frozen
class ArchConfig:
    """One backend configuration under test: ``name`` as given on the command line (entry-point
    name or ``module:Class``) and the VM options every VM of this run gets."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        base = self.name.rsplit(":", 1)[-1] if ":" in self.name else self.name
        if not self.options:
            return base
        return base + "[" + ",".join(f"{k}={v}" for k, v in self.options) + "]"

    @property
    def backend(self):
        """What ``VM(arch=...)`` accepts: the entry-point name, or the imported class."""
        if ":" in self.name:
            module, _, qual = self.name.partition(":")
            obj = importlib.import_module(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
            return obj
        return self.name


class _SpecAction(argparse.Action):
    """Keeps ``--arch`` and ``--vm-option`` in command-line order in one list, so that an option
    binds to the ``--arch`` before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        specs = list(getattr(namespace, _DEST, None) or [])
        specs.append((self.const, values))
        setattr(namespace, _DEST, specs)


def installed_backends() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def selected_configs(config) -> list[ArchConfig]:
    specs = config.getoption(_DEST) or []
    global_opts: dict[str, object] = {}
    archs: list[tuple[str, dict]] = []
    for kind, value in specs:
        if kind == "arch":
            archs.append((value, dict(global_opts)))
        else:
            key, sep, val = value.partition("=")
            if not sep or not key:
                raise pytest.UsageError(f"--vm-option {value!r}: expected KEY=VALUE")
            target = archs[-1][1] if archs else global_opts
            target[key] = option_value(val)
    if not archs:
        names = installed_backends() or [FLAT_BACKEND]
        archs = [(name, dict(global_opts)) for name in names]
    return [ArchConfig(name, tuple(sorted(opts.items()))) for name, opts in archs]


# --------------------------------------------------------------------------- pytest hooks

def pytest_addoption(parser):
    group = parser.getgroup("kvmcore", "kvmcore conformance suite")
    group.addoption("--arch", action=_SpecAction, const="arch", dest=_DEST, default=[],
                    metavar="NAME",
                    help="backend to test: an entry-point name of group kvmcore.arch or "
                         "module:Class (repeatable; default: every installed backend)")
    group.addoption("--each-vm-type", action="store_true", dest="kvmcore_each_vm_type",
                    help="run each test on every VM type that claims its capabilities (default: "
                         "the first one, \"default\" first)")
    group.addoption("--vm-option", action=_SpecAction, const="opt", dest=_DEST, default=[],
                    metavar="KEY=VALUE",
                    help="VM option for the preceding --arch (before any --arch: for all)")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # Without test paths, run the suite that ships inside this package.
    ns = early_config.known_args_namespace
    if not getattr(ns, "file_or_dir", None) and not getattr(ns, "help", False):
        args.append(str(SUITE_DIR))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "xfail_on(*arch_names, reason): a known bug of those backends (ArchInfo.name): "
        "strict xfail there, a normal test elsewhere")
    config.addinivalue_line(
        "markers",
        "requires(*caps): capabilities the test needs; a backend that claims none of its VM "
        "types with all of them skips the test")
    if not config.getoption("hypothesis_profile", default=None):
        profiles.load_default()
    config._kvmcore_configs = selected_configs(config)


def pytest_report_header(config):
    configs = getattr(config, "_kvmcore_configs", [])
    lines = ["kvmcore conformance: " + ", ".join(c.id for c in configs)]
    if not config.getoption(_DEST) and not installed_backends():
        lines.append("kvmcore conformance: no backend installed (entry points kvmcore.arch); "
                     f"running on {FLAT_BACKEND}")
    return lines


def pytest_generate_tests(metafunc):
    if "arch" not in metafunc.fixturenames:
        return
    configs = metafunc.config._kvmcore_configs
    if not metafunc.config.getoption("kvmcore_each_vm_type"):
        metafunc.parametrize("arch", configs, ids=[c.id for c in configs], indirect=True)
        return
    # One parameter per VM type that claims the test's capabilities.
    required = required_capabilities(metafunc.definition)
    params, ids = [], []
    for cfg in configs:
        types = [t for t, caps in vm_type_capabilities(cfg).items() if set(required) <= caps]
        for t in types or [None]:
            params.append((cfg, t))
            ids.append(cfg.id if t in (None, "default") else f"{cfg.id}-{t}")
    metafunc.parametrize("arch", params, ids=ids, indirect=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "arch" not in callspec.params:
            continue
        param = callspec.params["arch"]
        cfg = param[0] if isinstance(param, tuple) else param
        why = divergence_reason(item, cfg)
        if why is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=why))
            continue
        name = arch_name(cfg)
        for mark in item.iter_markers("xfail_on"):
            if name in mark.args:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


def divergence_reason(item, cfg: ArchConfig) -> str | None:
    """The reason ``cfg``'s backend declares for ``item`` in ArchInfo.known_divergences: keys
    name the test (every parametrization), the test with its other parameters (``[...]``
    without the arch's id), either one after ``file.py::``."""
    divergences = arch_divergences(cfg)
    if not divergences:
        return None
    ids = [p for p in item.callspec.id.split("-") if p != cfg.id and p]
    names = [item.originalname]
    if ids:
        names.append(f"{item.originalname}[{'-'.join(ids)}]")
    for name in names:
        for key in (name, f"{item.path.name}::{name}"):
            if key in divergences:
                return f"known divergence: {divergences[key]}"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    result = yield
    # Invariants after the test body, so that a broken one fails the test (not its teardown).
    for vm in getattr(pyfuncitem, "_kvmcore_vms", ()):
        vm.check_invariants()
    return result


# --------------------------------------------------------------------------- fixtures

_PROBES: dict = {}


def vm_type_capabilities(cfg: ArchConfig) -> dict[str, frozenset[str]]:
    """The capabilities of each VM type of ``cfg``, read from VMs of that configuration (a
    backend may claim per option, e.g. no 2M blocks with a 64K granule)."""
    if cfg not in _PROBES:
        from kvmcore import VM

        probe = VM(arch=cfg.backend, **dict(cfg.options))
        caps = {}
        for vm_type in probe.arch_info.vm_types:
            vm = probe if vm_type == probe.vm_type else VM(arch=cfg.backend, vm_type=vm_type,
                                                         **dict(cfg.options))
            caps[vm_type] = frozenset(vm.capabilities)
        _PROBES[cfg] = caps
    return _PROBES[cfg]


_INFOS: dict = {}


def arch_info(cfg: ArchConfig):
    """The ArchInfo of a configuration's VMs (a backend may describe itself per option)."""
    if cfg not in _INFOS:
        from kvmcore import VM

        _INFOS[cfg] = VM(arch=cfg.backend, **dict(cfg.options)).arch_info
    return _INFOS[cfg]


def arch_name(cfg: ArchConfig) -> str:
    """The backend's own name (ArchInfo.name) for a configuration."""
    return arch_info(cfg).name


def arch_divergences(cfg: ArchConfig) -> dict[str, str]:
    return dict(arch_info(cfg).known_divergences)


def required_capabilities(node) -> tuple[str, ...]:
    caps: list[str] = []
    for mark in node.iter_markers("requires"):
        for cap in mark.args:
            if cap not in caps:
                caps.append(cap)
    return tuple(caps)


def choose_vm_type(cfg: ArchConfig, required) -> tuple[str | None, str | None]:
    """(vm_type, None) for the first VM type claiming every required capability ("default"
    first), else (None, the capability to name in the skip reason)."""
    types = vm_type_capabilities(cfg)
    order = ["default"] + [t for t in types if t != "default"]
    for vm_type in order:
        if set(required) <= types[vm_type]:
            return vm_type, None
    claimed = frozenset().union(*types.values())
    missing = [c for c in required if c not in claimed]
    if missing:
        return None, missing[0]
    return None, " together with ".join(required)


@attrs.define
class Arch:
    """The ``arch`` fixture: the configuration under test and the VM type chosen for this
    test's capabilities."""

    config: ArchConfig
    vm_type: str
    capabilities: frozenset[str]
    required: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.config.id

    def has(self, cap: str) -> bool:
        return cap in self.capabilities


@pytest.fixture
def arch(request) -> Arch:
    cfg = request.param
    required = required_capabilities(request.node)
    if isinstance(cfg, tuple):      # --each-vm-type: the VM type was chosen at collection
        cfg, vm_type = cfg
        missing = None if vm_type else choose_vm_type(cfg, required)[1]
    else:
        vm_type, missing = choose_vm_type(cfg, required)
    if vm_type is None:
        pytest.skip(f"{cfg.id} does not claim {missing}")
    return Arch(cfg, vm_type, vm_type_capabilities(cfg)[vm_type], required)


@pytest.fixture
def host(arch):
    """A fresh host whose PAGE_SIZE is the base page the run's VM options ask for."""
    from kvmcore.vm import host_for

    return host_for(arch.config.backend, dict(arch.config.options))


@pytest.fixture
def make_vm(request, arch, host):
    """``make_vm(vm_type=None, host=None, **options)``: a VM of the backend under test, on the
    test's host unless another is given; the VM options of the run apply first."""
    from kvmcore import VM

    made = request.node.__dict__.setdefault("_kvmcore_vms", [])

    test_host = host

    def factory(vm_type: str | None = None, host=None, **options):
        opts = dict(arch.config.options)
        opts.update(options)
        vm = VM(arch=arch.config.backend, vm_type=vm_type or arch.vm_type,
                host=host if host is not None else test_host, **opts)
        made.append(vm)
        return vm

    return factory


@pytest.fixture
def page(vm) -> int:
    """The base page of the test's VM in bytes (its host's PAGE_SIZE): the unit of the
    suite's slot layouts, so one test means the same thing at 4 KiB and at 64 KiB."""
    return vm.page_size


@pytest.fixture
def vm(make_vm):
    return make_vm()


@pytest.fixture
def vcpu(vm):
    return vm.create_vcpu(0)


@pytest.fixture
def guest(vm, host, arch):
    from .helpers import Guest

    return Guest(vm, host, arch)
