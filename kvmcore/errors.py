"""KvmError: what an ioctl's -1/errno becomes in this model."""

from __future__ import annotations

import errno as _errno
import os

# EHWPOISON is Linux's 133; Python exposes it on Linux only.
EHWPOISON = getattr(_errno, "EHWPOISON", 133)


class KvmError(OSError):
    """A failed KVM call. ``errno`` is Linux's; the message names the argument and why.

    A call that raises ``KvmError`` has changed nothing in the model.
    """

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, "EHWPOISON" if self.errno == EHWPOISON else "?")
        return f"[{name}] {self.strerror}"


class FaultLivelock(KvmError):
    """A guest access whose fault kept retrying without progress (EAGAIN): Linux's vCPU
    would re-enter the guest and fault again for ever. The race explorer reports it as a
    livelock."""


class InvariantError(AssertionError):
    """``vm.check_invariants()`` found model state that Linux forbids; ``problems`` lists it."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))


def strerror(err: int) -> str:
    return os.strerror(err)
