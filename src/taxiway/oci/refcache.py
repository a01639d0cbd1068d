"""The store's fast path: what a reference resolved to, answered without opening the store.

:class:`taxiway.oci.store.Store` writes one record per reference it resolves
(``Store.image(ref)`` for the host platform) into ``<store>/.taxiway/refs.json``
(the store's bookkeeping directory, which skopeo and umoci ignore: the store stays a
plain OCI image layout). Each record is the manifest's descriptor and the image's
config. The file is valid only for the exact ``index.json`` it was resolved against:
it keeps a copy of that file's bytes, so any pull, tag, removal (or an edit by
another tool) makes every record a miss, with no inode or timestamp guesswork.
``Store.prune`` drops the file too, since it may remove an unnamed manifest a
digest reference pointed at. A record that doesn't parse is a miss, and the next
resolve rewrites the file.

Why it exists: importing :mod:`taxiway.oci.store` (dataclasses, hashlib, tempfile)
costs a warm ``taxiway run`` ~20 ms wall / ~37 ms CPU (bench/RESULTS.md, Machines,
issue 15), so this module imports only ``os``, ``json`` and ``taxiway.paths``;
callers on a start-up path use :func:`lookup` first, and the store only when they
miss (``machines/images.py`` opens the store by the digest only if layers are needed).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

CACHE_NAME = "refs.json"  # in the store's .taxiway/


def _root(root: str | os.PathLike | None) -> str:
    if root is None:
        from taxiway.paths import store_dir

        return str(store_dir())
    return os.fspath(root)


def cache_path(root: str | os.PathLike | None = None) -> str:
    """Where the store at ``root`` (default: ``$TAXIWAY_HOME/store``) keeps its reference cache."""
    return os.path.join(_root(root), ".taxiway", CACHE_NAME)


def index_text(root: str | os.PathLike | None = None) -> str | None:
    """The store's ``index.json`` as text (what records are keyed on), or None if it can't be read."""
    try:
        with open(os.path.join(_root(root), "index.json"), "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _load(root: str) -> dict[str, Any] | None:
    try:
        with open(cache_path(root), "rb") as f:
            cache = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(cache, dict) or not isinstance(cache.get("index"), str) or not isinstance(cache.get("refs"), dict):
        return None
    return cache


def lookup(ref: str, root: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(manifest digest, config)`` of ``ref`` (host platform) as the store resolved it, or None.

    None means "ask the store" (``Store.image`` / ``oci.pull.ensure_image``): never
    resolved, or the store's index changed since, or the cache file is unreadable.
    """
    rec = _record(ref, _root(root))
    return (rec["digest"], rec["config"]) if rec else None


def _record(ref: str, root: str) -> dict[str, Any] | None:
    cache = _load(root)
    if cache is None:
        return None
    rec = cache["refs"].get(ref)
    if not isinstance(rec, dict) or cache["index"] != index_text(root):
        return None
    if not (isinstance(rec.get("digest"), str) and isinstance(rec.get("config"), dict)
            and isinstance(rec.get("mediaType"), str) and isinstance(rec.get("size"), int)):
        return None
    return rec


def record(root: str | os.PathLike, index: str, ref: str, media_type: str, digest: str, size: int,
           config: dict[str, Any]) -> None:
    """Remember that ``ref`` resolved to this manifest while ``index.json`` read ``index`` (for the store).

    ``index`` must be read *before* resolving: if the index changes meanwhile, the
    record is keyed on the old text and is a miss, never a wrong hit.
    """
    from taxiway.fsutil import atomic_write

    root = os.fspath(root)
    cache = _load(root)
    if cache is None or cache["index"] != index:
        cache = {"index": index, "refs": {}}
    cache["refs"][ref] = {"mediaType": media_type, "digest": digest, "size": size, "config": config}
    with contextlib.suppress(OSError):
        # no fsync: a cache that doesn't parse after a power cut is a miss, then rewritten
        with atomic_write(cache_path(root), 0o644, fsync=False) as f:
            f.write(json.dumps(cache, separators=(",", ":")).encode())


def descriptor(ref: str, root: str | os.PathLike) -> tuple[str, str, int] | None:
    """``(media type, digest, size)`` of ``ref``'s manifest if cached (for ``Store.image``)."""
    rec = _record(ref, _root(root))
    return (rec["mediaType"], rec["digest"], rec["size"]) if rec else None


def drop(root: str | os.PathLike) -> None:
    """Forget every record (``Store.prune`` calls it: digest references may now dangle)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cache_path(root))
