"""Per-org limits on upload sessions (outside tester item 2): how many may be open, how many
bytes they may hold (429 TOOMANYREQUESTS), and sessions surviving a restart."""

from __future__ import annotations

import secrets
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
from helpers.servers import free_port, serve

from .conftest import Registry, running
from .oci import digest, with_params
from .test_upload_sessions import session_file, sessions


def _too_many(r: httpx.Response) -> bool:
    return r.status_code == 429 and r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_open_sessions_per_org_are_capped_exactly_under_parallel_posts(tmp_path):
    root = tmp_path / "root"
    with running(root, orgs=("acme", "other"), extra=("--max-upload-sessions", "10", "--workers", "2")) as reg, \
            reg.client("acme", "app") as c, reg.client("other", "app") as o:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: c.post("/v2/app/blobs/uploads/"), range(40)))
        ok = [r for r in results if r.status_code == 202]
        refused = [r for r in results if r.status_code != 202]
        assert len(ok) == 10 and len(refused) == 30, sorted(r.status_code for r in results)
        assert all(_too_many(r) for r in refused), refused[0].text
        assert "upload sessions" in refused[0].json()["errors"][0]["message"]
        assert len(sessions(root)) == 10
        # a monolithic upload needs a session too; another org has its own allowance
        blob = secrets.token_bytes(1000)
        assert _too_many(c.post("/v2/app/blobs/uploads/", params={"digest": digest(blob)}, content=blob))
        assert o.post("/v2/app/blobs/uploads/").status_code == 202
        # finishing or cancelling one frees its place
        path, params = with_params(ok[0].headers["location"])
        assert c.delete(path, params=params).status_code == 204
        assert c.post("/v2/app/blobs/uploads/", params={"digest": digest(blob)}, content=blob).status_code == 201
        assert c.post("/v2/app/blobs/uploads/").status_code == 202
        assert _too_many(c.post("/v2/app/blobs/uploads/"))


def test_bytes_in_open_sessions_per_org_are_capped(tmp_path):
    root = tmp_path / "root"
    with running(root, orgs=("acme", "other"), extra=("--max-upload-bytes", "1m")) as reg, \
            reg.client("acme", "app") as c, reg.client("other", "app") as o:
        a, b = (with_params(c.post("/v2/app/blobs/uploads/").headers["location"]) for _ in range(2))
        first, second = secrets.token_bytes(600_000), secrets.token_bytes(600_000)
        assert c.patch(a[0], params=a[1], content=first).status_code == 202
        # announced by Content-Length, and streamed without one: both refused, nothing kept
        r = c.patch(b[0], params=b[1], content=second)
        assert _too_many(r), r.text
        assert "bytes" in r.json()["errors"][0]["message"]
        r = c.patch(b[0], params=b[1], content=iter([second[:300_000], second[300_000:]]))
        assert _too_many(r), r.text
        assert session_file(root, b[0]).stat().st_size == 0
        big = secrets.token_bytes(1_100_000)
        assert _too_many(c.post("/v2/app/blobs/uploads/", params={"digest": digest(big)}, content=big))
        # another org is not affected
        assert o.post("/v2/app/blobs/uploads/", params={"digest": digest(second)}, content=second).status_code == 201
        # finishing the first upload frees its bytes
        assert c.put(a[0], params={**a[1], "digest": digest(first)}).status_code == 201
        assert c.patch(b[0], params=b[1], content=second).status_code == 202
        assert c.put(b[0], params={**b[1], "digest": digest(second)}).status_code == 201
        assert c.get(f"/v2/app/blobs/{digest(second)}").content == second


def test_sessions_survive_a_restart_and_old_layout_sessions_are_dropped(tmp_path):
    root = tmp_path / "root"
    blob = secrets.token_bytes(500_000)
    with running(root) as reg, reg.client("acme", "app") as c:
        token = c.headers["authorization"]
        path, params = with_params(c.post("/v2/app/blobs/uploads/").headers["location"])
        assert c.patch(path, params=params, content=blob[:200_000]).status_code == 202
        tokens = reg.tokens
    legacy = root / "uploads" / secrets.token_hex(16)  # a session of a version that kept no org
    legacy.write_bytes(b"x" * 100)
    port = free_port()
    with serve([sys.executable, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{port}",
                "--root", str(root)], port, log=tmp_path / "second.log") as s:
        assert not legacy.exists()
        reg = Registry(s, root, tokens)
        with httpx.Client(base_url=reg.url, headers={"Authorization": token}, timeout=60) as c:
            r = c.get(path, params=params)
            assert r.status_code == 204 and r.headers["range"] == "0-199999"
            r = c.patch(path, params=params, content=blob[200_000:],
                        headers={"Content-Range": f"200000-{len(blob) - 1}"})
            assert r.status_code == 202, r.text
            assert c.put(path, params={**params, "digest": digest(blob)}).status_code == 201
            assert c.get(f"/v2/app/blobs/{digest(blob)}").content == blob
