"""The OCI distribution-spec conformance workflows, ported to pytest check by check.

Each workflow runs against taxiway's registry (through the token flow, as org
``acme``) and against Debian's docker-registry (CNCF distribution 2.8), or,
when OCI_ROOT_URL is set, against that registry alone (OCI_NAMESPACE,
OCI_CROSSMOUNT_NAMESPACE, OCI_USERNAME, OCI_PASSWORD as in the official suite).
Checks that distribution 2.8 does not implement are xfail for it, with why.
"""

from __future__ import annotations

import os
import secrets

import orjson
import pytest

from .oci import CONFIG, EMPTY, INDEX, LAYER, MANIFEST, OCIClient, digest, with_params

TARGETS = ["env"] if os.environ.get("OCI_ROOT_URL") else ["taxiway", "docker-registry"]


@pytest.fixture(params=TARGETS)
def oci(request):
    if request.param == "env":
        env = dict(os.environ)
    elif request.param == "taxiway":
        txreg = request.getfixturevalue("txreg")
        env = {"OCI_ROOT_URL": txreg.url, "OCI_USERNAME": "conformance", "OCI_PASSWORD": txreg.tokens["acme"]}
    else:
        env = {"OCI_ROOT_URL": request.getfixturevalue("registry").url}
    # A fresh namespace per test keeps the workflows independent of each other.
    ns = env.get("OCI_NAMESPACE", "conformance/test") + "-" + secrets.token_hex(3)
    env = {**env, "OCI_NAMESPACE": ns, "OCI_CROSSMOUNT_NAMESPACE": ns + "-mount"}
    c = OCIClient(env)
    c.target = request.param
    yield c
    c.close()


def xfail_on_distribution(oci, why: str) -> None:
    if oci.target == "docker-registry":
        pytest.xfail(f"docker-registry 2.8: {why}")


def image(c: OCIClient, layers: int = 1, **extra) -> tuple[bytes, str, list[bytes]]:
    """Push a config and layers; returns the manifest body, its digest and the blobs."""
    cfg = orjson.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                        "nonce": secrets.token_hex(8)})
    blobs = [cfg] + [secrets.token_bytes(1024 + i) for i in range(layers)]
    for b in blobs:
        c.push_blob(b)
    m = {"schemaVersion": 2, "mediaType": MANIFEST,
         "config": {"mediaType": CONFIG, "digest": digest(cfg), "size": len(cfg)},
         "layers": [{"mediaType": LAYER, "digest": digest(b), "size": len(b)} for b in blobs[1:]], **extra}
    body = orjson.dumps(m)
    return body, digest(body), blobs


# -- pull ----------------------------------------------------------------------------------------

def test_pull(oci):
    body, mdigest, blobs = image(oci)
    assert oci.push_manifest("tagtest0", body).status_code == 201
    layer = blobs[1]
    # HEAD/GET of blobs
    r = oci.request("HEAD", f"/v2/<name>/blobs/{digest(layer)}")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(layer)
    assert oci.request("HEAD", f"/v2/<name>/blobs/{digest(b'nonexistent')}").status_code == 404
    r = oci.request("GET", f"/v2/<name>/blobs/{digest(layer)}")
    assert r.status_code == 200 and r.content == layer
    assert r.headers.get("docker-content-digest", digest(layer)) == digest(layer)
    r = oci.request("GET", f"/v2/<name>/blobs/{digest(b'nonexistent')}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    # Range requests
    r = oci.request("GET", f"/v2/<name>/blobs/{digest(layer)}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == layer[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(layer)}"
    # HEAD/GET of manifests by tag and by digest
    for ref in ("tagtest0", mdigest):
        r = oci.request("HEAD", f"/v2/<name>/manifests/{ref}", headers={"Accept": MANIFEST})
        assert r.status_code == 200 and r.headers["docker-content-digest"] == mdigest
        r = oci.request("GET", f"/v2/<name>/manifests/{ref}", headers={"Accept": MANIFEST})
        assert r.status_code == 200 and r.content == body
        assert r.headers["content-type"] == MANIFEST and r.headers["docker-content-digest"] == mdigest
    r = oci.request("GET", "/v2/<name>/manifests/.INVALID_MANIFEST_NAME")
    assert r.status_code in (400, 404)
    r = oci.request("GET", f"/v2/<name>/manifests/{digest(b'nope')}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert oci.request("HEAD", "/v2/<name>/manifests/nonexistenttag").status_code == 404
    # Error codes: a repository nobody pushed to
    r = oci.request("GET", "/v2/never-pushed-here/tags/list")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN"


# -- push ----------------------------------------------------------------------------------------

def test_push_streamed(oci):
    blob = secrets.token_bytes(4096)
    r = oci.request("POST", "/v2/<name>/blobs/uploads/")
    assert r.status_code == 202 and r.headers["location"]
    r = oci.request("PATCH", r.headers["location"], content=blob, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.headers["location"]
    url, params = with_params(r.headers["location"], digest=digest(blob))
    r = oci.request("PUT", url, params=params, headers={"Content-Length": "0"})
    assert r.status_code == 201 and r.headers["location"]
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob)}").content == blob


def test_push_monolithic(oci):
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(b'dummy')}").status_code == 404
    blob = secrets.token_bytes(512)
    # POST with ?digest= and the body: one request (a registry may answer 202 and want a PUT)
    r = oci.request("POST", "/v2/<name>/blobs/uploads/", params={"digest": digest(blob)}, content=blob,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code in (201, 202) and r.headers["location"]
    if oci.target == "taxiway":
        assert r.status_code == 201 and r.headers["docker-content-digest"] == digest(blob)
    if r.status_code == 202:
        url, params = with_params(r.headers["location"], digest=digest(blob))
        assert oci.request("PUT", url, params=params, content=blob).status_code == 201
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob)}").status_code == 200
    # POST then PUT with the whole blob
    blob2 = secrets.token_bytes(700)
    r = oci.request("POST", "/v2/<name>/blobs/uploads/")
    assert r.status_code == 202
    url, params = with_params(r.headers["location"], digest=digest(blob2))
    r = oci.request("PUT", url, params=params, content=blob2, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201 and r.headers["location"]
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob2)}").content == blob2
    # A wrong digest is refused and nothing becomes visible
    r = oci.request("POST", "/v2/<name>/blobs/uploads/")
    url, params = with_params(r.headers["location"], digest=digest(b"something else"))
    r = oci.request("PUT", url, params=params, content=b"the real bytes")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert oci.request("HEAD", f"/v2/<name>/blobs/{digest(b'something else')}").status_code == 404
    assert oci.request("HEAD", f"/v2/<name>/blobs/{digest(b'the real bytes')}").status_code == 404


def test_push_chunked(oci):
    blob = secrets.token_bytes(3000)
    c1, c2 = blob[:1000], blob[1000:]
    # First chunk: 202 with Range
    r = oci.request("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
    assert r.status_code == 202
    r = oci.request("PATCH", r.headers["location"], content=c1,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999"})
    assert r.status_code == 202 and r.headers["range"] == "0-999"
    location = r.headers["location"]
    # The session's status: 204 with the Range received so far and a Location
    r = oci.request("GET", location)
    assert r.status_code == 204 and r.headers["range"] == "0-999" and r.headers["location"]
    location = r.headers["location"]
    # Final chunk with PUT
    url, params = with_params(location, digest=digest(blob))
    r = oci.request("PUT", url, params=params, content=c2,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": f"1000-{len(blob) - 1}"})
    assert r.status_code == 201 and r.headers["location"]
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob)}").content == blob
    # Cancel: DELETE the session, then it is unknown
    r = oci.request("POST", "/v2/<name>/blobs/uploads/")
    location = r.headers["location"]
    assert oci.request("DELETE", location).status_code == 204
    r = oci.request("GET", location)
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_push_chunked_out_of_order(oci):
    xfail_on_distribution(oci, "accepts an out-of-order PATCH chunk (202) instead of answering 416")
    blob = secrets.token_bytes(3000)
    c1, c2 = blob[:1000], blob[1000:]
    # Out-of-order first chunk: 416
    r = oci.request("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
    r = oci.request("PATCH", r.headers["location"], content=c2,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": f"1000-{len(blob) - 1}"})
    assert r.status_code == 416
    # After a first chunk, retrying the same chunk is out of order: 416, and the session survives
    r = oci.request("POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"})
    r = oci.request("PATCH", r.headers["location"], content=c1,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999"})
    location = r.headers["location"]
    r = oci.request("PATCH", location, content=c1,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999"})
    assert r.status_code == 416
    r = oci.request("GET", location)
    assert r.status_code == 204 and r.headers["range"] == "0-999"
    url, params = with_params(r.headers["location"], digest=digest(blob))
    r = oci.request("PUT", url, params=params, content=c2, headers={"Content-Range": f"1000-{len(blob) - 1}"})
    assert r.status_code == 201
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob)}").content == blob


def test_push_cross_mount(oci):
    blob = secrets.token_bytes(2048)
    oci.push_blob(blob, name=oci.crossmount)
    scopes = [f"repository:{oci.crossmount}:pull"]
    r = oci.request("POST", "/v2/<name>/blobs/uploads/", params={"mount": digest(blob), "from": oci.crossmount},
                    scopes=scopes)
    assert r.status_code == 201 and r.headers["location"]
    assert oci.request("GET", f"/v2/<name>/blobs/{digest(blob)}").content == blob
    # Mounting something the source doesn't have falls back to an upload session
    r = oci.request("POST", "/v2/<name>/blobs/uploads/",
                    params={"mount": digest(b"not there"), "from": oci.crossmount}, scopes=scopes)
    assert r.status_code == 202 and r.headers["location"]


def test_push_manifests(oci):
    assert oci.request("GET", "/v2/<name>/manifests/nonexistent").status_code == 404
    body, mdigest, _ = image(oci)
    for i in range(4):
        r = oci.push_manifest(f"test{i}", body)
        assert r.status_code == 201 and r.headers["location"]
        assert r.headers["docker-content-digest"] == mdigest
    r = oci.request("GET", f"/v2/<name>/manifests/{mdigest}", headers={"Accept": MANIFEST})
    assert r.status_code == 200
    # By digest, and a digest that doesn't match the body
    assert oci.push_manifest(mdigest, body).status_code == 201
    r = oci.push_manifest(digest(b"other"), body)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    # Manifest without layers (an artifact with the empty config)
    oci.push_blob(b"{}")
    empty = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/vnd.taxiway.test",
             "config": {"mediaType": EMPTY, "digest": digest(b"{}"), "size": 2}, "layers": []}
    r = oci.push_manifest("nolayers", orjson.dumps(empty))
    assert r.status_code == 201
    # A manifest referencing a blob that was never pushed
    bad = {**empty, "layers": [{"mediaType": LAYER, "digest": digest(b"never pushed"), "size": 12}]}
    r = oci.push_manifest("missingblob", orjson.dumps(bad))
    assert r.status_code in (400, 404)
    assert r.json()["errors"][0]["code"] in ("MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "BLOB_UNKNOWN")
    # Not JSON at all
    r = oci.push_manifest("garbage", b"this is not a manifest")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    # An index over the image
    index = orjson.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": mdigest, "size": len(body),
         "platform": {"os": "linux", "architecture": "amd64"}}]})
    r = oci.push_manifest("index", index, INDEX)
    assert r.status_code == 201
    r = oci.request("GET", "/v2/<name>/manifests/index", headers={"Accept": INDEX})
    assert r.status_code == 200 and r.headers["content-type"] == INDEX and r.content == index


# -- content discovery ---------------------------------------------------------------------------

def test_discovery_tags(oci):
    body, _, _ = image(oci)
    tags = [f"tag{i:02d}" for i in range(12)]
    for t in tags:
        assert oci.push_manifest(t, body).status_code == 201
    r = oci.request("GET", "/v2/<name>/tags/list")
    assert r.status_code == 200 and r.json()["name"] == oci.namespace and sorted(r.json()["tags"]) == tags


def test_discovery_tags_pagination(oci):
    xfail_on_distribution(oci, "ignores n and last on tags/list (returns every tag, unsorted)")
    body, _, _ = image(oci)
    tags = [f"tag{i:02d}" for i in range(12)]
    for t in tags:
        assert oci.push_manifest(t, body).status_code == 201
    r = oci.request("GET", "/v2/<name>/tags/list")
    assert r.json()["tags"] == tags  # lexical order
    r = oci.request("GET", "/v2/<name>/tags/list", params={"n": 5})
    assert r.status_code == 200 and r.json()["tags"] == tags[:5]
    link = r.headers.get("link", "")
    assert 'rel="next"' in link and "last=tag04" in link
    r = oci.request("GET", "/v2/<name>/tags/list", params={"n": 5, "last": "tag04"})
    assert r.json()["tags"] == tags[5:10]
    r = oci.request("GET", "/v2/<name>/tags/list", params={"last": "tag09"})
    assert r.json()["tags"] == tags[10:]
    r = oci.request("GET", "/v2/<name>/tags/list", params={"n": 5, "last": "tag09"})
    assert r.json()["tags"] == tags[10:] and "link" not in r.headers


def test_discovery_referrers(oci):
    xfail_on_distribution(oci, "no referrers API (OCI distribution-spec 1.1)")
    body, subject, _ = image(oci)
    assert oci.push_manifest("subject", body).status_code == 201
    oci.push_blob(b"{}")
    sig_layer = secrets.token_bytes(100)
    oci.push_blob(sig_layer)
    made = {}
    for art in ("application/vnd.example.sbom", "application/vnd.example.signature", "application/vnd.example.sbom"):
        m = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": art,
             "config": {"mediaType": EMPTY, "digest": digest(b"{}"), "size": 2},
             "layers": [{"mediaType": "application/octet-stream", "digest": digest(sig_layer), "size": 100}],
             "subject": {"mediaType": MANIFEST, "digest": subject, "size": len(body)},
             "annotations": {"nonce": secrets.token_hex(4)}}
        mb = orjson.dumps(m)
        r = oci.push_manifest(digest(mb), mb)
        assert r.status_code == 201 and r.headers.get("oci-subject") == subject
        made[digest(mb)] = art
    r = oci.request("GET", f"/v2/<name>/referrers/{subject}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(INDEX)
    idx = r.json()
    assert idx["mediaType"] == INDEX and {d["digest"] for d in idx["manifests"]} == set(made)
    assert all(d["artifactType"] == made[d["digest"]] and "nonce" in d["annotations"] for d in idx["manifests"])
    r = oci.request("GET", f"/v2/<name>/referrers/{subject}", params={"artifactType": "application/vnd.example.sbom"})
    assert r.status_code == 200
    got = r.json()["manifests"]
    assert len(got) == 2 and all(d["artifactType"] == "application/vnd.example.sbom" for d in got)
    assert r.headers.get("oci-filters-applied") == "artifactType"
    # No referrers: an empty index, never 404
    r = oci.request("GET", f"/v2/<name>/referrers/{digest(b'nobody refers to me')}")
    assert r.status_code == 200 and r.json()["manifests"] == []
    # After deleting a referrer it is no longer listed
    victim = next(iter(made))
    assert oci.request("DELETE", f"/v2/<name>/manifests/{victim}").status_code == 202
    r = oci.request("GET", f"/v2/<name>/referrers/{subject}")
    assert victim not in {d["digest"] for d in r.json()["manifests"]}


# -- content management --------------------------------------------------------------------------

def test_management_delete_manifest_and_blob(oci):
    body, mdigest, blobs = image(oci)
    assert oci.push_manifest("deleteme", body).status_code == 201
    r = oci.request("DELETE", f"/v2/<name>/manifests/{mdigest}")
    assert r.status_code == 202
    r = oci.request("GET", f"/v2/<name>/manifests/{mdigest}")
    assert r.status_code == 404
    r = oci.request("DELETE", f"/v2/<name>/manifests/{mdigest}")
    assert r.status_code == 404
    for b in blobs:
        assert oci.request("DELETE", f"/v2/<name>/blobs/{digest(b)}").status_code == 202
        assert oci.request("GET", f"/v2/<name>/blobs/{digest(b)}").status_code == 404
    r = oci.request("DELETE", f"/v2/<name>/blobs/{digest(blobs[0])}")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_management_delete_tag(oci):
    xfail_on_distribution(oci, "DELETE /v2/<name>/manifests/<tag> is not supported")
    body, mdigest, _ = image(oci)
    assert oci.push_manifest("keep", body).status_code == 201
    assert oci.push_manifest("drop", body).status_code == 201
    r = oci.request("DELETE", "/v2/<name>/manifests/drop")
    assert r.status_code == 202
    assert oci.request("GET", "/v2/<name>/manifests/drop").status_code == 404
    assert oci.request("GET", "/v2/<name>/manifests/keep").status_code == 200
    r = oci.request("GET", "/v2/<name>/tags/list")
    assert r.json()["tags"] == ["keep"]
