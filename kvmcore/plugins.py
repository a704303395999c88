"""Backend discovery and the per-VM plugin manager.

Backends come from the entry-point group ``kvmcore.arch`` (name = architecture, value = backend
class); extensions (tracers, statistics) from ``kvmcore.ext`` (value = an object or module with
hook implementations). ``KVMCORE_DISABLE_PLUGINS`` is a comma-separated block-list of
entry-point names. Entry points are read once per process; each VM gets its own manager.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
from importlib.metadata import EntryPoint, entry_points

import pluggy
import structlog

from . import defaults, hookspecs
from .errors import KvmError

logger = structlog.get_logger(__name__)

ARCH_GROUP = "kvmcore.arch"
EXT_GROUP = "kvmcore.ext"
DISABLE_ENV = "KVMCORE_DISABLE_PLUGINS"
REQUIRED_HOOKS = ("translate", "map_leaf", "unmap_gfn_range", "age_gfn", "test_age_gfn",
                  "leaves")


def blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def installed_backends() -> dict[str, EntryPoint]:
    """Installed, not block-listed backends by architecture name, sorted by name."""
    blocked = blocked_names()
    return {name: ep for name, ep in sorted(_entry_points(ARCH_GROUP).items())
            if name not in blocked}


@functools.cache
def _load_extension(name: str):
    obj = _entry_points(EXT_GROUP)[name].load()
    return obj() if isinstance(obj, type) else obj


def resolve_backend(arch) -> type:
    """The backend class for ``arch``: an installed architecture name, ``"module:Class"``
    for a backend under development, or the class itself."""
    if isinstance(arch, type):
        return arch
    if not isinstance(arch, str) or not arch:
        raise KvmError(errno.EINVAL, f"arch={arch!r}: give an architecture name or a class")
    if ":" in arch:
        module, _, qualname = arch.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise KvmError(errno.ENODEV, f"arch={arch!r}: cannot import it ({e})") from None
        return obj
    backends = installed_backends()
    if arch not in backends:
        raise KvmError(errno.ENODEV, f"arch={arch!r} is not installed; installed: "
                                     f"{', '.join(backends) or 'none'}")
    return backends[arch].load()


def get_plugin_manager(backend, arch_name: str) -> pluggy.PluginManager:
    """One VM's manager, set up in a fixed order: create, add the specs, block-list from the
    environment, load extension entry points, register the core's defaults and the backend,
    check that every implementation matches a spec."""
    pm = pluggy.PluginManager("kvmcore")
    pm.add_hookspecs(hookspecs)
    blocked = blocked_names()
    for name in blocked:
        pm.set_blocked(name)
    for name in sorted(_entry_points(EXT_GROUP)):
        if name not in blocked:
            pm.register(_load_extension(name), name=name)
    pm.register(defaults, name="kvmcore.defaults")
    pm.register(backend, name=arch_name)
    pm.check_pending()
    missing = [h for h in REQUIRED_HOOKS
               if not any(impl.plugin is backend for impl in getattr(pm.hook, h).get_hookimpls())]
    if missing:
        raise TypeError(f"backend {arch_name!r} does not implement required hooks: "
                        f"{', '.join(missing)}")
    return pm


def bind_hot_hook(pm: pluggy.PluginManager, name: str):
    """A callable for hook ``name`` that skips pluggy's dispatch when exactly one
    implementation and no wrapper is registered (the common case for translate, faultin_pfn
    and map_leaf); otherwise the hook caller itself, so extensions still see every call."""
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    if not impls:
        return _none
    if len(impls) == 1 and not (impls[0].hookwrapper or impls[0].wrapper):
        return impls[0].function
    return caller


def _none(**kwargs):
    """A firstresult hook nobody implements returns None."""
    return None
