"""image load/save: docker-save tarballs and OCI archives, written and read by skopeo too."""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile

import pytest
import zstandard
from helpers.images import write_fixture_image

from oci.test_pull import store_state

REF = "127.0.0.1:5000/fixture:v1"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive-layout")
    write_fixture_image(root, "fixture")
    return root


def _skopeo(*args: str) -> bytes:
    return subprocess.run(["skopeo", *args], check=True, capture_output=True).stdout


def test_load_classic_docker_save_from_skopeo(layout, tmp_path, taxiway_home, taxiway):
    tar = tmp_path / "classic.tar"
    _skopeo("copy", "--quiet", f"oci:{layout}:fixture", f"docker-archive:{tar}:{REF}")
    r = taxiway("image", "load", "-i", str(tar))
    assert r.returncode == 0, r.stderr
    info = json.loads(taxiway("image", "inspect", REF, "--json", check=True).stdout)
    # docker-archive layers are uncompressed: each layer digest is its diff_id.
    assert [layer["digest"] for layer in info["layers"]] == [layer["diff_id"] for layer in info["layers"]]
    _skopeo("inspect", f"oci:{taxiway_home / 'store'}:{REF}")
    # And gzip-compressed, as docker can load it.
    gz = tmp_path / "classic.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes(), compresslevel=1))
    r = taxiway("image", "load", "-i", str(gz), check=True)
    assert REF.encode() in r.stdout
    zst = tmp_path / "classic.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(tar.read_bytes()))
    r = taxiway("image", "load", "-i", str(zst), check=True)
    assert REF.encode() in r.stdout
    # zstd in several frames (as pzstd writes): all of them are read, as a layer's are.
    raw, z = tar.read_bytes(), zstandard.ZstdCompressor()
    multi = tmp_path / "multi.tar.zst"
    multi.write_bytes(z.compress(raw[: len(raw) // 3]) + z.compress(raw[len(raw) // 3:]))
    r = taxiway("image", "load", "-i", str(multi), check=True)
    assert REF.encode() in r.stdout
    for damaged in (_cut(gz), _cut(zst)):  # one error line, whichever decompressor finds it
        r = taxiway("image", "load", "-i", str(damaged))
        assert r.returncode != 0 and r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr


def _cut(path):
    """A truncated copy of a compressed file."""
    cut = path.with_name("cut-" + path.name)
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def test_load_oci_archive_from_skopeo_needs_a_name_for_a_bare_tag(layout, tmp_path, taxiway_home, taxiway):
    tar = tmp_path / "oci.tar"
    _skopeo("copy", "--quiet", f"oci:{layout}:fixture", f"oci-archive:{tar}:v1")
    before = store_state(taxiway_home)
    r = taxiway("image", "load", "-i", str(tar))
    assert r.returncode != 0 and b"--name" in r.stderr and r.stderr.count(b"\n") == 1
    assert store_state(taxiway_home) == before
    r = taxiway("image", "load", "-i", str(tar), "--name", "127.0.0.1:5000/fixture", check=True)
    assert REF.encode() in r.stdout
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    assert json.loads(taxiway("images", "--json", check=True).stdout)[0]["digest"] == manifest_digest


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_save_roundtrip_and_peers_read_it(layout, tmp_path, taxiway_home, taxiway, monkeypatch, fmt):
    tar = tmp_path / "in.tar"
    _skopeo("copy", "--quiet", f"oci:{layout}:fixture", f"oci-archive:{tar}:{REF}")
    taxiway("image", "load", "-i", str(tar), check=True)
    out = tmp_path / f"saved-{fmt}.tar"
    taxiway("image", "save", REF, "-o", str(out), "--format", fmt, check=True)
    digest = json.loads(taxiway("images", "--json", check=True).stdout)[0]["digest"]
    assert json.loads(_skopeo("inspect", f"oci-archive:{out}:{REF}" if fmt == "oci" else f"oci-archive:{out}"))["Digest"] == digest
    if fmt == "docker":
        # docker-archive readers (docker load, skopeo) see manifest.json; skopeo copies it, verifying every layer.
        with tarfile.open(out) as tf:
            assert json.load(tf.extractfile("manifest.json"))[0]["RepoTags"] == [REF]
        assert len(json.loads(_skopeo("inspect", f"docker-archive:{out}"))["Layers"]) == 3
        _skopeo("copy", "--quiet", f"docker-archive:{out}", f"oci:{tmp_path / 'back'}:x")
    # Load into a fresh store: the same image, byte for byte.
    monkeypatch.setenv("TAXIWAY_HOME", str(tmp_path / "other-home"))
    r = taxiway("image", "load", "-i", str(out), check=True)
    assert digest.encode() in r.stdout


def test_bad_archives(layout, tmp_path, taxiway_home, taxiway):
    before = store_state(taxiway_home)
    notatar = tmp_path / "x.tar"
    notatar.write_bytes(b"hello, not a tar")
    r = taxiway("image", "load", "-i", str(notatar))
    assert r.returncode != 0 and b"not a tar archive" in r.stderr
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        tf.add(__file__, "README")
    r = taxiway("image", "load", "-i", str(empty))
    assert r.returncode != 0 and b"neither a docker-save tarball nor an OCI archive" in r.stderr
    # A tampered blob: digest mismatch, nothing stored.
    tar = tmp_path / "oci.tar"
    _skopeo("copy", "--quiet", f"oci:{layout}:fixture", f"oci-archive:{tar}:{REF}")
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tar) as src, tarfile.open(tampered, "w") as dst:
        biggest = max((m for m in src.getmembers() if m.isfile()), key=lambda m: m.size)
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == biggest.name:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.addfile(m, __import__("io").BytesIO(data) if data is not None else None)
    r = taxiway("image", "load", "-i", str(tampered))
    assert r.returncode != 0 and b"digest" in r.stderr and r.stderr.count(b"\n") == 1
    assert store_state(taxiway_home) == before
    r = taxiway("image", "save", "127.0.0.1:5000/missing:v1", "-o", str(tmp_path / "o.tar"))
    assert r.returncode != 0 and b"no image" in r.stderr and not (tmp_path / "o.tar").exists()
