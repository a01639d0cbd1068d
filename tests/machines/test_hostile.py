"""A hostile image, run as a namespace machine: every probe that reached the host must be refused.

Each probe is aimed at something the test owns (a loop device it attaches over a temp
file, a canary directory under tmp, a session keyring of its own), so even a runtime
that lets it through changes nothing of the host's. The last test runs the same probes
under podman (runc) to show taxiway is at least as strict.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.layout import Entry

from machines.conftest import host_state, make_image, tw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory) -> bytes:
    """tests/machines/hostile_probe.c, built static with gcc."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the hostile probe (apt-get install gcc)")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(HERE / "hostile_probe.c")], check=True)
    return out.read_bytes()


@pytest.fixture
def canary(tmp_path) -> Path:
    """A host directory no machine may write into."""
    d = tmp_path / "canary"
    d.mkdir()
    return d


@pytest.fixture
def hostile(taxiway_home, tmp_path, probe_binary, canary) -> str:
    """busybox + /probe + ``/data -> <canary>`` (an absolute host path as a symlink in the image)."""
    return make_image(tmp_path, "localhost/hostile:1", [[
        Entry("probe", "file", probe_binary, mode=0o755),
        Entry("data", "symlink", linkname=str(canary)),
    ]])


def facts(r: subprocess.CompletedProcess) -> dict[str, str]:
    out = {}
    for line in r.stdout.decode().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


@pytest.fixture
def loopdev(tmp_path):
    """A loop device over a temp file (never the host's own): (path, major, minor, backing file)."""
    backing = tmp_path / "disk.img"
    backing.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True).stdout.strip()
    st = os.stat(dev)
    try:
        yield dev, os.major(st.st_rdev), os.minor(st.st_rdev), backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# -- 1. device nodes -----------------------------------------------------------------------------


def test_device_nodes_refused(hostile, loopdev, canary):
    dev, major, minor, backing = loopdev
    probe = f"mknod-write:/tmp/d:b:{major}:{minor}"
    r = tw("run", "--rm", hostile, "/probe", probe)
    f = facts(r)
    assert f["mknod"] == "EPERM", (r.stdout, r.stderr)  # CAP_MKNOD is not in the default set
    assert "write" not in f
    # even with CAP_MKNOD (asked for), the device policy allows no block device to be opened
    r = tw("run", "--rm", "--cap-add", "MKNOD", hostile, "/probe", probe, "mknod-write:/tmp/k:c:1:11")
    lines = r.stdout.decode().splitlines()
    assert lines == ["mknod=ok", "open=EPERM", "mknod=ok", "open=EPERM"], (r.stdout, r.stderr)
    with open(backing, "rb") as fh:
        assert fh.read(1) == b"\0"  # the loop device's disk was never written
    # the nodes Docker allows still work
    r = tw("run", "--rm", "--cap-add", "MKNOD", hostile, "/probe", "mknod-write:/tmp/n:c:1:3", "open-write:/dev/null")
    assert r.stdout.decode().splitlines() == ["mknod=ok", "open=ok", "write=ok", "open=ok"], (r.stdout, r.stderr)


def test_device_program_on_cgroup_v2(hostile, loopdev, monkeypatch):
    """The v2 path (a pure v2 host, or this host's unified mount): the same policy as an eBPF program."""
    dev, major, minor, backing = loopdev
    root = "/sys/fs/cgroup" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "/sys/fs/cgroup/unified"
    monkeypatch.setenv("TAXIWAY_CGROUP_ROOT", root)
    r = tw("run", "--rm", "--cap-add", "MKNOD", hostile, "/probe", f"mknod-write:/tmp/d:b:{major}:{minor}",
           "mknod-write:/tmp/n:c:1:3", "open-write:/dev/full")
    # EPERM is the program's answer (a nodev mount would say EACCES); the allowed node opens anywhere
    assert r.stdout.decode().splitlines() == ["mknod=ok", "open=EPERM", "mknod=ok", "open=ok", "write=ok", "open=ok"], \
        (r.stdout, r.stderr)
    with open(backing, "rb") as fh:
        assert fh.read(1) == b"\0"


# -- 2. inherited file descriptors ---------------------------------------------------------------


LEAK = 63  # the fd number the probes look for (free in the test process: checked)


def _leak_fd(canary: Path) -> int:
    """``canary`` opened at fd LEAK (as `exec 63<dir` in a shell would leave it)."""
    with contextlib.suppress(OSError):
        os.fstat(LEAK)
        pytest.fail(f"fd {LEAK} is in use in the test process")
    fd = os.open(canary, os.O_RDONLY | os.O_DIRECTORY)
    os.dup2(fd, LEAK, inheritable=True)
    os.close(fd)
    return LEAK


def _with_fd(canary: Path, *args: str, timeout: float = 60, argv: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI (or ``argv``) with fd LEAK open on ``canary``."""
    fd = _leak_fd(canary)
    try:
        return subprocess.run(argv or [sys.executable, "-m", "taxiway", *args], capture_output=True,
                              timeout=timeout, env=dict(os.environ), pass_fds=(fd,))
    finally:
        os.close(fd)


def test_inherited_fds_closed_in_every_entry_path(hostile, canary, taxiway_home):
    r = _with_fd(canary, "run", "--rm", hostile, "/probe", "fd-write:63")
    assert facts(r)["fdwrite"] == "ENOENT", (r.stdout, r.stderr)
    r = _with_fd(canary, "run", "-d", "--name", "fd", "--restart", "on-failure:1", hostile, "sh", "-c",
                 "ls /proc/self/fd > /tmp/fds.$$; /probe fd-write:63; sleep 1; exit 1")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the first run and the restart
        m = json.loads(tw("machines", "inspect", "fd").stdout)[0]
        if m["restarts"] >= 1 and m["state"] == "exited":
            break
        time.sleep(0.2)
    logs = tw("machines", "logs", "fd").stdout.decode()
    assert logs.count("fdwrite=ENOENT") == 2, logs
    tw("machines", "rm", "-f", "fd")
    r = tw("run", "-d", "--name", "ex", hostile, "sleep", "60")
    assert r.returncode == 0, r.stderr
    r = _with_fd(canary, "machines", "exec", "ex", "/probe", "fd-write:63")
    assert facts(r)["fdwrite"] == "ENOENT", (r.stdout, r.stderr)
    r = _with_fd(canary, "machines", "exec", "ex", "ls", "/proc/self/fd")
    assert sorted(r.stdout.decode().split()) == ["0", "1", "2", "3"], r.stdout  # 3: ls's own directory fd
    tw("machines", "rm", "-f", "ex")
    assert list(canary.iterdir()) == []


# -- 3. keyrings -----------------------------------------------------------------------------------

_KEYRING_HELPER = r"""
import ctypes, subprocess, sys, os
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(250, 1, None) > 0                      # join a new session keyring: ours alone
assert libc.syscall(248, b"user", b"taxiway-canary", b"secret", 6, -3) > 0
r = subprocess.run([sys.executable, "-m", "taxiway", *sys.argv[1:]], capture_output=True)
sys.stdout.write(r.stdout.decode())
found = libc.syscall(250, 10, -3, b"user", b"taxiway-inside", 0)
print("host_sees_inside_key=" + ("yes" if found > 0 else "no"))
"""


def test_keyrings_not_shared(hostile):
    def run(*args: str) -> dict[str, str]:
        r = subprocess.run([sys.executable, "-c", _KEYRING_HELPER, "run", "--rm", *args, hostile, "/probe", "keyring",
                            "add-key"], capture_output=True, timeout=60, env=dict(os.environ))
        return facts(r) | {"stderr": r.stderr.decode()}

    f = run()
    assert (f["keyctl"], f["search"], f["add_key"]) == ("EPERM", "EPERM", "EPERM"), f  # seccomp: no keyctl at all
    assert f["host_sees_inside_key"] == "no"
    # even without seccomp, the machine has a session keyring of its own: the host's key is not in it
    f = run("--security-opt", "seccomp=unconfined")
    assert f["keyctl"] == "ok" and f["search"] == "ENOKEY", f
    assert f["host_sees_inside_key"] == "no", f


# -- 4. cgroup namespace --------------------------------------------------------------------------


def test_machine_has_own_group_in_every_hierarchy(hostile, taxiway_home):
    from taxiway.machines import cgroups

    r = tw("run", "-d", "--name", "cg", hostile, "sleep", "60")
    assert r.returncode == 0, r.stderr
    try:
        m = json.loads(tw("machines", "inspect", "cg").stdout)[0]
        lines = Path(f"/proc/{m['pid']}/cgroup").read_text().splitlines()
        parent = cgroups.parent_name()
        outside = [ln for ln in lines if f"/{parent}/{m['id']}" not in ln]
        assert outside == [], outside  # freezer, cpuset, devices, name=systemd...: all the machine's own
        pids = Path(f"/sys/fs/cgroup/pids/{parent}/{m['id']}/pids.max")
        if pids.exists():
            assert pids.read_text().strip() == "2048"  # podman's default task limit
    finally:
        tw("machines", "rm", "-f", "cg")


def test_cgroup_escape_through_user_namespace(hostile):
    r = tw("run", "--rm", hostile, "/probe", "cgroup-escape:/tmp/cg")
    assert facts(r)["unshare"] == "EPERM", (r.stdout, r.stderr)  # no user namespaces by default
    # unconfined, a user namespace is possible, but the cgroup namespace is rooted at the machine's own group
    r = tw("run", "--rm", "--security-opt", "seccomp=unconfined", hostile, "/probe", "cgroup-escape:/tmp/cg")
    f = facts(r)
    if f.get("mount") == "ok":
        assert f["groups"] == "0", (r.stdout, r.stderr)  # the host's groups are not visible


# -- 5. seccomp -----------------------------------------------------------------------------------


def test_seccomp_default_profile(hostile, tmp_path):
    r = tw("run", "--rm", hostile, "sh", "-c", "grep Seccomp: /proc/self/status | tr -d '\\t '; /probe syscalls")
    f = facts(r)
    assert r.stdout.decode().startswith("Seccomp:2\n"), r.stdout
    for name in ("bpf", "perf_event_open", "io_uring_setup", "keyctl", "add_key", "unshare_user"):
        assert f[name] == "EPERM", (name, r.stdout)
    r = tw("run", "--rm", "--security-opt", "seccomp=unconfined", hostile, "grep", "Seccomp:", "/proc/self/status")
    assert r.stdout.decode().split() == ["Seccomp:", "0"]
    # a custom profile in Docker's format: everything allowed but mkdir
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}))
    r = tw("run", "--rm", "--security-opt", f"seccomp={prof}", hostile, "sh", "-c", "mkdir /tmp/x; echo rc=$?")
    assert "rc=1" in r.stdout.decode() and "Permission denied" in r.stderr.decode(), (r.stdout, r.stderr)
    for bad, what in (("seccomp=/nonexistent.json", "cannot read seccomp profile"), ("apparmor=x", "unsupported")):
        r = tw("run", "--rm", "--security-opt", bad, hostile, "true")
        err = r.stderr.decode()
        assert r.returncode != 0 and what in err and err.count("\n") == 1, err


def test_capabilities_add_and_drop(hostile):
    def capeff(*opts: str) -> str:
        r = tw("run", "--rm", *opts, hostile, "grep", "CapEff", "/proc/self/status")
        assert r.returncode == 0, r.stderr
        return r.stdout.decode().split()[1]

    assert capeff() == "00000000a00425fb"  # Docker's set without CAP_MKNOD
    assert capeff("--cap-add", "MKNOD") == "00000000a80425fb"  # Docker's set
    assert capeff("--cap-drop", "ALL") == "0000000000000000"
    assert capeff("--cap-drop", "ALL", "--cap-add", "cap_chown") == "0000000000000001"
    assert capeff("-u", "1000") == "0000000000000000"  # a non-root user gets none (Docker's rule)
    r = tw("run", "--rm", "-u", "1000", hostile, "grep", "CapBnd", "/proc/self/status")
    assert r.stdout.decode().split()[1] == "00000000a00425fb"


# -- 7. directories made before the symlink check ---------------------------------------------------


def test_volume_target_resolved_inside_root(hostile, canary, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "hello").write_text("hi\n")
    r = tw("run", "--rm", "-v", f"{vol}:/data/x/y", hostile, "cat", "/data/x/y/hello")
    assert list(canary.iterdir()) == []  # nothing made on the host through the image's symlink
    assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr  # /data -> <canary> followed inside the root


@pytest.mark.parametrize("target,leads_to", [("/procl/sys", "/proc/sys"), ("/devl/shm", "/dev/shm"),
                                              ("/devl/init", "/dev/init"), ("/devl", "/dev"), ("/procl", "/proc")])
def test_reserved_target_through_image_symlink(tmp_path, taxiway_home, target, leads_to):
    """``-v DIR:/procl/sys`` with ``/procl -> /proc`` in the image is /proc/sys: refused as that is."""
    image = make_image(tmp_path, "localhost/links:1", [[Entry("procl", "symlink", linkname="/proc"),
                                                        Entry("devl", "symlink", linkname="dev")]])
    vol = tmp_path / "vol"
    vol.mkdir()
    r = tw("run", "--rm", "-v", f"{vol}:{target}", image, "true")
    err = r.stderr.decode()
    assert r.returncode != 0 and f"volume target {target} is reserved: in the image it leads to {leads_to}" in err, err
    assert err.count("\n") == 1, err
    assert host_state(taxiway_home)["machines"] == []


@pytest.mark.parametrize("links", [
    [Entry("etc/passwd", "symlink", linkname="{host}/passwd"), Entry("etc/group", "symlink", linkname="{host}/group")],
    [Entry("etc", "symlink", linkname="{host}")],  # the whole /etc: replaces busybox's directory
])
def test_user_lookup_never_reads_host_files(tmp_path, taxiway_home, links):
    """``-u NAME`` is looked up in the image's /etc/passwd: an image whose passwd (or /etc) is a
    symlink to a host path must not make the runtime read the host's file (a canary here)."""
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "passwd").write_text("canary:x:4242:4242::/:/bin/sh\n")
    (host / "group").write_text("canary:x:4242:\n")
    layer = [Entry(e.name, e.type, linkname=e.linkname.format(host=host)) for e in links]
    if links[0].name == "etc":
        layer.insert(0, Entry(".wh.etc", "file"))  # the upper layer's /etc replaces the base's
    image = make_image(tmp_path, "localhost/passwd-link:1", [layer])
    r = tw("run", "--rm", "-u", "canary", image, "id", "-u")
    assert r.returncode != 0 and b"4242" not in r.stdout, (r.stdout, r.stderr)
    assert r.stderr.startswith(b"error: ") and b"canary" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    assert host_state(taxiway_home)["machines"] == []


# -- 8. small ones ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,what", [
    (["-v", "{vol}:/proc"], "volume target /proc is reserved"),
    (["-v", "{vol}:/sys/x"], "volume target /sys/x is reserved"),
    (["-v", "{vol}:/dev/init"], "volume target /dev/init is reserved"),
    (["-w", "/etc/passwd"], "working directory /etc/passwd is not a directory"),
    (["--hostname", "h" * 100], "invalid hostname"),
    (["--memory", "99999t"], "is more than this host has"),
    (["--cap-add", "NOPE"], "unknown capability"),
])
def test_bad_input_is_one_line(hostile, tmp_path, taxiway_home, args, what):
    vol = tmp_path / "v"
    vol.mkdir(exist_ok=True)
    r = tw("run", "--rm", *[a.format(vol=vol) for a in args], hostile, "true")
    err = r.stderr.decode()
    assert r.returncode != 0 and what in err, err
    assert err.count("\n") == 1 and "Error:" not in err and "Traceback" not in err, err
    assert host_state(taxiway_home)["machines"] == []


# -- the same probes under podman ---------------------------------------------------------------------


def test_at_least_as_strict_as_podman(hostile, tmp_path, loopdev, canary, taxiway_home):
    if shutil.which("podman") is None:
        pytest.fail("podman is needed for the comparison (apt-get install podman)")
    dev, major, minor, backing = loopdev
    layout = next(tmp_path.glob("layout-localhost_hostile_1"))
    short = Path(tempfile.mkdtemp(prefix="twpod"))  # podman wants a runroot under 50 characters
    root, runroot = tmp_path / "podman-root", short / "run"
    pod = ["podman", "--root", str(root), "--runroot", str(runroot), "--storage-driver", "vfs"]
    r = subprocess.run([*pod, "pull", "-q", f"oci:{layout}:t"], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    image = subprocess.run([*pod, "images", "-q"], capture_output=True, text=True, check=True).stdout.split()[0]
    probes = [f"mknod-write:/tmp/d:b:{major}:{minor}", "syscalls", "cgroup-escape:/tmp/cg", "fd-write:63"]
    try:
        theirs = facts(_with_podman(pod, canary, image, probes))
    finally:
        subprocess.run([*pod, "rm", "-af"], capture_output=True)
        subprocess.run([*pod, "rmi", "-af"], capture_output=True)
        subprocess.run(["umount", "-R", str(root)], capture_output=True)
        shutil.rmtree(short, ignore_errors=True)
    ours = facts(_with_fd(canary, "run", "--rm", hostile, "/probe", *probes))
    assert theirs and ours
    for k, v in theirs.items():
        if v != "ok":  # what podman refuses, taxiway refuses too
            assert ours.get(k, "missing") != "ok", (k, ours, theirs)
    refused = {k for k, v in ours.items() if v != "ok"}
    assert {"mknod", "bpf", "keyctl", "add_key", "unshare_user", "unshare", "fdwrite"} <= refused, ours
    with open(backing, "rb") as fh:
        assert fh.read(1) == b"\0"
    assert list(canary.iterdir()) == []


def _with_podman(pod: list[str], canary: Path, image: str, probes: list[str]) -> subprocess.CompletedProcess:
    return _with_fd(canary, argv=[*pod, "run", "--rm", "--net", "none", image, "/probe", *probes], timeout=300)


# -- 9. other users of the host ----------------------------------------------------------------------


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, timeout=30)


def test_other_users_reach_nothing_under_taxiway_home(tmp_path, monkeypatch):
    """$TAXIWAY_HOME where anyone may walk (as /var/lib/taxiway): an image's setuid file and device
    node in a snapshot, and a setuid file a machine made in its writable layer, stay out of reach
    of every other user. Directories an older taxiway left 0755 are tightened on the next start."""
    home = Path(tempfile.mkdtemp(prefix="tw-home-", dir="/tmp"))  # pytest's tmp is 0700: not this case
    try:
        home.chmod(0o755)
        for d in ("machines", "snapshots"):
            (home / d).mkdir()
            (home / d).chmod(0o755)
        monkeypatch.setenv("TAXIWAY_HOME", str(home))
        monkeypatch.setenv("TAXIWAY_CONFIG", str(tmp_path / "config"))
        image = make_image(tmp_path, "localhost/suid:1", [[
            Entry("rootsh", "file", b"#!/bin/sh\n", mode=0o4755),
            Entry("disk", "blk", devmajor=7, devminor=0, mode=0o666),
        ]])
        r = tw("run", "-d", "--name", "k9", image, "sh", "-c",
               "cp /bin/busybox /tmp/r2 && chmod 4755 /tmp/r2 && touch /tmp/ready && sleep 60")
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 30
        while not list(home.glob("machines/*/upper/tmp/ready")) and time.time() < deadline:
            time.sleep(0.05)
        r2 = next(home.glob("machines/*/upper/tmp/r2"))
        layer = next(p for p in home.glob("snapshots/layers/*/fs") if (p / "rootsh").exists())
        assert (layer / "rootsh").stat().st_mode & 0o4000 and r2.stat().st_mode & 0o4000  # the bait is there
        assert _as_nobody("stat", str(home)).returncode == 0  # the home itself is walkable: the case at hand
        for p in (layer / "rootsh", layer / "disk", r2, r2.parent, home / "snapshots/layers", home / "machines/.mnt"):
            r = _as_nobody("stat", str(p))
            assert r.returncode != 0 and b"Permission denied" in r.stderr, (p, r.stdout, r.stderr)
        for d in ("machines", "snapshots"):
            assert (home / d).stat().st_mode & 0o777 == 0o700, d
    finally:
        tw("machines", "rm", "-f", "k9")
        shutil.rmtree(home, ignore_errors=True)


# -- 10. signals to the host side ----------------------------------------------------------------------


def test_kill_zero_stays_inside(busybox, taxiway_home):
    """`kill -TERM 0` inside reaches only the machine: PID 1 and every exec lead sessions of their own."""
    prog = 'trap "" TERM; kill -TERM 0; echo alive; cut -d" " -f5,6 /proc/$$/stat /proc/1/stat'
    r = subprocess.run([sys.executable, "-m", "taxiway", "run", "--rm", busybox, "sh", "-c", prog],
                       capture_output=True, timeout=60, start_new_session=True)
    lines = r.stdout.decode().split("\n")
    assert r.returncode == 0 and lines[0] == "alive", (r.returncode, r.stdout, r.stderr)
    assert lines[2] == "1 1", r.stdout  # PID 1: its own group and session (0 0 when they were the CLI's)
    assert tw("run", "-d", "--name", "k9", busybox, "sleep", "60").returncode == 0
    try:
        r = subprocess.run([sys.executable, "-m", "taxiway", "machines", "exec", "k9", "sh", "-c", prog],
                           capture_output=True, timeout=60, start_new_session=True)
        lines = r.stdout.decode().split("\n")
        assert r.returncode == 0 and lines[0] == "alive", (r.returncode, r.stdout, r.stderr)
        pgid, sid = lines[1].split()
        assert pgid == sid != "0", r.stdout
    finally:
        tw("machines", "rm", "-f", "k9")


def test_ctrl_c_still_reaches_run_and_exec(busybox, taxiway_home):
    """With the machine in its own session, SIGINT (a Ctrl-C) and SIGHUP to the CLI are forwarded."""
    import signal

    def interrupted(*args: str, sig: int = signal.SIGINT) -> int:
        p = subprocess.Popen([sys.executable, "-m", "taxiway", *args, "sh", "-c", "echo up; sleep 30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert p.stdout.readline() == b"up\n"
        t0 = time.time()
        p.send_signal(sig)
        code = p.wait(timeout=20)
        assert time.time() - t0 < 10
        return code

    assert interrupted("run", "--rm", busybox) == 130
    assert tw("run", "-d", "--name", "k9", busybox, "sleep", "60").returncode == 0
    try:
        assert interrupted("machines", "exec", "k9") == 130
        assert interrupted("machines", "exec", "k9", sig=signal.SIGHUP) == 129  # a closed terminal ends it
        r = tw("machines", "exec", "k9", "ps")
        assert b"sleep 30" not in r.stdout, r.stdout  # nothing left behind
    finally:
        tw("machines", "rm", "-f", "k9")
