"""What a /v2 request addresses: a pure parse of method and path.

The authorizer uses it to decide which repository and action a request needs
before any handler runs; the router then dispatches the rewritten path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taxiway.oci.reference import valid_repository

_PATTERNS = [  # same order as the routes in app.py
    ("tags", re.compile(r"^(?P<name>.+)/tags/list$")),
    ("manifest", re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)$")),
    ("upload", re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<ref>[^/]*)$")),
    ("blob", re.compile(r"^(?P<name>.+)/blobs/(?P<ref>[^/]+)$")),
    ("referrers", re.compile(r"^(?P<name>.+)/referrers/(?P<ref>[^/]+)$")),
]


@dataclass(frozen=True)
class Target:
    """kind: base, token, catalog, tags, manifest, upload, blob, referrers."""

    kind: str
    name: str = ""
    ref: str = ""
    action: str = "pull"
    name_valid: bool = True

    def rewritten_path(self, org: str) -> str:
        """The path with the repository name moved into ``org``'s namespace."""
        tail = {"tags": "tags/list", "manifest": f"manifests/{self.ref}", "upload": f"blobs/uploads/{self.ref}",
                "blob": f"blobs/{self.ref}", "referrers": f"referrers/{self.ref}"}[self.kind]
        return f"/v2/{org}/{self.name}/{tail}"


def action_for(method: str) -> str:
    if method in ("GET", "HEAD"):
        return "pull"
    if method == "DELETE":
        return "delete"
    return "push"


def classify(method: str, path: str) -> Target | None:
    """The target of a request, or None when the path is not a /v2 API path."""
    if path in ("/v2", "/v2/"):
        return Target("base")
    if not path.startswith("/v2/"):
        return None
    rest = path[4:]
    if rest == "token":
        return Target("token")
    if rest == "_catalog":
        return Target("catalog")
    for kind, rx in _PATTERNS:
        m = rx.match(rest)
        if m:
            name = m.group("name")
            return Target(kind, name, m.groupdict().get("ref") or "", action_for(method), valid_repository(name))
    return None
