"""Environment from layers, as the CNB spec defines it.

A layer's ``bin/`` is prepended to PATH and ``lib/`` to LD_LIBRARY_PATH; files in
``env/`` (both phases), ``env.build/`` or ``env.launch/`` set variables: ``NAME``
or ``NAME.override`` replaces, ``NAME.default`` sets if unset, ``NAME.prepend`` /
``NAME.append`` join with ``NAME.delim`` (no delimiter when absent).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from taxiway.errors import InvalidInput

#: POSIX's portable variable names: what a shell can set and what is safe as a file name in /platform/env.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(name: object, where: str) -> str:
    """A build env variable name, or InvalidInput saying what is wrong and where it came from."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid build env name {name!r} in {where}",
                           "use a variable name: letters, digits and _, not starting with a digit")
    if name.startswith("CNB_"):
        raise InvalidInput(f"build env name {name!r} in {where} is reserved for the lifecycle (CNB_*)", "pick another name")
    return name


def _join(a: str, b: str, delim: str) -> str:
    if not a:
        return b
    if not b:
        return a
    return a + delim + b


def apply_env_dir(env: dict[str, str], d: Path) -> None:
    """Apply one ``env*`` folder's files to ``env``."""
    if d.is_dir():
        apply_env_files(env, {p.name: p.read_text() for p in d.iterdir() if p.is_file()})


def apply_env_files(env: dict[str, str], files: dict[str, str]) -> None:
    """Apply ``NAME[.suffix]`` -> content rules (in sorted order, so the result is stable)."""
    for name in sorted(files):
        if name.endswith(".delim"):
            continue
        var, _, suffix = name.partition(".")
        value = files[name]
        if suffix in ("", "override"):
            env[var] = value
        elif suffix == "default":
            env.setdefault(var, value)
        elif suffix in ("prepend", "append"):
            delim = files.get(f"{var}.delim", "")
            cur = env.get(var, "")
            env[var] = _join(value, cur, delim) if suffix == "prepend" else _join(cur, value, delim)


def apply_recorded(env: dict[str, str], rec: dict, inside: str, phase: str = "launch") -> None:
    """A layer's contribution from what was read of it (``bin``, ``lib``, ``files``), for ``phase``."""
    if rec.get("bin"):
        env["PATH"] = _join(f"{inside}/bin", env.get("PATH", ""), os.pathsep)
    if rec.get("lib"):
        env["LD_LIBRARY_PATH"] = _join(f"{inside}/lib", env.get("LD_LIBRARY_PATH", ""), os.pathsep)
        if phase == "build":
            env["LIBRARY_PATH"] = _join(f"{inside}/lib", env.get("LIBRARY_PATH", ""), os.pathsep)
    files = rec.get("files", {})
    for sub in ("env", f"env.{phase}"):
        apply_env_files(env, {k.split("/", 1)[1]: v for k, v in files.items() if k.split("/", 1)[0] == sub})


def apply_layer(env: dict[str, str], layer_dir: Path, phase: str, inside: str | None = None) -> None:
    """Add one layer's contribution for ``phase`` (``build`` or ``launch``).

    ``inside`` is the layer's path as the process will see it (``/layers/...``),
    when that differs from where the builder reads it.
    """
    at = inside or str(layer_dir)
    if (layer_dir / "bin").is_dir():
        env["PATH"] = _join(f"{at}/bin", env.get("PATH", ""), os.pathsep)
    if (layer_dir / "lib").is_dir():
        env["LD_LIBRARY_PATH"] = _join(f"{at}/lib", env.get("LD_LIBRARY_PATH", ""), os.pathsep)
        if phase == "build":
            env["LIBRARY_PATH"] = _join(f"{at}/lib", env.get("LIBRARY_PATH", ""), os.pathsep)
    apply_env_dir(env, layer_dir / "env")
    apply_env_dir(env, layer_dir / f"env.{phase}")


def parse_env_list(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if sep:
            out[k] = v
    return out
