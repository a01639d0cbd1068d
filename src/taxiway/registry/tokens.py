"""Bearer tokens for the Docker token flow: scopes, grants and HS256 signatures.

Pure functions: they take data (and the signing key) and return decisions, so
hypothesis can exercise them without a server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import orjson

from taxiway.oci.reference import valid_repository

#: What an org token's scope allows.
SCOPE_ACTIONS: dict[str, frozenset[str]] = {
    "pull": frozenset({"pull"}),
    "push": frozenset({"pull", "push", "delete"}),
}

_SCOPE_RE = re.compile(r"^([a-z0-9]+)(?:\([a-z0-9]+\))?:(.+):([a-z*,]*)$")


@dataclass(frozen=True)
class Scope:
    """One requested scope, e.g. ``repository:web:pull,push``."""

    type: str
    name: str
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


def parse_scope(s: str) -> Scope | None:
    """Parse a scope string; None for anything malformed (it is simply not granted)."""
    m = _SCOPE_RE.match(s)
    if not m:
        return None
    typ, name, actions = m.groups()
    if typ == "repository" and not valid_repository(name):
        return None
    return Scope(typ, name, frozenset(a for a in actions.split(",") if a))


def grant(requested: list[str], token_scope: str, repository: str | None = None) -> list[dict]:
    """The access list a token with ``token_scope`` gets for the ``requested`` scopes; a token
    limited to ``repository`` gets nothing on any other repository, nor the catalog."""
    allowed = SCOPE_ACTIONS.get(token_scope, frozenset())
    access: list[dict] = []
    for raw in requested:
        for piece in raw.split(" "):
            sc = parse_scope(piece)
            if sc is None:
                continue
            if repository is not None and (sc.type != "repository" or sc.name != repository):
                continue
            if sc.type == "repository":
                actions = sc.actions & allowed
                if "*" in sc.actions:
                    actions = set(allowed)
            elif sc.type == "registry" and sc.name == "catalog":
                actions = sc.actions & {"*"}
            else:
                continue
            if actions:
                access.append({"type": sc.type, "name": sc.name, "actions": sorted(actions)})
    return access


def permits(access: list[dict], typ: str, name: str, action: str) -> bool:
    """True if the access list grants ``action`` on ``typ:name``."""
    for a in access:
        if a.get("type") == typ and a.get("name") == name:
            acts = a.get("actions") or []
            if action in acts or "*" in acts:
                return True
    return False


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


_HEADER = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))


def sign(claims: dict, key: bytes) -> str:
    """A compact JWT (HS256) carrying ``claims``."""
    body = f"{_HEADER}.{_b64(orjson.dumps(claims))}"
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


class BadToken(Exception):
    """The token is malformed, forged, expired or for another service."""


def verify(token: str, key: bytes, now: float, audience: str | None = None) -> dict:
    """The claims of a valid token; raises BadToken otherwise."""
    try:
        header, payload, mac = token.split(".")
        if header != _HEADER:
            raise BadToken("unsupported token header")
        expect = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expect, _unb64(mac)):
            raise BadToken("bad signature")
        claims = orjson.loads(_unb64(payload))
    except BadToken:
        raise
    except Exception as e:  # any malformed input is just a bad token
        raise BadToken("malformed token") from e
    if not isinstance(claims, dict):
        raise BadToken("malformed claims")
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int | float) or now >= exp:
        raise BadToken("token expired")
    if isinstance(nbf, int | float) and now + 30 < nbf:
        raise BadToken("token not yet valid")
    if audience is not None and claims.get("aud") != audience:
        raise BadToken("token for another service")
    return claims


def hmac_state(data: dict, key: bytes) -> str:
    """Upload session state for a URL: the data and its MAC, url-safe."""
    payload = _b64(orjson.dumps(data))
    mac = hmac.new(key, b"upload:" + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def check_state(state: str, key: bytes) -> dict | None:
    """The data of a state string signed with ``key``, or None if forged or malformed."""
    try:
        payload, mac = state.split(".")
        expect = hmac.new(key, b"upload:" + payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expect, _unb64(mac)):
            return None
        data = orjson.loads(_unb64(payload))
        return data if isinstance(data, dict) else None
    except Exception:
        return None


def new_secret() -> str:
    return secrets.token_urlsafe(32)
