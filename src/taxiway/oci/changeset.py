"""The OCI changeset rules, as pure functions: what a layer's tar entry means.

No file system here. :func:`entry_change` reads a tar entry's name the way the
image spec's "Applying changesets" does (``.wh.NAME`` deletes NAME from lower
layers, ``.wh..wh..opq`` hides a directory's lower children, other
``.wh..wh.`` names are aufs metadata); :func:`times_ns` and :func:`xattrs`
read the metadata a header carries. unpack applies these decisions to a
directory, scan replays them on a lexical tree.
"""

from __future__ import annotations

import base64
import tarfile
import urllib.parse
from typing import NamedTuple

from taxiway.oci.safepath import clean

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# What an entry does (Change.kind):
PATH = "path"  # make or replace ``parts``
ROOT = "root"  # the root itself (only a directory is allowed there)
WHITEOUT = "whiteout"  # delete ``parts`` from lower layers
OPAQUE = "opaque"  # hide the lower children of the directory ``parts``
AUFS_META = "aufs-meta"  # other ``.wh..wh.`` names: nothing to apply
EMPTY_WHITEOUT = "empty-whiteout"  # ``.wh.``, ``.wh..`` or ``.wh...``: names nothing


class Change(NamedTuple):
    """One entry's meaning: its kind and the path (inside the root) it is about."""

    kind: str
    parts: tuple[str, ...]


def entry_change(name: str) -> Change:
    """What the tar entry ``name`` does; ``parts`` never leaves the root (see :func:`_safepath.clean`)."""
    parts = clean(name)
    if not parts:
        return Change(ROOT, ())
    base = parts[-1]
    if not base.startswith(WHITEOUT_PREFIX):
        return Change(PATH, parts)
    if base == OPAQUE_MARKER:
        return Change(OPAQUE, parts[:-1])
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return Change(AUFS_META, parts)
    target = base[len(WHITEOUT_PREFIX):]
    if target in ("", ".", ".."):
        return Change(EMPTY_WHITEOUT, parts)
    return Change(WHITEOUT, parts[:-1] + (target,))


def times_ns(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in nanoseconds: pax's exact values when present, else the header's mtime."""
    def exact(key: str, fallback: float) -> int:
        s = m.pax_headers.get(key)
        if s:
            whole, _, frac = s.partition(".")
            try:
                neg = whole.startswith("-")
                ns = abs(int(whole)) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
                return -ns if neg else ns
            except ValueError:
                pass
        return int(fallback * 1_000_000_000)

    mt = exact("mtime", m.mtime)
    return exact("atime", mt / 1e9) if "atime" in m.pax_headers else mt, mt


def xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The extended attributes a header carries (SCHILY and LIBARCHIVE pax keys)."""
    # An empty pax value deletes the keyword (POSIX pax; Go's archive/tar agrees).
    out = []
    for k, v in m.pax_headers.items():
        if not v:
            continue
        if k.startswith("SCHILY.xattr."):
            out.append((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape")))
        elif k.startswith("LIBARCHIVE.xattr."):
            try:
                out.append((urllib.parse.unquote(k[len("LIBARCHIVE.xattr."):]), base64.b64decode(v)))
            except ValueError:
                continue
    return out
