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
    """A callable for firstresult hook ``name`` (called with keyword arguments) that skips
    pluggy's dispatch when that is safe: one implementation and no wrapper (the common case
    for translate, map_leaf) binds to the function itself; one implementation under new-style
    wrappers (x86's faultin_pfn) to ``_wrapped_call``, which runs them as pluggy's _multicall
    would. Anything else (old-style hookwrappers, several implementations, keyword-only
    implementation arguments) gets the hook caller itself, so extensions still see every
    call. The binding is taken once, when the VM is built: plugins registered later are
    not seen (the core registers none after that)."""
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    if not impls:
        return _none
    plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
    spec = caller.spec
    if (spec is None or not spec.opts.get("firstresult") or len(plain) != 1
            or any(i.hookwrapper or i.kwargnames for i in impls)):
        return caller
    argnames = set(spec.argnames)
    impl = _positional(plain[0], argnames)
    if len(impls) == 1:
        return impl
    # pluggy runs wrappers last-registered (tryfirst) outermost: the reverse of impls.
    wrappers = tuple(_positional(w, argnames) for w in reversed(impls) if w.wrapper)
    return functools.partial(_wrapped_call, wrappers, impl)


def _positional(hookimpl, argnames: set[str]):
    """The implementation as a keyword-callable taking every spec argument; pluggy passes
    only those the implementation names."""
    fn = hookimpl.function
    if set(hookimpl.argnames) == argnames:
        return fn
    names = hookimpl.argnames
    return lambda **kwargs: fn(*[kwargs[n] for n in names])


def _wrapped_call(wrappers, impl, **kwargs):
    """pluggy's _multicall for a firstresult hook with one implementation under new-style
    wrappers: set each wrapper up (outermost first), call the implementation, then resume
    the wrappers innermost first with its result or exception; a wrapper's return value or
    raise replaces them."""
    teardowns = []
    exception = result = None
    try:
        for fn in wrappers:
            gen = fn(**kwargs)
            try:
                next(gen)
            except StopIteration:
                _raise_wrapfail(gen, "did not yield")
            teardowns.append(gen)
        result = impl(**kwargs)
    except BaseException as exc:
        exception = exc
    for gen in reversed(teardowns):
        try:
            if exception is not None:
                try:
                    gen.throw(exception)
                except RuntimeError as re:
                    if isinstance(exception, StopIteration) and re.__cause__ is exception:
                        gen.close()
                        continue
                    raise
            else:
                gen.send(result)
            gen.close()
        except StopIteration as si:
            result = si.value
            exception = None
            continue
        except BaseException as e:
            exception = e
            continue
        _raise_wrapfail(gen, "has second yield")
    if exception is not None:
        raise exception
    return result


def _raise_wrapfail(gen, msg: str):
    co = gen.gi_code
    raise RuntimeError(f"wrap_controller at {co.co_name!r} {co.co_filename}:"
                       f"{co.co_firstlineno} {msg}")


def _none(**kwargs):
    """A firstresult hook nobody implements returns None."""
    return None
