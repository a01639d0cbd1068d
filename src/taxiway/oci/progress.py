"""The one progress callback of the image parts: pull, push, export and scan call it; the CLI draws it.

A :class:`Progress` is any callable ``progress(blob, n)``: ``n`` more bytes of
the blob described by ``blob`` are done (downloaded, uploaded, or read while
unpacking or scanning). A download that has to start over reports a negative
``n`` for the bytes it takes back. Pull and push call it from several threads
at once (one blob per thread), so it must be thread-safe. Nothing here knows
how it is shown: the CLI turns it into bars (rich lives in ``taxiway.cli`` only).
"""

from __future__ import annotations

from typing import Protocol

from taxiway.oci.image import Descriptor


class Progress(Protocol):
    """``progress(blob, n)``: ``n`` more bytes of ``blob`` are done (negative: taken back by a restart)."""

    def __call__(self, blob: Descriptor, n: int, /) -> None: ...
