"""VM and Vcpu: the ioctl-shaped facade (API.md) that ties the core's flows together."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator

import structlog

from . import dirty as _dirty
from .arch import ArchInfo, Mapping
from .attributes import AttributeRanges, kvm_vm_ioctl_set_mem_attributes, \
    supported_mem_attributes
from .errors import InvariantError, KvmError
from .exits import MmioExit, VcpuExit
from .fault import (FETCH, READ, VIOLATION_KINDS, WRITE, Access, PageFault, Translation,
                    kvm_page_fault, kvm_page_fault_direct)
from .gmem import GuestMemfd, kvm_gmem_create
from .host import HOST_PAGE_SIZES, HostMemory
from .invalidate import InvalidateState, KvmMmuNotifier
from .memslots import Memslot, MemslotSet, kvm_set_memory_region
from .plugins import bind_hot_hook, get_plugin_manager, resolve_backend
from .uapi import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
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


class MmuLock:
    """kvm->mmu_lock as a non-reentrant flag: taking it twice is a bug in a flow."""

    __slots__ = ("held",)

    def __init__(self):
        self.held = False

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError("mmu_lock taken while already held")
        self.held = True

    def release(self) -> None:
        if not self.held:
            raise RuntimeError("mmu_lock released while not held")
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


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


class VM:
    """A KVM virtual machine (``KVM_CREATE_VM``) on one architecture backend.

    ``arch`` is an installed backend name, ``"module:Class"``, or a backend class;
    ``vm_type`` one of ``arch_info.vm_types``; ``host`` the HostMemory it lives in (a private
    one by default); ``options`` go to the backend (e.g. ``granule=65536`` on arm64).
    """

    def __init__(self, arch="x86_tdp", vm_type: str = "default", host: HostMemory | None = None,
                 trace: bool = False, **options):
        cls = resolve_backend(arch)
        info: ArchInfo = getattr(cls, "arch_info", None)
        if not isinstance(info, ArchInfo):
            raise KvmError(errno.ENODEV, f"arch={arch!r}: {cls!r} has no ArchInfo")
        if vm_type not in info.vm_types:
            raise KvmError(errno.EINVAL, f"vm_type={vm_type!r}: {info.name} supports "
                                         f"{', '.join(info.vm_types)}")
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
        self.backend = cls(vm_type=vm_type, **options)
        self.arch_info: ArchInfo = getattr(self.backend, "arch_info", info)
        self.vm_type = vm_type
        self.options = dict(options)
        self.capabilities: frozenset[str] = self.arch_info.capabilities_of(vm_type)
        self.arch_capabilities: frozenset[str] = self.arch_info.capabilities
        self.host = host
        #: PAGE_SIZE: the base page of this VM (its host's); gfns stay 4 KiB frames.
        self.page_size: int = host.page_size
        self.pm = get_plugin_manager(self.backend, self.arch_info.name)
        self.hook = self.pm.hook
        self.translate = bind_hot_hook(self.pm, "translate")
        self.faultin_pfn = bind_hot_hook(self.pm, "faultin_pfn")
        self.map_leaf = bind_hot_hook(self.pm, "map_leaf")
        self.fast_page_fault = bind_hot_hook(self.pm, "fast_page_fault")
        self.relax_perms = bind_hot_hook(self.pm, "relax_perms")
        self.nr_address_spaces = self.arch_info.nr_address_spaces
        self.memslot_sets = [MemslotSet(i) for i in range(self.nr_address_spaces)]
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.mmu_invalidate = InvalidateState(self.arch_info.fault_retry_gfn)
        self.mn_active_invalidate_count = 0
        self.mmu_lock = MmuLock()
        self.attributes = AttributeRanges()
        self.gmem_files: list[GuestMemfd] = []
        self.vcpus: list[Vcpu] = []
        self.running_vcpu: Vcpu | None = None
        self.stats: Counter = Counter()
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False
        self.manual_dirty_log_protect = 0
        #: Entries the hardware may log before KVM sees them (PML: 512); reserved in rings.
        self.cpu_dirty_log_size = 0
        self.events: list[dict] | None = [] if trace else None
        self._log = logger.bind(arch=self.arch_info.name, vm_type=vm_type)
        self.closed = False
        self.hook.init_vm(vm=self)
        self.notifier = KvmMmuNotifier(self)
        self.host.register_notifier(self.notifier)
        self.trace("vm.create", arch=self.arch_info.name, vm_type=vm_type)

    def __repr__(self) -> str:
        return f"VM(arch={self.arch_info.name!r}, vm_type={self.vm_type!r})"

    # ------------------------------------------------------------------ services for flows

    def trace(self, event: str, **fields) -> None:
        """A structured event with a stable dotted name. When the VM was created with
        ``trace=True`` it is kept in ``events`` and logged (structlog, level info); otherwise
        it costs one test."""
        if self.events is not None:
            self.events.append({"event": event, **fields})
            self._log.info(event, **fields)

    def _check_as_id(self, as_id: int) -> None:
        if (not isinstance(as_id, int) or isinstance(as_id, bool)
                or not 0 <= as_id < self.nr_address_spaces):
            raise KvmError(errno.EINVAL, f"as_id={as_id!r}: this VM has "
                                         f"{self.nr_address_spaces} address space(s)")

    def memslot_generation(self, as_id: int = 0) -> int:
        return self.memslot_sets[as_id].generation

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """The visible slot containing ``gfn`` (kvm_is_visible_memslot)."""
        slot = self.memslot_sets[as_id].search(gfn)
        return None if slot is None or slot.invalid else slot

    def all_memslots(self) -> Iterator[Memslot]:
        for slots in self.memslot_sets:
            yield from slots

    def memslots(self, as_id: int = 0) -> list[Memslot]:
        """The live slots of an address space, ascending by guest address."""
        return [s for s in self.memslot_sets[as_id] if not s.invalid]

    def kvm_mem_is_private(self, gfn: int) -> bool:
        return bool(self.attributes.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def range_has_memory_attributes(self, start: int, end: int, mask: int, attrs: int) -> bool:
        """kvm_range_has_memory_attributes."""
        return self.attributes.has(start, end, mask & supported_mem_attributes(self), attrs)

    def mark_page_dirty_in_slot(self, slot: Memslot | None, gfn: int) -> None:
        _dirty.mark_page_dirty_in_slot(self, slot, gfn)

    def dirty_log_manual_protect_and_init_set(self) -> bool:
        return bool(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def mmu_invalidate_begin(self) -> None:
        self.mmu_invalidate.begin()

    def mmu_invalidate_range_add(self, start: int, end: int) -> None:
        self.mmu_invalidate.range_add(start, end)

    def mmu_invalidate_end(self) -> None:
        self.mmu_invalidate.end()

    @property
    def mmu_invalidate_seq(self) -> int:
        return self.mmu_invalidate.seq

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return self.mmu_invalidate.in_progress

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs: every vCPU's TLB."""
        self.stats["tlb_flush"] += 1
        for vcpu in self.vcpus:
            vcpu.tlb.clear()

    def flush_remote_tlbs_range(self, start_gfn: int, npages: int) -> None:
        """kvm_flush_remote_tlbs_range."""
        self.stats["tlb_flush_range"] += 1
        end = start_gfn + npages
        for vcpu in self.vcpus:
            tlb = vcpu.tlb
            for key in [k for k, e in tlb.items() if start_gfn <= e[0] < end]:
                del tlb[key]

    def flush_remote_tlbs_memslot(self, slot: Memslot) -> None:
        """kvm_flush_remote_tlbs_memslot."""
        self.flush_remote_tlbs_range(slot.base_gfn, slot.npages)

    # ------------------------------------------------------------------ memslots

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0, guest_memfd=None,
                               guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2."""
        self._check_open()
        kvm_set_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                              guest_memfd, guest_memfd_offset)

    # ------------------------------------------------------------------ guest_memfd

    def create_guest_memfd(self, size: int, flags: int = 0, folio_order: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD. ``folio_order`` > 0 backs the file with huge folios of
        ``4 KiB << folio_order`` (in flight upstream; upstream always uses order 0)."""
        self._check_open()
        return kvm_gmem_create(self, size, flags, folio_order)

    # ------------------------------------------------------------------ attributes

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        self._check_open()
        kvm_vm_ioctl_set_mem_attributes(self, address, size, attributes, flags)

    def get_memory_attributes(self, gfn: int) -> int:
        """kvm_get_memory_attributes (there is no uapi "get": this is the model's view)."""
        return self.attributes.get(gfn)

    # ------------------------------------------------------------------ dirty logging

    def enable_dirty_log_manual_protect(self, initially_set: bool = False,
                                        enable: bool = True) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); ``enable=False`` passes 0."""
        args0 = 0
        if enable:
            args0 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if initially_set:
                args0 |= KVM_DIRTY_LOG_INITIALLY_SET
        _dirty.enable_manual_protect(self, args0)

    def get_dirty_log(self, slot: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: dirty page offsets of the slot, ascending."""
        return _dirty.kvm_get_dirty_log_protect(self, slot)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, pages) -> None:
        """KVM_CLEAR_DIRTY_LOG."""
        _dirty.kvm_clear_dirty_log_protect(self, slot, first_page, num_pages, list(pages))

    def enable_dirty_ring(self, size_bytes: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)."""
        _dirty.enable_dirty_ring(self, size_bytes)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: the number of entries reset."""
        return _dirty.reset_dirty_rings(self)

    # ------------------------------------------------------------------ vCPUs

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        self._check_open()
        if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool) or not 0 <= vcpu_id < 4096:
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
        self._check_as_id(as_id)
        return iter(self.hook.leaves(vm=self, start=start_gpa >> PAGE_SHIFT,
                                     end=(end_gpa + PAGE_SIZE - 1) >> PAGE_SHIFT, as_id=as_id))

    def lookup(self, gpa: int, private: bool = False, as_id: int = 0) -> Mapping | None:
        """The present leaf covering ``gpa`` in address space ``as_id``: the shared alias, or
        the private one."""
        self._check_as_id(as_id)
        gfn = gpa >> PAGE_SHIFT
        for m in self.hook.leaves(vm=self, start=gfn, end=gfn + 1, as_id=as_id):
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
        """Destroy the VM: the notifier is released (all mappings zapped), files closed."""
        if self.closed:
            return
        for gmem in list(self.gmem_files):
            gmem.close()
        self.host.unregister_notifier(self.notifier)
        self.closed = True

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise KvmError(errno.EBADF, "the VM was closed")


class Vcpu:
    """A vCPU. Guest accesses go through the backend's hardware walk (with this vCPU's TLB in
    front of it); a failed walk takes the fault path; the access then completes or raises a
    VcpuExit. The model has no guest instruction stream: an access is one load, store or
    instruction fetch of ``n`` bytes."""

    def __init__(self, vm: VM, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        #: (gpa page with alias bits, private intent) -> (gfn, pfn, writable, executable, dirty)
        self.tlb: dict = {}
        self.arch: dict = {}
        self.dirty_ring = (_dirty.DirtyRing(vm.dirty_ring_size, vm.cpu_dirty_log_size)
                           if vm.dirty_ring_size else None)
        #: kvm_arch_vcpu_memslots_id: the address space its accesses use (x86 SMM: 1).
        self.as_id = 0

    def __repr__(self) -> str:
        return f"Vcpu({self.id})"

    # ------------------------------------------------------------------ accesses

    def read(self, gpa: int, n: int, private: bool | None = None) -> bytes:
        """A guest load of ``n`` bytes at ``gpa``."""
        return self._access(READ, gpa, n, private)

    def write(self, gpa: int, data: bytes, private: bool | None = None) -> None:
        """A guest store of ``data`` at ``gpa``."""
        self._access(WRITE, gpa, data, private)

    def fetch(self, gpa: int, private: bool | None = None, n: int = 4) -> bytes:
        """An instruction fetch of ``n`` bytes at ``gpa`` (needs execute permission)."""
        return self._access(FETCH, gpa, n, private)

    def step_access(self, kind: str, gpa: int, data_or_n, private: bool | None = None):
        """The same access as ``read``/``write``/``fetch``, as a generator that yields the
        name of each race point its faults reach (``"after_snapshot"``: mmu_invalidate_seq
        read; ``"before_lock"``: pfn resolved, MMU lock not yet taken). Between two
        ``next()`` calls the caller may run any other flow — an invalidation, a conversion,
        another vCPU's access — to replay a race. Returns (StopIteration.value) the bytes read
        or None.

        ``_access`` is the same loop without the yields (read/write/fetch run nothing at the
        race points); both are built from the same helpers."""
        data, n = self._check_access(kind, gpa, data_or_n)
        out = []
        pos = 0
        while pos < n:
            cur = gpa + pos
            off = cur & (PAGE_SIZE - 1)
            chunk = min(n - pos, PAGE_SIZE - off)
            pfn = self._tlb_lookup(cur, kind, private)
            if pfn is None:
                pfn = yield from self._translate_slow(cur, _access_record(kind, private),
                                                      chunk, data, pos)
            self._move(pfn, off, chunk, data, pos, out)
            pos += chunk
        return b"".join(out) if data is None else None

    def _access(self, kind: str, gpa: int, data_or_n, private: bool | None):
        """``step_access`` driven to its end, without a generator per layer: the path of
        every plain guest access."""
        data, n = self._check_access(kind, gpa, data_or_n)
        out = []
        pos = 0
        while pos < n:
            cur = gpa + pos
            off = cur & (PAGE_SIZE - 1)
            chunk = min(n - pos, PAGE_SIZE - off)
            pfn = self._tlb_lookup(cur, kind, private)
            if pfn is None:
                pfn = self._translate(cur, _access_record(kind, private), chunk, data, pos)
            self._move(pfn, off, chunk, data, pos, out)
            pos += chunk
        return b"".join(out) if data is None else None

    def _check_access(self, kind: str, gpa: int, data_or_n) -> tuple[bytes | None, int]:
        """Argument checks of an access, then the dirty-ring request a vCPU honours before it
        re-enters the guest. Returns ``(data to store or None, length)``."""
        vm = self.vm
        if kind not in (READ, WRITE, FETCH):
            raise KvmError(errno.EINVAL, f"kind={kind!r}: read, write or fetch")
        if kind == WRITE:
            data = bytes(data_or_n)
            n = len(data)
        else:
            data, n = None, data_or_n
        if not isinstance(gpa, int) or isinstance(gpa, bool) or not 0 <= gpa < MAX_GPA:
            raise KvmError(errno.EINVAL, f"gpa={gpa!r} is not a guest physical address")
        if not isinstance(n, int) or n <= 0:
            raise KvmError(errno.EINVAL, f"n={n!r}: the access needs a positive length")
        vm._check_open()
        if self.dirty_ring is not None:
            _dirty.check_ring_request(self)
        return data, n

    def _move(self, pfn: int, off: int, chunk: int, data, pos: int, out: list) -> None:
        """The load or store of one chunk, on the host frame the walk found."""
        if data is None:
            out.append(self.vm.host.read_frame(pfn, off, chunk))
        else:
            self.vm.host.write_frame(pfn, off, data[pos:pos + chunk] if chunk < len(data)
                                     else data)

    def _tlb_lookup(self, gpa: int, kind: str, private: bool | None) -> int | None:
        e = self.tlb.get((gpa >> PAGE_SHIFT, private))
        if e is None:
            return None
        if (kind == WRITE and not (e[2] and e[4])) or (kind == FETCH and not e[3]):
            return None
        return e[1]

    def _translate_slow(self, gpa: int, access: Access, chunk: int, data, pos: int):
        """A TLB miss: the hardware walk, and the fault path while it fails (generator form,
        yielding the fault's race points)."""
        for _attempt in range(MAX_FAULT_RETRIES):
            fault = self._walk(gpa, access)
            if type(fault) is int:
                return fault
            r = yield from self._run_fault(fault)
            self._fault_done(fault, r, access, chunk, data, pos)
        raise self._livelock(gpa)

    def _translate(self, gpa: int, access: Access, chunk: int, data, pos: int) -> int:
        """``_translate_slow`` without the yields."""
        for _attempt in range(MAX_FAULT_RETRIES):
            fault = self._walk(gpa, access)
            if type(fault) is int:
                return fault
            r = self._run_fault_direct(fault)
            self._fault_done(fault, r, access, chunk, data, pos)
        raise self._livelock(gpa)

    @staticmethod
    def _livelock(gpa: int) -> KvmError:
        return KvmError(errno.EAGAIN, f"gpa={gpa:#x}: the fault retried {MAX_FAULT_RETRIES} "
                                      "times without making progress (livelock)")

    def _walk(self, gpa: int, access: Access) -> int | PageFault:
        """The hardware walk: the pfn (and a TLB fill) when it succeeds, else the PageFault
        KVM builds from the exit (x86 kvm_mmu_page_fault's struct kvm_page_fault, arm64
        kvm_handle_guest_abort), counted in the fault statistics."""
        vm = self.vm
        vm.running_vcpu = self
        try:
            t = vm.translate(vm=vm, vcpu=self, gpa=gpa, access=access)
        finally:
            vm.running_vcpu = None
        if isinstance(t, Translation):
            tlb = self.tlb
            if len(tlb) >= TLB_ENTRIES:
                tlb.clear()
            tlb[(gpa >> PAGE_SHIFT, access.private)] = (t.gfn, t.pfn, t.writable,
                                                        t.executable, t.dirty)
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

    def _run_fault(self, fault: PageFault):
        """The fault path as a generator (``kvm_page_fault``): this vCPU is the running one
        while a step runs, not while the caller runs other flows at a race point."""
        vm = self.vm
        steps = kvm_page_fault(vm, fault)
        while True:
            vm.running_vcpu = self
            try:
                point = next(steps)
            except StopIteration as stop:
                return stop.value
            except VcpuExit as exc:
                self._count_exit(fault, exc)
                raise
            finally:
                vm.running_vcpu = None
            yield point

    def _run_fault_direct(self, fault: PageFault) -> int:
        """``_run_fault`` without race points (``kvm_page_fault_direct``)."""
        vm = self.vm
        vm.running_vcpu = self
        try:
            return kvm_page_fault_direct(vm, fault)
        except VcpuExit as exc:
            self._count_exit(fault, exc)
            raise
        finally:
            vm.running_vcpu = None

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
        if smm is not None and not isinstance(smm, bool):
            raise KvmError(errno.EINVAL, f"smm={smm!r} must be a bool or None")
        vm._check_open()
        vm.hook.set_vcpu_events(vm=vm, vcpu=self, smm=smm)
        as_id = vm.hook.vcpu_memslots_id(vm=vm, vcpu=self)
        if as_id != self.as_id:
            self.as_id = as_id
            self.tlb.clear()
            vm.trace("vcpu.memslots_id", vcpu=self.id, as_id=as_id)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (kvm_vcpu_pre_fault_memory + x86 kvm_tdp_map_page): map as a
        read fault, without Accessed, without breaking COW. Returns the unprocessed
        ``(gpa, size)``; raises KvmError only when nothing was processed."""
        vm = self.vm
        if "pre_fault" not in vm.arch_capabilities:
            # Not built: kvm_vcpu_ioctl hands it to kvm_arch_vcpu_ioctl's default.
            raise KvmError(vm.arch_info.vcpu_ioctl_errno, f"pre_fault_memory: "
                           f"{vm.arch_info.name} has no KVM_PRE_FAULT_MEMORY")
        for name, value in (("gpa", gpa), ("size", size), ("flags", flags)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
                raise KvmError(errno.EINVAL, f"{name}={value!r} is not a u64")
        if flags:
            raise KvmError(errno.EINVAL, f"flags={flags:#x} must be 0")
        mask = vm.page_size - 1
        if gpa & mask or size & mask or (gpa + size) % (1 << 64) <= gpa:
            raise KvmError(errno.EINVAL, f"gpa={gpa:#x}, size={size:#x}: not aligned to "
                                         f"PAGE_SIZE {mask + 1:#x}, empty, or wrapping")
        if "pre_fault" not in vm.capabilities:
            raise KvmError(errno.EOPNOTSUPP, f"pre_fault_memory: not supported for VM type "
                                             f"{vm.vm_type!r}")
        full = size
        err = None
        while size:
            try:
                done = self._pre_fault_one(gpa, size)
            except KvmError as e:
                err = e
                break
            size -= done
            gpa += done
        if size == full and err is not None:
            raise err
        return gpa, size

    def _pre_fault_one(self, gpa: int, size: int) -> int:
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        for _ in range(MAX_FAULT_RETRIES):
            fault = PageFault(addr=gpa, gfn=gfn, is_private=vm.kvm_mem_is_private(gfn),
                              prefetch=True, as_id=self.as_id, vcpu=self)
            try:
                r = self._run_fault_direct(fault)
            except VcpuExit as e:
                raise KvmError(e.errno or errno.EFAULT,
                               f"gpa={gpa:#x}: the pre-fault exited ({e!r})") from None
            if r == RET_PF_RETRY:
                continue
            if r == RET_PF_EMULATE:
                raise KvmError(errno.ENOENT, f"gpa={gpa:#x} is not covered by a memslot")
            if r not in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
                raise KvmError(errno.EIO, f"gpa={gpa:#x}: unexpected fault result {r!r}")
            leaf = vm.lookup(gpa, private=fault.is_private, as_id=self.as_id)
            leaf_size = leaf.size if leaf is not None else vm.page_size
            end = (gpa & ~(leaf_size - 1)) + leaf_size
            return min(size, end - gpa)
        raise KvmError(errno.EIO, f"gpa={gpa:#x}: the pre-fault kept retrying")

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """What userspace does with the mmap()ed ring: collect the dirty (slot, offset)
        entries in ring order and mark them for the next KVM_RESET_DIRTY_RINGS."""
        if self.dirty_ring is None:
            raise KvmError(errno.EINVAL, "harvest_dirty_ring: the dirty ring is not enabled")
        return self.dirty_ring.harvest()
