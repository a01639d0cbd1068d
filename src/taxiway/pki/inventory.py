"""The inventory of issued certificates: an append-only JSON-lines log.

Each line is one event (``issued``, ``revoked``, ``renewed``) written with a
single ``O_APPEND`` write, so concurrent ``taxiway ca issue`` processes never
interleave or rewrite each other's lines. Replaying the log gives the current
state. A line that is not a well-formed event (a write cut short by a crash, a
hand edit) is skipped with a warning naming the file and line, so one bad line
never hides the others.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from taxiway.errors import TaxiwayError
from taxiway.fsutil import FileProblem, open_nofollow, read_regular

MAX_INVENTORY = 1 << 30  # one line per certificate event: far beyond any real CA


@dataclass
class Record:
    """One issued certificate as the inventory knows it."""

    serial: str  # lower-case hex, 32 digits
    names: list[str]
    not_before: str  # ISO 8601 UTC
    not_after: str
    issued_at: str
    key_type: str
    client: bool = False
    cn: str | None = None
    validity_seconds: int | None = None  # None: the default profile (2 years 3 months)
    cert_file: str | None = None
    key_file: str | None = None
    p12_file: str | None = None
    public_key: str | None = None  # PEM, for certificates issued from a CSR (renewal re-signs it)
    cert: str = ""
    revoked_at: str | None = None
    renewed_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self, at: datetime) -> str:
        """``revoked``, ``renewed``, ``expired`` or ``valid`` at time ``at``."""
        if self.revoked_at:
            return "revoked"
        if self.renewed_by:
            return "renewed"
        if datetime.fromisoformat(self.not_after) <= at:
            return "expired"
        return "valid"

    def to_json(self, at: datetime) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["status"] = self.status(at)
        return d


_FIELDS = set(Record.__dataclass_fields__)


def append(path: Path, *events: dict[str, Any]) -> None:
    """Append events, one line each, with one write (atomic with O_APPEND on a local file system)."""
    line = b"".join(orjson.dumps(ev) + b"\n" for ev in events)
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except FileProblem as e:
        raise _unusable(path, str(e)) from None
    except OSError as e:
        raise _unusable(path, f"cannot be opened ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn line from a crash: start afresh rather than extend it
        os.write(fd, line)
    finally:
        os.close(fd)


def _unusable(path: Path, problem: str) -> TaxiwayError:
    return TaxiwayError(f"the inventory {path} {problem}",
                        "replace it with the real file (restore it from a backup, or remove it to start an empty one)")


_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")
_OPTIONAL_STR = ("cn", "cert_file", "key_file", "p12_file", "public_key", "cert")


def _time(v: Any) -> bool:
    try:
        return isinstance(v, str) and datetime.fromisoformat(v).tzinfo is not None
    except ValueError:
        return False


def _problem(ev: Any) -> str | None:
    """Why ``ev`` is not a well-formed event, or None."""
    if not isinstance(ev, dict):
        return "not a JSON object"
    kind = ev.get("event")
    if kind not in ("issued", "revoked", "renewed"):
        return f"unknown event {kind!r}"
    if not isinstance(ev.get("serial"), str) or not _SERIAL.match(ev["serial"]):
        return f"invalid serial {ev.get('serial')!r}"
    if kind == "revoked":
        return None if _time(ev.get("at")) else f"invalid time {ev.get('at')!r}"
    if kind == "renewed":
        by = ev.get("by")
        return None if isinstance(by, str) and _SERIAL.match(by) else f"invalid serial {by!r}"
    names = ev.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "names is not a list of strings"
    for k in ("not_before", "not_after", "issued_at"):
        if not _time(ev.get(k)):
            return f"invalid {k} {ev.get(k)!r}"
    if not isinstance(ev.get("key_type"), str):
        return "no key_type"
    if not isinstance(ev.get("client", False), bool):
        return "client is not true or false"
    vs = ev.get("validity_seconds")
    if vs is not None and (not isinstance(vs, int) or isinstance(vs, bool) or vs <= 0):
        return f"invalid validity_seconds {vs!r}"
    for k in _OPTIONAL_STR:
        if ev.get(k) is not None and not isinstance(ev[k], str):
            return f"{k} is not a string"
    return None


def read(path: Path, warn: Callable[[str], None] | None = None) -> dict[str, Record]:
    """Replay the log into records keyed by serial, in issue order.

    Bad lines are skipped; ``warn`` (if given) is told about each, as ``PATH:LINE: problem``.
    """
    records: dict[str, Record] = {}
    try:
        data = read_regular(path, MAX_INVENTORY, nofollow=True)
    except FileNotFoundError:
        return records
    except FileProblem as e:
        raise _unusable(path, str(e)) from None
    except OSError as e:
        raise _unusable(path, f"cannot be read ({e.strerror})") from None

    def bad(n: int, why: str) -> None:
        if warn is not None:
            warn(f"{path}:{n}: {why}; the line is skipped (fix or delete it)")

    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad(n, "not valid JSON (a write cut short?)")
            continue
        why = _problem(ev)
        if why is None and ev["event"] != "issued" and ev["serial"] not in records:
            why = f"{ev['event']} names serial {ev['serial']}, which no earlier line issued"
        if why is not None:
            bad(n, why)
            continue
        kind = ev.pop("event")
        if kind == "issued":
            rec = Record(**{k: v for k, v in ev.items() if k in _FIELDS and k != "extra"})
            records[rec.serial] = rec
        elif kind == "revoked":
            records[ev["serial"]].revoked_at = ev["at"]
        else:
            records[ev["serial"]].renewed_by = ev["by"]
    return records
