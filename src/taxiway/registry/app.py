"""The distribution-spec server: a Starlette app of routes behind the authorizer.

Handlers see repository names already rewritten into the caller's org (see
``auth.py``); they speak the :class:`~taxiway.registry.storage.Storage` interface
they are given (digests, names and bytes, never paths) and never read a blob
into memory: with the filesystem driver blobs go out as file responses
(sendfile) and come in streamed to the upload session's file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from taxiway.fsutil import atomic_write
from taxiway.oci import mediatypes as mt
from taxiway.oci.digest import Digest
from taxiway.oci.reference import valid_repository, valid_tag
from taxiway.registry import manifest as manifests
from taxiway.registry import tokens
from taxiway.registry.auth import Authorizer, basic_password
from taxiway.registry.errors import DistributionError, storage_error
from taxiway.registry.paths import classify
from taxiway.registry.sendfile import PathSend
from taxiway.registry.storage import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_SESSIONS,
    PURGE_INTERVAL,
    BlobBody,
    FilesystemStorage,
    SessionBusy,
    Storage,
)
from taxiway.registry.tenants import Tenants

TOKEN_TTL = 300
_QUOTA_STEP = 4 << 20  # how often a streaming upload re-checks its org's bytes (the most it can overshoot)
_RANGE_RE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)$")
_BYTE_RANGE_SPEC = re.compile(r"(\d+)-(\d*)|-(\d+)")
log = logging.getLogger("taxiway.registry")


def valid_byte_ranges(value: str) -> bool:
    """Whether a Range header is a well-formed ``bytes`` ranges-specifier (RFC 9110 14.1.1).

    Anything else (another unit, ``5-2``, garbage) must be ignored, which means the
    whole representation is sent; a well-formed but unsatisfiable range gets 416.
    """
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return False
    parts = [p.strip() for p in spec.split(",")]
    for p in parts:
        if not p:
            continue  # empty list elements are allowed
        m = _BYTE_RANGE_SPEC.fullmatch(p)
        if m is None or (m.group(1) is not None and m.group(2) and int(m.group(2)) < int(m.group(1))):
            return False
    return any(parts)


class BlobResponse(FileResponse):
    """Whole blobs go out with sendfile(2) where the server offers ``http.response.pathsend``
    (see ``sendfile.py``); HEAD answers with headers only; Range requests and other servers
    get large reads, off the event loop. An invalid Range header is ignored (RFC 9110)."""

    chunk_size = 1 << 20

    async def __call__(self, scope, receive, send) -> None:
        headers = scope.get("headers") or []
        if any(k == b"range" and not valid_byte_ranges(v.decode("latin-1")) for k, v in headers):
            scope = {**scope, "headers": [(k, v) for k, v in headers if k != b"range"]}
        await super().__call__(scope, receive, send)


def blob_response(body: BlobBody, headers: dict[str, str]) -> Response:
    """The response for a blob: its file through :class:`BlobResponse` (sendfile, ranges), or its bytes.

    The in-memory driver's bytes answer a Range request with the whole blob (200),
    which RFC 9110 allows; ranges are served from files, as the real server stores them.
    """
    if body.file is not None:
        # Only size and time feed the headers; the file was stat'ed by the storage a moment ago.
        st = os.stat_result((stat.S_IFREG | 0o444, 0, 0, 1, 0, 0, body.size, body.mtime, body.mtime, body.mtime))
        return BlobResponse(body.file, headers=headers, media_type="application/octet-stream", stat_result=st)
    return Response(body.data or b"", headers={**headers, "Accept-Ranges": "none"},
                    media_type="application/octet-stream")


@dataclass
class Config:
    """How the registry serves. ``root`` holds what the app is not given: storage, ``tenants.db``, the key."""

    root: Path | None = None
    auth: bool = True
    delete: bool = True
    service: str = "taxiway"
    realm: str | None = None
    max_upload_sessions: int = MAX_UPLOAD_SESSIONS  # per org
    max_upload_bytes: int = MAX_UPLOAD_BYTES  # per org, in all its open sessions


def load_key(root: Path) -> bytes:
    """The registry's signing key (tokens, upload state), created once, mode 0600."""
    path = root / "secret.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    try:
        # First writer wins (several workers may start at once); everyone then reads the same key.
        with atomic_write(path, mode=0o600, exclusive=True) as f:
            f.write(secrets.token_bytes(32))
    except FileExistsError:
        pass
    return path.read_bytes()


def _json(obj, status: int = 200, headers: dict | None = None, media_type: str = "application/json") -> Response:
    return Response(orjson.dumps(obj), status_code=status, headers=headers, media_type=media_type)


def _empty(status: int, headers: dict) -> Response:
    return Response(b"", status_code=status, headers={**headers, "Content-Length": "0"})


def _parse_n(request: Request) -> tuple[int | None, str | None]:
    n_raw, last = request.query_params.get("n"), request.query_params.get("last")
    n = None
    if n_raw is not None:
        try:
            n = int(n_raw)
        except ValueError:
            raise DistributionError("UNSUPPORTED", message="invalid n", detail="n must be an integer", status=400) from None
        if n < 0:
            raise DistributionError("UNSUPPORTED", message="invalid n", detail="n must not be negative", status=400)
    return n, last


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The page after ``last`` of at most ``n`` items, and whether more follow."""
    if last is not None:
        items = [i for i in items if i > last]
    if n is None:
        return items, False
    return items[:n], len(items) > n


class Registry:
    """The handlers, sharing one storage, one tenants database and one key.

    Each is passed in, or made from ``config.root`` when not: the filesystem storage
    under it, its ``tenants.db`` (only with ``config.auth``) and its ``secret.key``.
    """

    def __init__(self, config: Config, storage: Storage | None = None, *, tenants: Tenants | None = None,
                 key: bytes | None = None):
        if config.root is None and (storage is None or key is None or (config.auth and tenants is None)):
            raise ValueError("Config.root is needed for whatever is not passed in (storage, key, tenants)")
        root = Path(config.root) if config.root is not None else None
        self.config = config
        self.storage: Storage = storage if storage is not None else FilesystemStorage(root)
        if tenants is None and config.auth:
            tenants = Tenants(root / "tenants.db")
        self.tenants = tenants if config.auth else None
        self.key = key if key is not None else load_key(root)
        # Running hashes of upload sessions, so a finished upload isn't read twice. Only the
        # holder of a session's lock reads or replaces its entry (see ``_receive``).
        self._hashers: dict[str, tuple[int, object]] = {}
        self._purged = time.monotonic()  # serve() removed expired sessions at startup

    # -- helpers -------------------------------------------------------
    @staticmethod
    def org(request: Request) -> str:
        return request.scope["state"].get("org") or ""

    @staticmethod
    def client_name(request: Request) -> str:
        return request.scope["state"].get("client_name") or request.path_params["name"]

    def _state(self, request: Request, upload_id: str) -> str:
        org = request.scope["state"].get("org") or ""
        return tokens.hmac_state({"id": upload_id, "repo": request.path_params["name"], "org": org}, self.key)

    def _upload_location(self, request: Request, upload_id: str) -> str:
        name = self.client_name(request)
        return f"/v2/{name}/blobs/uploads/{upload_id}?" + urlencode({"_state": self._state(request, upload_id)})

    def _session(self, request: Request) -> str:
        """The upload id of a request, if its signed state binds it to this org and repository."""
        upload_id = request.path_params["upload_id"]
        data = tokens.check_state(request.query_params.get("_state", ""), self.key)
        org = self.org(request)
        if (data is None or data.get("id") != upload_id or data.get("repo") != request.path_params["name"]
                or data.get("org") != org or self.storage.upload_size(upload_id, org) is None):
            raise DistributionError("BLOB_UPLOAD_UNKNOWN")
        return upload_id

    def _upload_headers(self, request: Request, upload_id: str, size: int) -> dict[str, str]:
        return {"Location": self._upload_location(request, upload_id), "Docker-Upload-UUID": upload_id,
                "Range": f"0-{max(size - 1, 0)}"}

    async def _receive(self, request: Request, upload_id: str, f, expected: int | None = None) -> int:
        """Append the request body to the session file ``f`` (held, see ``upload_session``); returns the new size.

        ``expected`` is the length the request's Content-Range announced. A request that
        fails part way (the client went away, the body disagrees with its range) leaves
        the session as it was before it, so the client can resend from the same offset.
        """
        start = f.tell()
        org, limit = self.org(request), self.config.max_upload_bytes
        over = DistributionError("TOOMANYREQUESTS", message="too many bytes in open upload sessions",
                             detail=f"this organisation's open upload sessions may hold at most {limit} bytes; "
                                    f"finish or cancel (DELETE) other uploads first",
                             headers=self._upload_headers(request, upload_id, start))
        base = self.storage.upload_bytes(org)
        if base + (expected or 0) > limit:
            raise over
        offset, h = self._hashers.pop(upload_id, (0, None))
        if h is None or offset != start:
            h = hashlib.sha256() if start == 0 else None
        saved = h.copy() if h is not None and start else None
        n, check_at = 0, _QUOTA_STEP
        try:
            # Straight through: buffering chunks here, or handing them to a thread, measured slower.
            async for chunk in request.stream():
                n += len(chunk)
                if expected is not None and n > expected:
                    break
                if h is not None:
                    h.update(chunk)
                if base + n > limit:
                    raise over
                f.write(chunk)
                if n >= check_at:  # the org's sessions together, other requests' bytes included
                    check_at = n + _QUOTA_STEP
                    f.flush()
                    if self.storage.upload_bytes(org) > limit:
                        raise over
            if expected is not None and n != expected:
                raise DistributionError("RANGE_INVALID", detail={"expected_length": expected, "received": n},
                                    headers=self._upload_headers(request, upload_id, start))
            f.flush()
        except OSError as e:
            self.storage.drop_upload(upload_id, org)
            raise storage_error(e, "upload") from e
        except BaseException:
            f.truncate(start)
            f.seek(start)
            if saved is not None:
                self._hashers[upload_id] = (start, saved)
            raise
        if h is not None:
            if len(self._hashers) > 4096:
                self._hashers.pop(next(iter(self._hashers)))
            self._hashers[upload_id] = (start + n, h)
        return start + n

    def _commit(self, upload_id: str, digest: str, f, repo: str, org: str) -> int:
        """Verify, publish and link an upload held as ``f`` (in a thread: it fsyncs, and may hash from disk)."""
        d = Digest.parse(digest)
        offset, h = self._hashers.pop(upload_id, (0, None))
        if h is None or d.algorithm != "sha256" or offset != f.tell():
            h = None
        return self.storage.commit_upload(upload_id, digest, h, session=f, repo=repo, org=org)

    async def _purge_uploads(self) -> None:
        """Now and then, remove sessions idle for longer than the max age (distribution purges every 24h)."""
        now = time.monotonic()
        if now - self._purged < min(PURGE_INTERVAL, self.storage.upload_max_age):
            return
        self._purged = now
        await run_in_threadpool(self.storage.expire_uploads)

    @staticmethod
    def _digest(value: str | None, code: str = "DIGEST_INVALID") -> str:
        if not value or not Digest.is_valid(value):
            raise DistributionError(code, detail={"digest": (value or "")[:200]})
        return value

    # -- base, token, catalog ------------------------------------------
    async def base(self, request: Request) -> Response:
        return _json({})

    async def token(self, request: Request) -> Response:
        if self.tenants is None:
            return _json({"token": "anonymous", "access_token": "anonymous", "expires_in": TOKEN_TTL})
        if request.method == "POST":
            # OAuth2 password grant (application/x-www-form-urlencoded), as docker sends it
            form = parse_qs((await self._read_limited(request, 64 * 1024, "token request")).decode("utf-8", "replace"))
            password = (form.get("password") or [None])[0]
            if (form.get("grant_type") or [""])[0] == "refresh_token":
                password = (form.get("refresh_token") or [None])[0]
            scopes = form.get("scope", [])
            service = (form.get("service") or [None])[0]
        else:
            password = basic_password(request.headers.get("authorization", ""))
            scopes = request.query_params.getlist("scope")
            service = request.query_params.get("service")
        if service is not None and service != self.config.service:
            # A token is only ever issued for this registry, never with an audience a client names.
            raise DistributionError("UNAUTHORIZED", message=f"unknown service {service[:100]!r}",
                                detail=f"this token endpoint issues tokens for service {self.config.service!r} only",
                                headers={"WWW-Authenticate": f'Basic realm="{self.config.service}"'})
        tok = self.tenants.authenticate(str(password)) if password else None
        if tok is None:
            raise DistributionError("UNAUTHORIZED", message="a valid org token is required as the password",
                                headers={"WWW-Authenticate": f'Basic realm="{self.config.service}"'})
        now = int(time.time())
        access = tokens.grant(scopes, tok.scope, tok.repository)
        claims = {"iss": "taxiway", "sub": tok.org, "aud": self.config.service, "iat": now, "nbf": now - 5,
                  "exp": now + TOKEN_TTL, "jti": secrets.token_hex(8), "tid": tok.id, "access": access}
        jwt = tokens.sign(claims, self.key)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return _json({"token": jwt, "access_token": jwt, "expires_in": TOKEN_TTL, "issued_at": issued})

    async def catalog(self, request: Request) -> Response:
        org = request.scope["state"].get("org")
        repos = self.storage.repositories(org or "")
        if org:
            repos = [r[len(org) + 1:] for r in repos if r.startswith(org + "/")]
        n, last = _parse_n(request)
        page, more = paginate(repos, n, last)
        headers = {}
        if more and page:
            headers["Link"] = f'</v2/_catalog?{urlencode({"n": n, "last": page[-1]})}>; rel="next"'
        return _json({"repositories": page}, headers=headers)

    # -- tags ----------------------------------------------------------
    async def tags(self, request: Request) -> Response:
        repo = request.path_params["name"]
        all_tags = self.storage.tags(repo)
        if all_tags is None:
            raise DistributionError("NAME_UNKNOWN", detail={"name": self.client_name(request)})
        n, last = _parse_n(request)
        page, more = paginate(all_tags, n, last)
        name = self.client_name(request)
        headers = {}
        if more and page:
            headers["Link"] = f'</v2/{name}/tags/list?{urlencode({"n": n, "last": page[-1]})}>; rel="next"'
        return _json({"name": name, "tags": page}, headers=headers)

    # -- manifests -----------------------------------------------------
    def _resolve(self, repo: str, reference: str) -> tuple[str, str]:
        if ":" in reference:
            digest = self._digest(reference, "MANIFEST_UNKNOWN")
        elif valid_tag(reference):
            digest = self.storage.resolve_tag(repo, reference)
            if digest is None:
                raise DistributionError("MANIFEST_UNKNOWN", detail={"tag": reference})
        else:
            raise DistributionError("MANIFEST_UNKNOWN", detail={"reference": reference[:200]})
        media_type = self.storage.manifest_media_type(repo, digest)
        if media_type is None:
            raise DistributionError("MANIFEST_UNKNOWN", detail={"digest": digest})
        return digest, media_type

    async def manifest(self, request: Request) -> Response:
        repo, reference = request.path_params["name"], request.path_params["reference"]
        method = request.method
        if method in ("GET", "HEAD"):
            digest, media_type = self._resolve(repo, reference)
            try:
                body = self.storage.read_blob(digest)
            except FileNotFoundError:
                raise DistributionError("MANIFEST_UNKNOWN", detail={"digest": digest}) from None
            headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Content-Type": media_type}
            if method == "HEAD":
                return Response(b"", headers={**headers, "Content-Length": str(len(body))})
            return Response(body, headers=headers)
        if method == "PUT":
            return await self._put_manifest(request, repo, reference)
        # DELETE
        if not self.config.delete:
            raise DistributionError("UNSUPPORTED", message="deletes are disabled on this registry")
        if ":" in reference:
            digest = self._digest(reference, "MANIFEST_UNKNOWN")
            if not self.storage.delete_manifest(repo, digest):
                raise DistributionError("MANIFEST_UNKNOWN", detail={"digest": digest})
            if not self.storage.revisions(repo):
                # The last manifest: the catalog forgets the name; blob links stay until GC.
                self.storage.delete_repository(repo, keep_links=True)
        elif not valid_tag(reference) or not self.storage.delete_tag(repo, reference):
            raise DistributionError("MANIFEST_UNKNOWN", detail={"tag": reference[:200]})
        return _empty(202, {})

    async def _read_limited(self, request: Request, limit: int, what: str = "manifest") -> bytes:
        # 413 with SIZE_INVALID, as distribution answers a manifest over its limit.
        too_big = DistributionError("SIZE_INVALID", message=f"{what} too large",
                                detail=f"{what} larger than {limit} bytes", status=413)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise too_big
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise too_big
        return bytes(buf)

    async def _put_manifest(self, request: Request, repo: str, reference: str) -> Response:
        body = await self._read_limited(request, manifests.MAX_MANIFEST_BYTES)
        m = manifests.parse(body, request.headers.get("content-type"))
        digest, tag = m.digest, None
        if ":" in reference:
            want = Digest.parse(self._digest(reference))
            if str(Digest.of(body, want.algorithm)) != reference:
                raise DistributionError("DIGEST_INVALID", detail={"digest": reference})
            digest = reference
        elif valid_tag(reference):
            tag = reference
        else:
            raise DistributionError("TAG_INVALID", detail={"tag": reference[:200]})
        await run_in_threadpool(self._store_manifest, repo, body, m, digest, tag)
        headers = {"Location": f"/v2/{self.client_name(request)}/manifests/{digest}", "Docker-Content-Digest": digest}
        if m.subject:
            headers["OCI-Subject"] = m.subject
        return _empty(201, headers)

    def _store_manifest(self, repo: str, body: bytes, m: manifests.Manifest, digest: str, tag: str | None) -> None:
        """Check a manifest's references and write it, its referrer entry and its tag (in a thread).

        All of it holds the references' locks shared and the manifest's own exclusively, which GC
        takes to remove a blob or an untagged manifest, so GC sees the manifest wholly before
        (and keeps what it references) or wholly after (and the references are checked anew).
        """
        refs = [r for r in m.refs if not r.external]
        with self.storage.blob_locks(shared=[r.digest for r in refs], exclusive=[digest]):
            for ref in refs:
                if ref.is_manifest:
                    if self.storage.manifest_media_type(repo, ref.digest) is None:
                        raise DistributionError("MANIFEST_BLOB_UNKNOWN", detail={"digest": ref.digest})
                    continue
                self.storage.touch_blob(ref.digest)
                if not self.storage.has_link(repo, ref.digest):
                    raise DistributionError("MANIFEST_BLOB_UNKNOWN", detail={"digest": ref.digest})
                if self.storage.blob_size(ref.digest) != ref.size:
                    raise DistributionError("MANIFEST_INVALID", detail={"digest": ref.digest, "reason": "size mismatch"})
            self.storage.put_manifest(repo, body, digest, m.media_type, locked=True)
            if m.subject:
                self.storage.add_referrer(repo, m.subject, digest, {**m.descriptor(), "digest": digest})
            if tag:
                self.storage.set_tag(repo, tag, digest)
            # Fresh again now that the manifest exists: a GC that marked before it spares them.
            for ref in refs:
                if not ref.is_manifest:
                    self.storage.touch_blob(ref.digest)

    # -- blobs ---------------------------------------------------------
    async def blob(self, request: Request) -> Response:
        repo = request.path_params["name"]
        digest = self._digest(request.path_params["digest"])
        if request.method == "DELETE":
            if not self.config.delete:
                raise DistributionError("UNSUPPORTED", message="deletes are disabled on this registry")
            if not self.storage.unlink(repo, digest):
                raise DistributionError("BLOB_UNKNOWN", detail={"digest": digest})
            return _empty(202, {"Docker-Content-Digest": digest})
        body = self.storage.blob_body(digest) if self.storage.has_link(repo, digest) else None
        if body is None:
            raise DistributionError("BLOB_UNKNOWN", detail={"digest": digest})
        headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Cache-Control": "max-age=31536000"}
        return blob_response(body, headers)

    async def start_upload(self, request: Request) -> Response:
        repo = request.path_params["name"]
        q = request.query_params
        mount, source = q.get("mount"), q.get("from")
        if mount and source and Digest.is_valid(mount) and valid_repository(source):
            linked = await self._mount(request, repo, mount, source)
            if linked:
                return _empty(201, {"Location": f"/v2/{self.client_name(request)}/blobs/{mount}",
                                    "Docker-Content-Digest": mount})
        digest = q.get("digest")
        if digest is not None:
            digest = self._digest(digest)
            org = self.org(request)
            upload_id = self.storage.new_upload(org, max_sessions=self.config.max_upload_sessions, resumable=False)
            try:
                with self.storage.upload_session(upload_id, org) as f:
                    await self._receive(request, upload_id, f)
                    await run_in_threadpool(self._commit, upload_id, digest, f, repo, org)
            finally:
                self.storage.drop_upload(upload_id, org)
                self._hashers.pop(upload_id, None)
            return _empty(201, {"Location": f"/v2/{self.client_name(request)}/blobs/{digest}",
                                "Docker-Content-Digest": digest})
        await self._purge_uploads()
        upload_id = self.storage.new_upload(self.org(request), max_sessions=self.config.max_upload_sessions)
        return _empty(202, self._upload_headers(request, upload_id, 0))

    async def _mount(self, request: Request, repo: str, digest: str, source: str) -> bool:
        """Link a blob from ``source`` if the caller may pull it; False means 'upload it instead'."""
        ident = request.scope["state"].get("identity")
        org = request.scope["state"].get("org")
        if org:
            if ident is None or not ident.may(source, "pull") or len(org) + 1 + len(source) > 255:
                return False
            source = f"{org}/{source}"
        # In a thread: linking waits for the blob's lock, which GC may hold.
        return await run_in_threadpool(self.storage.link, repo, digest, source)

    def _check_range(self, request: Request, upload_id: str, size: int) -> int | None:
        """The body length a Content-Range announces (None without one); 416 unless it starts at ``size``."""
        cr = request.headers.get("content-range")
        if cr is None:
            return None
        m = _RANGE_RE.match(cr.strip())
        length = request.headers.get("content-length")
        ok = m is not None and int(m.group(1)) == size and int(m.group(2)) >= int(m.group(1))
        if ok and length is not None and length.isdigit():
            ok = int(m.group(2)) - int(m.group(1)) + 1 == int(length)
        if not ok:
            raise DistributionError("RANGE_INVALID", detail={"expected_start": size},
                                headers=self._upload_headers(request, upload_id, size))
        return int(m.group(2)) - int(m.group(1)) + 1

    async def upload(self, request: Request) -> Response:
        repo = request.path_params["name"]
        upload_id = self._session(request)
        org = self.org(request)
        size = self.storage.upload_size(upload_id, org) or 0
        method = request.method
        if method == "GET":
            return _empty(204, self._upload_headers(request, upload_id, size))
        if method == "DELETE":
            self.storage.drop_upload(upload_id, org)
            self._hashers.pop(upload_id, None)
            return _empty(204, {})
        try:
            # One request at a time per session: the offset it checks is the one it appends at.
            with self.storage.upload_session(upload_id, org) as f:
                expected = self._check_range(request, upload_id, f.tell())
                if method == "PATCH":
                    size = await self._receive(request, upload_id, f, expected)
                    return _empty(202, self._upload_headers(request, upload_id, size))
                # PUT: the last chunk (if any), then verify, publish and link.
                digest = self._digest(request.query_params.get("digest"))
                await self._receive(request, upload_id, f, expected)
                try:
                    await run_in_threadpool(self._commit, upload_id, digest, f, repo, org)
                finally:
                    self._hashers.pop(upload_id, None)
        except SessionBusy as e:
            e.headers = {"Location": self._upload_location(request, upload_id), "Docker-Upload-UUID": upload_id}
            raise
        return _empty(201, {"Location": f"/v2/{self.client_name(request)}/blobs/{digest}",
                            "Docker-Content-Digest": digest})

    # -- referrers -----------------------------------------------------
    async def referrers(self, request: Request) -> Response:
        repo = request.path_params["name"]
        subject = self._digest(request.path_params["digest"])
        found = self.storage.referrers(repo, subject)
        found = [d for d in found if self.storage.manifest_media_type(repo, d["digest"]) is not None]
        headers = {}
        artifact_type = request.query_params.get("artifactType")
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": found}
        return _json(index, headers=headers, media_type=mt.OCI_INDEX)


async def _distribution_error(request: Request, exc: DistributionError) -> Response:
    body = b"" if request.method == "HEAD" else orjson.dumps(exc.body())
    return Response(body, status_code=exc.status, headers=exc.headers, media_type="application/json")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED"}.get(exc.status_code, "UNSUPPORTED")
    err = DistributionError(code, status=exc.status_code)
    return await _distribution_error(request, err)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # One line, not a traceback: clients going away mid-upload is ordinary (the session was rewound).
    log.warning("registry: %s %s: the client went away before the request body ended", request.method,
                request.url.path)
    return Response(b"", status_code=400)  # nobody is listening


async def _storage_error(request: Request, exc: OSError) -> Response:
    # Whatever a concurrent delete took away under a request is unknown, as if it went first.
    target = classify(request.method, request.url.path)
    if not isinstance(exc, FileNotFoundError):
        log.error("registry: %s %s: %s", request.method, request.url.path, exc)
    return await _distribution_error(request, storage_error(exc, target.kind if target else None))


def create_app(config: Config, storage: Storage | None = None, *, tenants: Tenants | None = None,
               key: bytes | None = None):
    """The registry as an ASGI app: the routes, wrapped by the authorizer.

    ``storage``, ``tenants`` and ``key`` default to those under ``config.root`` (see :class:`Registry`);
    pass a :class:`~taxiway.registry.memory.MemoryStorage` to serve from memory.
    """
    r = Registry(config, storage, tenants=tenants, key=key)
    routes = [
        Route("/v2/", r.base, methods=["GET", "HEAD"]),
        Route("/v2/token", r.token, methods=["GET", "POST"]),
        Route("/v2/_catalog", r.catalog, methods=["GET"]),
        Route("/v2/{name:path}/tags/list", r.tags, methods=["GET"]),
        Route("/v2/{name:path}/manifests/{reference}", r.manifest, methods=["GET", "HEAD", "PUT", "DELETE"]),
        Route("/v2/{name:path}/blobs/uploads/", r.start_upload, methods=["POST"]),
        Route("/v2/{name:path}/blobs/uploads/{upload_id}", r.upload, methods=["GET", "PATCH", "PUT", "DELETE"]),
        Route("/v2/{name:path}/blobs/{digest}", r.blob, methods=["GET", "HEAD", "DELETE"]),
        Route("/v2/{name:path}/referrers/{digest}", r.referrers, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        DistributionError: _distribution_error, HTTPException: _http_error, OSError: _storage_error,
        ClientDisconnect: _client_gone})
    app.state.registry = r
    tenants = r.tenants
    outer = Authorizer(app, tenants=tenants, key=r.key, service=config.service, realm=config.realm)
    if os.environ.get("TAXIWAY_REGISTRY_SENDFILE", "1") == "0":  # for A/B benchmarks: stream blobs through Python
        return outer
    # Outermost, so it sees uvicorn's own ``send`` (blob bodies go out with sendfile(2) there).
    return PathSend(outer)


def app_from_env():
    """uvicorn factory for multi-worker serving: the config comes from the environment."""
    cfg = orjson.loads(os.environ["TAXIWAY_REGISTRY_CONFIG"])
    cfg["root"] = Path(cfg["root"])
    return create_app(Config(**cfg))
