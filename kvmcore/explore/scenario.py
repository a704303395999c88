"""Race scenarios: a VM set up in a known state and 2-4 flows to interleave (TOML).

```toml
name = "private fault vs conversion"
preemption_bound = 2        # optional: the depth-first search's default bound (below)
[vm]
arch = "x86_tdp"            # optional: the CLI's --arch wins
vm_type = "sw_protected"    # optional: the first VM type with every capability `requires` lists
requires = ["private_mem"]
[[slot]]                    # memslots, in base pages of the VM
slot = 0
gpa = 0x0
pages = 16
guest_memfd = true          # optional ("mmap": a guest_memfd with GUEST_MEMFD_FLAG_MMAP |
                            #   INIT_SHARED, its own mmap the slot's userspace_addr);
                            #   log_dirty = true also; kind = "pfnmap" (a VM_IO |
                            #   VM_PFNMAP device range) or another host mmap kind;
                            #   populate = true: the VMM wrote every page first (no zero page);
                            #   thp = true: an anonymous range with transparent huge pages
                            #   ("split": populated, each huge page then split to PTEs,
                            #   as a partial mprotect leaves them, for khugepaged to collapse)
private = true              # optional: the whole slot becomes private
                            # alias = 0: a slot over the host pages of an earlier one
                            #   (the same userspace_addr at another gpa; no guest_memfd)
[[access]]                  # optional setup accesses (vCPU 0), before the flows start
op = "write"
page = 5                    # page 5 of slot 0 (``slot = N`` for another); or ``gpa = 0x5000``
private = true
[[flow]]                    # the flows to interleave, named A, B, C, ... in order
op = "read"                 # read / write (vcpu = N, page or gpa, private, data, offset)
page = 5
private = true
[[flow]]
op = "set_memory_attributes"   # page and pages, or gpa and size; attributes
page = 5
attributes = 0
```

Pages are the VM's base pages, so one scenario means the same layout at every page size; a
``gpa`` or ``size`` is in bytes as given.

A store of a flow (``write``, ``host_write``) named by ``page`` goes at byte ``offset`` of it,
by default 8 times the flow's number (A at 8, B at 16, ...), and a setup write at byte 0, so
that each store has bytes of its own for the lost-write oracle to look for at the end; a
``gpa`` names the byte itself. A ``read`` returns ``n`` bytes, by default 40 (the setup's and
every flow's); ``data`` is the ASCII text a store writes (default ``WWWWWWWW``, ``HOST``, or
``GGGGGGGG`` for a pfn cache's, which writes at the byte its activation named).

A flow may list the outcomes it may end with in any schedule: ``expect = ["ok", "EAGAIN"]``
(``ok``, the errno name of a failed call, a guest access's exit as ``kvmcore run`` names it:
``mmio``, ``memory_fault``, ``hwpoison``, ``dirty_ring_full``, ``guest_abort``, or a host
signal: ``sigbus``, ``sigsegv``); a schedule where it ends otherwise fails (``unexpected``).

Flow ops: ``read``, ``write`` (a vCPU's access: ``vcpu`` defaults to the flow's index),
``set_memory_attributes``, ``punch_hole`` (``slot``, ``page``), ``close_gmem`` (``slot``: the
VMM closes the slot's guest_memfd's fd, its last: kvm_gmem_release, once a fallocate in flight
has dropped its reference; not for ``"mmap"``, whose mapping holds the file),
``delete_slot`` / ``move_slot`` (``slot``; ``gpa`` for a move), ``log_dirty`` (``slot``: turn
dirty logging on),
``get_dirty_log`` / ``clear_dirty_log`` (``slot``), ``reset_dirty_rings`` (the VMM harvests
every vCPU's dirty ring when the schedule starts, then KVM_RESET_DIRTY_RINGS; ``[vm]
dirty_ring = <bytes>`` enables the rings), and the host's ``munmap``,
``madvise_dontneed``, ``mprotect`` (``prot``), ``migrate``, ``host_write``, ``age``,
``poison`` (a memory error, as MADV_HWPOISON injects one: memory_failure on the page's
frame; a guest_memfd page's goes to kvm_gmem_error_folio) (``slot``, ``page``: a page of the
slot's host mapping; ``private = true``: of its guest_memfd instead, a machine check on
private memory, allocated first if the setup did not), ``split_huge_page`` and
``collapse_huge_page`` (khugepaged; the PMD-sized block of a ``thp`` slot holding ``page``),
and KVM's own accesses through a gfn_to_pfn_cache (``gpc = N``, default 0; the VM type needs
``pfncache``): ``gpc_activate`` (``page`` or ``gpa``; also a setup ``[[access]]``),
``gpc_read`` and ``gpc_write`` (refreshing the cache while kvm_gpc_check fails),
``gpc_deactivate`` (kvm_gpc_deactivate: invalid and off the VM's list), and a
vCPU's ``pre_fault`` (KVM_PRE_FAULT_MEMORY: ``page`` and ``pages``, or ``gpa`` and
``size``; ``vcpu`` as for an access; the VM type needs ``pre_fault``).
Addresses are numbers or strings (``"0x5000"``); pages count base pages (the VM's
PAGE_SIZE).

``linux_race = "..."``: the scenario shows a race of Linux itself (where, and why), so its
exploration fails wherever the model follows that kernel; the conformance suite requires the
failure, and ``kvmcore explore`` prints the text with it.

``preemption_bound = N``: the depth-first search explores the schedules with at most N
preemptions (a switch away from a flow that could go on; ``Explorer._run``) unless told
otherwise. It is for a scenario with too many interleavings to search whole: most races need
one or two preemptions (Musuvathi and Qadeer, PLDI 2007), and a bounded search is exhaustive
within its bound.
"""

from __future__ import annotations

import errno
import json
import tomllib
from importlib import resources
from pathlib import Path

import attrs

from ..errors import EHWPOISON, KvmError
from ..uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    PAGE_SHIFT,
)

ACCESS_OPS = ("read", "write")
VM_OPS = ("set_memory_attributes", "delete_slot", "move_slot", "log_dirty", "get_dirty_log",
          "clear_dirty_log", "reset_dirty_rings")
GMEM_OPS = ("punch_hole", "close_gmem")
THP_OPS = ("split_huge_page", "collapse_huge_page")
HOST_OPS = ("munmap", "madvise_dontneed", "mprotect", "migrate", "host_write", "age",
            "poison") + THP_OPS
#: KVM's own accesses through a gfn_to_pfn_cache (``gpc = N`` names the cache, default 0).
GPC_OPS = ("gpc_activate", "gpc_read", "gpc_write", "gpc_deactivate")
#: vCPU ioctls: KVM_PRE_FAULT_MEMORY (``vcpu``, ``page`` and ``pages``, or ``gpa`` and ``size``).
VCPU_OPS = ("pre_fault",)
FLOW_OPS = ACCESS_OPS + VM_OPS + GMEM_OPS + HOST_OPS + GPC_OPS + VCPU_OPS
#: What a page or gpa of an item names: the guest physical address it goes to.
GPA_OPS = ACCESS_OPS + ("set_memory_attributes",) + GPC_OPS + VCPU_OPS
#: The ops whose range is ``gpa`` and ``size`` in bytes (or ``page`` and ``pages``).
SIZED_OPS = ("set_memory_attributes",) + VCPU_OPS
NAMES = "ABCD"
#: The top-level keys of a scenario file.
TOP_KEYS = ("name", "preemption_bound", "linux_race", "vm", "slot", "access", "flow")
#: The keys of [vm] and what each holds.
VM_KEYS = {"arch": str, "vm_type": str, "requires": list, "manual_protect": bool,
           "dirty_ring": int}
KIND_NAMES = {str: "a string", list: "a list of capability names", bool: "true or false"}
#: The flow keys that are not numbers.
FLOW_KEY_KINDS = {"private": bool, "data": str, "prot": str}
#: What a read flow returns by default: the setup's store and every flow's (see ``offset``).
READ_BYTES = 8 * (len(NAMES) + 1)
#: What a store writes unless its flow says (``data``).
DEFAULT_DATA = {"write": "W" * 8, "host_write": "HOST", "gpc_write": "G" * 8}
#: The page every store's offset fits in: the smallest PAGE_SIZE.
MIN_PAGE = 4096


#: How a flow's ``expect`` names the way it ended, by exception: a guest access's exits (as
#: ``kvmcore run`` names them) and the host's signals; a failed call is its errno's name.
EXIT_NAMES = {"MmioExit": "mmio", "MemoryFaultExit": "memory_fault",
              "HwPoisonSignal": "hwpoison", "DirtyRingFullExit": "dirty_ring_full",
              "GuestAbort": "guest_abort", "SigBus": "sigbus", "SigSegv": "sigsegv"}


def outcome_name(exc: BaseException | None, value=None) -> str:
    """The name ``expect`` gives a flow's end: ``ok`` (``exc`` None), the errno name of a
    failed call (raised, or returned as -errno, as a pfn cache's calls return it: ``value``),
    or an exit's or signal's name (``EXIT_NAMES``)."""
    if exc is None:
        if type(value) is int and value < 0:
            return _errno_name(-value)
        return "ok"
    if isinstance(exc, KvmError):
        return _errno_name(exc.errno)
    return EXIT_NAMES.get(type(exc).__name__, type(exc).__name__)


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, "EHWPOISON" if err == EHWPOISON else str(err))


def _expect(path: str, item: str, value) -> list[str]:
    known = {"ok", "EHWPOISON", *EXIT_NAMES.values(), *errno.errorcode.values()}
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v in known for v in value):
        raise RaceScenarioError(f"{path}: {item}: key 'expect': {value!r} is not a list of "
                                "outcomes: ok, an errno name (EAGAIN), or one of "
                                f"{', '.join(EXIT_NAMES.values())}")
    return list(value)


class RaceScenarioError(ValueError):
    """A race scenario that cannot be read: the message names the file, the item and key."""


@attrs.frozen
class RaceScenario:
    name: str
    path: str
    vm: dict
    slots: tuple
    accesses: tuple
    flows: tuple
    #: The depth-first search's preemption bound unless told otherwise (None: no bound).
    preemption_bound: int | None = None
    #: A scenario that shows a race of Linux itself says so, with where and why: its
    #: exploration is to fail (``linux_race = "..."``), and does wherever the model follows
    #: the kernel it names.
    linux_race: str | None = None

    def flow_names(self) -> str:
        return NAMES[:len(self.flows)]


def builtin_names() -> list[str]:
    files = resources.files("kvmcore.scenarios.races")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load(source: str | Path) -> RaceScenario:
    """A race scenario from a file, or a built-in one by name (``kvmcore/scenarios/races``)."""
    return parse(*read_text(source))


def read_text(source: str | Path) -> tuple[str, str]:
    """The TOML text of a race scenario file or built-in one, and the path that names it."""
    if not str(source).endswith(".toml") and str(source) in builtin_names():
        return ((resources.files("kvmcore.scenarios.races") / f"{source}.toml").read_text(),
                f"<built-in {source}>")
    try:
        return Path(source).read_bytes().decode(), str(source)
    except OSError as e:
        raise RaceScenarioError(f"{source}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise RaceScenarioError(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") \
            from None


def dumps(doc: dict) -> str:
    """A race scenario's TOML document (as ``tomllib`` reads it) as the text of the format:
    top-level keys, ``[vm]``, then each ``[[slot]]``, ``[[access]]`` and ``[[flow]]`` with one
    key per line, gpas in hex. (tomli-w would write short arrays of tables inline.)"""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)          # a JSON string or integer is a TOML one

    def keys(table):
        return [f"{k} = " + (f"{v:#x}" if k == "gpa" and isinstance(v, int) else value(v))
                for k, v in table.items()]

    lines = keys({k: v for k, v in doc.items() if not isinstance(v, (dict, list))})
    if doc.get("vm"):
        lines += ["[vm]"] + keys(doc["vm"])
    for table in ("slot", "access", "flow"):
        for item in doc.get(table, ()):
            lines += [f"[[{table}]]"] + keys(item)
    return "\n".join(lines) + "\n"


def _num(path, item, key, value):
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise RaceScenarioError(f"{path}: {item}: key {key!r}: {value!r} is not a non-negative "
                            "number")


def parse(text: str, path: str = "<race scenario>") -> RaceScenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RaceScenarioError(f"{path}: {e}") from None
    for key in doc:
        if key not in TOP_KEYS:
            raise RaceScenarioError(f"{path}: unknown key {key!r}: one of "
                                    f"{', '.join(TOP_KEYS)}")
    bound = doc.get("preemption_bound")
    if bound is not None:
        bound = _num(path, "top level", "preemption_bound", bound)
    race = doc.get("linux_race")
    if race is not None and not (isinstance(race, str) and race.strip()):
        raise RaceScenarioError(f"{path}: top level: key 'linux_race': {race!r} is not a "
                                "text saying where Linux races and why")
    vm = doc.get("vm", {})
    if not isinstance(vm, dict):
        raise RaceScenarioError(f"{path}: [vm] must be a table")
    for key, value in vm.items():
        kind = VM_KEYS.get(key)
        if kind is None:
            raise RaceScenarioError(f"{path}: [vm]: unknown key {key!r}: one of "
                                    f"{', '.join(VM_KEYS)}")
        if kind is int:
            vm[key] = _num(path, "[vm]", key, value)
        elif not isinstance(value, kind) or (kind is list and not all(
                isinstance(v, str) for v in value)):
            raise RaceScenarioError(f"{path}: [vm]: key {key!r}: {value!r} is not "
                                    f"{KIND_NAMES[kind]}")
    slots, accesses, flows = [], [], []
    for i, s in enumerate(doc.get("slot", []), 1):
        item = f"slot {i}"
        gmem = s.get("guest_memfd", False)
        if gmem not in (True, False, "mmap"):
            raise RaceScenarioError(f"{path}: {item}: key 'guest_memfd': {gmem!r} is not "
                                    'true, false or "mmap"')
        slots.append({"slot": _num(path, item, "slot", s.get("slot", i - 1)),
                      "gpa": _num(path, item, "gpa", s.get("gpa", 0)),
                      "pages": _num(path, item, "pages", s.get("pages", 16)),
                      "guest_memfd": bool(gmem), "gmem_mmap": gmem == "mmap",
                      "log_dirty": bool(s.get("log_dirty", False)),
                      "private": bool(s.get("private", False)),
                      "populate": bool(s.get("populate", False)),
                      "thp": s.get("thp", False),
                      "kind": str(s.get("kind", "anon"))})
        thp = slots[-1]["thp"]
        if not (isinstance(thp, bool) or thp == "split") or thp and (
                slots[-1]["kind"] != "anon" or gmem or "alias" in s):
            raise RaceScenarioError(f"{path}: {item}: key 'thp': {thp!r}: true, "
                                    'false or "split", and only for an anonymous slot '
                                    "without guest_memfd or alias")
        if "alias" in s:
            alias = _num(path, item, "alias", s["alias"])
            target = next((t for t in slots[:-1] if t["slot"] == alias), None)
            if target is None or target["guest_memfd"] or slots[-1]["guest_memfd"]:
                raise RaceScenarioError(f"{path}: {item}: key 'alias': {alias} is not an "
                                        "earlier [[slot]] without guest_memfd")
            if slots[-1]["pages"] > target["pages"]:
                raise RaceScenarioError(f"{path}: {item}: key 'pages': an alias covers at "
                                        f"most the {target['pages']} pages of slot {alias}")
            slots[-1]["alias"] = alias
    for i, a in enumerate(doc.get("access", []), 1):
        item = f"access {i}"
        if a.get("op") not in ACCESS_OPS + ("gpc_activate",):
            raise RaceScenarioError(f"{path}: {item}: key 'op': one of "
                                    f"{ACCESS_OPS + ('gpc_activate',)}")
        access = {"op": a["op"], "private": bool(a.get("private", False))}
        for key in ("gpa", "page", "slot", "gpc"):
            if key in a:
                access[key] = _num(path, item, key, a[key])
        accesses.append(access)
    for i, f in enumerate(doc.get("flow", []), 1):
        item = f"flow {i}"
        op = f.get("op")
        if op not in FLOW_OPS:
            raise RaceScenarioError(f"{path}: {item}: key 'op': {op!r} is not one of "
                                    f"{', '.join(FLOW_OPS)}")
        flow = {"op": op}
        for key, value in f.items():
            if key in ("op", "expect"):
                if key == "expect":
                    flow[key] = _expect(path, item, value)
                continue
            kind = FLOW_KEY_KINDS.get(key)
            if kind is None:
                flow[key] = _num(path, item, key, value)
            elif isinstance(value, kind):
                flow[key] = value
            else:
                raise RaceScenarioError(f"{path}: {item}: key {key!r}: {value!r} is not "
                                        f"{KIND_NAMES[kind]}")
        flows.append(flow)
    if not 1 <= len(flows) <= len(NAMES):
        raise RaceScenarioError(f"{path}: a race scenario has 1 to {len(NAMES)} [[flow]]s, "
                                f"not {len(flows)}")
    if not slots:
        raise RaceScenarioError(f"{path}: a race scenario needs at least one [[slot]]")
    ids = {s["slot"] for s in slots}
    for kind, items in (("access", accesses), ("flow", flows)):
        for i, item in enumerate(items, 1):
            if item.get("slot", 0) not in ids:
                raise RaceScenarioError(f"{path}: {kind} {i}: key 'slot': no [[slot]] "
                                        f"{item['slot']}")
            slot = next(s for s in slots if s["slot"] == item.get("slot", 0))
            if item["op"] in GMEM_OPS and not slot["guest_memfd"]:
                raise RaceScenarioError(f"{path}: {kind} {i}: {item['op']} needs a [[slot]] "
                                        "with guest_memfd = true")
            if item["op"] == "poison" and item.get("private") and (
                    not slot["guest_memfd"] or slot["gmem_mmap"]):
                raise RaceScenarioError(f"{path}: {kind} {i}: poison: private = true names "
                                        "a page of the slot's guest_memfd: it needs a "
                                        "[[slot]] with guest_memfd = true (a \"mmap\" one's "
                                        "pages are poisoned through its mapping)")
            if item["op"] == "close_gmem" and slot["gmem_mmap"]:
                raise RaceScenarioError(f"{path}: {kind} {i}: close_gmem: the mapping of a "
                                        'guest_memfd = "mmap" slot holds its file: closing '
                                        "the fd does not release it")
            if item["op"] in GPA_OPS and "page" not in item:
                item.setdefault("gpa", 0)
            if kind == "flow" and item["op"] in DEFAULT_DATA:
                data = item.get("data", DEFAULT_DATA[item["op"]])
                if not data or not data.isascii():
                    raise RaceScenarioError(f"{path}: flow {i}: key 'data': {data!r} is not "
                                            "a non-empty ASCII text")
            if kind == "flow" and item["op"] in ("write", "host_write") and "gpa" not in item:
                offset = item.setdefault("offset", 8 * i)
                if not 0 <= offset <= MIN_PAGE - len(data):
                    raise RaceScenarioError(f"{path}: flow {i}: key 'offset': {offset} does "
                                            f"not leave the {len(data)} bytes of its store "
                                            f"in a {MIN_PAGE}-byte page")
    if any(item["op"] in GPC_OPS for item in accesses + flows):
        vm["requires"] = sorted({*vm.get("requires", ()), "pfncache"})
    if any(item["op"] in VCPU_OPS for item in flows):
        vm["requires"] = sorted({*vm.get("requires", ()), "pre_fault"})
    return RaceScenario(str(doc.get("name", Path(path).stem)), path, dict(vm), tuple(slots),
                        tuple(accesses), tuple(flows), bound, race)


class World:
    """One fresh run of a scenario: the VM in its setup state and the flows, not started."""

    def __init__(self, scn: RaceScenario, arch, vm_type: str, options: dict):
        from ..vm import VM, host_for

        self.host = host_for(arch, options)
        self.vm = vm = VM(arch=arch, vm_type=vm_type, host=self.host, **options)
        if scn.vm.get("manual_protect"):
            vm.enable_dirty_log_manual_protect()
        if scn.vm.get("dirty_ring"):
            vm.enable_dirty_ring(scn.vm["dirty_ring"])
        page = self.page = vm.page_size
        self.hvas, self.gmems = {}, {}
        for s in scn.slots:
            size = s["pages"] * page
            gmem = None
            if s["guest_memfd"]:
                gmem = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP |
                                             GUEST_MEMFD_FLAG_INIT_SHARED
                                             if s["gmem_mmap"] else 0)
            if "alias" in s:              # the same host pages at another gpa
                hva = self.hvas[s["alias"]]
            elif s["gmem_mmap"]:
                hva = gmem.mmap()
            elif s["kind"] == "pfnmap":     # a device range: pfns far above RAM
                hva = self.host.mmap(size, kind="pfnmap", pfn=0x80000)
            else:
                hva = self.host.mmap(size, kind=s["kind"], thp=bool(s["thp"]))
            if (s["populate"] or s["thp"] == "split") and s["kind"] != "pfnmap" and \
                    "alias" not in s:
                # The VMM's first store to each page (handle_mm_fault for write: a page of
                # zeros, which the store leaves as it is); a THP's first store allocated the
                # whole huge page.
                for off in range(0, size, page):
                    if not (s["thp"] and self.host.lookup_pte(hva + off)):
                        self.host.handle_mm_fault(hva + off, True)
            if s["thp"] == "split":
                pmd = self.host.pmd_size
                for off in range(-hva % pmd, size - pmd + 1, pmd):
                    self.host.split_huge_page(hva + off)
            flags = KVM_MEM_LOG_DIRTY_PAGES if s["log_dirty"] else 0
            if gmem is not None:
                flags |= KVM_MEM_GUEST_MEMFD
            vm.set_user_memory_region(s["slot"], s["gpa"], size, hva, flags, guest_memfd=gmem)
            self.hvas[s["slot"]], self.gmems[s["slot"]] = hva, gmem
            if s["private"]:
                vm.set_memory_attributes(s["gpa"], size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self.slots = {s["slot"]: s for s in scn.slots}
        #: The gfn_to_pfn_caches the items name, made inactive here (kvm_gpc_init).
        self.gpcs = {n: vm.gpc_init() for n in sorted({
            item.get("gpc", 0) for item in scn.accesses + scn.flows
            if item["op"] in GPC_OPS})}
        self.scn_flows = tuple(self._in_bytes(f) for f in scn.flows)
        nvcpus = max([f.get("vcpu", i) for i, f in enumerate(scn.flows)] + [0]) + 1
        self.vcpus = [vm.create_vcpu(i) for i in range(nvcpus)]
        for a in scn.accesses:
            self._access(self.vcpus[0], self._in_bytes(a))
        self.flows = [self._start(i, f) for i, f in enumerate(self.scn_flows)]
        for name, flow in zip(NAMES, self.flows, strict=False):
            flow.name = f"{name}:{flow.name}"

    def _in_bytes(self, f: dict) -> dict:
        """An access or attribute item with ``page`` (of ``slot``) and ``pages`` turned into
        the ``gpa`` and ``size`` in bytes its ioctl takes; host items keep their pages."""
        if f["op"] not in GPA_OPS or "page" not in f:
            return f
        f = dict(f)
        f["gpa"] = self.slots[f.get("slot", 0)]["gpa"] + f.pop("page") * self.page + \
            f.pop("offset", 0)
        if f["op"] in SIZED_OPS and "size" not in f:
            f["size"] = f.pop("pages", 1) * self.page
        return f

    def footprint(self, i: int) -> dict | None:
        """What flow ``i`` may touch, for the partial-order reduction: ``{resource: "r" or
        "w"}``, or None for "anything" (every flow but a guest access: they take kvm->mmu_lock
        for write, slots_lock, or change the host mm). A guest access touches its vCPU (TLB,
        requests), kvm->srcu (read), kvm->mmu_lock (read where it is an rwlock), the page
        tables under its gfn's root entry (a table below it may be linked by any fault under
        the same entry; ``vm.root_entry_shift``, None where the backend does not say: one
        region), the host page of its hva (a write may break COW), and, for a
        write, the slot's dirty log."""
        f = self.scn_flows[i]
        if f["op"] not in ("read", "write"):
            return None
        vm, write = self.vm, f["op"] == "write"
        gfn = f["gpa"] >> 12
        slot = vm.leaf_memslot(gfn)
        fp = {("vcpu", f.get("vcpu", i)): "w", "srcu": "r",
              "mmu_lock": "r" if vm.arch_info.mmu_rwlock else "w",
              ("tables", 0 if vm.root_entry_shift is None
               else f["gpa"] >> vm.root_entry_shift): "w"}
        if slot is not None:
            fp[("host", slot.gfn_to_hva(gfn) >> 12)] = "w" if write else "r"
            if write:
                fp[("dirty", slot.slot_id)] = "w"
        return fp

    def vcpu_of(self, i: int):
        """The vCPU that flow ``i`` (an access) runs on."""
        return self.vcpus[self.scn_flows[i].get("vcpu", i)]

    def _access(self, vcpu, a):
        from ..exits import VcpuExit

        if a["op"] == "gpc_activate":
            self.gpcs[a.get("gpc", 0)].activate(a["gpa"], 8)
            return
        try:
            if a["op"] == "write":
                vcpu.write(a["gpa"], b"\x5a" * 8, private=a["private"])
            else:
                vcpu.read(a["gpa"], 8, private=a["private"])
        except (VcpuExit, KvmError):
            pass

    @staticmethod
    def data(f: dict) -> bytes:
        """What store flow ``f`` writes."""
        return f.get("data", DEFAULT_DATA[f["op"]]).encode()

    def _gmem_memory_failure(self, f: dict):
        """memory_failure on the frame of the guest_memfd folio of ``f``'s page: a machine
        check on private memory, which no host PTE maps. A folio not allocated yet is
        allocated first, as the VMM's fallocate would have (a memory error hits memory)."""
        gmem = self.gmems[f.get("slot", 0)]
        offset = f.get("page", 0) * self.page
        pfn = gmem.inode.frame_of(offset >> PAGE_SHIFT)
        if pfn is None:
            gmem.fallocate(FALLOC_FL_KEEP_SIZE, offset, self.page)
            pfn = gmem.inode.frame_of(offset >> PAGE_SHIFT)
        return self.host.steps.memory_failure(pfn)

    def gmem_of(self, slot):
        """The scenario's guest_memfd file of memslot ``slot`` (None without one), even where
        a release has already taken it from the slot."""
        return self.gmems.get(slot.slot_id & 0xFFFF)

    def _hva(self, f):
        return self.hvas[f.get("slot", 0)] + f.get("page", 0) * self.page

    def _start(self, i: int, f: dict):
        vm, host, op = self.vm, self.host, f["op"]
        if op in ACCESS_OPS:
            vcpu = self.vcpus[f.get("vcpu", i)]
            private = f.get("private", False)
            if op == "write":
                return vcpu.steps.write(f["gpa"], self.data(f), private=private)
            return vcpu.steps.read(f["gpa"], f.get("n", READ_BYTES), private=private)
        if op in GPC_OPS:
            gpc = self.gpcs[f.get("gpc", 0)]
            if op == "gpc_activate":
                return gpc.steps.activate(f["gpa"], f.get("n", 8))
            if op == "gpc_write":
                return gpc.steps.write(self.data(f))
            if op == "gpc_deactivate":
                return gpc.steps.deactivate()
            return gpc.steps.read(f.get("n", 8))
        if op == "pre_fault":
            return self.vcpus[f.get("vcpu", i)].steps.pre_fault_memory(
                f["gpa"], f.get("size", self.page))
        if op == "set_memory_attributes":
            return vm.steps.set_memory_attributes(f["gpa"], f.get("size", self.page),
                                                  f.get("attributes", 0))
        if op == "punch_hole":
            gmem = self.gmems[f.get("slot", 0)]
            return gmem.steps.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                                        f.get("page", 0) * self.page,
                                        f.get("pages", 1) * self.page)
        if op == "close_gmem":
            return self.gmems[f.get("slot", 0)].steps.close()
        s = self.slots.get(f.get("slot", 0))
        if op in ("delete_slot", "move_slot", "log_dirty"):
            size = s["pages"] * self.page
            gpa = f.get("gpa", s["gpa"]) if op == "move_slot" else s["gpa"]
            flags = KVM_MEM_LOG_DIRTY_PAGES if op == "log_dirty" else 0
            return vm.steps.set_user_memory_region(s["slot"], gpa, 0 if op == "delete_slot"
                                                   else size, self.hvas[s["slot"]], flags)
        if op == "get_dirty_log":
            return vm.steps.get_dirty_log(s["slot"])
        if op == "reset_dirty_rings":
            for vcpu in self.vcpus:
                vcpu.harvest_dirty_ring()
            return vm.steps.reset_dirty_rings()
        if op == "clear_dirty_log":
            return vm.steps.clear_dirty_log(s["slot"], 0, s["pages"] * self.page >> 12,
                                            range(s["pages"] * self.page >> 12))
        hva = self._hva(f)
        if op == "mprotect":
            return host.steps.mprotect(hva, self.page, f.get("prot", "r"))
        if op == "migrate":
            return host.steps.migrate(hva)
        if op == "host_write":
            return host.steps.write(hva + f["offset"], self.data(f))
        if op == "age":
            return host.steps.age(hva, f.get("pages", 1) * self.page)
        if op == "poison":
            if f.get("private"):
                return self._gmem_memory_failure(f)
            return host.steps.poison(hva)
        if op in THP_OPS:
            return getattr(host.steps, op)(hva)
        return getattr(host.steps, op)(hva, f.get("pages", 1) * self.page)
