"""The shape of the code: imports flow one way between the subpackages, functions stay short, the committed
notebooks are sources without outputs (but their checks), and ruff finds nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nbutils"
LAYERS = ("core", "subject", "collect", "llm", "score", "explain", "view", "interop", "live", "run")
"""Subpackages from the bottom up: each may import only from itself and those before it."""
MAX_FUNCTION_LINES = 60


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every nbutils module and the nbutils modules it imports (at any depth in its code), read statically."""
    graph: dict[str, set[str]] = {}
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nbutils"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                found |= {t if t in modules else node.module for t in targets}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("nbutils")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_flow_one_way_without_cycles():
    graph = import_graph()
    assert {m.split(".")[1] for m in graph if m.count(".") >= 1} >= set(LAYERS)
    upward = [
        f"{m} (layer {LAYERS[_layer(m)]}) imports {d} (layer {LAYERS[_layer(d)]})"
        for m, deps in graph.items()
        for d in deps
        if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)
    ]
    assert not upward, "lower layers import higher ones:\n" + "\n".join(upward)
    # no cycle among modules: a depth-first search finds no back edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_committed_notebooks_are_sources_with_only_their_check_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, 4)
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, path.name
        ids = [c.get("id") for c in json.loads(path.read_text())["cells"]]  # as stored (nbformat.read adds them)
        assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: cells without ids, or repeated ids"
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            checked = cell.source.startswith("# NBVAL_CHECK_OUTPUT")
            assert checked or not cell.outputs, f"{path.name}: a cell that is not a check has outputs"
            assert not checked or cell.outputs, f"{path.name}: a check cell has no recorded output"


def test_ruff_finds_nothing_in_the_package_tests_notebooks_and_benchmarks():
    for args in (["check"], ["format", "--check"]):
        res = subprocess.run([sys.executable, "-m", "ruff", *args, "."], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a wheel holds (`pip install .`, not editable): a subpackage missing
    there imports in a checkout and fails in an installed copy."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"
    assert {"nbutils.notebooks"} | found >= listed
    assert set(LAYERS) == {m.split(".")[1] for m in found if m.count(".") == 1}  # and each has its layer
