"""Pure parts of the builder: the reproducible layer writer, layer env, the TOML contracts, the restorer."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taxiway.builder import buildpack as bpmod
from taxiway.builder import env as envmod
from taxiway.builder import layer as lyr
from taxiway.builder.lifecycle import restore_layers
from taxiway.errors import InvalidInput
from taxiway.oci.store import Store


def make_tree(root: Path, mtime: int) -> None:
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "b" / "z.py").write_text("print(1)\n")
    (root / "b" / "deep" / "x").write_bytes(os.urandom(0) + b"x" * 5000)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("a.txt", root / "link")
    os.link(root / "a.txt", root / "hard")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (mtime, mtime), follow_symlinks=False)


def test_same_tree_same_layer_whatever_the_times_and_order(tmp_path):
    store = Store(tmp_path / "store")
    make_tree(tmp_path / "one", 1_600_000_000)
    make_tree(tmp_path / "two", 1_700_000_000)
    a = lyr.store_dir_layer(store, tmp_path / "one", "workspace", 1000, 1000)
    b = lyr.store_dir_layer(store, tmp_path / "two", "workspace", 1000, 1000)
    assert a == b
    raw = store.read_blob(a.digest)
    assert raw[:3] == b"\x1f\x8b\x08" and raw[4:8] == b"\0\0\0\0", "gzip header without a timestamp"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[0] == "workspace"
    assert names.index("workspace/a.txt") < names.index("workspace/b") < names.index("workspace/b/z.py")
    assert {m.mtime for m in members} == {lyr.DEFAULT_EPOCH}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(1000, 1000, "", "")}
    by = {m.name: m for m in members}
    assert by["workspace/hard"].isfile(), "hard links are stored as files"
    assert by["workspace/link"].issym() and by["workspace/link"].linkname == "a.txt"
    assert by["workspace/run.sh"].mode == 0o755


def test_source_date_epoch(monkeypatch, tmp_path):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    buf = io.BytesIO()
    lyr.write_tar(buf, [lyr.Entry("f", "file", data=b"x")])
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        assert tf.getmembers()[0].mtime == 1234567890


def test_fingerprint_changes_with_content(tmp_path):
    make_tree(tmp_path / "t", 1_600_000_000)
    fp = lyr.fingerprint(tmp_path / "t").hexdigest()
    assert lyr.fingerprint(tmp_path / "t").hexdigest() == fp
    (tmp_path / "t" / "a.txt").write_text("changed\n")
    assert lyr.fingerprint(tmp_path / "t").hexdigest() != fp


def test_fingerprint_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    """`touch -d` after a same-size edit: sizes and mtimes match, the bytes do not (issue 21, stale layers)."""
    make_tree(tmp_path / "t", 1_600_000_000)
    first = lyr.fingerprint(tmp_path / "t")
    f = tmp_path / "t" / "b" / "z.py"
    st0 = f.stat()
    f.write_text("print(2)\n")  # same size
    os.utime(f, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st0.st_size, st0.st_mtime_ns)
    # With the previous build's table of hashes (the fast path), and without it.
    assert lyr.fingerprint(tmp_path / "t", first.files).hexdigest() != first.hexdigest()
    assert lyr.fingerprint(tmp_path / "t").hexdigest() != first.hexdigest()


def test_fingerprint_reads_only_files_whose_stat_changed(tmp_path):
    make_tree(tmp_path / "t", 1_600_000_000)
    first = lyr.fingerprint(tmp_path / "t")
    known = {k: [*v[:4], "0" * 64] for k, v in first.files.items()}  # a wrong hash for every file...
    again = lyr.fingerprint(tmp_path / "t", known)
    assert again.files["a.txt"][4] == "0" * 64  # ...is trusted while the file's stat key is the same
    (tmp_path / "t" / "a.txt").write_text("alpha\n")  # same bytes, rewritten: its ctime moves, it is read again
    assert lyr.fingerprint(tmp_path / "t", known).files["a.txt"][4] == first.files["a.txt"][4]


def test_layer_written_with_a_tree_hash_matches_the_fingerprint(tmp_path):
    store = Store(tmp_path / "store")
    make_tree(tmp_path / "t", 1_600_000_000)
    tree = lyr.TreeHash("layers/x/y")
    lyr.store_dir_layer(store, tmp_path / "t", "layers/x/y", 1000, 1000, tree=tree)
    fp = lyr.fingerprint(tmp_path / "t")
    assert tree.hexdigest() == fp.hexdigest() and tree.files == fp.files


def test_a_layer_stopped_mid_write_leaves_no_temp_file(tmp_path):
    """What ``check`` raises (the build's deadline) ends the write; the temp blob goes with it."""
    store = Store(tmp_path / "store")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big").write_bytes(os.urandom(4 << 20))
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise TimeoutError("deadline")

    with pytest.raises(TimeoutError):
        lyr.store_dir_layer(store, tmp_path / "t", "workspace", check=check)
    assert list((store.meta / "ingest").iterdir()) == []
    assert list(store.blobs.iterdir()) == []


def test_builder_layers_are_written_and_read_by_the_one_layer_pipeline(tmp_path):
    """layerio.LayerWriter makes the builder's gzip; layerio's reader (unpack, scan) reads it back to the same diff ID."""
    from taxiway.oci import layerio

    store = Store(tmp_path / "store")
    make_tree(tmp_path / "t", 1_600_000_000)
    layer = lyr.store_dir_layer(store, tmp_path / "t", "workspace", 1000, 1000)
    with store.open_blob(layer.digest) as f:
        raw = f.read()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0", "gzip without a timestamp"
    with store.open_blob(layer.digest) as f, layerio.open_layer(f, layer.descriptor.media_type, "layer") as r:
        names = [ti.name for _, ti in layerio.members(r)]
        assert r.drain() == layer.diff_id
    assert names[0] == "workspace" and "workspace/b/deep/x" in names
    # The same tar bytes through a LayerWriter by hand: the same blob, byte for byte.
    out = io.BytesIO()
    w = layerio.LayerWriter(out, lyr.GZIP_LEVEL)
    w.write(gzip.decompress(raw))
    w.finish()
    assert (w.digest, w.diff_id, w.size) == (layer.digest, layer.diff_id, len(raw)) and out.getvalue() == raw


def _run_image(store: Store, *names: str, ref: str):
    """A run image of one layer per name (stack-style config), tagged ``ref``."""
    from taxiway.builder import stack
    from taxiway.oci.image import append_layers, empty_image, set_config, write_image

    layers = [lyr.store_layer(store, [lyr.Entry(n, "file", 0o644, data=n.encode())]) for n in names]
    img = append_layers(empty_image(), *(la.addendum(f"add {n}") for la, n in zip(layers, names, strict=True)))
    cfg = {**stack.stack_config(stack.RECIPES["run-base"], layers[0].diff_id),
           "rootfs": img.config()["rootfs"], "history": img.config()["history"]}
    desc = write_image(store, set_config(img, cfg))
    store.tag(ref, desc)
    return store.image(ref)


def test_layers_join_the_image_model_with_a_fixed_history_entry(tmp_path):
    from taxiway.builder.assemble import CREATED
    from taxiway.oci.image import append_layers, empty_image, write_image

    store = Store(tmp_path / "store")
    a = lyr.store_layer(store, [lyr.Entry("a", "file", 0o644, data=b"a")])
    add = a.addendum("buildpack x layer y")
    assert add.layer == a.descriptor and add.diff_id == a.diff_id and add.opener is None
    assert add.history == {"created": CREATED, "created_by": "buildpack x layer y"}
    # The layer is in the store already: writing the image reads no opener and copies nothing.
    blobs = set(os.listdir(store.blobs))
    desc = write_image(store, append_layers(empty_image(), add))
    assert set(os.listdir(store.blobs)) - blobs == {desc.digest.split(":")[1], store.image(desc.digest).config_descriptor().digest.split(":")[1]}
    # A second store with a fresh home gets the same digest from the same files.
    other = Store(tmp_path / "other")
    b = lyr.store_layer(other, [lyr.Entry("a", "file", 0o644, data=b"a")])
    assert write_image(other, append_layers(empty_image(), b.addendum("buildpack x layer y"))).digest == desc.digest


def test_rebase_moves_app_layers_and_back_gives_the_same_image(tmp_path):
    import json

    from taxiway.builder import assemble
    from taxiway.builder.lifecycle import rebase
    from taxiway.oci.image import append_layers, set_config, write_image

    store = Store(tmp_path / "store")
    run = _run_image(store, "os", ref="localhost/test/run:1")
    patched = _run_image(store, "os", "patch", ref="localhost/test/run:2")
    app_layers = [lyr.store_layer(store, [lyr.Entry(f"workspace/{n}", "file", 0o644, data=n.encode())]) for n in ("deps", "app")]
    img = append_layers(run, *(la.addendum(f"layer {i}") for i, la in enumerate(app_layers)))
    cfg = img.config()
    top = run.config()["rootfs"]["diff_ids"][-1]
    md = {"runImage": {"topLayer": top, "reference": run.digest(), "image": "localhost/test/run:1"},
          "stack": {"runImage": {"image": "localhost/test/run:1"}}}  # as export writes it
    cfg["config"]["Labels"][assemble.LIFECYCLE_LABEL] = json.dumps(md, sort_keys=True, separators=(",", ":"))
    store.tag("localhost/test/app:1", write_image(store, set_config(img, cfg)))
    built = store.image("localhost/test/app:1")

    rebase(store, "localhost/test/app:1", "localhost/test/run:2")
    moved = store.image("localhost/test/app:1")
    assert [d.digest for d in moved.layers()] == [*(d.digest for d in patched.layers()), *(la.digest for la in app_layers)]
    mcfg = moved.config()
    assert [h["created_by"] for h in mcfg["history"]] == ["add os", "add patch", "layer 0", "layer 1"]
    new_md = json.loads(mcfg["config"]["Labels"][assemble.LIFECYCLE_LABEL])
    assert new_md["runImage"] == {"topLayer": patched.config()["rootfs"]["diff_ids"][-1], "reference": patched.digest(),
                                  "image": "localhost/test/run:2"}
    assert mcfg["config"]["User"] == built.config()["config"]["User"]

    rebase(store, "localhost/test/app:1", "localhost/test/run:1", tag="localhost/test/app:back")
    back = store.image("localhost/test/app:back")
    assert back.config_bytes() == built.config_bytes() and back.digest() == built.digest()


def test_rebase_refuses_an_image_the_builder_did_not_make(tmp_path):
    from taxiway.builder.lifecycle import rebase

    store = Store(tmp_path / "store")
    _run_image(store, "os", ref="localhost/test/run:1")
    with pytest.raises(InvalidInput, match="not built by buildpacks"):
        rebase(store, "localhost/test/run:1", "localhost/test/run:1")


def test_store_prunes_temp_files_of_writers_that_died_not_of_live_ones(tmp_path):
    """kill -9 mid-write leaves a temp blob: the next write removes it once unlocked and past the grace period."""
    import signal
    import subprocess
    import sys
    import time

    from taxiway.oci import store as storemod

    root = tmp_path / "store"
    Store(root)
    code = ("import sys, os, time\nfrom taxiway.oci.store import Store\n"
            "fd, p = Store(sys.argv[1]).temp_file('layer-')\nos.write(fd, b'half a layer')\n"
            "print(p, flush=True)\ntime.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE)
    try:
        dead = Path(child.stdout.readline().decode().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    live_fd, live = Store(root).temp_file("blob-")  # held by this process: a writer still at work
    try:
        old = time.time() - storemod.TEMP_GRACE - 5
        for p in (dead, Path(live)):
            os.utime(p, (old, old))
        partial = root / ".taxiway" / "ingest" / ("ab" * 32 + ".partial")
        partial.write_bytes(b"resumable download")  # a pull's, kept for the next pull
        young_fd, young = Store(root).temp_file("blob-")
        os.close(young_fd)  # unlocked, but inside the grace period
        Store(root).write_blob(b"next write")
        left = sorted(p.name for p in (root / ".taxiway" / "ingest").iterdir())
        assert dead.name not in left
        assert Path(live).name in left and Path(young).name in left and partial.name in left
    finally:
        os.close(live_fd)


def test_layer_env(tmp_path):
    d = tmp_path / "layer"
    (d / "bin").mkdir(parents=True)
    (d / "env").mkdir()
    (d / "env.launch").mkdir()
    (d / "env.build").mkdir()
    (d / "env" / "A").write_text("override")
    (d / "env" / "B.default").write_text("dflt")
    (d / "env" / "C.prepend").write_text("/pre")
    (d / "env" / "C.delim").write_text(":")
    (d / "env.launch" / "D.append").write_text("tail")
    (d / "env.build" / "ONLY_BUILD").write_text("1")
    env = {"A": "old", "B": "kept", "C": "/usr", "D": "head", "PATH": "/bin"}
    envmod.apply_layer(env, d, "launch", inside="/layers/x/layer")
    assert env == {"A": "override", "B": "kept", "C": "/pre:/usr", "D": "headtail", "PATH": "/layers/x/layer/bin:/bin"}


@given(st.lists(st.text("abc/", min_size=1, max_size=5), max_size=4), st.text("abc/", max_size=5))
def test_prepend_then_append_keep_order(parts, start):
    env = {"P": start} if start else {}
    for p in parts:
        env["P"] = envmod._join(p, env.get("P", ""), ":")
    expected = ":".join([*reversed(parts), *([start] if start else [])])
    assert env.get("P", "") == expected


def test_launch_toml_parsing(tmp_path):
    p = tmp_path / "launch.toml"
    p.write_text('[[processes]]\ntype = "web"\ncommand = ["gunicorn", "app:app"]\nargs = ["-w", "2"]\ndefault = true\n'
                 '[[processes]]\ntype = "worker"\ncommand = "celery -A app worker"\nworking-dir = "/workspace/w"\n')
    procs, _ = bpmod.parse_launch_toml(p, "me/bp")
    assert procs[0].argv() == ["gunicorn", "app:app", "-w", "2"] and procs[0].default
    assert procs[1].argv() == ["/bin/sh", "-c", "celery -A app worker"] and procs[1].working_dir == "/workspace/w"
    for bad, why in [('[[processes]]\ntype = "web"\n', "command"), ('[[processes]]\ntype = "a b"\ncommand = ["x"]\n', "type"),
                     ('processes = "x"\n', "array"), ('[[processes]\n', "malformed"),
                     ('[[processes]]\ntype = "web"\ncommand = ["x"]\nargs = "y"\n', "args")]:
        p.write_text(bad)
        with pytest.raises(InvalidInput, match=why):
            bpmod.parse_launch_toml(p, "me/bp")


def test_layer_toml_parsing(tmp_path):
    p = tmp_path / "l.toml"
    p.write_text('[types]\nlaunch = true\ncache = true\n[metadata]\nhash = "x"\n')
    m = bpmod.parse_layer_toml(p)
    assert (m.launch, m.build, m.cache, m.metadata) == (True, False, True, {"hash": "x"})
    p.write_text('launch = true\n')  # buildpack API < 0.6
    assert bpmod.parse_layer_toml(p).launch
    p.write_text('[types]\nlaunch = "yes"\n')
    with pytest.raises(InvalidInput, match="types.launch"):
        bpmod.parse_layer_toml(p)


def test_restorer_keeps_cache_and_launch_metadata_only(tmp_path):
    bp = tmp_path / "layers" / "me_bp"
    for name, types in [("deps", "launch = true"), ("cached", "cache = true"), ("tmp", "build = true"),
                        ("new", "launch = true")]:
        (bp / name).mkdir(parents=True)
        (bp / name / "f").write_text("x")
        (bp / f"{name}.toml").write_text(f"[types]\n{types}\n")
    (bp / "launch.toml").write_text("")
    import hashlib

    deps_hash = hashlib.sha256((bp / "deps.toml").read_bytes()).hexdigest()
    # "new" was exported with other metadata (a build failed after rewriting it): not kept.
    restore_layers(tmp_path / "layers", {"me_bp/deps": deps_hash, "me_bp/new": "0" * 64})
    assert sorted(p.name for p in bp.iterdir()) == ["cached", "cached.toml", "deps.toml"]


def test_bundled_buildpacks_load():
    bps = bpmod.bundled()
    assert set(bps) == {"taxiway/python", "taxiway/node", "taxiway/deno", "taxiway/static", "taxiway/procfile"}
    assert all(bp.api == "0.10" for bp in bps.values())
    assert [g[0].buildpack.id for g in bpmod.default_order()][0] == "taxiway/python"


def _pylock():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pylock", bpmod.bundled_root() / "_lib" / "pylock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


UV_LOCK = '''\
version = 1
requires-python = ">=3.11"

[[package]]
name = "app"
version = "0.1.0"
source = { virtual = "." }
dependencies = [
    { name = "flask" },
    { name = "pywin32", marker = "sys_platform == 'win32'" },
]

[package.dev-dependencies]
dev = [{ name = "pytest" }]

[[package]]
name = "flask"
version = "3.0.3"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "click" }, { name = "Werkzeug" }]

[[package]]
name = "click"
version = "8.1.7"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "colorama", marker = "platform_system == 'Windows'" }]

[[package]]
name = "colorama"
version = "0.4.6"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "werkzeug"
version = "3.0.4"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "pywin32"
version = "306"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "pytest"
version = "8.3.3"
source = { registry = "https://pypi.org/simple" }
'''


def test_uv_lock_to_pinned_requirements(tmp_path):
    p = tmp_path / "uv.lock"
    p.write_text(UV_LOCK)
    assert _pylock().uv_requirements(p) == [
        "click==8.1.7",
        "colorama==0.4.6 ; (platform_system == 'Windows')",
        "flask==3.0.3",
        "pywin32==306 ; (sys_platform == 'win32')",
        "werkzeug==3.0.4",
    ]  # pytest is a dev dependency: left out
    p.write_text(UV_LOCK.replace('source = { virtual = "." }', 'source = { registry = "x" }'))
    with pytest.raises(ValueError, match="no project at its root"):
        _pylock().uv_requirements(p)


def test_poetry_lock_to_pinned_requirements(tmp_path):
    p = tmp_path / "poetry.lock"
    p.write_text('''\
[[package]]
name = "flask"
version = "3.0.3"
optional = false
groups = ["main"]

[[package]]
name = "pytest"
version = "8.3.3"
optional = false
groups = ["dev"]

[[package]]
name = "colorama"
version = "0.4.6"
optional = false
groups = ["main"]
markers = "platform_system == \\"Windows\\""

[[package]]
name = "old-style"
version = "1.0"
category = "main"
optional = false
''')
    assert _pylock().poetry_requirements(p) == [
        "flask==3.0.3", 'colorama==0.4.6 ; (platform_system == "Windows")', "old-style==1.0"]


def test_project_descriptor_filters(tmp_path):
    from taxiway.builder.project import Project, copy_source, load_project, source_filter

    keep = source_filter(Project(exclude=["*.log", "/secret/", "build/out", "node_modules/"]))
    assert not keep("debug.log", False) and not keep("a/b/debug.log", False)
    assert not keep("secret", True) and keep("a/secret", True)
    assert not keep("build/out", True) and keep("build/src", True)
    assert not keep("node_modules", True) and keep("node_modules", False)
    assert not keep(".git", True) and keep("app.py", False)
    inc = source_filter(Project(include=["/public/", "*.py"]))
    assert inc("public/index.html", False) and inc("app.py", False) and not inc("README.md", False)

    src = tmp_path / "app"
    (src / "public").mkdir(parents=True)
    (src / "public" / "index.html").write_text("x")
    (src / "notes.log").write_text("x")
    (src / "project.toml").write_text('[_]\nschema-version = "0.2"\n[io.buildpacks]\nexclude = ["*.log"]\n'
                                      '[[io.buildpacks.build.env]]\nname = "BP_X"\nvalue = "1"\n')
    proj = load_project(src)
    assert proj.env == {"BP_X": "1"}
    copy_source(src, tmp_path / "ws", proj)
    assert sorted(p.name for p in (tmp_path / "ws").iterdir()) == ["project.toml", "public"]
    (src / "project.toml").write_text('[build]\ninclude = ["x"]\nexclude = ["y"]\n')
    with pytest.raises(InvalidInput, match="both include and exclude"):
        load_project(src)


def test_build_egress_proxy_starts_on_the_first_connection(tmp_path, monkeypatch):
    """A rebuild that installs nothing never starts (or imports) the in-process proxy."""

    from taxiway.builder import egress

    monkeypatch.delenv("TAXIWAY_BUILD_EGRESS", raising=False)
    monkeypatch.setenv("TAXIWAY_BUILD_ALLOW", "localhost")  # resolved from /etc/hosts; loopback is never allowed
    with egress.proxy(tmp_path) as up:
        assert not (tmp_path / "egress.log").exists()
        addr = up.address()
        assert up.address() == addr and addr[0] == "127.0.0.1"
        up.connect(timeout=5).close()
    assert b'"listening"' in (tmp_path / "egress.log").read_bytes()


def _get(sock, path: str) -> bytes:
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while data := sock.recv(65536):
            out += data
    return out


def test_build_egress_proxy_is_reachable_only_through_the_build_relay(tmp_path, monkeypatch):
    """Issue 21: the per-build proxy listens in a network namespace of its own, not on the host's loopback.

    A local process (another tenant's build, a machine with host networking) that connects to
    its address reaches nothing of it; the build's relay (Upstream.connect) does.
    """
    import re
    import socket

    from taxiway.builder import egress

    monkeypatch.delenv("TAXIWAY_BUILD_EGRESS", raising=False)
    monkeypatch.setenv("TAXIWAY_BUILD_ALLOW", "localhost")

    def served() -> int:
        m = re.search(rb"^taxiway_egress_client_connections_total (\d+)", _get(up.connect(timeout=5), "/metrics"), re.M)
        assert m, "no connection counter in /metrics"
        return int(m.group(1))

    with egress.proxy(tmp_path) as up:
        assert b"200 OK" in _get(up.connect(timeout=5), "/healthz")
        before = served()
        try:
            # From the host: the same address and port is another namespace's (nothing there, or not this proxy).
            with socket.create_connection(up.address(), timeout=5) as s:
                s.sendall(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
                s.settimeout(2)
                with contextlib.suppress(OSError):
                    s.recv(100)
        except ConnectionRefusedError:
            pass
        assert served() == before + 1, "a connection from the host reached the build's proxy"
    log = (tmp_path / "egress.log").read_bytes()
    assert b"pypi.org" not in log


def test_build_egress_proxy_that_cannot_start_says_why_every_time(tmp_path, monkeypatch):
    from taxiway.builder import egress

    monkeypatch.delenv("TAXIWAY_BUILD_EGRESS", raising=False)
    calls = []

    def broken(work):
        calls.append(work)
        raise OSError("no ports left")

    monkeypatch.setattr(egress, "_start", broken)
    with egress.proxy(tmp_path) as up:
        for _ in range(2):
            with pytest.raises(OSError, match="no ports left"):
                up.address()
        assert isinstance(up.error, OSError) and len(calls) == 1
    monkeypatch.setenv("TAXIWAY_BUILD_EGRESS", "10.0.0.1:3128")
    with egress.proxy(tmp_path) as up:
        assert up.address() == ("10.0.0.1", 3128)


def test_safefs_reads_only_plain_files_reached_without_links(tmp_path):
    """What a build wrote is read link-free all the way down, regular and bounded (through fsutil.read_regular)."""
    from taxiway.builder import safefs

    root = tmp_path / "layers"
    (root / "bp" / "env").mkdir(parents=True)
    (root / "bp" / "env" / "PATH").write_bytes(b"/layers/bp/bin")
    assert safefs.read_bytes(root, "bp/env/PATH") == b"/layers/bp/bin"
    assert safefs.read_bytes(root, "bp/env/GONE") is None and safefs.read_bytes(root, "nope/x") is None
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"canary")
    (root / "bp" / "env" / "SHADOW").symlink_to(secret)
    (root / "up").symlink_to(tmp_path)  # a link on the way, not at the end
    os.mkfifo(root / "bp" / "env" / "FIFO")
    for rel in ("bp/env/SHADOW", "up/host-secret", "bp/env/FIFO", "bp/env"):
        with pytest.raises(InvalidInput, match="symlink or special file"):
            safefs.read_bytes(root, rel)
    with open(root / "bp" / "big", "wb") as f:
        f.truncate(safefs.MAX_READ + 1)
    with pytest.raises(InvalidInput, match="larger than 16 MB"):
        safefs.read_bytes(root, "bp/big")
    assert safefs.read_text(root, "bp/env/PATH", "env") == "/layers/bp/bin"


def test_a_stack_layer_is_cached_whole_or_not_at_all(tmp_path, monkeypatch):
    """The cached stack layer is renamed into place (synced) before layer.json names it; leftovers are swept."""
    import hashlib

    from taxiway.builder import stack

    recipe = stack.RECIPES["run-base"]
    monkeypatch.setenv("TAXIWAY_STACK_CACHE", str(tmp_path / "cache"))
    rootfs = io.BytesIO()
    with tarfile.open(fileobj=rootfs, mode="w") as t:
        info = tarfile.TarInfo("etc/os-release")
        info.size = 5
        t.addfile(info, io.BytesIO(b"test\n"))
    calls = []

    def mmdebstrap(r, out: Path) -> None:  # the real one needs a Debian mirror; this writes what it would
        calls.append(r.name)
        if len(calls) == 1:
            raise InvalidInput("mirror unreachable", "test")
        out.write_bytes(rootfs.getvalue())

    monkeypatch.setattr(stack, "_mmdebstrap", mmdebstrap)
    d = tmp_path / "cache" / recipe.key()
    with pytest.raises(InvalidInput):
        stack.cached_layer(recipe)
    assert not (d / "layer.tar.gz").exists() and not (d / "layer.json").exists()
    (d / ".layer.tar.gz.abcd1234.tmp").write_bytes(b"half a layer")  # as a build killed mid-write leaves it
    path, meta = stack.cached_layer(recipe)
    data = path.read_bytes()
    assert gzip.decompress(data) == rootfs.getvalue()
    assert meta["digest"] == "sha256:" + hashlib.sha256(data).hexdigest() and meta["size"] == len(data)
    assert meta["diff_id"] == "sha256:" + hashlib.sha256(rootfs.getvalue()).hexdigest()
    assert sorted(os.listdir(d)) == ["layer.json", "layer.tar.gz"]
    assert stack.cached_layer(recipe) == (path, meta) and len(calls) == 2  # cached: not built again


def test_sweep_keeps_live_builds_and_reaps_dead_reused_and_zombie_owners(tmp_path):
    """A build folder's owner is a pid and its start time: a reused pid or a zombie owner means the build is gone."""
    import subprocess
    import sys
    import time

    from taxiway.builder import reaper
    from taxiway.process import start_time

    live, reused, zombie = (tmp_path / f"build-{n}" for n in ("live", "reused", "zombie"))
    for d in (live, reused, zombie):
        d.mkdir()
    reaper.claim(live)
    assert (live / "owner").read_text() == f"{os.getpid()} {start_time(os.getpid())}\n"
    assert [p.name for p in live.iterdir()] == ["owner"]  # the temp name is gone
    (reused / "owner").write_text(f"{os.getpid()} 1\n")  # our pid, another process's start time
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        (zombie / "owner").write_text(f"{child.pid} {start_time(child.pid)}\n")
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # exiting; once a zombie it stays one until wait()
        assert reaper.sweep(tmp_path) == 2
    finally:
        child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-live"]


def test_build_egress_address_is_parsed_as_listen_addresses_are(tmp_path, monkeypatch):
    """$TAXIWAY_BUILD_EGRESS takes what `taxiway egress serve --listen` takes; a name is never looked up."""
    from taxiway.builder import egress
    from taxiway.errors import InvalidInput

    for value, addr in ((":3128", ("127.0.0.1", 3128)), ("[::1]:3128", ("::1", 3128)), (" 10.0.0.1:3128 ", ("10.0.0.1", 3128))):
        monkeypatch.setenv("TAXIWAY_BUILD_EGRESS", value)
        with egress.proxy(tmp_path) as up:
            assert up.address() == addr
    for bad in ("egress.example:3128", "10.0.0.1", "::1:3128", "10.0.0.1:0", "10.0.0.1:70000"):
        monkeypatch.setenv("TAXIWAY_BUILD_EGRESS", bad)
        with pytest.raises(InvalidInput, match=r"^TAXIWAY_BUILD_EGRESS="):
            egress._external()


def test_index_mirror_addresses_are_allowed_exactly(monkeypatch):
    """pypi.org -> 203.0.113.80 (a site mirror): that /32 is allowed, else pip gets 403; loopback/link-local never."""
    import socket

    from taxiway.builder import egress

    answers = {"pypi.org": ["203.0.113.80", "151.101.0.223"], "files.pythonhosted.org": ["10.1.2.3", "fd00::5"],
               "registry.npmjs.org": ["127.0.0.1", "169.254.169.254", "fe80::1%eth0"]}

    def fake(host, port, type=0):
        if host not in answers:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert egress.index_ranges([*egress.DEFAULT_ALLOW, "*.example.com", "gone.invalid"]) == [
        "10.1.2.3/32", "203.0.113.80/32", "fd00::5/128"]


# -- buildpack.toml fields that become paths (red team: version used as a host path) ------------


def _bp_folder(root: Path, bid: str = "me/bp", version: str = "1") -> Path:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "buildpack.toml").write_text(f'api = "0.10"\n[buildpack]\nid = {bid!r}\nversion = {version!r}\n')
    for exe in ("detect", "build"):
        (root / "bin" / exe).write_text("#!/bin/sh\nexit 0\n")
        (root / "bin" / exe).chmod(0o755)
    return root


@pytest.mark.parametrize("version", ["/tmp/x/absver", "../../../../tmp/x/pwnver", "1/../../x", ".", "..", "1\n2", "a b"])
def test_buildpack_version_that_is_a_path_is_refused(tmp_path, version):
    bp = _bp_folder(tmp_path / "bp", version=version.replace("/tmp/x", str(tmp_path / "x")))
    with pytest.raises(InvalidInput, match="version"):
        bpmod.load_buildpack(bp)


@pytest.mark.parametrize("bid", ["a/../..", "a//b", "a/..", "a/.", "./a"])
def test_buildpack_id_with_dot_parts_is_refused(tmp_path, bid):
    with pytest.raises(InvalidInput, match="id"):
        bpmod.load_buildpack(_bp_folder(tmp_path / "bp", bid=bid))


def test_good_versions_load(tmp_path):
    for v in ("1", "0.1.0", "1.2.3-rc.1+build_7"):
        assert bpmod.load_buildpack(_bp_folder(tmp_path / v, version=v)).version == v


def test_staging_refuses_a_version_that_leaves_its_root_and_copies_nothing(tmp_path, monkeypatch):
    """Even a Buildpack made without load_buildpack's checks never gets copied outside the staging folder."""
    import dataclasses

    from taxiway.builder.lifecycle import buildpacks_dir, staging_path

    monkeypatch.setenv("TAXIWAY_HOME", str(tmp_path / "home"))
    good = bpmod.load_buildpack(_bp_folder(tmp_path / "bp"))
    canary = tmp_path / "x"
    canary.mkdir()
    for v in (str(canary / "absver"), f"../../../../../../../../../..{canary}/pwnver", "1/../../x", "..", "."):
        bad = dataclasses.replace(good, version=v)
        with pytest.raises(InvalidInput):
            staging_path(tmp_path / "stage", bad)
        with pytest.raises(InvalidInput):
            buildpacks_dir([bad])
    assert list(canary.iterdir()) == []
    assert staging_path(tmp_path / "stage", good) == tmp_path / "stage" / "me_bp" / "1"


def test_two_ids_with_one_folder_name_are_one_clear_error(tmp_path, monkeypatch):
    from taxiway.builder.lifecycle import buildpacks_dir

    monkeypatch.setenv("TAXIWAY_HOME", str(tmp_path / "home"))
    a = bpmod.load_buildpack(_bp_folder(tmp_path / "a", bid="me/bp"))
    b = bpmod.load_buildpack(_bp_folder(tmp_path / "b", bid="me_bp"))
    with pytest.raises(InvalidInput, match="share the folder"):
        buildpacks_dir([a, b])


def test_user_buildpack_cannot_claim_a_bundled_id(tmp_path):
    with pytest.raises(InvalidInput, match="reserved"):
        bpmod.resolve(str(_bp_folder(tmp_path / "bp", bid="taxiway/static")))
    assert bpmod.resolve("static").id == "taxiway/static"


def test_build_home_is_private(tmp_path, monkeypatch):
    from taxiway.builder.lifecycle import build_home

    monkeypatch.setenv("TAXIWAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "build").mkdir(parents=True)
    (tmp_path / "home" / "build").chmod(0o755)
    assert build_home().stat().st_mode & 0o777 == 0o700


# -- copying a tree someone else controls (red team MEDIUM: copytree races, recursion, tracebacks) ----


def test_fdcopy_never_follows_a_folder_swapped_for_a_link(tmp_path):
    from taxiway.builder.fdcopy import copy_tree

    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_text("HOST SECRET\n")
    src = tmp_path / "src"
    (src / "z").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")

    def keep(rel: str, is_dir: bool) -> bool:
        if rel == "z":  # listed as a folder; swapped for a link to a host folder before it is opened
            (src / "z").rmdir()
            (src / "z").symlink_to(canary)
        return True

    with pytest.raises(InvalidInput, match="changed while it was copied: z"):
        copy_tree(src, tmp_path / "dest", keep)
    assert not (tmp_path / "dest" / "z" / "secret").exists()


def make_deep(root: Path, depth: int = 1500) -> None:
    """``root/d/d/.../d``, ``depth`` folders deep (made by fds: the path is longer than a syscall takes)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)


def remove_deep(root: Path) -> None:
    """Undo ``make_deep`` without recursion (shutil.rmtree, and pytest's cleanup, recurse too deep for it).

    Each step moves ``root/d/d`` up to ``root/t``, removes the emptied ``root/d`` and renames ``t`` back.
    """
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while os.path.lexists(root / "d"):
            dfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=rfd)
            try:
                os.rename("d", "t", src_dir_fd=dfd, dst_dir_fd=rfd)
            except FileNotFoundError:
                os.rmdir("d", dir_fd=rfd)
                continue
            finally:
                os.close(dfd)
            os.rmdir("d", dir_fd=rfd)
            os.rename("t", "d", src_dir_fd=rfd, dst_dir_fd=rfd)
    finally:
        os.close(rfd)


def test_fdcopy_deep_tree_is_one_clear_error_not_a_recursion_error(tmp_path):
    from taxiway.builder.fdcopy import copy_tree

    src = tmp_path / "src"
    src.mkdir()
    make_deep(src)
    try:
        with pytest.raises(InvalidInput, match="nested deeper than"):
            copy_tree(src, tmp_path / "dest")
        remove_deep(tmp_path / "dest")
    finally:
        remove_deep(src)


def test_fdcopy_skips_special_files_and_copies_the_rest(tmp_path):
    from taxiway.builder.fdcopy import copy_tree

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("data\n")
    (src / "sub" / "f").chmod(0o640)
    (src / "run").write_text("#!/bin/sh\n")
    (src / "run").chmod(0o755)
    os.symlink("/etc/passwd", src / "link")
    os.mkfifo(src / "fifo")
    hashes: dict[str, str] = {}
    assert copy_tree(src, tmp_path / "dest", hashes=hashes) == ["fifo"]
    d = tmp_path / "dest"
    assert (d / "sub" / "f").read_text() == "data\n" and (d / "sub" / "f").stat().st_mode & 0o777 == 0o640
    assert (d / "run").stat().st_mode & 0o777 == 0o755
    assert os.readlink(d / "link") == "/etc/passwd" and not (d / "fifo").exists()
    assert set(hashes) == {"sub/f", "run"}
    with pytest.raises(InvalidInput, match="could not copy"):  # an OS error is one clear line
        copy_tree(src, tmp_path / "dest")


# -- .git/config as git reads it (red team LOW: continuations and comments leaked a token) ----------


@pytest.mark.parametrize("config", [
    '[remote "origin"]\n\turl = https://u:SECRET\\\n@example.invalid/x\n',
    '[remote "origin"]\n\turl = https://example.invalid/x ; https://u:SECRET@h\n',
    '[remote "origin"]\n\turl = https://example.invalid/x # SECRET\n',
    '[remote "origin"]\n\turl = "https://u:SECRET@example.invalid/x" ; c\n',
    '[remote "origin"] url = https://SECRET@example.invalid/x\n',
    '[remote.origin]\nURL=https://u:SECRET@example.invalid/x\r\n',
    '[remote "other"]\n\turl = https://u:SECRET@example.invalid/o\n[remote "origin"]\n\turl = https://example.invalid/x\n',
])
def test_git_origin_url_never_carries_a_token(config):
    from taxiway.builder.lifecycle import _origin_url

    assert _origin_url(config) == "https://example.invalid/x"


def test_git_config_entries_follow_git_syntax():
    from taxiway.builder.lifecycle import git_config_entries

    text = '# c\n[core]\n\tbare\n[remote "Origin"]\n\turl = "a b"  \\t ; x\n[x.Y]\nk = 1\\\n2\n'
    assert git_config_entries(text) == [("core", "bare", "true"), ("remote.Origin", "url", "a b  \t"), ("x.y", "k", "12")]


def test_source_filter_leaves_out_every_git_dir_and_credential_file():
    from taxiway.builder.project import Project, source_filter

    keep = source_filter(Project())
    for rel, is_dir in ((".git", True), ("vendor/lib/.git", True), ("vendor/lib/.git/config", False),
                        (".git-credentials", False), ("sub/.git-credentials", False), (".netrc", False)):
        assert not keep(rel, is_dir), rel
    assert keep("vendor/lib/x.py", False) and keep(".gitignore", False)


def test_build_output_shown_on_the_terminal_has_no_escapes_and_is_capped():
    from taxiway.builder.lifecycle import _tail, terminal_safe

    evil = "a\x1b]0;PWNED TITLE\x07b\x1b[2J\x1b[Hc\x1bPd\x9b31me\x07\x00\x7f\x85\u202ef\tg"
    assert terminal_safe(evil) == "abcdef\tg"
    assert _tail("one\rtwo\x1b[2K\n\x1b]0;x\x07\nthree\r\n") == ["one", "two", "three"]
    long = terminal_safe("x" * 10000 + "END")
    assert len(long) <= 2100 and long.endswith("END")


def test_staged_buildpacks_unused_for_a_day_are_pruned_unless_in_use(tmp_path, monkeypatch):
    import time

    from taxiway.builder.lifecycle import buildpacks_dir, prune_buildpacks

    monkeypatch.setenv("TAXIWAY_HOME", str(tmp_path / "home"))
    in_use: list[int] = []
    used = buildpacks_dir([bpmod.load_buildpack(_bp_folder(tmp_path / "a", bid="me/a"))], locks=in_use)
    old = buildpacks_dir([bpmod.load_buildpack(_bp_folder(tmp_path / "b", bid="me/b"))])
    fresh = buildpacks_dir([bpmod.load_buildpack(_bp_folder(tmp_path / "c", bid="me/c"))])
    root = used.parent
    (root / ".new-left").mkdir()
    day_ago = time.time() - 2 * 86400
    for d in (used, old, root / ".new-left"):
        os.utime(d, (day_ago, day_ago))
    assert sorted(prune_buildpacks(root)) == sorted([old.name, ".new-left"])
    assert used.is_dir() and fresh.is_dir() and not old.exists()
    for fd in in_use:
        os.close(fd)
    assert prune_buildpacks(root) == [used.name]
    # Using a staged folder again marks it: it stays another day.
    again = buildpacks_dir([bpmod.load_buildpack(_bp_folder(tmp_path / "c", bid="me/c"))])
    assert again == fresh and prune_buildpacks(root) == []
