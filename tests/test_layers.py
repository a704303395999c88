"""The core's layers import downward only (uapi/errors -> state -> kvm -> flows -> VM facade ->
tools). Every import counts: module level, function-local and ``TYPE_CHECKING`` ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvmcore

PKG = Path(kvmcore.__file__).parent

#: Module (or sub-package) -> layer. A module may import its own layer or a lower one, never a
#: higher one, and the whole graph has no cycle.
LAYERS = {
    # 0 vocabulary: constants and records that cross the hook boundary
    "uapi": 0, "errors": 0, "args": 0, "exits": 0, "arch": 0, "records": 0, "__init__": 0,
    # 1 state: data structures without flows
    "locks": 1, "pgtable": 1, "host": 1, "memslots": 1, "attributes": 1, "dirty_log": 1,
    "invalidate": 1,
    # 2 the core object (struct kvm / kvm_vcpu), the contract typed against it, and the
    # generic radix operations backends build on (radix: over pgtable and the records)
    "kvm": 2, "hookspecs": 2, "radix": 2,
    # 3 flows, each over Kvm
    "hva": 3, "mmu_notifier": 3, "pfn": 3, "gmem": 3, "dirty": 3, "set_attributes": 3,
    "set_memory_region": 3, "capabilities": 3, "fault": 3, "defaults": 3, "invariants": 3,
    "plugins": 3, "pfncache": 3,
    # 4 the ioctl facade
    "vm": 4,
    # 5 tools
    "steps": 4, "scenario": 5, "cli": 5, "__main__": 5, "bench": 5, "conformance": 5,
    "testing": 5, "scaffold": 5, "picture": 5, "scenarios": 5, "explore": 5, "kernel": 5, "diff": 5,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    if top not in LAYERS:
        raise AssertionError(f"kvmcore.{mod} has no layer: add it to LAYERS")
    return LAYERS[top]


def _imports(path: Path, mod: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")
    if mod == "__init__":
        pkg_parts = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kvmcore"):
                target = node.module[len("kvmcore."):] if node.module != "kvmcore" else ""
            else:
                continue
            if target:
                out.add(target)
            else:   # "from . import x, y" / "from kvmcore import x"
                out.update(a.name for a in node.names if (PKG / a.name).exists()
                           or (PKG / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kvmcore."):
                    out.add(a.name[len("kvmcore."):])
    out.discard(mod)
    return {t for t in out if t.split(".")[0] != "__init__"}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
        graph[mod] = _imports(path, mod)
    return graph


def test_every_module_has_a_layer():
    for mod in import_graph():
        _layer(mod)


def test_no_upward_import():
    bad = []
    for mod, targets in import_graph().items():
        for t in sorted(targets):
            if _layer(t) > _layer(mod):
                bad.append(f"kvmcore.{mod} (layer {_layer(mod)}) imports kvmcore.{t} "
                           f"(layer {_layer(t)})")
    assert not bad, "\n".join(bad)


PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def test_backends_import_only_the_vocabulary_state_and_kvm():
    """A backend is hardware: it may use layers 0-2 (records, pgtable, host, struct kvm),
    never a flow, the facade or a tool."""
    if not PLUGINS.is_dir():
        pytest.skip("the backends' sources are not beside the tests")
    bad = []
    for path in sorted(PLUGINS.glob("*/kvmcore_*/*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module == "kvmcore":
                    names = [a.name for a in node.names if a.name in LAYERS]
                elif node.module.startswith("kvmcore."):
                    names = [node.module[len("kvmcore."):]]
            elif isinstance(node, ast.Import):
                names = [a.name[len("kvmcore."):] for a in node.names
                         if a.name.startswith("kvmcore.")]
            bad += [f"{path.relative_to(PLUGINS)} imports kvmcore.{n}" for n in names
                    if _layer(n) > 2]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t.split(".")[0] if t.split(".")[0] in ("bench", "conformance", "scaffold")
                 else t for t in ts} for m, ts in import_graph().items()}
    # Sub-packages count as one node: their modules may import each other.
    nodes: dict[str, set[str]] = {}
    for m, ts in graph.items():
        top = m.split(".")[0] if m.split(".")[0] in ("bench", "conformance", "scaffold") else m
        nodes.setdefault(top, set()).update(t for t in ts if t != top)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(nodes.get(n, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)
