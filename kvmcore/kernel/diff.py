"""Differential testing: the same sequences of VM-level calls on /dev/kvm and on a model VM
configured like that kernel (``KernelProfile.vm_kwargs``), compared call by call.

A sequence is a tuple of calls, each a tuple ``(op, *args)`` with symbolic references where
the two sides differ (userspace addresses are offsets into a mapping each side owns;
guest_memfd and vCPU arguments are indices of the ones the sequence created). A call's outcome
is ``("ok", value)`` or ``("err", "EINVAL")``; the model raising anything but KvmError is
``("crash", ...)`` and always a difference. Values compared: KVM_CHECK_EXTENSION numbers, that
an fd was returned, dirty bitmaps (as page offsets), KVM_PRE_FAULT_MEMORY's unprocessed range,
KVM_RESET_DIRTY_RINGS's count. No guest runs, so dirty bits come only from
KVM_DIRTY_LOG_INITIALLY_SET and KVM_CLEAR_DIRTY_LOG.
"""

from __future__ import annotations

import errno
import mmap
from collections import Counter
from collections.abc import Iterable

import attrs

from ..errors import KvmError
from ..uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from . import kvmdev
from .profile import KernelProfile

#: The userspace mapping each side owns for memslots (sizes past it are fine: KVM checks
#: only access_ok() when a memslot is created).
AREA = 8 << 20
#: KVM_SET_USER_MEMORY_REGION accepts only these flags (kvm_vm_ioctl,
#: KVM_SET_USER_MEMORY_REGION_V1_FLAGS).
V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
#: Bits in the bitmap passed to KVM_GET_DIRTY_LOG: more than any generated slot has pages.
BITMAP_BITS = 1 << 15

IOCTL_NAMES = {
    "check_extension": "KVM_CHECK_EXTENSION", "set_region": "KVM_SET_USER_MEMORY_REGION",
    "set_region2": "KVM_SET_USER_MEMORY_REGION2", "create_gmem": "KVM_CREATE_GUEST_MEMFD",
    "fallocate": "fallocate(guest_memfd)", "set_attributes": "KVM_SET_MEMORY_ATTRIBUTES",
    "enable_cap": "KVM_ENABLE_CAP", "get_dirty_log": "KVM_GET_DIRTY_LOG",
    "clear_dirty_log": "KVM_CLEAR_DIRTY_LOG", "create_vcpu": "KVM_CREATE_VCPU",
    "pre_fault": "KVM_PRE_FAULT_MEMORY", "reset_dirty_rings": "KVM_RESET_DIRTY_RINGS",
}


def _err(e: OSError) -> tuple[str, str]:
    return ("err", errno.errorcode.get(e.errno, str(e.errno)))


class KernelSide:
    """One kernel VM running a sequence; every fd it opens is closed by ``close()``."""

    def __init__(self, kvm: kvmdev.Kvm, area_addr: int):
        self.vm = kvm.create_vm()
        self.area = area_addr
        self.gmems: list[kvmdev.GuestMemfd] = []
        self.vcpus: list[kvmdev.KvmVcpu] = []

    def close(self) -> None:
        for f in self.gmems + self.vcpus:
            f.close()
        self.vm.close()

    def _uaddr(self, ref) -> int:
        kind, value = ref
        return self.area + value if kind == "mem" else value

    def _gmem_fd(self, ref) -> int:
        if ref == "vmfd":
            return self.vm.fileno()
        if isinstance(ref, int) and ref < len(self.gmems):
            return self.gmems[ref].fileno()
        return 0xFFFFFFFF  # not an fd: EBADF

    def call(self, op: str, *a):
        vm = self.vm
        if op == "check_extension":
            return vm.check_extension(a[0])
        if op == "set_region":
            slot, flags, gpa, size, uaddr = a
            return vm.set_user_memory_region(slot, flags, gpa, size, self._uaddr(uaddr))
        if op == "set_region2":
            slot, flags, gpa, size, uaddr, gmem, gmem_off = a
            return vm.set_user_memory_region2(slot, flags, gpa, size, self._uaddr(uaddr),
                                              self._gmem_fd(gmem), gmem_off)
        if op == "create_gmem":
            self.gmems.append(vm.create_guest_memfd(*a))
            return "fd"
        if op == "fallocate":
            idx, mode, offset, length = a
            return self.gmems[idx].fallocate(mode, offset, length)
        if op == "set_attributes":
            return vm.set_memory_attributes(*a)
        if op == "enable_cap":
            cap, arg0, flags = a
            vm.enable_cap(cap, arg0, flags=flags)
            return None
        if op == "get_dirty_log":
            return vm.get_dirty_log(a[0], BITMAP_BITS)
        if op == "clear_dirty_log":
            return vm.clear_dirty_log(*a)
        if op == "create_vcpu":
            self.vcpus.append(vm.create_vcpu(a[0]))
            return "fd"
        if op == "pre_fault":
            idx, gpa, size, flags = a
            return self.vcpus[idx].pre_fault_memory(gpa, size, flags)
        if op == "reset_dirty_rings":
            return vm.reset_dirty_rings()
        raise ValueError(op)


class ModelSide:
    """The model VM running the same sequence, through the public API only."""

    def __init__(self, vm_kwargs: dict, arch: str = "x86_tdp"):
        from .. import VM

        self.vm = VM(arch=arch, **vm_kwargs)
        self.area = self.vm.host.mmap(AREA)
        self.gmems = []
        self.vcpus = []

    def close(self) -> None:
        self.vm.close()

    def _uaddr(self, ref) -> int:
        kind, value = ref
        return self.area + value if kind == "mem" else value

    def _gmem(self, ref):
        if ref == "vmfd":
            return self.vm
        if isinstance(ref, int) and ref < len(self.gmems):
            return self.gmems[ref]
        return None

    def call(self, op: str, *a):
        vm = self.vm
        if op == "check_extension":
            return vm.check_extension(a[0])
        if op == "set_region":
            slot, flags, gpa, size, uaddr = a
            if flags & ~V1_FLAGS:
                # kvm_vm_ioctl: the v1 struct has no guest_memfd fields.
                raise KvmError(errno.EINVAL, f"flags={flags:#x}: not a v1 memslot flag")
            return vm.set_user_memory_region(slot, gpa, size, self._uaddr(uaddr), flags)
        if op == "set_region2":
            slot, flags, gpa, size, uaddr, gmem, gmem_off = a
            return vm.set_user_memory_region(slot, gpa, size, self._uaddr(uaddr), flags,
                                             guest_memfd=self._gmem(gmem),
                                             guest_memfd_offset=gmem_off)
        if op == "create_gmem":
            self.gmems.append(vm.create_guest_memfd(*a))
            return "fd"
        if op == "fallocate":
            idx, mode, offset, length = a
            return self.gmems[idx].fallocate(mode, offset, length)
        if op == "set_attributes":
            return vm.set_memory_attributes(*a)
        if op == "enable_cap":
            cap, arg0, flags = a
            return vm.enable_cap(cap, arg0, flags=flags)
        if op == "get_dirty_log":
            return vm.get_dirty_log(a[0])
        if op == "clear_dirty_log":
            return vm.clear_dirty_log(*a)
        if op == "create_vcpu":
            self.vcpus.append(vm.create_vcpu(a[0]))
            return "fd"
        if op == "pre_fault":
            idx, gpa, size, flags = a
            return self.vcpus[idx].pre_fault_memory(gpa, size, flags)
        if op == "reset_dirty_rings":
            return vm.reset_dirty_rings()
        raise ValueError(op)


def _outcome(side, call) -> tuple:
    try:
        return ("ok", side.call(*call))
    except (KvmError, OSError) as e:
        return _err(e)
    except Exception as e:  # noqa: BLE001 - a model crash is a finding, not a test error
        return ("crash", f"{type(e).__name__}: {e}")


@attrs.define
class Difference:
    sequence: tuple
    index: int
    kernel: tuple
    model: tuple

    def format(self) -> str:
        lines = []
        for i, call in enumerate(self.sequence[:self.index + 1]):
            mark = ">>" if i == self.index else "  "
            lines.append(f"{mark} {i}: {_fmt_call(call)}")
        lines.append(f"   kernel: {_fmt_outcome(self.kernel)}   model: "
                     f"{_fmt_outcome(self.model)}")
        return "\n".join(lines)


def _fmt_call(call) -> str:
    def arg(v):
        return hex(v) if isinstance(v, int) and v > 4096 else repr(v)

    return f"{IOCTL_NAMES[call[0]]}({', '.join(arg(v) for v in call[1:])})"


def _fmt_outcome(o) -> str:
    return o[1] if o[0] != "ok" else f"ok {o[1]!r}"


class Differ:
    """Runs sequences on both sides and keeps per-ioctl counts and the differences."""

    def __init__(self, profile: KernelProfile | None = None, arch: str = "x86_tdp"):
        self.kvm = kvmdev.Kvm()
        self.profile = profile or KernelProfile.read()
        self.vm_kwargs = self.profile.vm_kwargs(arch)
        self.arch = arch
        self._area = mmap.mmap(-1, AREA)
        import ctypes

        self.area_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
        self.calls: Counter = Counter()
        self.agree: Counter = Counter()
        self.differences: list[Difference] = []

    def close(self) -> None:
        self.kvm.close()
        # The ctypes export of the buffer pins the mapping; it is unmapped at exit.

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, seq: Iterable, record: bool = True) -> Difference | None:
        """Run one sequence on a fresh kernel VM and model VM; the first difference, if
        any (the rest of the sequence is not run: the two states have diverged)."""
        seq = tuple(seq)
        kernel = KernelSide(self.kvm, self.area_addr)
        model = ModelSide(self.vm_kwargs, self.arch)
        try:
            for i, call in enumerate(seq):
                k = _outcome(kernel, call)
                m = _outcome(model, call)
                name = IOCTL_NAMES[call[0]]
                if record:
                    self.calls[name] += 1
                if k != m:
                    diff = Difference(seq, i, k, m)
                    if record:
                        self.differences.append(diff)
                    return diff
                if record:
                    self.agree[name] += 1
        finally:
            kernel.close()
            model.close()
        return None

    def table(self) -> list[tuple[str, int, int]]:
        """(ioctl, calls, agreeing) per ioctl."""
        return [(name, n, self.agree[name]) for name, n in sorted(self.calls.items())]


def run_generated(differ: Differ, calls: int, seed: int = 0, max_calls: int = 12) -> int:
    """Hypothesis-generated sequences until at least ``calls`` calls were compared, in
    batches of examples (seeds ``seed``, ``seed + 1``, ...), or until a difference was found;
    hypothesis then shrinks it and the shrunk one is in ``differ.differences``. Returns the
    calls compared (shrinking replays are not counted)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from .corpus import sequences

    start = sum(differ.calls.values())
    shrunk: list[Difference] = []

    def batch(examples: int, batch_seed: int) -> None:
        @hseed(batch_seed)
        @settings(max_examples=examples, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                  print_blob=False)
        @given(sequences(max_calls))
        def check(seq):
            diff = differ.run(seq, record=not shrunk)
            if diff is not None:
                if not shrunk:
                    differ.differences.pop()  # only the shrunk one is kept
                shrunk[:] = [diff]
                raise AssertionError(diff.format())

        check()

    batch_seed = seed
    while not shrunk and sum(differ.calls.values()) - start < calls:
        remaining = calls - (sum(differ.calls.values()) - start)
        try:
            batch(max(20, remaining // 5), batch_seed)
        except AssertionError:
            differ.differences.append(shrunk[-1])
        batch_seed += 1
    return sum(differ.calls.values()) - start


def run_hand_corpus(differ: Differ) -> int:
    from .corpus import hand_corpus

    start = sum(differ.calls.values())
    for seq in hand_corpus():
        differ.run(seq)
    return sum(differ.calls.values()) - start
