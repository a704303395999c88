"""Argument checks of the public calls (VM, Vcpu, HostMemory, GuestMemfd).

The rule (docs/api.md, "Arguments"): an argument of the wrong Python type is a programming
error and raises ``TypeError`` naming the argument; a value of the right type that Linux would
refuse raises ``KvmError`` with Linux's errno. Both happen before anything changes. ``bool`` is
not an integer argument, and an integer is not a flag: a C caller cannot confuse them, so the
model does not reinterpret one as the other.

Each helper returns the value it checked, so a caller writes ``gpa = u64("gpa", gpa)``.
"""

from __future__ import annotations

import errno

from .errors import KvmError

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


def _type_error(name: str, value, what: str) -> TypeError:
    return TypeError(f"{name} must be {what}, not {type(value).__name__} ({value!r:.60})")


def integer(name: str, value) -> int:
    """An int (not a bool), any value: the callee checks its range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _type_error(name, value, "an int")
    return value


def unsigned(name: str, value, bits: int = 64) -> int:
    """An int that fits in a C ``u<bits>``. A negative or too large value is EINVAL: Linux
    would read the wrapped value, which every check of these calls refuses."""
    integer(name, value)
    if not 0 <= value < 1 << bits:
        raise KvmError(errno.EINVAL, f"{name}={value!r} does not fit in a u{bits}")
    return value


def u64(name: str, value) -> int:
    return unsigned(name, value, 64)


def u32(name: str, value) -> int:
    return unsigned(name, value, 32)


def flag(name: str, value) -> bool:
    """A bool: ``"yes"``, ``"no"``, 0 or 1 are not taken as truth values."""
    if value is not True and value is not False:
        raise _type_error(name, value, "a bool")
    return value


def optional_flag(name: str, value) -> bool | None:
    """None ("as the VM decides") or a bool."""
    if value is None:
        return None
    return flag(name, value)


def buffer(name: str, value) -> bytes:
    """Bytes to store: bytes, bytearray or memoryview (an int is not a length here)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _type_error(name, value, "bytes-like")
    return bytes(value)


def string(name: str, value) -> str:
    if not isinstance(value, str):
        raise _type_error(name, value, "a str")
    return value


def function(name: str, value):
    if not callable(value):
        raise _type_error(name, value, "callable")
    return value
