"""Backend discovery and the plugin managers.

Backends come from the entry-point group ``kvmcore.arch`` (name = architecture, value = backend
class); extensions (tracers, statistics) from ``kvmcore.ext`` (value = an object or module with
hook implementations). ``KVMCORE_DISABLE_PLUGINS`` is a comma-separated block-list of
entry-point names. Entry points are read once per process.

Building a pluggy manager costs milliseconds (it inspects every signature), so it is built once
per backend class: the class's hook implementations are registered as forwarders that call the
implementation of the VM the hook is called for (``vm.backend``). Hooks are called without
pluggy's general dispatch where it adds nothing (``bind_hot_hook``): each VM binds its hot hooks
to its backend's methods, and the class manager's relay (``BoundHooks``), each hook bound once,
is every such VM's ``vm.hook``. A VM that needs a manager of its own (a test registering a spy
on ``vm.pm``) gets one on first access of ``vm.pm``: a ``VmPluginManager`` that rebinds the
VM's hooks whenever a plugin is registered or unregistered, so a wrapper added after creation
is never silently skipped.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import operator
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
DEFAULTS_NAME = "kvmcore.defaults"
REQUIRED_HOOKS = ("translate", "map_leaf", "unmap_gfn_range", "age_gfn", "test_age_gfn",
                  "leaves")


def blocked_names() -> frozenset[str]:
    """The names block-listed by the environment variable, read at every call (a test may
    set it between two VMs); parsed once per value."""
    return _parse_blocked(os.environ.get(DISABLE_ENV, ""))


@functools.cache
def _parse_blocked(value: str) -> frozenset[str]:
    return frozenset(n.strip() for n in value.split(",") if n.strip())


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def entry_points_of(group: str) -> dict[str, EntryPoint]:
    """The entry points of ``group`` by name (read once per process)."""
    return _entry_points(group)


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
    if arch not in _entry_points(ARCH_GROUP) or arch in blocked_names():
        backends = installed_backends()
        raise KvmError(errno.ENODEV, f"arch={arch!r} is not installed; installed: "
                                     f"{', '.join(backends) or 'none'}")
    return _load_backend(arch)


@functools.cache
def _load_backend(name: str) -> type:
    """An installed backend's class, loaded once per process (every VM looks it up)."""
    return _entry_points(ARCH_GROUP)[name].load()


HOT_HOOKS = ("translate", "faultin_pfn", "map_leaf", "fast_page_fault", "relax_perms",
             "unmap_gfn_range", "leaves")


def get_plugin_manager(backend, arch_name: str, on_change=None) -> pluggy.PluginManager:
    """A manager for one backend instance, set up in a fixed order: create, add the specs,
    block-list from the environment, load extension entry points, register the core's
    defaults and the backend, check that every implementation matches a spec."""
    pm = VmPluginManager("kvmcore")
    _populate(pm, backend, arch_name)
    pm._on_change = on_change
    return pm


class VmPluginManager(pluggy.PluginManager):
    """A VM's own manager: ``on_change()`` runs after every register / unregister, so the
    VM rebinds its hot hooks."""

    def __init__(self, project_name: str, on_change=None):
        super().__init__(project_name)
        self._on_change = on_change

    def register(self, plugin, name=None):
        ret = super().register(plugin, name)
        if self._on_change is not None:
            self._on_change()
        return ret

    def unregister(self, plugin=None, name=None):
        ret = super().unregister(plugin, name)
        if self._on_change is not None:
            self._on_change()
        return ret


def _populate(pm: pluggy.PluginManager, backend, arch_name: str) -> None:
    pm.add_hookspecs(hookspecs)
    blocked = blocked_names()
    for name in blocked:
        pm.set_blocked(name)
    for name in sorted(_entry_points(EXT_GROUP)):
        if name not in blocked:
            pm.register(_load_extension(name), name=name)
    pm.register(defaults, name=DEFAULTS_NAME)
    pm.register(backend, name=arch_name)
    pm.check_pending()
    missing = [h for h in REQUIRED_HOOKS
               if not any(impl.plugin is backend for impl in getattr(pm.hook, h).get_hookimpls())]
    if missing:
        raise TypeError(f"backend {arch_name!r} does not implement required hooks: "
                        f"{', '.join(missing)}")


def class_plugin_manager(backend, arch_name: str) -> pluggy.PluginManager | None:
    """The manager shared by every VM whose backend is of ``backend``'s class and offers the
    same hook implementations (an instance may hide one of its class's with a plain
    attribute). None when the class cannot be forwarded: a hook implementation that does not
    take ``vm``."""
    own = getattr(backend, "__dict__", None)
    hidden = own.keys() & _impl_names(type(backend)) if own else ()
    if hidden:
        # Instance attributes hide these methods of the class: those not marked drop out.
        marker = f"{hookspecs.hookspec.project_name}_impl"
        hidden = frozenset(name for name in hidden
                           if getattr(own[name], marker, None) is None)
    return _class_manager(type(backend), frozenset(hidden), arch_name, blocked_names())


@functools.cache
def _impl_names(cls: type) -> tuple[str, ...]:
    marker = f"{hookspecs.hookspec.project_name}_impl"
    return tuple(name for name in dir(cls)
                 if callable(method := getattr(cls, name, None))
                 and getattr(method, marker, None) is not None)


@functools.cache
def _class_manager(cls: type, dropped: frozenset, arch_name: str, _blocked: frozenset):
    impls = tuple(name for name in _impl_names(cls) if name not in dropped)
    forwarder = _forwarder_for(cls, impls, hookspecs.hookspec.project_name)
    if forwarder is None:
        return None
    pm = pluggy.PluginManager("kvmcore")
    _populate(pm, forwarder, arch_name)
    # Nothing registers on a class manager after this (a VM that wants to gets a manager of
    # its own, ``vm.pm``), so how each hook binds is worked out once, for every VM, and one
    # relay bound through the forwarders serves every VM as its ``vm.hook``.
    pm.kvmcore_binders = {}
    pm.kvmcore_hooks = BoundHooks(pm)
    return pm


def _forwarder_for(cls: type, impls: tuple, project: str):
    """An object with one forwarding hook implementation per hook implementation ``impls``
    of ``cls``, same options and signature, calling ``vm.backend``'s method."""
    attrs_ = {}
    for name in impls:
        method = getattr(cls, name)
        opts = getattr(method, f"{project}_impl")
        sig = inspect.signature(method)
        params = list(sig.parameters.values())[1:]      # without self
        names = [p.name for p in params]
        if "vm" not in names:
            return None
        fwd = _forward(name, names.index("vm"), inspect.isgeneratorfunction(method))
        # pluggy reads the argument names from the signature (1.6) or from the code of the
        # unwrapped function (1.7+): both must be the backend method's.
        fwd.__signature__ = sig.replace(parameters=params)
        fwd.__wrapped__ = method
        fwd.__name__ = name
        fwd.__qualname__ = getattr(method, "__qualname__", name)
        setattr(fwd, f"{project}_impl", dict(opts))
        fwd.kvmcore_method = name
        attrs_[name] = staticmethod(fwd)
    return type(f"{cls.__name__}Forwarder", (), attrs_)()


def _forward(name: str, vm_index: int, generator: bool):
    if generator:
        def fwd(*args):
            return (yield from getattr(args[vm_index].backend, name)(*args))
    else:
        def fwd(*args):
            return getattr(args[vm_index].backend, name)(*args)
    return fwd


def bind_hot_hook(pm: pluggy.PluginManager, name: str, backend=None):
    """A callable for hook ``name`` that skips pluggy's general dispatch where it can: the one
    implementation itself when nothing wraps it (the common case for translate and map_leaf),
    the backend's and the core's default implementations called in pluggy's order (a
    firstresult hook stops at the first result that is not None; another returns pluggy's
    list of results), or the backend's own new-style wrapper around the core's default
    implementation, called as pluggy calls them (``faultin_pfn``); otherwise the hook caller
    itself, so extensions still see every call. ``backend`` is the VM's backend when ``pm`` is
    a class manager (its forwarders are replaced by the backend's own method); without it,
    the class's forwarders call the method of the backend of the VM each call is for."""
    binders = getattr(pm, "kvmcore_binders", None)
    if binders is None or backend is None:
        return _binder(pm, name, backend)(backend)
    binder = binders.get(name)
    if binder is None:
        binder = binders[name] = _binder(pm, name, backend)
    return binder(backend)


class BoundHooks:
    """``vm.hook``: pluggy's hook relay, each hook bound (``bind_hot_hook``) on its first call
    and kept. A call answers what pluggy's would, with pluggy's dispatch skipped where nothing
    but the backend and the core's defaults implement the hook. A class manager's relay
    (``backend`` None) serves every VM of the class; a VM with a manager of its own has its
    own relay, replaced whenever the manager changes."""

    def __init__(self, pm: pluggy.PluginManager, backend=None):
        self._pm = pm
        self._backend = backend

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        bound = bind_hot_hook(self._pm, name, self._backend)
        setattr(self, name, bound)
        return bound


def _binder(pm: pluggy.PluginManager, name: str, backend):
    """``bind_hot_hook``'s choice for hook ``name`` of ``pm`` as registered now, as a function
    of the VM's backend: of any VM's backend (a class manager's binders are kept for every
    VM of the class: its backend implementations are forwarders), or of None alone when
    ``backend`` is None (the binding a class manager's relay shares between its VMs)."""
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    spec = caller.spec
    firstresult = spec is None or spec.opts.get("firstresult")
    if not impls:
        return lambda backend: _none if firstresult else _no_results
    if any(i.kwargnames for i in impls):
        return lambda backend: caller
    plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
    if len(plain) == len(impls) and (len(impls) == 1 or all(
            i.plugin_name == DEFAULTS_NAME or _is_backend(i, backend) for i in impls)):
        # pluggy calls the last registered first, trylast ones (the core's defaults) after
        # the others. An implementation may take fewer arguments than the spec: it is passed
        # those, as pluggy does.
        parts = [(i.function, getattr(i.function, "kvmcore_method", None), i.argnames,
                  spec is not None and i.argnames != spec.argnames)
                 for i in reversed(impls)]
        if len(parts) == 1:
            part = parts[0]
            if firstresult and backend is not None and part[1] is not None and not part[3]:
                # The common case, the backend's own method: looked up in C for each VM.
                return operator.attrgetter(part[1])
            if firstresult:
                return lambda backend: _resolved(backend, *part)
            return lambda backend: _listed([_resolved(backend, *part)])
        return lambda backend: (_first_result if firstresult else _listed)(
            [_resolved(backend, *part) for part in parts])
    if spec is not None and any(i.argnames != spec.argnames for i in impls):
        return lambda backend: caller
    if (len(impls) == 2 and len(plain) == 1 and firstresult
            and plain[0].plugin_name == DEFAULTS_NAME):
        wrapper = next(i for i in impls if i is not plain[0])
        if wrapper.wrapper and _is_backend(wrapper, backend):
            return lambda backend: caller if backend is None else _wrapped_call(
                _function(wrapper, backend), _function(plain[0], backend), spec.argnames)
    return lambda backend: caller


def _resolved(backend, function, method: str | None, argnames: tuple, fewer: bool):
    """A hook implementation ready to call with the hook's keyword arguments: a class
    forwarder's backend method (``method``), the backend's own; without ``backend`` the
    forwarder itself (it calls the method of the backend of the VM each call is for), given
    its ``argnames`` as pluggy gives them; or ``function``, given only its ``argnames`` when
    it takes ``fewer`` than the spec."""
    if method is not None:
        if backend is None:
            return _only(function, argnames)
        function = getattr(backend, method)
    return _only(function, argnames) if fewer else function


def _is_backend(impl, backend) -> bool:
    """The implementation is the VM's backend's (or its class forwarder's), not an
    extension's: extensions always go through pluggy."""
    return impl.plugin is backend or getattr(impl.function, "kvmcore_method", None) is not None


def _function(impl, backend):
    method = getattr(impl.function, "kvmcore_method", None)
    return impl.function if method is None else getattr(backend, method)


def _only(function, argnames: tuple):
    """``function`` called with the hook's arguments it takes (``argnames``), in order."""

    def call(**kwargs):
        return function(*[kwargs[name] for name in argnames])

    call.__name__ = getattr(function, "__name__", "hook")
    return call


def _wrapped_call(wrapper, inner, argnames: tuple):
    """pluggy's ``_multicall`` for one new-style wrapper around one implementation of a
    firstresult hook, without its general loop: the wrapper runs to its ``yield``, then the
    implementation; the wrapper gets the result (or has the exception thrown in) and what it
    returns (or raises) is the hook's. The call takes the hook's ``argnames`` as parameters
    of its own (generated, as attrs generates an ``__init__``), so the keyword call of a hot
    hook builds no dictionary of them."""
    call = _relay_maker(tuple(argnames))(wrapper, inner)
    call.__name__ = getattr(wrapper, "__name__", "wrapped")
    return call


@functools.cache
def _relay_maker(argnames: tuple):
    """The function that makes ``_wrapped_call``'s calls for a hook with ``argnames``,
    generated once per hook signature (a VM binds its hooks when it is created)."""
    params = ", ".join(argnames)
    namespace = {"_relay": _relay}
    exec(f"def make(wrapper, inner):\n"
         f"    def call({params}):\n"
         f"        return _relay(wrapper({params}), inner, {params})\n"
         f"    return call\n", namespace)
    return namespace["make"]


def _relay(teardown, inner, *args):
    """The wrapper protocol of ``_wrapped_call``: ``teardown`` is the wrapper's generator."""
    try:
        next(teardown)
    except StopIteration:
        raise RuntimeError(f"wrap_controller {teardown!r} did not yield") from None
    try:
        result = inner(*args)
    except BaseException as exc:
        try:
            teardown.throw(exc)
        except StopIteration as stop:
            return stop.value
    else:
        try:
            teardown.send(result)
        except StopIteration as stop:
            return stop.value
    teardown.close()
    raise RuntimeError(f"wrap_controller {teardown!r} has second yield")


def _first_result(functions: list):
    """pluggy's call of a firstresult hook whose implementations are ``functions``, in the
    order pluggy calls them: the first result that is not None."""

    def call(**kwargs):
        for function in functions:
            result = function(**kwargs)
            if result is not None:
                return result
        return None

    call.__name__ = getattr(functions[0], "__name__", "hook")
    return call


def _listed(functions: list):
    """pluggy's call of a hook that is not firstresult whose implementations are
    ``functions``, in the order pluggy calls them: the list of their results that are not
    None."""
    if len(functions) == 1:
        function = functions[0]

        def call(**kwargs):
            result = function(**kwargs)
            return [] if result is None else [result]
    else:
        def call(**kwargs):
            return [r for r in (f(**kwargs) for f in functions) if r is not None]

    call.__name__ = getattr(functions[0], "__name__", "hook")
    return call


def _none(**kwargs):
    """A firstresult hook nobody implements returns None."""
    return None


def _no_results(**kwargs):
    """A hook that is not firstresult and that nobody implements returns no results."""
    return []
