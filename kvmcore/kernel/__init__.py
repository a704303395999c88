"""The running kernel's KVM, for differential testing of the model (issue 18).

``kvmdev`` binds the VM-level ioctls of /dev/kvm (ctypes structs with the layouts of
include/uapi/linux/kvm.h); ``profile`` reads the kernel's KVM_CHECK_EXTENSION answers into a
``KernelProfile`` from which a model VM configured like that kernel is built; ``diff`` runs the
same call sequences on both and compares errno and returned values.
"""
