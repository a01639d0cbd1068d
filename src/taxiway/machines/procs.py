"""Host processes of machines: wait for one to go, stop it.

"Alive" is :func:`taxiway.process.pid_alive`, the one answer for every part
(a zombie, exited but not yet reaped, is not alive); re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from taxiway.process import pid_alive

__all__ = ["pid_alive", "wait_gone", "kill_after"]


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to end; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def kill_after(pid: int, timeout: float) -> None:
    """Give ``pid`` ``timeout`` seconds to end after a stop signal, then SIGKILL it (and wait up to 5 s)."""
    if not wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)
