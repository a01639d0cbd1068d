"""Real clients against taxiway's registry: skopeo, podman, buildah and taxiway's own.

Every client authenticates the way users do (``--creds``, ``podman login``,
``taxiway login``): the org token as the password, the Docker token flow
underneath. podman and buildah get their own storage under tmp (vfs driver),
so the machine's container state is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers.layout import busybox_entries, make_layer, write_layout

pytestmark = pytest.mark.timeout(300)


def run(*argv: str, env: dict | None = None, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv[:4]} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    write_layout(root, [make_layer(busybox_entries())], tag="v1")
    return root


def test_skopeo_copy_inspect_list_delete(txreg, registry, layout, tmp_path):
    creds = f"skopeo:{txreg.tokens['acme']}"
    dest = f"docker://{txreg.address}/tools/busybox:v1"
    run("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", creds, f"oci:{layout}:v1", dest)
    info = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--creds", creds, dest).stdout)
    assert info["Architecture"] == "amd64" and len(info["Layers"]) == 1 and info["RepoTags"] == ["v1"]
    raw = run("skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", creds, dest).stdout
    assert json.loads(raw)["layers"][0]["digest"] == info["Layers"][0]
    run("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", creds, dest.replace(":v1", ":v1"),
        f"docker://{txreg.address}/tools/busybox:v2", "--src-tls-verify=false", "--src-creds", creds)
    tags = json.loads(run("skopeo", "list-tags", "--tls-verify=false", "--creds", creds,
                          f"docker://{txreg.address}/tools/busybox").stdout)
    assert tags["Tags"] == ["v1", "v2"]
    # out of taxiway: to an OCI layout, and to docker-registry (and back in from it)
    run("skopeo", "copy", "--src-tls-verify=false", "--src-creds", creds, dest, f"oci:{tmp_path}/out:v1")
    out_index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert out_index["manifests"][0]["digest"] == json.loads(
        run("skopeo", "inspect", "--tls-verify=false", "--creds", creds, dest).stdout)["Digest"]
    run("skopeo", "copy", "--src-tls-verify=false", "--src-creds", creds, "--dest-tls-verify=false",
        dest, f"docker://{registry.address}/from-taxiway:v1")
    run("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--dest-creds", creds,
        f"docker://{registry.address}/from-taxiway:v1", f"docker://{txreg.address}/roundtrip:v1")
    assert json.loads(run("skopeo", "inspect", "--tls-verify=false", "--creds", creds,
                          f"docker://{txreg.address}/roundtrip:v1").stdout)["Digest"] == info["Digest"]
    # no credentials, or another org's: the image is not there
    p = run("skopeo", "inspect", "--tls-verify=false", dest, check=False)
    assert p.returncode != 0 and ("unauthorized" in p.stderr.lower() or "authentication" in p.stderr.lower())
    p = run("skopeo", "inspect", "--tls-verify=false", "--creds", f"x:{txreg.tokens['other']}", dest, check=False)
    assert p.returncode != 0 and "manifest unknown" in p.stderr
    # delete
    run("skopeo", "delete", "--tls-verify=false", "--creds", creds, dest)
    p = run("skopeo", "inspect", "--tls-verify=false", "--creds", creds, dest, check=False)
    assert p.returncode != 0 and "manifest unknown" in p.stderr


@pytest.fixture
def podman_env(tmp_path):
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (scripts/install-deps.sh installs it)")
    store = tmp_path / "containers"
    runroot = tempfile.mkdtemp(prefix="txr-", dir="/tmp")  # podman wants a runroot under 50 characters
    args = ["--root", str(store / "root"), "--runroot", runroot, "--storage-driver", "vfs"]
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"), "XDG_RUNTIME_DIR": str(tmp_path / "xdg"),
           "TMPDIR": str(tmp_path)}
    (tmp_path / "xdg").mkdir(mode=0o700)
    (tmp_path / "auth.json").write_text('{"auths": {}}')
    yield args, env
    # vfs layers can be read-only directories: make them removable for tmp_path cleanup
    subprocess.run(["podman", *args, "system", "reset", "--force"], capture_output=True, env={**os.environ, **env},
                   timeout=60)
    shutil.rmtree(runroot, ignore_errors=True)


def test_podman_login_push_pull(txreg, layout, podman_env):
    args, env = podman_env
    addr = txreg.address
    run("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", f"x:{txreg.tokens['acme']}",
        f"oci:{layout}:v1", f"docker://{addr}/base:v1")
    p = subprocess.run(["podman", *args, "login", "--tls-verify=false", "-u", "ci", "--password-stdin", addr],
                       input=txreg.tokens["acme"], capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert p.returncode == 0 and "Login Succeeded" in p.stdout, p.stderr
    # a wrong password is refused at login
    p = subprocess.run(["podman", *args, "login", "--tls-verify=false", "-u", "ci", "--password-stdin", addr],
                       input="txw_0123456789abcdef_" + "x" * 43, capture_output=True, text=True,
                       env={**os.environ, **env, "REGISTRY_AUTH_FILE": env["REGISTRY_AUTH_FILE"] + ".bad"}, timeout=60)
    assert p.returncode != 0
    run("podman", *args, "pull", "--tls-verify=false", f"{addr}/base:v1", env=env)
    run("podman", *args, "tag", f"{addr}/base:v1", f"{addr}/apps/web:podman", env=env)
    run("podman", *args, "push", "--tls-verify=false", f"{addr}/apps/web:podman", env=env)
    run("podman", *args, "rmi", "-a", "-f", env=env)
    run("podman", *args, "pull", "--tls-verify=false", f"{addr}/apps/web:podman", env=env)
    images = run("podman", *args, "images", "--format", "{{.Repository}}:{{.Tag}}", env=env).stdout
    assert f"{addr}/apps/web:podman" in images
    assert (txreg.root / "repos" / "acme" / "apps" / "web" / "_manifests" / "tags" / "podman").exists()


def test_buildah_push(txreg, layout, podman_env):
    args, env = podman_env
    addr = txreg.address
    creds = f"ci:{txreg.tokens['acme']}"
    run("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", creds, f"oci:{layout}:v1",
        f"docker://{addr}/base:v1")
    ctr = run("buildah", *args, "from", "--tls-verify=false", "--creds", creds, f"{addr}/base:v1", env=env).stdout.strip()
    run("buildah", *args, "config", "--label", "built.by=buildah", ctr, env=env)
    run("buildah", *args, "commit", ctr, "built:latest", env=env)
    run("buildah", *args, "push", "--tls-verify=false", "--creds", creds, "built:latest",
        f"docker://{addr}/apps/built:v1", env=env)
    info = json.loads(run("skopeo", "inspect", "--config", "--tls-verify=false", "--creds", creds,
                          f"docker://{addr}/apps/built:v1").stdout)
    assert info["config"]["Labels"]["built.by"] == "buildah"


def test_taxiway_client_push_pull(txreg, layout, tmp_path):
    env = {"TAXIWAY_HOME": str(tmp_path / "home"), "TAXIWAY_CONFIG": str(tmp_path / "config"),
           "DOCKER_CONFIG": str(tmp_path / "docker")}
    addr = txreg.address
    tx = [sys.executable, "-m", "taxiway"]
    run("skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", f"x:{txreg.tokens['acme']}",
        f"oci:{layout}:v1", f"docker://{addr}/base:v1")
    p = subprocess.run([*tx, "login", addr, "-u", "ci", "--password-stdin"], input=txreg.tokens["acme"],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert p.returncode == 0, p.stderr
    digest = run(*tx, "pull", "-q", f"{addr}/base:v1", env=env).stdout.strip()
    assert digest.startswith("sha256:")
    run(*tx, "tag", f"{addr}/base:v1", f"{addr}/apps/mine:v1", env=env)
    pushed = run(*tx, "push", "-q", f"{addr}/apps/mine:v1", env=env).stdout.strip()
    assert pushed == digest
    info = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--creds", f"x:{txreg.tokens['acme']}",
                          f"docker://{addr}/apps/mine:v1").stdout)
    assert info["Digest"] == digest
    # another org's token: taxiway pull fails, naming the image
    p = subprocess.run([*tx, "login", addr, "-u", "ci", "--password-stdin"], input=txreg.tokens["other"],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    p = run(*tx, "pull", f"{addr}/apps/mine:v1", env={**env, "TAXIWAY_HOME": str(tmp_path / "home2")}, check=False)
    assert p.returncode != 0 and p.stderr.startswith("error:")
