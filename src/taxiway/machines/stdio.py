"""A machine's standard streams on the host: the null device, the raw terminal, forwarded signals.

Shared by both runtimes, ``machines exec`` and the detached supervisor; a leaf
module (nothing else of the machines part imported).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

NULL_DEVICE = os.makedev(1, 3)
# what an attached CLI passes on to the machine's main process (or an exec'd command)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _null(flags: int) -> int:
    """/dev/null opened with ``flags`` (O_RDONLY or O_WRONLY) if it really is the null device (char 1:3);
    else one end of a pipe whose other end is closed: reads see EOF at once, writes fail."""
    try:
        fd = os.open("/dev/null", flags | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == NULL_DEVICE:
            return fd
        os.close(fd)
    r, w = os.pipe2(os.O_CLOEXEC)
    keep, drop = (r, w) if flags == os.O_RDONLY else (w, r)
    os.close(drop)
    return keep


def null_input() -> int:
    """An fd that reads as empty at once: /dev/null, or a pipe with no writer where /dev/null is not the device.

    A host whose /dev/null was deleted and recreated by a shell redirect has a regular
    file there, holding whatever was written to it since: a machine's stdin must never
    read that (it did once, in CI). The fd is close-on-exec (``dup2`` onto 0 clears it).
    """
    return _null(os.O_RDONLY)


def null_output() -> int:
    """An fd that discards writes: /dev/null, or a pipe with no reader (writes fail) where it is not the device."""
    return _null(os.O_WRONLY)


def detach_stdio() -> None:
    """Point fds 0-2 at the null device (a daemonized supervisor, a background delete)."""
    fds = (null_input(), null_output())
    for n in (0, 1, 2):
        os.dup2(fds[0] if n == 0 else fds[1], n)
    for fd in fds:
        if fd > 2:
            os.close(fd)


@contextlib.contextmanager
def raw_terminal(fd: int = 0, enabled: bool = True) -> Iterator[None]:
    """Terminal ``fd`` in raw mode for the block (when ``enabled`` and it is a terminal), restored after."""
    if not enabled or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would drop what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def forward_to(pid: int) -> Callable[[int, Any], None]:
    """A signal handler that passes the signal on to ``pid`` (gone already: nothing to do)."""

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    return forward


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals: tuple[int, ...] = FORWARDED) -> Iterator[None]:
    """``handler`` for ``signals`` during the block; the previous handlers after."""
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``, waiting while a non-blocking fd is full."""
    import select

    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]
