"""The one model of an image shared by pull, push, store, build and run.

Like go-containerregistry's ``v1.Image``: a remote image, an image in the
local OCI layout and an image being assembled by the builder all satisfy
:class:`Image`, so copying is "read one Image, write it elsewhere" and the
representation decides where bytes come from, never the callers.

New images are made from others as go-containerregistry's ``mutate`` makes
them: :func:`append_layers`, :func:`set_config` and :func:`rebase` each return
a :class:`MutatedImage` (nothing is written), and :func:`write_image` puts one
into a store. Their manifest and config are canonical JSON, so the same
inputs always give the same digest.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, runtime_checkable

from taxiway.oci import mediatypes as mt


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant] as in image indexes."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, s: str) -> Platform:
        from taxiway.errors import InvalidInput

        parts = s.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"invalid platform {s!r}", "a platform looks like os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        import platform as _p

        m = _p.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)
        return cls("linux", arch, "v7" if arch == "arm" else None)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Platform:
        return cls(d.get("os", ""), d.get("architecture", ""), d.get("variant") or None)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d

    def matches(self, other: Platform) -> bool:
        """True if ``other`` (from an index) satisfies this requested platform.

        A request without a variant matches any variant; arm64 treats a
        missing variant as v8.
        """
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if self.variant is None:
            return True
        ov = other.variant or ("v8" if other.architecture == "arm64" else None)
        return self.variant == ov

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = field(default=None, hash=False, compare=False)
    platform: Platform | None = None
    urls: tuple[str, ...] | None = None
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Descriptor:
        from taxiway.errors import InvalidInput
        from taxiway.oci.digest import Digest

        try:
            digest = str(Digest.parse(d["digest"]))
            size = int(d["size"])
            media_type = str(d.get("mediaType", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"malformed descriptor {d!r}", "the manifest is corrupt") from e
        if size < 0:
            raise InvalidInput(f"negative size in descriptor {digest}", "the manifest is corrupt")
        p = d.get("platform")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=d.get("annotations"),
            platform=Platform.from_json(p) if isinstance(p, dict) else None,
            urls=tuple(d["urls"]) if d.get("urls") else None,
            artifact_type=d.get("artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_json()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d

    @property
    def is_nondistributable(self) -> bool:
        return self.media_type in mt.NONDISTRIBUTABLE


@runtime_checkable
class Image(Protocol):
    """A single-platform image: a manifest, a config and ordered layers."""

    def manifest_bytes(self) -> bytes:
        """The raw manifest, exactly as its digest was computed."""

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest."""

    def media_type(self) -> str:
        """The manifest's media type (OCI or Docker schema 2)."""

    def digest(self) -> str:
        """The manifest digest, ``sha256:...``."""

    def config_bytes(self) -> bytes:
        """The raw config blob."""

    def config(self) -> dict[str, Any]:
        """The parsed image config (``config``, ``rootfs``, ``history``...)."""

    def layers(self) -> list[Descriptor]:
        """Layer descriptors, oldest (base) first."""

    def open_blob(self, digest: str) -> BinaryIO:
        """A readable stream of a blob's (compressed) bytes."""


def iter_chunks(f: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    """Read a binary stream in chunks."""
    while True:
        b = f.read(size)
        if not b:
            return
        yield b


# --------------------------------------------------------------------------
# Making images from images (go-containerregistry's mutate)


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and no spaces: the same object always gives the same bytes (and digest)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _diff_ids(cfg: dict[str, Any]) -> list[str]:
    return list((cfg.get("rootfs") or {}).get("diff_ids") or [])


@dataclass(frozen=True)
class Addendum:
    """A layer to append: its (compressed) descriptor, its diff ID, its history entry and where its bytes are.

    ``opener`` may be left out when the layer is already in the store the image
    will be written to (a builder writes its layers there as it makes them).
    """

    layer: Descriptor
    diff_id: str
    history: dict[str, Any] | None = None
    opener: Callable[[], BinaryIO] | None = field(default=None, compare=False)


class MutatedImage:
    """An image made by :func:`append_layers`, :func:`set_config`, :func:`rebase` or :func:`empty_image`.

    It lives in memory until :func:`write_image`: an OCI manifest over
    ``layers`` and ``config``, and for each layer where its bytes come from.
    """

    def __init__(self, config: dict[str, Any], layers: list[Descriptor],
                 sources: dict[str, Callable[[], BinaryIO]]):
        from taxiway.errors import InvalidInput

        if len(_diff_ids(config)) != len(layers):
            # A config whose diff IDs do not match the layers would be refused by every runtime.
            raise InvalidInput(f"an image config lists {len(_diff_ids(config))} diff IDs for {len(layers)} layers",
                               "the base image is corrupt; pull or build it again")
        self._config_bytes = canonical_json(config)
        self._layers = list(layers)
        self._sources = dict(sources)
        self._config_desc = Descriptor(mt.OCI_CONFIG, _sha256(self._config_bytes), len(self._config_bytes))
        self._manifest = {
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": self._config_desc.to_json(),
            # A layer descriptor without a media type (an Addendum made by hand) is taken as gzip, as the builder writes.
            "layers": [{**d.to_json(), "mediaType": d.media_type or mt.OCI_LAYER_GZIP} for d in layers],
        }
        self._manifest_bytes = canonical_json(self._manifest)
        self._digest = _sha256(self._manifest_bytes)

    def manifest_bytes(self) -> bytes:
        """The raw manifest (canonical JSON)."""
        return self._manifest_bytes

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest (a copy)."""
        return json.loads(self._manifest_bytes)

    def media_type(self) -> str:
        """Always an OCI manifest."""
        return mt.OCI_MANIFEST

    def digest(self) -> str:
        """The manifest digest."""
        return self._digest

    def config_descriptor(self) -> Descriptor:
        """The config's descriptor."""
        return self._config_desc

    def config_bytes(self) -> bytes:
        """The raw config (canonical JSON)."""
        return self._config_bytes

    def config(self) -> dict[str, Any]:
        """The parsed config: a fresh copy the caller may edit and hand to :func:`set_config`."""
        return json.loads(self._config_bytes)

    def layers(self) -> list[Descriptor]:
        """Layer descriptors, base first."""
        return list(self._layers)

    def open_blob(self, digest: str) -> BinaryIO:
        """The config, the manifest, or a layer from where it came from (its base image or its opener)."""
        if digest == self._config_desc.digest:
            return io.BytesIO(self._config_bytes)
        if digest == self._digest:
            return io.BytesIO(self._manifest_bytes)
        src = self._sources.get(digest)
        if src is None:
            from taxiway.errors import NotFound

            raise NotFound(f"blob {digest} is not part of image {self._digest}",
                           "give the layer's Addendum an opener, or write its blob to the store first")
        return src()

    def __repr__(self) -> str:
        return f"MutatedImage({self._digest}, {len(self._layers)} layers)"


def _sources_of(img: Image, layers: list[Descriptor]) -> dict[str, Callable[[], BinaryIO]]:
    return {d.digest: functools.partial(img.open_blob, d.digest) for d in layers}


def empty_image(platform: Platform | None = None) -> MutatedImage:
    """An image with no layers (go-containerregistry's ``empty.Image``): the base of an image made from scratch."""
    p = platform or Platform()
    return MutatedImage({**p.to_json(), "rootfs": {"type": "layers", "diff_ids": []}}, [], {})


def append_layers(base: Image, *adds: Addendum) -> MutatedImage:
    """``base`` with ``adds`` on top: each adds a layer, its diff ID to ``rootfs`` and its entry to ``history``."""
    from taxiway.oci.digest import Digest

    for a in adds:
        Digest.parse(a.diff_id)
        Digest.parse(a.layer.digest)
    cfg = base.config()
    layers = base.layers()
    sources = _sources_of(base, layers)
    rootfs = dict(cfg.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = _diff_ids(cfg) + [a.diff_id for a in adds]
    cfg["rootfs"] = rootfs
    cfg["history"] = list(cfg.get("history") or []) + [dict(a.history or {}) for a in adds]
    for a in adds:
        if a.opener is not None:
            sources[a.layer.digest] = a.opener
        else:
            # Left to the base's store (see Addendum): a StoreImage opens any blob its store has.
            sources.setdefault(a.layer.digest, functools.partial(base.open_blob, a.layer.digest))
    return MutatedImage(cfg, [*layers, *(a.layer for a in adds)], sources)


def set_config(base: Image, config: dict[str, Any]) -> MutatedImage:
    """``base`` with its config replaced by ``config`` (go's ``mutate.ConfigFile``); the layers stay.

    ``config`` keeps ``base``'s ``rootfs`` when it has none, and may not name
    other diff IDs: layers change only through :func:`append_layers` and :func:`rebase`.
    """
    have = base.config().get("rootfs") or {"type": "layers", "diff_ids": []}
    cfg = json.loads(canonical_json(config))  # a copy the caller cannot change under us
    if "rootfs" not in cfg:
        cfg["rootfs"] = have
    elif _diff_ids(cfg) != list(have.get("diff_ids") or []):
        raise ValueError("set_config cannot change rootfs.diff_ids; use append_layers or rebase to change layers")
    layers = base.layers()
    return MutatedImage(cfg, layers, _sources_of(base, layers))


def _top_history(history: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The history entries of the last ``n`` layers: from the n-th last entry that made a layer to the end."""
    if n == 0:
        return []
    seen = 0
    for i in range(len(history) - 1, -1, -1):
        if not history[i].get("empty_layer"):
            seen += 1
            if seen == n:
                return history[i:]
    return list(history)


#: Config keys that describe the platform: a rebased image takes them from its new base.
_PLATFORM_KEYS = ("architecture", "os", "variant", "os.version", "os.features")


def rebase(orig: Image, base_layers: int, new_base: Image) -> MutatedImage:
    """``orig`` with its first ``base_layers`` layers (its old base) replaced by ``new_base``'s layers.

    As go's ``mutate.Rebase``: the top layers keep their digests and history
    entries, the config stays ``orig``'s but for the platform, which is the
    new base's. go takes the old base image and checks it is a prefix; here
    the caller says how many layers it had (a built image records its base's
    top layer, and the old base may be gone from the store).
    """
    ocfg, ncfg = orig.config(), new_base.config()
    olayers = orig.layers()
    if not 0 <= base_layers <= len(olayers):
        raise ValueError(f"base_layers={base_layers} but the image has {len(olayers)} layers")
    top = olayers[base_layers:]
    cfg = ocfg
    for k in _PLATFORM_KEYS:
        if k in ncfg:
            cfg[k] = ncfg[k]
        elif k not in ("architecture", "os"):
            cfg.pop(k, None)
    rootfs = dict(ocfg.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = _diff_ids(ncfg) + _diff_ids(ocfg)[base_layers:]
    cfg["rootfs"] = rootfs
    cfg["history"] = list(ncfg.get("history") or []) + _top_history(list(ocfg.get("history") or []), len(top))
    nlayers = new_base.layers()
    sources = {**_sources_of(new_base, nlayers), **_sources_of(orig, top)}
    return MutatedImage(cfg, [*nlayers, *top], sources)


class BlobStore(Protocol):
    """Where :func:`write_image` puts blobs (the local store is one)."""

    def has_blob(self, digest: str) -> bool:
        """True if the blob is there."""

    def write_blob(self, data: bytes | BinaryIO, expected_digest: str | None = None, expected_size: int | None = None,
                   media_type: str = ...) -> Descriptor:
        """Store a blob, verified against the expected digest and size."""


def write_image(store: BlobStore, img: Image) -> Descriptor:
    """Put ``img``'s missing layers, its config and its manifest into ``store``; returns the manifest descriptor.

    Layers the store has are not read (a rebuild rewrites nothing it needn't);
    every blob written is verified against the digest the manifest names.
    """
    for d in img.layers():
        if not store.has_blob(d.digest):
            with img.open_blob(d.digest) as f:
                store.write_blob(f, expected_digest=d.digest, expected_size=d.size, media_type=d.media_type)
    raw = img.manifest_bytes()
    cdesc = Descriptor.from_json(img.manifest().get("config") or {})
    # With the digests known up front the store skips blobs it has.
    store.write_blob(img.config_bytes(), expected_digest=cdesc.digest, expected_size=cdesc.size, media_type=cdesc.media_type)
    store.write_blob(raw, expected_digest=img.digest(), expected_size=len(raw), media_type=img.media_type())
    return Descriptor(img.media_type(), img.digest(), len(raw))
