"""Layer I/O, once for pull, unpack, scan, archive and the builder: sniff, decompress, compress, hash.

* :func:`sniff`: the compression a layer really uses. Magic bytes win over the
  media type (registries serve gzip under a plain-tar media type), so every
  reader agrees on what a blob is.
* :class:`LayerReader`: a forward-only file over a layer's uncompressed tar,
  decompressed and hashed (the diff ID) in threads a bounded queue ahead of
  the tar parser; :func:`members` walks its entries. Used by unpack and scan.
* :class:`DiffHasher`: push-style, for bytes as they arrive (pull, load):
  decompress and hash with a bound on the output held at once;
  :class:`BlobChecker` runs one (and the blob's own digest) in a thread
  beside a download.
* :class:`HashThread`: sha256 beside the decompressor.
* :class:`LayerWriter`: the writing side (the builder): tar bytes in, a
  reproducible gzip layer out, its diff ID and digest hashed on the way.
* :class:`LayerError`: the one error for bad layer bytes (corrupt, truncated,
  not a tar, or not the config's diff ID); its message names the layer.

isal (gzip) and zstandard are imported lazily (archive.py opens whole tarballs
with them too, sniffed with :func:`magic`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import os
import queue
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from taxiway.errors import TaxiwayError
from taxiway.oci.mediatypes import layer_compression

__all__ = ["LayerError", "REPULL", "sniff", "magic", "decompress", "DiffHasher", "HashThread", "BlobChecker",
           "LayerReader", "open_layer", "members", "MAX_READ", "LayerWriter"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The fix for a bad layer in the store.
REPULL = "remove the image (`taxiway image rm`) and pull it again"

_CHUNK = 1 << 20
MAX_READ = 64 << 20  # the most LayerReader.read() hands out at once (headers; capped file samples)
MAX_INFLATE = 1 << 20  # decompressed bytes DiffHasher holds at once
ZSTD_SLICE = 512  # zstd input per decompress call (see DiffHasher._unzstd)
_INFLATED_QUEUE = 8  # decompressed chunks (<= _CHUNK each) waiting for the tar parser


class LayerError(TaxiwayError):
    """A layer's bytes are bad: corrupt, truncated, not a tar archive, or not the diff ID its config says."""


# --------------------------------------------------------------------------
# What a blob is


def magic(head: bytes) -> str | None:
    """The compression named by a stream's first 4 bytes: gzip, zstd, bzip2, xz; None for none known."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:4] == b"\xfd7zX":
        return "xz"
    return None


def sniff(head: bytes, media_type: str) -> str:
    """'gzip', 'zstd' or 'none' for a layer: its magic bytes if they say gzip or zstd, else its media type.

    Only gzip and zstd are sniffed: a plain tar starts with a file name, which may be "BZh...".
    """
    found = magic(head)
    return found if found in ("gzip", "zstd") else layer_compression(media_type)


def decompress(raw: Any, compression: str) -> Any:
    """A reader of the decompressed bytes of ``raw`` (anything with ``read``); ``raw`` itself for 'none'."""
    if compression == "gzip":
        from isal import igzip

        return igzip.IGzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK, read_across_frames=True)
    if compression == "none":
        return raw
    raise ValueError(f"unknown layer compression {compression!r}")


class _Head:
    """Reads a stream's first bytes for :func:`sniff`, then hands them out again before the rest."""

    def __init__(self, raw: Any, n: int = 4):
        self._raw = raw
        head = b""
        while len(head) < n and (b := raw.read(n - len(head))):
            head += b
        self.head = head

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self._raw.read(n)
        if n is not None and 0 <= n < len(self.head):
            out, self.head = self.head[:n], self.head[n:]
            return out
        head, self.head = self.head, b""
        if n is None or n < 0:
            return head + self._raw.read()
        return head + self._raw.read(n - len(head)) if n > len(head) else head

    def readinto(self, buf: Any) -> int:
        if not self.head and hasattr(self._raw, "readinto"):
            return self._raw.readinto(buf) or 0
        b = self.read(len(buf))
        buf[:len(b)] = b
        return len(b)


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


# --------------------------------------------------------------------------
# Hashing


class HashThread:
    """sha256 in a thread of its own: update() hands the bytes over, hexdigest() waits for the end.

    For a layer's diff ID (its inflated stream is ~3x its download): hashing
    beside the decompressor (hashlib releases the GIL on big buffers) takes it
    off the pull's and the export's critical path. At most ``budget`` bytes
    wait (or one bigger chunk: zstd hands over up to 16 MiB at once).
    """

    def __init__(self, budget: int = 8 << 20, name: str = "diffhash") -> None:
        self._budget = budget
        self._h = hashlib.sha256()
        self._cv = threading.Condition()
        self._items: collections.deque[bytes] = collections.deque()
        self._bytes = 0  # handed over and not yet hashed
        self._closed = False
        self._t = threading.Thread(target=self._work, name=name, daemon=True)
        self._t.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return
                chunk = self._items.popleft()
            self._h.update(chunk)
            with self._cv:
                self._bytes -= len(chunk)
                self._cv.notify_all()

    def update(self, chunk: bytes) -> None:
        """Hand ``chunk`` over (waits while the budget is spent)."""
        if not chunk:
            return
        with self._cv:
            while self._bytes and self._bytes + len(chunk) > self._budget:
                self._cv.wait()
            self._items.append(chunk)
            self._bytes += len(chunk)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the thread once what was handed over is hashed (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._t.join()

    def hexdigest(self) -> str:
        """The digest of everything handed over (waits for the thread)."""
        self.close()
        return self._h.hexdigest()


class DiffHasher:
    """Decompresses a layer fed chunk by chunk and hashes the tar inside (its diff ID).

    The compression is sniffed from the first bytes (``declared``, a media
    type's 'gzip'/'zstd'/'none', only when they name none). ``h`` is anything
    with ``update`` and ``hexdigest`` (a :class:`HashThread` takes hashing off
    this thread). Bad bytes raise :class:`LayerError` naming ``label``.
    """

    def __init__(self, declared: str = "none", h: Any = None, *, label: str = "layer", hint: str = REPULL):
        self.declared = declared
        self.compression: str | None = None  # known after the first 4 bytes
        self.h = h if h is not None else hashlib.sha256()
        self.label, self.hint = label, hint
        self._head = b""
        self._d: Any = None

    def _start(self, head: bytes) -> None:
        self.compression = magic(head) if magic(head) in ("gzip", "zstd") else self.declared
        self._reset()

    def _reset(self) -> None:
        if self.compression == "gzip":
            from isal import isal_zlib

            self._d = isal_zlib.decompressobj(wbits=31)
        elif self.compression == "zstd":
            import zstandard

            self._d = zstandard.ZstdDecompressor().decompressobj()
        else:
            self._d = None

    def update(self, chunk: bytes) -> None:
        """Feed the next compressed bytes."""
        if self.compression is None:
            self._head += chunk
            if len(self._head) < 4:
                return
            chunk, self._head = self._head, b""
            self._start(chunk)
        if self._d is None:
            self.h.update(chunk)
            return
        try:
            while chunk:
                if self._d.eof:
                    if not chunk.strip(b"\0"):
                        return  # zero padding after the last gzip member
                    self._reset()  # a multi-member gzip: the next member starts here
                chunk = self._inflate(chunk) if self.compression == "gzip" else self._unzstd(chunk)
        except Exception as e:
            raise LayerError(f"{self.label} is not valid {self.compression} data ({e})", self.hint) from e

    def _inflate(self, chunk: bytes) -> bytes:
        """Hash what ``chunk`` inflates to, at most MAX_INFLATE bytes at a time; returns the input left over.

        Without the bound one chunk of a very compressible layer (a big file of
        zeros: deflate reaches 1:1000) became one bytes object 1000 times its
        size, 256 MiB for a 256 KiB chunk resumed from disk.
        """
        out = self._d.decompress(chunk, MAX_INFLATE)
        self.h.update(out)
        while len(out) == MAX_INFLATE and not self._d.unconsumed_tail and not self._d.eof:
            out = self._d.decompress(b"", MAX_INFLATE)  # output still pending inside the inflater
            self.h.update(out)
        return self._d.unused_data if self._d.eof else self._d.unconsumed_tail

    def _unzstd(self, chunk: bytes) -> bytes:
        """Hash what ``chunk`` decompresses to; returns what follows the frame if it ended.

        zstd's decompressobj has no output limit, so it gets the input in
        ZSTD_SLICE pieces: a zstd block (at least 4 bytes) yields at most 128 KiB,
        so a piece yields at most 32 KiB per byte (16 MiB), where a whole chunk of
        a layer of zeros would yield hundreds of MiB.
        """
        view = memoryview(chunk)
        for i in range(0, len(view), ZSTD_SLICE):
            self.h.update(self._d.decompress(view[i:i + ZSTD_SLICE]))
            if self._d.eof:
                return self._d.unused_data + bytes(view[i + ZSTD_SLICE:])
        return b""

    def finish(self) -> str:
        """The digest of the uncompressed content; LayerError for a truncated stream."""
        if self.compression is None:
            head, self._head = self._head, b""
            self._start(head)
            self.update(head)
        if self._d is not None and not self._d.eof:
            raise LayerError(f"{self.label} is a truncated {self.compression} stream", self.hint)
        return "sha256:" + self.h.hexdigest()


# --------------------------------------------------------------------------
# Reading a layer's tar


class _Inflater:
    """Reads, decompresses and hashes a layer in a thread of its own, a bounded queue ahead of the parser.

    isal, zstandard and hashlib release the GIL on big buffers, so on two or
    more cores decompression and the diff ID overlap with parsing and writing
    instead of adding to them. Memory stays bounded by the queue.
    """

    def __init__(self, stream: BinaryIO, media_type: str, label: str, hint: str,
                 progress: Callable[[int], None] | None):
        self.label, self.hint = label, hint
        self._raw: Any = _Counting(stream, progress) if progress else stream
        self._media_type = media_type
        self._hash = HashThread(name="layer-diffhash")
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_INFLATED_QUEUE)
        self._stop = False
        self._done = False
        self._t = threading.Thread(target=self._work, name="layer-inflate", daemon=True)
        self._t.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop:
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            try:
                raw = _Head(self._raw)
                compression = sniff(raw.head, self._media_type)
                dec = decompress(raw, compression)
            except Exception as e:
                raise LayerError(f"{self.label} cannot be read ({e.__class__.__name__}: {e})", self.hint) from e
            while not self._stop:
                try:
                    chunk = dec.read(_CHUNK)
                except Exception as e:  # gzip/zstd/IO errors all mean "this layer is broken"
                    raise LayerError(f"{self.label} is corrupt or truncated ({compression}: "
                                     f"{e.__class__.__name__}: {e})", self.hint) from e
                if chunk:
                    self._hash.update(chunk)
                if not self._put(chunk) or not chunk:
                    return
        except BaseException as e:
            self._put(e)

    def read(self) -> bytes:
        """The next decompressed chunk; b"" at the end."""
        if self._done:
            return b""
        item = self._q.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def digest(self) -> str:
        """sha256 of everything decompressed (call after the end was read)."""
        self._t.join()
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        """Stop the thread (idempotent; a blocked put gives up within 0.1 s)."""
        self._stop = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._t.join()
        self._hash.close()


class LayerReader:
    """A forward-only file over a layer's uncompressed tar, for ``tarfile`` and for copying file data.

    ``tell``/forward ``seek`` are all TarFile needs in ``r`` mode; file data
    goes straight from the decompressor's chunks to the destination fd. Close
    it (or use it as a context manager) to stop its threads early.
    """

    def __init__(self, stream: BinaryIO, media_type: str, label: str, *, hint: str = REPULL,
                 progress: Callable[[int], None] | None = None):
        self.label, self.hint = label, hint
        self._inflater = _Inflater(stream, media_type, label, hint, progress)
        self._buf = b""
        self._off = 0
        self._pos = 0
        self.eof = False
        self.last_block = b""  # the last header TarFile read: all zeros at a proper end

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decompressing threads (a no-op after a full read)."""
        self._inflater.close()

    def _more(self) -> bool:
        chunk = self._inflater.read()
        if not chunk:
            self.eof = True
            return False
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

    def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes of a file's data; LayerError if the layer ends first."""
        data = self.read(n)
        if len(data) != n:
            raise LayerError(f"{self.label} is truncated (a file's data ends early)", self.hint)
        return data

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd`` without extra copies."""
        while n:
            if self._off >= len(self._buf) and not self._more():
                raise LayerError(f"{self.label} is truncated (a file's data ends early)", self.hint)
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
        return self._inflater.digest()


def open_layer(stream: BinaryIO, media_type: str, label: str, progress: Callable[[int], None] | None = None,
               *, hint: str = REPULL) -> LayerReader:
    """A :class:`LayerReader` over a layer blob stream; ``progress(n)`` gets compressed bytes read."""
    return LayerReader(stream, media_type, label, hint=hint, progress=progress)


def members(src: LayerReader) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The tar entries of ``src`` in order; LayerError for a truncated or corrupt archive.

    The caller may consume a member's data (``src.copy_to``/``src.read``) before
    asking for the next one; unread data is skipped.
    """
    label = src.label
    complete = False  # the last member's data (and padding) were all there
    try:
        tf = tarfile.TarFile(fileobj=src, mode="r", encoding="utf-8", errors="surrogateescape")  # type: ignore[call-overload]
        while (m := tf.next()) is not None:
            tf.members.clear()  # never accumulate headers: layers can have millions
            yield tf, m
            complete = False
            if not m.issparse():
                end = m.offset_data + (m.size if tf.offset > m.offset_data else 0)
                if src.tell() < end and src.seek(end) != end:
                    raise LayerError(f"{label} is truncated (a file's data ends early)", src.hint)
                want = tf.offset - src.tell()
                pad = src.read(want) if want > 0 else b""
                complete = True
                if len(pad) < want:  # the stream ended in the padding (umoci's layers)
                    src.last_block = pad
                    break
    except tarfile.TarError as e:
        raise LayerError(f"{label} is not a valid tar archive ({e})", src.hint) from e
    # TarFile ends quietly at a short or garbled header; only zeros end an archive. Some
    # writers (umoci, opencontainers/umoci#436) stop after the last member's data without
    # padding or the two zero blocks: GNU tar and Go's reader take that, and so do we
    # when that member was whole and nothing but zeros follows it.
    zeros = src.last_block.count(0) == len(src.last_block)
    if not zeros or (len(src.last_block) < tarfile.BLOCKSIZE and not (complete and src.eof)):
        raise LayerError(f"{label} is truncated or corrupt (no end-of-archive marker)", src.hint)


# --------------------------------------------------------------------------
# Checking a blob while it downloads

VERIFY_CHUNK = 256 << 10
FEED_BATCH = 1 << 20  # received bytes handed to the checking thread at once (fewer thread switches)


class BlobChecker:
    """Hashes a blob (and, with ``diff``, its uncompressed content) in a worker thread, as bytes arrive.

    The download loop only hands chunks over (through a bounded queue, so
    memory stays small), so checking overlaps with the network. ``diff`` is
    the layer's declared compression ('gzip', 'zstd', 'none'; sniffed anyway)
    or None for a blob that is not checked beyond its digest.
    """

    def __init__(self, diff: str | None, *, label: str = "layer", hint: str = REPULL):
        self.diff = diff
        self.h = hashlib.sha256()
        self.dh: DiffHasher | None = None
        self._hasher: HashThread | None = None
        self.broken: LayerError | None = None
        self.fed = 0
        self._label, self._hint = label, hint
        # Bounded: at most 8 batches (<= 8 MiB) wait per blob, whatever its size.
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._pending: list[bytes] = []  # received, not yet handed over (< FEED_BATCH bytes)
        self._pending_n = 0
        self._t = threading.Thread(target=self._work, name="blob-check", daemon=True)
        self._t.start()

    def _work(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.h.update(chunk)
            if self.diff is not None and self.broken is None:
                try:
                    if self.dh is None:
                        # inflate here, hash the output in another thread (a plain tar: here)
                        self._hasher = HashThread() if magic(chunk) in ("gzip", "zstd") or self.diff != "none" else None
                        self.dh = DiffHasher(self.diff, self._hasher, label=self._label, hint=self._hint)
                    self.dh.update(chunk)
                except LayerError as e:
                    self.broken = e

    def feed(self, chunk: bytes) -> None:
        """Account for the next ``chunk`` of the blob."""
        self.fed += len(chunk)
        self._pending.append(chunk)
        self._pending_n += len(chunk)
        if self._pending_n >= FEED_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._q.put(self._pending[0] if len(self._pending) == 1 else b"".join(self._pending))
            self._pending, self._pending_n = [], 0

    def feed_file(self, path: os.PathLike[str] | str, upto: int) -> None:
        """Feed bytes already on disk, from where we are up to ``upto``."""
        with open(path, "rb") as f:
            f.seek(self.fed)
            while self.fed < upto and (chunk := f.read(min(VERIFY_CHUNK, upto - self.fed))):
                self.feed(chunk)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()
        if self._hasher is not None:
            self._hasher.close()

    def finish(self) -> tuple[str, str | LayerError | None]:
        """(digest of the blob, digest of its uncompressed content or the LayerError that stopped it)."""
        self._flush()
        self.close()
        digest = "sha256:" + self.h.hexdigest()
        if self.diff is None:
            return digest, None
        if self.broken is not None:
            return digest, self.broken
        try:
            return digest, (self.dh or DiffHasher(self.diff, label=self._label, hint=self._hint)).finish()
        except LayerError as e:
            return digest, e


# --------------------------------------------------------------------------
# Writing a layer


class LayerWriter(io.RawIOBase):
    """Uncompressed tar bytes in, a gzip layer out to ``out``; the diff ID and digest are hashed as bytes pass.

    The same tar always gives the same gzip bytes: ISA-L's deflate (about ten
    times zlib's speed, same format) with a header that carries no mtime and
    no name. ``check`` is called before each write (a deadline): what it
    raises stops the write, and the caller removes what was written.
    """

    def __init__(self, out: BinaryIO, level: int = 1, check: Callable[[], object] | None = None):
        from isal import isal_zlib

        self.out, self.check = out, check
        self._diff = hashlib.sha256()
        self._dig = hashlib.sha256()
        self._z = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)  # 31: gzip wrapper, mtime 0, no name
        self.size = 0  # compressed bytes written so far
        self._pos = 0

    def tell(self) -> int:
        """Uncompressed bytes taken so far (tarfile asks)."""
        return self._pos

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        """Compress and hash ``b``."""
        b = bytes(b)
        if self.check is not None:
            self.check()
        self._diff.update(b)
        self._pos += len(b)
        self._emit(self._z.compress(b))
        return len(b)

    def _emit(self, c: bytes) -> None:
        if c:
            self._dig.update(c)
            self.out.write(c)
            self.size += len(c)

    def finish(self) -> None:
        """Write the end of the gzip stream; :attr:`digest` and :attr:`size` are final after it."""
        self._emit(self._z.flush())

    @property
    def digest(self) -> str:
        """``sha256:`` of the gzip bytes (the layer's blob digest)."""
        return "sha256:" + self._dig.hexdigest()

    @property
    def diff_id(self) -> str:
        """``sha256:`` of the tar bytes (the layer's diff ID)."""
        return "sha256:" + self._diff.hexdigest()
