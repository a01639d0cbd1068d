"""The CNB project descriptor, ``project.toml``: which source files go in, and build-time env.

Schema 0.2 (``[io.buildpacks] exclude|include`` and ``[[io.buildpacks.build.env]]``)
and 0.1 (``[build] exclude|include`` and ``[[build.env]]``). Patterns follow
gitignore's main rules: a leading ``/`` anchors at the project root, a trailing
``/`` matches directories only, ``*``/``?``/``[...]`` glob within a name, and a
pattern without ``/`` matches the name at any depth. Every ``.git`` (at any depth),
``.git-credentials`` and ``.netrc`` are always left out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.builder import safefs
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
    # Read without following a link: a project.toml -> /elsewhere would hand a host file's env to the build.
    k = safefs.kind(source, "project.toml")
    if k is None or k == "dir":
        return Project()
    if k != "file":
        what = "a symbolic link" if k == "link" else "not a regular file"
        raise InvalidInput(f"project.toml is {what}; the build reads the project descriptor only as a plain file in {source}",
                           "replace it with a regular file (copy the content instead of linking it)")
    data = safefs.read_bytes(source, "project.toml") or b""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"malformed project descriptor {path}: not UTF-8 text", "fix the file") from None
    doc = load_toml(path, "project descriptor", text)
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


#: Credential files left out of /workspace wherever they are (with every ``.git``).
NEVER_COPIED = frozenset({".git-credentials", ".netrc"})


def source_filter(project: Project) -> Callable[[str, bool], bool]:
    """``keep(relative_path, is_dir)`` for the files that go into /workspace."""
    def keep(rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        # Every repository's metadata (vendor/x/.git holds remotes with tokens) and credential files stay out.
        if ".git" in parts or parts[-1] in NEVER_COPIED:
            return False
        if project.include:
            # A folder is kept if it is included or could hold something included.
            return is_dir or any(_match(p, rel, is_dir) or _match(p, rel.split("/")[0], True) for p in project.include)
        return not any(_match(p, rel, is_dir) for p in project.exclude)
    return keep


def copy_source(source: Path, dest: Path, project: Project, warn: Callable[[str], None] | None = None,
                hashes: dict[str, str] | None = None, check: Callable[[], object] | None = None) -> None:
    """Copy the app into ``dest`` (symlinks as symlinks), leaving out what the descriptor excludes.

    Only regular files, folders and symlinks are copied. Device nodes, fifos and
    sockets are never opened (``/dev/zero`` would fill the disk, a fifo would
    block): they are skipped with one warning naming them, as pack does.
    ``hashes`` gets each copied file's sha256 by its path below ``dest`` (hashed
    while copied, so the app layer's fingerprint needs no second read);
    ``check`` is called between files (a deadline).
    """
    from taxiway.builder.fdcopy import copy_tree

    # By fds, never following a link, in a loop (see fdcopy): the source is the user's and may change meanwhile.
    specials = copy_tree(source, dest, source_filter(project), what=f"the source {source}", hashes=hashes, check=check)
    if specials and warn is not None:
        shown = ", ".join(specials[:10]) + (f" and {len(specials) - 10} more" if len(specials) > 10 else "")
        warn(f"warning: skipped {len(specials)} special file(s) in the source (device, fifo or socket): {shown}")
