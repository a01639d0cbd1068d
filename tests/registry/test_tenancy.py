"""Orgs, tokens and isolation: the Docker token flow, name rewriting, and every
endpoint tried with another org's token answering as if the content did not exist."""

from __future__ import annotations

import base64
import json
import secrets
import time

import httpx
import orjson
import pytest

from .conftest import tx
from .oci import CONFIG, LAYER, MANIFEST, digest, with_params


def _push_image(c: httpx.Client, name: str, tag: str) -> tuple[bytes, str, list[bytes]]:
    cfg = orjson.dumps({"os": "linux", "architecture": "amd64", "n": secrets.token_hex(4)})
    layer = secrets.token_bytes(2000)
    for b in (cfg, layer):
        r = c.post(f"/v2/{name}/blobs/uploads/", params={"digest": digest(b)}, content=b)
        assert r.status_code == 201, r.text
    body = orjson.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                         "config": {"mediaType": CONFIG, "digest": digest(cfg), "size": len(cfg)},
                         "layers": [{"mediaType": LAYER, "digest": digest(layer), "size": len(layer)}]})
    r = c.put(f"/v2/{name}/manifests/{tag}", content=body, headers={"Content-Type": MANIFEST})
    assert r.status_code == 201, r.text
    return body, digest(body), [cfg, layer]


def _shape(r: httpx.Response) -> tuple:
    """What a response reveals: status, error codes, and the body of successful listings."""
    codes = ()
    if r.headers.get("content-type", "").startswith("application/json") and r.content:
        codes = tuple(e["code"] for e in r.json().get("errors", []))
    return r.status_code, codes


def test_token_flow_and_rewriting(txreg):
    r = httpx.get(f"{txreg.url}/v2/")
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and f'realm="{txreg.url}/v2/token"' in challenge
    assert 'service="taxiway"' in challenge
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    r = httpx.get(f"{txreg.url}/v2/web/tags/list")
    assert r.status_code == 401 and 'scope="repository:web:pull"' in r.headers["www-authenticate"]
    # Paths that name no repository never reach a handler
    for path in ("/v2//tags/list", "/v2//blobs/" + digest(b"x"), "/v2//manifests/v1", "/nothing"):
        r = httpx.get(txreg.url + path)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN", path
    # Without or with wrong credentials, the token endpoint says 401
    assert httpx.get(f"{txreg.url}/v2/token").status_code == 401
    bad = base64.b64encode(b"u:txw_0000000000000000_" + b"x" * 43).decode()
    assert httpx.get(f"{txreg.url}/v2/token", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    # A token with the scopes asked for, short-lived
    basic = base64.b64encode(f"whoever:{txreg.tokens['acme']}".encode()).decode()
    r = httpx.get(f"{txreg.url}/v2/token", params={"service": "taxiway", "scope": "repository:web:pull,push"},
                  headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and 0 < body["expires_in"] <= 300
    claims = json.loads(base64.urlsafe_b64decode(body["token"].split(".")[1] + "=="))
    assert claims["sub"] == "acme" and claims["access"] == [
        {"type": "repository", "name": "web", "actions": ["pull", "push"]}]
    # The OAuth2 password grant (POST, form-encoded) gives the same kind of token
    r = httpx.post(f"{txreg.url}/v2/token", data={"grant_type": "password", "username": "u", "service": "taxiway",
                                                   "password": txreg.tokens["acme"], "scope": "repository:web:pull"})
    assert r.status_code == 200
    posted = json.loads(base64.urlsafe_b64decode(r.json()["access_token"].split(".")[1] + "=="))
    assert posted["sub"] == "acme" and posted["access"][0]["actions"] == ["pull"]
    r = httpx.post(f"{txreg.url}/v2/token", data={"grant_type": "password", "password": "nope"})
    assert r.status_code == 401
    # A forged token is refused
    h, p, s = body["token"].split(".")
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "other"}).encode()).decode().rstrip("=")
    r = httpx.get(f"{txreg.url}/v2/", headers={"Authorization": f"Bearer {h}.{forged}.{s}"})
    assert r.status_code == 401
    # Pushing `web` as acme stores acme/web
    with txreg.client("acme", "web") as c:
        _push_image(c, "web", "v1")
        assert c.get("/v2/web/manifests/v1").status_code == 200
        assert "web" in c.get("/v2/_catalog").json()["repositories"]
    assert (txreg.root / "repos" / "acme" / "web" / "_manifests" / "tags" / "v1").exists()
    # Basic auth with the org token directly works too (curl-style clients)
    r = httpx.get(f"{txreg.url}/v2/web/tags/list", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and r.json()["tags"] == ["v1"]


def test_scopes_pull_only_expired_and_revoked(txreg):
    root = str(txreg.root)
    pull = tx("registry", "token", "create", "--org", "acme", "--scope", "pull", "--root", root).stdout.strip()
    short = tx("registry", "token", "create", "--org", "acme", "--expires", "10m", "--root", root).stdout.strip()
    txreg.tokens.update(pull=pull, short=short)
    with txreg.client("acme", "scoped") as c:
        _push_image(c, "scoped", "v1")
    # pull-only: the token endpoint grants pull and nothing more; pushes are denied
    with txreg.client("pull", "scoped") as c:
        assert c.get("/v2/scoped/manifests/v1").status_code == 200
        r = c.post("/v2/scoped/blobs/uploads/")
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
        assert c.delete("/v2/scoped/manifests/v1").status_code == 403
    # revoked: the org token and the bearer tokens issued from it stop at once
    with txreg.client("short", "scoped") as c:
        assert c.get("/v2/scoped/tags/list").status_code == 200
        tid = short.split("_")[1]
        ls = json.loads(tx("registry", "token", "ls", "--org", "acme", "--json", "--root", root).stdout)
        assert any(t["id"] == tid and t["active"] for t in ls)
        assert all("hash" not in t and "token" not in t for t in ls)
        tx("registry", "token", "revoke", tid, "--root", root)
        r = c.get("/v2/scoped/tags/list")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer ")
    basic = base64.b64encode(f"u:{short}".encode()).decode()
    assert httpx.get(f"{txreg.url}/v2/token", headers={"Authorization": f"Basic {basic}"}).status_code == 401
    # expired
    exp = tx("registry", "token", "create", "--org", "acme", "--expires", "1s", "--root", root).stdout.strip()
    time.sleep(1.2)
    basic = base64.b64encode(f"u:{exp}".encode()).decode()
    assert httpx.get(f"{txreg.url}/v2/token", headers={"Authorization": f"Basic {basic}"}).status_code == 401
    # tokens are stored hashed: the secret is nowhere in the database
    db = (txreg.root / "tenants.db").read_bytes() + (txreg.root / "tenants.db-wal").read_bytes()
    assert pull.split("_", 2)[2].encode() not in db


def test_every_endpoint_looks_nonexistent_to_another_org(txreg):
    name = "private"
    with txreg.client("acme", name, "mine") as a:
        body, mdigest, blobs = _push_image(a, name, "v1")
        layer = digest(blobs[1])
        # an artifact referring to the image, and an open upload session
        r = a.post(f"/v2/{name}/blobs/uploads/", params={"digest": digest(b"{}")}, content=b"{}")
        art = orjson.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/x-sig",
                            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
                            "layers": [], "subject": {"mediaType": MANIFEST, "digest": mdigest, "size": len(body)}})
        assert a.put(f"/v2/{name}/manifests/{digest(art)}", content=art,
                     headers={"Content-Type": MANIFEST}).status_code == 201
        assert len(a.get(f"/v2/{name}/referrers/{mdigest}").json()["manifests"]) == 1
        session = a.post(f"/v2/{name}/blobs/uploads/").headers["location"]
        assert a.patch(session, content=b"12345").status_code == 202
        session = a.get(session).headers["location"]

    missing_digest = digest(b"never pushed anywhere")
    # (method, path for the other org, the same request against content that really doesn't exist)
    cases = [
        ("GET", f"/v2/{name}/manifests/v1", "/v2/nothing/manifests/v1"),
        ("HEAD", f"/v2/{name}/manifests/v1", "/v2/nothing/manifests/v1"),
        ("GET", f"/v2/{name}/manifests/{mdigest}", f"/v2/{name}/manifests/{missing_digest}"),
        ("HEAD", f"/v2/{name}/manifests/{mdigest}", f"/v2/{name}/manifests/{missing_digest}"),
        ("GET", f"/v2/{name}/blobs/{layer}", f"/v2/{name}/blobs/{missing_digest}"),
        ("HEAD", f"/v2/{name}/blobs/{layer}", f"/v2/{name}/blobs/{missing_digest}"),
        ("GET", f"/v2/{name}/tags/list", "/v2/nothing/tags/list"),
        ("GET", f"/v2/{name}/referrers/{mdigest}", f"/v2/{name}/referrers/{missing_digest}"),
        ("DELETE", f"/v2/{name}/manifests/{mdigest}", f"/v2/{name}/manifests/{missing_digest}"),
        ("DELETE", f"/v2/{name}/manifests/v1", "/v2/nothing/manifests/v1"),
        ("DELETE", f"/v2/{name}/blobs/{layer}", f"/v2/{name}/blobs/{missing_digest}"),
        ("GET", f"/v2/acme/{name}/manifests/v1", "/v2/nothing/manifests/v1"),  # naming the org doesn't help
        ("GET", f"/v2/acme/{name}/blobs/{layer}", f"/v2/{name}/blobs/{missing_digest}"),
    ]
    upload_path, upload_params = with_params(session)
    with txreg.client("other", name, "mine", f"acme/{name}", "nothing") as o:
        for method, path, baseline in cases:
            got, want = o.request(method, path), o.request(method, baseline)
            assert _shape(got) == _shape(want), (method, path, got.text)
            if method == "GET" and "referrers" in path:
                assert got.json()["manifests"] == [] == want.json()["manifests"]
            if "tags/list" in path:
                assert got.status_code == 404
        # acme's upload session, resumed by another org: unknown, whatever the method
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            params = dict(upload_params, digest=digest(b"12345")) if method == "PUT" else upload_params
            r = o.request(method, upload_path, params=params, content=b"x" if method == "PATCH" else None)
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN", method
        # a mount from acme's repository falls back to a plain upload, and links nothing
        r = o.post("/v2/mine/blobs/uploads/", params={"mount": layer, "from": name})
        assert r.status_code == 202
        r = o.post("/v2/mine/blobs/uploads/", params={"mount": layer, "from": f"acme/{name}"})
        assert r.status_code == 202
        assert o.head(f"/v2/mine/blobs/{layer}").status_code == 404
        # a manifest that references acme's blobs can't be pushed: they are unknown here
        r = o.put("/v2/mine/manifests/v1", content=body, headers={"Content-Type": MANIFEST})
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        # the catalog shows only the org's own names
        assert name not in o.get("/v2/_catalog").json()["repositories"]
    # and acme's content is all still there, the session too
    with txreg.client("acme", name) as a:
        assert a.get(f"/v2/{name}/manifests/v1").content == body
        assert a.get(f"/v2/{name}/blobs/{layer}").content == blobs[1]
        r = a.get(upload_path, params=upload_params)
        assert r.status_code == 204 and r.headers["range"] == "0-4"


def test_upload_session_bound_to_repository(txreg):
    with txreg.client("acme", "one", "two") as a:
        loc = a.post("/v2/one/blobs/uploads/").headers["location"]
        path, params = with_params(loc)
        upload_id = path.rsplit("/", 1)[1]
        # the same session id under another repository of the same org: unknown
        r = a.get(f"/v2/two/blobs/uploads/{upload_id}", params=params)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        # a tampered state: unknown
        state = params["_state"]
        r = a.get(path, params={"_state": state[:-2] + ("AA" if not state.endswith("AA") else "BB")})
        assert r.status_code == 404
        # no state: unknown
        assert a.get(path).status_code == 404
        assert a.get(path, params=params).status_code == 204


def test_cross_mount_within_org_needs_pull_on_source(txreg):
    with txreg.client("acme", "src") as a:
        _, _, blobs = _push_image(a, "src", "v1")
    layer = digest(blobs[1])
    # a token scoped to dst only (no pull on src): the mount is not honoured
    with txreg.client("acme", "dst") as c:
        r = c.post("/v2/dst/blobs/uploads/", params={"mount": layer, "from": "src"})
        assert r.status_code == 202
    with txreg.client("acme", "dst", "src") as c:
        r = c.post("/v2/dst/blobs/uploads/", params={"mount": layer, "from": "src"})
        assert r.status_code == 201 and r.headers["docker-content-digest"] == layer
        assert c.get(f"/v2/dst/blobs/{layer}").content == blobs[1]


def test_cli_orgs_and_tokens(tmp_path):
    root = str(tmp_path / "r")
    assert tx("registry", "org", "create", "acme", "--root", root).returncode == 0
    r = tx("registry", "org", "create", "acme", "--root", root, check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: org 'acme' already exists")
    r = tx("registry", "org", "create", "Bad Name", "--root", root, check=False)
    assert r.returncode == 2 and "invalid org name" in r.stderr
    r = tx("registry", "token", "create", "--org", "nope", "--root", root, check=False)
    assert r.returncode != 0 and "org create nope" in r.stderr
    r = tx("registry", "token", "create", "--org", "acme", "--expires", "soon", "--root", root, check=False)
    assert r.returncode == 2 and "invalid duration" in r.stderr
    tok = json.loads(tx("registry", "token", "create", "--org", "acme", "--scope", "pull", "--expires", "30d",
                        "--json", "--root", root).stdout)
    assert tok["token"].startswith("txw_") and tok["scope"] == "pull" and tok["expires"] > time.time() + 29 * 86400
    out = tx("registry", "token", "ls", "--root", root).stdout
    assert tok["id"] in out and "active" in out and tok["token"] not in out
    orgs = json.loads(tx("registry", "org", "ls", "--json", "--root", root).stdout)
    assert orgs == [{"name": "acme", "created": pytest.approx(time.time(), abs=120), "tokens": 1}]
    r = tx("registry", "token", "revoke", "deadbeefdeadbeef", "--root", root, check=False)
    assert r.returncode != 0 and "token ls" in r.stderr
