"""Backend discovery, the plugin manager's order, extensions and the hot-hook binding."""

import errno

import pytest

from kvmcore import VM, KvmError, hookimpl
from kvmcore.plugins import bind_hot_hook, get_plugin_manager
from kvmcore.testing import FlatBackend


def test_unknown_arch_is_enodev_and_lists_installed():
    with pytest.raises(KvmError) as e:
        VM(arch="no_such_arch")
    assert e.value.errno == errno.ENODEV and "installed:" in str(e.value)


def test_module_class_string():
    vm = VM(arch="kvmcore.testing:FlatBackend")
    assert vm.arch_info.name == "flat"
    with pytest.raises(KvmError) as e:
        VM(arch="kvmcore.testing:Nope")
    assert e.value.errno == errno.ENODEV


def test_unknown_vm_type_and_options():
    with pytest.raises(KvmError) as e:
        VM(arch=FlatBackend, vm_type="tdx")
    assert e.value.errno == errno.EINVAL and "default" in str(e.value)
    with pytest.raises(KvmError) as e:
        VM(arch=FlatBackend, granule=65536)
    assert e.value.errno == errno.EINVAL


def test_blocked_arch_is_not_installed(monkeypatch):
    from kvmcore.plugins import installed_backends

    names = list(installed_backends())
    if not names:
        pytest.skip("no backend installed in this environment")
    monkeypatch.setenv("KVMCORE_DISABLE_PLUGINS", names[0])
    assert names[0] not in installed_backends()
    with pytest.raises(KvmError) as e:
        VM(arch=names[0])
    assert e.value.errno == errno.ENODEV


def test_missing_required_hook_is_refused():
    class Half(FlatBackend):
        leaves = None

    with pytest.raises(TypeError, match="leaves"):
        VM(arch=Half)


def test_hot_hooks_bind_directly_until_wrapped():
    vm = VM(arch=FlatBackend)
    assert getattr(vm.translate, "__self__", None) is vm.backend

    class Tracer:
        calls = 0

        @hookimpl(wrapper=True)
        def translate(self, vm, vcpu, gpa, access):
            Tracer.calls += 1
            return (yield)

    pm = get_plugin_manager(FlatBackend(), "flat")
    pm.register(Tracer())
    assert bind_hot_hook(pm, "translate") is pm.hook.translate


def test_two_architectures_side_by_side(host):
    class Other(FlatBackend):
        pass

    a, b = VM(arch=FlatBackend, host=host), VM(arch=Other, host=host)
    hva = host.mmap(1 << 20)
    for vm in (a, b):
        vm.set_user_memory_region(0, 0, 1 << 20, hva)
        vm.create_vcpu(0).write(0, b"shared host page")
    host.munmap(hva, 1 << 20)
    assert list(a.mappings()) == list(b.mappings()) == []


def test_arch_info_refuses_a_misspelt_capability():
    from kvmcore.arch import ArchInfo

    with pytest.raises(ValueError, match="hugepage2m"):
        ArchInfo(name="typo", page_sizes=(4096,), levels=1,
                 vm_types={"default": {"hugepage2m"}})


def test_a_wrapper_registered_after_creation_sees_hot_hooks_of_that_vm_only():
    """Hot hooks are bound once; a plugin registered later on ``vm.pm`` rebinds them (before,
    a ``translate`` wrapper added after creation was silently skipped), and VMs that share
    their backend class's manager are not affected."""
    seen = []

    class Tracer:
        @hookimpl(wrapper=True)
        def translate(self, vm, vcpu, gpa, access):
            seen.append((vm, gpa))
            return (yield)

    traced, other = VM(arch=FlatBackend), VM(arch=FlatBackend)
    for vm in (traced, other):
        vm.set_user_memory_region(0, 0, 1 << 20, vm.host.mmap(1 << 20))
    tracer = Tracer()
    traced.pm.register(tracer)
    traced.create_vcpu(0).read(0x2000, 1)
    other.create_vcpu(0).read(0x2000, 1)
    assert seen == [(traced, 0x2000)] * len(seen) and seen
    traced.pm.unregister(tracer)
    assert getattr(traced.translate, "__self__", None) is traced.backend


def test_vms_of_one_backend_class_share_a_manager_but_call_their_own_backend():
    a, b = VM(arch=FlatBackend), VM(arch=FlatBackend)
    assert a.hook is b.hook
    assert a.translate.__self__ is a.backend and b.translate.__self__ is b.backend
    a.set_user_memory_region(0, 0, 1 << 20, a.host.mmap(1 << 20))
    a.create_vcpu(0).read(0x1000, 1)
    for vm, want in ((a, 1), (b, 0)):      # the shared relay forwards to vm.backend
        assert len(list(vm.hook.leaves(vm=vm, start=0, end=1 << 40, as_id=0))) == want


def test_a_backend_wrapper_over_the_default_is_called_as_pluggy_calls_it():
    """bind_hot_hook calls the backend's own new-style wrapper around the core's default
    without pluggy's loop: the wrapper sees the default's result (or its exception) and
    what it returns or raises is the hook's; an extension's wrapper still goes through
    pluggy."""
    from kvmcore.plugins import _wrapped_call

    seen = []

    class Wrapping(FlatBackend):
        @hookimpl(wrapper=True)
        def faultin_pfn(self, vm, fault):
            r = yield
            seen.append(r)
            return r

    vm = VM(arch=Wrapping)
    assert vm.faultin_pfn is not vm.pm.hook.faultin_pfn
    hva = vm.host.mmap(1 << 20)
    vm.set_user_memory_region(0, 0, 1 << 20, hva)
    vm.create_vcpu(0).read(0x1000, 1)
    assert seen == [0]                          # RET_PF_CONTINUE from the default

    def wrapper(x):
        try:
            r = yield
        except KeyError:
            raise ValueError("replaced") from None
        return r + 1

    def inner(x):
        if x < 0:
            raise KeyError(x)
        if x == 0:
            raise IndexError(x)
        return x * 10

    call = _wrapped_call(wrapper, inner, ("x",))
    assert call(x=2) == 21
    with pytest.raises(ValueError, match="replaced"):
        call(x=-1)
    with pytest.raises(IndexError):
        call(x=0)

    def twice(x):
        yield
        yield

    with pytest.raises(RuntimeError, match="second yield"):
        _wrapped_call(twice, inner, ("x",))(x=1)

    class Tracer:
        @hookimpl(wrapper=True)
        def faultin_pfn(self, vm, fault):
            return (yield)

    vm = VM(arch=FlatBackend)
    vm.pm.register(Tracer())
    assert vm.faultin_pfn == vm.pm.hook.faultin_pfn


def test_a_wrapper_relay_is_generated_once_per_hook_signature():
    """Binding a backend's wrapper generates its relay's code once per hook signature, not
    once per VM (a VM binds its hot hooks when it is created; the explorer makes one per
    schedule)."""
    from kvmcore.plugins import _relay_maker

    class Wrapping(FlatBackend):
        @hookimpl(wrapper=True)
        def faultin_pfn(self, vm, fault):
            return (yield)

    VM(arch=Wrapping).faultin_pfn  # noqa: B018
    before = _relay_maker.cache_info()
    vms = [VM(arch=Wrapping) for _ in range(3)]
    after = _relay_maker.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 3
    assert len({vm.faultin_pfn.__code__ for vm in vms}) == 1


def test_a_hot_hook_taking_fewer_arguments_gets_only_those():
    """An implementation that declares fewer arguments than the spec (pluggy passes it only
    those) is bound directly and called with the ones it takes."""
    seen = []

    class Narrow(FlatBackend):
        @hookimpl
        def leaves(self, vm, start, end):
            seen.append((start, end))
            return iter(())

    vm = VM(arch=Narrow)
    assert vm.lookup(0x3000) is None and seen == [(3, 4)]


def test_a_bound_hook_that_is_not_firstresult_returns_pluggys_list():
    """``vm.arch_check_invariants`` (bound once) answers what ``vm.hook.check_invariants``
    does: the list of the implementations' results that are not None, whether the backend
    alone implements it or an extension adds its own."""

    class Broken(FlatBackend):
        @hookimpl
        def check_invariants(self, vm):
            return ["broken"]

    class Silent(FlatBackend):
        @hookimpl
        def check_invariants(self, vm):
            return None

    class Extra:
        @hookimpl
        def check_invariants(self, vm):
            return ["extra"]

    for arch, want in ((Broken, [["broken"]]), (Silent, [])):
        vm = VM(arch=arch)
        assert vm.arch_check_invariants is not vm.hook.check_invariants
        assert vm.arch_check_invariants(vm=vm) == vm.hook.check_invariants(vm=vm) == want
    vm = VM(arch=Broken)
    vm.pm.register(Extra())
    assert sorted(vm.arch_check_invariants(vm=vm)) == [["broken"], ["extra"]]
    pm = get_plugin_manager(FlatBackend(), "flat")
    assert not pm.hook.dirty_pending_gfns.get_hookimpls()
    assert bind_hot_hook(pm, "dirty_pending_gfns")(vm=vm, slot=None) == []


def test_vm_hook_binds_each_hook_at_its_first_call_and_rebinds_on_a_new_plugin():
    """``vm.hook`` answers what pluggy's relay does; a plugin registered on ``vm.pm`` after a
    hook was bound sees that hook's next call."""
    vm = VM(arch=FlatBackend)
    assert vm.hook.page_table_bytes(vm=vm) == vm.pm.hook.page_table_bytes(vm=vm)
    assert vm.hook.check_invariants(vm=vm) == vm.pm.hook.check_invariants(vm=vm)
    hva = vm.host.mmap(1 << 20)
    vm.set_user_memory_region(0, 0, 1 << 20, hva)
    seen = []

    class Spy:
        @hookimpl
        def commit_memory_region(self, vm, old, new, change):
            seen.append(change)

    vm.pm.register(Spy())
    vm.set_user_memory_region(0, 0, 0, hva)
    assert seen and vm.hook.commit_memory_region == vm.pm.hook.commit_memory_region
    with pytest.raises(AttributeError):
        vm.hook.no_such_hook  # noqa: B018


def test_the_backend_and_the_default_bound_together_answer_as_pluggy():
    """A firstresult hook that the backend and the core's default implement is bound to both
    in pluggy's order: the backend's answer, or the default's where the backend declines
    (None); with an extension's implementation among them, pluggy calls them all."""

    class Answers(FlatBackend):
        @hookimpl
        def page_table_bytes(self, vm):
            return 4096

    class Declines(FlatBackend):
        @hookimpl
        def page_table_bytes(self, vm):
            return None

    class Extension:
        @hookimpl
        def page_table_bytes(self, vm):
            return None

    for arch, want in ((Answers, 4096), (Declines, 0)):
        vm = VM(arch=arch)
        assert len(vm.pm.hook.page_table_bytes.get_hookimpls()) == 2
        assert vm.hook.page_table_bytes is not vm.pm.hook.page_table_bytes
        assert vm.hook.page_table_bytes(vm=vm) == vm.pm.hook.page_table_bytes(vm=vm) == want
        vm.pm.register(Extension())
        assert vm.hook.page_table_bytes == vm.pm.hook.page_table_bytes
        assert vm.page_table_bytes() == want
    from kvmcore.plugins import _first_result, _listed

    assert _listed([lambda x: [x], lambda x: None, lambda x: [2]])(x=1) == [[1], [2]]
    assert _first_result([lambda x: None, lambda x: x, lambda x: 3])(x=0) == 0
    assert _first_result([lambda x: None])(x=0) is None
