"""Reproducible layers: the same files give the same tar and the same gzip, byte for byte.

Entries are sorted, every mtime is ``SOURCE_DATE_EPOCH`` (default 1980-01-01
00:00:01, as the CNB lifecycle does), owners are fixed numbers without names,
no atime/ctime, and the gzip header carries no timestamp or name. Compression
uses ISA-L (the ``isal`` package): about ten times zlib's speed, same format.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import isal_zlib

from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Descriptor

#: 1980-01-01T00:00:01Z: the CNB lifecycle's fixed time (and valid in zip files, unlike 0).
DEFAULT_EPOCH = 315532801
GZIP_LEVEL = 1


def source_date_epoch() -> int:
    """``$SOURCE_DATE_EPOCH`` when set (reproducible-builds.org), else the CNB default."""
    v = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(v) if v.isdigit() else DEFAULT_EPOCH


@dataclass(frozen=True)
class Layer:
    """A layer blob in the store: its descriptor (compressed) and diff_id (uncompressed)."""

    descriptor: Descriptor
    diff_id: str

    @property
    def digest(self) -> str:
        return self.descriptor.digest


@dataclass(frozen=True)
class Entry:
    """One tar entry to write: ``src`` is a host path (files) or ``data`` the content."""

    name: str
    kind: str  # file, dir, symlink
    mode: int = 0o644
    src: Path | None = None
    data: bytes | None = None
    linkname: str = ""
    size: int = 0


def walk(root: Path, prefix: str, exclude: Callable[[str], bool] | None = None) -> Iterator[Entry]:
    """Entries for everything under ``root``, named ``prefix/<relative path>``, in sorted order.

    Hard links become regular files and sockets/devices are skipped, so the result
    does not depend on how the tree was made.
    """
    prefix = prefix.strip("/")
    stack = [(root, prefix)]
    while stack:
        d, name = stack.pop()
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        subdirs = []
        for n in names:
            p = d / n
            arc = f"{name}/{n}" if name else n
            if exclude is not None and exclude(arc):
                continue
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISDIR(m):
                yield Entry(arc, "dir", stat.S_IMODE(m))
                subdirs.append((p, arc))
            elif stat.S_ISREG(m):
                yield Entry(arc, "file", stat.S_IMODE(m), src=p, size=st.st_size)
            elif stat.S_ISLNK(m):
                yield Entry(arc, "symlink", 0o777, linkname=os.readlink(p))
        # depth-first in sorted order: push in reverse so the smallest name comes out first
        stack.extend(reversed(subdirs))


def parents(prefix: str, mode: int = 0o755) -> list[Entry]:
    """Directory entries for every ancestor of ``prefix`` (``a``, ``a/b`` for ``a/b/c``)."""
    parts = [p for p in prefix.strip("/").split("/") if p]
    return [Entry("/".join(parts[: i + 1]), "dir", mode) for i in range(len(parts))]


def fingerprint(root: Path) -> str:
    """A cheap digest of a tree's names, sizes, modes and mtimes: equal means "tar it the same"."""
    h = hashlib.sha256()
    for e in walk(root, ""):
        st = os.lstat(e.src) if e.src else None
        # Names as bytes (os.fsencode): a file name that is not UTF-8 is fingerprinted like any other.
        h.update(os.fsencode(e.name) + f"\0{e.kind}\0{e.mode}\0".encode() + os.fsencode(e.linkname)
                 + f"\0{e.size}\0{st.st_mtime_ns if st else 0}\n".encode())
    return h.hexdigest()


class _Sink(io.RawIOBase):
    """Tar bytes in; diff_id and digest computed while gzip output goes to ``out``."""

    def __init__(self, out: BinaryIO, level: int):
        self.out = out
        self.diff = hashlib.sha256()
        self.dig = hashlib.sha256()
        self.z = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)  # 31: gzip wrapper, mtime 0, no name
        self.size = 0
        self.pos = 0

    def tell(self) -> int:
        return self.pos

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        b = bytes(b)
        self.diff.update(b)
        self.pos += len(b)
        self._emit(self.z.compress(b))
        return len(b)

    def _emit(self, c: bytes) -> None:
        if c:
            self.dig.update(c)
            self.out.write(c)
            self.size += len(c)

    def finish(self) -> None:
        self._emit(self.z.flush())


def write_tar(out: BinaryIO, entries: Iterable[Entry], uid: int = 0, gid: int = 0, mtime: int | None = None) -> None:
    """Write ``entries`` as an uncompressed tar to ``out`` with fixed owners and mtimes."""
    mtime = source_date_epoch() if mtime is None else mtime
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, uid, gid, "", ""
            ti.mode = e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.linkname
                tf.addfile(ti)
            elif e.data is not None:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                assert e.src is not None
                with open(e.src, "rb") as f:
                    ti.size = os.fstat(f.fileno()).st_size
                    tf.addfile(ti, f)


def store_layer(store, entries: Iterable[Entry], uid: int = 0, gid: int = 0, mtime: int | None = None,
                level: int = GZIP_LEVEL) -> Layer:
    """Write a gzip layer made of ``entries`` into the store; returns it with its diff_id."""
    return store_tar_stream(store, lambda sink: write_tar(sink, entries, uid, gid, mtime), level)


def store_tar_stream(store, produce: Callable[[BinaryIO], None], level: int = GZIP_LEVEL) -> Layer:
    """Gzip whatever ``produce`` writes as tar into a new store blob (hashed once, renamed when complete)."""
    fd, tmp = tempfile.mkstemp(prefix="layer-", suffix=".tmp", dir=store.meta / "ingest")
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, level)
            produce(sink)  # type: ignore[arg-type]
            sink.finish()
        digest = "sha256:" + sink.dig.hexdigest()
        if store.has_blob(digest):
            os.unlink(tmp)
        else:
            os.replace(tmp, store.ingest_path(digest))
            store.commit_ingest(digest, sink.size, hashed=digest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Layer(Descriptor(mt.OCI_LAYER_GZIP, digest, sink.size), "sha256:" + sink.diff.hexdigest())


def store_dir_layer(store, root: Path, prefix: str, uid: int = 0, gid: int = 0, *,
                    exclude: Callable[[str], bool] | None = None, with_parents: bool = True) -> Layer:
    """A layer holding the tree at ``root`` under ``/prefix`` (with its parent directories)."""
    def entries() -> Iterator[Entry]:
        if with_parents:
            yield from parents(prefix)
        yield from walk(root, prefix, exclude)

    return store_layer(store, entries(), uid, gid)


def store_tarball_layer(store, tar_path: Path, level: int = GZIP_LEVEL) -> Layer:
    """A layer from an existing uncompressed tar file (e.g. mmdebstrap's output), copied verbatim."""
    def produce(sink: BinaryIO) -> None:
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 20):
                sink.write(chunk)

    return store_tar_stream(store, produce, level)
