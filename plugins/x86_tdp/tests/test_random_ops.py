"""Seeded random operation sequences on every VM type (the conformance suite only drives the
first VM type that claims a capability): accesses of both kinds, conversions, hole punches,
host reclaim, aging, dirty-log toggles and GETs, with check_invariants after every step and
data read back as written."""

from __future__ import annotations

import random

import pytest
from kvmcore import MemoryFaultExit, MmioExit
from kvmcore.uapi import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEM_GUEST_MEMFD,
                          KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMORY_ATTRIBUTE_PRIVATE)

from conftest import PAGE, SZ_2M

SLOT = 8 << 20


def shared_gpa(g, gpa):
    return gpa | 1 << g.b.tdx.shared_bit if g.vm.vm_type == "tdx" else gpa


@pytest.mark.parametrize("vm_type,options", [
    ("default", {}), ("default", {"pml": False}), ("default", {"ad_disabled": True}),
    ("sw_protected", {}), ("snp", {}), ("tdx", {}), ("tdx", {"tdp_level": 5}),
])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_ops(make, vm_type, options, seed):
    rnd = random.Random(seed)
    g = make(vm_type, **options)
    private_vm = vm_type != "default"
    hva = g.host.mmap(SLOT, thp=True)
    gmem = g.vm.create_guest_memfd(SLOT, folio_order=rnd.choice([0, 9])) if private_vm \
        else None
    flags = KVM_MEM_GUEST_MEMFD if private_vm else 0
    g.vm.set_user_memory_region(0, 0, SLOT, hva, flags=flags, guest_memfd=gmem)
    logging = False
    shadow: dict[tuple[int, bool], bytes] = {}
    for step in range(100):
        op = rnd.choice(["write", "write", "read", "convert", "punch", "reclaim", "age",
                         "log", "getlog", "fetch"])
        gfn = rnd.randrange(SLOT // PAGE)
        gpa = gfn * PAGE
        if op in ("write", "read", "fetch"):
            is_priv = private_vm and g.vm.kvm_mem_is_private(gfn)
            want_priv = is_priv if rnd.random() < 0.9 else not is_priv
            if vm_type == "tdx":
                addr, kw = (gpa if want_priv else shared_gpa(g, gpa)), {}
            elif vm_type == "snp":
                addr, kw = gpa, {"private": want_priv}
            else:
                addr, kw = gpa, {}
                want_priv = is_priv
            try:
                if op == "write":
                    data = bytes([step & 0xFF or 1]) * 4
                    g.vcpu.write(addr, data, **kw)
                    shadow[(gfn, want_priv)] = data
                elif op == "read":
                    got = g.vcpu.read(addr, 4, **kw)
                    if (gfn, want_priv) in shadow:
                        assert got == shadow[(gfn, want_priv)], (step, op, gfn)
                else:
                    g.vcpu.fetch(addr, **kw)
                assert want_priv == is_priv
            except MemoryFaultExit as e:
                assert want_priv != is_priv and e.private == want_priv
        elif op == "convert" and private_vm:
            n = rnd.choice([1, 3, 512, 700])
            n = min(n, SLOT // PAGE - gfn)
            attrs = rnd.choice([0, KVM_MEMORY_ATTRIBUTE_PRIVATE])
            # Each alias keeps its data: host memory for shared, the gmem page for private.
            g.vm.set_memory_attributes(gpa, n * PAGE, attrs)
        elif op == "punch" and private_vm:
            off = (gfn * PAGE) & ~(SZ_2M - 1)
            gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, SZ_2M)
            for k in [k for k in shadow if k[1] and off // PAGE <= k[0] < off // PAGE + 512]:
                del shadow[k]
        elif op == "reclaim":
            g.host.madvise_dontneed(hva + (gpa & ~(SZ_2M - 1)), SZ_2M)
            base = gfn & ~511
            for k in [k for k in shadow if not k[1] and base <= k[0] < base + 512]:
                del shadow[k]
        elif op == "age":
            g.host.age(hva, SLOT)
        elif op == "log" and not private_vm:
            logging = not logging
            g.vm.set_user_memory_region(0, 0, SLOT, hva,
                                        flags=KVM_MEM_LOG_DIRTY_PAGES if logging else 0)
        elif op == "getlog" and logging:
            g.vm.get_dirty_log(0)
        g.vm.check_invariants()
    assert shared_gpa(g, 0) >= 0


def test_mmio_access_on_every_type(make):
    for vm_type in ("default", "sw_protected", "snp", "tdx"):
        g = make(vm_type)
        with pytest.raises(MmioExit):
            g.vcpu.read(shared_gpa(g, 0x8000_0000), 4)
        g.vm.check_invariants()
