"""The authorizer: ASGI middleware in front of every /v2 handler.

It resolves the credentials (a bearer token from the token endpoint, or an org
token given directly with basic auth) to an org, checks the action on the
repository the request names, and rewrites the path so the handlers only ever
see ``<org>/<name>``. Another org's content therefore can't even be named.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import orjson

from taxiway.registry import tokens
from taxiway.registry.errors import DistributionError
from taxiway.registry.paths import classify
from taxiway.registry.tenants import Tenants

API_HEADER = (b"docker-distribution-api-version", b"registry/2.0")


@dataclass(frozen=True)
class Identity:
    org: str
    token_scope: str
    access: list[dict] | None  # None: an org token given directly, org-wide
    repository: str | None = None  # the token is limited to this repository (tenants.Token.repository)

    def may(self, name: str, action: str) -> bool:
        if self.repository is not None and name != self.repository:
            return False
        if self.access is None:
            return action in tokens.SCOPE_ACTIONS.get(self.token_scope, ())
        return tokens.permits(self.access, "repository", name, action)

    def may_catalog(self) -> bool:
        if self.repository is not None:
            return False
        return self.access is None or tokens.permits(self.access, "registry", "catalog", "*")


def basic_password(header: str) -> str | None:
    """The password of a Basic authorization header (the user name is ignored)."""
    if not header[:6].lower() == "basic ":
        return None
    try:
        user_pass = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return user_pass.partition(":")[2] if ":" in user_pass else None


async def send_error(send, err: DistributionError, head: bool = False) -> None:
    body = b"" if head else orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), API_HEADER]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Authorizer:
    """Checks the token, the action and the rewritten name of every /v2 request."""

    def __init__(self, app, *, tenants: Tenants | None, key: bytes, service: str, realm: str | None = None):
        self.app = app
        self.tenants = tenants  # None: no authentication, names are not rewritten
        self.key = key
        self.service = service
        self.realm = realm

    def _realm(self, scope) -> str:
        if self.realm:
            return self.realm
        host = "localhost"
        for k, v in scope["headers"]:
            if k == b"host":
                host = v.decode("latin-1")
                break
        return f"{scope.get('scheme', 'http')}://{host}/v2/token"

    def _challenge(self, scope, target, error: str | None = None) -> dict[str, str]:
        parts = [f'realm="{self._realm(scope)}"', f'service="{self.service}"']
        if target.kind == "catalog":
            parts.append('scope="registry:catalog:*"')
        elif target.name and target.name_valid:
            actions = "pull" if target.action == "pull" else f"pull,{target.action}"
            parts.append(f'scope="repository:{target.name}:{actions}"')
        if error:
            parts.append(f'error="{error}"')
        return {"WWW-Authenticate": "Bearer " + ",".join(parts)}

    def identify(self, authorization: str) -> Identity | None:
        """Who the credentials belong to, or None when they are missing or no longer valid."""
        assert self.tenants is not None
        if authorization[:7].lower() == "bearer ":
            try:
                claims = tokens.verify(authorization[7:].strip(), self.key, time.time(), self.service)
            except tokens.BadToken:
                return None
            tok = self.tenants.get(str(claims.get("tid", "")))
            if tok is None or not tok.active() or tok.org != claims.get("sub"):
                return None  # revoked or expired since the bearer token was issued
            access = claims.get("access")
            return Identity(tok.org, tok.scope, access if isinstance(access, list) else [], tok.repository)
        password = basic_password(authorization)
        if password is not None:
            tok = self.tenants.authenticate(password)
            if tok is not None:
                return Identity(tok.org, tok.scope, None, tok.repository)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_api_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [API_HEADER]
            await send(message)

        method = scope["method"]
        target = classify(method, scope["path"])
        state = scope.setdefault("state", {})
        head = method == "HEAD"
        if target is None:  # never let an unparsed path reach a handler unauthenticated
            return await send_error(send, DistributionError("NAME_UNKNOWN", message="no such API endpoint"), head)
        if target.kind == "token":
            return await self.app(scope, receive, send_with_api_header)
        if target.name and not target.name_valid:
            return await send_error(send, DistributionError("NAME_INVALID", detail={"name": target.name[:300]}), head)
        if self.tenants is None:
            state.update(org=None, identity=None, client_name=target.name)
            return await self.app(scope, receive, send_with_api_header)

        authorization = ""
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v.decode("latin-1")
                break
        ident = self.identify(authorization) if authorization else None
        if ident is None:
            return await send_error(send, DistributionError("UNAUTHORIZED", headers=self._challenge(scope, target)), head)
        state.update(org=ident.org, identity=ident, client_name=target.name)
        if target.kind == "base":
            return await self.app(scope, receive, send_with_api_header)
        if target.kind == "catalog":
            if not ident.may_catalog():
                return await send_error(send, DistributionError(
                    "UNAUTHORIZED", headers=self._challenge(scope, target, "insufficient_scope")), head)
            return await self.app(scope, receive, send_with_api_header)
        if not ident.may(target.name, target.action):
            if target.action in tokens.SCOPE_ACTIONS.get(ident.token_scope, ()):
                # The org token allows it; this bearer token was just issued for less.
                err = DistributionError("UNAUTHORIZED", headers=self._challenge(scope, target, "insufficient_scope"))
            else:
                err = DistributionError("DENIED", detail={"action": target.action, "scope": ident.token_scope})
            return await send_error(send, err, head)
        if len(ident.org) + 1 + len(target.name) > 255:  # org/name must stay a valid name
            return await send_error(send, DistributionError("NAME_INVALID", detail="name too long"), head)
        new_path = target.rewritten_path(ident.org)
        scope["path"] = new_path
        scope["raw_path"] = new_path.encode()
        return await self.app(scope, receive, send_with_api_header)
