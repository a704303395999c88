import pytest

from kvmcore import VM, HostMemory
from kvmcore.testing import FlatBackend

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def host():
    return HostMemory()


@pytest.fixture
def make_vm(host):
    made = []

    def make(vm_type="default", **kw):
        vm = VM(arch=FlatBackend, vm_type=vm_type, host=host, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        if not vm.closed:
            vm.check_invariants()


@pytest.fixture
def vm(make_vm):
    return make_vm()


@pytest.fixture
def pvm(make_vm):
    """A VM with private memory (software-protected)."""
    return make_vm("sw_protected")


def snapshot(vm):
    """Everything a failed call must leave unchanged."""
    slots = [(s.as_id, s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr, s.gmem_file,
              s.gmem_pgoff) for s in vm.all_memslots()]
    attrs = list(vm.attributes.runs())
    bindings = [list(g.bindings) for g in vm.gmem_files]
    return slots, attrs, bindings, list(vm.mappings()), [s.generation for s in vm.memslot_sets]
