"""Builder behaviour: reproducible digests, cache reuse, rebase, user buildpacks, --push."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import requests

from .conftest import copy_example, oci_ref


def layer_digests(builder, tag):
    return [d.digest for d in builder.image(tag).layers()]


def test_same_source_same_digest_in_two_homes(builder, fresh_builder, tmp_path):
    """The same source builds to the same manifest digest from scratch in another home and another folder."""
    src = copy_example("python", tmp_path / "elsewhere" / "app")
    a = json.loads(builder("build", str(src), "-t", "repro/python:a", "--json", "--no-cache").stdout)
    # Different file times and modes outside the permission bits must not matter.
    for p in src.rglob("*"):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    b = json.loads(fresh_builder("build", str(src), "-t", "repro/python:a", "--json").stdout)
    assert a["digest"] == b["digest"]
    assert layer_digests(builder, "repro/python:a") == layer_digests(fresh_builder, "repro/python:a")


def test_rebuild_after_code_change_writes_one_layer(builder, tmp_path):
    src = copy_example("python", tmp_path / "app")
    first = json.loads(builder("build", str(src), "-t", "rebuild/python:1", "--json").stdout)
    before = layer_digests(builder, "rebuild/python:1")
    with open(src / "app.py", "a") as f:
        f.write("\n# a one-line change\n")
    second = json.loads(builder("build", str(src), "-t", "rebuild/python:1", "--json").stdout)
    after = layer_digests(builder, "rebuild/python:1")
    assert second["written"] == ["app"]
    assert "taxiway_python/venv" in second["reused"]
    assert len(before) == len(after)
    assert before[:-1] == after[:-1], "every layer but the app layer keeps its digest"
    assert before[-1] != after[-1]
    assert first["digest"] != second["digest"]
    # Nothing changed: the same image again, no layer written.
    third = json.loads(builder("build", str(src), "-t", "rebuild/python:1", "--json").stdout)
    assert third["digest"] == second["digest"] and third["written"] == []
    # A dependency change rebuilds the venv layer.
    (src / "requirements.txt").write_text((src / "requirements.txt").read_text() + "itsdangerous==2.2.0\n")
    fourth = json.loads(builder("build", str(src), "-t", "rebuild/python:1", "--json").stdout)
    assert "taxiway_python/venv" in fourth["written"]


def test_rebase_swaps_run_image_and_keeps_app_layers(builder, podman, tmp_path):
    from taxiway.builder import layer as lyr
    from taxiway.oci.image import append_layers, write_image

    builder("build", str(copy_example("python", tmp_path / "app")), "-t", "rebase/python:1")
    old = builder.image("rebase/python:1")
    md = json.loads(old.config()["config"]["Labels"]["io.buildpacks.lifecycle.metadata"])
    run_ref = md["runImage"]["image"]
    # A "patched" run image: the stack's run image plus one more layer.
    store = builder.store()
    run = store.image(run_ref)
    patch = lyr.store_layer(store, [lyr.Entry("etc", "dir", 0o755), lyr.Entry("etc/taxiway-patch", "file", 0o644, data=b"patched\n")])
    desc = write_image(store, append_layers(run, patch.addendum("security patch")))
    store.tag("localhost/test/run-python:patched", desc)

    n_run = len(run.layers())
    app_layers = old.layers()[n_run:]
    p = builder("build", "--rebase", "rebase/python:1", "--run-image", "localhost/test/run-python:patched", "--json")
    new = builder.image("rebase/python:1")
    assert json.loads(p.stdout)["digest"] == new.digest() != old.digest()
    assert [d.digest for d in new.layers()[n_run + 1:]] == [d.digest for d in app_layers]
    assert new.layers()[n_run].digest == patch.digest
    new_md = json.loads(new.config()["config"]["Labels"]["io.buildpacks.lifecycle.metadata"])
    assert new_md["runImage"]["topLayer"] == patch.diff_id
    assert new.config()["rootfs"]["diff_ids"][-len(app_layers):] == old.config()["rootfs"]["diff_ids"][-len(app_layers):]
    with podman.serve(oci_ref(builder, "rebase/python:1")) as url:
        assert "hello from python" in requests.get(url, timeout=10).text
    # Rebasing back gives the original image, byte for byte.
    builder("build", "--rebase", "rebase/python:1", "--run-image", run_ref)
    assert builder.image("rebase/python:1").digest() == old.digest()


def write_buildpack(root: Path, launch_toml: str | None = None) -> Path:
    """A user's own CNB buildpack in plain sh: detects hello.txt, serves the folder with python3 -m http.server."""
    bp = root / "hello-bp"
    (bp / "bin").mkdir(parents=True)
    (bp / "buildpack.toml").write_text(textwrap.dedent("""\
        api = "0.10"

        [buildpack]
        id = "example/hello"
        version = "1.2.3"
        """))
    (bp / "bin" / "detect").write_text(textwrap.dedent("""\
        #!/bin/sh
        # CNB: exit 0 passes, 100 fails; the plan path is $CNB_BUILD_PLAN_PATH (or $2).
        [ -f hello.txt ] || { echo "looked for hello.txt"; exit 100; }
        [ "$2" = "$CNB_BUILD_PLAN_PATH" ] || exit 3
        exit 0
        """))
    launch = launch_toml if launch_toml is not None else textwrap.dedent("""\
        [[processes]]
        type = "web"
        command = ["/bin/sh", "-c", "exec greet-server"]
        default = true

        [[labels]]
        key = "org.example.greeter"
        value = "yes"
        """)
    (bp / "bin" / "build").write_text(textwrap.dedent("""\
        #!/bin/sh
        set -e
        # Positional arguments (older APIs) agree with the CNB_* variables.
        [ "$1" = "$CNB_LAYERS_DIR" ] && [ "$3" = "$CNB_BP_PLAN_PATH" ] && [ -d "$CNB_PLATFORM_DIR/env" ]
        echo "greeting from platform env: $(cat "$CNB_PLATFORM_DIR/env/GREETING")"
        mkdir -p "$CNB_LAYERS_DIR/tools/bin" "$CNB_LAYERS_DIR/tools/env"
        printf '#!/bin/sh\\nexec python3 -m http.server "$PORT" --directory /workspace\\n' > "$CNB_LAYERS_DIR/tools/bin/greet-server"
        chmod +x "$CNB_LAYERS_DIR/tools/bin/greet-server"
        printf '%s' "$(cat "$CNB_PLATFORM_DIR/env/GREETING")" > "$CNB_LAYERS_DIR/tools/env/GREETING.override"
        printf '[types]\\nlaunch = true\\n[metadata]\\nversion = "1"\\n' > "$CNB_LAYERS_DIR/tools.toml"
        mkdir -p "$CNB_LAYERS_DIR/scratch"
        printf '[types]\\nbuild = true\\n' > "$CNB_LAYERS_DIR/scratch.toml"
        cat > "$CNB_LAYERS_DIR/launch.toml" <<'TOML'
        """) + launch + "TOML\n")
    for exe in ("detect", "build"):
        (bp / "bin" / exe).chmod(0o755)
    return bp


def test_users_own_buildpack_from_a_folder(builder, podman, tmp_path):
    bp = write_buildpack(tmp_path)
    app = tmp_path / "site"
    app.mkdir()
    (app / "hello.txt").write_text("hello from a user's buildpack\n")
    p = builder("build", str(app), "-t", "own/bp:1", "--buildpack", str(bp), "--env", "GREETING=howdy",
                "--run-image", "localhost/taxiway/run-python:bookworm", "--json")
    out = json.loads(p.stdout)
    assert out["buildpacks"] == ["example/hello"]
    img = builder.image("own/bp:1")
    c = img.config()["config"]
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["GREETING"] == "howdy"
    assert env["PATH"].startswith("/layers/example_hello/tools/bin:")
    assert c["Labels"]["org.example.greeter"] == "yes"  # launch.toml [[labels]]
    md = json.loads(c["Labels"]["io.buildpacks.lifecycle.metadata"])
    assert list(md["buildpacks"][0]["layers"]) == ["tools"]  # the build-only layer is not exported
    assert md["buildpacks"][0]["layers"]["tools"]["data"] == {"version": "1"}
    with podman.serve(oci_ref(builder, "own/bp:1")) as url:
        assert requests.get(url + "/hello.txt", timeout=10).text == "hello from a user's buildpack\n"


def test_push_to_docker_registry_and_run_from_it(builder, podman, registry, tmp_path):
    ref = f"{registry.address}/pushed/python:1"
    p = builder("build", str(copy_example("python", tmp_path / "app")), "-t", ref, "--push", "--json")
    out = json.loads(p.stdout)
    assert out["pushed"]["digest"] == out["digest"]
    r = requests.get(f"http://{registry.address}/v2/pushed/python/manifests/1",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=10)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == out["digest"]
    with podman.serve(ref, "--tls-verify=false") as url:
        assert "hello from python" in requests.get(url, timeout=10).text


def test_buildpacks_ls(builder):
    out = json.loads(builder("buildpacks", "ls", "--json").stdout)
    assert json.loads(builder("buildpacks", "--json").stdout) == out
    ids = [b["id"] for b in out["buildpacks"]]
    assert {"taxiway/python", "taxiway/node", "taxiway/deno", "taxiway/static", "taxiway/procfile"} <= set(ids)
    assert all(b["detects"] for b in out["buildpacks"])
    text = builder("buildpacks").stdout.decode()
    assert "server.ts" in text and "package.json" in text


def test_run_images_hold_no_compilers(builder):
    import gzip
    import tarfile

    store = builder.store()
    for name in ("run-base", "run-python", "run-node"):
        img = store.image(f"localhost/taxiway/{name}:bookworm")
        with img.open_blob(img.layers()[0].digest) as f, tarfile.open(fileobj=gzip.GzipFile(fileobj=f), mode="r|") as tf:
            names = {m.name.lstrip("./") for m in tf}
        assert not names & {"usr/bin/gcc", "usr/bin/cc", "usr/bin/g++", "usr/bin/make"}, name
        assert "etc/passwd" in names
    build = store.image("localhost/taxiway/build:bookworm")
    assert build.config()["config"]["User"] == "1000:1000"


def test_uv_lock_pins_what_is_installed(builder, tmp_path):
    """pyproject.toml asks for any itsdangerous; uv.lock pins 2.1.2, and that is what the venv layer holds."""
    import gzip
    import tarfile

    app = tmp_path / "uvapp"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "uvapp"\nversion = "0.1.0"\ndependencies = ["itsdangerous"]\n')
    (app / "uv.lock").write_text(textwrap.dedent('''\
        version = 1
        requires-python = ">=3.11"

        [[package]]
        name = "itsdangerous"
        version = "2.1.2"
        source = { registry = "https://pypi.org/simple" }

        [[package]]
        name = "uvapp"
        version = "0.1.0"
        source = { virtual = "." }
        dependencies = [{ name = "itsdangerous" }]
        '''))
    (app / "main.py").write_text("import itsdangerous\nprint(itsdangerous.__name__)\n")
    builder("build", str(app), "-t", "uv/app:1")
    img = builder.image("uv/app:1")
    md = json.loads(img.config()["config"]["Labels"]["io.buildpacks.lifecycle.metadata"])
    venv_diff = md["buildpacks"][0]["layers"]["venv"]["sha"]
    layer = img.layers()[img.config()["rootfs"]["diff_ids"].index(venv_diff)]
    with img.open_blob(layer.digest) as f, tarfile.open(fileobj=gzip.GzipFile(fileobj=f), mode="r|") as tf:
        names = [m.name for m in tf]
    assert any(n.endswith("itsdangerous-2.1.2.dist-info/METADATA") for n in names)
    assert img.config()["config"]["Entrypoint"][-1] == "exec python3 main.py"


def test_deno_rebuild_after_code_change_writes_one_layer(builder, tmp_path):
    """Deno's runtime and module cache layers stay as they were when only server.ts changes."""
    src = copy_example("deno", tmp_path / "app")
    builder("build", str(src), "-t", "rebuild/deno:1")
    before = layer_digests(builder, "rebuild/deno:1")
    (src / "server.ts").write_text((src / "server.ts").read_text() + "// a one-line change\n")
    out = json.loads(builder("build", str(src), "-t", "rebuild/deno:1", "--json").stdout)
    after = layer_digests(builder, "rebuild/deno:1")
    assert out["written"] == ["app"], out
    assert before[:-1] == after[:-1] and before[-1] != after[-1]


def test_git_source_and_revision_labels(builder, tmp_path):
    import subprocess

    app = copy_example("static", tmp_path / "site")
    git = ["git", "-C", str(app), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://example.invalid/team/site.git"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "site"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    builder("build", str(app), "-t", "git/site:1")
    labels = builder.image("git/site:1").config()["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == head
    assert labels["org.opencontainers.image.source"] == "https://example.invalid/team/site.git"
    layer_names = json.loads(labels["io.buildpacks.lifecycle.metadata"])
    assert layer_names["app"]


def test_failed_build_does_not_leave_a_stale_dependency_layer(builder, tmp_path):
    """A build that installs new dependencies and then fails must not make the next build reuse the old layer."""
    src = copy_example("python", tmp_path / "app")
    builder("build", str(src), "-t", "stale/python:1")
    (src / "requirements.txt").write_text((src / "requirements.txt").read_text() + "itsdangerous==2.1.2\n")
    failing = tmp_path / "fail-bp"
    (failing / "bin").mkdir(parents=True)
    (failing / "buildpack.toml").write_text('api = "0.10"\n[buildpack]\nid = "test/fail"\nversion = "1"\n')
    (failing / "bin" / "detect").write_text("#!/bin/sh\nexit 0\n")
    (failing / "bin" / "build").write_text("#!/bin/sh\necho failing on purpose\nexit 1\n")
    for exe in ("detect", "build"):
        (failing / "bin" / exe).chmod(0o755)
    p = builder("build", str(src), "-t", "stale/python:1", "-b", "python", "-b", str(failing), check=False)
    assert p.returncode != 0 and "failing on purpose" in p.stderr.decode()
    out = json.loads(builder("build", str(src), "-t", "stale/python:1", "--json").stdout)
    assert "taxiway_python/venv" in out["written"], out
