"""docs/hooks.md must document every hook of kvmcore/hookspecs.py, and nothing else (as
datasette's documentation test does for its plugin hooks)."""

import inspect
import re
from pathlib import Path

from kvmcore import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def spec_names():
    return {name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "kvmcore_spec")}


def documented():
    return set(re.findall(r"^## (\w+)\(", DOCS.read_text(), re.M))


def test_every_hook_has_a_section():
    missing = spec_names() - documented()
    assert not missing, f"hooks without a section in docs/hooks.md: {sorted(missing)}"


def test_no_section_for_a_hook_that_does_not_exist():
    extra = documented() - spec_names()
    assert not extra, f"docs/hooks.md documents unknown hooks: {sorted(extra)}"


def test_section_signatures_match():
    text = DOCS.read_text()
    for name in spec_names():
        params = list(inspect.signature(getattr(hookspecs, name)).parameters)
        heading = re.search(rf"^## {name}\((.*)\)", text, re.M).group(1)
        assert [p.split(":")[0].strip() for p in heading.split(",")] == params, name
