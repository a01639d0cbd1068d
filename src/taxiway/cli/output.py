"""Output conventions shared by every command: --json, tables, progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def is_tty() -> bool:
    """True when progress bars should be drawn (stderr is a terminal)."""
    return sys.stderr.isatty()


class _NullProgress:
    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass

    def advance(self, *a: Any, **k: Any) -> None:
        pass


@contextlib.contextmanager
def progress(enabled: bool | None = None) -> Iterator[Any]:
    """A rich Progress on a terminal, a no-op object in a pipe.

    Usage: ``with progress() as p: t = p.add_task("layer", total=n); p.advance(t, k)``.
    """
    if enabled is None:
        enabled = is_tty()
    if not enabled:
        yield _NullProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # bars never mix into stdout (pipes, --json)
        transient=False,
    ) as p:
        yield p


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print rows as a plain aligned table (stable for scripts and humans)."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
