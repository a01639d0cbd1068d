"""Reading the CA's files and user-given inputs safely: regular files only, bounded, optionally no symlinks.

A CA file replaced by ``/dev/zero`` or a FIFO, or a CSR path naming one, must
give an error line instead of eating memory or hanging; a symlink planted in
the CA directory must not redirect the inventory or the lock.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from taxiway.errors import InvalidInput

MAX_INPUT = 1 << 20  # CSRs, certificates, keys, ca.json: real ones are a few KiB
MAX_INVENTORY = 1 << 30


class FileProblem(Exception):
    """Why a file cannot be read, as a phrase to follow its name ("is not a regular file")."""


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW; a symlink raises FileProblem instead of being followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileProblem("is a symbolic link, which taxiway does not follow in the CA directory") from None
        raise


def read_regular(path: str | os.PathLike, limit: int = MAX_INPUT, *, nofollow: bool = False) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes.

    FileNotFoundError and other OSErrors propagate; a symlink (with ``nofollow``),
    a device, FIFO or directory, or a file over the limit raise FileProblem.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK  # a FIFO must not block the open
    fd = open_nofollow(path, flags) if nofollow else os.open(path, flags | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise FileProblem(f"is {kind}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(f"is larger than {limit >> 20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def distinct_outputs(paths: Iterable[str | os.PathLike | None]) -> None:
    """Refuse two outputs that are one file (same path, other spellings, links): one would overwrite the other."""
    seen: list[tuple[str | os.PathLike, str]] = []
    for p in paths:
        if p is None:
            continue
        real = os.path.realpath(p)
        for q, other in seen:
            same = real == other
            if not same and os.path.exists(real) and os.path.exists(other):
                same = os.path.samefile(real, other)
            if same:
                raise InvalidInput(f"{q} and {p} are the same file: the key, chain and PKCS#12 file would overwrite "
                                   "each other", "give each output its own path")
        seen.append((p, real))
