"""The machines package's shape: every module imports alone, no import cycle, no one else's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import taxiway.machines

PKG = Path(taxiway.machines.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
# Known and named exceptions (none now: namespace.py resolves mount points with the images part's
# openat2 walker through its public name, taxiway.oci.safepath).
ALLOWED_PRIVATE: set[tuple[str, str]] = set()


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in ``name``, at any depth (functions too)."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name) for a in node.names]
    return out


def _machines_deps(name: str) -> set[str]:
    """The sibling modules ``name`` imports."""
    deps = set()
    for module, what in _imports(name):
        if module == "taxiway.machines" and what in MODULES:
            deps.add(what)
        elif module.startswith("taxiway.machines."):
            deps.add(module.split(".")[2])
    deps.discard(name)
    return deps


def test_modules_import_alone():
    """``python -c 'import taxiway.machines.X'`` works for every module (no order they depend on)."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('taxiway.machines.' + m)\n"
    for m in MODULES:
        r = subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True)
        assert r.returncode == 0, f"import taxiway.machines.{m} alone failed:\n{r.stderr}"


def test_no_import_cycle():
    """The imports between the package's modules (top-level, in functions and typing-only) form no cycle."""
    graph = {m: _machines_deps(m) for m in MODULES}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for d in sorted(graph.get(m, ())):
            visit(d, [*path, m])
        done.add(m)

    for m in MODULES:
        visit(m, [])


def test_no_private_names_of_other_modules():
    """No module imports another module's ``_private`` names, or reaches them as ``module._name``."""
    bad = []
    for m in MODULES:
        tree = ast.parse((PKG / f"{m}.py").read_text())
        aliases = set()
        for module, what in _imports(m):
            if not module.startswith("taxiway"):
                continue
            parts = module.split(".") + ([what] if what else [])
            private = [p for p in parts if p.startswith("_") and not p.startswith("__")]
            if private and (m, module) not in ALLOWED_PRIVATE:
                bad.append(f"{m}: from {module} import {what}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taxiway"):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("taxiway")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{m}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_public_api_is_lazy_and_complete():
    """``import taxiway.machines`` imports no module of the package; each exported name resolves."""
    code = ("import sys, taxiway.machines as M\n"
            "loaded = sorted(k for k in sys.modules if k.startswith('taxiway.machines.'))\n"
            "assert loaded == [], loaded\n"
            "for n in M.__all__: getattr(M, n)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from taxiway.machines import runtime, state

    # the host agent's names stay where they were, and are the same objects
    for n in ("create", "start_detached", "stop", "start", "destroy", "wait", "exec_in", "read_logs"):
        assert getattr(taxiway.machines, n) is getattr(runtime, n)
    for n in ("load", "find", "all_machines"):
        assert getattr(taxiway.machines, n) is getattr(state, n)
    assert taxiway.machines.MachineConfig is runtime.MachineConfig


def test_one_type_checking_convention():
    """Every module of the code base takes ``TYPE_CHECKING`` from ``typing``: no own constant, no ``if False:``.

    The one convention (issue 15). Its cost is measured where start-up tricks live,
    taxiway/cli/main.py's docstring: ~6 ms of CPU on a warm ``taxiway run``.
    """
    src = PKG.parent
    bad = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Constant) and node.test.value is False:
                bad.append(f"{where}:{node.lineno}: if False:")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" for t in targets):
                    bad.append(f"{where}:{node.lineno}: its own TYPE_CHECKING constant")
            elif (isinstance(node, ast.ImportFrom) and node.module != "typing"
                  and any(a.name == "TYPE_CHECKING" for a in node.names)):
                bad.append(f"{where}:{node.lineno}: TYPE_CHECKING from {node.module}")
    assert not bad, bad
