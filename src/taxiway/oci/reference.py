"""Image references: ``[registry[:port]/]repository[:tag][@digest]``.

Follows the distribution reference grammar that docker, podman and skopeo use:
the first component is a registry when it contains ``.`` or ``:`` or is
``localhost``; otherwise the default registry (docker.io, with ``library/``
for one-component names) is implied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from taxiway.errors import InvalidInput
from taxiway.oci.digest import Digest

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$")


def valid_repository(name: str) -> bool:
    """True if ``name`` is a valid repository path (as the distribution spec defines it)."""
    return len(name) <= 255 and bool(_NAME_RE.match(name))


def valid_tag(tag: str) -> bool:
    return bool(_TAG_RE.match(tag))


@dataclass(frozen=True)
class Reference:
    """A parsed image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, s: str) -> Reference:
        """Parse a reference; raises InvalidInput with the grammar on failure."""
        hint = "an image reference looks like [registry[:port]/]name[:tag][@sha256:...]"
        if not s or len(s) > 4096 or s != s.strip():
            raise InvalidInput(f"invalid image reference {s!r}", hint)
        rest, digest = s, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            Digest.parse(digest)
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not valid_tag(tag):
                raise InvalidInput(f"invalid tag {tag!r} in {s!r}", "tags are up to 128 characters of [A-Za-z0-9_.-]")
        parts = rest.split("/", 1)
        if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")):
            registry, repo = parts
            if not _HOST_RE.match(registry):
                raise InvalidInput(f"invalid registry {registry!r} in {s!r}", hint)
        else:
            registry, repo = DEFAULT_REGISTRY, rest
            if "/" not in repo:
                repo = f"library/{repo}"
        if not valid_repository(repo):
            raise InvalidInput(f"invalid repository name {repo!r} in {s!r}", "names are lowercase [a-z0-9] components separated by /, ., _ or -")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repo, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What to put in ``/v2/<name>/manifests/<identifier>``: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def is_loopback(self) -> bool:
        """True for registries on localhost / 127.0.0.0/8 / ::1 (plain HTTP is allowed there)."""
        host = self.registry
        if host.startswith("["):
            host = host[1 : host.index("]")]
        else:
            host = host.rsplit(":", 1)[0]
        if host == "localhost" or host.endswith(".localhost"):
            return True
        import ipaddress

        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
