"""KVM's uapi constants, with Linux's own names and values.

Sources: include/uapi/linux/kvm.h, include/linux/kvm_host.h and
Documentation/virt/kvm/api.rst (see shared/reference/core.md §1, §3, §4, §5, §6, §10).
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

# Memslot flags visible to userspace (bits 0-15).
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
# Internal memslot flags (bits 16-31, kvm_host.h).
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEMSLOT_GMEM_ONLY = 1 << 17

KVM_MEM_SLOTS_NUM = 32767  # SHRT_MAX
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1

# enum kvm_mr_change
KVM_MR_CREATE = 0
KVM_MR_DELETE = 1
KVM_MR_MOVE = 2
KVM_MR_FLAGS_ONLY = 3

# Memslot generation: bit 63 marks an update in flux.
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63

# guest_memfd
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# Memory attributes
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# enum kvm_gfn_range_filter
KVM_FILTER_SHARED = 1 << 0
KVM_FILTER_PRIVATE = 1 << 1

# KVM_EXIT_MEMORY_FAULT
KVM_EXIT_MMIO = 6
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_MEMORY_FAULT = 39
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# Dirty logging
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3
KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
KVM_DIRTY_GFN_SIZE = 16  # sizeof(struct kvm_dirty_gfn)

# Capabilities (numbers as in kvm.h)
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

# Error pfns (kvm_host.h)
KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_NOSLOT_MASK = 0xFFF << 52
KVM_PFN_NOSLOT = 1 << 63
KVM_PFN_ERR_FAULT = KVM_PFN_ERR_MASK + 0
KVM_PFN_ERR_HWPOISON = KVM_PFN_ERR_MASK + 1
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2
KVM_PFN_ERR_SIGPENDING = KVM_PFN_ERR_MASK + 3
KVM_PFN_ERR_NEEDS_IO = KVM_PFN_ERR_MASK + 4


def is_error_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_MASK)


def is_error_noslot_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_NOSLOT_MASK)


def is_noslot_pfn(pfn: int) -> bool:
    return pfn == KVM_PFN_NOSLOT


# Fault-handler return codes (arch/x86/kvm/mmu/mmu_internal.h); the core uses them for every
# backend because they name the outcomes every architecture has.
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_WRITE_PROTECTED = 3
RET_PF_INVALID = 4
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6

# Sizes
SZ_4K = 1 << 12
SZ_16K = 1 << 14
SZ_64K = 1 << 16
SZ_2M = 1 << 21
SZ_32M = 1 << 25
SZ_512M = 1 << 29
SZ_1G = 1 << 30
