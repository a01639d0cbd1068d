"""The inventory of issued certificates: an append-only JSON-lines log.

Each line is one event (``issued``, ``revoked``, ``renewed``) written with a
single ``O_APPEND`` write, so concurrent ``taxiway ca issue`` processes never
interleave or rewrite each other's lines, and a torn last line (a crash mid
write) is skipped on read. Replaying the log gives the current state.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson


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


def append(path: Path, event: dict[str, Any]) -> None:
    """Append one event as one line with one write (atomic with O_APPEND on a local file system)."""
    line = orjson.dumps(event) + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn line from a crash: start afresh rather than extend it
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: Path) -> dict[str, Record]:
    """Replay the log into records keyed by serial, in issue order."""
    records: dict[str, Record] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records
    for line in data.splitlines():
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a torn line from a crash mid-write
        kind = ev.pop("event", None)
        if kind == "issued":
            rec = Record(**{k: v for k, v in ev.items() if k in _FIELDS})
            records[rec.serial] = rec
        elif kind == "revoked" and ev.get("serial") in records:
            records[ev["serial"]].revoked_at = ev.get("at")
        elif kind == "renewed" and ev.get("serial") in records:
            records[ev["serial"]].renewed_by = ev.get("by")
    return records
