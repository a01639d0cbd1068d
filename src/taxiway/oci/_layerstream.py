"""Stream a layer: decompress (isal gzip, zstandard), hash and parse its tar headers.

Shared by unpack and scan. Nothing here touches the file system; TarFile only
parses headers from a forward-only source, and file data is handed out by
the caller's choice (copied to an fd, read, or skipped).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from taxiway.errors import TaxiwayError
from taxiway.oci.mediatypes import layer_compression

_CHUNK = 1 << 20
MAX_READ = 64 << 20  # the most read() hands out at once (headers; capped file samples)


class LayerError(TaxiwayError):
    """A layer could not be read: corrupt, truncated, or not what its digest says."""




class _Counting:
    """Reports how many compressed bytes were consumed."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], None]):
        self._raw, self._progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        b = self._raw.read(n)
        if b:
            self._progress(len(b))
        return b

    def readinto(self, buf: Any) -> int:
        if hasattr(self._raw, "readinto"):
            n = self._raw.readinto(buf) or 0
        else:
            b = self._raw.read(len(buf))
            n = len(b)
            buf[:n] = b
        if n:
            self._progress(n)
        return n


def _decompressor(raw: Any, compression: str) -> Any:
    if compression == "gzip":
        from isal import igzip

        return igzip.IGzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK, read_across_frames=True)
    return raw


class TarSource:
    """A forward-only, hashing file over the uncompressed layer, for TarFile.

    ``tell``/forward ``seek`` are all TarFile needs in ``r`` mode; file data
    goes straight from the decompressor's chunks to the destination fd.
    """

    def __init__(self, src: Any, label: str):
        self._src, self.label = src, label
        self._buf = b""
        self._off = 0
        self._pos = 0
        self._hash = hashlib.sha256()
        self.eof = False
        self.last_block = b""  # the last header TarFile read: all zeros at a proper end

    def _more(self) -> bool:
        try:
            chunk = self._src.read(_CHUNK)
        except Exception as e:  # gzip/zstd/IO errors all mean "this layer is broken"
            raise LayerError(f"{self.label} is corrupt or truncated ({e.__class__.__name__}: {e})",
                             "remove the image and pull it again") from e
        if not chunk:
            self.eof = True
            return False
        self._hash.update(chunk)
        self._buf, self._off = chunk, 0
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_READ:
            # File data is copied in chunks; only a tar header (pax, GNU long
            # name) is read whole, and a header this big is an attack on memory.
            raise LayerError(f"{self.label} has a tar header of {n} bytes, more than the {MAX_READ} allowed",
                             "the layer is malformed; do not use this image")
        avail = len(self._buf) - self._off
        if n <= avail:
            out = self._buf[self._off:self._off + n]
            self._off += n
            self._pos += n
            if n == tarfile.BLOCKSIZE:
                self.last_block = out
            return out
        parts = [self._buf[self._off:]] if avail else []
        got = avail
        self._buf, self._off = b"", 0
        while got < n and self._more():
            take = min(n - got, len(self._buf))
            parts.append(self._buf if take == len(self._buf) else self._buf[:take])
            self._off = take
            got += take
        if self._off == len(self._buf):
            self._buf, self._off = b"", 0
        self._pos += got
        out = b"".join(parts)
        if n == tarfile.BLOCKSIZE:
            self.last_block = out
        return out

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd`` without extra copies."""
        while n:
            if self._off >= len(self._buf) and not self._more():
                raise LayerError(f"{self.label} is truncated (a file's data ends early)",
                                 "remove the image and pull it again")
            take = min(n, len(self._buf) - self._off)
            view = memoryview(self._buf)[self._off:self._off + take]
            while view:
                w = os.write(fd, view)
                view = view[w:]
            self._off += take
            self._pos += take
            n -= take

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise OSError(errno.ESPIPE, "a layer stream only seeks forward")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, _CHUNK)):
                break
        return self._pos

    def drain(self) -> str:
        """Read to the end (trailing padding counts for the diff ID); the sha256 digest."""
        self._pos += len(self._buf) - self._off
        while self._more():
            self._pos += len(self._buf)
        self._buf, self._off = b"", 0
        return "sha256:" + self._hash.hexdigest()


def open_layer(stream: BinaryIO, media_type: str, label: str,
               progress: Callable[[int], None] | None = None) -> TarSource:
    """A :class:`TarSource` over the uncompressed bytes of a layer blob stream."""
    raw: Any = _Counting(stream, progress) if progress else stream
    try:
        dec = _decompressor(raw, layer_compression(media_type))
    except Exception as e:
        raise LayerError(f"{label} cannot be decompressed ({e})", "remove the image and pull it again") from e
    return TarSource(dec, label)


def members(src: TarSource) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The tar entries of ``src`` in order; LayerError for a truncated or corrupt archive.

    The caller may consume a member's data (``src.copy_to``/``src.read``) before
    asking for the next one; unread data is skipped.
    """
    label = src.label
    try:
        tf = tarfile.TarFile(fileobj=src, mode="r", encoding="utf-8", errors="surrogateescape")  # type: ignore[call-overload]
        while (m := tf.next()) is not None:
            tf.members.clear()  # never accumulate headers: layers can have millions
            yield tf, m
    except tarfile.TarError as e:
        raise LayerError(f"{label} is not a valid tar archive ({e})", "remove the image and pull it again") from e
    # TarFile ends quietly at a short or garbled header; only zeros end an archive.
    if len(src.last_block) < tarfile.BLOCKSIZE or src.last_block.count(0) != tarfile.BLOCKSIZE:
        raise LayerError(f"{label} is truncated or corrupt (no end-of-archive marker)",
                         "remove the image and pull it again")
