"""The kvmcore command, through click's CliRunner."""

import json
import re

import pytest
from click.testing import CliRunner

from kvmcore import scenario as sc
from kvmcore.cli import main

FLAT = "kvmcore.testing:FlatBackend"


@pytest.fixture
def cli():
    return CliRunner()


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = """
[[mmap]]
name = "ram"
length = "4M"

[[memslot]]
slot = 0
size = "4M"
mmap = "ram"
"""


def test_run_builtin_prints_summary(cli):
    result = cli.invoke(main, ["run", "--arch", FLAT])
    assert result.exit_code == 0, result.output
    assert "confidential on flat (sw_protected)" in result.output
    assert "faults" in result.output and "mappings" in result.output


def test_run_json_summary_fields(cli):
    result = cli.invoke(main, ["run", "basic", "--arch", FLAT, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["failures"] == [] and summary["exits"] == {"MmioExit": 2}
    assert summary["accesses"] > 3000 and summary["mappings_by_size"]["2M"] > 0


@pytest.mark.parametrize("text, fragment", [
    (BASE + "[[step]]\nop = 'read'\ngpa = 0\nbogus = 1\n", "step 1 (read): key 'bogus': unknown"),
    (BASE + "[[step]]\nop = 'read'\ngpa = 'lots'\n", "step 1 (read): key 'gpa': must be a size"),
    (BASE + "[[step]]\nop = 'teleport'\n", "step 1: key 'op': must be one of"),
    (BASE + "[[step]]\nop = 'read'\ngpa = 0\nprivate = 'yes'\n", "key 'private': must be true"),
    ("[vm]\nvcpus = 0\n", "[vm]: key 'vcpus'"),
    (BASE + "[[step]]\nop = 'pre_fault'\ngpa = 0\nsize = 4096\nvcpu = 3\n",
     "step 1 (pre_fault): key 'vcpu': vcpu 3 does not exist"),
    (BASE + "[[step]]\nop = 'write'\ngpa = 0\nvcpu = 1\n",
     "step 1 (write): key 'vcpu': vcpu 1 does not exist"),
    (BASE + "[[step]]\nop = 'set_vcpu_events'\nsmm = 'on'\n", "key 'smm': must be"),
    ("[[mmap]]\nname = 'a'\nlength = 4096\nkind = 'weird'\n", "mmap 1: key 'kind'"),
    ("not toml = = 1", "not valid TOML"),
])
def test_bad_scenarios_one_line_exit_2(cli, tmp_path, text, fragment):
    path = write(tmp_path, text)
    result = cli.invoke(main, ["run", path, "--arch", FLAT])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and path in lines[0]
    assert "Traceback" not in result.output


def test_unknown_arch_and_vm_type(cli, tmp_path):
    path = write(tmp_path, BASE)
    for args, fragment in ((["--arch", "sparc_srmmu"], "not installed"),
                           (["--arch", FLAT, "--vm-type", "tdx"], "vm_type='tdx'")):
        result = cli.invoke(main, ["run", path, *args])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and fragment in result.output


def test_expectations_are_checked(cli, tmp_path):
    path = write(tmp_path, BASE + """
[[step]]
op = "write"
gpa = 0x1000
data = "hello"

[[step]]
op = "read"
gpa = 0x1000
length = 5
expect = { data = "hello" }

[[step]]
op = "read"
gpa = "1G"
length = 4
expect = { exit = "memory_fault" }
""")
    result = cli.invoke(main, ["run", path, "--arch", FLAT])
    assert result.exit_code == 1
    assert "step 3 (read): gpa 0x40000000: expected exit memory_fault, got MmioExit" \
        in result.output


def test_smm_steps(cli, tmp_path):
    """set_vcpu_events moves a vCPU to address space 1: the slot there (slot number with
    as_id 1 in bits 16+) serves it, and address space 0's data is back after it leaves."""
    path = write(tmp_path, BASE + """
[[mmap]]
name = "smram"
length = "1M"

[[memslot]]
slot = 65536
size = "1M"
mmap = "smram"

[[step]]
op = "write"
gpa = 0x1000
data = "normal"

[[step]]
op = "set_vcpu_events"
smm = true

[[step]]
op = "read"
gpa = 0x1000
length = 6
expect = { data = "hex:000000000000" }

[[step]]
op = "read"
gpa = "2M"
expect = { exit = "mmio" }

[[step]]
op = "set_vcpu_events"
smm = false

[[step]]
op = "read"
gpa = 0x1000
length = 6
expect = { data = "normal" }
""")
    result = cli.invoke(main, ["run", path, "--arch", FLAT])
    assert result.exit_code == 0, result.output


def test_errno_expectation(cli, tmp_path):
    path = write(tmp_path, BASE + """
[[step]]
op = "memslot"
slot = 1
gpa = "2M"
size = "4M"
mmap = "ram"
expect = { errno = "EEXIST" }
""")
    result = cli.invoke(main, ["run", path, "--arch", FLAT])
    assert result.exit_code == 0, result.output


def test_trace_is_json_lines_with_stable_names(cli, tmp_path):
    trace = tmp_path / "t.jsonl"
    result = cli.invoke(main, ["run", "--arch", FLAT, "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    names = {e["event"] for e in events}
    assert {"vm.create", "memslot.create", "fault.handled", "mmu.zap", "attributes.set",
            "notifier.invalidate_start", "gmem.punch_hole", "fault.exit"} <= names
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+", name) for name in names), names


def test_picture_is_an_image(cli, tmp_path):
    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    for path in (png, svg):
        result = cli.invoke(main, ["run", "basic", "--arch", FLAT, "--picture", str(path)])
        assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:400]
    result = cli.invoke(main, ["run", "basic", "--arch", FLAT, "--picture", "x.gif"])
    assert result.exit_code == 2


def test_archs_json(cli):
    result = cli.invoke(main, ["archs", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert isinstance(rows, list)
    for row in rows:
        assert {"arch", "distribution", "version", "vm_types", "page_sizes"} <= set(row)


def test_builtin_scenarios_parse():
    for name in sc.BUILTIN:
        scen = sc.load(name)
        assert scen.steps and scen.name == name


def test_new_arch_writes_a_plugin_that_works(cli, tmp_path, monkeypatch):
    target = tmp_path / "kvmcore-toy"
    result = cli.invoke(main, ["new-arch", "toy", "--dir", str(target)])
    assert result.exit_code == 0, result.output
    assert (target / "kvmcore_toy" / "backend.py").is_file()
    assert 'toy = "kvmcore_toy:ToyBackend"' in (target / "pyproject.toml").read_text()
    monkeypatch.syspath_prepend(str(target))
    from kvmcore import VM, HostMemory

    host = HostMemory()
    vm = VM(arch="kvmcore_toy:ToyBackend", host=host)
    vm.set_user_memory_region(0, 0, 1 << 21, host.mmap(1 << 21))
    vm.create_vcpu(0).write(0x5000, b"x")
    assert vm.arch_info.name == "toy" and vm.lookup(0x5000).raw & 1
    vm.check_invariants()
    again = cli.invoke(main, ["new-arch", "toy", "--dir", str(target)])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = cli.invoke(main, ["new-arch", "Bad-Name", "--dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "NAME" in bad.output


def test_vm_options_choose_the_host_page_size(cli, tmp_path):
    """[vm] options that ask for a 64 KiB base page run on a 64 KiB host (it used to be a
    4 KiB host, and the VM refused it); a sub-page memslot then fails with Linux's EINVAL."""
    text = "[vm]\noptions = { page_size = 65536 }\n" + BASE + (
        "[[step]]\nop = 'write'\ngpa = '0x10008'\ndata = 'ab'\n")
    result = cli.invoke(main, ["run", write(tmp_path, text), "--arch", FLAT, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["failures"] == []
    bad = text.replace('size = "4M"', 'size = "4K"').replace('length = "4M"', 'length = "64K"')
    result = cli.invoke(main, ["run", write(tmp_path, bad, "bad.toml"), "--arch", FLAT])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "memslot 1: failed: [EINVAL] memory_size=0x1000 is not aligned to PAGE_SIZE" in (
        result.output)
