"""Repository-scoped tokens (the platform's per-app deploy credentials): a token limited to one
repository of its org pushes and pulls that repository only, through basic auth and through the token
flow, and can't reach the org's other repositories, their blobs (cross-repository mount) or the
catalog. Real registry server on loopback; the tokens are made in its tenants database."""

from __future__ import annotations

import base64
import sqlite3

import httpx
import pytest

from taxiway.errors import InvalidInput
from taxiway.registry import tokens
from taxiway.registry.tenants import Tenants

from .conftest import running
from .oci import digest
from .test_tenancy import _push_image


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with running(tmp_path_factory.mktemp("repotok") / "root", orgs=("acme",)) as r:
        t = Tenants(r.root / "tenants.db")
        try:
            r.tokens["web-only"] = t.create_token("acme", "push", 600, repository="web")[1]
            r.tokens["web-pull"] = t.create_token("acme", "pull", 600, repository="web")[1]
        finally:
            t.close()
        yield r


def _basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"acme:{secret}".encode()).decode()}


def test_a_repository_token_reaches_its_repository_only(reg):
    with reg.client("acme", "api") as org:  # the org-wide token pushes another app's image
        _, api_digest, (api_cfg, _) = _push_image(org, "api", "v1")
    with httpx.Client(base_url=reg.url, headers=_basic(reg.tokens["web-only"]), timeout=60) as c:
        _, web_digest, _ = _push_image(c, "web", "v1")  # its own repository: push and pull
        assert c.get(f"/v2/web/manifests/{web_digest}").status_code == 200
        assert c.get("/v2/web/tags/list").json()["tags"] == ["v1"]
        # another repository of the same org: neither pull nor push, nor the catalog
        assert c.get(f"/v2/api/manifests/{api_digest}").status_code in (401, 403)
        assert c.get("/v2/api/tags/list").status_code in (401, 403)
        assert c.post("/v2/api/blobs/uploads/", params={"digest": digest(b"x")}, content=b"x").status_code in (401, 403)
        assert c.get("/v2/_catalog").status_code in (401, 403)
        # and no blob of it by mounting it into its own repository: an upload starts instead
        r = c.post("/v2/web/blobs/uploads/", params={"mount": digest(api_cfg), "from": "api"})
        assert r.status_code == 202
    # the token flow grants nothing else either
    r = httpx.get(f"{reg.url}/v2/token", headers=_basic(reg.tokens["web-only"]),
                  params=[("service", "taxiway"), ("scope", "repository:web:pull,push"),
                          ("scope", "repository:api:pull,push"), ("scope", "registry:catalog:*")])
    assert r.status_code == 200
    bearer = r.json()["token"]
    with httpx.Client(base_url=reg.url, headers={"Authorization": f"Bearer {bearer}"}, timeout=60) as c:
        assert c.get(f"/v2/web/manifests/{web_digest}").status_code == 200
        assert c.get(f"/v2/api/manifests/{api_digest}").status_code in (401, 403)
    # a pull-only repository token pulls its repository, pushes nothing
    with httpx.Client(base_url=reg.url, headers=_basic(reg.tokens["web-pull"]), timeout=60) as c:
        assert c.get(f"/v2/web/manifests/{web_digest}").status_code == 200
        assert c.post("/v2/web/blobs/uploads/", params={"digest": digest(b"y")}, content=b"y").status_code in (401, 403)
        assert c.get(f"/v2/api/manifests/{api_digest}").status_code in (401, 403)


def test_grant_limits_scopes_to_the_tokens_repository():
    asked = ["repository:web:pull,push repository:api:pull", "registry:catalog:*", "repository:web/sub:pull"]
    assert tokens.grant(asked, "push", "web") == [{"type": "repository", "name": "web", "actions": ["pull", "push"]}]
    assert tokens.grant(asked, "pull", "web") == [{"type": "repository", "name": "web", "actions": ["pull"]}]
    assert len(tokens.grant(asked, "push")) == 4  # an org-wide token: everything asked for


def test_tenants_store_the_repository_and_upgrade_older_databases(tmp_path):
    db = tmp_path / "tenants.db"
    old = sqlite3.connect(db)  # the schema before repository-scoped tokens, with one token in it
    old.executescript("""
        CREATE TABLE orgs (name TEXT PRIMARY KEY, created REAL NOT NULL);
        CREATE TABLE tokens (id TEXT PRIMARY KEY, org TEXT NOT NULL REFERENCES orgs(name), hash TEXT NOT NULL,
          scope TEXT NOT NULL CHECK (scope IN ('pull', 'push')), created REAL NOT NULL, expires REAL, revoked REAL);
        INSERT INTO orgs VALUES ('acme', 0);
        INSERT INTO tokens VALUES ('00000000000000aa', 'acme', 'h', 'push', 0, NULL, NULL);""")
    old.commit()
    old.close()
    t = Tenants(db)
    try:
        assert t.get("00000000000000aa").repository is None  # an old token stays org-wide
        tok, secret = t.create_token("acme", "push", 60, repository="web")
        assert t.authenticate(secret).repository == "web" and tok.to_json()["repository"] == "web"
        with pytest.raises(InvalidInput, match="invalid repository"):
            t.create_token("acme", "push", 60, repository="Bad Name")
    finally:
        t.close()
