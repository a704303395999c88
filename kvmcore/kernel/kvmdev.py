"""A ctypes/fcntl binding of KVM's VM-level ioctls on /dev/kvm.

Struct layouts follow include/uapi/linux/kvm.h; ioctl numbers are computed with the
asm-generic _IO/_IOW/_IOWR encoding, as the header does. Only VM-level calls are bound (no
KVM_RUN, no guest): KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_SET_USER_MEMORY_REGION(2),
KVM_CREATE_GUEST_MEMFD (+ fallocate on its fd), KVM_SET_MEMORY_ATTRIBUTES, KVM_GET_DIRTY_LOG,
KVM_CLEAR_DIRTY_LOG, KVM_ENABLE_CAP, KVM_CREATE_VCPU, KVM_PRE_FAULT_MEMORY.

Every call raises ``OSError`` with the kernel's errno on failure. Every fd is owned by an
object with ``close()`` (and context-manager support) so that callers close what they open.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from ctypes import c_uint32, c_uint64

KVM_DEVICE = "/dev/kvm"
KVMIO = 0xAE

# asm-generic/ioctl.h
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:  # noqa: N802 (Linux's name)
    return ((direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(typ: int, nr: int) -> int:  # noqa: N802
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOW(typ: int, nr: int, struct) -> int:  # noqa: N802
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(struct))


def _IOWR(typ: int, nr: int, struct) -> int:  # noqa: N802
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(struct))


class kvm_userspace_memory_region(ctypes.Structure):  # noqa: N801 (uapi names)
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64)]


class kvm_userspace_memory_region2(ctypes.Structure):  # noqa: N801
    _fields_ = [("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
                ("memory_size", c_uint64), ("userspace_addr", c_uint64),
                ("guest_memfd_offset", c_uint64), ("guest_memfd", c_uint32),
                ("pad1", c_uint32), ("pad2", c_uint64 * 14)]


class kvm_dirty_log(ctypes.Structure):  # noqa: N801
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):  # noqa: N801
    _fields_ = [("slot", c_uint32), ("num_pages", c_uint32), ("first_page", c_uint64),
                ("dirty_bitmap", c_uint64)]


class kvm_enable_cap(ctypes.Structure):  # noqa: N801
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", ctypes.c_uint8 * 64)]


class kvm_memory_attributes(ctypes.Structure):  # noqa: N801
    _fields_ = [("address", c_uint64), ("size", c_uint64), ("attributes", c_uint64),
                ("flags", c_uint64)]


class kvm_create_guest_memfd(ctypes.Structure):  # noqa: N801
    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


class kvm_pre_fault_memory(ctypes.Structure):  # noqa: N801
    _fields_ = [("gpa", c_uint64), ("size", c_uint64), ("flags", c_uint64),
                ("padding", c_uint64 * 5)]


KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xc7)
KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xd2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xd4, kvm_create_guest_memfd)
KVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xd5, kvm_pre_fault_memory)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _ioctl_struct(fd: int, request: int, struct: ctypes.Structure) -> int:
    """ioctl(2) with ``struct`` passed by reference (in and out); its result, or OSError."""
    buf = bytearray(bytes(struct))
    r = fcntl.ioctl(fd, request, buf, True)
    ctypes.memmove(ctypes.addressof(struct), bytes(buf), len(buf))
    return r


def available(path: str | None = None) -> tuple[bool, str]:
    """Whether /dev/kvm (or ``path``) can be used here: (True, "") or (False, the reason)."""
    path = path or KVM_DEVICE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{path}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != 12:
            return False, f"{path}: KVM_GET_API_VERSION is {version}, not 12"
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            return False, f"{path}: KVM_CREATE_VM failed: {e.strerror}"
        os.close(vm)
        return True, ""
    except OSError as e:
        return False, f"{path}: {e.strerror}"
    finally:
        os.close(fd)


class _Fd:
    """An owned file descriptor."""

    def __init__(self, fd: int):
        self.fd = fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except (OSError, TypeError, AttributeError):  # at interpreter exit
            pass

    def fileno(self) -> int:
        if self.fd < 0:
            raise OSError(errno.EBADF, "closed")
        return self.fd


class Kvm(_Fd):
    """The /dev/kvm system fd."""

    def __init__(self, path: str = KVM_DEVICE):
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def api_version(self) -> int:
        return fcntl.ioctl(self.fileno(), KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd."""
        return fcntl.ioctl(self.fileno(), KVM_CHECK_EXTENSION, cap)

    def create_vm(self, vm_type: int = 0) -> KvmVm:
        """KVM_CREATE_VM."""
        return KvmVm(fcntl.ioctl(self.fileno(), KVM_CREATE_VM, vm_type))


class GuestMemfd(_Fd):
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the guest_memfd."""
        if _libc.fallocate(self.fileno(), mode, offset, length) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))


class KvmVcpu(_Fd):
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY: the unprocessed (gpa, size) as the kernel writes them back."""
        arg = kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
        _ioctl_struct(self.fileno(), KVM_PRE_FAULT_MEMORY, arg)
        return arg.gpa, arg.size


class KvmVm(_Fd):
    """A VM fd."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (KVM_CAP_CHECK_EXTENSION_VM)."""
        return fcntl.ioctl(self.fileno(), KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        arg = kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size,
                                          userspace_addr)
        _ioctl_struct(self.fileno(), KVM_SET_USER_MEMORY_REGION, arg)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2."""
        arg = kvm_userspace_memory_region2(slot=slot, flags=flags,
                                           guest_phys_addr=guest_phys_addr,
                                           memory_size=memory_size,
                                           userspace_addr=userspace_addr,
                                           guest_memfd_offset=guest_memfd_offset,
                                           guest_memfd=guest_memfd)
        _ioctl_struct(self.fileno(), KVM_SET_USER_MEMORY_REGION2, arg)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD."""
        arg = kvm_create_guest_memfd(size=size, flags=flags)
        return GuestMemfd(_ioctl_struct(self.fileno(), KVM_CREATE_GUEST_MEMFD, arg))

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        arg = kvm_memory_attributes(address, size, attributes, flags)
        _ioctl_struct(self.fileno(), KVM_SET_MEMORY_ATTRIBUTES, arg)

    def get_dirty_log(self, slot: int, npages: int) -> list[int]:
        """KVM_GET_DIRTY_LOG into a bitmap of ``npages`` bits (rounded up to longs, as
        kvm_dirty_bitmap_bytes); returns the set bits, ascending."""
        nbytes = max(8, ((npages + 63) // 64) * 8)
        bitmap = ctypes.create_string_buffer(nbytes)
        arg = kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl_struct(self.fileno(), KVM_GET_DIRTY_LOG, arg)
        bits = int.from_bytes(bitmap.raw, "little")
        return [i for i in range(nbytes * 8) if bits >> i & 1]

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, pages) -> None:
        """KVM_CLEAR_DIRTY_LOG; ``pages`` are slot-relative offsets, the bitmap starts at
        ``first_page``."""
        # KVM copies ALIGN(num_pages, 64) / 8 bytes once the range is valid; a range too big
        # for any slot fails before that, so the buffer is capped.
        nbytes = min(max(8, ((num_pages + 63) // 64) * 8), 1 << 20)
        bits = 0
        for p in pages:
            bits |= 1 << (p - first_page)
        bitmap = ctypes.create_string_buffer(bits.to_bytes(nbytes, "little"), nbytes)
        arg = kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                  dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl_struct(self.fileno(), KVM_CLEAR_DIRTY_LOG, arg)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """KVM_ENABLE_CAP on the VM fd."""
        a = list(args) + [0] * (4 - len(args))
        arg = kvm_enable_cap(cap=cap, flags=flags, args=(c_uint64 * 4)(*a))
        return _ioctl_struct(self.fileno(), KVM_ENABLE_CAP, arg)

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        """KVM_CREATE_VCPU."""
        return KvmVcpu(fcntl.ioctl(self.fileno(), KVM_CREATE_VCPU, vcpu_id))

    def reset_dirty_rings(self) -> int:
        return fcntl.ioctl(self.fileno(), KVM_RESET_DIRTY_RINGS, 0)
