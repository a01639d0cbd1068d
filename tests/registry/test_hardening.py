"""Outside tester's findings on tokens and limits (items 3, 5, 6): lifetimes, the token
endpoint's service, revocation messages, oversized manifests, unknown scope types."""

from __future__ import annotations

import base64
import json

import httpx
import orjson

from .conftest import tx


def _claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()}


def test_token_lifetimes_must_be_positive_and_at_most_ten_years(txreg):
    root = str(txreg.root)
    for bad in ("0s", "0d", "1000000000d", "3651d"):
        r = tx("registry", "token", "create", "--org", "acme", "--expires", bad, "--root", root, check=False)
        assert r.returncode != 0, (bad, r.stdout)
        assert "lifetime" in r.stderr and r.stdout == "", (bad, r.stderr)
    ok = json.loads(tx("registry", "token", "create", "--org", "acme", "--expires", "3650d", "--root", root,
                       "--json").stdout)
    assert ok["expires"] is not None and ok["expires"] - ok["created"] == 3650 * 86400
    forever = json.loads(tx("registry", "token", "create", "--org", "acme", "--root", root, "--json").stdout)
    assert forever["expires"] is None  # leaving --expires out is how to ask for that


def test_revoking_twice_says_so(txreg):
    root = str(txreg.root)
    tid = json.loads(tx("registry", "token", "create", "--org", "acme", "--root", root, "--json").stdout)["id"]
    assert tx("registry", "token", "revoke", tid, "--root", root).stdout.strip() == f"revoked {tid}"
    again = tx("registry", "token", "revoke", tid, "--root", root)
    assert again.stdout.strip() == f"{tid} was already revoked"


def test_token_endpoint_refuses_another_service(txreg):
    auth = _basic(txreg.tokens["acme"])
    for params in ([("service", "evil"), ("scope", "repository:app:pull")], [("service", ""), ("scope", "x")]):
        r = httpx.get(f"{txreg.url}/v2/token", params=params, headers=auth)
        assert r.status_code == 401, r.text
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED" and "token" not in r.json()
    r = httpx.post(f"{txreg.url}/v2/token", data={"grant_type": "password", "username": "me",
                                                   "password": txreg.tokens["acme"], "service": "evil"})
    assert r.status_code == 401, r.text
    # our own service name, or none at all (then it is ours), still works
    for params in ([("service", "taxiway")], []):
        r = httpx.get(f"{txreg.url}/v2/token", params=params + [("scope", "repository:app:pull")], headers=auth)
        assert r.status_code == 200 and _claims(r.json()["token"])["aud"] == "taxiway"


def test_unknown_scope_types_grant_nothing(txreg):
    auth = _basic(txreg.tokens["acme"])
    scopes = ["foo:bar:baz", "foo:app:pull,push,*", "repositoryx:app:pull", "registry:app:*", "registry:catalog:pull"]
    r = httpx.get(f"{txreg.url}/v2/token", params=[("service", "taxiway")] + [("scope", s) for s in scopes],
                  headers=auth)
    assert r.status_code == 200, r.text
    jwt = r.json()["token"]
    assert _claims(jwt)["access"] == []
    bearer = {"Authorization": f"Bearer {jwt}"}
    assert httpx.get(f"{txreg.url}/v2/app/tags/list", headers=bearer).status_code == 401
    assert httpx.post(f"{txreg.url}/v2/app/blobs/uploads/", headers=bearer).status_code == 401
    assert httpx.get(f"{txreg.url}/v2/_catalog", headers=bearer).status_code == 401
    # the known scope beside an unknown one is granted, and only it
    r = httpx.get(f"{txreg.url}/v2/token", params=[("scope", "foo:app:push"), ("scope", "repository:app:pull")],
                  headers=auth)
    assert _claims(r.json()["token"])["access"] == [{"type": "repository", "name": "app", "actions": ["pull"]}]


def test_oversized_manifest_is_413_size_invalid(txreg):
    with txreg.client("acme", "big") as c:
        body = b"{" + b" " * (4 * 1024 * 1024 + 10) + b"}"
        r = c.put("/v2/big/manifests/v1", content=body, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 413 and r.json()["errors"][0]["code"] == "SIZE_INVALID"

        def chunks():  # no Content-Length: refused once the limit is passed
            yield b"{"
            for _ in range(5):
                yield b" " * (1024 * 1024)
            yield b"}"

        r = c.put("/v2/big/manifests/v2", content=chunks(), headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 413 and r.json()["errors"][0]["code"] == "SIZE_INVALID"
        assert orjson.loads(c.get("/v2/_catalog").content)["repositories"].count("big") == 0
