import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _core_ready() -> bool:
    try:
        from kvmcore import VM  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


CORE_READY = _core_ready()


@pytest.fixture(params=[4096, 65536], ids=["4K", "64K"])
def page_size(request):
    return request.param


@pytest.fixture
def host(page_size):
    """A host whose PAGE_SIZE is the base page under test (64K: a 2 MiB PMD, as radix-64k)."""
    if not CORE_READY:
        pytest.skip("kvmcore.vm is not there yet")
    from kvmcore.vm import host_for

    from kvmcore_ppc_radix import PpcRadixBackend

    return host_for(PpcRadixBackend, {"page_size": page_size})


@pytest.fixture
def make_vm(host):
    from kvmcore import VM

    from kvmcore_ppc_radix import PpcRadixBackend

    def factory(**options):
        return VM(arch=PpcRadixBackend, host=host, **options)

    return factory
