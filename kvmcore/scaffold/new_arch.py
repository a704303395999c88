"""``kvmcore new-arch NAME``: write a plugin distribution whose backend (a plain radix table,
``kvmcore/scaffold/backend.py``) passes the conformance suite, for its author to turn into
their hardware."""

from __future__ import annotations

import importlib.util
import json
import re
from importlib import resources
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..plugins import ARCH_GROUP

NAME_RE = re.compile(r"[a-z][a-z0-9_]{1,30}")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "kvmcore-{dist}"
version = "0.1.0"
description = "kvmcore backend: {name}"
requires-python = ">=3.11"
dependencies = ["kvmcore"]

[project.optional-dependencies]
test = ["pytest>=8,<10", "hypothesis>=6.100,<7", "tox>=4.11"]

[project.entry-points."kvmcore.arch"]
{name} = "kvmcore_{name}:{cls}"

[tool.setuptools.packages.find]
include = ["kvmcore_{name}*"]
"""

TOX = """\
[tox]
requires = tox>=4.11
env_list = {name}

[testenv:{name}]
description = the conformance suite and this backend's tests, with only kvmcore and it
# kvmcore as it is installed where this project was generated ({origin}), not from an index
deps = {kvmcore}
extras = test
commands =
    pytest -p kvmcore.conformance --arch {name} {{posargs}}
    pytest tests {{posargs}}
"""

TEST = '''\
"""{cls}'s own tests: its entry format, which the conformance suite cannot know."""

from kvmcore import VM, HostMemory


def test_a_write_maps_a_4k_leaf_with_the_hardware_bits():
    host = HostMemory()
    vm = VM(arch="{name}", host=host)
    vm.set_user_memory_region(0, 0, 1 << 20, host.mmap(1 << 20))
    vm.create_vcpu(0).write(0x3000, b"x")
    leaf = vm.lookup(0x3000)
    assert (leaf.gfn, leaf.size, leaf.writable) == (3, 4096, True)
    assert leaf.raw & 1 and leaf.raw & 4            # valid, writable in this format
    vm.check_invariants()
'''

README = """\
# kvmcore-{dist}

A kvmcore backend for {name}, started from `kvmcore new-arch`: a plain 4-level radix table
that passes the conformance suite. Replace the entry format in `kvmcore_{name}/backend.py`
with your hardware's, then the policies, keeping the suite green:

    pip install -e ".[test]" && tox

See kvmcore's docs/writing-a-backend.md and docs/hooks.md.
"""


def kvmcore_requirement() -> tuple[str, str]:
    """What the generated tox environment installs kvmcore from, and why: the local checkout
    the running kvmcore was installed from (its PEP 610 direct_url.json), so that tox never
    asks an index for a kvmcore that is not published there; else the name."""
    try:
        text = distribution("kvmcore").read_text("direct_url.json")
        url = json.loads(text)["url"] if text else ""
    except (PackageNotFoundError, ValueError, KeyError):
        url = ""
    if url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        return str(path), f"the checkout {path}"
    return "kvmcore", "an index"


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_")) + "Backend"


def _installed(name: str) -> str | None:
    """What an installed distribution already uses of ``name``: an entry point of group
    kvmcore.arch (even a block-listed one), or the package kvmcore_NAME."""
    if any(ep.name == name for ep in entry_points(group=ARCH_GROUP)):
        return f"a backend named {name!r}"
    if importlib.util.find_spec(f"kvmcore_{name}") is not None:
        return f"a package kvmcore_{name}"
    return None


def write_plugin(name: str, directory: Path) -> list[Path]:
    """Write the distribution; returns the files written. Raises ValueError for a bad name, a
    directory that is not empty, or a name an installed backend or package uses."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"NAME {name!r}: use lowercase letters, digits and '_', starting "
                         "with a letter (it becomes the entry-point and package name)")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory}: exists and is not empty")
    taken = _installed(name)
    if taken:
        raise ValueError(f"NAME {name!r}: {taken} is installed already (the new one would "
                         "collide with it); choose another name")
    cls, dist = camel(name), name.replace("_", "-")
    kvmcore, origin = kvmcore_requirement()
    source = resources.files("kvmcore.scaffold").joinpath("backend.py").read_text()
    source = (source.replace("class RadixBackend", f"class {cls}")
              .replace('name="radix"', f'name="{name}"'))
    files = {
        "pyproject.toml": PYPROJECT.format(dist=dist, name=name, cls=cls),
        "tox.ini": TOX.format(name=name, kvmcore=kvmcore, origin=origin),
        "README.md": README.format(dist=dist, name=name),
        f"kvmcore_{name}/__init__.py": f'"""kvmcore backend: {name}."""\n\n'
                                       f"from .backend import {cls}\n\n__all__ = [\"{cls}\"]\n",
        f"kvmcore_{name}/backend.py": source,
        "tests/test_backend.py": TEST.format(cls=cls, name=name),
    }
    written = []
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
