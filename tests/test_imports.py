"""The package's import graph: no cycles, and the release gate knows no scenario."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "edgetl").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def _imports(path: Path, mods: dict, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("edgetl"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                found.add(full if full in mods else n.module)
        elif isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name in mods}
    return found & set(mods)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_module_level_imports_have_no_cycle():
    mods = _modules()
    graph = {m: _imports(p, mods, top_level_only=True) - {m} for m, p in mods.items()}
    assert _cycles(graph) == []


def test_scenarios_and_the_release_gate_form_no_cycle_even_lazily():
    """check -> pipeline -> vision -> check was a five-module cycle; registries may stay."""
    mods = _modules()
    graph = {m: _imports(p, mods, top_level_only=False) - {m} for m, p in mods.items()}
    scenario = {"edgetl.check", "edgetl.pipeline", "edgetl.stages", "edgetl.kinds",
                "edgetl.kinds.timeseries", "edgetl.kinds.image", "edgetl.kinds.text"}
    assert [c for c in _cycles(graph) if scenario & set(c)] == []
    assert not graph["edgetl.check"] & scenario  # check_bundle takes data, not a recipe
