"""Environment from layers, as the CNB spec defines it.

A layer's ``bin/`` is prepended to PATH and ``lib/`` to LD_LIBRARY_PATH; files in
``env/`` (both phases), ``env.build/`` or ``env.launch/`` set variables: ``NAME``
or ``NAME.override`` replaces, ``NAME.default`` sets if unset, ``NAME.prepend`` /
``NAME.append`` join with ``NAME.delim`` (no delimiter when absent).
"""

from __future__ import annotations

import os
from pathlib import Path


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


def apply_recorded(env: dict[str, str], rec: dict, inside: str) -> None:
    """A launch layer's contribution from what the exporter recorded (``bin``, ``lib``, ``files``)."""
    if rec.get("bin"):
        env["PATH"] = _join(f"{inside}/bin", env.get("PATH", ""), os.pathsep)
    if rec.get("lib"):
        env["LD_LIBRARY_PATH"] = _join(f"{inside}/lib", env.get("LD_LIBRARY_PATH", ""), os.pathsep)
    files = rec.get("files", {})
    for sub in ("env", "env.launch"):
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
