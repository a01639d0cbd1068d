"""Pinned requirements from uv.lock and poetry.lock (standard library only: runs in the build image).

The python buildpack installs what a lock file pins with the build image's pip,
so a project locked with uv or Poetry needs neither tool at build time. Dev
groups and extras are left out; an edge's PEP 508 marker is kept on the line
(pip evaluates it), so Windows-only dependencies stay out of the image.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _line(name: str, version: str, markers: set[str | None]) -> str:
    marker = None if None in markers or not markers else " or ".join(f"({m})" for m in sorted(markers))
    return f"{name}=={version}" + (f" ; {marker}" if marker else "")


def uv_requirements(path: Path) -> list[str]:
    """``name==version`` lines for the runtime dependencies of the project at the root of a uv.lock."""
    doc = tomllib.loads(path.read_text())
    pkgs = doc.get("package", [])
    by_name: dict[str, dict] = {}
    root = None
    for p in pkgs:
        by_name.setdefault(_norm(p["name"]), p)
        src = p.get("source", {})
        if src.get("virtual") == "." or src.get("editable") == ".":
            root = p
    if root is None:
        raise ValueError("uv.lock has no project at its root (a package whose source is virtual or editable \".\")")
    seen: dict[str, set[str | None]] = {}
    todo = [(d, d.get("marker")) for d in root.get("dependencies", [])]
    while todo:
        dep, marker = todo.pop()
        n = _norm(dep["name"])
        first = n not in seen
        seen.setdefault(n, set()).add(marker)
        if first and n in by_name:
            todo += [(d, d.get("marker")) for d in by_name[n].get("dependencies", [])]
    out = []
    for n in sorted(seen):
        p = by_name.get(n)
        if p is None or p is root:
            continue
        src = p.get("source", {})
        if "registry" not in src:
            raise ValueError(f"uv.lock: {p['name']} comes from {src}, not a package index; add it to requirements.txt instead")
        out.append(_line(p["name"], p["version"], seen[n]))
    return out


def poetry_requirements(path: Path) -> list[str]:
    """``name==version`` lines for the main group of a poetry.lock (Poetry 1.x ``category`` or 2.x ``groups``)."""
    doc = tomllib.loads(path.read_text())
    out = []
    for p in doc.get("package", []):
        groups = p.get("groups")
        if groups is not None and "main" not in groups:
            continue
        if groups is None and p.get("category", "main") != "main":
            continue
        if p.get("optional", False):
            continue
        src = p.get("source", {})
        if src.get("type") in ("git", "directory", "file", "url"):
            raise ValueError(f"poetry.lock: {p['name']} comes from a {src['type']} source; add it to requirements.txt instead")
        m = p.get("markers")
        if isinstance(m, dict):
            m = m.get("main")
        out.append(_line(p["name"], p["version"], {m or None}))
    return out
