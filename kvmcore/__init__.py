"""kvmcore: an executable, pluggable model of the Linux KVM MMU.

The public surface is described in API.md: ``VM``, ``HostMemory``, the exits and errors, and
``hookimpl`` for backends and extensions.
"""

from __future__ import annotations

import pluggy

from .arch import ArchInfo, Mapping, VmOption
from .errors import InvariantError, KvmError
from .exits import (DirtyRingFullExit, GuestAbort, HwPoisonSignal, MemoryFaultExit, MmioExit,
                    VcpuExit)

__version__ = "0.1.0"

#: Marker for backend and extension hook implementations (``@kvmcore.hookimpl``).
hookimpl = pluggy.HookimplMarker("kvmcore")

_LAZY = {"VM": "vm", "Vcpu": "vm", "HostMemory": "host", "GuestMemfd": "gmem"}


def __getattr__(name: str):
    # VM and HostMemory pull in the whole core; backends that only need ``hookimpl`` and the
    # records do not pay for it at import time.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kvmcore' has no attribute {name!r}")


__all__ = ["VM", "Vcpu", "HostMemory", "GuestMemfd", "ArchInfo", "Mapping", "VmOption", "KvmError",
           "InvariantError", "VcpuExit", "MemoryFaultExit", "MmioExit", "DirtyRingFullExit",
           "HwPoisonSignal", "GuestAbort", "hookimpl"]
