"""Helpers shared by taxiway's bundled buildpacks (standard library only: they run in the build image).

The lifecycle puts this folder at /cnb/buildpacks/_lib. User buildpacks don't
need it: the contract is only the CNB one (env variables, files, exit codes).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tomllib
from pathlib import Path

# shutil and subprocess are imported where used: this module starts on every build, and a rebuild
# that reuses its layers should not pay for them.


def app() -> Path:
    return Path.cwd()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def write_table(f, name: str, table: dict, array: bool = False) -> None:
    f.write(f"[[{name}]]\n" if array else f"[{name}]\n")
    for k, v in table.items():
        f.write(f'"{k}" = {_toml_value(v)}\n')
    f.write("\n")


def layers_dir() -> Path:
    return Path(os.environ.get("CNB_LAYERS_DIR") or sys.argv[1])


def layer_metadata(name: str) -> dict:
    """The metadata a previous build left for this layer ({} when none)."""
    p = layers_dir() / f"{name}.toml"
    if not p.exists():
        return {}
    return tomllib.loads(p.read_text()).get("metadata", {})


def layer_present(name: str) -> bool:
    d = layers_dir() / name
    return d.is_dir() and any(d.iterdir())


def fresh_layer(name: str) -> Path:
    """An empty layer folder (the old content removed)."""
    import shutil

    d = layers_dir() / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def write_layer(name: str, launch: bool = False, build: bool = False, cache: bool = False, metadata: dict | None = None) -> None:
    """Write <layer>.toml: the layer's types and the metadata that decides reuse next time."""
    (layers_dir() / name).mkdir(parents=True, exist_ok=True)
    with open(layers_dir() / f"{name}.toml", "w") as f:
        write_table(f, "types", {"launch": launch, "build": build, "cache": cache})
        write_table(f, "metadata", metadata or {})


def set_env(layer: str, name: str, value: str, phase: str = "env.launch", suffix: str = "default") -> None:
    d = layers_dir() / layer / phase
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{name}.{suffix}"
    if not f.is_file() or f.read_text() != value:  # unchanged files keep their mtime: the layer stays "the same"
        f.write_text(value)


def launch(processes: list[dict]) -> None:
    """Write launch.toml with [[processes]] (type, command, args, default, working-dir)."""
    with open(layers_dir() / "launch.toml", "w") as f:
        for p in processes:
            write_table(f, "processes", p, array=True)


def shell_process(type_: str, command: str, default: bool = False) -> dict:
    """A process run through sh (so $PORT and friends expand)."""
    return {"type": type_, "command": ["/bin/sh", "-c", command], "args": [], "default": default}


def digest_files(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def run(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
    """Run a step, echoing it; a failure ends the build with that step's exit code."""
    import subprocess

    print("$ " + " ".join(argv), flush=True)
    p = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        print(f"error: {' '.join(argv[:3])} failed with exit {p.returncode}", flush=True)
        sys.exit(p.returncode)


def fail(message: str) -> None:
    print(f"error: {message}", flush=True)
    sys.exit(1)


def parse_procfile(path: Path) -> list[tuple[str, str]]:
    """``name: command`` lines; blank lines and # comments are skipped."""
    import re

    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail("Procfile is not UTF-8 text; save it as UTF-8")
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        name, sep, cmd = s.partition(":")
        name, cmd = name.strip(), cmd.strip()
        # The name becomes /cnb/process/<name>: ASCII letters, digits, - _ . and never . or ..
        if not sep or not cmd or not re.fullmatch(r"(?!\.+$)[A-Za-z0-9_.-]+", name):
            fail(f"Procfile line {n} is not `name: command` with a name of ASCII letters, digits, - _ . "
                 f"(not . or ..): {line!r}")
        out.append((name, cmd))
    return out
