"""The registry's handlers over the in-memory Storage driver: fast unit tests, no disk, no server process.

The app is the real one (routes, authorizer, error handlers) called in-process
by httpx's ASGI transport. Each test runs on the in-memory driver and on the
filesystem one, so the two answer alike; the real server's behaviour on disk
(sendfile, workers, crashes) is pinned by the conformance and concurrency tests.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from taxiway.registry.app import Config, Registry, create_app
from taxiway.registry.memory import MemoryStorage
from taxiway.registry.storage import FilesystemStorage
from taxiway.registry.tenants import Tenants

from .oci import CONFIG, LAYER, MANIFEST, digest

KEY = b"k" * 32


class Client:
    """httpx's AsyncClient on the app, driven from synchronous tests through one event loop."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://registry.test")
        self.headers = self.http.headers

    def __getattr__(self, method: str):
        call = getattr(self.http, method)
        return lambda *a, **k: self.loop.run_until_complete(call(*a, **k))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture(params=["memory", "filesystem"])
def storage(request, tmp_path):
    """Each handler test runs on both drivers: the memory one must answer as the filesystem one does."""
    return MemoryStorage() if request.param == "memory" else FilesystemStorage(tmp_path / "root")


@pytest.fixture
def client(storage):
    app = create_app(Config(auth=False), storage=storage, key=KEY)
    with Client(app) as c:
        yield c


def _push_blob(c: httpx.Client, repo: str, data: bytes) -> str:
    d = digest(data)
    r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data)
    assert r.status_code == 201, r.text
    return d


def _manifest(config: str, layers: list[tuple[str, int]], size: int) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                       "config": {"mediaType": CONFIG, "digest": config, "size": size},
                       "layers": [{"mediaType": LAYER, "digest": d, "size": n} for d, n in layers]}).encode()


def _error(r: httpx.Response) -> str:
    return r.json()["errors"][0]["code"]


def test_the_registry_takes_its_storage_and_never_touches_a_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = MemoryStorage()
    reg = Registry(Config(auth=False), storage, key=KEY)
    assert reg.storage is storage
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="root"):
        Registry(Config(auth=False), storage)  # no key and no root to keep one in


def test_monolithic_and_chunked_uploads_then_pull(client, storage):
    d = _push_blob(client, "app", b"hello")
    r = client.get(f"/v2/app/blobs/{d}")
    assert (r.status_code, r.content, r.headers["docker-content-digest"]) == (200, b"hello", d)
    assert client.head(f"/v2/app/blobs/{d}").headers["content-length"] == "5"
    assert client.get(f"/v2/other/blobs/{d}").status_code == 404  # no link in that repository

    data = b"a" * 10 + b"b" * 7
    r = client.post("/v2/app/blobs/uploads/")
    assert r.status_code == 202
    loc = r.headers["location"]
    r = client.patch(loc, content=data[:10], headers={"Content-Range": "0-9"})
    assert (r.status_code, r.headers["range"]) == (202, "0-9")
    assert _error(client.patch(loc, content=b"x", headers={"Content-Range": "3-3"})) == "RANGE_INVALID"
    loc = r.headers["location"]
    r = client.put(f"{loc}&digest={digest(data)}", content=data[10:])
    assert r.status_code == 201
    assert client.get(f"/v2/app/blobs/{digest(data)}").content == data
    assert client.get(loc).status_code == 404  # the session is gone once committed


def test_a_wrong_digest_stores_nothing(client, storage):
    r = client.post("/v2/app/blobs/uploads/", params={"digest": digest(b"other")}, content=b"bytes")
    assert (r.status_code, _error(r)) == (400, "DIGEST_INVALID")
    assert storage.blob_size(digest(b"bytes")) is None and storage.blob_size(digest(b"other")) is None


def test_manifests_tags_catalog_referrers_and_deletes(client):
    cfg = _push_blob(client, "app", b"{}")
    layer = _push_blob(client, "app", b"layer")
    body = _manifest(cfg, [(layer, 5)], 2)
    missing = _manifest(cfg, [(digest(b"nope"), 4)], 2)
    r = client.put("/v2/app/manifests/v1", content=missing, headers={"Content-Type": MANIFEST})
    assert (r.status_code, _error(r)) == (404, "MANIFEST_BLOB_UNKNOWN")
    r = client.put("/v2/app/manifests/v1", content=_manifest(cfg, [(layer, 6)], 2), headers={"Content-Type": MANIFEST})
    assert _error(r) == "MANIFEST_INVALID"  # size mismatch
    r = client.put("/v2/app/manifests/v1", content=body, headers={"Content-Type": MANIFEST})
    assert r.status_code == 201
    md = r.headers["docker-content-digest"]
    assert md == digest(body)
    r = client.get("/v2/app/manifests/v1")
    assert (r.content, r.headers["content-type"]) == (body, MANIFEST)
    assert client.get("/v2/app/tags/list").json() == {"name": "app", "tags": ["v1"]}
    assert client.get("/v2/_catalog").json() == {"repositories": ["app"]}

    sig = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/x-sig",
                      "config": {"mediaType": CONFIG, "digest": cfg, "size": 2}, "layers": [],
                      "subject": {"mediaType": MANIFEST, "digest": md, "size": len(body)}}).encode()
    r = client.put(f"/v2/app/manifests/{digest(sig)}", content=sig, headers={"Content-Type": MANIFEST})
    assert (r.status_code, r.headers["oci-subject"]) == (201, md)
    found = client.get(f"/v2/app/referrers/{md}").json()["manifests"]
    assert [(m["digest"], m["artifactType"]) for m in found] == [(digest(sig), "application/x-sig")]

    assert client.delete(f"/v2/app/manifests/{digest(sig)}").status_code == 202
    assert client.get(f"/v2/app/referrers/{md}").json()["manifests"] == []
    assert client.delete(f"/v2/app/manifests/{md}").status_code == 202
    assert _error(client.get("/v2/app/manifests/v1")) == "MANIFEST_UNKNOWN"
    assert client.get("/v2/_catalog").json() == {"repositories": []}
    assert _error(client.get("/v2/app/tags/list")) == "NAME_UNKNOWN"
    assert client.get(f"/v2/app/blobs/{layer}").status_code == 200  # links stay until GC


def test_cross_repository_mount(client):
    d = _push_blob(client, "a", b"shared")
    r = client.post("/v2/b/blobs/uploads/", params={"mount": d, "from": "a"})
    assert (r.status_code, r.headers["docker-content-digest"]) == (201, d)
    r = client.post("/v2/c/blobs/uploads/", params={"mount": digest(b"absent"), "from": "a"})
    assert r.status_code == 202  # not mountable: upload it instead


def test_upload_quota_is_enforced_per_org(storage):
    app = create_app(Config(auth=False, max_upload_bytes=8, max_upload_sessions=2), storage=storage, key=KEY)
    with Client(app) as c:
        r = c.post("/v2/app/blobs/uploads/", params={"digest": digest(b"x" * 9)}, content=b"x" * 9)
        assert (r.status_code, _error(r)) == (429, "TOOMANYREQUESTS")
        assert [c.post("/v2/app/blobs/uploads/").status_code for _ in range(3)] == [202, 202, 429]


def test_token_flow_and_org_rewriting(storage, tmp_path):
    tenants = Tenants(tmp_path / "tenants.db")
    tenants.create_org("acme")
    _, secret = tenants.create_token("acme", "push", None)
    app = create_app(Config(), storage=storage, tenants=tenants, key=KEY)
    with Client(app) as c:
        assert c.get("/v2/").status_code == 401
        basic = base64.b64encode(f"me:{secret}".encode()).decode()
        tok = c.get("/v2/token", params={"service": "taxiway", "scope": "repository:web:pull,push"},
                    headers={"Authorization": f"Basic {basic}"}).json()["token"]
        c.headers["Authorization"] = f"Bearer {tok}"
        d = _push_blob(c, "web", b"tenant bytes")
    assert storage.has_link("acme/web", d) and not storage.has_link("web", d)
