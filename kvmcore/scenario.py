"""Scenario files: a guest's memory life as TOML, run against any backend.

A scenario has a ``[vm]`` table, host mappings (``[[mmap]]``), guest_memfd files
(``[[gmem]]``), memslots (``[[memslot]]``) and steps (``[[step]]``). Any item may say
``requires = ["private_mem", ...]``: it is skipped (and reported) on a VM that lacks one; and
``unless = [...]``: it is skipped on a VM that has one (the alternative for the others), so one
scenario runs on every backend. A step may carry ``expect``: the exit kind and fields, the errno,
the data read, the dirty pages — so a scenario doubles as a test. ``docs/scenarios.md`` describes
every key; ``kvmcore/scenarios/`` holds the built-in ones.

The scenario uses only the public API (API.md).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import random
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import attrs

from .arch import ArchInfo
from .errors import EHWPOISON, KvmError
from .exits import DirtyRingFullExit, GuestAbort, HwPoisonSignal, MemoryFaultExit, MmioExit
from .gmem import MAX_FOLIO_ORDER
from .host import SigBus, SigSegv
from .uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    SZ_4K,
)

BUILTIN = ("confidential", "basic")

SLOT_FLAGS = {"log_dirty": KVM_MEM_LOG_DIRTY_PAGES, "readonly": KVM_MEM_READONLY,
              "guest_memfd": KVM_MEM_GUEST_MEMFD}
GMEM_FLAGS = {"mmap": GUEST_MEMFD_FLAG_MMAP, "init_shared": GUEST_MEMFD_FLAG_INIT_SHARED}
EXIT_KINDS = {"none": None, "mmio": MmioExit, "memory_fault": MemoryFaultExit,
              "hwpoison": HwPoisonSignal, "dirty_ring_full": DirtyRingFullExit,
              "guest_abort": GuestAbort, "sigbus": SigBus, "sigsegv": SigSegv}
ACCESS_OPS = ("read", "write", "fetch")
MMAP_KINDS = {"anon": SZ_4K, "shared": SZ_4K, "hugetlb_2m": 1 << 21, "hugetlb_1g": 1 << 30,
              "pfnmap": SZ_4K}  # kind -> the page its length is a multiple of (at least)
HOST_OPS = ("munmap", "madvise_dontneed", "migrate", "mprotect", "poison", "age",
            "host_write", "split_huge_page", "collapse_huge_page")


class ScenarioError(ValueError):
    """A scenario file that cannot be run: the message is one line naming the file, the item
    and the key."""


# --------------------------------------------------------------------------- parsing

def _where(path: str, item: str, key: str | None = None) -> str:
    return f"{path}: {item}" + (f": key {key!r}" if key else "")


class _Reader:
    """Typed access to one TOML table, with every problem reported as one line."""

    def __init__(self, path: str, item: str, table, allowed: set[str]):
        if not isinstance(table, dict):
            raise ScenarioError(f"{_where(path, item)}: must be a table, not "
                                f"{type(table).__name__}")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise ScenarioError(f"{_where(path, item, unknown[0])}: unknown key (expected one "
                                f"of {', '.join(sorted(allowed))})")
        self.path, self.item, self.t = path, item, table

    def err(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{_where(self.path, self.item, key)}: {problem}")

    def get(self, key: str, kind, default=attrs.NOTHING):
        if key not in self.t:
            if default is attrs.NOTHING:
                raise self.err(key, "is required")
            return default
        value = self.t[key]
        if kind is int:
            return self.size(key, value)
        if kind is bool and not isinstance(value, bool):
            raise self.err(key, f"must be true or false, not {value!r}")
        if kind is str and not isinstance(value, str):
            raise self.err(key, f"must be a string, not {value!r}")
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.err(key, f"must be a list of strings, not {value!r}")
        if kind is dict and not isinstance(value, dict):
            raise self.err(key, f"must be a table, not {value!r}")
        return value

    def size(self, key: str, value) -> int:
        """An integer, or a string: 0x hex, or a number with K/M/G/T (binary units)."""
        if isinstance(value, bool):
            raise self.err(key, f"must be a number, not {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise self.err(key, f"must not be negative ({value})")
            return value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                if text.lower().startswith("0x"):
                    return int(text, 16)
                units = {"K": 10, "M": 20, "G": 30, "T": 40}
                if text and text[-1].upper() in units:
                    return int(float(text[:-1]) * (1 << units[text[-1].upper()]))
                return int(text)
            except ValueError:
                pass
        raise self.err(key, f"must be a size like 4096, \"0x1000\" or \"2M\", not {value!r}")

    def choice(self, key: str, options, default=attrs.NOTHING):
        value = self.get(key, str, default)
        if value not in options:
            raise self.err(key, f"must be one of {', '.join(options)}, not {value!r}")
        return value

    def flags(self, key: str, table: dict) -> int:
        out = 0
        for name in self.get(key, list, []):
            if name not in table:
                raise self.err(key, f"unknown flag {name!r} (expected {', '.join(table)})")
            out |= table[name]
        return out


@attrs.define
class Scenario:
    path: str
    name: str
    description: str
    vm: dict
    mmaps: list
    gmems: list
    memslots: list
    steps: list


def load(source: str | Path) -> Scenario:
    """Parse a scenario file, or a built-in one by name (``confidential``, ``basic``)."""
    if isinstance(source, str) and source in BUILTIN:
        text = resources.files("kvmcore.scenarios").joinpath(f"{source}.toml").read_text()
        return parse(text, f"<builtin:{source}>")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition.
        raise ScenarioError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start})") from None
    return parse(text, str(path))


def parse(text: str, path: str = "<scenario>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML ({e})") from None
    top = _Reader(path, "top level", doc, {"name", "description", "vm", "mmap", "gmem",
                                           "memslot", "step"})
    vm = _Reader(path, "[vm]", doc.get("vm", {}), {"arch", "vm_type", "options", "vcpus",
                                                   "dirty_ring", "manual_protect",
                                                   "initially_set", "seed"})
    vm_spec = {"arch": vm.get("arch", str, None), "vm_type": vm.get("vm_type", str, None),
               "options": vm.get("options", dict, {}), "vcpus": vm.get("vcpus", int, 1),
               "dirty_ring": vm.get("dirty_ring", int, 0),
               "manual_protect": vm.get("manual_protect", bool, False),
               "initially_set": vm.get("initially_set", bool, False),
               "seed": vm.get("seed", int, 0)}
    if not 1 <= vm_spec["vcpus"] <= 64:
        raise vm.err("vcpus", "must be between 1 and 64")
    _check_dirty_ring(vm, vm_spec["dirty_ring"])

    def items(key: str) -> list:
        value = doc.get(key, [])
        if not isinstance(value, list):
            raise ScenarioError(f"{_where(path, key)}: use [[{key}]] (an array of tables)")
        return value

    mmaps, names = [], set()
    for i, t in enumerate(items("mmap")):
        r = _Reader(path, f"mmap {i + 1}", t, {"name", "length", "kind", "prot", "thp", "pfn",
                                               "requires", "unless"})
        spec = {"name": r.get("name", str), "length": r.get("length", int),
                "kind": r.choice("kind", ("anon", "shared", "hugetlb_2m", "hugetlb_1g",
                                          "pfnmap"), "anon"),
                "prot": r.get("prot", str, "rw"), "thp": r.get("thp", bool, False),
                "pfn": r.get("pfn", int, None), "requires": r.get("requires", list, []),
                "unless": r.get("unless", list, [])}
        if spec["name"] in names:
            raise r.err("name", f"{spec['name']!r} is used twice")
        _check_mmap(r, spec)
        names.add(spec["name"])
        mmaps.append(spec)
    gmems, gmem_names = [], set()
    for i, t in enumerate(items("gmem")):
        r = _Reader(path, f"gmem {i + 1}", t, {"name", "size", "flags", "folio_order",
                                               "requires", "unless"})
        spec = {"name": r.get("name", str), "size": r.get("size", int),
                "flags": r.flags("flags", GMEM_FLAGS),
                "folio_order": r.get("folio_order", int, 0),
                "requires": r.get("requires", list, []),
                "unless": r.get("unless", list, [])}
        if spec["name"] in gmem_names:
            raise r.err("name", f"{spec['name']!r} is used twice")
        _check_gmem(r, spec)
        gmem_names.add(spec["name"])
        gmems.append(spec)
    memslots = []
    for i, t in enumerate(items("memslot")):
        r = _Reader(path, f"memslot {i + 1}", t, _MEMSLOT_KEYS)
        memslots.append(_check_names(r, _memslot(r), names, gmem_names))
    steps = []
    for i, t in enumerate(items("step")):
        step = _step(path, i + 1, t, vm_spec["vcpus"])
        r = _Reader(path, f"step {i + 1} ({step['op']})", t, set(t))
        steps.append(_check_names(r, step, names, gmem_names))
    return Scenario(path, top.get("name", str, Path(path).stem),
                    top.get("description", str, ""), vm_spec, mmaps, gmems, memslots, steps)


# Checks of values that every backend's API refuses: done here, they name the file, the item
# and the key before anything runs. What depends on the backend (a 64 KiB PAGE_SIZE, the
# capabilities of the VM type) is refused by the API at run time: Runner.run reports that too.

def _check_mmap(r: _Reader, m: dict) -> None:
    """What HostMemory.mmap refuses on any host. (Linux's mmap(2) rounds a length up to the
    page; the model's HostMemory.mmap asks for a multiple of the page.)"""
    if set(m["prot"]) - set("rwx"):
        raise r.err("prot", f"use a combination of 'r', 'w', 'x', not {m['prot']!r}")
    page = MMAP_KINDS[m["kind"]]
    if m["length"] == 0 or m["length"] % page:
        raise r.err("length", f"must be a positive multiple of {page:#x} for kind "
                              f"{m['kind']!r}, not {m['length']:#x}")
    if m["kind"] == "pfnmap" and m["pfn"] is None:
        raise r.err("pfn", "is required for kind 'pfnmap' (the device pfn of the first page)")
    if m["kind"] != "pfnmap" and m["pfn"] is not None:
        raise r.err("pfn", f"is only for kind 'pfnmap', not {m['kind']!r}")
    if m["thp"] and m["kind"] != "anon":
        raise r.err("thp", f"transparent huge pages are for kind 'anon', not {m['kind']!r}")


def _check_gmem(r: _Reader, g: dict) -> None:
    """kvm_gmem_create: the size is a positive multiple of PAGE_SIZE (EINVAL); the model's
    folio_order (in flight upstream) is at most MAX_FOLIO_ORDER and its folio divides the
    size."""
    if g["size"] == 0 or g["size"] % SZ_4K:
        raise r.err("size", f"must be a positive multiple of the page (0x1000), not "
                            f"{g['size']:#x}")
    order = g["folio_order"]
    if order > MAX_FOLIO_ORDER or g["size"] % (SZ_4K << order):
        raise r.err("folio_order", f"must be 0..{MAX_FOLIO_ORDER} with folios of 4 KiB << "
                                   f"order dividing the size, not {order}")


def _check_dirty_ring(r: _Reader, size: int) -> None:
    """kvm_vm_ioctl_enable_dirty_log_ring: a power of two (EINVAL), at least a page (EINVAL),
    at most KVM_DIRTY_RING_MAX_ENTRIES entries (E2BIG). 0 leaves the ring off."""
    if not size:
        return
    most = KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE
    if size & (size - 1) or not SZ_4K <= size <= most:
        raise r.err("dirty_ring", f"must be a power of two from 4096 to {most} bytes "
                                  f"(0: no ring), not {size}")


def _check_names(r: _Reader, item: dict, mmaps: set, gmems: set) -> dict:
    """An item's ``mmap`` and ``gmem`` name ones the file declares."""
    for key, names in (("mmap", mmaps), ("gmem", gmems)):
        if item.get(key) is not None and item[key] not in names:
            raise r.err(key, f"no [[{key}]] is named {item[key]!r} (declared: "
                             f"{', '.join(sorted(names)) or 'none'})")
    return item


_MEMSLOT_KEYS = {"slot", "gpa", "size", "mmap", "mmap_offset", "flags", "gmem", "gmem_offset",
                 "requires", "unless", "expect", "op", "label"}


def _memslot(r: _Reader) -> dict:
    return {"slot": r.get("slot", int), "gpa": r.get("gpa", int, 0), "size": r.get("size", int),
            "mmap": r.get("mmap", str, None), "mmap_offset": r.get("mmap_offset", int, 0),
            "flags": r.flags("flags", SLOT_FLAGS), "gmem": r.get("gmem", str, None),
            "gmem_offset": r.get("gmem_offset", int, 0),
            "requires": r.get("requires", list, []), "unless": r.get("unless", list, []),
            "expect": _expect(r),
            "label": r.get("label", str, "")}


_STEP_KEYS = {
    "access": {"gpa", "length", "data", "private", "count", "pattern", "span", "stride",
               "vcpu"},
    "convert": {"gpa", "size", "to"},
    "punch_hole": {"gmem", "offset", "length"},
    "host": {"mmap", "offset", "length", "prot", "data"},
    "get_dirty_log": {"slot"},
    "clear_dirty_log": {"slot", "first_page", "num_pages", "pages"},
    "memslot": _MEMSLOT_KEYS - {"op"},
    "pre_fault": {"gpa", "size", "vcpu"},
    "harvest_dirty_ring": {"vcpu"},
    "reset_dirty_rings": set(),
    "set_vcpu_events": {"vcpu", "smm"},
}
_COMMON_STEP_KEYS = {"op", "requires", "unless", "expect", "label"}
_EXPECT_KEYS = {"exit", "errno", "flags", "gpa", "size", "phys_addr", "is_write", "data",
                "dirty", "count", "young", "mapped_size"}


def _op_family(op: str) -> str | None:
    if op in ACCESS_OPS:
        return "access"
    if op in HOST_OPS:
        return "host"
    return op if op in _STEP_KEYS else None


def _expect(r: _Reader) -> dict | None:
    if "expect" not in r.t:
        return None
    e = _Reader(r.path, f"{r.item}: expect", r.t["expect"], _EXPECT_KEYS)
    out = {}
    if "exit" in e.t:
        out["exit"] = e.choice("exit", tuple(EXIT_KINDS))
    if "errno" in e.t:
        value = e.t["errno"]
        if isinstance(value, str) and value.upper() in ("EHWPOISON",):
            out["errno"] = EHWPOISON
        elif isinstance(value, str) and hasattr(_errno, value.upper()):
            out["errno"] = getattr(_errno, value.upper())
        elif isinstance(value, int) and not isinstance(value, bool):
            out["errno"] = value
        else:
            raise e.err("errno", f"must be an errno name like \"EINVAL\", not {value!r}")
    for key in ("flags", "gpa", "size", "phys_addr", "count", "mapped_size"):
        if key in e.t:
            out[key] = e.get(key, int)
    for key in ("is_write", "young"):
        if key in e.t:
            out[key] = e.get(key, bool)
    if "data" in e.t:
        out["data"] = _data(e, "data")
    if "dirty" in e.t:
        value = e.t["dirty"]
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise e.err("dirty", "must be a list of page offsets")
        out["dirty"] = value
    return out


def _data(r: _Reader, key: str) -> bytes:
    value = r.t[key]
    if not isinstance(value, str):
        raise r.err(key, f"must be a string (text, or hex as \"hex:00ff\"), not {value!r}")
    if value.startswith("hex:"):
        try:
            return bytes.fromhex(value[4:])
        except ValueError:
            raise r.err(key, f"{value!r} is not valid hex") from None
    return value.encode()


def _step(path: str, index: int, t, nr_vcpus: int) -> dict:
    if not isinstance(t, dict):
        raise ScenarioError(f"{_where(path, f'step {index}')}: must be a table")
    op = t.get("op")
    family = _op_family(op) if isinstance(op, str) else None
    if family is None:
        ops = sorted(set(ACCESS_OPS) | set(HOST_OPS) | set(_STEP_KEYS) - {"access", "host"})
        raise ScenarioError(f"{_where(path, f'step {index}', 'op')}: must be one of "
                            f"{', '.join(ops)}, not {op!r}")
    r = _Reader(path, f"step {index} ({op})", t, _STEP_KEYS[family] | _COMMON_STEP_KEYS)
    s = {"op": op, "family": family, "index": index, "requires": r.get("requires", list, []),
         "unless": r.get("unless", list, []), "expect": _expect(r),
         "label": r.get("label", str, "")}
    if "vcpu" in _STEP_KEYS[family]:
        s["vcpu"] = r.get("vcpu", int, 0)
        if s["vcpu"] >= nr_vcpus:
            raise r.err("vcpu", f"vcpu {s['vcpu']} does not exist ([vm] vcpus = {nr_vcpus})")
    if family == "access":
        s.update(gpa=r.get("gpa", int), length=r.get("length", int, 8),
                 private=r.get("private", bool, None), count=r.get("count", int, 1),
                 pattern=r.choice("pattern", ("sequential", "random"), "sequential"),
                 span=r.get("span", int, 0), stride=r.get("stride", int, 4096),
                 data=_data(r, "data") if "data" in t else None)
        if op != "write" and s["data"] is not None:
            raise r.err("data", "only a write carries data")
        for key in ("length", "count", "stride"):
            if s[key] == 0:
                raise r.err(key, "must be positive")
    elif family == "convert":
        s.update(gpa=r.get("gpa", int), size=r.get("size", int),
                 to=r.choice("to", ("private", "shared")))
    elif family == "punch_hole":
        s.update(gmem=r.get("gmem", str), offset=r.get("offset", int),
                 length=r.get("length", int))
    elif family == "host":
        s.update(mmap=r.get("mmap", str), offset=r.get("offset", int, 0),
                 length=r.get("length", int, 4096), prot=r.get("prot", str, "r"),
                 data=_data(r, "data") if "data" in t else b"host")
    elif family == "get_dirty_log":
        s.update(slot=r.get("slot", int))
    elif family == "clear_dirty_log":
        pages = t.get("pages", [])
        if not isinstance(pages, list) or not all(isinstance(p, int) for p in pages):
            raise r.err("pages", "must be a list of page offsets")
        s.update(slot=r.get("slot", int), first_page=r.get("first_page", int, 0),
                 num_pages=r.get("num_pages", int), pages=pages)
    elif family == "memslot":
        s.update(_memslot(r))
    elif family == "pre_fault":
        s.update(gpa=r.get("gpa", int), size=r.get("size", int))
    elif family == "set_vcpu_events":
        s.update(smm=r.get("smm", bool, None))
    return s


# --------------------------------------------------------------------------- running

@attrs.define
class Result:
    scenario: str
    arch: str
    vm_type: str
    steps_run: int = 0
    accesses: int = 0
    skipped: list = attrs.Factory(list)
    failures: list = attrs.Factory(list)
    exits: Counter = attrs.Factory(Counter)
    stats: dict = attrs.Factory(dict)
    mappings_by_size: dict = attrs.Factory(dict)
    table_bytes: int = 0
    wall_s: float = 0.0
    vm: object = None


def choose_vm_type(arch_info, scenario: Scenario) -> str:
    """The VM type claiming the most capabilities the scenario's items ask for (first in
    the backend's order on a tie)."""
    wanted = set()
    for item in scenario.mmaps + scenario.gmems + scenario.memslots + scenario.steps:
        wanted |= set(item["requires"])
    best, score = "default", -1
    for name, caps in arch_info.vm_types.items():
        s = len(wanted & caps)
        if s > score:
            best, score = name, s
    return best


def backend_class(arch) -> type:
    """The backend class ``arch`` names (plugins.resolve_backend), refused with ENODEV unless
    it carries an ArchInfo, as VM() refuses it: ``--arch kvmcore.vm:VM`` is not a backend."""
    from .plugins import resolve_backend

    if isinstance(arch, str) and ":" in arch and "" in arch.partition(":")[::2]:
        raise KvmError(_errno.ENODEV, f"arch={arch!r}: give module:Class")
    cls = resolve_backend(arch)
    if not isinstance(getattr(cls, "arch_info", None), ArchInfo):
        raise KvmError(_errno.ENODEV, f"arch={arch!r}: {cls!r} is not a backend (it has no "
                                      "ArchInfo)")
    return cls


class Runner:
    """Runs a Scenario on one backend; ``progress(advance)`` is called per access."""

    def __init__(self, scenario: Scenario, arch, vm_type: str | None = None,
                 seed: int | None = None, trace: bool = False,
                 progress: Callable[[int], None] | None = None):
        from .vm import VM, host_for

        self.s = scenario
        cls = backend_class(arch)
        if vm_type is None:
            vm_type = scenario.vm["vm_type"] or choose_vm_type(cls.arch_info, scenario)
        # The host's PAGE_SIZE is the base page the options ask for (granule=65536...).
        self.host = host_for(cls, scenario.vm["options"])
        self.vm = VM(arch=cls, vm_type=vm_type, host=self.host, trace=trace,
                     **scenario.vm["options"])
        self.rng = random.Random(scenario.vm["seed"] if seed is None else seed)
        self.progress = progress or (lambda n: None)
        self.hvas: dict[str, int] = {}
        self.gmems: dict = {}
        self.result = Result(scenario.name, self.vm.arch_info.name, vm_type, vm=self.vm)

    def total_accesses(self) -> int:
        return sum(s["count"] for s in self.s.steps if s["family"] == "access")

    def run(self) -> Result:
        """Set the VM up and run the steps. A memslot or step whose call fails is a failure of
        the result; a call the API refuses while setting up (the [vm] table, an mmap, a gmem)
        raises ScenarioError naming the item, as does a KvmError escaping a step."""
        t0 = time.perf_counter()
        vm, s = self.vm, self.s
        with self._refused("[vm]: key 'manual_protect'"):
            if s.vm["manual_protect"] or s.vm["initially_set"]:
                vm.enable_dirty_log_manual_protect(initially_set=s.vm["initially_set"])
        with self._refused("[vm]: key 'dirty_ring'"):
            if s.vm["dirty_ring"]:
                vm.enable_dirty_ring(s.vm["dirty_ring"])
        with self._refused("[vm]: key 'vcpus'"):
            self.vcpus = [vm.create_vcpu(i) for i in range(s.vm["vcpus"])]
        for i, m in enumerate(s.mmaps):
            if self._skip(m, f"mmap {m['name']}"):
                continue
            with self._refused(f"mmap {i + 1} ({m['name']})"):
                self.hvas[m["name"]] = self.host.mmap(m["length"], m["prot"], m["kind"],
                                                      m["thp"], m["pfn"])
        for i, g in enumerate(s.gmems):
            if self._skip(g, f"gmem {g['name']}"):
                continue
            with self._refused(f"gmem {i + 1} ({g['name']})"):
                self.gmems[g["name"]] = vm.create_guest_memfd(g["size"], g["flags"],
                                                               g["folio_order"])
        for i, m in enumerate(s.memslots):
            if self._skip(m, f"memslot {i + 1}"):
                continue
            self._guard(f"memslot {i + 1}", m["expect"], lambda m=m: self._set_memslot(m))
        for step in s.steps:
            name = f"step {step['index']} ({step['op']})"
            if self._skip(step, name):
                continue
            self.result.steps_run += 1
            with self._refused(name):
                getattr(self, f"_do_{step['family']}")(step, name)
        r = self.result
        r.stats = dict(vm.stats)
        r.mappings_by_size = dict(Counter(m.size for m in vm.mappings()))
        r.table_bytes = vm.page_table_bytes()
        r.wall_s = time.perf_counter() - t0
        return r

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _refused(self, name: str):
        """A KvmError out of ``name`` becomes a ScenarioError naming the file and the item."""
        try:
            yield
        except KvmError as e:
            raise ScenarioError(f"{self.s.path}: {name}: {e}") from e

    def _skip(self, item: dict, name: str) -> bool:
        """``requires``: skip unless the VM has them all; ``unless``: skip if it has any (the
        alternative an item offers to VMs without a capability)."""
        caps = self.vm.capabilities
        missing = [c for c in item["requires"] if c not in caps]
        if missing:
            self.result.skipped.append(f"{name}: needs {', '.join(missing)}")
        return bool(missing) or any(c in caps for c in item["unless"])

    def _fail(self, name: str, message: str) -> None:
        self.result.failures.append(f"{self.s.path}: {name}: {message}")

    def _guard(self, name: str, expect: dict | None, fn) -> object:
        """Run ``fn``; check an expected errno; report an unexpected KvmError."""
        want = (expect or {}).get("errno")
        try:
            out = fn()
        except KvmError as e:
            if want is None:
                self._fail(name, f"failed: {e}")
            elif e.errno != want:
                self._fail(name, f"expected errno {_errno.errorcode.get(want, want)}, got {e}")
            return None
        if want is not None:
            self._fail(name, f"expected errno {_errno.errorcode.get(want, want)}, it succeeded")
        return out

    def _set_memslot(self, m: dict) -> None:
        hva = self.hvas.get(m["mmap"], 0) + m["mmap_offset"] if m["mmap"] else 0
        gmem = self.gmems.get(m["gmem"]) if m["gmem"] else None
        flags = m["flags"] | (KVM_MEM_GUEST_MEMFD if gmem is not None else 0)
        if m["mmap"] and m["mmap"] not in self.hvas:
            raise KvmError(_errno.EFAULT, f"mmap {m['mmap']!r} was skipped or is unknown")
        self.vm.set_user_memory_region(m["slot"], m["gpa"], m["size"], hva, flags,
                                       guest_memfd=gmem, guest_memfd_offset=m["gmem_offset"])

    # ------------------------------------------------------------------ steps

    def _do_access(self, st: dict, name: str) -> None:
        vcpu = self.vcpus[st["vcpu"]]
        expect = st["expect"] or {}
        for i in range(st["count"]):
            if st["pattern"] == "random" and st["span"]:
                slots = max(st["span"] // st["stride"], 1)
                gpa = st["gpa"] + self.rng.randrange(slots) * st["stride"]
            else:
                gpa = st["gpa"] + i * st["stride"]
            data = st["data"]
            if st["op"] == "write" and data is None:
                data = gpa.to_bytes(8, "little")[: st["length"]].ljust(st["length"], b"\0")
            exit_ = None
            got = None
            try:
                if st["op"] == "read":
                    got = vcpu.read(gpa, st["length"], private=st["private"])
                elif st["op"] == "write":
                    vcpu.write(gpa, data, private=st["private"])
                else:
                    got = vcpu.fetch(gpa, private=st["private"], n=st["length"])
            except (MmioExit, MemoryFaultExit, HwPoisonSignal, DirtyRingFullExit,
                    GuestAbort) as e:
                exit_ = e
                self.result.exits[type(e).__name__] += 1
            except KvmError as e:
                self._fail(name, f"gpa {gpa:#x}: {e}")
                return
            self.result.accesses += 1
            self.progress(1)
            if expect and not self._check_access(name, gpa, expect, exit_, got):
                return

    def _check_access(self, name, gpa, expect, exit_, got) -> bool:
        want = expect.get("exit")
        if want is not None:
            cls = EXIT_KINDS[want]
            if (cls is None) != (exit_ is None) or (cls is not None
                                                    and not isinstance(exit_, cls)):
                got_exit = repr(exit_) if exit_ else "none"
                self._fail(name, f"gpa {gpa:#x}: expected exit {want}, got {got_exit}")
                return False
        if exit_ is not None:
            for key in ("flags", "gpa", "size", "phys_addr", "is_write"):
                if key in expect and getattr(exit_, key, None) != expect[key]:
                    self._fail(name, f"gpa {gpa:#x}: expected {key}={expect[key]!r}, got "
                                     f"{getattr(exit_, key, None)!r}")
                    return False
            if "errno" in expect and exit_.errno != expect["errno"]:
                self._fail(name, f"gpa {gpa:#x}: expected errno {expect['errno']}, got "
                                 f"{exit_.errno}")
                return False
        if "data" in expect and got != expect["data"]:
            self._fail(name, f"gpa {gpa:#x}: read {got!r}, expected {expect['data']!r}")
            return False
        if "mapped_size" in expect:
            leaf = self.vm.lookup(gpa, private=bool(self.vm.kvm_mem_is_private(gpa >> 12)))
            size = leaf.size if leaf else 0
            if size != expect["mapped_size"]:
                self._fail(name, f"gpa {gpa:#x}: mapped size {size:#x}, expected "
                                 f"{expect['mapped_size']:#x}")
                return False
        return True

    def _do_convert(self, st: dict, name: str) -> None:
        attrs_ = KVM_MEMORY_ATTRIBUTE_PRIVATE if st["to"] == "private" else 0
        self._guard(name, st["expect"], lambda: self.vm.set_memory_attributes(
            st["gpa"], st["size"], attrs_))

    def _do_punch_hole(self, st: dict, name: str) -> None:
        gmem = self.gmems.get(st["gmem"])
        if gmem is None:
            self._fail(name, f"gmem {st['gmem']!r} is unknown or was skipped")
            return
        self._guard(name, st["expect"], lambda: gmem.fallocate(
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, st["offset"], st["length"]))

    def _do_host(self, st: dict, name: str) -> None:
        if st["mmap"] not in self.hvas:
            self._fail(name, f"mmap {st['mmap']!r} is unknown or was skipped")
            return
        hva = self.hvas[st["mmap"]] + st["offset"]
        host, op = self.host, st["op"]
        calls = {
            "munmap": lambda: host.munmap(hva, st["length"]),
            "madvise_dontneed": lambda: host.madvise_dontneed(hva, st["length"]),
            "migrate": lambda: host.migrate(hva),
            "mprotect": lambda: host.mprotect(hva, st["length"], st["prot"]),
            "poison": lambda: host.poison(hva),
            "age": lambda: host.age(hva, st["length"]),
            "host_write": lambda: host.write(hva, st["data"]),
            "split_huge_page": lambda: host.split_huge_page(hva),
            "collapse_huge_page": lambda: host.collapse_huge_page(hva),
        }
        try:
            out = self._guard(name, st["expect"], calls[op])
        except (SigSegv, SigBus) as e:
            want = (st["expect"] or {}).get("exit")
            if want != type(e).__name__.lower():
                self._fail(name, f"the host access faulted: {e}")
            return
        expect = st["expect"] or {}
        if op == "age" and "young" in expect and out != expect["young"]:
            self._fail(name, f"age returned {out}, expected {expect['young']}")

    def _do_get_dirty_log(self, st: dict, name: str) -> None:
        pages = self._guard(name, st["expect"], lambda: self.vm.get_dirty_log(st["slot"]))
        self._check_pages(name, st["expect"], pages)

    def _check_pages(self, name, expect, pages) -> None:
        expect = expect or {}
        if pages is None:
            return
        if "dirty" in expect and pages != expect["dirty"]:
            shown = pages if len(pages) < 20 else f"{len(pages)} pages"
            self._fail(name, f"dirty pages {shown}, expected {expect['dirty']}")
        if "count" in expect and len(pages) != expect["count"]:
            self._fail(name, f"{len(pages)} dirty pages, expected {expect['count']}")

    def _do_clear_dirty_log(self, st: dict, name: str) -> None:
        self._guard(name, st["expect"], lambda: self.vm.clear_dirty_log(
            st["slot"], st["first_page"], st["num_pages"], st["pages"]))

    def _do_memslot(self, st: dict, name: str) -> None:
        self._guard(name, st["expect"], lambda: self._set_memslot(st))

    def _do_pre_fault(self, st: dict, name: str) -> None:
        self._guard(name, st["expect"], lambda: self.vcpus[st["vcpu"]].pre_fault_memory(
            st["gpa"], st["size"]))

    def _do_harvest_dirty_ring(self, st: dict, name: str) -> None:
        got = self._guard(name, st["expect"], lambda: self.vcpus[st["vcpu"]].harvest_dirty_ring())
        self._check_pages(name, st["expect"], None if got is None else [o for _s, o in got])

    def _do_set_vcpu_events(self, st: dict, name: str) -> None:
        self._guard(name, st["expect"], lambda: self.vcpus[st["vcpu"]].set_vcpu_events(
            smm=st["smm"]))

    def _do_reset_dirty_rings(self, st: dict, name: str) -> None:
        n = self._guard(name, st["expect"], self.vm.reset_dirty_rings)
        expect = st["expect"] or {}
        if n is not None and "count" in expect and n != expect["count"]:
            self._fail(name, f"reset {n} entries, expected {expect['count']}")
