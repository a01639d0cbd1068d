"""The one model of an image shared by pull, push, store, build and run.

Like go-containerregistry's ``v1.Image``: a remote image, an image in the
local OCI layout and an image being assembled by the builder all satisfy
:class:`Image`, so copying is "read one Image, write it elsewhere" and the
representation decides where bytes come from, never the callers.
"""

from __future__ import annotations

from collections.abc import Iterator
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
