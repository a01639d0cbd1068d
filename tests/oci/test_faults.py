"""Faults the real docker-registry can't produce, from a crafted registry on loopback:
retries (5xx, 429 + Retry-After), dropped connections resumed with Range, wrong
digests, truncated gzip, non-JSON and schema 1 manifests, unsupported media
types, bearer challenges; zstd and uncompressed layers."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import zstandard
from helpers.layout import Entry, busybox_entries, make_layer

from oci.fakeregistry import fake_registry, sha
from oci.test_pull import store_state

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"

BIG = make_layer(busybox_entries())  # ~2 MB uncompressed


@pytest.fixture
def reg():
    with fake_registry() as r:
        yield r


def _one_line_error(r) -> str:
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_gzip_zstd_and_plain_layers(reg, taxiway_home, taxiway):
    layers = [(gzip.compress(BIG, mtime=0), GZ), (zstandard.ZstdCompressor().compress(make_layer([Entry("z", "file", b"z")])), ZST),
              (make_layer([Entry("plain", "file", b"p")]), TAR)]
    reg.add_image("app", "v1", layers)
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert r.returncode == 0, r.stderr
    assert b"4 blobs fetched" in r.stdout
    info = json.loads(taxiway("image", "inspect", f"{reg.address}/app:v1", "--json", check=True).stdout)
    assert [layer["mediaType"] for layer in info["layers"]] == [GZ, ZST, TAR]
    # Nothing is fetched twice: another tag of the same content only GETs its manifest.
    reg.manifests[("app", "v2")] = reg.manifests[("app", "v1")]
    n = len(reg.requests("GET", "/blobs/"))
    taxiway("pull", f"{reg.address}/app:v2", check=True)
    assert len(reg.requests("GET", "/blobs/")) == n


def test_retries_5xx_and_429_with_retry_after(reg, taxiway_home, taxiway):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("app", "v1", [(blob, GZ)])
    reg.faults = {"manifest": ["500", "429"], sha(blob): ["503", "429"]}
    reg.retry_after = "1"
    t = time.monotonic()
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t >= 2.0  # two Retry-After: 1 waits at least
    assert len(reg.requests("GET", f"/blobs/{sha(blob)}")) == 3


def test_dropped_connection_resumes_with_range(reg, taxiway_home, taxiway):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("app", "v1", [(blob, GZ)])
    reg.drop_after = 300_000
    reg.faults = {sha(blob): ["drop", "drop"]}
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert r.returncode == 0, r.stderr
    gets = reg.requests("GET", f"/blobs/{sha(blob)}")
    assert [g.headers.get("Range") for g in gets] == [None, "bytes=300000-", "bytes=600000-"]


def test_partial_download_resumes_on_the_next_run(reg, taxiway_home, taxiway):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("app", "v1", [(blob, GZ)])
    reg.drop_after = 100_000
    reg.faults = {sha(blob): ["drop"] * 5}  # more than one run's retries
    before = store_state(taxiway_home)
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert "run the pull again" in _one_line_error(r)
    assert store_state(taxiway_home)[0] == before[0]
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert r.returncode == 0, r.stderr
    assert reg.requests("GET", f"/blobs/{sha(blob)}")[-1].headers.get("Range") == "bytes=500000-"


def test_wrong_digest_stores_nothing(reg, taxiway_home, taxiway):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("app", "v1", [(blob, GZ)])
    reg.faults = {sha(blob): ["wrong"]}
    before = store_state(taxiway_home)
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "digest" in err and "nothing was stored" in err
    assert store_state(taxiway_home) == before
    # The bad bytes are gone; only the verified config waits in the ingest area for the next try.
    assert not (taxiway_home / "store" / ".taxiway" / "ingest" / (sha(blob)[7:] + ".partial")).exists()


def test_truncated_gzip_is_rejected(reg, taxiway_home, taxiway):
    good = gzip.compress(BIG, mtime=0)
    truncated = good[: len(good) // 2]  # its digest matches what the manifest says, its content is broken
    reg.add_image("app", "v1", [(truncated, GZ)], diff_ids=[sha(BIG)])
    before = store_state(taxiway_home)
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "truncated gzip" in err
    assert store_state(taxiway_home) == before


def test_diff_id_mismatch_is_rejected(reg, taxiway_home, taxiway):
    reg.add_image("app", "v1", [(gzip.compress(BIG, mtime=0), GZ)], diff_ids=[sha(b"something else")])
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "diff_id" in err


@pytest.mark.parametrize("raw, mtype, needle", [
    (b"<html>not json</html>", "application/vnd.oci.image.manifest.v1+json", "not valid JSON"),
    (json.dumps({"schemaVersion": 1, "name": "app", "tag": "v1", "fsLayers": []}).encode(),
     "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json"}).encode(),
     "application/vnd.example.thing+json", "unsupported media type"),
])
def test_bad_manifests(reg, taxiway_home, taxiway, raw, mtype, needle):
    reg.manifests[("app", "v1")] = (raw, mtype)
    before = store_state(taxiway_home)
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert needle in err and f"{reg.address}/app:v1" in err
    assert store_state(taxiway_home) == before


def test_unsupported_layer_type(reg, taxiway_home, taxiway):
    reg.add_image("app", "v1", [(b"xx", "application/vnd.example.weird")], diff_ids=[sha(b"xx")])
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "unsupported media type application/vnd.example.weird" in err


def test_nondistributable_layer_is_reported(reg, taxiway_home, taxiway):
    nd = gzip.compress(make_layer([Entry("nd", "file", b"nd")]), mtime=0)
    reg.add_image("app", "v1", [(nd, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")])
    r = taxiway("pull", f"{reg.address}/app:v1")
    assert r.returncode == 0, r.stderr
    assert b"non-distributable" in r.stderr


def test_bearer_token_flow(reg, taxiway_home, taxiway, tmp_path):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("team/app", "v1", [(blob, GZ)])
    reg.require_token = True
    reg.bearer = ("alice", "s3cret")
    err = _one_line_error(taxiway("pull", f"{reg.address}/team/app:v1"))
    assert f"taxiway login {reg.address}" in err
    r = taxiway("login", reg.address, "-u", "alice", "--password-stdin", input=b"s3cret\n")
    assert r.returncode == 0, r.stderr
    r = taxiway("pull", f"{reg.address}/team/app:v1")
    assert r.returncode == 0, r.stderr
    assert reg.tokens_issued and reg.tokens_issued[0].endswith("repository:team/app:pull")
    token_gets = reg.requests("GET", "/token")
    assert token_gets[-1].headers.get("Authorization", "").startswith("Basic ")


def test_docker_config_json_credentials(reg, taxiway_home, taxiway, tmp_path):
    import base64

    reg.add_image("app", "v1", [(gzip.compress(BIG, mtime=0), GZ)])
    reg.require_token = True
    reg.bearer = ("bob", "pw:with:colons")
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps(
        {"auths": {f"http://{reg.address}": {"auth": base64.b64encode(b"bob:pw:with:colons").decode()}}}))
    r = taxiway("pull", f"{reg.address}/app:v1", env={"DOCKER_CONFIG": str(docker)})
    assert r.returncode == 0, r.stderr


def test_forbidden_says_to_log_in(reg, taxiway_home, taxiway):
    reg.add_image("app", "v1", [(gzip.compress(BIG, mtime=0), GZ)])
    reg.faults = {"manifest": ["403"]}
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "access denied" in err and f"taxiway login {reg.address}" in err


# Runs argv[1:] and prints "<exit code> <ru_maxrss KiB>" of it last on stdout.
_PEAK_RSS = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def peak_rss_kib(argv: list[str]) -> tuple[int, int, bytes]:
    """Run ``argv``; returns (exit code, its peak RSS in KiB, its stderr).

    Not ``os.wait4`` on a child of pytest: subprocess starts children with vfork
    (and fork copies the parent's pages), so at exec the kernel records the
    *parent's* peak RSS as the child's ``ru_maxrss``; in a full run pytest's own
    peak (hundreds of MiB from other tests) showed up as the pull's. A small
    launcher process in between has a peak of a few MiB, so what is measured is
    the command's own memory (plus at most the launcher's).
    """
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PEAK_RSS, *argv], capture_output=True)
    assert r.returncode == 0, r.stderr
    code, kib = r.stdout.decode().split("\n")[-2].split()
    return int(code), int(kib), r.stderr


def test_peak_rss_is_the_commands_own_not_pytests():
    """The measurement itself: a parent that once had a big peak does not make a tiny command look big."""
    import sys

    ballast = bytearray(300 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: pytest's peak is now > 300 MiB
    del ballast
    code, kib, _ = peak_rss_kib([sys.executable, "-c", "pass"])
    assert code == 0 and kib < 100 * 1024, f"peak RSS {kib // 1024} MiB"


def test_pull_memory_stays_small_for_a_big_layer(reg, taxiway_home):
    """A 256 MiB layer streams through: the pull's peak RSS stays far below the layer size."""
    import os
    import sys

    digest, size = reg.add_repeated_blob(os.urandom(1 << 20), 256)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    reg.blobs[sha(cfg)] = cfg
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
                           "layers": [{"mediaType": TAR, "digest": digest, "size": size}]}).encode()
    reg.manifests[("big", "v1")] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    code, kib, err = peak_rss_kib([sys.executable, "-m", "taxiway", "pull", f"{reg.address}/big:v1"])
    assert code == 0, err
    assert kib < 150 * 1024, f"peak RSS {kib // 1024} MiB"
    assert (taxiway_home / "store" / "blobs" / "sha256" / digest[7:]).stat().st_size == size


def test_blob_missing_on_the_registry(reg, taxiway_home, taxiway):
    blob = gzip.compress(BIG, mtime=0)
    reg.add_image("app", "v1", [(blob, GZ)])
    del reg.blobs[sha(blob)]
    before = store_state(taxiway_home)
    err = _one_line_error(taxiway("pull", f"{reg.address}/app:v1"))
    assert "not found" in err and "BLOB_UNKNOWN" in err and "incomplete" in err
    assert store_state(taxiway_home) == before
