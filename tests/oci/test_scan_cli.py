"""`taxiway image scan` and `taxiway image export` end to end: the fixture image pushed to
the real docker-registry with skopeo, pulled with taxiway, scanned and exported as a user would."""

from __future__ import annotations

import json
import os

import pytest
from helpers.images import HIDDEN_SECRETS, write_fixture_image, write_multiplatform
from helpers.layout import skopeo_push


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("scan-layouts")
    write_fixture_image(root / "fixture")
    skopeo_push(root / "fixture", "fixture", f"{registry.address}/scan-fixture:v1")
    write_multiplatform(root / "multi")
    skopeo_push(root / "multi", "multi", f"{registry.address}/scan-clean:v1")  # the amd64 image only
    return registry


def test_scan_reports_hidden_secrets_and_fails_on_request(pushed, taxiway_home, taxiway):
    ref = f"{pushed.address}/scan-fixture:v1"
    assert taxiway("pull", ref).returncode == 0
    r = taxiway("image", "scan", ref, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["has_secrets"] is True
    assert {f["path"].lstrip("/") for f in doc["findings"] if f["secret"]} == set(HIDDEN_SECRETS)
    r = taxiway("image", "scan", ref)
    assert r.returncode == 0 and b"/root/.ssh/id_rsa" in r.stdout and b"private key" in r.stdout
    r = taxiway("image", "scan", ref, "--fail-on-secrets")
    assert r.returncode != 0
    assert r.stderr.decode().startswith("error:") and len(r.stderr.decode().strip().splitlines()) == 1


def test_scan_of_a_clean_image_passes(pushed, taxiway_home, taxiway):
    ref = f"{pushed.address}/scan-clean:v1"
    assert taxiway("pull", ref).returncode == 0
    r = taxiway("image", "scan", ref, "--fail-on-secrets", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["findings"] == []


def test_export_cli_writes_the_root_filesystem(pushed, taxiway_home, taxiway, tmp_path):
    ref = f"{pushed.address}/scan-fixture:v1"
    assert taxiway("pull", ref).returncode == 0
    r = taxiway("image", "export", ref, str(tmp_path / "rootfs"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"][0]["files"] > 0
    assert not (tmp_path / "rootfs/root/.ssh/id_rsa").exists()
    assert os.stat(tmp_path / "rootfs/bin/su-helper").st_mode & 0o4000
    # a second export into the now non-empty directory is refused, in one line
    r = taxiway("image", "export", ref, str(tmp_path / "rootfs"))
    assert r.returncode != 0 and b"not an empty directory" in r.stderr
