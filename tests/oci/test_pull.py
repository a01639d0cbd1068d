"""Pull from the real docker-registry: OCI and Docker schema 2, indexes, platforms,
shared layers, and reading our store back with skopeo and umoci."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.images import write_fixture_image, write_multiplatform
from helpers.layout import Entry, busybox_entries, make_layer, skopeo_push, write_layout


def store_state(home) -> tuple[bytes, frozenset[str]]:
    """index.json and the set of blobs: what 'the store is unchanged' compares."""
    from taxiway.oci.store import Store

    store = Store(home / "store")  # an empty store is created on first use
    return (store.root / "index.json").read_bytes(), frozenset(p.name for p in store.blobs.iterdir())


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """The fixture images pushed to the session's docker-registry."""
    root = tmp_path_factory.mktemp("layouts")
    write_fixture_image(root / "fixture")
    skopeo_push(root / "fixture", "fixture", f"{registry.address}/fixture:v1")
    write_multiplatform(root / "multi")
    subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{root / 'multi'}:multi",
                    f"docker://{registry.address}/multi:latest"], check=True, capture_output=True)
    # Docker schema 2, converted by skopeo.
    subprocess.run(["skopeo", "copy", "--quiet", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{root / 'fixture'}:fixture",
                    f"docker://{registry.address}/dockerfmt:v1"], check=True, capture_output=True)
    # Two images sharing the busybox base layer; the second adds an uncompressed layer.
    base = make_layer(busybox_entries())
    write_layout(root / "a", [base], "a")
    skopeo_push(root / "a", "a", f"{registry.address}/shared-a:latest")
    write_layout(root / "b", [base, make_layer([Entry("etc/b", "file", b"b\n")])], "b")
    skopeo_push(root / "b", "b", f"{registry.address}/shared-b:latest")
    return registry


def test_pull_oci_image_and_peers_read_the_store(pushed, taxiway_home, taxiway):
    ref = f"{pushed.address}/fixture:v1"
    r = taxiway("pull", ref)
    assert r.returncode == 0, r.stderr
    assert b"4 blobs fetched" in r.stdout  # config + 3 layers
    out = subprocess.run(["skopeo", "inspect", f"oci:{taxiway_home / 'store'}:{ref}"], check=True, capture_output=True)
    assert len(json.loads(out.stdout)["Layers"]) == 3
    out = subprocess.run(["umoci", "ls", "--layout", str(taxiway_home / "store")], check=True, capture_output=True, text=True)
    assert ref in out.stdout.split()
    # skopeo agrees with us on the manifest digest.
    remote = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"], check=True,
                                       capture_output=True).stdout)
    listed = json.loads(taxiway("images", "--json", check=True).stdout)
    assert [(i["name"], i["digest"], i["layers"]) for i in listed] == [(ref, remote["Digest"], 3)]
    info = json.loads(taxiway("image", "inspect", ref, "--json", check=True).stdout)
    assert info["digest"] == remote["Digest"] and len(info["layers"]) == 3 and len(info["history"]) == 3
    assert all(layer["diff_id"] and layer["present"] for layer in info["layers"])
    text = taxiway("image", "inspect", ref, check=True).stdout.decode()
    assert "Layers:" in text and "History:" in text
    # A second pull fetches nothing.
    before = taxiway_home.joinpath("store", "index.json").read_bytes()
    r = taxiway("pull", ref, check=True)
    assert b"0 blobs fetched" in r.stdout and b"3 already present" in r.stdout
    assert taxiway_home.joinpath("store", "index.json").read_bytes() == before


def test_docker_schema2_and_shared_layers(pushed, taxiway_home, taxiway):
    r = taxiway("pull", f"{pushed.address}/dockerfmt:v1", check=True)
    info = json.loads(taxiway("image", "inspect", f"{pushed.address}/dockerfmt:v1", "--json", check=True).stdout)
    assert info["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert all(layer["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip" for layer in info["layers"])
    r = taxiway("pull", f"{pushed.address}/shared-a", check=True)
    assert b"2 blobs fetched" in r.stdout
    r = taxiway("pull", f"{pushed.address}/shared-b", check=True)  # shares shared-a's base layer
    assert b"2 blobs fetched" in r.stdout and b"1 already present" in r.stdout


def test_platform_selection(pushed, taxiway_home, taxiway):
    ref = f"{pushed.address}/multi:latest"
    r = taxiway("pull", ref, "--platform", "linux/s390x")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "linux/amd64" in err and "linux/arm64/v8" in err and "--platform" in err
    assert not (taxiway_home / "store" / "index.json").exists() or json.loads(
        (taxiway_home / "store" / "index.json").read_text())["manifests"] == []
    r = taxiway("pull", ref, "--platform", "linux/arm64", check=True)
    info = json.loads(taxiway("image", "inspect", ref, "--json", check=True).stdout)
    assert info["platform"] == "linux/arm64/v8"
    r = taxiway("pull", ref, check=True)  # the host: amd64
    assert json.loads(taxiway("image", "inspect", ref, "--json", check=True).stdout)["platform"] == "linux/amd64"
    r = taxiway("pull", ref, "--all-platforms", "--json", check=True)
    pulled = json.loads(r.stdout)
    assert [p["platform"] for p in pulled["platforms"]] == ["linux/amd64", "linux/arm64/v8"]
    assert pulled["media_type"] == "application/vnd.oci.image.index.v1+json"
    listed = json.loads(taxiway("images", "--json", check=True).stdout)
    assert listed[0]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    arm = json.loads(taxiway("image", "inspect", ref, "--platform", "linux/arm64/v8", "--json", check=True).stdout)
    assert arm["platform"] == "linux/arm64/v8" and arm["index_digest"]
    # skopeo reads the stored index and picks a platform from it.
    out = subprocess.run(["skopeo", "inspect", "--override-arch", "arm64", f"oci:{taxiway_home / 'store'}:{ref}"],
                         check=True, capture_output=True)
    assert json.loads(out.stdout)["Architecture"] == "arm64"


def test_tag_rm_prune(pushed, taxiway_home, taxiway):
    ref = f"{pushed.address}/fixture:v1"
    taxiway("pull", ref, check=True)
    taxiway("tag", ref, "127.0.0.1:1/copy:v2", check=True)
    names = [i["name"] for i in json.loads(taxiway("images", "--json", check=True).stdout)]
    assert names == [ref, "127.0.0.1:1/copy:v2"]
    taxiway("image", "rm", ref, check=True)
    assert json.loads(taxiway("image", "prune", "--json", check=True).stdout)["removed"] == []
    taxiway("image", "rm", "127.0.0.1:1/copy:v2", check=True)
    pruned = json.loads(taxiway("image", "prune", "--json", check=True).stdout)
    assert len(pruned["removed"]) == 5 and pruned["freed_bytes"] > 1_000_000
    assert store_state(taxiway_home)[1] == frozenset()
    r = taxiway("image", "rm", ref)
    assert r.returncode != 0 and b"taxiway images" in r.stderr
    # By digest: every name of it goes.
    taxiway("pull", ref, check=True)
    taxiway("tag", ref, "127.0.0.1:1/copy:v3", check=True)
    digest = json.loads(taxiway("images", "--json", check=True).stdout)[0]["digest"]
    taxiway("image", "rm", digest[7:19], check=True)
    assert json.loads(taxiway("images", "--json", check=True).stdout) == []


@pytest.mark.parametrize("ref, needle", [
    ("{reg}/does-not-exist:v1", "not found"),
    ("{reg}/fixture:no-such-tag", "not found"),
    ("{reg}/fixture@sha256:" + "0" * 64, "not found"),
    ("{reg}/UPPER:case", "invalid"),
    ("127.0.0.1:1/down:v1", "cannot reach"),
])
def test_bad_references_fail_cleanly(pushed, taxiway_home, taxiway, ref, needle):
    taxiway("pull", f"{pushed.address}/shared-a", check=True)
    before = store_state(taxiway_home)
    r = taxiway("pull", ref.format(reg=pushed.address))
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert store_state(taxiway_home) == before


def test_plain_http_only_for_loopback_or_insecure(taxiway_home):
    from taxiway.oci.client import RegistryClient

    with RegistryClient("registry.example:5000", use_stored_credentials=False) as c:
        assert c._scheme == "https"  # never probed, never plain HTTP
    with RegistryClient("127.0.0.1:5000", use_stored_credentials=False) as c:
        assert c._scheme is None  # loopback: probed (https first, then http)
    with RegistryClient("registry.example:5000", insecure=True, use_stored_credentials=False) as c:
        assert c._scheme is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root")
def test_full_disk_is_one_line_and_leaves_the_store_unchanged(pushed, tmp_path, taxiway, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(reason=f"cannot mount a tmpfs to fill here: {m.stderr.strip()}")
    try:
        monkeypatch.setenv("TAXIWAY_HOME", str(mnt / "home"))
        taxiway("images", check=True)  # an empty store
        before = store_state(mnt / "home")
        r = taxiway("pull", f"{pushed.address}/fixture:v1")
        assert r.returncode != 0
        err = r.stderr.decode()
        assert err.startswith("error: no space left") and err.count("\n") == 1 and "prune" in err, err
        assert store_state(mnt / "home") == before
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_pull_then_export_and_tty_free_output(pushed, taxiway_home, taxiway, tmp_path):
    ref = f"{pushed.address}/fixture:v1"
    r = taxiway("pull", ref, check=True)
    assert b"\x1b[" not in r.stdout + r.stderr  # no progress bars in a pipe
    r = taxiway("image", "export", ref, str(tmp_path / "rootfs"), "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert len(stats["layers"]) == 3 and stats["files"] > 0
    assert (tmp_path / "rootfs" / "bin" / "busybox").stat().st_size > 500_000
    assert not (tmp_path / "rootfs" / "root" / ".ssh" / "id_rsa").exists()  # whited out by layer 1
    r = taxiway("image", "export", ref, str(tmp_path / "rootfs"))
    assert r.returncode != 0 and b"not an empty directory" in r.stderr


def test_concurrent_pulls_of_the_same_image(pushed, taxiway_home):
    ref = f"{pushed.address}/fixture:v1"
    procs = [subprocess.Popen([sys.executable, "-m", "taxiway", "pull", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    from taxiway.oci.store import Store

    store = Store(taxiway_home / "store")
    assert [n for n, _ in store.images()] == [ref]
    img = store.image(ref)
    assert all(store.has_blob(d.digest) for d in img.layers())
    assert store.prune() == []


def test_docker_hub_names_map_to_its_api_host():
    from taxiway.oci.client import api_host

    assert api_host("docker.io") == "registry-1.docker.io"
    assert api_host("127.0.0.1:5000") == "127.0.0.1:5000"


def test_ensure_image_pulls_only_when_missing(pushed, taxiway_home):
    from taxiway.oci.pull import ensure_image
    from taxiway.oci.store import Store

    store = Store(taxiway_home / "store")
    img = ensure_image(f"{pushed.address}/fixture:v1", store=store)
    assert len(img.layers()) == 3
    again = ensure_image(f"{pushed.address}/fixture:v1", store=store)
    assert again.digest() == img.digest()
    with pytest.raises(Exception, match="not found"):
        ensure_image(f"{pushed.address}/nope:v1", store=store)


def test_progress_bars_on_a_terminal_and_stdout_stays_clean(pushed, taxiway_home):
    import pty

    ref = f"{pushed.address}/fixture:v1"
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "taxiway", "pull", ref], stdout=subprocess.PIPE, stderr=slave,
                             env={**os.environ, "COLUMNS": "120"})
        os.close(slave)
        tty = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            tty += chunk
        out = p.stdout.read()
        assert p.wait(60) == 0
    finally:
        os.close(master)
    assert out.startswith(b"pulled ") and b"\x1b[" not in out
    assert b"config" in tty and b"\xe2\x94\x81" in tty  # per-blob rows with rich's bar glyph


def test_inspect_remote_pulls_nothing(pushed, taxiway_home, taxiway):
    before = store_state(taxiway_home)
    info = json.loads(taxiway("image", "inspect", "--remote", f"{pushed.address}/multi:latest", "--platform", "linux/arm64",
                              "--json", check=True).stdout)
    assert info["platform"] == "linux/arm64/v8" and len(info["layers"]) == 1
    text = taxiway("image", "inspect", "--remote", f"{pushed.address}/fixture:v1", check=True).stdout.decode()
    assert "Layers:" in text and "(missing)" not in text
    assert store_state(taxiway_home) == before
    r = taxiway("image", "inspect", "--remote", f"{pushed.address}/nope:v1")
    assert r.returncode != 0 and b"not found" in r.stderr
