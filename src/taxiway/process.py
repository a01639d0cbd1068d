"""Is this process alive? One answer for every part (machines, publish, builder).

A **zombie counts as dead**: it has exited and only waits for its parent to
collect its status, so nothing it did (serving a port, holding a lock's
purpose, running a machine) goes on. ``kill(pid, 0)`` alone says a zombie is
alive, which is why the answer reads ``/proc/PID/stat`` too.

A pid can be reused after its process ends. Where that matters (a pid read
from a file written long ago), record :func:`start_time` beside the pid and
pass it back as ``started``: a different start time means another process.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")": cut at the last one


def start_time(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22), or None if it is gone."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def pid_alive(pid: int | None, started: str | None = None) -> bool:
    """True if ``pid`` names a running (not zombie) process; with ``started``, only if it is that same process.

    A process of another user counts as alive (``kill`` answers EPERM, it exists);
    ``None``, 0 and negative pids are never alive (``kill(0, ...)`` would mean our own group).
    """
    if not pid or pid < 0:
        return False
    others = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        others = True
    fields = _stat_fields(pid)
    if fields is None:  # ended between the two looks, or another user's under /proc's hidepid: it exists
        return others and started is None
    if fields[0] in (b"Z", b"X"):  # zombie, or dead and being reaped
        return False
    return started is None or (len(fields) > 19 and fields[19].decode() == started)
