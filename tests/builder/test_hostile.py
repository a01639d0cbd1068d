"""Hostile source (issue 21): what an attacker's app or buildpack tries must not reach the host.

Every "escape" is aimed at a canary tree under the test's tmp dir (never the
host's /etc or /tmp), which is checked byte for byte, owners included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .test_bad_input import assert_not_exported, error_line


def make_canary(root: Path) -> Path:
    c = root / "canary"
    (c / "dir").mkdir(parents=True)
    (c / "dir" / "keep.txt").write_text("keep me\n")
    (c / "secret").write_text("SHADOW-LIKE-SECRET\n")
    (c / "target.toml").write_text("[types]\nlaunch = true\n[metadata]\nleaked = \"HOST-TOML\"\n")
    return c


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else ""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, data)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_uid, st.st_gid, "")
    return out


def user_buildpack(root: Path, build_sh: str, detect_sh: str = "exit 0", bp_id: str = "evil/bp") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    (root / "buildpack.toml").write_text(f'api = "0.10"\n[buildpack]\nid = "{bp_id}"\nversion = "1"\n')
    (root / "bin" / "detect").write_text("#!/bin/sh\n" + detect_sh + "\n")
    (root / "bin" / "build").write_text("#!/bin/sh\nset -e\n" + build_sh + "\n")
    for exe in ("detect", "build"):
        (root / "bin" / exe).chmod(0o755)
    return root


def app(tmp_path: Path) -> Path:
    a = tmp_path / "app"
    a.mkdir(parents=True)
    (a / "Procfile").write_text("web: sleep 1000\n")
    return a


def labels_and_env(builder, tag: str) -> str:
    cfg = builder.image(tag).config()
    return json.dumps(cfg)


# -- 1. project.toml env names ------------------------------------------------------------


def test_project_toml_env_name_cannot_write_a_host_file(builder, tmp_path):
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    a = app(tmp_path)
    (a / "project.toml").write_text(
        f'[[io.buildpacks.build.env]]\nname = "../../../../../../../../../..{canary}/PWNED"\nvalue = "x"\n')
    line = error_line(builder("build", str(a), "-t", "evil/envname:1", check=False))
    assert "invalid build env name" in line and "project.toml" in line
    assert snapshot(canary) == before and not (canary / "PWNED").exists()
    assert_not_exported(builder, "evil/envname:1")


@pytest.mark.parametrize("name", ["", "a/b", "1X", "CNB_LAYERS_DIR"])
def test_bad_env_names_are_one_clear_error(builder, tmp_path, name):
    a = app(tmp_path)
    (a / "project.toml").write_text(f'[[io.buildpacks.build.env]]\nname = "{name}"\nvalue = "x"\n')
    line = error_line(builder("build", str(a), "-t", "evil/envname:2", check=False))
    assert "build env name" in line
    line = error_line(builder("build", str(app(tmp_path / "cli")), "-t", "evil/envname:2", "--env", f"{name}=1",
                              check=False))
    assert "build env name" in line or "is not K=V" in line


# -- 2. links planted in /layers and /cnb/work ---------------------------------------------------


def test_env_launch_link_does_not_put_a_host_file_into_the_image(builder, tmp_path):
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    bp = user_buildpack(tmp_path / "bp", f"""
mkdir -p "$1/l/env.launch"
printf '[types]\\nlaunch = true\\n' > "$1/l.toml"
ln -s {canary}/secret "$1/l/env.launch/SHADOW"
""")
    p = builder("build", str(app(tmp_path)), "-t", "evil/envlink:1", "-b", str(bp), "-b", "procfile", check=False)
    assert "SHADOW-LIKE-SECRET" not in p.stderr.decode()
    if p.returncode == 0:
        assert "SHADOW-LIKE-SECRET" not in labels_and_env(builder, "evil/envlink:1")
    else:
        assert "symlink" in error_line(p)
        assert_not_exported(builder, "evil/envlink:1")
    assert snapshot(canary) == before


def test_linked_metadata_and_layer_dirs_are_refused(builder, tmp_path):
    """launch.toml, <layer>.toml and the layer folder itself as links to host files: nothing read or chowned."""
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    bp = user_buildpack(tmp_path / "bp", f"""
ln -s {canary}/target.toml "$1/venv.toml"
ln -s {canary}/dir "$1/venv"
ln -s {canary}/target.toml "$1/launch.toml"
ln -sfn {canary}/dir /layers/taxiway_procfile 2>/dev/null || true
rm -rf /layers/taxiway_procfile; ln -s {canary}/dir /layers/taxiway_procfile
""")
    p = builder("build", str(app(tmp_path)), "-t", "evil/links:1", "-b", str(bp), "-b", "procfile", check=False)
    assert "symlink" in error_line(p) or "removed during the build" in error_line(p)
    assert "HOST-TOML" not in p.stderr.decode()
    assert_not_exported(builder, "evil/links:1")
    assert snapshot(canary) == before


def test_second_build_does_not_delete_through_planted_links(builder, tmp_path):
    """restore_layers (the next build of the tag) must not empty a host folder a link points at."""
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    bp = user_buildpack(tmp_path / "bp", f"""
printf '[types]\\ncache = true\\n' > "$1/c.toml"
mkdir -p "$1/c"
ln -s {canary}/dir "$1/c/inner"
ln -s {canary}/dir "$1/stray"
ln -s {canary} /layers/planted
""")
    a = app(tmp_path)
    for _ in range(2):
        builder("build", str(a), "-t", "evil/restore:1", "-b", str(bp), "-b", "procfile", check=False)
    assert snapshot(canary) == before


def test_app_code_run_by_pip_cannot_plant_links_either(builder, tmp_path):
    """The app-code route: pip runs the app's own in-tree build backend (backend-path), which plants links.

    The backend then builds a real wheel, so pip succeeds and the build goes on to read the venv layer's
    env.launch: the planted link must be refused there (the error proves the app's code ran and planted it).
    """
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    a = tmp_path / "pyapp"
    a.mkdir()
    (a / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "evil"\nbackend-path = ["."]\n'
                                      '[project]\nname = "evil"\nversion = "1"\n')
    (a / "evil.py").write_text(f"""
import os, zipfile
def get_requires_for_build_wheel(config_settings=None):
    os.makedirs("/layers/taxiway_python/venv/env.launch", exist_ok=True)
    for target, link in (("{canary}/secret", "/layers/taxiway_python/venv/env.launch/SHADOW"),
                         ("{canary}", "/layers/planted")):
        if not os.path.lexists(link):
            os.symlink(target, link)
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "evil-1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        z.writestr("evil-1.dist-info/METADATA", "Metadata-Version: 2.1\\nName: evil\\nVersion: 1\\n")
        z.writestr("evil-1.dist-info/WHEEL", "Wheel-Version: 1.0\\nGenerator: evil\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
        z.writestr("evil-1.dist-info/RECORD", "")
    return name
""")
    (a / "app.py").write_text("print('hi')\n")
    p = builder("build", str(a), "-t", "evil/pyapp:1", check=False)
    assert "symlink" in error_line(p) and "env.launch" in error_line(p), p.stderr.decode()[-2000:]
    assert "SHADOW-LIKE-SECRET" not in p.stderr.decode()
    assert_not_exported(builder, "evil/pyapp:1")
    # The next build of the tag restores the cache the first one left, /layers/planted included.
    p = builder("build", str(a), "-t", "evil/pyapp:1", check=False)
    assert "SHADOW-LIKE-SECRET" not in p.stderr.decode()
    if p.returncode == 0:
        assert "SHADOW-LIKE-SECRET" not in labels_and_env(builder, "evil/pyapp:1")
    assert snapshot(canary) == before


# -- 3. the sandbox: pid, network, uid ------------------------------------------------------------


def test_build_cannot_see_a_host_process_or_reach_host_loopback(builder, tmp_path):
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    secret = "SECRET_TOKEN=tw-" + os.urandom(8).hex()
    victim = subprocess.Popen(["/bin/sleep", "300"],
                              env={**os.environ, "SECRET_TOKEN": secret.split("=", 1)[1]},
                              preexec_fn=lambda: (os.setgid(1000), os.setuid(1000)))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    try:
        bp = user_buildpack(tmp_path / "bp", f"""
echo "pid1=$(cat /proc/1/comm)"
cat /proc/{victim.pid}/environ 2>/dev/null | tr '\\0' '\\n' | grep SECRET_TOKEN || true
for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null | tr '\\0' '\\n' | grep SECRET_TOKEN || true; done
ls /proc/{victim.pid}/root/ 2>/dev/null && echo ROOT-VISIBLE || true
kill -0 {victim.pid} 2>/dev/null && echo CAN-SIGNAL || true
python3 -c "import socket; s=socket.create_connection(('127.0.0.1', {port}), timeout=2); print('REACHED-HOST')" 2>/dev/null || true
echo "uid=$(id -u)"
""")
        p = builder("build", str(app(tmp_path)), "-t", "evil/sandbox:1", "-b", str(bp), "-b", "procfile")
        out = p.stderr.decode() + p.stdout.decode()
        log = out
        assert secret not in log and "ROOT-VISIBLE" not in log and "CAN-SIGNAL" not in log
        assert "REACHED-HOST" not in log
        with pytest.raises(TimeoutError):
            srv.accept()
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        srv.close()
    assert snapshot(canary) == before


# -- 4. timeouts ----------------------------------------------------------------------------------


def test_timeout_kills_everything_the_build_started(builder, tmp_path):
    marker = tmp_path / "cache-writes"
    bp = user_buildpack(tmp_path / "bp", """
setsid sh -c 'while true; do date +%s%N >> /layers/evil_bp/tick; sleep 0.1; done' </dev/null >/dev/null 2>&1 &
sleep infinity
""", detect_sh="sleep 140 & exit 0")
    start = time.monotonic()
    p = builder("build", str(app(tmp_path)), "-t", "evil/slow:1", "-b", str(bp), "--timeout", "5", check=False,
                timeout=120)
    took = time.monotonic() - start
    line = error_line(p)
    assert "was stopped" in line and "--timeout" in line
    assert took < 30, took
    assert_not_exported(builder, "evil/slow:1")
    from taxiway.builder.lifecycle import cache_dir

    os.environ["TAXIWAY_HOME"], old = str(builder.home), os.environ.get("TAXIWAY_HOME")
    try:
        tick = cache_dir("evil/slow:1") / "layers" / "evil_bp" / "tick"
    finally:
        if old is None:
            del os.environ["TAXIWAY_HOME"]
        else:
            os.environ["TAXIWAY_HOME"] = old
    size = tick.stat().st_size if tick.exists() else 0
    time.sleep(1.5)
    assert (tick.stat().st_size if tick.exists() else 0) == size, "a process of the build outlived it"
    marker.write_text("ok")


def _build_leftovers(home: Path) -> tuple[list[str], list[str]]:
    """Build folders under the home's build/tmp, and step cgroups of this home (any hierarchy)."""
    tmp = home / "build" / "tmp"
    folders = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
    import glob

    from taxiway.machines.cgroups import ROOT

    name = (home / "machines" / ".cgroup-parent").read_text().split("\n")[1] + "-builds"
    groups = sorted(set(glob.glob(f"{ROOT}/{name}/build-*") + glob.glob(f"{ROOT}/*/{name}/build-*")))
    return folders, groups


def test_kill_9_of_the_build_leaves_nothing_running_or_behind(builder, tmp_path):
    """`kill -9` of `taxiway build` mid-step: its watcher stops the step and removes its folder and cgroups."""
    started = tmp_path / "started"
    bp = user_buildpack(tmp_path / "bp", """
setsid sh -c 'while true; do date +%s%N >> /layers/evil_bp/tick; sleep 0.1; done' </dev/null >/dev/null 2>&1 &
sleep infinity
""")
    env = {**os.environ, **builder.env}
    import sys

    p = subprocess.Popen([sys.executable, "-m", "taxiway", "build", str(app(tmp_path)), "-t", "evil/killed:1",
                          "-b", str(bp)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tick = None
    deadline = time.monotonic() + 300
    while tick is None and time.monotonic() < deadline and p.poll() is None:
        found = list((builder.home / "build" / "cache").glob("*/layers/evil_bp/tick"))
        tick = found[0] if found else None
        time.sleep(0.2)
    assert tick is not None, "the build step never started"
    p.kill()
    p.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_build_leftovers(builder.home)):
        time.sleep(0.2)
    assert _build_leftovers(builder.home) == ([], []), "a killed build left its folder or cgroups"
    size = tick.stat().st_size
    time.sleep(1.5)
    assert tick.stat().st_size == size, "a process of the killed build kept writing into the cache"
    assert_not_exported(builder, "evil/killed:1")
    started.write_text("ok")


def test_a_build_sweeps_what_a_killed_build_and_its_watcher_left(builder, tmp_path):
    """If the watcher was killed too, the next build removes the dead build's folder."""
    stale = builder.home / "build" / "tmp" / "build-deadbeef"
    (stale / "layers").mkdir(parents=True)
    (stale / "owner").write_text("999999999 1\n")  # a pid that cannot exist
    live = builder.home / "build" / "tmp" / "build-alive"
    live.mkdir()
    (live / "owner").write_text(f"{os.getpid()} {open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19]}\n")
    try:
        bp = user_buildpack(tmp_path / "bp", "echo built")
        builder("build", str(app(tmp_path)), "-t", "evil/sweep:1", "-b", str(bp), "-b", "procfile", timeout=300)
        assert not stale.exists()
        assert live.exists()  # its owner (this test) still runs
    finally:
        import shutil

        shutil.rmtree(live, ignore_errors=True)


def test_detect_background_sleep_does_not_hold_the_build(builder, tmp_path):
    bp = user_buildpack(tmp_path / "bp", "echo built", detect_sh="sleep 140 & exit 0")
    start = time.monotonic()
    builder("build", str(app(tmp_path)), "-t", "evil/bgdetect:1", "-b", str(bp), "-b", "procfile", timeout=120)
    assert time.monotonic() - start < 60


# -- 5. secrets in labels ---------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    base = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    return subprocess.run([*base, *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_labels_never_carry_a_token(builder, tmp_path):
    a = app(tmp_path)
    _git(a, "init", "-q")
    _git(a, "remote", "add", "origin", "https://oauth2:ghp_SECRET123@example.invalid/team/app.git")
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "x")
    builder("build", str(a), "-t", "evil/git:1")
    labels = builder.image("evil/git:1").config()["config"]["Labels"]
    assert labels["org.opencontainers.image.source"] == "https://example.invalid/team/app.git"
    assert "ghp_SECRET123" not in json.dumps(labels)


def test_gitdir_file_pointing_elsewhere_is_not_read(builder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    _git(other, "init", "-q")
    _git(other, "remote", "add", "origin", "https://user:OTHER_TOKEN@example.invalid/private.git")
    _git(other, "add", "-A")
    _git(other, "commit", "-q", "-m", "x")
    a = app(tmp_path)
    (a / ".git").write_text(f"gitdir: {other}/.git\n")
    builder("build", str(a), "-t", "evil/gitdir:1")
    labels = builder.image("evil/gitdir:1").config()["config"]["Labels"]
    assert "org.opencontainers.image.source" not in labels and "OTHER_TOKEN" not in json.dumps(labels)


# -- 6. small ones ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "wéb"])
def test_bad_procfile_names_are_one_clear_error(builder, tmp_path, name):
    a = tmp_path / "app"
    a.mkdir()
    (a / "Procfile").write_text(f"{name}: sleep 1\n")
    line = error_line(builder("build", str(a), "-t", "evil/procname:1", check=False))
    assert "Procfile line 1" in line and "cache" not in line
    assert_not_exported(builder, "evil/procname:1")


def test_non_utf8_procfile_is_one_clear_error(builder, tmp_path):
    a = tmp_path / "app"
    a.mkdir()
    (a / "Procfile").write_bytes(b"web: echo \xff\xfe\n")
    p = builder("build", str(a), "-t", "evil/procutf:1", check=False)
    line = error_line(p)
    assert "Procfile" in line and "UTF-8" in line and "Traceback" not in p.stderr.decode()


def test_node_engine_that_cannot_be_met_is_warned(builder, tmp_path):
    a = tmp_path / "app"
    a.mkdir()
    (a / "package.json").write_text(json.dumps({"name": "x", "version": "1.0.0", "engines": {"node": ">=99"},
                                                "scripts": {"start": "node server.js"}}))
    (a / "server.js").write_text("console.log('hi')\n")
    p = builder("build", str(a), "-t", "evil/engines:1", check=False)
    assert "engines.node" in p.stderr.decode() and ">=99" in p.stderr.decode()


def test_endless_output_is_cut_at_the_log_cap(builder, tmp_path):
    """A build that prints without end fills neither the disk nor the pipe: the log stops at the cap."""
    from .conftest import run_taxiway

    bp = user_buildpack(tmp_path / "bp", "yes AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA | head -c 30000000\nexit 3")
    p = run_taxiway("build", str(app(tmp_path)), "-t", "evil/loud:1", "-b", str(bp),
                    env={**builder.env, "TAXIWAY_BUILD_LOG_MAX": "200000"}, timeout=300)
    err = p.stderr.decode()
    assert "failed to build (exit 3)" in error_line(p)
    assert "the build log reached 200000 bytes; the rest was dropped" in err
    assert len(err) < 20_000
    assert_not_exported(builder, "evil/loud:1")


def test_host_package_manager_setup_does_not_reach_the_build(builder, tmp_path):
    """The host's PIP_*/npm_config_* variables and pip.conf name host paths: a build sees none of them."""
    from .conftest import run_taxiway

    bp = user_buildpack(tmp_path / "bp", """
env | grep -i -E '^(pip_|npm_config_registry)' | sed 's/^/LEAK /' || true
ls /etc/pip.conf /etc/xdg/pip /home/cnb/.config/pip 2>/dev/null | sed 's/^/LEAK /' || true
echo probe-done
exit 7""")
    host = {"PIP_INDEX_URL": "file:///opt/pypi/simple", "PIP_FIND_LINKS": "/opt/wheels",
            "npm_config_registry": "http://127.0.0.1:9/"}
    p = run_taxiway("build", str(app(tmp_path)), "-t", "evil/hostcfg:1", "-b", str(bp),
                    env={**builder.env, **host}, timeout=300)
    err = p.stderr.decode()
    assert "failed to build (exit 7)" in error_line(p) and "probe-done" in err
    assert "LEAK" not in err


# -- 7. red-team round 2 ---------------------------------------------------------------------------


def app_layer_names(builder, tag: str) -> list[str]:
    """The entry names of the image's last layer (the app at /workspace), as the tar holds them."""
    import gzip
    import tarfile

    img = builder.image(tag)
    with img.open_blob(img.layers()[-1].digest) as f, tarfile.open(fileobj=gzip.GzipFile(fileobj=f), mode="r|") as tf:
        return [m.name for m in tf]


def test_device_node_and_fifo_in_the_source_are_skipped_never_read(builder, tmp_path):
    """/dev/zero's twin in the app would fill the host disk; a fifo would hang or crash the copy."""
    a = app(tmp_path)
    os.mknod(a / "zero", 0o666 | 0o020000, os.makedev(1, 5))  # S_IFCHR: like /dev/zero
    os.mkfifo(a / "pipe")
    (a / "sub").mkdir()
    os.mkfifo(a / "sub" / "pipe2")
    bp = user_buildpack(tmp_path / "bp", "exit 0")
    start = time.monotonic()
    p = builder("build", str(a), "-t", "evil/special:1", "-b", str(bp), "-b", "procfile", "--timeout", "60", timeout=120)
    assert time.monotonic() - start < 60
    err = p.stderr.decode()
    assert "Traceback" not in err
    warned = [x for x in err.splitlines() if "special file" in x]
    assert len(warned) == 1 and "zero" in warned[0] and "pipe" in warned[0] and "sub/pipe2" in warned[0], err
    names = app_layer_names(builder, "evil/special:1")
    assert "workspace/Procfile" in names
    assert not any(n.endswith(("/zero", "/pipe", "/pipe2")) for n in names), names


def test_project_toml_symlink_is_refused_not_followed(builder, tmp_path):
    canary = make_canary(tmp_path)
    (canary / "host.toml").write_text('[[io.buildpacks.build.env]]\nname = "HOST_LEAK"\nvalue = "CANARY-ENV-42"\n')
    before = snapshot(canary)
    a = app(tmp_path)
    (a / "project.toml").symlink_to(canary / "host.toml")
    bp = user_buildpack(tmp_path / "bp", 'cat /platform/env/HOST_LEAK 2>/dev/null || true\necho "env:${HOST_LEAK:-}"')
    p = builder("build", str(a), "-t", "evil/projlink:1", "-b", str(bp), "-b", "procfile", check=False)
    line = error_line(p)
    assert "project.toml is a symbolic link" in line
    assert "CANARY-ENV-42" not in p.stderr.decode() and "Traceback" not in p.stderr.decode()
    assert snapshot(canary) == before
    assert_not_exported(builder, "evil/projlink:1")


def test_git_label_drops_query_and_fragment_tokens(builder, tmp_path):
    a = app(tmp_path)
    _git(a, "init", "-q")
    _git(a, "remote", "add", "origin", "https://u:pw@gitlab.com/acme/app.git?private_token=glpat-SECRET789#frag")
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "x")
    builder("build", str(a), "-t", "evil/gitquery:1")
    labels = builder.image("evil/gitquery:1").config()["config"]["Labels"]
    assert labels["org.opencontainers.image.source"] == "https://gitlab.com/acme/app.git"
    dumped = json.dumps(labels)
    assert "glpat-SECRET789" not in dumped and "frag" not in dumped and "pw@" not in dumped


def test_git_label_scp_form_drops_query_too():
    from taxiway.builder.lifecycle import strip_userinfo

    assert strip_userinfo("git@gitlab.com:acme/app.git?private_token=glpat-X#f") == "git@gitlab.com:acme/app.git"
    assert strip_userinfo("https://h/x.git") == "https://h/x.git"


def _launch_bp(root: Path, launch_toml: str) -> Path:
    return user_buildpack(root, f"cat > \"$1/launch.toml\" <<'EOF'\n{launch_toml}\nEOF")


def test_buildpack_labels_cannot_replace_the_lifecycles(builder, tmp_path):
    bp = _launch_bp(tmp_path / "bp", '[[processes]]\ntype = "web"\ncommand = ["sleep", "1"]\ndefault = true\n'
                    '[[labels]]\nkey = "io.buildpacks.lifecycle.metadata"\nvalue = "FORGED-LC"\n'
                    '[[labels]]\nkey = "io.buildpacks.build.metadata"\nvalue = "FORGED-BUILD"\n'
                    '[[labels]]\nkey = "io.buildpacks.anything"\nvalue = "FORGED-OTHER"\n'
                    '[[labels]]\nkey = "com.example.ok"\nvalue = "fine"\n')
    p = builder("build", str(app(tmp_path)), "-t", "evil/labels:1", "-b", str(bp))
    labels = builder.image("evil/labels:1").config()["config"]["Labels"]
    assert "FORGED" not in json.dumps(labels)
    assert json.loads(labels["io.buildpacks.lifecycle.metadata"])["buildpacks"]
    assert "io.buildpacks.anything" not in labels and labels["com.example.ok"] == "fine"
    assert "io.buildpacks.lifecycle.metadata" in p.stderr.decode() and "reserved" in p.stderr.decode()


def test_launch_working_dir_climbing_out_is_refused_relative_is_absolutized(builder, tmp_path):
    bp = _launch_bp(tmp_path / "bp", '[[processes]]\ntype = "web"\ncommand = ["sleep", "1"]\ndefault = true\n'
                    'working-dir = "../../../tmp/x"\n')
    line = error_line(builder("build", str(app(tmp_path)), "-t", "evil/wd:1", "-b", str(bp), check=False))
    assert "working-dir" in line and "'..'" in line
    assert_not_exported(builder, "evil/wd:1")
    bp2 = _launch_bp(tmp_path / "bp2", '[[processes]]\ntype = "web"\ncommand = ["sleep", "1"]\ndefault = true\n'
                     'working-dir = "sub/dir"\n')
    builder("build", str(app(tmp_path / "b")), "-t", "evil/wd:2", "-b", str(bp2))
    assert builder.image("evil/wd:2").config()["config"]["WorkingDir"] == "/workspace/sub/dir"


def test_non_utf8_file_names_build(builder, tmp_path):
    a = app(tmp_path)
    base = os.fsencode(a)
    with open(base + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 name\n")
    os.symlink(b"caf\xe9.txt", base + b"/link\xff")
    bp = user_buildpack(tmp_path / "bp", 'mkdir -p "$1/odd"\nprintf "[types]\\nlaunch = true\\n" > "$1/odd.toml"\n'
                        'printf x > "$1/odd/$(printf "n\\377")"')
    p = builder("build", str(a), "-t", "evil/nonutf8:1", "-b", str(bp), "-b", "procfile", check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr.decode(), p.stderr.decode()[-3000:]
    names = [os.fsencode(n) for n in app_layer_names(builder, "evil/nonutf8:1")]
    assert b"workspace/caf\xe9.txt" in names and b"workspace/link\xff" in names


# -- 8. round 3: stale layers, export under --timeout and kill -9, links kept in the cache, the proxy ----------


def layer_files(builder, tag: str, member: str) -> dict[str, bytes]:
    """``member``'s content (or link target) in each layer of the image that holds it, by layer digest."""
    import gzip
    import tarfile

    img = builder.image(tag)
    out = {}
    for d in img.layers():
        with img.open_blob(d.digest) as f, tarfile.open(fileobj=gzip.GzipFile(fileobj=f), mode="r|") as tf:
            for m in tf:
                if m.name == member:
                    out[d.digest] = m.linkname.encode() if m.issym() else tf.extractfile(m).read()
    return out


def test_same_size_edit_with_mtime_put_back_is_rebuilt_app_and_layer(builder, tmp_path):
    """Reuse keyed by size+mtime shipped stale bytes: `touch -d` after a same-size edit, in the app and in a layer."""
    bp = user_buildpack(tmp_path / "bp", """
printf '[types]\\nlaunch = true\\ncache = true\\n' > "$1/c.toml"
mkdir -p "$1/c"
if [ -f "$1/c/data" ]; then printf 'SECOND' > "$1/c/data"; else printf 'FIRST!' > "$1/c/data"; fi
touch -d @1000000000 "$1/c/data"
""")
    a = app(tmp_path)
    (a / "data.txt").write_text("version-1\n")
    os.utime(a / "data.txt", (1_000_000_000, 1_000_000_000))
    builder("build", str(a), "-t", "evil/stale:1", "-b", str(bp), "-b", "procfile")
    assert list(layer_files(builder, "evil/stale:1", "workspace/data.txt").values()) == [b"version-1\n"]
    assert list(layer_files(builder, "evil/stale:1", "layers/evil_bp/c/data").values()) == [b"FIRST!"]
    (a / "data.txt").write_text("version-2\n")
    os.utime(a / "data.txt", (1_000_000_000, 1_000_000_000))
    p = builder("build", str(a), "-t", "evil/stale:1", "-b", str(bp), "-b", "procfile", "--json")
    assert list(layer_files(builder, "evil/stale:1", "workspace/data.txt").values()) == [b"version-2\n"]
    assert list(layer_files(builder, "evil/stale:1", "layers/evil_bp/c/data").values()) == [b"SECOND"]
    assert {"app", "evil_bp/c"} <= set(json.loads(p.stdout)["written"])
    # Nothing changed since: both are reused, not rewritten (the fast path still holds).
    third = json.loads(builder("build", str(a), "-t", "evil/stale:1", "-b", str(bp), "-b", "procfile", "--json").stdout)
    assert "app" in third["reused"]


def big_layer_buildpack(tmp_path: Path) -> Path:
    """A buildpack whose launch layer holds a 200 GB sparse file: seconds to make, far longer to export."""
    return user_buildpack(tmp_path / "bp", """
printf '[types]\\nlaunch = true\\n' > "$1/big.toml"
mkdir -p "$1/big"
truncate -s 200G "$1/big/sparse"
""")


def ingest_temps(builder) -> list[str]:
    return sorted(p.name for p in (builder.home / "store" / ".taxiway" / "ingest").glob("*.tmp"))


def test_timeout_covers_the_export_and_leaves_nothing_half_written(builder, tmp_path):
    """--timeout held for the steps only: writing the image after the build machine exited ran on."""
    p = builder("build", str(app(tmp_path)), "-t", "evil/slowexport:1", "-b", str(big_layer_buildpack(tmp_path)),
                "-b", "procfile", "--timeout", "30", check=False, timeout=300)
    line = error_line(p)
    assert "ran longer than 30s" in line and "while exporting" in line and "nothing was tagged" in line
    assert len(p.stderr.decode().strip().splitlines()) < 20
    assert_not_exported(builder, "evil/slowexport:1")
    assert ingest_temps(builder) == []
    assert _build_leftovers(builder.home) == ([], [])


def test_kill_9_during_export_leaves_nothing_after_the_next_build(builder, tmp_path):
    """The killed build's temp blob (its writer gone, past the grace period) is pruned by the next build's write."""
    import sys

    from taxiway.oci import store as storemod

    before = set(ingest_temps(builder))
    p = subprocess.Popen([sys.executable, "-m", "taxiway", "build", str(app(tmp_path)), "-t", "evil/killexport:1",
                          "-b", str(big_layer_buildpack(tmp_path)), "-b", "procfile"],
                         env={**os.environ, **builder.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and not set(ingest_temps(builder)) - before:
        time.sleep(0.1)
    left = set(ingest_temps(builder)) - before
    assert left, "the build never reached its export"
    p.kill()
    p.wait()
    ingest = builder.home / "store" / ".taxiway" / "ingest"
    assert {n for n in left if (ingest / n).exists()}, "kill -9 left no temp blob: nothing to test"
    old = time.time() - storemod.TEMP_GRACE - 5  # as if the grace period had passed
    for n in left:
        with contextlib.suppress(FileNotFoundError):
            os.utime(ingest / n, (old, old))
    a2 = tmp_path / "next"
    a2.mkdir()
    (a2 / "Procfile").write_text("web: sleep 1000\n")
    (a2 / "x").write_text(os.urandom(8).hex())  # a new app layer, so the next build writes a blob
    builder("build", str(a2), "-t", "evil/next:1", "-b", "procfile")
    assert not set(ingest_temps(builder)) & left
    assert_not_exported(builder, "evil/killexport:1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_build_leftovers(builder.home)):
        time.sleep(0.2)
    assert _build_leftovers(builder.home) == ([], [])


def cache_layers(builder, tag: str) -> Path:
    """The kept /layers of ``tag``'s build cache (as lifecycle.cache_dir names it)."""
    from taxiway.oci.store import normalize_name

    return builder.home / "build" / "cache" / hashlib.sha256(normalize_name(tag).encode()).hexdigest()[:20] / "layers"


def cache_links(builder, tag: str) -> dict[str, str]:
    out = {}
    root = cache_layers(builder, tag)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = os.readlink(p)
    return out


def test_links_a_build_plants_in_the_cache_do_not_stay_there(builder, tmp_path):
    """Links at host paths in /layers (a cache layer, a launch+cache layer, /layers itself) and /cache.

    The cache keeps only links that stay inside /layers; the next build never follows one on the
    host; a launch+cache layer that held one is reused from the image, link included.
    """
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    bp = user_buildpack(tmp_path / "bp", f"""
printf '[types]\\ncache = true\\n' > "$1/c.toml"
mkdir -p "$1/c/sub"
echo data > "$1/c/file"
ln -sfn {canary}/dir "$1/c/out-abs"
ln -sfn ../../../../../../../../../..{canary}/secret "$1/c/sub/out-rel"
ln -sfn /layers/evil_bp/c/file "$1/c/in-abs"
ln -sfn ../file "$1/c/sub/in-rel"
rm -f "$1/c/fifo"; mkfifo "$1/c/fifo"
ln -sfn {canary} /layers/planted
ln -sfn {canary}/dir "$1/stray"
(mkdir -p /cache && ln -sfn {canary} /cache/planted) 2>/dev/null || true
if [ ! -f "$1/lc.toml" ]; then
  printf '[types]\\nlaunch = true\\ncache = true\\n[metadata]\\nv = "1"\\n' > "$1/lc.toml"
  mkdir -p "$1/lc/bin"
  ln -sfn /usr/bin/env "$1/lc/bin/env"
fi
""")
    a = app(tmp_path)
    p = builder("build", str(a), "-t", "evil/cachelinks:1", "-b", str(bp), "-b", "procfile")
    assert "removed" in p.stderr.decode() and "from the build cache" in p.stderr.decode()
    links = cache_links(builder, "evil/cachelinks:1")
    assert links == {"evil_bp/c/in-abs": "/layers/evil_bp/c/file", "evil_bp/c/sub/in-rel": "../file"}, links
    layers = cache_layers(builder, "evil/cachelinks:1")
    assert not (layers / "evil_bp" / "c" / "fifo").exists() and not (layers / "evil_bp" / "lc").exists()
    assert (layers / "evil_bp" / "lc.toml").is_file()
    first = layer_files(builder, "evil/cachelinks:1", "layers/evil_bp/lc/bin/env")
    assert list(first.values()) == [b"/usr/bin/env"]
    builder("build", str(a), "-t", "evil/cachelinks:1", "-b", str(bp), "-b", "procfile")
    assert layer_files(builder, "evil/cachelinks:1", "layers/evil_bp/lc/bin/env") == first
    assert set(cache_links(builder, "evil/cachelinks:1")) <= {"evil_bp/c/in-abs", "evil_bp/c/sub/in-rel"}
    assert snapshot(canary) == before


def test_the_build_reaches_its_proxy_and_the_host_does_not(builder, tmp_path):
    """During a build, its egress proxy answers the build's relay; from the host its address reaches nothing of it."""
    import re
    import sys

    bp = user_buildpack(tmp_path / "bp", """
python3 - <<'PY'
import socket, os, time
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: proxy\\r\\nConnection: close\\r\\n\\r\\n")
print("PROXY-SAYS", s.recv(100).split(b"\\r\\n")[0].decode(), flush=True)
open("/layers/evil_bp/ready", "w").close()
for _ in range(600):
    if os.path.exists("/layers/evil_bp/go"):
        break
    time.sleep(0.1)
PY
exit 9
""")
    p = subprocess.Popen([sys.executable, "-m", "taxiway", "build", str(app(tmp_path)), "-t", "evil/proxy:1",
                          "-b", str(bp)], env={**os.environ, **builder.env},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = None
        deadline = time.monotonic() + 300
        while ready is None and time.monotonic() < deadline and p.poll() is None:
            found = list((builder.home / "build" / "cache").glob("*/layers/evil_bp/ready"))
            ready = found[0] if found else None
            time.sleep(0.1)
        assert ready is not None, "the build step never reached its proxy"
        logs = list((builder.home / "build" / "tmp").glob("build-*/egress.log"))
        m = next(m for lg in logs if (m := re.search(rb'"listening","address":"127\.0\.0\.1:(\d+)"', lg.read_bytes())))
        reply = b""
        try:
            # The port is the proxy's in its own namespace; on the host it is nothing (or someone else's).
            with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5) as s:
                s.sendall(b"CONNECT canary-from-host.invalid:443 HTTP/1.1\r\nHost: canary-from-host.invalid:443\r\n\r\n")
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    reply = s.recv(4096)
        except ConnectionRefusedError:
            pass
        assert b"X-Taxiway-Egress-Error" not in reply, reply  # the build's proxy would have denied it in its words
        (ready.parent / "go").write_text("")
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "PROXY-SAYS HTTP/1.1 200 OK" in err.decode()
    assert "failed to build (exit 9)" in err.decode()


# -- buildpack.toml version as a path (red team CRITICAL) ---------------------------------------


@pytest.mark.parametrize("version", ["ABS", "../../../../../../../../../..ABS", "1/../../x"])
def test_buildpack_version_cannot_place_the_buildpack_on_a_host_path(builder, tmp_path, version):
    canary = make_canary(tmp_path)
    before = snapshot(canary)
    version = version.replace("ABS", str(canary / "pwnver"))
    bp = user_buildpack(tmp_path / "bp", "true")
    (bp / "buildpack.toml").write_text(f'api = "0.10"\n[buildpack]\nid = "evil/ver"\nversion = {json.dumps(version)}\n')
    line = error_line(builder("build", str(app(tmp_path)), "-b", str(bp), "-t", "evil/ver:1", check=False))
    assert "version" in line and "invalid" in line
    assert snapshot(canary) == before and not (canary / "pwnver").exists()
    assert not list((builder.home / "build" / "buildpacks").glob("*/evil_ver/x")) if (builder.home / "build" / "buildpacks").exists() else True
    assert_not_exported(builder, "evil/ver:1")


# -- cache poisoning (red team MEDIUM) ------------------------------------------------------------

_PLANT = """
if [ -f "$1/c/trojan" ]; then echo "warning: CACHE-BACK"; fi
printf '[types]\\ncache = true\\n' > "$1/c.toml"
mkdir -p "$1/c"; echo TROJAN > "$1/c/trojan"
printf '[types]\\nlaunch = true\\n[metadata]\\nv = "1"\\n' > "$1/l.toml"
mkdir -p "$1/l"; echo TROJAN > "$1/l/trojan"
"""


def test_a_buildpack_never_sees_or_reuses_another_ones_cache(builder, tmp_path):
    """Same image, same id with other content, or another id: no cache folder, no kept layer is shared."""
    a = app(tmp_path)
    tag = "evil/poison:1"
    one = user_buildpack(tmp_path / "one", _PLANT, bp_id="me/a")
    p = builder("build", str(a), "-t", tag, "-b", str(one), "-b", "procfile")
    assert "CACHE-BACK" not in p.stderr.decode()
    # Another buildpack claiming the same id: it gets an empty folder of its own, and writing the same
    # <layer>.toml without content does not hand it the first one's image layer.
    same_id = user_buildpack(tmp_path / "two", """
if [ -e "$1/c" ] || [ -e "$1/c.toml" ] || [ -e "$1/l.toml" ]; then echo "error: SAW-POISON"; exit 3; fi
printf '[types]\\nlaunch = true\\n[metadata]\\nv = "1"\\n' > "$1/l.toml"
""", bp_id="me/a")
    line = error_line(builder("build", str(a), "-t", tag, "-b", str(same_id), "-b", "procfile", check=False))
    assert "SAW-POISON" not in line and "no previous image layer to reuse" in line
    # Another id in the same image's cache sees no other buildpack's folder at all.
    other = user_buildpack(tmp_path / "three", """
if ls -A /layers | grep -q 'me_a'; then echo "error: SAW-OTHER $(ls -A /layers)"; exit 3; fi
""", bp_id="me/b")
    builder("build", str(a), "-t", tag, "-b", str(other), "-b", "procfile")
    # The first buildpack still gets its own cache back.
    p = builder("build", str(a), "-t", tag, "-b", str(one), "-b", "procfile")
    assert "CACHE-BACK" in p.stderr.decode()


# -- copying the source and -b buildpacks by fds (red team MEDIUM) ------------------------------


def test_fifo_in_a_buildpack_is_skipped_and_a_deep_source_is_one_clear_error(builder, tmp_path):
    bp = user_buildpack(tmp_path / "bp", "true", bp_id="me/fifo")
    os.mkfifo(bp / "pipe")
    a = app(tmp_path)
    p = builder("build", str(a), "-t", "evil/fifo:1", "-b", str(bp), "-b", "procfile")
    assert "skipped 1 special file(s) in buildpack me/fifo" in p.stderr.decode() and "Traceback" not in p.stderr.decode()
    from .test_units import make_deep, remove_deep

    make_deep(a)
    try:
        line = error_line(builder("build", str(a), "-t", "evil/deep:1", "-b", "procfile", check=False))
    finally:
        remove_deep(a)
    assert "nested deeper than" in line
    assert_not_exported(builder, "evil/deep:1")


# -- git metadata (red team LOW) ------------------------------------------------------------------


def test_git_continuation_comment_and_nested_git_dirs_leak_no_token(builder, tmp_path):
    a = app(tmp_path)
    _git(a, "init", "-q")
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "x")
    cfg = a / ".git" / "config"
    cfg.write_text(cfg.read_text() + '[remote "origin"]\n\turl = https://u:SECRET1\\\n@example.invalid/x ; SECRET2\n')
    (a / "vendor" / "lib" / ".git").mkdir(parents=True)
    (a / "vendor" / "lib" / ".git" / "config").write_text('[remote "origin"]\n\turl = https://u:SECRET3@h/x\n')
    (a / "vendor" / "lib" / "x.py").write_text("x = 1\n")
    (a / ".git-credentials").write_text("https://u:SECRET4@example.invalid\n")
    builder("build", str(a), "-t", "evil/gitcont:1")
    labels = builder.image("evil/gitcont:1").config()["config"]["Labels"]
    assert labels["org.opencontainers.image.source"] == "https://example.invalid/x"
    assert "SECRET" not in json.dumps(labels)
    names = app_layer_names(builder, "evil/gitcont:1")
    assert "workspace/vendor/lib/x.py" in names
    assert not [n for n in names if "/.git" in n], names


# -- build output on the operator's terminal (red team LOW) --------------------------------------


def test_build_output_cannot_drive_the_operators_terminal(builder, tmp_path):
    bp = user_buildpack(tmp_path / "bp", r"""
printf 'warning: \033]0;PWNED-TITLE\007\033[2J\033[Hcleared\n'
printf 'line \033[31mred\033[0m\r\n'
head -c 10000 /dev/zero | tr '\0' x
printf '\033]0;PWNED\007END\n'
exit 7
""", bp_id="me/tty")
    p = builder("build", str(app(tmp_path)), "-t", "evil/tty:1", "-b", str(bp), check=False)
    err = p.stderr.decode()
    assert not any(c in err for c in "\x1b\x07\x9b\r"), repr(err[-500:])
    assert "warning: cleared" in err and "  | line red" in err
    line = error_line(p)
    assert line.endswith("END; nothing was exported; fix the error (the end of the build log is above) and build again")
    assert len(line) < 2400
    assert_not_exported(builder, "evil/tty:1")
