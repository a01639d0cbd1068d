"""Push to real docker-registry instances and read the result back with skopeo:
HEAD-skips, cross-repository mounts, chunked uploads, indexes, htpasswd auth."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import bcrypt
import pytest
from helpers.images import write_fixture_image, write_multiplatform
from helpers.layout import skopeo_push
from helpers.servers import docker_registry, free_port, serve


def skopeo_inspect(ref: str, raw: bool = False) -> dict:
    args = ["skopeo", "inspect", "--tls-verify=false"] + (["--raw"] if raw else []) + [f"docker://{ref}"]
    return json.loads(subprocess.run(args, check=True, capture_output=True).stdout)


@contextlib.contextmanager
def htpasswd_registry(root: Path, user: str, password: str):
    """docker-registry with htpasswd (bcrypt) basic auth on loopback."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "htpasswd").write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: t\n"
        f"auth:\n  htpasswd:\n    realm: taxiway-test\n    path: {root / 'htpasswd'}\n")
    with serve(["docker-registry", "serve", str(root / "config.yml")], port, log=root / "registry.log") as s:
        yield s


@pytest.fixture(scope="module")
def source(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("push-layouts")
    write_fixture_image(root / "fixture")
    skopeo_push(root / "fixture", "fixture", f"{registry.address}/src/fixture:v1")
    write_multiplatform(root / "multi")
    subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{root / 'multi'}:multi",
                    f"docker://{registry.address}/src/multi:v1"], check=True, capture_output=True)
    return registry


def test_push_mounts_from_another_repository_then_skips(source, taxiway_home, taxiway):
    src = f"{source.address}/src/fixture:v1"
    dst = f"{source.address}/dst/fixture:copy"
    taxiway("pull", src, check=True)
    taxiway("tag", src, dst, check=True)
    r = taxiway("push", dst)
    assert r.returncode == 0, r.stderr
    assert b"0 blobs uploaded" in r.stdout and b"4 mounted" in r.stdout
    assert skopeo_inspect(dst)["Digest"] == skopeo_inspect(src)["Digest"]
    r = taxiway("push", dst, check=True)
    assert b"4 already there" in r.stdout


def test_push_uploads_in_chunks_to_another_registry(source, taxiway_home, taxiway, tmp_path):
    from taxiway.oci.push import push
    from taxiway.oci.store import Store

    src = f"{source.address}/src/fixture:v1"
    taxiway("pull", src, check=True)
    with docker_registry(tmp_path / "other") as other:
        dst = f"{other.address}/copy/fixture:v1"
        taxiway("tag", src, dst, check=True)
        result = push(dst, store=Store(taxiway_home / "store"), chunk_size=64 * 1024)  # the busybox layer goes up in ~16 PATCHes
        assert result.uploaded == 4 and result.mounted == 0 and result.existing == 0
        remote = skopeo_inspect(dst)
        assert remote["Digest"] == skopeo_inspect(src)["Digest"] and len(remote["Layers"]) == 3
        # Read back through skopeo into an OCI layout: every blob verifies.
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{dst}", f"oci:{tmp_path / 'back'}:x"],
                       check=True, capture_output=True)
        # The store remembers the blobs live there now: a push to a new repository mounts them.
        r = taxiway("tag", src, f"{other.address}/third/fixture:v1", check=True)
        r = taxiway("push", f"{other.address}/third/fixture:v1", check=True)
        assert b"4 mounted" in r.stdout


def test_push_index(source, taxiway_home, taxiway, tmp_path):
    src = f"{source.address}/src/multi:v1"
    taxiway("pull", src, "--all-platforms", check=True)
    with docker_registry(tmp_path / "other") as other:
        dst = f"{other.address}/multi:v1"
        taxiway("tag", src, dst, check=True)
        r = taxiway("push", dst)
        assert r.returncode == 0, r.stderr
        index = skopeo_inspect(dst, raw=True)
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json" and len(index["manifests"]) == 2
        arm = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--override-arch", "arm64",
                                         f"docker://{dst}"], check=True, capture_output=True).stdout)
        assert arm["Architecture"] == "arm64"


def test_push_and_pull_with_htpasswd_login(source, taxiway_home, taxiway, tmp_path):
    src = f"{source.address}/src/fixture:v1"
    taxiway("pull", src, check=True)
    with htpasswd_registry(tmp_path / "auth", "alice", "correct horse") as reg:
        dst = f"{reg.address}/team/app:v1"
        taxiway("tag", src, dst, check=True)
        r = taxiway("push", dst)
        assert r.returncode != 0 and f"run `taxiway login {reg.address}`".encode() in r.stderr
        assert r.stderr.count(b"\n") == 1
        r = taxiway("login", reg.address, "-u", "alice", "--password-stdin", input=b"wrong\n")
        assert r.returncode != 0 and b"refused" in r.stderr and b"nothing was saved" in r.stderr
        assert not (taxiway_home.parent / "taxiway-config" / "auth.json").exists()
        taxiway("login", reg.address, "-u", "alice", "--password-stdin", "--no-verify", input=b"wrong\n", check=True)
        r = taxiway("push", dst)
        assert r.returncode != 0 and b"refused" in r.stderr and b"taxiway login" in r.stderr
        taxiway("login", reg.address, "-u", "alice", "--password-stdin", input=b"correct horse\n", check=True)
        auth_file = Path(taxiway_home.parent / "taxiway-config" / "auth.json")
        assert auth_file.stat().st_mode & 0o777 == 0o600
        r = taxiway("push", dst)
        assert r.returncode == 0, r.stderr
        taxiway("image", "rm", dst, check=True)
        r = taxiway("pull", dst)
        assert r.returncode == 0, r.stderr
        taxiway("logout", reg.address, check=True)
        r = taxiway("pull", dst)
        assert r.returncode != 0 and b"taxiway login" in r.stderr


def test_push_errors(taxiway_home, taxiway):
    r = taxiway("push", "127.0.0.1:1/not/in-store:v1")
    assert r.returncode != 0 and b"not in the store" in r.stderr or b"no image" in r.stderr
    r = taxiway("login", "127.0.0.1:1", "-u", "x", "--password-stdin", input=b"\n")
    assert r.returncode != 0 and r.stderr.startswith(b"error: ")
    r = taxiway("logout", "127.0.0.1:1")
    assert r.returncode != 0 and b"no credentials" in r.stderr


def test_push_any_image_model(source, tmp_path, taxiway_home):
    """push_image takes any Image (here one read straight from an OCI layout, as the builder would hand over)."""
    from helpers.images import LayoutImage

    from taxiway.oci.push import push_image

    write_fixture_image(tmp_path / "layout")
    img = LayoutImage(tmp_path / "layout", "fixture")
    result = push_image(img, f"{source.address}/from-layout/app:v1")
    assert result.uploaded + result.existing == 4 and result.digest == img.digest()
    assert skopeo_inspect(f"{source.address}/from-layout/app:v1")["Digest"] == img.digest()


def test_copy_between_registries_without_the_store(source, tmp_path, taxiway_home):
    """RemoteImage is an Image too: push_image copies registry to registry, export unpacks from the network."""
    from taxiway.oci.pull import RemoteImage
    from taxiway.oci.push import push_image
    from taxiway.oci.store import Store
    from taxiway.oci.unpack import export

    with RemoteImage.fetch(f"{source.address}/src/multi:v1") as src:  # an index: the host's platform is chosen
        assert src.config()["architecture"] == "amd64"
        with docker_registry(tmp_path / "other") as other:
            result = push_image(src, f"{other.address}/copied:v1")
            assert result.uploaded == 2 and skopeo_inspect(f"{other.address}/copied:v1")["Digest"] == src.digest()
    with RemoteImage.fetch(f"{source.address}/src/fixture:v1") as img:
        stats = export(img, tmp_path / "rootfs")
    assert len(stats.layers) == 3 and (tmp_path / "rootfs" / "bin" / "busybox").exists()
    assert list(Store(taxiway_home / "store").blobs.iterdir()) == []
