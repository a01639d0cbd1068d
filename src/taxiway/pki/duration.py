"""Durations on the command line: ``30d``, ``12h``, ``90m``, ``2w``, ``45s``."""

from __future__ import annotations

import re
from datetime import timedelta

from taxiway.errors import InvalidInput

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """Parse ``<number><unit>`` with unit s, m, h, d or w."""
    m = _RE.match(text or "")
    if not m:
        raise InvalidInput(f"invalid duration {text!r}", "write a number and a unit: 30d, 12h, 90m, 2w")
    try:
        return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    except OverflowError:
        raise InvalidInput(f"duration {text!r} is too long", "give at most a few thousand days, like 3650d") from None


def format_duration(td: timedelta) -> str:
    """A short human form in the largest whole unit (``820d``, ``5h``, ``-3d``)."""
    s = int(td.total_seconds())
    sign = "-" if s < 0 else ""
    s = abs(s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s // size}{unit}"
    return f"{sign}{s}s"
