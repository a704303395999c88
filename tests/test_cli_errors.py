"""Bad input to the kvmcore command, as a new user gives it: each ends in one line
``kvmcore: error: ...`` on stderr and exit code 2, never a traceback (issue 17, item 10)."""

import sys

import pytest
from click.testing import CliRunner

from kvmcore import scenario as sc
from kvmcore.cli import main
from kvmcore.plugins import installed_backends

FLAT = "kvmcore.testing:FlatBackend"

RAM = """
[[mmap]]
name = "ram"
length = "4M"

[[memslot]]
slot = 0
size = "4M"
mmap = "ram"
"""
GMEM = "[vm]\nvm_type = 'sw_protected'\n[[gmem]]\nname = 'g'\n"
BIG_PAGE = "[vm]\noptions = { page_size = 65536 }\n"

# (id, scenario text, fragment of the one line). Values every backend's API refuses are
# refused when the file is read (naming the item and the key); values only this VM refuses
# (a 64 KiB PAGE_SIZE, a VM type without guest_memfd) when the run reaches them.
BAD_SCENARIOS = [
    ("mmap-length", "[[mmap]]\nname = 'a'\nlength = 12345\n", "mmap 1: key 'length'"),
    ("mmap-length-zero", "[[mmap]]\nname = 'a'\nlength = 0\n", "mmap 1: key 'length'"),
    ("mmap-hugetlb-length", "[[mmap]]\nname = 'a'\nlength = 4096\nkind = 'hugetlb_2m'\n",
     "mmap 1: key 'length': must be a positive multiple of 0x200000"),
    ("mmap-prot", "[[mmap]]\nname = 'a'\nlength = 4096\nprot = 'rwz'\n", "mmap 1: key 'prot'"),
    ("pfnmap-without-pfn", "[[mmap]]\nname = 'a'\nlength = 4096\nkind = 'pfnmap'\n",
     "mmap 1: key 'pfn': is required"),
    ("pfn-on-anon", "[[mmap]]\nname = 'a'\nlength = 4096\npfn = 16\n",
     "mmap 1: key 'pfn': is only for kind 'pfnmap'"),
    ("thp-on-shared", "[[mmap]]\nname = 'a'\nlength = 4096\nkind = 'shared'\nthp = true\n",
     "mmap 1: key 'thp'"),
    ("gmem-size", GMEM + "size = 12345\n", "gmem 1: key 'size'"),
    ("gmem-folio-order", GMEM + "size = 4096\nfolio_order = 40\n", "gmem 1: key 'folio_order'"),
    ("gmem-folio-divides", GMEM + "size = 8192\nfolio_order = 9\n", "gmem 1: key 'folio_order'"),
    ("gmem-name-twice", GMEM + "size = 4096\n[[gmem]]\nname = 'g'\nsize = 4096\n",
     "gmem 2: key 'name': 'g' is used twice"),
    ("dirty-ring-not-pow2", "[vm]\ndirty_ring = 12345\n", "[vm]: key 'dirty_ring'"),
    ("dirty-ring-below-page", "[vm]\ndirty_ring = 2048\n", "[vm]: key 'dirty_ring'"),
    ("dirty-ring-too-big", "[vm]\ndirty_ring = '2M'\n", "[vm]: key 'dirty_ring'"),
    ("step-unknown-mmap", RAM + "[[step]]\nop = 'munmap'\nmmap = 'nope'\n",
     "step 1 (munmap): key 'mmap': no [[mmap]] is named 'nope'"),
    ("memslot-unknown-mmap", "[[memslot]]\nslot = 0\nsize = 4096\nmmap = 'nope'\n",
     "memslot 1: key 'mmap': no [[mmap]] is named 'nope'"),
    ("memslot-unknown-gmem", RAM + "[[memslot]]\nslot = 1\ngpa = '1G'\nsize = 4096\n"
                                   "mmap = 'ram'\ngmem = 'nope'\n",
     "memslot 2: key 'gmem': no [[gmem]] is named 'nope'"),
    ("punch-hole-unknown-gmem",
     RAM + "[[step]]\nop = 'punch_hole'\ngmem = 'nope'\noffset = 0\nlength = 4096\n",
     "step 1 (punch_hole): key 'gmem'"),
    ("random-stride-zero",
     RAM + "[[step]]\nop = 'read'\ngpa = 0\npattern = 'random'\nspan = 4096\nstride = 0\n",
     "step 1 (read): key 'stride': must be positive"),
    # Refused by this VM, at run time.
    ("run-mmap-64k-host", BIG_PAGE + "[[mmap]]\nname = 'a'\nlength = 4096\n",
     "mmap 1 (a): [EINVAL] length=4096"),
    ("run-gmem-64k-host", BIG_PAGE.replace("[vm]", "[vm]\nvm_type = 'sw_protected'")
     + "[[gmem]]\nname = 'g'\nsize = 4096\n", "gmem 1 (g): [EINVAL] size=0x1000"),
    ("run-dirty-ring-below-64k-page", BIG_PAGE + "dirty_ring = 4096\n",
     "[vm]: key 'dirty_ring': [EINVAL]"),
]


def one_line_error(result, fragment: str = "") -> str:
    """The command failed as a user's mistake: exit 2, one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmcore: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cli():
    return CliRunner()


@pytest.mark.parametrize("text, fragment", [c[1:] for c in BAD_SCENARIOS],
                         ids=[c[0] for c in BAD_SCENARIOS])
def test_bad_scenario_values(cli, tmp_path, text, fragment):
    path = tmp_path / "s.toml"
    path.write_text(text)
    line = one_line_error(cli.invoke(main, ["run", str(path), "--arch", FLAT]), fragment)
    assert str(path) in line


def test_non_utf8_scenario(cli, tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    line = one_line_error(cli.invoke(main, ["run", str(path), "--arch", FLAT]),
                          "not UTF-8 text (byte 0xff at offset 8)")
    assert str(path) in line


@pytest.mark.parametrize("args, fragment", [
    (["run", "--arch", "kvmcore.vm:VM"], "is not a backend"),
    (["run", "--arch", "os:path"], "is not a backend"),
    (["run", "--arch", ":"], "give module:Class"),
    (["bench", "--arch", "sparc64"], "--arch sparc64: arch='sparc64' is not installed"),
    (["bench", "--arch", "kvmcore.vm:VM"], "--arch kvmcore.vm:VM:"),
    (["run", "--arch", FLAT, "--trace", "/nonexistent-dir/t.jsonl"],
     "--trace /nonexistent-dir/t.jsonl: cannot write it"),
    (["run", "--arch", FLAT, "--picture", "/nonexistent-dir/m.png"],
     "--picture /nonexistent-dir/m.png: its directory does not exist"),
], ids=["run-not-a-backend", "run-a-module", "run-empty-module", "bench-unknown-arch",
        "bench-not-a-backend", "trace-missing-dir", "picture-missing-dir"])
def test_bad_arguments(cli, args, fragment):
    one_line_error(cli.invoke(main, args), fragment)


def test_conformance_unknown_arch_fails_before_pytest(cli, monkeypatch):
    """One line before the suite starts, instead of erroring every test."""
    import pytest as real_pytest

    calls = []
    monkeypatch.setattr(real_pytest, "main", lambda args: calls.append(args) or 0)
    for name in ("sparc64", "kvmcore.vm:VM"):
        one_line_error(cli.invoke(main, ["conformance", "--arch", name]), f"--arch {name}:")
    assert calls == []
    cli.invoke(main, ["conformance", "--arch", FLAT, "-k", "nothing"])
    assert calls == [["-p", "kvmcore.conformance", "--arch", FLAT, "-k", "nothing"]]


@pytest.mark.parametrize("missing", ["pytest", "hypothesis"])
def test_conformance_without_its_test_extra(cli, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # "import missing" raises ImportError
    one_line_error(cli.invoke(main, ["conformance"]), "pip install 'kvmcore[test]'")


def test_picture_without_matplotlib_is_refused_before_the_run(cli, tmp_path, monkeypatch):
    """Refused before the run, so that a long run's summary is not computed and then lost."""
    runs = []
    monkeypatch.setattr(sc.Runner, "run", lambda self: runs.append(self))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli.invoke(main, ["run", "basic", "--arch", FLAT, "--picture",
                               str(tmp_path / "m.png")])
    one_line_error(result, "--picture needs matplotlib (pip install 'kvmcore[picture]')")
    assert runs == []


@pytest.mark.skipif(not installed_backends(), reason="no backend installed")
def test_new_arch_refuses_an_installed_backend_name(cli, tmp_path):
    name = next(iter(installed_backends()))
    one_line_error(cli.invoke(main, ["new-arch", name, "--dir", str(tmp_path / "p")]),
                   f"NAME {name!r}: a backend named {name!r} is installed already")
    assert not (tmp_path / "p").exists()
