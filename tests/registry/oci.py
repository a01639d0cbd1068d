"""A tiny distribution-spec test client configured like the OCI conformance suite.

It reads OCI_ROOT_URL, OCI_NAMESPACE, OCI_CROSSMOUNT_NAMESPACE, OCI_USERNAME and
OCI_PASSWORD, and answers 401 challenges the way clients do: Bearer via the
token endpoint (basic credentials, the challenged scope), or Basic.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

import httpx

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class OCIClient:
    def __init__(self, env: dict[str, str] | None = None):
        env = env or dict(os.environ)
        self.root = env["OCI_ROOT_URL"].rstrip("/")
        self.namespace = env.get("OCI_NAMESPACE", "conformance/test")
        self.crossmount = env.get("OCI_CROSSMOUNT_NAMESPACE", self.namespace + "-mount")
        self.username = env.get("OCI_USERNAME", "")
        self.password = env.get("OCI_PASSWORD", "")
        self.http = httpx.Client(base_url=self.root, timeout=60)
        self._auth: str | None = None

    def close(self) -> None:
        self.http.close()

    def _basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def _login(self, header: str, extra_scopes: list[str]) -> None:
        scheme, params = _challenge(header)
        if scheme == "basic":
            self._auth = self._basic()
            return
        scopes = [params["scope"]] if params.get("scope") else []
        r = self.http.get(params["realm"], params=[("service", params.get("service", ""))]
                          + [("scope", s) for s in scopes + extra_scopes],
                          headers={"Authorization": self._basic()} if self.username or self.password else {})
        r.raise_for_status()
        self._auth = "Bearer " + (r.json().get("token") or r.json()["access_token"])

    def request(self, method: str, url: str, *, scopes: list[str] | None = None, **kw) -> httpx.Response:
        """One request; a 401 with a challenge is answered once and the request retried."""
        headers = dict(kw.pop("headers", {}) or {})
        url = url.replace("<name>", self.namespace)
        for attempt in range(2):
            h = dict(headers)
            if self._auth:
                h["Authorization"] = self._auth
            r = self.http.request(method, url, headers=h, **kw)
            if r.status_code != 401 or attempt or "www-authenticate" not in r.headers:
                return r
            self._login(r.headers["www-authenticate"], scopes or [])
        return r

    # conveniences used by several workflows
    def push_blob(self, data: bytes, name: str | None = None) -> str:
        d = digest(data)
        name = name or self.namespace
        r = self.request("POST", f"/v2/{name}/blobs/uploads/")
        assert r.status_code == 202, r.text
        url, params = with_params(r.headers["location"], digest=d)
        r = self.request("PUT", url, params=params, content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return d

    def push_manifest(self, ref: str, body: bytes, media_type: str = MANIFEST, name: str | None = None) -> httpx.Response:
        return self.request("PUT", f"/v2/{name or self.namespace}/manifests/{ref}", content=body,
                            headers={"Content-Type": media_type})


def _merge(location: str, **params: str) -> dict[str, str]:
    """The query of ``location`` plus ``params`` (httpx replaces a URL's query when params are given)."""
    q = dict(httpx.URL(location).params)
    q.update(params)
    return q


def with_params(location: str, **params: str) -> tuple[str, dict[str, str]]:
    url = httpx.URL(location)
    return str(url.copy_with(query=None)), _merge(location, **params)
