"""The platform's HTTP API, shaped like Fly's Machines API (the only writer of desired state).

    python -m taxiway.platform.api --nats nats://127.0.0.1:4222 --listen 127.0.0.1:4280

Authentication and scopes are ASGI middleware (:class:`Auth`), as the registry
does it: a handler only ever runs for a live token whose scope allows the
method on the app the path names. Handlers then check that the app belongs to
the token's org and answer 404 otherwise, so another org's names never leak.

Machines: the API writes the MACHINES record (desired state), then asks the
host's agent (``agent.<host>.<verb>``, request/reply). When no agent answers
the API says so with a 503 and puts the record back as it was: a request either
happened or changed nothing.

Errors are JSON ``{"error": "what", "fix": "how"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.platform import schema, tokens
from taxiway.platform.state import Conflict, NoReply, State, Unavailable

LEASE_HEADER = "fly-machine-lease-nonce"
STRATEGIES = ("rolling", "bluegreen", "canary", "immediate")
MAX_BODY = 4 << 20
_VOLUME_NAME = re.compile(r"^[a-z][a-z0-9_]{0,29}$")
_APP_PATH = re.compile(r"^/v1/apps/([^/]+)(?:/|$)")
_PUBLIC_PATHS = ("/openapi.json", "/v1/health")


class ApiError(TaxiwayError):
    """An error answered with ``status`` and ``{"error", "fix"}``."""

    def __init__(self, status: int, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class AgentNoReply(ApiError):
    """The agent got the request but did not answer in time (it may have died mid-way, or be
    slow): the request may still take effect, so the desired record is KEPT for the agent's
    reconcile to own, and nobody is told "nothing was changed" (red team M7)."""


def _error_body(message: str, hint: str | None) -> dict[str, str]:
    return {"error": message, **({"fix": hint} if hint else {})}


def _status_of(e: TaxiwayError) -> int:
    if isinstance(e, ApiError):
        return e.status
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, InvalidInput):
        return 400
    if isinstance(e, Conflict):
        return 409
    if isinstance(e, Unavailable):
        return 503
    return 400


def _json(obj: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(obj, status_code=status)


# -- authentication (middleware) -------------------------------------------------------------

class Auth:
    """Bearer token -> ``scope["state"]["token"]``; 401 without one, 403 when its scope forbids.

    The scope rule (:func:`tokens.allows`) is checked here against the app the
    path names; org ownership is checked by the handlers (404 for another org).
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        auth = ""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v.decode("latin-1")
                break
        if not auth:
            return await _send(send, 401, "no API token given",
                               "send 'Authorization: Bearer <token>' (taxiway up writes one to platform.json)")
        if auth[:7].lower() != "bearer ":
            return await _send(send, 401, "the API takes bearer tokens only", "send 'Authorization: Bearer <token>'")
        st: State = scope["app"].state.st
        try:
            rec = await tokens.authenticate(st, auth[7:].strip())
        except Unavailable as e:
            return await _send(send, 503, e.message, e.hint)
        if rec is None:
            return await _send(send, 401, "invalid, expired or revoked API token",
                               "use a token from 'taxiway up' (platform.json) or create one with POST /v1/tokens")
        m = _APP_PATH.match(scope["path"])
        app = m.group(1) if m else None
        method = scope["method"]
        listing_apps = scope["path"].rstrip("/") == "/v1/apps" and method in ("GET", "HEAD")
        destroys = method == "DELETE" and m is not None and scope["path"].rstrip("/") == m.group(0).rstrip("/")
        if not listing_apps and not tokens.allows(rec, method, app, destroys_app=destroys):
            what = f"app {app}" if app else scope["path"]
            return await _send(send, 403, f"a {rec['scope']} token may not {method} {what}",
                               "use an org admin token" if rec["scope"] != "deploy"
                               else f"this token is for app {rec.get('app')} only")
        scope.setdefault("state", {})["token"] = rec
        return await self.app(scope, receive, send)


async def _send(send: Any, status: int, message: str, hint: str | None) -> None:
    body = json.dumps(_error_body(message, hint)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- helpers -----------------------------------------------------------------------------------

def _st(request: Request) -> State:
    return request.app.state.st


def _token(request: Request) -> dict[str, Any]:
    return request.state.token


async def _body(request: Request) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a huge body is refused, not buffered
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY >> 20} MiB", "send less")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", "send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "send {...}")
    return data


def _str(data: dict[str, Any], key: str, default: str | None = None, required: bool = False) -> str | None:
    v = data.get(key, default)
    if v is None:
        if required:
            raise ApiError(400, f"'{key}' is required", f"send {{\"{key}\": \"...\"}}")
        return None
    if not isinstance(v, str):
        raise ApiError(400, f"'{key}' must be a string", f"send {{\"{key}\": \"...\"}}")
    return v


def _query_float(request: Request, key: str, default: float, lo: float, hi: float) -> float:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        v = float(raw.rstrip("s"))
    except ValueError:
        raise ApiError(400, f"{key}={raw!r} is not a number", f"use {key}=<seconds>") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"{key}={raw} is out of range", f"use {lo:g} to {hi:g}")
    return v


def _flag(request: Request, key: str) -> bool:
    return request.query_params.get(key, "").lower() in ("1", "true", "yes")


async def _app(request: Request, name: str | None = None) -> dict[str, Any]:
    """The app the path names, if it is the token's org's; 404 otherwise (never 403: names don't leak)."""
    name = name or request.path_params["app"]
    got = await _st(request).get(schema.APPS, name) if schema.valid_app_name(name) else None
    if not got or got[0].get("org") != _token(request)["org"]:
        raise ApiError(404, f"no app {name!r}", "list your apps with 'taxiway apps ls'")
    return got[0]


async def _machine(request: Request) -> tuple[dict[str, Any], int]:
    app = await _app(request)
    mid = request.path_params["id"]
    got = await _st(request).get(schema.MACHINES, schema.machine_key(app["name"], mid)) \
        if schema.valid_machine_id(mid) else None
    if not got:
        raise ApiError(404, f"no machine {mid!r} in app {app['name']}", "list them with 'taxiway machine ls'")
    return got


async def _status(st: State, app: str, mid: str) -> dict[str, Any] | None:
    got = await st.get(schema.STATUS, schema.machine_key(app, mid))
    return got[0] if got else None


def machine_view(rec: dict[str, Any], status: dict[str, Any] | None, revision: int | None = None) -> dict[str, Any]:
    """The API's machine object: the desired record with the agent's observed state."""
    if status and status.get("state") in schema.STATES:
        state = status["state"]
    else:
        state = "destroyed" if rec.get("desired") == "destroyed" else "created"
    checks = [{"name": n, **c} for n, c in sorted(((status or {}).get("checks") or {}).items())]
    return {"id": rec["id"], "name": rec.get("name"), "state": state, "desired": rec.get("desired"),
            "region": rec.get("region"), "host": rec.get("host"), "instance_id": rec.get("instance_id"),
            "process_group": rec.get("process_group"), "release": rec.get("release"),
            "cordoned": bool(rec.get("cordoned")), "config": rec.get("config") or {},
            "image_ref": (rec.get("config") or {}).get("image"), "ports": (status or {}).get("ports") or {},
            "checks": checks, "exit_code": (status or {}).get("exit_code"),
            "private_ip": (status or {}).get("private_ip"),  # as Fly's machine object: its 6PN address
            "created_at": rec.get("created_at"), "updated_at": rec.get("updated_at"), "version": revision}


async def _agent(st: State, host: str, verb: str, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Ask a host's agent; 503 when none answers, the agent's own error (422) when it refuses."""
    subject = schema.agent_subject(host, verb)
    try:
        reply = await st.request(subject, payload, timeout=timeout)
    except NoReply:
        raise AgentNoReply(504, f"the host agent received {verb} of machine {payload.get('id')} but did not "
                                f"answer within {timeout:.0f} s; the change is recorded and may still happen",
                           "follow it: GET .../machines/<id>/wait?state=started (or its events)") from None
    except Unavailable as e:
        raise ApiError(503, f"no host agent answered on {subject} ({e.message})",
                       "start the platform with 'taxiway up' (it runs the agent); nothing was changed") from None
    if not reply.get("ok"):
        code = reply.get("code")
        raise ApiError(code if isinstance(code, int) and 400 <= code < 600 else 422,
                       str(reply.get("error") or f"the agent refused {verb}"), reply.get("fix"))
    return reply


async def _lease_check(request: Request, app: str, mid: str) -> None:
    """409 when another holder's unexpired lease is on the machine (Fly's lease semantics)."""
    got = await _st(request).get(schema.LEASES, schema.machine_key(app, mid))
    if not got:
        return
    lease = got[0]
    if lease.get("expires_at", 0) <= time.time():
        return
    if request.headers.get(LEASE_HEADER) == lease.get("nonce"):
        return
    raise ApiError(409, f"machine {mid} is leased ({lease.get('description') or 'no description'}) "
                        f"until {time.strftime('%H:%M:%S', time.gmtime(lease['expires_at']))} UTC",
                   f"send its nonce in the {LEASE_HEADER} header, or wait for the lease to expire")


async def _validate_config(request: Request, app: dict[str, Any], config: Any) -> dict[str, Any]:
    """``config`` through platform.policy (the tenant's machine may have only the hardened defaults,
    its own app's volumes, images of the platform registry), normalised; ApiError 400 otherwise.

    Checked before anything is written; the agent checks again before it creates the machine."""
    from taxiway.platform import policy

    cfg: ApiConfig = request.app.state.config
    volumes = {v["id"]: v for _, v, _ in await _st(request).items(schema.VOLUMES, app["name"] + ".")
               if isinstance(v, dict) and v.get("id")}
    config = policy.check_config(config, volumes=volumes, registry=cfg.registry, limits=policy.host_limits())
    from pathlib import Path

    from taxiway.machines.config import MachineConfig

    try:
        # The agent's translation (platform config -> machines config), so what it would refuse is a 400 now.
        from taxiway.platform.agent import machine_config
    except ImportError:
        def machine_config(rec: dict[str, Any], *_: Any) -> dict[str, Any]:
            return {k: v for k, v in rec["config"].items() if k not in ("services", "metadata", "mounts")}
    try:
        MachineConfig.from_json(machine_config({"id": "new", "config": config}, {}, {}, Path("/volumes")))
    except (TaxiwayError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ApiError(400, f"invalid machine config ({e})", "see the machine config's fields in the README") from None
    return config


# -- health and OpenAPI ----------------------------------------------------------------------------

async def health(request: Request) -> Response:
    return _json({"ok": True, "service": "taxiway-platform-api"})


async def openapi(request: Request) -> Response:
    return _json(openapi_document())


# -- orgs and tokens ----------------------------------------------------------------------------------

async def create_org(request: Request) -> Response:
    tok = _token(request)
    if not tok.get("platform"):
        raise ApiError(403, "only the platform's admin token may create orgs", "use the token 'taxiway up' wrote")
    data = await _body(request)
    name = _str(data, "name", required=True)
    if not schema.valid_org_name(name):
        raise ApiError(400, f"invalid org name {name!r}", "lowercase letters, digits and '-', up to 63")
    try:
        rec, token = await new_org(_st(request), name)
    except Conflict:
        raise ApiError(409, f"org {name!r} exists", "pick another name") from None
    cfg: ApiConfig = request.app.state.config
    if cfg.registry_root:
        await asyncio.to_thread(_registry_org, cfg.registry_root, name)  # an org per platform org
    return _json({"org": name, "token": token, "token_id": rec["id"]}, 201)


def _registry_org(root: str, org: str) -> None:
    """Make ``org`` in the registry's tenants database unless it is there."""
    from pathlib import Path

    from taxiway.registry.tenants import Tenants

    Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
    t = Tenants(Path(root) / "tenants.db")
    try:
        if not t.has_org(org):
            with contextlib.suppress(TaxiwayError):  # made meanwhile by a concurrent request
                t.create_org(org)
    finally:
        t.close()


async def new_org(st: State, name: str, *, platform: bool = False) -> tuple[dict[str, Any], str]:
    """Create org ``name`` (Conflict if it exists) and its first admin token: ``(record, token)``.

    ``platform``: the token may also create orgs (the one ``taxiway up`` writes).
    """
    await st.put(schema.ORGS, name, {"name": name, "created_at": time.time()}, revision=0)
    return await tokens.create(st, name, "admin", name="org admin", platform=platform)


async def create_token(request: Request) -> Response:
    tok = _token(request)
    if tok["scope"] != "admin":
        raise ApiError(403, "only an org admin token may create tokens", "use an admin token")
    data = await _body(request)
    scope = _str(data, "scope", required=True)
    app = _str(data, "app")
    try:
        tokens.validate_scope(scope, app)
    except InvalidInput as e:
        raise ApiError(400, e.message, e.hint) from None
    if app:
        await _app(request, app)
    ttl = data.get("ttl")
    if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
        raise ApiError(400, "'ttl' must be a positive number of seconds", "send {\"ttl\": 86400}")
    rec, token = await tokens.create(_st(request), tok["org"], scope, app, _str(data, "name", "") or "", ttl=ttl)
    return _json({**rec, "token": token}, 201)


async def list_tokens(request: Request) -> Response:
    tok = _token(request)
    if tok["scope"] != "admin":
        raise ApiError(403, "only an org admin token may list tokens", "use an admin token")
    return _json(await tokens.list_tokens(_st(request), tok["org"]))


async def revoke_token(request: Request) -> Response:
    tok = _token(request)
    if tok["scope"] != "admin":
        raise ApiError(403, "only an org admin token may revoke tokens", "use an admin token")
    tid = request.path_params["id"]
    if not re.fullmatch(r"[0-9a-f]{16}", tid):
        raise ApiError(404, f"no token {tid!r}", "list them with GET /v1/tokens")
    return _json(await tokens.revoke(_st(request), tok["org"], tid))


# -- apps ---------------------------------------------------------------------------------------------

async def list_apps(request: Request) -> Response:
    tok = _token(request)
    apps = [v for _, v, _ in await _st(request).snapshot(schema.APPS) if v.get("org") == tok["org"]]
    if tok["scope"] == "deploy":
        apps = [a for a in apps if a["name"] == tok.get("app")]
    return _json({"total_apps": len(apps), "apps": apps})


async def create_app(request: Request) -> Response:
    tok = _token(request)
    data = await _body(request)
    name = _str(data, "app_name") or _str(data, "name", required=True)
    if not schema.valid_app_name(name):
        raise ApiError(400, f"invalid app name {name!r}",
                       "use lowercase letters, digits and '-' (a DNS label, up to 63), e.g. my-app")
    org = _str(data, "org_slug", tok["org"])
    if org != tok["org"]:
        raise ApiError(404, f"no org {org!r}", f"your token is for org {tok['org']}")
    from taxiway.platform import policy

    policy.check_app_count(sum(1 for _, v, _ in await _st(request).snapshot(schema.APPS) if v.get("org") == org),
                           request.app.state.config.max_org_apps)
    rec = {"name": name, "org": org, "created_at": time.time(), "network": _str(data, "network") or org,
           "config": {}}
    try:
        await _st(request).put(schema.APPS, name, rec, revision=0)
    except Conflict:
        # App names are global (they become <app>.localhost), so a name of another org is taken too.
        raise ApiError(409, f"app name {name!r} is taken", "pick another name") from None
    return _json(rec, 201)


async def get_app(request: Request) -> Response:
    app = await _app(request)
    machines = await _st(request).snapshot(schema.MACHINES, app["name"] + ".*")
    live = [m for _, m, _ in machines if m.get("desired") != "destroyed"]
    return _json({**app, "machines": len(live), "status": "deployed" if live else "pending"})


async def delete_app(request: Request) -> Response:
    app = await _app(request)
    st = _st(request)
    name = app["name"]
    with contextlib.suppress(ImportError):
        from taxiway.platform import deploy

        await deploy.cancel(name)  # a running deploy would make machines again behind the destroy
    for key, rec, _ in await st.items(schema.MACHINES, name + "."):
        if rec.get("desired") == "destroyed":
            continue
        status = await _status(st, name, rec["id"])
        if status and status.get("state") == "destroyed":
            continue
        await _agent(st, rec.get("host") or schema.DEFAULT_HOST, "destroy",
                     {"app": name, "id": rec["id"], "force": True})
        await st.update(schema.MACHINES, key, lambda old: {**old, "desired": "destroyed", "updated_at": time.time()}
                        if old else None)
    # Nothing of the app may outlive it: another org can create an app of this name next (red
    # team H5). The volumes' data first (the agent owns the host side; a host whose agent does not
    # answer keeps the app record, so a retry finishes), then records with their history, then
    # the app's logs and events; the APPS record goes last, so the name is free only when all is gone.
    hosts = {(v.get("host") or schema.DEFAULT_HOST) for _, v, _ in await st.items(schema.VOLUMES, name + ".")}
    hosts |= {(m.get("host") or schema.DEFAULT_HOST) for _, m, _ in await st.items(schema.MACHINES, name + ".")}
    for host in sorted(hosts):
        await _agent(st, host, "purge", {"app": name})
    for bucket in (schema.MACHINES, schema.STATUS, schema.RELEASES, schema.SECRETS, schema.VOLUMES,
                   schema.LEASES):
        for key in await st.keys(bucket, name + "."):
            await st.purge(bucket, key)
    with contextlib.suppress(Exception):
        await st.purge(schema.DEPLOYS, name)
    await st.purge_subject(schema.LOGS_STREAM, f"logs.{name}.>")
    await st.purge_subject(schema.EVENTS_STREAM, f"events.{name}.>")
    for key, rec, _ in await st.snapshot(schema.CERTS, ">"):  # its custom hostnames (E1)
        if rec.get("app") == name:
            await st.purge(schema.CERTS, key)
    await st.delete(schema.APPS, name)
    return _json({"ok": True, "destroyed": name})


# -- machines ---------------------------------------------------------------------------------------

async def list_machines(request: Request) -> Response:
    app = await _app(request)
    st = _st(request)
    include_deleted = _flag(request, "include_deleted")
    want_state = request.query_params.get("state")
    group = request.query_params.get("process_group")
    out = []
    # One watcher per bucket instead of two gets per machine (1,000 machines: see bench/platform_api.py).
    pattern = app["name"] + ".*"
    recs, stats = await asyncio.gather(st.snapshot(schema.MACHINES, pattern), st.snapshot(schema.STATUS, pattern))
    status_of = {k: v for k, v, _ in stats}
    for key, rec, rev in recs:
        view = machine_view(rec, status_of.get(key), rev)
        if view["state"] == "destroyed" and not include_deleted:
            continue
        if want_state and view["state"] not in want_state.split(","):
            continue
        if group and view["process_group"] != group:
            continue
        out.append(view)
    return _json(out)


async def create_machine(request: Request) -> Response:
    app = await _app(request)
    st = _st(request)
    data = await _body(request)
    config = await _validate_config(request, app, data.get("config"))
    region = _str(data, "region", schema.DEFAULT_REGION)
    if not schema.valid_app_name(region):
        raise ApiError(400, f"invalid region {region!r}", f"use a region name such as {schema.DEFAULT_REGION}")
    group = ((config.get("metadata") or {}).get("process_group")) or schema.DEFAULT_PROCESS
    if not isinstance(group, str) or not schema.valid_process_group(group):
        raise ApiError(400, f"invalid process group {group!r}", "lowercase letters, digits, '_' and '-'")
    mid = schema.new_machine_id()
    name = _str(data, "name") or f"{app['name']}-{mid[:6]}"
    from taxiway.platform import policy

    policy.check_machine_name(name)
    policy.check_machine_count(len(await st.keys(schema.MACHINES, app["name"] + ".")))
    org_apps = {v["name"] for _, v, _ in await st.snapshot(schema.APPS) if v.get("org") == app["org"]}
    policy.check_org_machine_count(sum(1 for k in await st.keys(schema.MACHINES) if k.split(".")[0] in org_apps),
                                   request.app.state.config.max_org_machines)
    skip = bool(data.get("skip_launch"))
    now = time.time()
    rec = {"id": mid, "name": name, "app": app["name"], "org": app["org"], "region": region,
           "host": schema.DEFAULT_HOST, "process_group": group,
           "release": (config.get("metadata") or {}).get("release"), "config": config,
           "desired": "stopped" if skip else "started", "instance_id": secrets.token_hex(13),
           "created_at": now, "updated_at": now, "cordoned": False}
    key = schema.machine_key(app["name"], mid)
    rev = await st.put(schema.MACHINES, key, rec, revision=0)
    try:
        reply = await _agent(st, rec["host"], "create", {"app": app["name"], "id": mid, "machine": rec,
                                                          "start": not skip},
                             timeout=request.app.state.config.create_wait)
    except AgentNoReply as e:
        # Delivered, unanswered (a slow pull, or an agent killed mid-create that adopts the
        # machine when it comes back): the record stays, the agent's reconcile owns it.
        got = await st.get(schema.MACHINES, key)
        rec, rev = got if got else (rec, rev)
        status = await _status(st, app["name"], mid) or {"state": "created"}
        return _json({**machine_view(rec, status, rev), "pending": True, "note": e.message,
                      "fix": e.hint}, 202)
    except ApiError:
        with contextlib.suppress(Exception):
            await st.delete(schema.MACHINES, key, revision=rev)
        raise
    got = await st.get(schema.MACHINES, key)
    rec, rev = got if got else (rec, rev)
    return _json(machine_view(rec, reply.get("status") or await _status(st, app["name"], mid), rev), 200)


async def get_machine(request: Request) -> Response:
    rec, rev = await _machine(request)
    return _json(machine_view(rec, await _status(_st(request), rec["app"], rec["id"]), rev))


async def _set_desired(request: Request, verb: str, desired: str | None, extra: dict[str, Any] | None = None,
                       timeout: float = 60.0, change: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                       rec_rev: tuple[dict[str, Any], int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the new desired record (CAS), ask the agent; put the old record back if it did not answer."""
    rec, rev = rec_rev or await _machine(request)
    st = _st(request)
    app, mid = rec["app"], rec["id"]
    await _lease_check(request, app, mid)
    if rec.get("desired") == "destroyed":
        raise ApiError(409, f"machine {mid} is destroyed", "create a new one")
    new = dict(rec)
    if desired:
        new["desired"] = desired
    if change:
        new = change(new)
    new["updated_at"] = time.time()
    key = schema.machine_key(app, mid)
    try:
        new_rev = await st.put(schema.MACHINES, key, new, revision=rev)
    except Conflict:
        raise ApiError(409, f"machine {mid} was changed by someone else meanwhile", "read it again and retry") from None
    try:
        reply = await _agent(st, rec.get("host") or schema.DEFAULT_HOST, verb,
                             {"app": app, "id": mid, "machine": new, **(extra or {})}, timeout=timeout)
    except AgentNoReply:
        raise  # delivered: the agent may act on it (or its reconcile will), so the new record stays
    except ApiError:
        with contextlib.suppress(Conflict):
            await st.put(schema.MACHINES, key, rec, revision=new_rev)
        raise
    return new, reply


async def update_machine(request: Request) -> Response:
    rec, rev = await _machine(request)
    data = await _body(request)
    config = await _validate_config(request, {"name": rec["app"]}, data.get("config", rec.get("config")))
    if data.get("name") is not None:
        from taxiway.platform import policy

        policy.check_machine_name(data["name"])
    want = data.get("current_version", request.headers.get("if-match"))
    if want is not None:
        try:
            want = int(str(want).strip('"'))
        except ValueError:
            raise ApiError(400, f"current_version {want!r} is not a revision", "send the machine's 'version'") from None
        if want != rev:
            raise ApiError(409, f"machine {rec['id']} is at version {rev}, not {want}", "read it again and retry")
    skip = bool(data.get("skip_launch"))

    def change(new: dict[str, Any]) -> dict[str, Any]:
        new["config"] = config
        new["region"] = _str(data, "region", new.get("region"))
        new["name"] = _str(data, "name", new.get("name"))
        new["instance_id"] = secrets.token_hex(13)
        if "release" in (config.get("metadata") or {}):
            new["release"] = config["metadata"]["release"]
        if skip:
            new["desired"] = "stopped"
        return new

    # The agent replaces the machine with the new config ("replacing"), and starts it unless desired stopped.
    new, reply = await _set_desired(request, "restart", None, {"update": True}, timeout=300, change=change,
                                    rec_rev=(rec, rev))
    got = await _st(request).get(schema.MACHINES, schema.machine_key(rec["app"], rec["id"]))
    return _json(machine_view(got[0] if got else new, reply.get("status"), got[1] if got else None))


async def start_machine(request: Request) -> Response:
    rec, rev = await _machine(request)
    status = await _status(_st(request), rec["app"], rec["id"])
    _, reply = await _set_desired(request, "start", "started", timeout=300, rec_rev=(rec, rev))
    return _json({"ok": True, "previous_state": (status or {}).get("state", "created"),
                  "status": reply.get("status")})


async def stop_machine(request: Request) -> Response:
    rr = await _machine(request)
    data = await _body(request)
    extra = {k: data[k] for k in ("signal", "timeout") if k in data}
    _, reply = await _set_desired(request, "stop", "stopped", extra, timeout=120, rec_rev=rr)
    return _json({"ok": True, "status": reply.get("status")})


async def restart_machine(request: Request) -> Response:
    rr = await _machine(request)
    data = await _body(request)
    extra = {k: data[k] for k in ("signal", "timeout") if k in data}
    _, reply = await _set_desired(request, "restart", "started", extra, timeout=300, rec_rev=rr)
    return _json({"ok": True, "status": reply.get("status")})


async def signal_machine(request: Request) -> Response:
    rec, _ = await _machine(request)
    data = await _body(request)
    sig = _str(data, "signal", required=True)
    if not re.fullmatch(r"SIG[A-Z0-9]+|[0-9]{1,2}", sig):
        raise ApiError(400, f"invalid signal {sig!r}", "use a name such as SIGHUP")
    await _lease_check(request, rec["app"], rec["id"])
    await _agent(_st(request), rec.get("host") or schema.DEFAULT_HOST, "signal",
                 {"app": rec["app"], "id": rec["id"], "signal": sig})
    return _json({"ok": True})


async def exec_machine(request: Request) -> Response:
    rec, _ = await _machine(request)
    data = await _body(request)
    cmd = data.get("command", data.get("cmd"))
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise ApiError(400, "'command' must be a non-empty list of strings", "send {\"command\": [\"ls\", \"/\"]}")
    timeout = data.get("timeout", 60)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ApiError(400, "'timeout' must be 1 to 3600 seconds", "send {\"timeout\": 60}")
    await _lease_check(request, rec["app"], rec["id"])
    reply = await _agent(_st(request), rec.get("host") or schema.DEFAULT_HOST, "exec",
                         {"app": rec["app"], "id": rec["id"], "command": cmd, "timeout": timeout},
                         timeout=timeout + 10)
    return _json({k: reply.get(k) for k in ("stdout", "stderr", "exit_code")})


async def destroy_machine(request: Request) -> Response:
    rec, rev = await _machine(request)
    st = _st(request)
    force = _flag(request, "force")
    status = await _status(st, rec["app"], rec["id"])
    if rec.get("desired") == "destroyed" and (status or {}).get("state") in (None, "destroyed"):
        return _json({"ok": True})
    if not force and (status or {}).get("state") in ("started", "starting"):
        raise ApiError(409, f"machine {rec['id']} is {status['state']}", "stop it first, or pass force=true")
    await _set_desired(request, "destroy", "destroyed", {"force": force}, timeout=120, rec_rev=(rec, rev))
    with contextlib.suppress(Exception):
        await st.delete(schema.LEASES, schema.machine_key(rec["app"], rec["id"]))
    return _json({"ok": True})


async def cordon_machine(request: Request, cordoned: bool = True) -> Response:
    rec, rev = await _machine(request)
    await _lease_check(request, rec["app"], rec["id"])
    try:
        await _st(request).put(schema.MACHINES, schema.machine_key(rec["app"], rec["id"]),
                               {**rec, "cordoned": cordoned, "updated_at": time.time()}, revision=rev)
    except Conflict:
        raise ApiError(409, f"machine {rec['id']} was changed by someone else meanwhile", "retry") from None
    return _json({"ok": True})


async def uncordon_machine(request: Request) -> Response:
    return await cordon_machine(request, cordoned=False)


async def wait_machine(request: Request) -> Response:
    rec, _ = await _machine(request)
    want = request.query_params.get("state", "started")
    if want not in schema.WAITABLE:
        raise ApiError(400, f"cannot wait for state {want!r}", f"use one of {', '.join(schema.WAITABLE)}")
    timeout = _query_float(request, "timeout", 60, 0, 600)
    instance = request.query_params.get("instance_id")
    key = schema.machine_key(rec["app"], rec["id"])

    def reached(value: dict[str, Any] | None) -> bool:
        if value is None:
            return want == "destroyed"
        return value.get("state") == want and (not instance or value.get("instance_id") == instance)

    st, reconnects = _st(request), request.app.state.reconnects
    try:
        async with asyncio.timeout(timeout):
            while True:  # the current value first (initial), then changes; a new watch after a reconnect
                async for _, value, _ in _until_reconnect(st.watch(schema.STATUS, key, initial=True), reconnects):
                    if value is not None and reached(value):
                        return _json({"ok": True, "state": want})
                    if value is None and want == "destroyed":  # deleted while we watched
                        return _json({"ok": True, "state": want})
    except TimeoutError:
        pass
    got = await _status(_st(request), rec["app"], rec["id"])
    raise ApiError(408, f"machine {rec['id']} did not reach {want} within {timeout:g} s "
                        f"(it is {(got or {}).get('state', 'created')})", "wait longer, or see its events")


async def machine_events(request: Request) -> Response:
    rec, _ = await _machine(request)
    limit = int(_query_float(request, "limit", 100, 1, 10000))
    events = await _st(request).fetch_stream(schema.events_subject(rec["app"], rec["id"]), limit=limit)
    return _json(list(reversed(events)))  # newest first, as Fly lists them


# -- leases ---------------------------------------------------------------------------------------------

async def create_lease(request: Request) -> Response:
    rec, _ = await _machine(request)
    data = await _body(request)
    ttl = data.get("ttl", 30)
    if not isinstance(ttl, int | float) or not 0 < ttl <= 3600:
        raise ApiError(400, "'ttl' must be 1 to 3600 seconds", "send {\"ttl\": 30}")
    key = schema.machine_key(rec["app"], rec["id"])
    held = request.headers.get(LEASE_HEADER)
    st = _st(request)

    def change(old: dict[str, Any] | None) -> dict[str, Any]:
        now = time.time()
        if old and old.get("expires_at", 0) > now and old.get("nonce") != held:
            raise ApiError(409, f"machine {rec['id']} already has a lease ({old.get('description') or 'no description'})",
                           f"wait for it to expire, or send its nonce in {LEASE_HEADER} to renew it")
        nonce = old["nonce"] if old and old.get("nonce") == held and old.get("expires_at", 0) > now \
            else secrets.token_hex(16)
        return {"nonce": nonce, "expires_at": now + ttl, "owner": _token(request)["id"],
                "description": _str(data, "description", "") or "", "version": secrets.token_hex(4)}

    lease = await st.update(schema.LEASES, key, change)
    return _json({"status": "success", "data": lease}, 201)


async def get_lease(request: Request) -> Response:
    rec, _ = await _machine(request)
    got = await _st(request).get(schema.LEASES, schema.machine_key(rec["app"], rec["id"]))
    if not got or got[0].get("expires_at", 0) <= time.time():
        raise ApiError(404, f"machine {rec['id']} has no lease", "create one with POST .../lease")
    return _json({"status": "success", "data": got[0]})


async def release_lease(request: Request) -> Response:
    rec, _ = await _machine(request)
    key = schema.machine_key(rec["app"], rec["id"])
    got = await _st(request).get(schema.LEASES, key)
    if not got or got[0].get("expires_at", 0) <= time.time():
        return _json({"ok": True})
    if request.headers.get(LEASE_HEADER) != got[0].get("nonce"):
        raise ApiError(409, f"machine {rec['id']}'s lease is held by someone else",
                       f"send its nonce in {LEASE_HEADER}")
    await _st(request).delete(schema.LEASES, key, revision=got[1])
    return _json({"ok": True})


# -- releases (the deploy logic is platform.deploy's) --------------------------------------------------

async def list_releases(request: Request) -> Response:
    app = await _app(request)
    rows = [v for _, v, _ in await _st(request).items(schema.RELEASES, app["name"] + ".")]
    return _json(sorted(rows, key=lambda r: r.get("version", 0), reverse=True))


async def get_release(request: Request) -> Response:
    app = await _app(request)
    raw = request.path_params["version"].lstrip("v")
    if not raw.isdigit() or int(raw) > 99_999_999:
        raise ApiError(404, f"no release {request.path_params['version']!r}", "list them with 'taxiway releases'")
    key = schema.release_key(app["name"], int(raw))
    st = _st(request)
    got = await st.get(schema.RELEASES, key)
    if not got:
        raise ApiError(404, f"no release v{int(raw)} of {app['name']}", "list them with 'taxiway releases'")
    # ?wait=S&after=T: a long poll for whoever follows a deploy (the CLI). The answer comes as soon
    # as the record changes from the one updated at T (a new step, the final status), else after S
    # seconds; polling instead made every deploy a poll interval longer.
    wait = _query_float(request, "wait", 0, 0, 60)
    after = request.query_params.get("after")
    if not wait or after is None or str(got[0].get("updated_at")) != after:
        return _json(got[0])
    reconnects = request.app.state.reconnects
    try:
        async with asyncio.timeout(wait):
            while True:  # a new watch after a reconnect (a restarted server forgets the old one)
                async for _, value, _ in _until_reconnect(st.watch(schema.RELEASES, key, initial=True), reconnects):
                    if value is None:
                        raise ApiError(404, f"release v{int(raw)} of {app['name']} is gone",
                                       "the app was destroyed")
                    if str(value.get("updated_at")) != after:
                        return _json(value)
    except TimeoutError:
        pass
    got = await st.get(schema.RELEASES, key)
    return _json(got[0] if got else {})


async def _deploy_start(request: Request, app: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """``deploy.start``: records the next release and runs the deploy in this loop; a deploy already
    running is a 409."""
    from taxiway.platform import deploy

    try:
        return await deploy.start(_st(request), app["name"], body, org=app["org"])
    except deploy.Busy as e:
        raise ApiError(409, e.message, e.hint or "wait for it, see 'taxiway releases'") from None


async def create_release(request: Request) -> Response:
    app = await _app(request)
    data = await _body(request)
    image = _str(data, "image", required=True)
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise ApiError(400, "'config' must be an object (the parsed taxiway.toml)", "send {\"config\": {...}}")
    strategy = _str(data, "strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise ApiError(400, f"unknown deploy strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    from taxiway.platform import policy

    # Textual check only (no DNS, no connection): the agent pulls from the platform registry alone.
    policy.image_source(image, request.app.state.config.registry)
    body = {"image": image, "config": config, **({"strategy": strategy} if strategy else {}),
            "description": _str(data, "description", "") or "", "by": _token(request)["id"]}
    return _json(await _deploy_start(request, app, body), 201)


# -- secrets (sealing is platform.secrets') ---------------------------------------------------------------

async def list_secrets(request: Request) -> Response:
    app = await _app(request)
    rows = [{"name": v.get("name"), "digest": v.get("digest"), "updated_at": v.get("updated_at")}
            for _, v, _ in await _st(request).items(schema.SECRETS, app["name"] + ".")]
    return _json(rows)


async def set_secrets(request: Request) -> Response:
    app = await _app(request)
    data = await _body(request)
    values = data.get("values")
    if not isinstance(values, dict) or not values:
        raise ApiError(400, "'values' must be a non-empty object of NAME: value", "send {\"values\": {\"K\": \"v\"}}")
    for k, v in values.items():
        if not schema.valid_secret_name(k):
            raise ApiError(400, f"invalid secret name {k!r}", "letters, digits and '_', not starting with a digit")
        if not isinstance(v, str):
            raise ApiError(400, f"secret {k}'s value must be a string", "quote it")
        if "\x00" in v:  # refused before anything is stored: no machine could start with it in its env
            raise ApiError(400, f"secret {k}'s value contains a NUL byte",
                           "environment values cannot hold NUL; encode binary data, e.g. base64")
    from taxiway.platform import secrets as sealer

    for k in values:
        sealer.check_name(k)
    key = await asyncio.to_thread(sealer.load_key)
    records = {k: sealer.record(app["name"], k, v, key) for k, v in values.items()}  # seal all before writing any
    st = _st(request)
    for k, rec in records.items():
        await st.put(schema.SECRETS, schema.secret_key(app["name"], k), rec)
    out: dict[str, Any] = {"ok": True, "names": sorted(values)}
    if not data.get("stage"):
        out["release"] = await _roll(request, app)
    return _json(out)


async def unset_secret(request: Request) -> Response:
    app = await _app(request)
    name = request.path_params["name"]
    st = _st(request)
    if not schema.valid_secret_name(name) or not await st.get(schema.SECRETS, schema.secret_key(app["name"], name)):
        raise ApiError(404, f"no secret {name!r} in {app['name']}", "list them with 'taxiway secrets ls'")
    await st.delete(schema.SECRETS, schema.secret_key(app["name"], name))
    out: dict[str, Any] = {"ok": True}
    if not _flag(request, "stage"):
        out["release"] = await _roll(request, app)
    return _json(out)


async def _roll(request: Request, app: dict[str, Any]) -> dict[str, Any] | None:
    """Re-deploy the current release so machines restart with the new secrets (none deployed: nothing)."""
    if not any(r.get("status") == "complete" for _, r, _ in await _st(request).items(schema.RELEASES, app["name"] + ".")):
        # nothing deployed that worked: the next deploy picks the secrets up (restarting a failed
        # release's image failed again and removed machines: red team M8c)
        return None
    return await _deploy_start(request, app, {"reason": "secrets"})


# -- volumes ---------------------------------------------------------------------------------------------

def _parse_volume_size(data: dict[str, Any]) -> int:
    if "size_gb" in data:
        gb = data["size_gb"]
        if not isinstance(gb, int) or not 1 <= gb <= MAX_VOLUME_GB:
            raise ApiError(400, f"'size_gb' must be a whole number of GB, 1 to {MAX_VOLUME_GB}", "send {\"size_gb\": 1}")
        return gb << 30
    size = data.get("size", "1gb")
    from taxiway.machines.config import parse_size

    try:
        n = size if isinstance(size, int) else parse_size(str(size))
    except (TaxiwayError, ValueError):
        raise ApiError(400, f"invalid volume size {size!r}", "use e.g. 1gb or 512mb") from None
    if n < MIN_VOLUME_SIZE:  # an ext4 file with a journal needs a few MB of its own
        raise ApiError(400, f"volume size {size!r} is under {MIN_VOLUME_SIZE >> 20} MB", "use e.g. 1gb or 512mb")
    if n > MAX_VOLUME_GB << 30:
        raise ApiError(400, f"volume size {size!r} is over {MAX_VOLUME_GB} GB", f"use at most {MAX_VOLUME_GB}gb")
    return n


MAX_VOLUME_GB = 1024  # platform.policy.MAX_VOLUME_SIZE
MIN_VOLUME_SIZE = 8 << 20


async def list_volumes(request: Request) -> Response:
    app = await _app(request)
    return _json([v for _, v, _ in await _st(request).items(schema.VOLUMES, app["name"] + ".")])


async def create_volume(request: Request) -> Response:
    app = await _app(request)
    data = await _body(request)
    name = _str(data, "name", required=True)
    if not _VOLUME_NAME.match(name):
        raise ApiError(400, f"invalid volume name {name!r}", "lowercase letters, digits and '_', up to 30")
    vid = "vol_" + secrets.token_hex(8)
    rec = {"id": vid, "app": app["name"], "name": name, "size": _parse_volume_size(data),
           "region": _str(data, "region", schema.DEFAULT_REGION), "host": schema.DEFAULT_HOST, "machine": None,
           "state": "created", "created_at": time.time()}
    await _st(request).put(schema.VOLUMES, schema.volume_key(app["name"], vid), rec, revision=0)
    return _json(rec, 201)


async def _volume(request: Request) -> tuple[dict[str, Any], int]:
    app = await _app(request)
    vid = request.path_params["id"]
    got = await _st(request).get(schema.VOLUMES, schema.volume_key(app["name"], vid)) \
        if re.fullmatch(r"vol_[0-9a-f]{16}", vid) else None
    if not got:
        raise ApiError(404, f"no volume {vid!r} in app {app['name']}", "list them with 'taxiway volumes ls'")
    return got


async def get_volume(request: Request) -> Response:
    return _json((await _volume(request))[0])


async def delete_volume(request: Request) -> Response:
    vol, rev = await _volume(request)
    st = _st(request)
    if vol.get("machine"):
        got = await st.get(schema.MACHINES, schema.machine_key(vol["app"], vol["machine"]))
        if got and got[0].get("desired") != "destroyed":
            raise ApiError(409, f"volume {vol['id']} is attached to machine {vol['machine']}",
                           "destroy that machine first")
    # its data first (the agent owns the host side: the volume's ext4 file); a host that does not
    # answer keeps the record, so a retry finishes
    await _agent(st, vol.get("host") or schema.DEFAULT_HOST, "purge", {"app": vol["app"], "volume": vol["id"]})
    await st.delete(schema.VOLUMES, schema.volume_key(vol["app"], vol["id"]), revision=rev)
    return _json({"ok": True, "destroyed": vol["id"]})


# -- logs ----------------------------------------------------------------------------------------------

async def app_logs(request: Request) -> Response:
    app = await _app(request)
    machine = request.query_params.get("machine") or "*"
    if machine != "*" and not schema.valid_machine_id(machine):
        raise ApiError(400, f"invalid machine id {machine!r}", "use an id from 'taxiway machine ls'")
    region = request.query_params.get("region") or "*"
    if region != "*" and not schema.valid_app_name(region):
        raise ApiError(400, f"invalid region {region!r}", "use a region name such as local")
    subject = schema.logs_subject(app["name"], region, machine)
    st = _st(request)
    if not _flag(request, "follow"):
        limit = int(_query_float(request, "limit", 1000, 1, 100000))
        lines = await st.fetch_stream(subject, limit=limit)
        return Response("".join(json.dumps(x) + "\n" for x in lines), media_type="application/x-ndjson")

    reconnects: Reconnects = request.app.state.reconnects

    async def stream() -> AsyncIterator[bytes]:
        # After a reconnect only new lines: the few published while NATS was away may be missed, never repeated.
        new_only = False
        while True:
            async for x in _until_reconnect(st.subscribe_stream(subject, deliver_new=new_only), reconnects):
                yield (json.dumps(x) + "\n").encode()
            new_only = True

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def _until_reconnect(it: AsyncIterator[Any], reconnects: Reconnects) -> AsyncIterator[Any]:
    """The items of a watch or stream subscription until the NATS connection is made again.

    A restarted nats-server forgets the consumer behind it, which then goes silent without an
    error (State.on_reconnect): the caller starts a new one when this ends.
    """
    it = it.__aiter__()
    gone = asyncio.ensure_future(reconnects.next())
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                return
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        for f in (gone, nxt):
            if f is not None and not f.done():
                f.cancel()
        with contextlib.suppress(Exception):
            await it.aclose()


class Reconnects:
    """Wakes every waiter when the API's NATS connection is made again (see State.on_reconnect)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def next(self) -> None:
        await self._event.wait()


# -- registry credentials ---------------------------------------------------------------------------------

async def registry_token(request: Request) -> Response:
    app = await _app(request)
    cfg: ApiConfig = request.app.state.config
    if not cfg.registry or not cfg.registry_root:
        raise ApiError(503, "this API runs without a registry", "start the platform with 'taxiway up'")

    def mint() -> str:
        from taxiway.registry.tenants import Tenants

        _registry_org(cfg.registry_root, app["org"])
        t = Tenants(cfg.registry_root + "/tenants.db")
        try:
            # push and pull of this app's repository only: a deploy token of one app can't reach
            # another app's images, even of the same org (the registry resolves names in the org)
            _, secret = t.create_token(app["org"], "push", 3600, repository=app["name"])
            return secret
        finally:
            t.close()

    secret = await asyncio.to_thread(mint)
    # The registry rewrites the names a client sends to <org>/<name>: the client pushes <app>.
    return _json({"registry": cfg.registry, "repository": app["name"], "stored_as": f"{app['org']}/{app['name']}",
                  "username": app["org"], "password": secret, "expires_in": 3600})

# -- certificates: custom hostnames for the edge's TLS (E1; schema.CERTS, read by platform.edgetls) -----

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
CHALLENGES = ("http-01", "tls-alpn-01")
CERTS_SUBJECT = "edge.certs"  # the edge's view: {"hosts": {hostname: {"source", "not_after", "acme"}}}


async def _edge_certs(st: State) -> dict[str, Any]:
    """What the edge serves for each hostname; {} when no edge answers within a second."""
    try:
        got = await st.request(CERTS_SUBJECT, {}, timeout=1.0)
    except (TaxiwayError, TimeoutError):
        return {}
    return got.get("hosts") or {}


async def list_certs(request: Request) -> Response:
    app = await _app(request)
    st = _st(request)
    recs = [r for _, r, _ in await st.snapshot(schema.CERTS, ">") if r.get("app") == app["name"]]
    served = await _edge_certs(st)
    return _json([{**r, "served": served.get(r["hostname"])} for r in sorted(recs, key=lambda r: r["hostname"])])


async def add_cert(request: Request) -> Response:
    app = await _app(request)
    data = await _body(request)
    host = (_str(data, "hostname", required=True) or "").strip().lower().rstrip(".")
    if not _HOSTNAME.match(host) or host.endswith(".localhost"):
        raise ApiError(400, f"invalid hostname {host!r}",
                       "give a DNS name such as www.example.com (<app>.localhost names need no certs add)")
    directory = _str(data, "acme")
    if directory is not None and not directory.startswith("https://"):
        raise ApiError(400, f"invalid ACME directory {directory!r}",
                       "give the directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory")
    challenge = _str(data, "challenge", "http-01")
    if challenge not in CHALLENGES:
        raise ApiError(400, f"unknown ACME challenge {challenge!r}", f"use one of {', '.join(CHALLENGES)}")
    rec = {"hostname": host, "app": app["name"], "org": app["org"], "acme": directory,
           "challenge": challenge if directory else None, "created_at": time.time()}
    st = _st(request)
    try:
        await st.put(schema.CERTS, host, rec, revision=0)
    except Conflict:
        got = await st.get(schema.CERTS, host)
        if not got or got[0].get("app") != app["name"] or got[0].get("org") != app["org"]:
            # Another app's (maybe another org's): say only that it is taken.
            raise ApiError(409, f"hostname {host} is taken", "a hostname belongs to one app; remove it there first") \
                from None
        rec["created_at"] = got[0].get("created_at", rec["created_at"])
        await st.put(schema.CERTS, host, rec, revision=got[1])
        return _json(rec)
    return _json(rec, 201)


async def delete_cert(request: Request) -> Response:
    app = await _app(request)
    host = request.path_params["hostname"].strip().lower().rstrip(".")
    st = _st(request)
    got = await st.get(schema.CERTS, host) if _HOSTNAME.match(host) else None
    if not got or got[0].get("app") != app["name"]:
        raise ApiError(404, f"no hostname {host} on app {app['name']}", "list them with 'taxiway certs ls'")
    await st.delete(schema.CERTS, host)
    return _json({"ok": True, "deleted": host})



# -- the route table (also the OpenAPI document's source) ---------------------------------------------------

M = "/v1/apps/{app}/machines/{id}"
ROUTES: list[tuple[str, str, Callable[[Request], Awaitable[Response]], str]] = [
    ("GET", "/v1/health", health, "Liveness (no token needed)"),
    ("GET", "/openapi.json", openapi, "This OpenAPI document"),
    ("POST", "/v1/orgs", create_org, "Create an org (platform admin); returns its first admin token"),
    ("GET", "/v1/tokens", list_tokens, "List the org's tokens (admin)"),
    ("POST", "/v1/tokens", create_token, "Create a token {scope: admin|deploy|read, app?, name?, ttl?} (admin)"),
    ("DELETE", "/v1/tokens/{id}", revoke_token, "Revoke a token (admin)"),
    ("GET", "/v1/apps", list_apps, "List the org's apps"),
    ("POST", "/v1/apps", create_app, "Create an app {app_name}"),
    ("GET", "/v1/apps/{app}", get_app, "Get an app"),
    ("DELETE", "/v1/apps/{app}", delete_app, "Destroy an app, its machines, releases, secrets and volumes"),
    ("GET", "/v1/apps/{app}/machines", list_machines, "List machines (?include_deleted, ?state, ?process_group)"),
    ("POST", "/v1/apps/{app}/machines", create_machine, "Create (and start unless skip_launch) a machine {config}"),
    ("GET", M, get_machine, "Get a machine"),
    ("POST", M, update_machine, "Update a machine's config (replaces it); current_version for compare-and-set"),
    ("DELETE", M, destroy_machine, "Destroy a machine (?force=true if it runs)"),
    ("POST", M + "/start", start_machine, "Start a machine"),
    ("POST", M + "/stop", stop_machine, "Stop a machine {signal?, timeout?}"),
    ("POST", M + "/restart", restart_machine, "Restart a machine"),
    ("POST", M + "/signal", signal_machine, "Send a signal {signal}"),
    ("POST", M + "/exec", exec_machine, "Run a command in a machine {command: [...], timeout?}"),
    ("POST", M + "/cordon", cordon_machine, "Send the machine no new requests"),
    ("POST", M + "/uncordon", uncordon_machine, "Send the machine requests again"),
    ("GET", M + "/wait", wait_machine, "Wait for ?state=started|stopped|destroyed (&timeout=S, &instance_id=)"),
    ("GET", M + "/events", machine_events, "The machine's events, newest first"),
    ("POST", M + "/lease", create_lease, "Take (or renew with the nonce header) a lease {ttl, description}"),
    ("GET", M + "/lease", get_lease, "The machine's lease"),
    ("DELETE", M + "/lease", release_lease, "Release the lease (nonce header)"),
    ("GET", "/v1/apps/{app}/releases", list_releases, "List releases, newest first"),
    ("POST", "/v1/apps/{app}/releases", create_release, "Record a release {image, config, strategy} and deploy it"),
    ("GET", "/v1/apps/{app}/releases/{version}", get_release,
     "Get a release (?wait=S&after=<its updated_at>: answer when it changes, at most S seconds)"),
    ("GET", "/v1/apps/{app}/secrets", list_secrets, "Secret names and digests (never values)"),
    ("POST", "/v1/apps/{app}/secrets", set_secrets, "Set secrets {values: {K: V}, stage?}"),
    ("DELETE", "/v1/apps/{app}/secrets/{name}", unset_secret, "Unset a secret (?stage=1: no restart)"),
    ("GET", "/v1/apps/{app}/volumes", list_volumes, "List volumes"),
    ("POST", "/v1/apps/{app}/volumes", create_volume, "Create a volume {name, size_gb | size}"),
    ("GET", "/v1/apps/{app}/volumes/{id}", get_volume, "Get a volume"),
    ("DELETE", "/v1/apps/{app}/volumes/{id}", delete_volume, "Destroy a volume (not while attached)"),
    ("GET", "/v1/apps/{app}/logs", app_logs, "Logs as NDJSON (?machine=, ?region=, ?follow=1, ?limit=)"),
    ("POST", "/v1/apps/{app}/registry_token", registry_token, "Credentials to push and pull the app's images"),
    ("GET", "/v1/apps/{app}/certificates", list_certs, "The app's custom hostnames and what the edge serves for them"),
    ("POST", "/v1/apps/{app}/certificates", add_cert,
     "Add a custom hostname {hostname, acme?: directory URL, challenge?: http-01|tls-alpn-01}"),
    ("DELETE", "/v1/apps/{app}/certificates/{hostname}", delete_cert, "Remove a custom hostname"),
]


def openapi_document() -> dict[str, Any]:
    """An OpenAPI 3.1 document built from :data:`ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler, summary in ROUTES:
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", path)]
        op: dict[str, Any] = {
            "operationId": handler.__name__, "summary": summary, "parameters": params,
            "responses": {"200": {"description": "OK", "content": {"application/json": {}}},
                          "default": {"description": "Error", "content": {"application/json": {
                              "schema": {"$ref": "#/components/schemas/Error"}}}}},
        }
        if path not in _PUBLIC_PATHS:
            op["security"] = [{"bearer": []}]
        if method == "POST":
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "taxiway platform API", "version": "1",
                 "description": "Apps and machines, shaped like Fly's Machines API."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "tw_<id>_<secret>: admin, deploy (one app) or read"}},
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}, "fix": {"type": "string"}}}},
        },
    }


# -- the app -----------------------------------------------------------------------------------------------

@dataclass
class ApiConfig:
    nats: str
    registry: str | None = None       # host:port of the platform's registry
    registry_root: str | None = None  # its storage directory (tenants.db), on this host
    # How long a create waits for the agent's answer (a pull may be slow) before a 202 with the
    # machine "created": the rest is followed with /wait, the record stays the agent's to finish.
    create_wait: float = 60.0
    max_org_machines: int = 2000      # policy.MAX_MACHINES_PER_ORG (kept literal: policy is imported lazily)
    max_org_apps: int = 200           # policy.MAX_APPS_PER_ORG


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaxiwayError)
    return _json(_error_body(exc.message, exc.hint), _status_of(exc))


async def _on_crash(request: Request, exc: Exception) -> Response:
    """Anything unexpected is still one JSON line (NATS trouble is a 503: it is worth retrying)."""
    if type(exc).__module__.split(".")[0] == "nats":
        return _json(_error_body(f"NATS did not answer ({type(exc).__name__})",
                                 "retry; if it lasts, see 'taxiway platform status'"), 503)
    return _json(_error_body(f"internal error ({type(exc).__name__}: {str(exc)[:200]})",
                             "see the API's log (platform/logs/api.log)"), 500)


def create_app(config: ApiConfig, st: State | None = None) -> Starlette:
    """The API as an ASGI app; connects to NATS at startup unless given a connected ``st``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = st is None
        app.state.st = st or await State.connect(config.nats, name="taxiway-api")
        app.state.reconnects = Reconnects()
        if hasattr(app.state.st, "on_reconnect"):
            app.state.st.on_reconnect(app.state.reconnects.fire)
        from taxiway.platform import deploy

        # A deploy cut by a kill -9 of the control plane is finished or rolled back (deploy's job).
        task = asyncio.create_task(deploy.resume(app.state.st))
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(Exception):
                await deploy.shutdown()
            if own:
                await app.state.st.close()

    app = Starlette(routes=[Route(p, h, methods=[m]) for m, p, h, _ in ROUTES],
                    exception_handlers={TaxiwayError: _on_error, Exception: _on_crash}, lifespan=lifespan)
    app.state.config = config
    app.add_middleware(Auth)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m taxiway.platform.api --nats URL --listen HOST:PORT``: serve until interrupted."""
    import argparse
    import os
    import sys

    from taxiway.listen import parse_listen

    p = argparse.ArgumentParser(prog="python -m taxiway.platform.api", description=__doc__.splitlines()[0])
    p.add_argument("--nats", default=os.environ.get("TAXIWAY_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--listen", default="127.0.0.1:4280")
    p.add_argument("--registry", help="HOST:PORT of the platform's registry")
    p.add_argument("--registry-root", help="the registry's storage directory (for its tenants.db)")
    p.add_argument("--create-wait", type=float, default=60.0,
                   help="seconds a machine create waits for the agent before answering 202 (default 60)")
    p.add_argument("--max-org-machines", type=int, default=2000,
                   help="machines an org may have across its apps (default 2000)")
    p.add_argument("--max-org-apps", type=int, default=200, help="apps an org may have (default 200)")
    args = p.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except TaxiwayError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    import uvicorn

    app = create_app(ApiConfig(args.nats, args.registry, args.registry_root, create_wait=args.create_wait,
                               max_org_machines=args.max_org_machines, max_org_apps=args.max_org_apps))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)


if __name__ == "__main__":
    main()
