"""Org bearer tokens for the platform API: scopes, hashed storage, constant-time checks.

A token is ``tw_<id>_<secret>``: the id (16 hex digits) names the record in the
TOKENS bucket, the secret (43 url-safe characters) is shown once and only its
sha256 is stored, so a copy of the state does not hold usable tokens. A secret
has 256 random bits, so a plain sha256 (no slow KDF) is enough: there is nothing
to guess. Comparison is constant-time.

Scopes (schema.SCOPES):

- ``admin``  the whole org: apps, machines, tokens; ``platform: true`` on a token
  also lets it create orgs (the one ``taxiway up`` makes).
- ``deploy`` one app (``app``): every verb on that app, nothing else.
- ``read``   GETs of everything in the org.

The policy (:func:`allows`) is a pure function of the token record and the
request, so it is tested without a server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from taxiway.errors import InvalidInput, NotFound
from taxiway.platform import schema

PREFIX = "tw_"
_READ_METHODS = frozenset({"GET", "HEAD"})


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token string, else None (never raises)."""
    if not token.startswith(PREFIX):
        return None
    tid, sep, secret = token[len(PREFIX):].partition("_")
    if not sep or len(tid) != 16 or len(secret) < 16 or len(secret) > 128:
        return None
    try:
        int(tid, 16)
    except ValueError:
        return None
    return tid, secret


def check(record: dict[str, Any] | None, secret: str) -> bool:
    """True if ``secret`` matches the record's hash (constant time) and the token is live."""
    if not record or record.get("revoked"):
        return False
    exp = record.get("expires_at")
    if exp is not None and time.time() >= exp:
        return False
    return hmac.compare_digest(_hash(secret), str(record.get("hash", "")))


def validate_scope(scope: str, app: str | None) -> None:
    """Raise InvalidInput unless ``scope``/``app`` make a valid token request."""
    if scope not in schema.SCOPES:
        raise InvalidInput(f"unknown token scope {scope!r}", f"use one of {', '.join(schema.SCOPES)}")
    if scope == "deploy" and not app:
        raise InvalidInput("a deploy token needs an app", "pass the app it may deploy")
    if scope != "deploy" and app:
        raise InvalidInput(f"a {scope} token is org-wide and takes no app", "leave the app out, or use scope deploy")
    if app is not None and not schema.valid_app_name(app):
        raise InvalidInput(f"invalid app name {app!r}", "lowercase letters, digits and '-'")


def new_record(org: str, scope: str, app: str | None = None, name: str = "", *, platform: bool = False,
               ttl: float | None = None) -> tuple[dict[str, Any], str]:
    """A token record (to store) and the token string (to show once)."""
    validate_scope(scope, app)
    tid = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    now = time.time()
    rec = {"id": tid, "org": org, "scope": scope, "app": app, "name": name, "hash": _hash(secret),
           "created_at": now, "expires_at": now + ttl if ttl else None, "platform": bool(platform and scope == "admin"),
           "revoked": False}
    return rec, f"{PREFIX}{tid}_{secret}"


def public(record: dict[str, Any]) -> dict[str, Any]:
    """What may be shown of a token record: everything but the hash."""
    return {k: v for k, v in record.items() if k != "hash"}


def allows(record: dict[str, Any], method: str, app: str | None, *, destroys_app: bool = False) -> bool:
    """May this token make a ``method`` request about ``app`` (None: org-level) in its own org?

    ``destroys_app``: the request deletes the app itself, which a deploy token may not.

    Org membership is checked by the caller (another org's app is a 404, so
    names do not leak); this is only the scope's rule.
    """
    scope = record.get("scope")
    if scope == "admin":
        return True
    if scope == "read":
        return method in _READ_METHODS
    if scope == "deploy":
        return app is not None and app == record.get("app") and not destroys_app
    return False


# -- storage (async, over platform.state) ------------------------------------------------------

async def create(state: Any, org: str, scope: str, app: str | None = None, name: str = "", *,
                 platform: bool = False, ttl: float | None = None) -> tuple[dict[str, Any], str]:
    """Store a new token for ``org``; returns its public record and the token string (shown once)."""
    rec, token = new_record(org, scope, app, name, platform=platform, ttl=ttl)
    await state.put(schema.TOKENS, rec["id"], rec, revision=0)
    return public(rec), token


async def authenticate(state: Any, token: str) -> dict[str, Any] | None:
    """The token's record if ``token`` is valid and live, else None."""
    parsed = parse(token)
    if parsed is None:
        return None
    tid, secret = parsed
    got = await state.get(schema.TOKENS, tid)
    rec = got[0] if got else None
    # Check even for an unknown id, so timing does not tell ids that exist from those that don't.
    ok = check(rec or {"hash": "0" * 64}, secret)
    return rec if ok and rec else None


async def list_tokens(state: Any, org: str) -> list[dict[str, Any]]:
    """The org's tokens (public records), oldest first."""
    out = [public(v) for _, v, _ in await state.items(schema.TOKENS) if v.get("org") == org]
    return sorted(out, key=lambda r: r.get("created_at") or 0)


async def revoke(state: Any, org: str, tid: str) -> dict[str, Any]:
    """Revoke the org's token ``tid`` (kept, marked revoked); NotFound for another org's."""
    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if not old or old.get("org") != org:
            raise NotFound(f"no token {tid!r} in org {org}", "list them with GET /v1/tokens")
        return None if old.get("revoked") else {**old, "revoked": True, "revoked_at": time.time()}

    return public(await state.update(schema.TOKENS, tid, change))
