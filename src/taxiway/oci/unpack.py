"""Apply OCI layers safely onto a root directory: export, snapshots, builds.

The pieces: :mod:`taxiway.oci.layerio` reads a layer (sniffs its compression,
decompresses and hashes it in threads, parses its tar headers);
:mod:`taxiway.oci.changeset` says what each entry means (the whiteout rules,
pure); :mod:`taxiway.oci.applier` does it to the directory, safely. This module
puts them together for one layer (:func:`apply_layer`) and for a whole image
(:func:`export`).

Semantics follow the OCI image spec's "Applying changesets": ``.wh.NAME``
deletes NAME from lower layers, ``.wh..wh..opq`` hides a directory's lower
children, later entries replace earlier ones, and a directory entry over an
existing directory merges.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.oci.applier import DEFAULT_WORKERS, Applier, LayerStats
from taxiway.oci.changeset import OPAQUE_MARKER, WHITEOUT_PREFIX
from taxiway.oci.image import Image
from taxiway.oci.layerio import REPULL, LayerError, LayerReader, members
from taxiway.oci.progress import Progress
from taxiway.oci.safepath import RootFS, rmtree_at

__all__ = ["LayerError", "LayerStats", "ExportStats", "apply_layer", "export", "chain_ids",
           "WHITEOUT_PREFIX", "OPAQUE_MARKER"]


@dataclass
class ExportStats:
    """What exporting an image did, layer by layer."""

    dest: str
    layers: list[LayerStats] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.layers)

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.layers for w in s.warnings]

    def to_json(self) -> dict[str, Any]:
        keys = ("entries", "files", "dirs", "symlinks", "hardlinks", "devices", "fifos", "whiteouts",
                "bytes", "tar_bytes", "skipped")
        return {"dest": self.dest, **{k: self.total(k) for k in keys},
                "layers": [s.to_json() for s in self.layers]}


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs of a layer stack: ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))."""
    from taxiway.oci.digest import Digest

    out: list[str] = []
    for d in diff_ids:
        d = str(Digest.parse(d))
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def apply_layer(root: Path | str, stream: BinaryIO, media_type: str, *, diff_id: str | None = None,
                same_owner: bool | None = None, progress: Callable[[int], None] | None = None,
                resolver: str | None = None, name: str | None = None, workers: int | None = None) -> LayerStats:
    """Apply one (compressed) layer onto the existing directory ``root``, safely.

    The compression (gzip, zstd or none) is sniffed from the first bytes,
    ``media_type`` deciding only when they name none.
    ``diff_id``, when given, is checked against the uncompressed stream
    (LayerError on mismatch; the root is then partly changed, so callers
    apply into a scratch directory). ``same_owner`` (default: when root)
    applies uid/gid. ``progress(n)`` is called with compressed bytes read.
    ``resolver`` forces "openat2" or "walk" (default: openat2 when available).
    ``workers`` threads write small new files (default 2; 0 writes inline).
    Entries that would leave the root are resolved inside it or skipped with
    a warning in the returned :class:`LayerStats`.
    """
    label = name or f"layer ({media_type})"
    if same_owner is None:
        same_owner = os.geteuid() == 0
    src = LayerReader(stream, media_type, label, progress=progress)
    stats = LayerStats()
    with src:  # stops the reader's threads if anything below fails
        try:
            with RootFS(root, resolver=resolver) as fs:
                ap = Applier(fs, stats, same_owner, DEFAULT_WORKERS if workers is None else workers)
                if ap.pool is not None:
                    fs.before_slow_path = ap.drain
                fs.before_mkdir = ap.before_mkdir
                try:
                    if not os.listdir(fs.rootfd):
                        ap.fresh.add(())
                    for tf, m in members(src):
                        fs.release()
                        ap.entry(tf, m, src)
                    ap.finish()
                finally:
                    ap.close()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TaxiwayError(f"no space left on the device holding {root} while applying {label}",
                                   "free some disk space and try again") from e
            raise TaxiwayError(f"cannot write {root} while applying {label}: {e.strerror or e}",
                               "check that the directory is writable") from e
        stats.diff_id = src.drain()
    stats.tar_bytes = src.tell()
    if diff_id is not None and stats.diff_id != diff_id:
        raise LayerError(f"{label}: uncompressed content is {stats.diff_id}, the image config says {diff_id}", REPULL)
    return stats


def export(image: Image, dest: Path | str, progress: Progress | None = None, *,
           verify: bool = True, resolver: str | None = None, workers: int | None = None) -> ExportStats:
    """Apply all layers of ``image``, oldest first, into a new directory ``dest``.

    ``dest`` must not exist or be an empty directory; the rootfs is built in
    a temporary sibling and renamed into place, so ``dest`` never holds half
    an image. ``verify`` checks each layer's diff ID against the config.
    ``progress(descriptor, n)`` reports compressed bytes consumed.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InvalidInput(f"{dest} exists and is not an empty directory",
                           "export into a new or empty directory")
    layers = image.layers()
    diff_ids: list[str | None] = [None] * len(layers)
    if verify:
        cfg_ids = (image.config().get("rootfs") or {}).get("diff_ids") or []
        if len(cfg_ids) != len(layers):
            raise LayerError(f"image {image.digest()} has {len(layers)} layers but {len(cfg_ids)} diff IDs", REPULL)
        diff_ids = list(cfg_ids)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".export", dir=dest.parent))
    os.chmod(tmp, 0o755)
    stats = ExportStats(dest=str(dest))
    try:
        for i, desc in enumerate(layers):
            cb = (lambda n, d=desc: progress(d, n)) if progress else None
            with image.open_blob(desc.digest) as f:
                stats.layers.append(apply_layer(tmp, f, desc.media_type, diff_id=diff_ids[i], progress=cb,
                                                resolver=resolver, workers=workers,
                                                name=f"layer {i} ({desc.digest[:19]})"))
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            pfd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                rmtree_at(pfd, tmp.name)
            finally:
                os.close(pfd)
        raise
    return stats
