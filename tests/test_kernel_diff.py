"""The model against the running kernel's /dev/kvm (issue 18): the same VM-level ioctls on
both, compared call by call. Skipped where /dev/kvm is absent or unusable, or x86_tdp is not
installed (the model side is x86_tdp configured like the kernel)."""

import errno

import pytest

from kvmcore.kernel import kvmdev

pytest.importorskip("kvmcore_x86_tdp", reason="the differential test runs the x86_tdp model")
_OK, _WHY = kvmdev.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"no usable /dev/kvm: {_WHY}")

#: Generated calls compared here (about 10 s on a 2-core machine); ``kvmcore diff --calls N``
#: runs more.
GENERATED_CALLS = 2000


@pytest.fixture(scope="module")
def differ():
    from kvmcore.kernel.diff import Differ

    with Differ() as d:
        yield d


def test_configured_model_answers_check_extension_like_the_kernel(differ):
    from kvmcore import VM
    from kvmcore.kernel.profile import model_profile

    vm = VM("x86_tdp", **differ.vm_kwargs)
    assert model_profile(vm) == differ.profile.vm


def test_hand_corpus_agrees(differ):
    from kvmcore.kernel.diff import run_hand_corpus

    before = len(differ.differences)
    assert run_hand_corpus(differ) > 150
    assert [d.format() for d in differ.differences[before:]] == []


def test_generated_sequences_agree(differ):
    from kvmcore.kernel.diff import run_generated

    before = len(differ.differences)
    assert run_generated(differ, GENERATED_CALLS, seed=0) >= GENERATED_CALLS
    assert [d.format() for d in differ.differences[before:]] == []


def test_a_difference_is_found_and_shrunk(differ):
    """A model configured unlike the kernel (PML on: a 4 KiB dirty ring is too small for its
    512 reserved entries) is caught, with a one-call sequence after shrinking."""
    from kvmcore.kernel.diff import Differ, run_generated

    with Differ(differ.profile) as wrong:
        if differ.profile.ring_min_bytes != 4096:
            pytest.skip("this kernel has PML: the planted difference would not be one")
        wrong.vm_kwargs = dict(wrong.vm_kwargs, pml=True)
        run_generated(wrong, GENERATED_CALLS, seed=0, max_calls=4)
        assert len(wrong.differences) == 1
        found = wrong.differences[0]
        assert found.sequence[found.index][0] == "enable_cap"
        assert found.kernel == ("ok", None) and found.model == ("err", "EINVAL")
        assert found.index == 0


def test_binding_closes_its_fds():
    import os

    from kvmcore import uapi

    before = len(os.listdir("/proc/self/fd"))
    with kvmdev.Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        # A kernel built without guest_memfd answers the ioctl with ENOTTY; its fd is not
        # opened then, so only the vCPU's is checked.
        if vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
            gmem = vm.create_guest_memfd(1 << 20)
            with pytest.raises(OSError) as e:
                gmem.fallocate(0, 0, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
            gmem.close()
        else:
            with pytest.raises(OSError) as e:
                vm.create_guest_memfd(1 << 20)
            assert e.value.errno == errno.ENOTTY
        vcpu.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_cli_diff_and_archs_kernel():
    from click.testing import CliRunner

    from kvmcore.cli import main

    r = CliRunner().invoke(main, ["diff", "--calls", "100"])
    assert r.exit_code == 0, r.output
    assert "0 differences" in r.output and "KVM_SET_USER_MEMORY_REGION2" in r.output
    r = CliRunner().invoke(main, ["archs", "--kernel"])
    assert r.exit_code == 0, r.output
    assert "differs" not in r.output and "MULTI_ADDRESS_SPACE" in r.output
