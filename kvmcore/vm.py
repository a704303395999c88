"""VM and Vcpu: the ioctl-shaped facade (API.md) that ties the core's flows together.

``VM`` is a ``Kvm`` (struct kvm) that chooses its backend, binds the hooks and offers the
ioctls; ``Vcpu`` is a ``KvmVcpu`` with the guest's accesses. This is the only module that
imports every flow.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from types import GeneratorType

import structlog

from . import args as _args
from . import dirty as _dirty
from .arch import ArchInfo, Mapping
from . import capabilities as _caps
from .capabilities import KernelConfig
from .errors import FaultLivelock, InvariantError, KvmError
from .exits import MmioExit, VcpuExit
from .fault import kvm_page_fault
from .records import FETCH, READ, VIOLATION_KINDS, WRITE, Access, PageFault, Translation
from .gmem import GuestMemfd, kvm_gmem_create
from .host import HOST_PAGE_SIZES, HostMemory
from .kvm import Kvm, KvmVcpu
from .locks import Flow, Steps, drive, steppable, wait_until
from .mmu_notifier import KvmMmuNotifier
from .pfncache import GfnToPfnCache
from .set_attributes import kvm_vm_ioctl_set_mem_attributes
from .set_memory_region import kvm_set_memory_region
from .plugins import (HOT_HOOKS, BoundHooks, bind_hot_hook, class_plugin_manager,
                      get_plugin_manager, resolve_backend)
from .uapi import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    PAGE_SHIFT,
    PAGE_SIZE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
)

logger = structlog.get_logger(__name__)

#: A guest access whose fault keeps retrying this often is reported as a livelock (Linux
#: would re-enter the guest for ever).
MAX_FAULT_RETRIES = 64
#: Entries a vCPU TLB holds before it is emptied (hardware TLBs are small; this bounds the
#: cost of a ranged flush).
TLB_ENTRIES = 4096
MAX_GPA = 1 << 52
#: The longest access one call makes. A guest instruction touches a few bytes; the model lets
#: one call cover many pages, and bounds it so that a bad length is EINVAL, not an exhausted
#: host (the model's limit: Linux has no such call).
MAX_ACCESS = 1 << 24
#: A fault that retried because an invalidation of its gfn is in progress waits here.
PF_RETRY_WAIT = "pf_retry_wait"
_FAULT_KIND_STAT = {kind: f"fault_{kind}" for kind in VIOLATION_KINDS}
#: Access records are immutable: one per (kind, private intent) serves every access.
_ACCESSES = {(kind, private): Access(kind, private) for kind in (READ, WRITE, FETCH)
             for private in (None, False, True)}
_RET_NAMES = {RET_PF_EMULATE: "emulate", RET_PF_FIXED: "fixed", RET_PF_RETRY: "retry",
              RET_PF_SPURIOUS: "spurious", RET_PF_WRITE_PROTECTED: "write_protected"}


def _access_record(kind: str, private) -> Access:
    if private is None or private is True or private is False:
        return _ACCESSES[kind, private]
    return Access(kind, private)


def host_for(arch, options=None) -> HostMemory:
    """A fresh host whose PAGE_SIZE is what a VM of ``arch`` (a backend name, class or its
    ArchInfo) with these VM ``options`` runs on: ``HostMemory()`` unless the options ask for
    another base page (arm64 ``granule=65536``, ppc ``page_size=65536``)."""
    info = arch if isinstance(arch, ArchInfo) else resolve_backend(arch).arch_info
    page_size = info.base_page(options or {}) or PAGE_SIZE
    if page_size not in HOST_PAGE_SIZES:
        raise KvmError(errno.EINVAL, f"{info.base_page_option}={page_size!r}: a host "
                                     f"PAGE_SIZE is one of {HOST_PAGE_SIZES}")
    return HostMemory(page_size, info.host_pmd_sizes.get(page_size))


class VM(Kvm):
    """A KVM virtual machine (``KVM_CREATE_VM``) on one architecture backend.

    ``arch`` is an installed backend name, ``"module:Class"``, or a backend class;
    ``vm_type`` one of ``arch_info.vm_types``; ``host`` the HostMemory it lives in (a private
    one by default); ``options`` go to the backend (e.g. ``granule=65536`` on arm64);
    ``kconfig`` (a ``kvmcore.capabilities.KernelConfig``) makes the VM one of a kernel that
    offers less than the backend (no memory attributes, fewer VM types, ...).
    """

    def __init__(self, arch="x86_tdp", vm_type: str = "default", host: HostMemory | None = None,
                 trace: bool = False, kconfig: KernelConfig | None = None, **options):
        _args.string("vm_type", vm_type)
        _args.flag("trace", trace)
        cls = resolve_backend(arch)
        info: ArchInfo = getattr(cls, "arch_info", None)
        if not isinstance(info, ArchInfo):
            raise KvmError(errno.ENODEV, f"arch={arch!r}: {cls!r} has no ArchInfo")
        if vm_type not in info.vm_types:
            raise KvmError(errno.EINVAL, f"vm_type={vm_type!r}: {info.name} supports "
                                         f"{', '.join(info.vm_types)}")
        if kconfig is not None:
            kconfig.check_vm_type(vm_type)
        want = info.base_page(options)
        if host is None:
            host = host_for(info, options)
        elif want is not None and want != host.page_size:
            name = info.base_page_option
            what = f"{name}={want!r}" if name else f"arch={info.name!r} (4 KiB pages only)"
            raise KvmError(errno.EINVAL, f"{what}: the host's PAGE_SIZE is {host.page_size}; "
                                         "a VM's base page is its host's PAGE_SIZE")
        if want is None and info.base_page_option:
            options[info.base_page_option] = host.page_size
        backend = cls(vm_type=vm_type, **options)
        super().__init__(backend, getattr(backend, "arch_info", info), vm_type, host, options,
                         trace)
        self.kconfig = kconfig
        if kconfig is not None:
            self.arch_capabilities, self.capabilities = kconfig.apply(self.arch_capabilities,
                                                                      self.capabilities)
        self._pm = None
        self._class_pm = class_plugin_manager(self.backend, self.arch_info.name)
        if self._class_pm is None:
            self._pm = get_plugin_manager(self.backend, self.arch_info.name, self._bind_hooks)
        self._bind_hooks()
        self.hook.init_vm(vm=self)
        self.notifier = KvmMmuNotifier(self)
        self.host.register_notifier(self.notifier)
        self.trace("vm.create", arch=self.arch_info.name, vm_type=vm_type)

    def __repr__(self) -> str:
        return f"VM(arch={self.arch_info.name!r}, vm_type={self.vm_type!r})"

    flow_label = "vm"

    @property
    def steps(self) -> Steps:
        """This VM's ioctls started as steppable ``Flow`` objects instead of run to their end
        (``vm.steps.set_memory_attributes(...)``, ``set_user_memory_region``,
        ``get_dirty_log``, ``clear_dirty_log``, ``reset_dirty_rings``, ``age``): ``next()``
        runs to the next race point and returns its name; ``flow.runnable``, ``flow.holds``
        and ``flow.waits_for`` say what it holds and needs (see ``kvmcore.locks``)."""
        return Steps(self)

    @property
    def pm(self):
        """This VM's own plugin manager, built on first use (VMs share one per backend class
        until then). Registering or unregistering a plugin on it rebinds the VM's hooks."""
        if self._pm is None:
            self._pm = get_plugin_manager(self.backend, self.arch_info.name, self._bind_hooks)
            self._bind_hooks()
        return self._pm

    def _bind_hooks(self) -> None:
        """Bind ``hook`` (each hook on its first call) and the hot hooks (called once per
        fault or access) to the current manager: directly to the one implementation when
        nothing wraps it."""
        pm = self._pm or self._class_pm
        self.hook = pm.kvmcore_hooks if self._pm is None else BoundHooks(pm, self.backend)
        for name in HOT_HOOKS:
            setattr(self, name, bind_hot_hook(pm, name, self.backend))
        # Called once per state check (the explorer checks after every step), under a name
        # of its own: ``check_invariants`` is the VM's method that runs every check.
        self.arch_check_invariants = bind_hot_hook(pm, "check_invariants", self.backend)

    # ------------------------------------------------------------------ capabilities

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (``cap`` a ``kvmcore.uapi.KVM_CAP_*`` number)."""
        return _caps.kvm_vm_ioctl_check_extension(self, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd: MANUAL_DIRTY_LOG_PROTECT2 (args[0]: its bits),
        DIRTY_LOG_RING / DIRTY_LOG_RING_ACQ_REL (args[0]: the ring size in bytes)."""
        _caps.kvm_vm_ioctl_enable_cap(self, cap, args, flags)

    # ------------------------------------------------------------------ memslots

    @steppable
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0, guest_memfd=None,
                               guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2."""
        self._check_open()
        yield from kvm_set_memory_region(self, slot, flags, guest_phys_addr, memory_size,
                                         userspace_addr, guest_memfd, guest_memfd_offset)

    # ------------------------------------------------------------------ guest_memfd

    def create_guest_memfd(self, size: int, flags: int = 0, folio_order: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD. ``folio_order`` > 0 backs the file with huge folios of
        ``4 KiB << folio_order`` (in flight upstream; upstream always uses order 0)."""
        self._check_open()
        return kvm_gmem_create(self, size, flags, folio_order)

    # ------------------------------------------------------------------ pfn caches

    def gpc_init(self) -> GfnToPfnCache:
        """kvm_gpc_init: a gfn_to_pfn_cache of this VM, inactive (``activate(gpa, length)``;
        see kvmcore.pfncache). KVM's own users (kvmclock, Xen's shared pages) have no uapi of
        their own; EOPNOTSUPP where the arch does not select CONFIG_HAVE_KVM_PFNCACHE
        (every arch but x86)."""
        self._check_open()
        if "pfncache" not in self.capabilities:
            raise KvmError(errno.EOPNOTSUPP, f"gpc_init: {self.arch_info.name} has no "
                                             "gfn_to_pfn_cache (CONFIG_HAVE_KVM_PFNCACHE)")
        return GfnToPfnCache(self)

    # ------------------------------------------------------------------ attributes

    @steppable
    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        self._check_open()
        yield from kvm_vm_ioctl_set_mem_attributes(self, address, size, attributes, flags)

    def get_memory_attributes(self, gfn: int) -> int:
        """kvm_get_memory_attributes (there is no uapi "get": this is the model's view, so it
        stays readable after close). ``gfn`` is a gfn_t (u64)."""
        _args.u64("gfn", gfn)
        return self.attributes.get(gfn)

    # ------------------------------------------------------------------ dirty logging

    def enable_dirty_log_manual_protect(self, initially_set: bool = False,
                                        enable: bool = True) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); ``enable=False`` passes 0."""
        self._check_open()
        _args.flag("initially_set", initially_set)
        _args.flag("enable", enable)
        args0 = 0
        if enable:
            args0 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if initially_set:
                args0 |= KVM_DIRTY_LOG_INITIALLY_SET
        _dirty.enable_manual_protect(self, args0)

    @steppable
    def get_dirty_log(self, slot: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: dirty page offsets of the slot, ascending."""
        self._check_open()
        return (yield from _dirty.kvm_vm_ioctl_get_dirty_log(self, slot))

    @steppable
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, pages) -> None:
        """KVM_CLEAR_DIRTY_LOG. ``pages`` is an iterable of ints; it is read after the
        architecture check (ppc: ENOTTY whatever the arguments)."""
        self._check_open()
        yield from _dirty.kvm_vm_ioctl_clear_dirty_log(self, slot, first_page, num_pages, pages)

    def enable_dirty_ring(self, size_bytes: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)."""
        self._check_open()
        _dirty.enable_dirty_ring(self, size_bytes)

    @steppable
    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: the number of entries reset."""
        self._check_open()
        return (yield from _dirty.reset_dirty_rings(self))

    # ------------------------------------------------------------------ hva ranges

    def hva_range_op(self, hva_start: int, hva_end: int, handler) -> int:
        """Run ``handler(vm, range)`` on every memslot, of every address space, whose host
        range meets ``[hva_start, hva_end)`` (kvm_handle_hva_range_op, the operator form of
        kvm_handle_hva_range from the 2023 "KVM: Add HVA range operator" review). ``range`` is
        the slot's part as a struct kvm_gfn_range (``slot``, ``as_id``, gfns ``start`` ..
        ``end``; pages only partly inside count). ``handler`` returns 0 or a negative errno;
        the walk stops at the first non-zero result and returns it, else 0.

        No MMU lock is held while ``handler`` runs, nothing is invalidated or flushed: the
        handler does its own synchronisation. ``hva_start == hva_end`` meets no slot (0);
        ``hva_end < hva_start`` is EINVAL. There is no ioctl: this is the kernel-internal
        entry point, exposed so that tests can exercise it."""
        from .hva import kvm_handle_hva_range_op

        self._check_open()
        _args.u64("hva_start", hva_start)
        _args.u64("hva_end", hva_end)
        _args.function("handler", handler)
        if hva_end < hva_start:
            raise KvmError(errno.EINVAL, f"hva_end={hva_end:#x} is below "
                                         f"hva_start={hva_start:#x}")
        return kvm_handle_hva_range_op(self, hva_start, hva_end, handler)

    # ------------------------------------------------------------------ vCPUs

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        self._check_open()
        if not 0 <= _args.integer("vcpu_id", vcpu_id) < 4096:
            raise KvmError(errno.EINVAL, f"vcpu_id={vcpu_id!r} is out of range")
        if any(v.id == vcpu_id for v in self.vcpus):
            raise KvmError(errno.EEXIST, f"vcpu_id={vcpu_id} already exists")
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        self.hook.vcpu_create(vm=self, vcpu=vcpu)
        return vcpu

    # ------------------------------------------------------------------ introspection

    def mappings(self, start_gpa: int = 0, end_gpa: int = MAX_GPA,
                 as_id: int = 0) -> Iterator[Mapping]:
        """Every present leaf of address space ``as_id`` (x86: 1 is SMM's) mapping a gfn in
        the range, ascending by gfn."""
        _args.u64("start_gpa", start_gpa)
        _args.u64("end_gpa", end_gpa)
        self._check_as_id(as_id)
        return iter(self.leaves(vm=self, start=start_gpa >> PAGE_SHIFT,
                                end=(end_gpa + PAGE_SIZE - 1) >> PAGE_SHIFT, as_id=as_id))

    def lookup(self, gpa: int, private: bool = False, as_id: int = 0) -> Mapping | None:
        """The present leaf covering ``gpa`` in address space ``as_id``: the shared alias, or
        the private one."""
        _args.u64("gpa", gpa)
        _args.flag("private", private)
        self._check_as_id(as_id)
        gfn = gpa >> PAGE_SHIFT
        for m in self.leaves(vm=self, start=gfn, end=gfn + 1, as_id=as_id):
            if m.private == private and m.gfn <= gfn < m.gfn + m.npages:
                return m
        return None

    def page_table_bytes(self) -> int:
        return self.hook.page_table_bytes(vm=self) or 0

    def check_invariants(self) -> None:
        """Raise InvariantError listing every broken invariant of the model state."""
        from .invariants import check_vm

        problems = check_vm(self)
        if problems:
            raise InvariantError(problems)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Destroy the VM (kvm_destroy_vm, its last reference gone). In order:

        - its guest_memfd files are released (kvm_gmem_release: their leaves are zapped);
        - the MMU notifier is unregistered; its release runs kvm_arch_flush_shadow_all, which
          zaps every leaf on x86 (the direct roots) and arm64 (the stage-2 tables) but is an
          empty function on ppc;
        - kvm_arch_destroy_vm frees the page tables left (ppc: kvmppc_core_destroy_vm_hv ->
          kvmppc_free_radix). The model stands for this with a zap of every leaf still
          present, without a TLB flush (no vCPU runs any more).

        So after close ``mappings()`` is empty on every backend. Every ioctl-shaped call of
        the VM and of its vCPUs then raises EBADF and changes nothing; the model's views
        (``mappings``, ``lookup``, ``memslots``, ``get_memory_attributes``, ``stats``,
        ``check_invariants``) stay readable. Closing twice does nothing, like Python files."""
        if self.closed:
            return
        for gmem in list(self.gmem_files):
            gmem.close()
        self.host.unregister_notifier(self.notifier)
        self._free_page_tables()
        self.closed = True
        self.trace("vm.destroy")

    def _free_page_tables(self) -> None:
        """The page-table part of kvm_arch_destroy_vm, as zaps of what is left."""
        from .defaults import whole_slot

        with self.mmu_lock:
            for slot in list(self.all_memslots()):
                r = self.hook.unmap_gfn_range(vm=self, range=whole_slot(slot))
                if type(r) is GeneratorType:
                    drive(r)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vcpu(KvmVcpu):
    """A vCPU. Guest accesses go through the backend's hardware walk (with this vCPU's TLB in
    front of it); a failed walk takes the fault path; the access then completes or raises a
    VcpuExit. The model has no guest instruction stream: an access is one load, store or
    instruction fetch of ``n`` bytes."""

    flow_label = property(lambda self: f"vcpu{self.id}")
    flow_vcpu = property(lambda self: self)

    @property
    def steps(self) -> Steps:
        """This vCPU's flows started as steppable ``Flow`` objects: ``steps.read(gpa, n)``,
        ``steps.write(gpa, data)``, ``steps.fetch(gpa)``, ``steps.pre_fault_memory(gpa,
        size)``. ``next(flow)`` runs to the next race point and returns its name."""
        return Steps(self)

    # ------------------------------------------------------------------ accesses

    def read(self, gpa: int, n: int, private: bool | None = None) -> bytes:
        """A guest load of ``n`` bytes at ``gpa``."""
        return Flow(f"vcpu{self.id}.read", self._access(READ, gpa, n, private), self).run()

    def write(self, gpa: int, data: bytes, private: bool | None = None) -> None:
        """A guest store of ``data`` at ``gpa``."""
        Flow(f"vcpu{self.id}.write", self._access(WRITE, gpa, data, private), self).run()

    def fetch(self, gpa: int, private: bool | None = None, n: int = 4) -> bytes:
        """An instruction fetch of ``n`` bytes at ``gpa`` (needs execute permission)."""
        return Flow(f"vcpu{self.id}.fetch", self._access(FETCH, gpa, n, private), self).run()

    #: ``vcpu.steps.read/write/fetch``: the plain methods above stay plain (they are hot).
    step_methods = {
        "read": lambda self, gpa, n, private=None: self._access(READ, gpa, n, private),
        "write": lambda self, gpa, data, private=None: self._access(WRITE, gpa, data, private),
        "fetch": lambda self, gpa, private=None, n=4: self._access(FETCH, gpa, n, private),
    }

    def step_access(self, kind: str, gpa: int, data_or_n, private: bool | None = None) -> Flow:
        """The same access as ``read``/``write``/``fetch``, started as a ``Flow``: each
        ``next()`` runs to the next race point its faults reach and returns its name
        (``pf_seq_snapshot``, ``pf_lock_wait``, a backend's install points). Between two
        steps the caller may run any other flow to replay a race. The flow's result
        (StopIteration.value, ``flow.result``) is the bytes read or None."""
        return Flow(f"vcpu{self.id}.{kind}", self._access(kind, gpa, data_or_n, private), self)

    def _access(self, kind: str, gpa: int, data_or_n, private: bool | None):
        """One guest access, page by page: the TLB, else the hardware walk and the fault path
        while it fails (vcpu_enter_guest -> VM exit -> kvm_mmu_page_fault, again)."""
        data, n = self._check_access(kind, gpa, data_or_n, private)
        access = _access_record(kind, private)
        write, fetch = access.write, access.exec
        tlb = self.tlb
        host = self.vm.host
        out = []
        pos = 0
        while pos < n:
            cur = gpa + pos
            off = cur & (PAGE_SIZE - 1)
            chunk = min(n - pos, PAGE_SIZE - off)
            # The TLB (_tlb_lookup, inline: every access does it).
            e = tlb.get((cur >> PAGE_SHIFT, private))
            if e is None or (write and not (e[2] and e[4])) or (fetch and not e[3]):
                pfn = yield from self._translate(cur, access, chunk, data, pos)
                if self.dirty_ring is not None:
                    # Back from the fault, vcpu_enter_guest honours the ring's soft-full
                    # request before the guest goes on: an access over many pages exits
                    # there, its earlier pages done, this one not.
                    _dirty.check_ring_request(self)
            else:
                pfn = e[1]
            if data is None:
                out.append(host.read_frame(pfn, off, chunk))
            else:
                host.write_frame(pfn, off, data[pos:pos + chunk] if chunk < len(data) else data)
            pos += chunk
        return b"".join(out) if data is None else None

    def _check_access(self, kind: str, gpa: int, data_or_n,
                      private) -> tuple[bytes | None, int]:
        """Argument checks of an access (types first: TypeError; then values: EINVAL), then
        the dirty-ring request a vCPU honours before it re-enters the guest. Returns ``(data
        to store or None, length)``."""
        vm = self.vm
        vm._check_open()
        if type(gpa) is not int:
            _args.integer("gpa", gpa)
        if kind == WRITE:
            data = _args.buffer("data", data_or_n)
            n = len(data)
        else:
            data, n = None, data_or_n
            if type(n) is not int:
                _args.integer("n", n)
        if private is not None and private is not True and private is not False:
            _args.flag("private", private)
        if kind not in (READ, WRITE, FETCH):
            raise KvmError(errno.EINVAL, f"kind={kind!r}: read, write or fetch")
        if not 0 <= gpa < MAX_GPA:
            raise KvmError(errno.EINVAL, f"gpa={gpa!r} is not a guest physical address")
        if not 0 < n <= MAX_ACCESS or gpa + n > MAX_GPA:
            raise KvmError(errno.EINVAL, f"n={n!r}: the access needs a length in "
                                         f"[1, {MAX_ACCESS:#x}] that ends below {MAX_GPA:#x}")
        if self.dirty_ring is not None:
            _dirty.check_ring_request(self)
        return data, n

    def _translate(self, gpa: int, access: Access, chunk: int, data, pos: int):
        """A TLB miss: the hardware walk, and the fault path while it fails. Each fault runs
        inside kvm->srcu's read side (x86 holds it in KVM_RUN outside guest mode, arm64
        around kvm_handle_guest_abort), so a memslot update's synchronize_srcu waits for
        it."""
        vm = self.vm
        srcu = vm.srcu
        for _attempt in range(MAX_FAULT_RETRIES):
            fault = self._walk(gpa, access)
            if type(fault) is int:
                return fault
            idx = srcu.read_lock()
            try:
                r = yield from kvm_page_fault(vm, fault)
                while r == RET_PF_RETRY and self._retries_locally(fault):
                    # The exit handler takes the fault again (TDX's local retry) with
                    # kvm->srcu held throughout, once the wait is over or it would stop.
                    yield from wait_until(lambda f=fault: not self._retries_locally(f),
                                          "the invalidation of this gfn or the update of "
                                          "its memslot to end", PF_RETRY_WAIT)
                    fault = self._walk(gpa, access)
                    if type(fault) is int:
                        return fault
                    r = yield from kvm_page_fault(vm, fault)
            except VcpuExit as exc:
                self._count_exit(fault, exc)
                raise
            finally:
                srcu.read_unlock(idx)
            if r != RET_PF_FIXED or vm.events is not None:
                self._fault_done(fault, r, access, chunk, data, pos)
            if r == RET_PF_RETRY and self._retry_blocked(fault.gfn):
                # The vCPU re-enters the guest (leaving kvm->srcu) and faults again.
                yield from self._retry_wait(fault.gfn)
        raise self._livelock(gpa)

    def _retry_wait(self, gfn: int):
        """A fault on ``gfn`` that can only retry (``_retry_blocked``) is taken again and
        again until the invalidation ends or the memslot update is done: modelled as one
        wait at ``pf_retry_wait``, since every retry in between changes nothing."""
        yield from wait_until(lambda: not self._retry_blocked(gfn),
                              "the invalidation of this gfn or the update of its memslot to "
                              "end", PF_RETRY_WAIT)

    def _prefault_blocked(self, gfn: int) -> bool:
        """Whether a pre-fault on ``gfn`` can only retry now: an invalidation of it is in
        progress on a usable memslot. A slot being deleted or moved is no wait for it: its
        next fault fails with -EAGAIN (3ccbf6f47098), and with no slot the gfn is MMIO."""
        slot = self.vm.memslot_sets[self.as_id].search(gfn)
        return slot is not None and not slot.invalid and \
            self.vm.mmu_invalidate.in_progress_covers(gfn)

    def _retries_locally(self, fault: PageFault) -> bool:
        """Whether ``fault``, which can only retry now, is retried inside the exit handler
        (the backend's ``fault_retries_locally``) rather than after a guest entry."""
        return self._retry_blocked(fault.gfn) and \
            self.vm.hook.fault_retries_locally(vm=self.vm, fault=fault)

    def _retry_blocked(self, gfn: int) -> bool:
        """Whether a fault on ``gfn`` can only retry now: an invalidation of it is in
        progress, or its memslot is INVALID (a DELETE or MOVE between its swaps)."""
        vm = self.vm
        if vm.mmu_invalidate.in_progress_covers(gfn):
            return True
        slot = vm.memslot_sets[self.as_id].search(gfn)
        return slot is not None and slot.invalid and vm.invalid_slot_retry

    @staticmethod
    def _livelock(gpa: int) -> KvmError:
        return FaultLivelock(errno.EAGAIN, f"gpa={gpa:#x}: the fault retried "
                             f"{MAX_FAULT_RETRIES} times without making progress (livelock)")

    def _walk(self, gpa: int, access: Access) -> int | PageFault:
        """The hardware walk: the pfn (and a TLB fill) when it succeeds, else the PageFault
        KVM builds from the exit (x86 kvm_mmu_page_fault's struct kvm_page_fault, arm64
        kvm_handle_guest_abort), counted in the fault statistics."""
        vm = self.vm
        t = vm.translate(vm=vm, vcpu=self, gpa=gpa, access=access)
        if isinstance(t, Translation):
            tlb = self.tlb
            if len(tlb) >= TLB_ENTRIES:
                tlb.clear()
            page = gpa >> PAGE_SHIFT
            if page != t.gfn:
                self.tlb_aliased = True
            tlb[(page, access.private)] = (t.gfn, t.pfn, t.writable, t.executable, t.dirty)
            return t.pfn
        kind = access.kind
        fault = PageFault(gpa, t.gfn, kind == WRITE, kind == FETCH, t.private, False, t.kind,
                          t.level, t.size, t.error_code, self.as_id, self)
        stats = vm.stats
        stats["faults"] += 1
        stats[_FAULT_KIND_STAT[t.kind]] += 1
        return fault

    def _fault_done(self, fault: PageFault, r: int, access: Access, chunk: int, data,
                    pos: int) -> None:
        """What the vCPU does with the fault's result: re-enter the guest (fixed, spurious,
        retry: the caller walks again) or exit to userspace for MMIO (RET_PF_EMULATE)."""
        vm = self.vm
        gpa = fault.addr
        if vm.events is not None:
            vm.trace("fault.handled", vcpu=self.id, gpa=gpa, kind=fault.kind,
                     access=access.kind, private=fault.is_private, result=_RET_NAMES.get(r, r))
        if r == RET_PF_EMULATE:
            vm.stats["exit_mmio"] += 1
            page_data = None if data is None else data[pos:pos + chunk]
            vm.trace("fault.exit", exit="MmioExit", phys_addr=gpa, length=chunk,
                     is_write=access.write)
            raise MmioExit(gpa, chunk, access.write, page_data)
        if r == RET_PF_RETRY:
            vm.stats["fault_retry"] += 1
        elif r not in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
            raise KvmError(errno.EIO, f"fault at gpa={gpa:#x} returned {r!r}")

    def _count_exit(self, fault: PageFault, exc: VcpuExit) -> None:
        vm = self.vm
        vm.stats[f"exit_{type(exc).__name__}"] += 1
        vm.trace("fault.exit", exit=type(exc).__name__, fault_gpa=fault.gpa,
                 **{k: v for k, v in exc.fields().items() if k != "data"})

    # ------------------------------------------------------------------ ioctls

    def set_vcpu_events(self, *, smm: bool | None = None) -> None:
        """KVM_SET_VCPU_EVENTS with KVM_VCPUEVENT_VALID_SMM (the only field the MMU sees):
        ``smm`` enters or leaves System Management Mode, None leaves it as it is.

        A change of mode is kvm_smm_changed -> kvm_mmu_reset_context: the vCPU loads the
        root of its new address space, so no TLB entry of the old one serves it again (the
        model drops the vCPU's TLB, where hardware tags entries by EPTP)."""
        vm = self.vm
        vm._check_open()
        _args.optional_flag("smm", smm)
        vm.hook.set_vcpu_events(vm=vm, vcpu=self, smm=smm)
        as_id = vm.hook.vcpu_memslots_id(vm=vm, vcpu=self)
        if as_id != self.as_id:
            self.as_id = as_id
            self.tlb.clear()
            vm.trace("vcpu.memslots_id", vcpu=self.id, as_id=as_id)

    @steppable
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (kvm_vcpu_pre_fault_memory + x86 kvm_tdp_map_page): map as a
        read fault, without Accessed, without breaking COW. Returns the unprocessed
        ``(gpa, size)``; raises KvmError only when nothing was processed, or FaultLivelock
        where a fault retries with nothing to wait for (Linux spins until a signal)."""
        vm = self.vm
        vm._check_open()
        if "pre_fault" not in vm.arch_capabilities:
            # Not built: kvm_vcpu_ioctl hands it to kvm_arch_vcpu_ioctl's default.
            raise KvmError(vm.arch_info.vcpu_ioctl_errno, f"pre_fault_memory: "
                           f"{vm.arch_info.name} has no KVM_PRE_FAULT_MEMORY")
        for name, value in (("gpa", gpa), ("size", size), ("flags", flags)):
            _args.u64(name, value)
        if flags:
            raise KvmError(errno.EINVAL, f"flags={flags:#x} must be 0")
        mask = vm.page_size - 1
        if gpa & mask or size & mask or (gpa + size) % (1 << 64) <= gpa:
            raise KvmError(errno.EINVAL, f"gpa={gpa:#x}, size={size:#x}: not aligned to "
                                         f"PAGE_SIZE {mask + 1:#x}, empty, or wrapping")
        if "pre_fault" not in vm.capabilities:
            raise _caps.pre_fault_unsupported(vm)
        full = size
        err = None
        # kvm->srcu is held across the whole loop, not per page: a memslot update's
        # synchronize_srcu waits for the pre-fault to end.
        idx = vm.srcu.read_lock()
        try:
            while size:
                try:
                    done = yield from self._pre_fault_one(gpa, size)
                except FaultLivelock:
                    raise               # Linux would spin until a signal: no result
                except KvmError as e:
                    err = e
                    break
                size -= done
                gpa += done
        finally:
            vm.srcu.read_unlock(idx)
        if size == full and err is not None:
            raise err
        return gpa, size

    def _pre_fault_one(self, gpa: int, size: int):
        """kvm_arch_vcpu_pre_fault_memory for one page: kvm_mmu_reload (the backend's
        ``mmu_reload``), then kvm_tdp_map_page: the fault, looping while it retries (the
        caller holds kvm->srcu). While an invalidation of the gfn is in progress Linux spins
        (cond_resched) fault after fault, each retrying: one wait (``_prefault_blocked``),
        which a deletion or move of the slot also ends, since the next fault then fails.
        A fault that retries with nothing to wait for would spin until a signal:
        ``FaultLivelock``."""
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        vm.hook.mmu_reload(vm=vm, vcpu=self)
        for _ in range(MAX_FAULT_RETRIES):
            fault = PageFault(addr=gpa, gfn=gfn, is_private=vm.kvm_mem_is_private(gfn),
                              prefetch=True, as_id=self.as_id, vcpu=self)
            try:
                r = yield from kvm_page_fault(vm, fault)
            except VcpuExit as e:
                self._count_exit(fault, e)
                raise KvmError(e.errno or errno.EFAULT,
                               f"gpa={gpa:#x}: the pre-fault exited ({e!r})") from None
            if r == RET_PF_RETRY:
                if self._prefault_blocked(gfn):
                    yield from wait_until(lambda: not self._prefault_blocked(gfn),
                                          "the invalidation of this gfn to end",
                                          PF_RETRY_WAIT)
                continue
            if r == RET_PF_EMULATE:
                raise KvmError(errno.ENOENT, f"gpa={gpa:#x} is not covered by a memslot")
            if r not in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
                raise KvmError(errno.EIO, f"gpa={gpa:#x}: unexpected fault result {r!r}")
            leaf = vm.lookup(gpa, private=fault.is_private, as_id=self.as_id)
            leaf_size = leaf.size if leaf is not None else vm.page_size
            end = (gpa & ~(leaf_size - 1)) + leaf_size
            return min(size, end - gpa)
        raise self._livelock(gpa)

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """What userspace does with the mmap()ed ring: collect the dirty (slot, offset)
        entries in ring order and mark them for the next KVM_RESET_DIRTY_RINGS. The model
        simplifies: a vCPU of a closed VM answers EBADF (its VM fd stands for every fd)."""
        self.vm._check_open()
        if self.dirty_ring is None:
            raise KvmError(errno.EINVAL, "harvest_dirty_ring: the dirty ring is not enabled")
        return self.dirty_ring.harvest()
