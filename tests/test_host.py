"""The simulated host mm and what it reports to MMU notifiers."""

import errno

import pytest
from conftest import MiB

from kvmcore import KvmError
from kvmcore.host import SigBus, SigSegv


class Recorder:
    def __init__(self):
        self.calls = []

    def invalidate_range_start(self, start, end):
        self.calls.append(("start", start, end))

    def invalidate_range_end(self, start, end):
        self.calls.append(("end", start, end))

    def release(self):
        self.calls.append(("release",))


@pytest.fixture
def rec(host):
    r = Recorder()
    host.register_notifier(r)
    return r


def test_mmap_errors(host):
    for kw, err in ((dict(length=4095), errno.EINVAL), (dict(length=MiB, kind="bogus"),
                                                         errno.EINVAL),
                    (dict(length=MiB, kind="pfnmap"), errno.EINVAL),
                    (dict(length=MiB, prot="rq"), errno.EINVAL),
                    (dict(length=MiB, kind="shared", thp=True), errno.EINVAL),
                    (dict(length=4096, kind="hugetlb_2m"), errno.EINVAL)):
        with pytest.raises(KvmError) as e:
            host.mmap(**kw)
        assert e.value.errno == err, kw
    hva = host.mmap(MiB)
    with pytest.raises(KvmError) as e:
        host.mmap(MiB, addr=hva)
    assert e.value.errno == errno.EEXIST


def test_zero_page_then_cow_notifies(host, rec):
    hva = host.mmap(MiB)
    assert host.read(hva, 4) == bytes(4)
    assert host.lookup_pte(hva)[0] == host.zero_pfn
    host.write(hva, b"data")
    assert rec.calls == [("start", hva, hva + 4096), ("end", hva, hva + 4096)]
    assert host.read(hva, 4) == b"data"


def test_shared_read_maps_readonly_write_upgrades_without_notifier(host, rec):
    hva = host.mmap(MiB, kind="shared")
    host.read(hva, 1)
    pfn, writable, _ = host.lookup_pte(hva)
    assert not writable
    host.write(hva, b"x")
    assert host.lookup_pte(hva)[:2] == (pfn, True) and rec.calls == []


def test_dontneed_anon_loses_data_shared_keeps_it(host):
    anon, shared = host.mmap(MiB), host.mmap(MiB, kind="shared")
    for hva in (anon, shared):
        host.write(hva, b"keep")
        host.madvise_dontneed(hva, MiB)
        assert host.lookup_pte(hva) is None
    assert host.read(anon, 4) == bytes(4)
    assert host.read(shared, 4) == b"keep"


def test_thp_split_and_collapse(host, rec):
    hva = host.mmap(4 * MiB, thp=True)
    host.write(hva + 0x1000, b"huge")
    assert host.host_mapping_size(hva) == 2 * MiB
    host.split_huge_page(hva)
    assert host.host_mapping_size(hva + 0x1000) == 4096
    assert host.read(hva + 0x1000, 4) == b"huge"
    for i in range(512):
        host.read(hva + i * 4096, 1)
    new = host.collapse_huge_page(hva)
    assert host.lookup_pte(hva)[0] == new and host.read(hva + 0x1000, 4) == b"huge"
    assert [c[0] for c in rec.calls] == ["start", "end", "start", "end"]


def test_migrate_moves_contents(host, rec):
    hva = host.mmap(MiB)
    host.write(hva, b"move")
    old = host.lookup_pte(hva)[0]
    new = host.migrate(hva)
    assert new != old and host.lookup_pte(hva)[0] == new and host.read(hva, 4) == b"move"
    assert rec.calls[0] == ("start", hva, hva + 4096)


def test_mprotect_removal_notifies_addition_does_not(host, rec):
    hva = host.mmap(MiB)
    host.write(hva, b"x")
    host.mprotect(hva, MiB, "r")
    assert not host.lookup_pte(hva)[1] and len(rec.calls) == 2
    with pytest.raises(SigSegv):
        host.write(hva, b"y")
    host.mprotect(hva, MiB, "rw")
    assert len(rec.calls) == 2
    host.write(hva, b"y")


def test_munmap_splits_vmas(host, rec):
    hva = host.mmap(3 * MiB)
    host.munmap(hva + MiB, MiB)
    assert host.find_vma(hva) and host.find_vma(hva + 2 * MiB)
    assert host.find_vma(hva + MiB) is None
    with pytest.raises(SigSegv):
        host.read(hva + MiB, 1)


def test_poison(host, rec):
    hva = host.mmap(MiB)
    host.write(hva, b"x")
    host.poison(hva)
    with pytest.raises(SigBus):
        host.read(hva, 1)
    host.read(hva + 4096, 1)


def test_pfnmap_gup_refused_follow_after_fixup(host):
    hva = host.mmap(MiB, kind="pfnmap", pfn=0x80000)
    assert host.gup_fast(hva, False) is None
    with pytest.raises(OSError) as e:
        host.gup(hva, False)
    assert e.value.errno == errno.EFAULT
    assert host.follow_pfnmap(hva) is None
    assert host.fixup_user_fault(hva, False) is True
    assert host.follow_pfnmap(hva) == (0x80000, True)
