"""How images reach machines: through the store's API only.

:func:`taxiway.oci.refcache.lookup` first (the store's own fast path: what the
store resolved a reference to, valid while its ``index.json`` is unchanged, answered
without importing the store), else ``Store.image``, else
:func:`taxiway.oci.pull.ensure_image` to pull what the store lacks. machines keep no
cache of their own: the store records every reference it resolves, so the next run
hits, and a hit opens the store (by the manifest digest) only if layers are needed. Measured (bench/RESULTS.md, Machines, issue 15): without the fast path a warm
run took 113 vs 91 ms wall (0.26x instead of 0.21x podman; target <= 0.25x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, BinaryIO


class ResolvedImage:
    """The store's answer from its fast path (digest and config); the store itself is
    opened only for layers or blobs, by digest, so it is the same manifest even if the
    name moved meanwhile. Holds nothing beyond what ``refcache.lookup`` returned."""

    def __init__(self, ref: str, digest: str, config: dict[str, Any]):
        self.ref, self._digest, self._config = ref, digest, config
        self._image: Any = None

    def digest(self) -> str:
        """The manifest digest."""
        return self._digest

    def config(self) -> dict[str, Any]:
        """The parsed config."""
        return self._config

    def stored(self) -> Any:
        """The store's own image (a ``StoreImage``) for this manifest."""
        if self._image is None:
            from taxiway.oci.store import Store

            self._image = Store().image(self._digest)
        return self._image

    def layers(self) -> list[Any]:
        """Layer descriptors, base first (from the store)."""
        return self.stored().layers()

    def open_blob(self, digest: str) -> BinaryIO:
        """A blob's bytes (from the store)."""
        return self.stored().open_blob(digest)

    def __repr__(self) -> str:
        return self.ref


def get_image(ref: str, progress: Any = None) -> Any:
    """The image ``ref`` from the local store, pulled first if it is missing (an ``oci.image.Image``)."""
    from taxiway.oci.refcache import lookup

    hit = lookup(ref)
    return ResolvedImage(ref, *hit) if hit else from_store(ref, progress)


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
