"""A machine's log: its output as timestamped lines in ``log`` (rotated once to ``log.1``), and reading it back.

Both runtimes write through :class:`LogPump`; ``taxiway machines logs`` and the
platform read with :func:`read_logs`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path
    from typing import BinaryIO

    from taxiway.machines.state import Machine

LOG_MAX = int(os.environ.get("TAXIWAY_LOG_MAX_BYTES", 16 << 20))  # then log -> log.1 (one old file kept)
LINE_MAX = 64 << 10  # a longer line (or output with no newline at all) is split: memory stays bounded


def _ts() -> bytes:
    t = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z").encode()


class LogPump:
    """Copies machine output to its log (timestamped lines), rotating it at ``LOG_MAX`` bytes.

    Two files at most: ``log`` and ``log.1``, so a chatty machine can't fill the disk.
    Each line is ``<RFC 3339 time> <stream> <text>``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "ab", buffering=0)
        self.size = self.f.tell()
        self.partial: dict[str, bytes] = {}

    def _emit(self, chunk: bytes) -> None:
        if self.size + len(chunk) > LOG_MAX and self.size:
            self.f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.f = open(self.path, "ab", buffering=0)
            self.size = 0
        self.f.write(chunk)
        self.size += len(chunk)

    def write(self, stream: str, data: bytes) -> None:
        """Output of ``stream`` (stdout or stderr); a line is written once it is whole (or too long)."""
        buf = self.partial.get(stream, b"") + data
        *whole, rest = buf.split(b"\n")
        lines = []
        for ln in whole:
            while len(ln) > LINE_MAX:
                lines.append(ln[:LINE_MAX])
                ln = ln[LINE_MAX:]
            lines.append(ln)
        while len(rest) > LINE_MAX:
            lines.append(rest[:LINE_MAX])
            rest = rest[LINE_MAX:]
        if lines:
            ts = _ts()
            self._emit(b"".join(ts + b" " + stream.encode() + b" " + ln + b"\n" for ln in lines))
        self.partial[stream] = rest

    def close(self) -> None:
        """Write what is left of unfinished lines, and close the file."""
        for stream, rest in self.partial.items():
            if rest:
                self._emit(_ts() + b" " + stream.encode() + b" " + rest + b"\n")
        self.f.close()


def _whole_lines(data: bytes, carry: bytes) -> tuple[list[bytes], bytes]:
    data = carry + data
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), data[end:]


def _open(p: Path) -> BinaryIO | None:
    try:
        return open(p, "rb")
    except FileNotFoundError:
        return None


def read_logs(m: Machine, timestamps: bool = False, follow: bool = False, tail: int | None = None) -> None:
    """Print the machine's log (timestamps only if asked); ``tail``: only the last N lines first;
    ``follow`` keeps printing until it exits (across rotations of the log)."""
    import sys

    from taxiway.machines import state as S

    path = m.dir / "log"

    def emit(lines: list[bytes]) -> None:
        for line in lines:
            ts, _, rest = line.partition(b" ")
            stream, _, text = rest.partition(b" ")
            out = sys.stderr.buffer if stream == b"stderr" else sys.stdout.buffer
            out.write((ts + b" " + text if timestamps else text) + b"\n")
        sys.stdout.buffer.flush()
        sys.stderr.buffer.flush()

    old = _open(path.with_name("log.1"))
    cur = _open(path)  # held open while following: its inode can't be reused by a later rotation
    lines: list[bytes] = []
    carry = b""
    if old is not None:
        with old:
            lines, _ = _whole_lines(old.read(), b"")
    if cur is not None:
        more, carry = _whole_lines(cur.read(), b"")
        lines += more
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    emit(lines)
    last = not follow
    try:
        while not last:
            cur_m = S.load(m.id)
            if cur_m is None or cur_m.status() in ("exited", "failed", "created"):
                last = True  # one more read below, then stop
            try:
                now = os.stat(path).st_ino
            except FileNotFoundError:
                now = None
            if cur is None:
                cur = _open(path)
            elif now is not None and now != os.fstat(cur.fileno()).st_ino:
                # rotated: finish the file we hold (renamed or even unlinked, it is still readable), then
                # log.1 if it is a file we never saw (two rotations between reads), then the new log
                more, carry = _whole_lines(cur.read(), carry)
                emit(more)
                held = os.fstat(cur.fileno()).st_ino
                cur.close()
                mid = _open(path.with_name("log.1"))
                if mid is not None:
                    with mid:
                        if os.fstat(mid.fileno()).st_ino not in (held, now):
                            more, carry = _whole_lines(mid.read(), b"")
                            emit(more)
                carry = b""
                cur = _open(path)
            if cur is not None:
                more, carry = _whole_lines(cur.read(), carry)
                emit(more)
            if not last:
                time.sleep(0.1)
    finally:
        if cur is not None:
            cur.close()
