"""The image package's shape: every module imports alone, no import cycle, no one else's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import taxiway.oci

PKG = Path(taxiway.oci.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
#: The one module that may import the private resolver: the public name it is re-exported under.
ALLOWED_PRIVATE = {("safepath", "taxiway.oci._safepath")}


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in ``name``, at any depth (functions too)."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse((PKG / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name) for a in node.names]
    return out


def test_modules_import_alone():
    """``python -c 'import taxiway.oci.X'`` works for every module, in one fresh interpreter each."""
    code = "import importlib, sys\nimportlib.import_module('taxiway.oci.' + sys.argv[1])\n"
    procs = {m: subprocess.Popen([sys.executable, "-c", code, m], stderr=subprocess.PIPE, text=True) for m in MODULES}
    failed = {m: p.communicate()[1] for m, p in procs.items() if p.wait() != 0}
    assert not failed, failed


def test_no_import_cycle():
    """The imports between the package's modules (top-level, in functions and typing-only) form no cycle."""
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        deps = set()
        for module, what in _imports(m):
            if module == "taxiway.oci" and what in MODULES:
                deps.add(what)
            elif module.startswith("taxiway.oci."):
                deps.add(module.split(".")[2])
        graph[m] = deps - {m}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m not in done:
            for d in sorted(graph.get(m, ())):
                visit(d, [*path, m])
            done.add(m)

    for m in MODULES:
        visit(m, [])


def test_no_private_names_of_other_modules():
    """No module imports another module's ``_private`` names or private modules (safepath's re-export aside)."""
    bad = []
    for m in MODULES:
        for module, what in _imports(m):
            if not module.startswith("taxiway") or (m, module) in ALLOWED_PRIVATE:
                continue
            parts = module.split(".") + ([what] if what else [])
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                bad.append(f"{m}: from {module} import {what}")
    assert not bad, bad
