"""Bad input and faults: fuzzed manifests over HTTP, wrong digests, oversized
bodies, bad names, kill -9 in the middle of uploads, a full disk, TLS."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest
from helpers.servers import free_port, serve, stop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Registry, running, tx
from .oci import CONFIG, INDEX, LAYER, MANIFEST, digest, with_params
from .test_units import VALID, json_values, mutated
from .test_upload_sessions import sessions


@pytest.fixture(scope="module")
def acme(txreg):
    with txreg.client("acme", "fuzz", "bad") as c:
        c.post("/v2/fuzz/blobs/uploads/", params={"digest": digest(b"x")}, content=b"x")
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), st.builds(lambda d: json.dumps(d).encode(),
                                                         st.one_of(json_values, mutated(VALID)))),
       ctype=st.sampled_from([MANIFEST, INDEX, "application/json", "text/plain"]))
def test_fuzzed_manifests_are_always_4xx(acme, body, ctype):
    r = acme.put("/v2/fuzz/manifests/fuzzed", content=body, headers={"Content-Type": ctype})
    if r.status_code == 201:  # a mutation that is still a valid manifest of known blobs
        return
    assert 400 <= r.status_code < 500, (r.status_code, body, r.text)
    assert r.json()["errors"][0]["code"] in ("MANIFEST_INVALID", "MANIFEST_BLOB_UNKNOWN", "TAG_INVALID")


def test_bad_input(acme, txreg):
    c = acme
    # invalid names and tags, digests that aren't digests
    r = c.get("/v2/Bad..Name/tags/list")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "NAME_INVALID"
    r = c.put("/v2/bad/manifests/-not-a-tag", content=orjson.dumps(VALID), headers={"Content-Type": MANIFEST})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "TAG_INVALID"
    r = c.get("/v2/bad/blobs/sha256:nothex")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    r = c.get("/v2/bad/referrers/md5:abc")
    assert r.status_code == 400
    r = c.post("/v2/bad/blobs/uploads/", params={"digest": "sha256:" + "0" * 63}, content=b"x")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    # wrong digest on a monolithic upload, and on a manifest PUT by digest
    r = c.post("/v2/bad/blobs/uploads/", params={"digest": digest(b"a")}, content=b"b")
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert c.head(f"/v2/bad/blobs/{digest(b'a')}").status_code == 404
    assert not sessions(txreg.root)
    # a manifest whose layer size disagrees with the blob
    c.post("/v2/bad/blobs/uploads/", params={"digest": digest(b"12345")}, content=b"12345")
    m = {**VALID, "config": {"mediaType": CONFIG, "digest": digest(b"12345"), "size": 5},
         "layers": [{"mediaType": LAYER, "digest": digest(b"12345"), "size": 99}]}
    r = c.put("/v2/bad/manifests/v1", content=orjson.dumps(m), headers={"Content-Type": MANIFEST})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    # an index pointing at a manifest that isn't there
    idx = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [{"mediaType": MANIFEST, "digest": digest(b"m"), "size": 1}]}
    r = c.put("/v2/bad/manifests/idx", content=orjson.dumps(idx), headers={"Content-Type": INDEX})
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    # oversized manifest: refused before it is read in full
    r = c.put("/v2/bad/manifests/big", content=b"{" + b" " * (4 * 1024 * 1024 + 10) + b"}",
              headers={"Content-Type": MANIFEST})
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == "SIZE_INVALID"
    # unsupported methods answer in the spec's error format
    r = c.request("POST", "/v2/bad/manifests/v1")
    assert r.status_code == 405 and r.json()["errors"][0]["code"] == "UNSUPPORTED"
    # pagination parameters that aren't numbers
    assert c.get("/v2/fuzz/tags/list", params={"n": "many"}).status_code == 400


def _upload_slowly(url: str, token: str, chunks: int, started: threading.Event, errors: list) -> None:
    def body():
        for i in range(chunks):
            if i == 2:
                started.set()
            yield secrets.token_bytes(256 * 1024)
            time.sleep(0.05)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            loc = c.post("/v2/crash/blobs/uploads/").headers["location"]
            path, params = with_params(loc)
            c.patch(path, params=params, content=body())
    except httpx.HTTPError as e:
        errors.append(e)


def test_kill_9_mid_upload_then_restart(tmp_path):
    root = tmp_path / "root"
    with running(root) as reg:
        s = reg.server
        with reg.client("acme", "crash") as c:
            whole = secrets.token_bytes(300_000)
            assert c.post("/v2/crash/blobs/uploads/", params={"digest": digest(whole)}, content=whole).status_code == 201
            m = orjson.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                              "config": {"mediaType": CONFIG, "digest": digest(whole), "size": len(whole)},
                              "layers": []})
            assert c.put("/v2/crash/manifests/v1", content=m, headers={"Content-Type": MANIFEST}).status_code == 201
            token = reg.bearer("acme", "repository:crash:pull,push")
        started, errors = threading.Event(), []
        t = threading.Thread(target=_upload_slowly, args=(s.url, token, 200, started, errors))
        t.start()
        assert started.wait(20)
        time.sleep(0.2)
        assert sessions(root), "the upload should be in progress"
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
        t.join(30)
        assert errors, "the client should see the connection drop"
    # Nothing partial is visible as a blob: every blob file hashes to its name.
    for p in (root / "blobs").rglob("*"):
        if p.is_file():
            assert not p.name.startswith(".")
            assert digest(p.read_bytes()) == f"sha256:{p.name}"
    port = free_port()
    with serve([sys.executable, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{port}",
                "--root", str(root)], port) as s2:
        # The cut-off session stays resumable (as in distribution): its bytes are on disk, never a blob.
        assert len(sessions(root)) == 1
        reg = Registry(s2, root, reg.tokens)
        with reg.client("acme", "crash") as c:
            r = c.get("/v2/crash/manifests/v1")
            assert r.status_code == 200 and r.content == m
            assert c.get(f"/v2/crash/blobs/{digest(whole)}").content == whole
            # and pushing works again
            b = secrets.token_bytes(1000)
            assert c.post("/v2/crash/blobs/uploads/", params={"digest": digest(b)}, content=b).status_code == 201


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (the tests run as root in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert p.returncode == 0, f"mounting a tmpfs needs root: {p.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk(small_disk):
    root = small_disk / "root"
    with running(root) as reg:
        s = reg.server
        with reg.client("acme", "full") as c:
            first = secrets.token_bytes(1_500_000)
            assert c.post("/v2/full/blobs/uploads/", params={"digest": digest(first)}, content=first).status_code == 201
            big = secrets.token_bytes(3_500_000)
            # monolithic
            r = c.post("/v2/full/blobs/uploads/", params={"digest": digest(big)}, content=big)
            assert r.status_code == 507 and r.json()["errors"][0]["code"] == "STORAGE_FULL"
            # chunked
            loc = c.post("/v2/full/blobs/uploads/").headers["location"]
            path, params = with_params(loc)
            r = c.patch(path, params=params, content=big)
            assert r.status_code == 507 and r.json()["errors"][0]["code"] == "STORAGE_FULL"
            assert c.head(f"/v2/full/blobs/{digest(big)}").status_code == 404
            assert not sessions(root), "failed uploads leave nothing behind"
            assert c.get(f"/v2/full/blobs/{digest(first)}").content == first
            # once there is room again, pushes work
            small = secrets.token_bytes(100_000)
            assert c.post("/v2/full/blobs/uploads/", params={"digest": digest(small)}, content=small).status_code == 201
        assert s.proc.poll() is None


def _self_signed(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    root = tmp_path / "root"
    tx("registry", "org", "create", "acme", "--root", str(root))
    token = tx("registry", "token", "create", "--org", "acme", "--root", str(root)).stdout.strip()
    port = free_port()
    with serve([sys.executable, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{port}",
                "--root", str(root), "--tls-cert", str(cert), "--tls-key", str(key)], port) as s:
        r = httpx.get(f"https://127.0.0.1:{port}/v2/", verify=ssl.create_default_context(cafile=str(cert)))
        assert r.status_code == 401 and f'realm="https://127.0.0.1:{port}/v2/token"' in r.headers["www-authenticate"]
        certs_dir = tmp_path / "certs.d"
        certs_dir.mkdir()
        (certs_dir / "ca.crt").write_bytes(cert.read_bytes())
        from helpers.layout import busybox_entries, make_layer, write_layout

        write_layout(tmp_path / "layout", [make_layer(busybox_entries()[:4])], tag="v1")
        p = subprocess.run(["skopeo", "copy", "--dest-cert-dir", str(certs_dir), "--dest-creds", f"x:{token}",
                            f"oci:{tmp_path}/layout:v1", f"docker://127.0.0.1:{port}/secure:v1"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        stop(s.proc)
    # --tls-cert without --tls-key is one clear error
    r = tx("registry", "serve", "--root", str(root), "--tls-cert", str(cert), check=False)
    assert r.returncode != 0 and r.stderr.strip().startswith("error: --tls-cert and --tls-key go together")


def test_upload_sessions_span_worker_processes(tmp_path):
    """With --workers 2, the chunks of one upload land on either process; the digest still checks out."""
    with running(tmp_path / "root", extra=("--workers", "2")) as reg:
        token = reg.bearer("acme", "repository:multi:pull,push")
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(6):
            blob = secrets.token_bytes(300_000)
            parts = [blob[:100_000], blob[100_000:200_000], blob[200_000:]]
            # a new connection per request, so the kernel spreads them over both workers
            r = httpx.post(f"{reg.url}/v2/multi/blobs/uploads/", headers=headers)
            path, params = with_params(r.headers["location"])
            for i, part in enumerate(parts[:2]):
                start = i * 100_000
                r = httpx.patch(f"{reg.url}{path}", params=params, content=part,
                                headers={**headers, "Content-Range": f"{start}-{start + len(part) - 1}"})
                assert r.status_code == 202, r.text
                path, params = with_params(r.headers["location"])
            r = httpx.put(f"{reg.url}{path}", params={**params, "digest": digest(blob)}, content=parts[2],
                          headers=headers)
            assert r.status_code == 201, r.text
            assert httpx.get(f"{reg.url}/v2/multi/blobs/{digest(blob)}", headers=headers).content == blob
