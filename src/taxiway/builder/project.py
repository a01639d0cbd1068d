"""The CNB project descriptor, ``project.toml``: which source files go in, and build-time env.

Schema 0.2 (``[io.buildpacks] exclude|include`` and ``[[io.buildpacks.build.env]]``)
and 0.1 (``[build] exclude|include`` and ``[[build.env]]``). Patterns follow
gitignore's main rules: a leading ``/`` anchors at the project root, a trailing
``/`` matches directories only, ``*``/``?``/``[...]`` glob within a name, and a
pattern without ``/`` matches the name at any depth. ``.git`` is always left out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.builder.buildpack import load_toml
from taxiway.builder.env import check_name
from taxiway.errors import InvalidInput


@dataclass
class Project:
    exclude: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def load_project(source: Path) -> Project:
    """The descriptor of the app at ``source`` (defaults when there is no project.toml)."""
    path = source / "project.toml"
    if not path.is_file():
        return Project()
    doc = load_toml(path, "project descriptor")
    sect = (doc.get("io") or {}).get("buildpacks") if isinstance(doc.get("io"), dict) else None
    if not isinstance(sect, dict):
        sect = doc.get("build") if isinstance(doc.get("build"), dict) else {}
    build = sect.get("build", sect) if isinstance(sect.get("build", sect), dict) else {}
    exclude, include = sect.get("exclude", []), sect.get("include", [])
    for name, v in (("exclude", exclude), ("include", include)):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise InvalidInput(f"malformed project.toml {path}: {name} must be an array of strings", "fix the file")
    if exclude and include:
        raise InvalidInput(f"malformed project.toml {path}: both include and exclude are set", "use one of them")
    env = {}
    for i, item in enumerate(build.get("env", []) or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("value", ""), str):
            raise InvalidInput(f"malformed project.toml {path}: build env entry {i} needs a name and a string value",
                               'write [[io.buildpacks.build.env]] name = "K" value = "V"')
        env[check_name(item["name"], f"project.toml {path}")] = item.get("value", "")
    return Project(exclude=list(exclude), include=list(include), env=env)


def _match(pattern: str, rel: str, is_dir: bool) -> bool:
    dir_only = pattern.endswith("/")
    pat = pattern.rstrip("/")
    if dir_only and not is_dir:
        return False
    if pat.startswith("/"):
        return fnmatch.fnmatchcase(rel, pat[1:])
    if "/" in pat:
        return fnmatch.fnmatchcase(rel, pat)
    return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pat)


def source_filter(project: Project) -> Callable[[str, bool], bool]:
    """``keep(relative_path, is_dir)`` for the files that go into /workspace."""
    def keep(rel: str, is_dir: bool) -> bool:
        if rel == ".git" or rel.startswith(".git/"):
            return False
        if project.include:
            # A folder is kept if it is included or could hold something included.
            return is_dir or any(_match(p, rel, is_dir) or _match(p, rel.split("/")[0], True) for p in project.include)
        return not any(_match(p, rel, is_dir) for p in project.exclude)
    return keep


def copy_source(source: Path, dest: Path, project: Project) -> None:
    """Copy the app into ``dest`` (symlinks as symlinks), leaving out what the descriptor excludes."""
    import shutil

    keep = source_filter(project)

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel_dir = Path(directory).relative_to(source).as_posix()
        out = set()
        for n in names:
            rel = n if rel_dir == "." else f"{rel_dir}/{n}"
            full = Path(directory) / n
            if not keep(rel, full.is_dir() and not full.is_symlink()):
                out.add(n)
        return out

    shutil.copytree(source, dest, symlinks=True, ignore=ignore)
