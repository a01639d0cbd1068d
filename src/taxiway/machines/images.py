"""How images reach machines: through the store's API (``Store.image``, and
:func:`taxiway.oci.pull.ensure_image` to pull what it lacks), remembered.

Importing the store costs a warm ``taxiway run`` tens of ms (``taxiway.oci.store``
pulls in dataclasses, hashlib and tempfile), and ``ensure_image``'s module more
(httpx). So the store's answer for a reference (its manifest digest and config)
is remembered in ``machines/.images.json``, valid only while the store's
``index.json`` is the same file (same inode, size and mtime: every pull, tag or
removal replaces it by a rename). A remembered image opens the store only if its
layers are needed (a snapshot is missing). Measured (bench/RESULTS.md, issue 15):
without the memo a warm run took ~60 ms more wall time and ~48 ms more CPU under
load (103 -> 162 ms median), and 113 vs 91 ms wall, 111 vs 74 ms CPU on an idle
host (20:04 UTC), where podman took 442 ms: 0.26x instead of 0.21x (target <= 0.25x).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from taxiway.fsutil import atomic_write
from taxiway.machines.dirs import machines_dir

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, BinaryIO


class RememberedImage:
    """An image the store resolved earlier: its digest and config; the store is asked again only for layers."""

    def __init__(self, ref: str, digest: str, config: dict[str, Any]):
        self.ref, self._digest, self._config = ref, digest, config
        self._image: Any = None

    def digest(self) -> str:
        """The manifest digest."""
        return self._digest

    def config(self) -> dict[str, Any]:
        """The parsed config."""
        return self._config

    def _stored(self) -> Any:
        if self._image is None:
            self._image = from_store(self.ref)
        return self._image

    def layers(self) -> list[Any]:
        """Layer descriptors, base first (from the store)."""
        return self._stored().layers()

    def open_blob(self, digest: str) -> BinaryIO:
        """A blob's bytes (from the store)."""
        return self._stored().open_blob(digest)

    def __repr__(self) -> str:
        return self.ref


def _index_identity() -> list[int] | None:
    from taxiway.paths import store_dir

    try:
        st = os.stat(store_dir() / "index.json")
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _memo_path() -> Path:
    return machines_dir() / ".images.json"


def get_image(ref: str, progress: Any = None) -> Any:
    """The image ``ref`` from the local store, pulled first if it is missing (an ``oci.image.Image``)."""
    import json

    ident = _index_identity()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        memo = json.loads(_memo_path().read_bytes())
        if ident is not None and memo["index"] == ident and ref in memo["refs"]:
            hit = memo["refs"][ref]
            return RememberedImage(ref, hit["digest"], hit["config"])
    image = from_store(ref, progress)
    _remember(ref, image)
    return image


def from_store(ref: str, progress: Any = None) -> Any:
    """The store's image for ``ref``, pulled first (``oci.pull.ensure_image``) only if the store lacks it.

    ``Store.image`` first: the module of ``ensure_image`` imports the registry client (httpx,
    ~100 ms more of a start) even when nothing is pulled; a cold run (layers to unpack) and the
    first run after a pull would pay it (measured: bench/RESULTS.md, Machines, issue 15).
    """
    from taxiway.errors import NotFound
    from taxiway.oci.store import Store

    store = Store()
    try:
        return store.image(ref)
    except NotFound:
        from taxiway.oci.pull import ensure_image

        return ensure_image(ref, store=store, progress=progress)


def _remember(ref: str, image: Any) -> None:
    import json

    ident = _index_identity()
    if ident is None:
        return
    with contextlib.suppress(OSError, ValueError):
        try:
            memo = json.loads(_memo_path().read_bytes())
            if memo.get("index") != ident:
                raise ValueError
        except (OSError, ValueError):
            memo = {"index": ident, "refs": {}}
        memo["refs"][ref] = {"digest": image.digest(), "config": image.config()}
        # no fsync: a memo that does not parse after a power cut is only rebuilt
        with atomic_write(_memo_path(), 0o644, fsync=False) as f:
            f.write(json.dumps(memo).encode())
