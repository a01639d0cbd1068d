"""Upload sessions that are abandoned, malformed or cut off, and Range requests on blobs
(issue 22 items 3 and 4)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time

import httpx

from .conftest import running, tx
from .oci import digest, with_params
from .test_concurrency import RawRequest, size_of, wait_until


def gc(root, *args: str) -> dict:
    return json.loads(tx("registry", "gc", "--root", str(root), "--json", *args).stdout)


def session_file(root, location: str, org: str = "acme"):
    return root / "uploads" / org / location.split("?")[0].rsplit("/", 1)[1]


def sessions(root) -> list:
    return [p for p in (root / "uploads").rglob("*") if p.is_file()]


def test_gc_removes_abandoned_upload_sessions_but_not_busy_ones(tmp_path):
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        for _ in range(150):
            assert c.post("/v2/app/blobs/uploads/").status_code == 202
        abandoned = c.post("/v2/app/blobs/uploads/").headers["location"]
        path, params = with_params(abandoned)
        assert c.patch(path, params=params, content=secrets.token_bytes(5_000_000)).status_code == 202
        # A session a request is writing to right now: held open mid-body.
        busy = c.post("/v2/app/blobs/uploads/").headers["location"]
        blob = secrets.token_bytes(300_000)
        token = c.headers["authorization"]
        req = RawRequest(reg.address, "PATCH", busy, {"Authorization": token, "Content-Length": str(len(blob))})
        req.send(blob[:100_000])
        wait_until(lambda: size_of(session_file(root, busy)) > 0, "the busy session's first bytes on disk")

        report = gc(root, "--grace", "0s")
        assert report["upload_sessions"] == 151
        assert sessions(root) == [session_file(root, busy)]
        r = c.get(path, params=params)
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"

        req.send(blob[100_000:])
        status, _ = req.response()
        req.close()
        assert status == 202
        path, params = with_params(busy, digest=digest(blob))
        assert c.put(path, params=params).status_code == 201
        assert c.get(f"/v2/app/blobs/{digest(blob)}").content == blob


def test_idle_upload_sessions_expire(tmp_path):
    """TAXIWAY_REGISTRY_UPLOAD_MAX_AGE (default 168h, as distribution's upload purging)."""
    root = tmp_path / "root"
    with running(root, env={"TAXIWAY_REGISTRY_UPLOAD_MAX_AGE": "2s"}) as reg, reg.client("acme", "app") as c:
        stale = c.post("/v2/app/blobs/uploads/").headers["location"]
        path, params = with_params(stale)
        assert c.patch(path, params=params, content=b"x" * 1000).status_code == 202
        old = time.time() - 3600
        os.utime(session_file(root, stale), (old, old))
        for method in ("GET", "PATCH", "PUT"):
            r = c.request(method, path, params={**params, "digest": digest(b"x" * 1000)}, content=b"")
            assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN", (method, r.text)
        # The server's own purge runs at most once per max age (24h by default): a new session
        # after that removes sessions idle for longer.
        stale2 = c.post("/v2/app/blobs/uploads/").headers["location"]
        os.utime(session_file(root, stale2), (old, old))
        time.sleep(2.5)
        fresh = c.post("/v2/app/blobs/uploads/").headers["location"]
        assert not session_file(root, stale2).exists()
        assert session_file(root, fresh).exists()


def test_range_requests_on_blobs(tmp_path):
    """RFC 9110: an invalid Range is ignored (200, the whole blob); an unsatisfiable one is 416."""
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        blob = secrets.token_bytes(1000)
        assert c.post("/v2/app/blobs/uploads/", params={"digest": digest(blob)}, content=blob).status_code == 201
        url = f"/v2/app/blobs/{digest(blob)}"
        for bad in ("bytes=5-2", "bytes=abc", "chars=0-5", "bytes=", "bytes=1-2,x", "5-9"):
            r = c.get(url, headers={"Range": bad})
            assert r.status_code == 200 and r.content == blob, (bad, r.status_code, r.text[:100])
        r = c.get(url, headers={"Range": "bytes=0-3"})
        assert r.status_code == 206 and r.content == blob[:4]
        r = c.get(url, headers={"Range": "bytes=-10"})
        assert r.status_code == 206 and r.content == blob[-10:]
        r = c.get(url, headers={"Range": "bytes=2000-"})
        assert r.status_code == 416 and r.headers["content-range"] == "bytes */1000"
        # curl, as a user would run it
        p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H",
                            f"Authorization: {c.headers['authorization']}", "-H", "Range: bytes=5-2",
                            f"{reg.url}{url}"], capture_output=True, text=True, timeout=60)
        assert p.stdout == "200 1000", p.stdout


def _chunks(data: bytes):
    for i in range(0, len(data), 10):
        yield data[i:i + 10]


def test_chunked_patch_must_match_its_content_range(tmp_path):
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        blob = secrets.token_bytes(200)
        loc = c.post("/v2/app/blobs/uploads/").headers["location"]
        path, params = with_params(loc)
        # A generator body goes out with Transfer-Encoding: chunked, so there is no Content-Length to check.
        for body, announced in ((blob[:50], "0-99"), (blob[:100], "0-49")):
            r = c.patch(path, params=params, content=_chunks(body), headers={"Content-Range": announced})
            assert r.status_code == 416 and r.json()["errors"][0]["code"] == "RANGE_INVALID", (announced, r.text)
            assert size_of(session_file(root, loc)) == 0, "a refused chunk leaves the session as it was"
        r = c.patch(path, params=params, content=_chunks(blob[:100]), headers={"Content-Range": "0-99"})
        assert r.status_code == 202 and r.headers["range"] == "0-99"
        path, params = with_params(r.headers["location"])
        r = c.patch(path, params=params, content=_chunks(blob[100:]), headers={"Content-Range": "100-150"})
        assert r.status_code == 416
        path, params = with_params(r.headers["location"], digest=digest(blob))
        r = c.put(path, params=params, content=_chunks(blob[100:]), headers={"Content-Range": "100-199"})
        assert r.status_code == 201, r.text
        assert c.get(f"/v2/app/blobs/{digest(blob)}").content == blob


def test_a_client_going_away_mid_patch_is_one_log_line(tmp_path):
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        loc = c.post("/v2/app/blobs/uploads/").headers["location"]
        session = session_file(root, loc)
        req = RawRequest(reg.address, "PATCH", loc, {"Authorization": c.headers["authorization"],
                                                     "Content-Length": "100000"})
        req.send(secrets.token_bytes(50_000))
        wait_until(lambda: size_of(session) > 0, "the first bytes on disk")
        req.close()
        log = reg.server.log
        wait_until(lambda: "went away" in log.read_text() or "Traceback" in log.read_text(), "the server to notice")
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert len([line for line in text.splitlines() if "went away" in line]) == 1, text
        wait_until(lambda: size_of(session) == 0, "the session to be rewound")
        # and the session goes on from where it was
        blob = secrets.token_bytes(1000)
        path, params = with_params(loc, digest=digest(blob))
        r = httpx.put(f"{reg.url}{path}", params=params, content=blob, headers={"Authorization": c.headers["authorization"]})
        assert r.status_code == 201, r.text
