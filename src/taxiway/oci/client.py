"""A client for the OCI distribution API (any v2 registry), on httpx.

It owns the transport policy: HTTPS except for loopback registries or
``--insecure``; bearer-token and basic auth on ``WWW-Authenticate`` challenges;
retries with backoff for 5xx, 429 (honouring ``Retry-After``) and dropped
connections; registry error bodies turned into one-line errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import httpx  # the CLI keeps httpx's own CLI from loading (taxiway.cli.main._skip_httpx_cli)

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.oci import mediatypes as mt
from taxiway.oci.auth import Challenge, Credentials, find_credentials, parse_challenge, scope
from taxiway.oci.digest import Digest

USER_AGENT = "taxiway"
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_NETWORK_ERRORS = (httpx.TransportError,)
MAX_MANIFEST = 4 << 20
MAX_ERROR_BODY = 64 << 10  # of an error response, only this much is read (for its error codes)


class RegistryError(TaxiwayError):
    """The registry answered with an error (or could not be reached): the client's error, one line for users.

    ``status`` and ``codes`` are the HTTP status and the distribution-spec codes it sent
    (the server side of those codes is :class:`taxiway.registry.errors.DistributionError`).
    """

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None, codes: tuple[str, ...] = ()):
        super().__init__(message, hint)
        self.status = status
        self.codes = codes


class AuthError(RegistryError):
    """401/403 from the registry or its token service."""


class Unreachable(RegistryError):
    """The registry could not be reached at all (after retries)."""


def read_capped(resp: httpx.Response, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a (streamed) body: a registry can't make taxiway hold more."""
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > limit:
            break
    return bytes(buf[: limit + 1])


def _error_codes(raw: bytes) -> tuple[tuple[str, ...], str]:
    try:
        body = json.loads(raw)
        errs = body.get("errors") or []
        codes = tuple(str(e.get("code", "")) for e in errs if isinstance(e, dict))
        msg = "; ".join(str(e.get("message", "")) for e in errs if isinstance(e, dict) and e.get("message"))
        return codes, msg
    except Exception:
        return (), ""


def retry_after(resp: httpx.Response, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds form), capped at 60."""
    value = resp.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return default


def _is_cert_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def api_host(registry: str) -> str:
    """Where a registry's API lives: Docker Hub's name ``docker.io`` is served by registry-1.docker.io."""
    return "registry-1.docker.io" if registry in ("docker.io", "index.docker.io") else registry


def _tls_context() -> ssl.SSLContext:
    """The system trust store (where `taxiway ca install` puts taxiway's CA), or $SSL_CERT_FILE/$SSL_CERT_DIR."""
    ctx = ssl.create_default_context()
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        ctx.load_verify_locations(cafile=cafile, capath=capath)
    return ctx


class _LazyTLSTransport(httpx.BaseTransport):
    """The HTTPS transport, built on the first HTTPS request.

    Loading the system trust store costs ~25 ms, which a pull from a plain-HTTP
    loopback registry (probed first) never needs.
    """

    def __init__(self, verify: bool, limits: httpx.Limits):
        self._verify = verify
        self._limits = limits
        self._transport: httpx.HTTPTransport | None = None
        self._lock = threading.Lock()

    def _get(self) -> httpx.HTTPTransport:
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    self._transport = httpx.HTTPTransport(verify=_tls_context() if self._verify else False,
                                                          limits=self._limits, trust_env=False)
        return self._transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._get().handle_request(request)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _http_only_context() -> ssl.SSLContext:
    """For the plain-HTTP transport: verifying, with no CA loaded, so HTTPS through it could never succeed."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default


class RegistryClient:
    """One registry host. Thread-safe: layers are fetched from several threads at once."""

    def __init__(self, registry: str, *, insecure: bool = False, credentials: Credentials | None = None,
                 use_stored_credentials: bool = True, timeout: float = 60.0, retries: int = 5, backoff: float = 0.25,
                 is_loopback: bool | None = None):
        from taxiway.oci.reference import Reference

        self.registry = registry
        self.host = api_host(registry)
        self.insecure = insecure
        if is_loopback is None:
            is_loopback = Reference(registry, "x").is_loopback
        self.is_loopback = is_loopback
        self.credentials = credentials or (find_credentials(registry) if use_stored_credentials else None)
        self.retries = retries
        self.backoff = backoff
        self._scheme: str | None = None if (insecure or is_loopback) else "https"
        self._tokens: dict[str, str] = {}
        self._basic = False
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        # Every https:// URL (the registry's, a token realm's, a redirect's) goes through the
        # verifying transport; the default one only ever sees http:// URLs.
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=10.0), follow_redirects=True,
            headers={"User-Agent": USER_AGENT}, trust_env=False,
            transport=httpx.HTTPTransport(verify=_http_only_context(), limits=limits, trust_env=False),
            mounts={"https://": _LazyTLSTransport(not insecure, limits)},
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http(s)://host:port``; the scheme is probed once for loopback and --insecure registries."""
        if self._scheme is None:
            self._scheme = self._probe_scheme()
        return f"{self._scheme}://{self.host}"

    def _probe_scheme(self) -> str:
        if self.is_loopback:
            # Loopback registries usually speak plain HTTP: ask that first (no TLS setup at all),
            # and move to HTTPS only when the server turns out to be a TLS one.
            try:
                resp = self._http.get(f"http://{self.host}/v2/", timeout=5.0)
                if not (resp.status_code == 400 and "HTTPS" in resp.text):
                    return "http"
            except httpx.ConnectError:
                return "http"  # nothing listens: the real request reports it
            except httpx.TransportError:
                pass  # a TLS server hung up on plain text
        try:
            self._http.get(f"https://{self.host}/v2/", timeout=5.0)
            return "https"
        except httpx.ConnectError as e:
            if _is_cert_error(e) and not self.insecure:
                raise RegistryError(f"the TLS certificate of {self.registry} is not trusted",
                                    "trust its CA (SSL_CERT_FILE) or pass --insecure") from e
            return "http"
        except httpx.TransportError:
            return "http"

    def url(self, path: str) -> str:
        """Absolute URL for an API path or a (possibly relative) Location header."""
        if path.startswith("http://") or path.startswith("https://"):
            return path
        return urljoin(self.base_url + "/", path.lstrip("/")) if not path.startswith("/") else self.base_url + path

    def _auth_header(self, key: str) -> dict[str, str]:
        if key in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[key]}"}
        if self._basic and self.credentials:
            return {"Authorization": self.credentials.basic_header()}
        return {}

    def _fetch_token(self, ch: Challenge, scopes: list[str], what: str) -> str:
        realm = ch.realm
        if not realm or not realm.startswith(("http://", "https://")):
            raise AuthError(f"{self.registry} sent a bearer challenge without a usable realm", "the registry is misconfigured")
        params: list[tuple[str, str]] = []
        if ch.params.get("service"):
            params.append(("service", ch.params["service"]))
        for s in scopes:
            params.append(("scope", s))
        headers = {}
        if self.credentials and self.credentials.username != "<token>":
            from taxiway.oci.reference import Reference

            realm_host = urlsplit(realm).netloc
            if realm.startswith("http://") and not self.insecure and not Reference(realm_host, "x").is_loopback:
                raise AuthError(f"{self.registry} wants the credentials for {what} sent over plain HTTP to {realm_host}",
                                "refusing; use a registry whose token service speaks HTTPS, or pass --insecure")
            headers["Authorization"] = self.credentials.basic_header()
        resp = self._send_with_retries("GET", realm, params=params, headers=headers, what=f"token for {what}")
        if resp.status_code in (401, 403):
            raise AuthError(f"the token service of {self.registry} refused the credentials for {what} (HTTP {resp.status_code})",
                            f"run `taxiway login {self.registry}` with a valid user and password", status=resp.status_code)
        if resp.status_code != 200:
            raise RegistryError(f"the token service of {self.registry} answered HTTP {resp.status_code}", "try again later",
                                status=resp.status_code)
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except Exception:
            token = None
        if not token:
            raise AuthError(f"the token service of {self.registry} returned no token", "the registry is misconfigured")
        return str(token)

    def _send_with_retries(self, method: str, url: str, *, what: str, retry: bool = True, stream: bool = False,
                           **kw: Any) -> httpx.Response:
        attempts = self.retries if retry else 1
        delay = self.backoff
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                req = self._http.build_request(method, url, **kw)
                resp = self._http.send(req, stream=stream)
            except _NETWORK_ERRORS as e:
                if _is_cert_error(e):
                    raise RegistryError(f"the TLS certificate of {self.registry} is not trusted",
                                        "trust its CA (SSL_CERT_FILE) or pass --insecure") from e
                # A refused connection means "not running": retry briefly, not for seconds.
                if isinstance(e, httpx.ConnectError) and attempt >= 2:
                    last = True
                if last:
                    reason = str(e) or e.__class__.__name__
                    raise Unreachable(f"cannot reach registry {self.registry} for {what} ({reason})",
                                      "check that the registry is running and the address is right") from e
                time.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 10.0)
                continue
            if resp.status_code in _RETRY_STATUSES and not last:
                wait = retry_after(resp, delay) if resp.status_code in (429, 503) else delay
                resp.close()
                time.sleep(wait * (1 + random.random() / 10))
                delay = min(delay * 2, 10.0)
                continue
            return resp
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, *, repository: str, actions: tuple[str, ...] = ("pull",),
                extra_scopes: tuple[str, ...] = (), headers: dict[str, str] | None = None, what: str | None = None,
                retry: bool = True, stream: bool = False, **kw: Any) -> httpx.Response:
        """Send a request, answering auth challenges; 401/403 become :class:`AuthError`.

        Other statuses are returned to the caller (which knows what a 404 means).
        """
        what = what or f"{self.registry}/{repository}"
        scopes = [scope(repository, actions), *extra_scopes]
        key = " ".join(scopes)
        url = self.url(path)
        for attempt in range(3):
            auth = self._auth_header(key)
            resp = self._send_with_retries(method, url, what=what, retry=retry, stream=stream,
                                           headers={**(headers or {}), **auth}, **kw)
            if resp.status_code != 401 or attempt == 2:
                break
            if stream:
                with contextlib.suppress(httpx.HTTPError):
                    read_capped(resp, MAX_ERROR_BODY)
                resp.close()
            challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
            sent = auth.get("Authorization", "")
            if challenge and challenge.scheme == "bearer" and (not sent.startswith("Bearer ") or attempt == 0):
                # No token yet, or the one we sent expired: get a (new) one, once per request.
                if self._tokens.get(key) is None or sent == f"Bearer {self._tokens.get(key)}":
                    self._tokens[key] = self._fetch_token(challenge, scopes, what)
                self._rewind(kw)
                continue
            if challenge and challenge.scheme == "basic" and self.credentials and not sent.startswith("Basic "):
                self._basic = True  # other threads may have set it already; what matters is what *we* sent
                self._rewind(kw)
                continue
            break
        if resp.status_code == 401:
            if stream:
                resp.close()
            raise AuthError(f"{what}: authentication required by {self.registry}" + (" (the stored credentials were refused)" if self.credentials else ""),
                            f"run `taxiway login {self.registry}`", status=401)
        if resp.status_code == 403:
            if stream:
                resp.close()
            raise AuthError(f"{what}: access denied by {self.registry} (HTTP 403)",
                            f"run `taxiway login {self.registry}` as a user allowed to {'/'.join(actions)} it", status=403)
        return resp

    @staticmethod
    def _rewind(kw: dict[str, Any]) -> None:
        content = kw.get("content")
        if hasattr(content, "seek"):
            content.seek(0)

    def fail(self, resp: httpx.Response, what: str, hint: str | None = None) -> RegistryError:
        """An error for an unexpected response (404 -> NotFound-like message with the registry's code)."""
        raw = b""
        with contextlib.suppress(Exception):
            raw = read_capped(resp, MAX_ERROR_BODY)
        codes, msg = _error_codes(raw)
        detail = f" ({', '.join(c for c in codes if c)}{': ' + msg if msg else ''})" if codes else ""
        if resp.status_code == 404:
            err = RegistryError(f"{what} not found on {self.registry}{detail}", hint or "check the name and tag", status=404, codes=codes)
        else:
            err = RegistryError(f"{what}: {self.registry} answered HTTP {resp.status_code}{detail}", hint or "try again later",
                                status=resp.status_code, codes=codes)
        return err

    def check_login(self) -> bool:
        """Try the credentials on ``/v2/`` (as ``docker login`` does).

        True if the registry accepted them, False if it needs no login at all;
        raises :class:`AuthError` if they are refused, :class:`Unreachable` if
        the registry is down.
        """
        what = f"login to {self.registry}"
        resp = self._send_with_retries("GET", self.url("/v2/"), what=what)
        if resp.status_code == 200:
            return False
        challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
        if resp.status_code == 401 and challenge and challenge.scheme == "bearer":
            token = self._fetch_token(challenge, [], what)
            resp = self._send_with_retries("GET", self.url("/v2/"), what=what, headers={"Authorization": f"Bearer {token}"})
        elif resp.status_code == 401 and challenge and challenge.scheme == "basic" and self.credentials:
            resp = self._send_with_retries("GET", self.url("/v2/"), what=what,
                                           headers={"Authorization": self.credentials.basic_header()})
        if resp.status_code in (401, 403):
            raise AuthError(f"{self.registry} refused the user name or password (HTTP {resp.status_code})",
                            "check them and run `taxiway login` again; nothing was saved", status=resp.status_code)
        if resp.status_code != 200:
            raise self.fail(resp, f"login to {self.registry}")
        return True

    # -- manifests ----------------------------------------------------------

    def get_manifest(self, repository: str, identifier: str, what: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index: (raw bytes, media type, digest). Verifies digests."""
        what = what or f"{self.registry}/{repository}:{identifier}"
        delay = self.backoff
        for attempt in range(self.retries):
            resp = self.request("GET", f"/v2/{repository}/manifests/{identifier}", repository=repository, what=what, stream=True,
                                headers={"Accept": mt.MANIFEST_ACCEPT + ", " + mt.DOCKER_MANIFEST_V1_SIGNED + ", " + mt.DOCKER_MANIFEST_V1})
            try:
                if resp.status_code == 404:
                    e = self.fail(resp, f"image {what}", "check the name and tag (or digest), and that it was pushed")
                    raise NotFound(e.message, e.hint)
                if resp.status_code != 200:
                    raise self.fail(resp, f"manifest of {what}")
                raw = read_capped(resp, MAX_MANIFEST)  # streamed: a huge body is refused, never held whole
                break
            except httpx.TransportError as e:  # dropped while reading the body: retried like a failed request
                if attempt == self.retries - 1:
                    raise Unreachable(f"cannot reach registry {self.registry} for {what} ({e or e.__class__.__name__})",
                                      "check that the registry is running and the address is right") from e
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                resp.close()
        if len(raw) > MAX_MANIFEST:
            raise InvalidInput(f"manifest of {what} is larger than 4 MiB", "this is not an image manifest")
        ctype = resp.headers.get("content-type", "").split(";")[0].strip()
        from taxiway.oci.store import parse_json

        obj = parse_json(raw, f"manifest of {what}")
        media_type = obj.get("mediaType") or ctype
        if media_type in mt.SCHEMA1_TYPES or obj.get("schemaVersion") == 1:
            raise InvalidInput(f"{what} is a Docker schema 1 manifest, which taxiway does not support",
                               "re-push the image with a current tool (docker, podman or skopeo write schema 2)")
        if media_type not in mt.INDEX_TYPES | mt.MANIFEST_TYPES:
            if "manifests" in obj and not media_type:
                media_type = mt.OCI_INDEX
            elif "layers" in obj and not media_type:
                media_type = mt.OCI_MANIFEST
            else:
                raise InvalidInput(f"{what} has unsupported media type {media_type or '(none)'}",
                                   "only OCI and Docker schema 2 images and indexes can be pulled")
        digest = Digest.of(raw).__str__()
        if Digest.is_valid(identifier) and identifier != digest:
            raise InvalidInput(f"manifest of {what} has digest {digest}, not the {identifier} asked for",
                               "the registry served corrupt or tampered content; nothing was stored")
        header = resp.headers.get("docker-content-digest")
        if header and header.startswith("sha256:") and header != digest:
            raise InvalidInput(f"manifest of {what} has digest {digest} but the registry says {header}",
                               "the registry served corrupt content; nothing was stored")
        return raw, media_type, digest

    def put_manifest(self, repository: str, identifier: str, raw: bytes, media_type: str) -> str:
        """Upload a manifest under a tag or digest; returns its digest."""
        what = f"{self.registry}/{repository}:{identifier}"
        resp = self.request("PUT", f"/v2/{repository}/manifests/{identifier}", repository=repository, actions=("pull", "push"),
                            what=what, headers={"Content-Type": media_type}, content=raw)
        if resp.status_code not in (200, 201, 202):
            raise self.fail(resp, f"pushing the manifest of {what}")
        return Digest.of(raw).__str__()

    # -- blobs --------------------------------------------------------------

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: str, offset: int = 0, what: str | None = None) -> Iterator[httpx.Response]:
        """A streaming GET of a blob (from ``offset`` with Range). ``resp.status_code`` is 200 or 206."""
        Digest.parse(digest)
        what = what or f"blob {digest[:19]} of {self.registry}/{repository}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request("GET", f"/v2/{repository}/blobs/{digest}", repository=repository, what=what, headers=headers, stream=True)
        try:
            if resp.status_code == 416 and offset:
                resp.close()
                resp = self.request("GET", f"/v2/{repository}/blobs/{digest}", repository=repository, what=what, stream=True)
            if resp.status_code not in (200, 206):
                raise self.fail(resp, what, "the image is incomplete on the registry" if resp.status_code == 404 else None)
            yield resp
        finally:
            resp.close()

    def blob_exists(self, repository: str, digest: str) -> bool:
        """HEAD a blob."""
        resp = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository=repository, actions=("pull", "push"))
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self.fail(resp, f"checking blob {digest[:19]} in {self.registry}/{repository}")

    def start_upload(self, repository: str, mount: str | None = None, from_repository: str | None = None) -> str | None:
        """POST an upload session; with ``mount`` try a cross-repository mount first.

        Returns None when the blob was mounted, else the upload Location.
        """
        params = {}
        extra: tuple[str, ...] = ()
        if mount and from_repository:
            params = {"mount": mount, "from": from_repository}
            extra = (scope(from_repository, ("pull",)),)
        resp = self.request("POST", f"/v2/{repository}/blobs/uploads/", repository=repository, actions=("pull", "push"),
                            extra_scopes=extra, params=params, headers={"Content-Length": "0"})
        if resp.status_code == 201 and mount:
            return None
        if resp.status_code != 202 or "location" not in resp.headers:
            raise self.fail(resp, f"starting an upload to {self.registry}/{repository}")
        return resp.headers["location"]

    def upload_chunk(self, repository: str, location: str, data: bytes, start: int) -> str:
        """PATCH one chunk at ``start``; returns the next Location."""
        end = start + len(data) - 1
        resp = self.request("PATCH", location, repository=repository, actions=("pull", "push"), retry=False, content=data,
                            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{end}",
                                     "Content-Length": str(len(data))})
        if resp.status_code != 202:
            raise self.fail(resp, f"uploading to {self.registry}/{repository}")
        return resp.headers.get("location", location)

    def finish_upload(self, repository: str, location: str, digest: str, data: bytes | Any = b"", size: int | None = None) -> None:
        """PUT ``?digest=`` (with the remaining bytes, possibly the whole blob)."""
        parts = urlsplit(self.url(location))
        query = parts.query + ("&" if parts.query else "") + urlencode({"digest": digest})
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        resp = self.request("PUT", url, repository=repository, actions=("pull", "push"), retry=False, content=data, headers=headers)
        if resp.status_code not in (201, 204):
            raise self.fail(resp, f"finishing the upload of {digest[:19]} to {self.registry}/{repository}")
