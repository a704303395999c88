"""gfn_to_pfn_cache internals (kvmcore.pfncache): the list the notifier walks, refresh_lock,
the retry test, and the arches without CONFIG_HAVE_KVM_PFNCACHE."""

from __future__ import annotations

import errno

import attrs
import pytest

from kvmcore import VM, KvmError
from kvmcore.errors import InvariantError
from kvmcore.pfncache import GPC_REFRESH_LOCK_WAIT, GPC_RELOCK, mmu_notifier_retry_cache
from kvmcore.testing import FlatBackend

FLAT = "kvmcore.testing:FlatBackend"


def _vm():
    vm = VM(arch=FLAT)
    hva = vm.host.mmap(16 * 4096)
    vm.host.write(hva, bytes(16 * 4096))
    vm.set_user_memory_region(0, 0, 16 * 4096, hva)
    return vm, hva


def test_activate_puts_the_cache_on_the_list_and_deactivate_takes_it_off():
    vm, hva = _vm()
    gpc = vm.gpc_init()
    assert vm.gpc_list == [] and not gpc.active
    assert gpc.activate(0x3000, 8) == 0 and vm.gpc_list == [gpc]
    gpc.deactivate()
    assert vm.gpc_list == [] and not gpc.valid
    vm.host.migrate(hva + 0x3000)               # the notifier no longer looks at it
    assert vm.stats["gpc_invalidate"] == 0


def test_refreshes_are_serialised_by_refresh_lock():
    """A second refresh waits for the first, which holds refresh_lock across its sleeping
    hva_to_pfn (93984f19e7bc); then it finds the cache valid and looks nothing up."""
    vm, hva = _vm()
    gpc = vm.gpc_init()
    first = gpc.steps.activate(0x3000, 8)
    assert next(first) == "gpc_hva_to_pfn" and first.holds == ["gpc_refresh_lock"]
    second = gpc.steps.refresh(8)
    assert next(second) == GPC_REFRESH_LOCK_WAIT and not second.runnable
    assert first.run() == 0 and second.run() == 0 and gpc.valid


def test_the_retry_follows_the_count_not_the_in_progress_counter():
    """mmu_notifier_retry_cache: an invalidation between start and end is seen through
    mn_active_invalidate_count, raised before the caches were invalidated (c496097d2c0b)."""
    vm, hva = _vm()
    seq = vm.mmu_invalidate.seq
    assert not mmu_notifier_retry_cache(vm, seq)
    vm.mn_active_invalidate_count += 1
    assert vm.mmu_invalidate.in_progress == 0 and mmu_notifier_retry_cache(vm, seq)
    vm.mn_active_invalidate_count -= 1
    assert mmu_notifier_retry_cache(vm, seq - 1)


def test_a_stale_valid_cache_is_an_invariant_failure():
    vm, hva = _vm()
    gpc = vm.gpc_init()
    gpc.activate(0x3000, 8)
    gpc.pfn += 1
    with pytest.raises(InvariantError, match=r"pfn cache of gpa 0x3000 .*missed invalidation"):
        vm.check_invariants()


def test_a_refresh_paused_with_its_pfn_sees_a_migration_and_retries():
    vm, hva = _vm()
    gpc = vm.gpc_init()
    flow = gpc.steps.activate(0x3000, 8)
    while next(flow) != GPC_RELOCK:
        pass
    old = vm.host.lookup_pte(hva + 0x3000)[0]
    new = vm.host.migrate(hva + 0x3000)
    assert flow.run() == 0 and gpc.pfn == new != old
    assert vm.stats["gpc_refresh_retry"] == 1
    vm.check_invariants()


class NoPfnCache(FlatBackend):
    arch_info = attrs.evolve(FlatBackend.arch_info, vm_types={
        t: caps - {"pfncache"} for t, caps in FlatBackend.arch_info.vm_types.items()})


def test_an_arch_without_pfncache_refuses_gpc_init():
    with pytest.raises(KvmError) as e:
        VM(arch=NoPfnCache).gpc_init()
    assert e.value.errno == errno.EOPNOTSUPP and "CONFIG_HAVE_KVM_PFNCACHE" in str(e.value)
