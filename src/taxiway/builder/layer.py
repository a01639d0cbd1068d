"""Reproducible layers: the same files give the same tar and the same gzip, byte for byte.

Entries are sorted, every mtime is ``SOURCE_DATE_EPOCH`` (default 1980-01-01
00:00:01, as the CNB lifecycle does), owners are fixed numbers without names,
no atime/ctime, and the gzip header carries no timestamp or name (the
compression is ``taxiway.oci.layerio.LayerWriter``, ISA-L's gzip).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from taxiway.oci import mediatypes as mt
from taxiway.oci.image import Addendum, Descriptor
from taxiway.oci.layerio import LayerWriter

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

    def addendum(self, created_by: str) -> Addendum:
        """This layer as the image model appends it (it is in the store already), with a fixed-time history entry."""
        from taxiway.builder.assemble import history

        return Addendum(self.descriptor, self.diff_id, history(created_by))


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


# A file whose (inode, size, mtime, ctime) is unchanged has unchanged bytes.
# mtime alone is not enough (``touch -d`` puts it back after an edit of the same size), but ctime
# is set by the kernel on every write, chmod and utime and cannot be set back without changing
# the clock; the inode tells a copy made since from the file that was hashed.
def stat_key(st: os.stat_result) -> list[int]:
    """The part of a file's stat that changes whenever its bytes can have changed."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class TreeHash:
    """The content fingerprint of a tree (names, kinds, modes, link targets and file bytes), entry by entry.

    ``files`` maps each regular file's name to its stat key and sha256, so the next
    fingerprint of the same tree reads only the files whose stat key changed.
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.h = hashlib.sha256()
        self.files: dict[str, list] = {}

    def add(self, e: Entry, sha: str = "", key: list[int] | None = None) -> None:
        """Take one entry (named with ``prefix``; others, such as parent folders, are left out)."""
        if not e.name.startswith(self.prefix):
            return
        name = e.name[len(self.prefix):]
        if key is not None:
            self.files[name] = [*key, sha]
        # Names as bytes (os.fsencode): a file name that is not UTF-8 is fingerprinted like any other.
        self.h.update(os.fsencode(name) + f"\0{e.kind}\0{e.mode}\0".encode() + os.fsencode(e.linkname)
                      + f"\0{e.size}\0{sha}\n".encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _open_file(path: Path) -> tuple[int, os.stat_result]:
    """Open a file the walk saw as regular, never through a link, never blocking on a fifo put in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(f"{path} changed while it was read: it is no longer a regular file")
    return fd, st


def fingerprint(root: Path, known: dict[str, list] | None = None,
                check: Callable[[], object] | None = None) -> TreeHash:
    """The content fingerprint of the tree at ``root``: equal means "tar it the same".

    File bytes are hashed, except where ``known`` (a previous ``TreeHash.files``)
    has the file with the same stat key; ``check`` is called between files (a deadline).
    """
    known = known or {}
    t = TreeHash()
    for e in walk(root, ""):
        if e.src is None:
            t.add(e)
            continue
        if check is not None:
            check()
        st = os.lstat(e.src)
        key = stat_key(st)
        rec = known.get(e.name)
        if rec is not None and rec[:4] == key and stat.S_ISREG(st.st_mode):
            t.add(e, rec[4], key)
            continue
        fd, st = _open_file(e.src)
        h = hashlib.sha256()
        try:
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
                if check is not None:
                    check()
        finally:
            os.close(fd)
        t.add(Entry(e.name, e.kind, stat.S_IMODE(st.st_mode), src=e.src, size=st.st_size), h.hexdigest(), stat_key(st))
    return t


class _HashingReader:
    """A file read by tarfile, hashed on the way (the fingerprint of a layer costs no second read)."""

    def __init__(self, f: BinaryIO):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


def write_tar(out: BinaryIO, entries: Iterable[Entry], uid: int = 0, gid: int = 0, mtime: int | None = None,
              tree: TreeHash | None = None) -> None:
    """Write ``entries`` as an uncompressed tar to ``out`` with fixed owners and mtimes.

    Files are opened without following links (the tree may be a hostile build's
    output). ``tree`` gets each entry and each file's sha256 as it is written.
    """
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
                fd, st = _open_file(e.src)
                with os.fdopen(fd, "rb") as f:
                    ti.size = st.st_size
                    ti.mode = stat.S_IMODE(st.st_mode)
                    r = _HashingReader(f) if tree is not None else None
                    tf.addfile(ti, r or f)  # type: ignore[arg-type]
                if r is not None and tree is not None:
                    tree.add(Entry(e.name, "file", ti.mode, src=e.src, size=st.st_size), r.h.hexdigest(), stat_key(st))
                continue
            if tree is not None:
                tree.add(e)


def store_layer(store, entries: Iterable[Entry], uid: int = 0, gid: int = 0, mtime: int | None = None,
                level: int = GZIP_LEVEL, *, tree: TreeHash | None = None,
                check: Callable[[], object] | None = None) -> Layer:
    """Write a gzip layer made of ``entries`` into the store; returns it with its diff_id."""
    return store_tar_stream(store, lambda sink: write_tar(sink, entries, uid, gid, mtime, tree), level, check=check)


def store_tar_stream(store, produce: Callable[[BinaryIO], None], level: int = GZIP_LEVEL,
                     check: Callable[[], object] | None = None) -> Layer:
    """Gzip whatever ``produce`` writes as tar into a new store blob (hashed once, renamed when complete).

    ``check`` is called as bytes are written; whatever it raises stops the write and
    removes the temp file. A writer killed outright leaves its (locked) temp file to
    the store's next write, which prunes it.
    """
    fd, tmp = store.temp_file("layer-")
    try:
        with os.fdopen(fd, "wb") as f:
            sink = LayerWriter(f, level, check)
            produce(sink)  # type: ignore[arg-type]
            sink.finish()
        digest = sink.digest
        if store.has_blob(digest):
            os.unlink(tmp)
        else:
            os.replace(tmp, store.ingest_path(digest))
            store.commit_ingest(digest, sink.size, hashed=digest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Layer(Descriptor(mt.OCI_LAYER_GZIP, digest, sink.size), sink.diff_id)


def store_dir_layer(store, root: Path, prefix: str, uid: int = 0, gid: int = 0, *,
                    exclude: Callable[[str], bool] | None = None, with_parents: bool = True,
                    tree: TreeHash | None = None, check: Callable[[], object] | None = None) -> Layer:
    """A layer holding the tree at ``root`` under ``/prefix`` (with its parent directories).

    With ``tree`` (a ``TreeHash(prefix)``), the tree's fingerprint is taken while it is written.
    """
    def entries() -> Iterator[Entry]:
        if with_parents:
            yield from parents(prefix)
        yield from walk(root, prefix, exclude)

    return store_layer(store, entries(), uid, gid, tree=tree, check=check)


def store_tarball_layer(store, tar_path: Path, level: int = GZIP_LEVEL) -> Layer:
    """A layer from an existing uncompressed tar file (e.g. mmdebstrap's output), copied verbatim."""
    def produce(sink: BinaryIO) -> None:
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 20):
                sink.write(chunk)

    return store_tar_stream(store, produce, level)
