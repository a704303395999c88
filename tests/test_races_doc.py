"""docs/races.md: the seed-1 walkthrough runs as written (its asserts are the checks)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "races.md"


def _blocks():
    return [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
            if "import" in b]


def test_the_walkthrough_runs():
    pytest.importorskip("kvmcore_x86_tdp", reason="the walkthrough uses the x86_tdp backend")
    blocks = _blocks()
    assert blocks, "no runnable example in docs/races.md"
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {})


def _seed1_schedule():
    """The walkthrough's schedule, without its asserts: the fault passes the seq snapshot,
    the conversion zaps and stores, the fault goes on, then the conversion ends."""
    from kvmcore import VM, HostMemory
    from kvmcore.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE

    host = HostMemory()
    vm = VM(arch="x86_tdp", vm_type="sw_protected", host=host)
    gmem = vm.create_guest_memfd(1 << 21)
    vm.set_user_memory_region(0, 0, 1 << 21, host.mmap(1 << 21), KVM_MEM_GUEST_MEMFD,
                              guest_memfd=gmem)
    vm.set_memory_attributes(0, 1 << 21, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    fault = vm.create_vcpu(0).steps.read(0x5000, 8, private=True)
    convert = vm.steps.set_memory_attributes(0x5000, 0x1000, 0)
    next(fault)
    next(fault)
    for _ in range(3):
        next(convert)
    while fault.runnable and not fault.done:
        next(fault, None)
    convert.run()
    if not fault.done:
        fault.run()
    return vm


def test_the_schedule_is_clean_with_linux_staleness_check():
    pytest.importorskip("kvmcore_x86_tdp", reason="the walkthrough uses the x86_tdp backend")
    _seed1_schedule().check_invariants()


def test_the_schedule_fails_without_the_staleness_check(monkeypatch):
    """The point the doc makes: without is_page_fault_stale the fault installs the
    guest_memfd page for gfn 5, and once the conversion ends that leaf maps a shared gfn to
    private memory (sw_protected VMs have one root for both)."""
    pytest.importorskip("kvmcore_x86_tdp", reason="the walkthrough uses the x86_tdp backend")
    import kvmcore.fault
    from kvmcore import InvariantError

    monkeypatch.setattr(kvmcore.fault, "is_page_fault_stale", lambda vm, fault: False)
    vm = _seed1_schedule()
    leaf = vm.lookup(0x5000)
    assert leaf is not None and not vm.host.lookup_pte(0x1_0000_5000)
    with pytest.raises(InvariantError, match="leaf gfn 0x5 .* maps pfn"):
        vm.check_invariants()


def test_the_readme_example_runs(capsys):
    pytest.importorskip("kvmcore_x86_tdp", reason="the README example uses the x86_tdp backend")
    readme = DOC.parent.parent / "README.md"
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    exec(compile(code, str(readme), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["pf_seq_snapshot pf_lock_wait",
                       "gmem_inval_lock_wait gmem_begin_lock_wait gmem_begin_done",
                       "pf_retry_wait", "False ['gmem_invalidate_lock(write)']", "1"]
