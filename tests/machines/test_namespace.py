"""The namespace runtime end to end, through the real CLI, as root on this host."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from helpers.layout import Entry

from machines.conftest import host_state, make_image, tw

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root")


def out(r) -> str:
    return r.stdout.decode()


def inspect(name: str) -> dict:
    r = tw("machines", "inspect", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def test_runs_command_and_returns_exit_code(busybox, taxiway_home):
    r = tw("run", "--rm", busybox, "echo", "hello", "from", "a", "machine")
    assert r.returncode == 0, r.stderr
    assert out(r) == "hello from a machine\n"
    assert tw("run", "--rm", busybox, "sh", "-c", "exit 7").returncode == 7
    assert host_state(taxiway_home)["machines"] == []


def test_image_config_semantics(tmp_path, taxiway_home):
    img = make_image(tmp_path, "localhost/cfg:1", [[Entry("srv", "dir"), Entry("srv/app", "dir"),
                                                    Entry("srv/app/hello.txt", "file", b"hi\n")]],
                     config={"Entrypoint": ["/bin/echo", "ep"], "Cmd": ["default", "cmd"], "WorkingDir": "/srv/app",
                             "Env": ["PATH=/bin", "GREETING=from-image"], "User": "app", "StopSignal": "SIGUSR1"})
    assert out(tw("run", "--rm", img)) == "ep default cmd\n"
    assert out(tw("run", "--rm", img, "replaced")) == "ep replaced\n"
    r = tw("run", "--rm", "--entrypoint", "/bin/sh", img, "-c", 'pwd; id -u; echo "$GREETING|$HOME"; cat hello.txt')
    assert out(r) == "/srv/app\n1000\nfrom-image|/home/app\nhi\n", (r.stdout, r.stderr)
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nEXTRA=from-file\n")
    r = tw("run", "--rm", "--env-file", str(env_file), "-e", "GREETING=from-cli", "-u", "root", "-w", "/tmp",
           "--entrypoint", "", img, "sh", "-c", 'pwd; id -u; echo "$GREETING $EXTRA"')
    assert out(r) == "/tmp\n0\nfrom-cli from-file\n", r.stderr
    r = tw("run", "-d", "--name", "sig", "--entrypoint", "/bin/sh", img, "-c",
           "trap 'echo got usr1; exit 3' USR1; while true; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    assert tw("machines", "stop", "sig").returncode == 0
    m = inspect("sig")
    assert (m["exit_code"], m["reason"]) == (3, "stopped")
    assert out(tw("machines", "logs", "sig")) == "got usr1\n"
    assert tw("machines", "rm", "sig").returncode == 0


def test_isolation_from_inside(busybox, tmp_path, taxiway_home):
    script = """
    set -u
    echo "procs=$(ls /proc | grep -c '^[0-9]')"
    echo "maxpid=$(ls /proc | grep '^[0-9]' | sort -n | tail -n 1)"
    echo "pid1=$(cat /proc/1/cmdline | tr '\\0\\n' '  ' | cut -c1-20)"
    echo "host=$(hostname)"
    mkdir -p /mnt/x; if mount -t tmpfs none /mnt/x 2>/dev/null; then echo mount=ok; else echo mount=denied; fi
    if echo 1 > /proc/sys/kernel/hostname 2>/dev/null; then echo procsys=rw; else echo procsys=ro; fi
    if echo x > /dev/init 2>/dev/null; then echo init=written; else echo init=protected; fi
    if cp /bin/busybox /dev/init 2>/dev/null; then echo initcp=written; else echo initcp=protected; fi
    if touch /sys/x 2>/dev/null; then echo sys=rw; else echo sys=ro; fi
    echo "caps=$(grep CapEff /proc/self/status | cut -f2)"
    echo "nnp=$(grep NoNewPrivs /proc/self/status | cut -f2)"
    echo "ifaces=$(ls /sys/class/net | tr '\\n' ' ')"
    echo "dev=$(ls /dev | tr '\\n' ' ')"
    echo changed > /bin/echo-me; rm /bin/cat; echo ok > /etc/passwd
    """
    tini = Path("/usr/bin/tini-static").read_bytes()
    r = tw("run", "--rm", "--hostname", "inside", busybox, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    facts = dict(line.split("=", 1) for line in out(r).splitlines())
    assert int(facts["procs"]) <= 6 and int(facts["maxpid"]) < 20  # init, sh, the pipeline: no host process
    assert facts["pid1"].startswith("/dev/init -- sh")
    assert facts["host"] == "inside"
    assert facts["mount"] == "denied"
    assert facts["procsys"] == "ro"
    assert facts["init"] == facts["initcp"] == "protected"
    assert facts["sys"] == "ro"
    assert facts["caps"] == "00000000a00425fb"  # Docker's default set without CAP_MKNOD
    assert facts["nnp"] == "1"
    assert facts["ifaces"].split() == ["lo"]
    assert set(facts["dev"].split()) <= {"core", "fd", "full", "init", "mqueue", "null", "ptmx", "pts", "random",
                                         "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}
    assert Path("/usr/bin/tini-static").read_bytes() == tini
    # the image's layers are unchanged by the writes above
    layers = list((taxiway_home / "snapshots/layers").iterdir())
    assert len(layers) == 1
    fs = layers[0] / "fs"
    assert (fs / "bin/cat").is_symlink() and not (fs / "bin/echo-me").exists()
    assert (fs / "etc/passwd").read_text().startswith("root:x:0:0")
    assert out(tw("run", "--rm", busybox, "cat", "/etc/passwd")).startswith("root:x:0:0")


def test_memory_hog_is_oom_killed_and_reported(busybox, taxiway_home):
    r = tw("run", "--name", "hog", "--memory", "24m", busybox, "sh", "-c",
           'x=$(head -c 300000000 /dev/zero | tr "\\0" a); echo survived')
    assert r.returncode == 137
    assert b"survived" not in r.stdout
    m = inspect("hog")
    assert (m["exit_code"], m["reason"], m["state"]) == (137, "oom-killed", "exited")
    assert "oom-killed" in out(tw("machines", "ls", "-a"))
    tw("machines", "rm", "hog")
    assert host_state(taxiway_home)["cgroups"] == []


def test_fork_bomb_stops_at_pids_limit(busybox, taxiway_home):
    t0 = time.monotonic()
    r = tw("run", "--rm", "--pids-limit", "40", busybox, "sh", "-c",
           "b() { b | b & }; b 2>/dev/null; sleep 1; echo host-still-fine", timeout=60)
    assert time.monotonic() - t0 < 30
    assert b"host-still-fine" in r.stdout
    assert r.returncode == 0
    assert host_state(taxiway_home)["procs"] == []


def test_detach_logs_exec_stop_start_wait_rm(busybox, taxiway_home):
    r = tw("run", "-d", "--name", "svc", busybox, "sh", "-c", "echo up; echo err >&2; exec sleep 1000")
    assert r.returncode == 0, r.stderr
    mid = out(r).strip()
    assert len(mid) == 14
    ls = json.loads(out(tw("machines", "ls", "--json")))
    assert [m["name"] for m in ls] == ["svc"] and ls[0]["state"] == "running"
    time.sleep(0.2)
    lg = tw("machines", "logs", "svc")
    assert lg.stdout == b"up\n" and lg.stderr == b"err\n"
    ts = out(tw("machines", "logs", "-t", "svc")).split()
    assert ts[0].endswith("Z") and ts[1] == "up"
    r = tw("machines", "exec", "svc", "sh", "-c", "ps -o pid,comm | grep -c sleep; hostname; id -u")
    assert r.returncode == 0, r.stderr
    assert out(r).splitlines() == ["1", mid[:12], "0"]
    assert tw("machines", "exec", "svc", "sh", "-c", "exit 5").returncode == 5
    assert tw("machines", "rm", "svc").returncode == 2  # running: refuses without -f
    assert tw("machines", "stop", "-t", "1", "svc").returncode == 0
    m = inspect("svc")
    assert m["state"] == "exited" and m["reason"] == "stopped"
    assert tw("machines", "start", "svc").returncode == 0
    assert inspect("svc")["state"] == "running"
    assert tw("machines", "exec", "svc", "true").returncode == 0
    tw("machines", "stop", "--signal", "KILL", "svc")
    w = tw("machines", "wait", "svc")
    assert out(w).strip() == "137"
    types = [e["type"] for e in json.loads(out(tw("machines", "inspect", "svc")))[0]["events"]]
    assert types.count("running") == 2 and "stopping" in types
    assert tw("machines", "rm", "svc").returncode == 0
    st = host_state(taxiway_home)
    assert st["machines"] == [] and st["cgroups"] == [] and st["procs"] == [] and st["leases"] == []


def test_logs_follow_until_exit(busybox, taxiway_home):
    r = tw("run", "-d", "--name", "talker", busybox, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.3; done")
    assert r.returncode == 0, r.stderr
    f = tw("machines", "logs", "-f", "talker", timeout=60)
    assert f.returncode == 0 and f.stdout == b"line1\nline2\nline3\n"
    assert tw("machines", "wait", "talker").stdout == b"0\n"
    tw("machines", "rm", "talker")


def test_log_rotates_and_tails_and_follows_across_rotation(busybox, taxiway_home, monkeypatch):
    monkeypatch.setenv("TAXIWAY_LOG_MAX_BYTES", "100000")  # the supervisor inherits it
    # 20,000 numbered lines (~1 MB of log: ten rotations) in bursts, then a 150 KB "line" with no newline
    script = ("i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); "
              "[ $((i % 500)) -eq 0 ] && sleep 0.2; done; sleep 0.5; "
              "head -c 150000 /dev/zero | tr '\\0' x; echo; sleep 0.5; echo done")
    r = tw("run", "-d", "--name", "chatty", busybox, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    f = tw("machines", "logs", "-f", "-n", "0", "chatty", timeout=180)  # new lines only, across rotations
    assert tw("machines", "wait", "chatty").stdout == b"0\n"
    got = f.stdout.decode().splitlines()
    nums = [int(x[4:]) for x in got if x.startswith("line")]
    assert nums and nums == list(range(nums[0], 20000)), nums[:3]  # nothing lost or repeated
    assert got[-1] == "done"
    d = next((taxiway_home / "machines").glob("*/log")).parent
    assert {p.name for p in d.glob("log*")} == {"log", "log.1"}
    assert all(p.stat().st_size <= 100000 + 70000 for p in d.glob("log*"))  # bounded: one chunk over at most
    tail = tw("machines", "logs", "--tail", "3", "chatty").stdout.decode().splitlines()
    assert tail[-1] == "done" and len(tail) == 3
    assert all(set(t) == {"x"} and len(t) <= 65536 for t in tail[:2]), [(t[:12], len(t)) for t in tail]  # 64 KiB pieces
    assert tw("machines", "logs", "-n", "-1", "chatty").returncode != 0
    tw("machines", "rm", "chatty")


def test_prune_removes_only_machines_that_are_not_running(busybox, taxiway_home):
    assert tw("run", "--name", "done1", busybox, "true").returncode == 0
    assert tw("run", "--name", "done2", busybox, "sh", "-c", "exit 3").returncode == 3
    assert tw("run", "-d", "--name", "alive", busybox, "sleep", "100").returncode == 0
    r = tw("machines", "prune")
    assert r.returncode == 0 and sorted(out(r).split()) == ["done1", "done2"]
    assert [m["name"] for m in json.loads(out(tw("machines", "ls", "-a", "--json")))] == ["alive"]
    tw("machines", "rm", "-f", "alive")
    assert host_state(taxiway_home)["machines"] == []


def test_restart_policy(busybox, taxiway_home):
    r = tw("run", "-d", "--name", "flaky", "--restart", "on-failure:2", busybox, "sh", "-c", "echo try; exit 1")
    assert r.returncode == 0
    m = json.loads(out(tw("machines", "inspect", "flaky")))[0]
    deadline = time.time() + 20
    while m["restarts"] < 2 or m["state"] != "exited" or m.get("supervisor"):
        assert time.time() < deadline, m
        time.sleep(0.1)
        m = json.loads(out(tw("machines", "inspect", "flaky")))[0]
    assert out(tw("machines", "logs", "flaky")) == "try\ntry\ntry\n"
    assert m["exit_code"] == 1
    tw("machines", "rm", "flaky")


def test_volumes_ports_and_networks(busybox, tmp_path, taxiway_home):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from host\n")
    r = tw("run", "--rm", "-v", f"{data}:/data", "-v", f"{data}:/ro:ro", busybox, "sh", "-c",
           "cat /data/in.txt; echo back > /data/out.txt; echo x > /ro/y 2>/dev/null || echo ro-denied")
    assert out(r) == "from host\nro-denied\n", r.stderr
    assert (data / "out.txt").read_text() == "back\n"
    # -p: loopback-only forwarding into the machine's private network namespace
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = tw("run", "-d", "--name", "web", "-p", f"{port}:8080", busybox, "sh", "-c",
           "mkdir /www; echo served > /www/index.html; exec httpd -f -p 8080 -h /www")
    assert r.returncode == 0, r.stderr
    body = b""
    for _ in range(50):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                body = b"".join(iter(lambda: c.recv(4096), b""))
            if b"served" in body:
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert b"served" in body
    assert f"127.0.0.1:{port}->8080" in out(tw("machines", "ls"))  # the PORTS column
    tw("machines", "rm", "-f", "web")
    # host networking sees the host's interfaces; none and private only loopback
    host_ifaces = sorted(os.listdir("/sys/class/net"))
    assert sorted(out(tw("run", "--rm", "--net", "host", busybox, "ls", "/sys/class/net")).split()) == host_ifaces
    assert out(tw("run", "--rm", "--net", "none", busybox, "ls", "/sys/class/net")).split() == ["lo"]


def test_bad_input_leaves_nothing(busybox, tmp_path, taxiway_home):
    before = host_state(taxiway_home)
    noimg = make_image(tmp_path, "localhost/nocmd:1", config={"Cmd": None})
    cases = [
        (["run", noimg], "no command"),
        (["run", "-u", "nobody-here", busybox, "true"], "does not exist in"),
        (["run", "-u", "app:nogroup-here", busybox, "true"], "group 'nogroup-here' does not exist"),
        (["run", "-v", f"{tmp_path}/missing:/x", busybox, "true"], "does not exist"),
        (["run", "--memory", "1m", busybox, "true"], "below the minimum"),
        (["run", "--memory", "lots", busybox, "true"], "invalid size"),
        (["run", "--restart", "sometimes", busybox, "true"], "invalid restart policy"),
        (["run", "-p", "99999:80", busybox, "true"], "invalid port mapping"),
        (["run", "--net", "none", "-p", "8080:80", busybox, "true"], "-p needs a network"),
        (["run", busybox, "/no/such/binary"], "not found in the image"),
        (["run", "-d", "--name", "bad", busybox, "/no/such/binary"], "not found in the image"),  # reported by -d too
        (["machines", "stop", "ghost"], "no machine"),
    ]
    for args, msg in cases:
        r = tw(*args)
        err = r.stderr.decode()
        assert r.returncode != 0, args
        assert msg in err, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
    after = host_state(taxiway_home)
    assert after["machines"] == [] and after["cgroups"] == [] and after["leases"] == [] and after["procs"] == []
    assert after["mounts"] == before["mounts"] == []


def test_limits_are_set_in_the_machines_cgroups(busybox, taxiway_home):
    from taxiway.machines.cgroups import Cgroup

    r = tw("run", "-d", "--name", "lim", "--memory", "48m", "--cpus", "0.5", "--pids-limit", "33", busybox, "sleep", "60")
    assert r.returncode == 0, r.stderr
    mid = r.stdout.decode().strip()
    cg = Cgroup(mid)
    if cg.v2:
        assert (cg.dirs["memory"] / "memory.max").read_text().strip() == str(48 << 20)
        assert (cg.dirs["cpu"] / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert (cg.dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(48 << 20)
        assert (cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cg.dirs["pids"] / "pids.max").read_text().strip() == "33"
    m = json.loads(tw("machines", "inspect", "lim").stdout)[0]
    assert m["pid"] in cg.procs()
    # inside, the machine sees its own cgroup as the root (cgroup namespace)
    assert tw("machines", "exec", "lim", "cat", "/proc/self/cgroup").stdout.decode().strip().endswith(":/")
    assert tw("machines", "rm", "-f", "lim").returncode == 0
    assert not cg.exists()


@pytest.mark.skipif(not Path("/sys/fs/cgroup/unified/cgroup.procs").exists() and
                    not Path("/sys/fs/cgroup/cgroup.controllers").exists(), reason="no cgroup v2 mount on this host")
def test_cgroup_v2_hierarchy(busybox, taxiway_home, monkeypatch):
    """The v2 code path, on this host's v2 mount (pure v2 hosts use it for everything)."""
    root = "/sys/fs/cgroup" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "/sys/fs/cgroup/unified"
    monkeypatch.setenv("TAXIWAY_CGROUP_ROOT", root)
    r = tw("run", "-d", "--name", "v2", busybox, "sleep", "60")
    assert r.returncode == 0, r.stderr
    mid = r.stdout.decode().strip()
    pid = json.loads(tw("machines", "inspect", "v2").stdout)[0]["pid"]
    line = next(ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ln.startswith("0::"))
    assert line.endswith(f"/{mid}")
    assert tw("machines", "rm", "-f", "v2").returncode == 0
    assert not list(Path(root).glob(f"taxiway-*/{mid}"))


def test_interactive_stdin_and_tty(busybox, taxiway_home):
    import pty
    import sys

    assert tw("run", "-i", "--rm", busybox, "cat", input=b"piped in\n").stdout == b"piped in\n"
    assert tw("run", "--rm", busybox, "cat", input=b"not without -i\n").stdout == b""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(sys.executable, [sys.executable, "-m", "taxiway", "run", "--rm", "-it", busybox, "sh"], os.environ)
    os.write(fd, b"tty; echo inside-$((40+2)); exit 4\n")
    got = b""
    deadline = time.time() + 60
    while time.time() < deadline and b"inside-42" not in got:
        import select

        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    for _ in range(300):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"/dev/console" in got and b"inside-42" in got, got
    assert os.waitstatus_to_exitcode(status) == 4


def test_a_regular_file_at_dev_null_is_never_read(busybox, taxiway_home, tmp_path):
    """A host whose /dev/null became a regular file (deleted, then recreated by a redirect) must not feed
    that file's old text to a machine's stdin (seen in CI) nor show it in /proc's masked files.

    The broken /dev/null exists only in a private mount namespace of this test (a bind mount of a
    temp file); the host's is never touched."""
    import subprocess
    import sys

    fake = tmp_path / "null"
    fake.write_text("old text written to a fake /dev/null\n")
    script = (f"mount --bind {fake} /dev/null && exec {sys.executable} -m taxiway run --rm {busybox} "
              "sh -c 'cat; cat /proc/kcore /proc/timer_list; echo end'")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, input=b"typed, but no -i\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"end\n", r.stdout
    assert fake.read_text() == "old text written to a fake /dev/null\n"  # and nothing was written to it


def test_run_pulls_a_missing_image_once_then_uses_the_store(registry, taxiway_home, tmp_path):
    """An image the store lacks is pulled (from a real docker-registry on loopback) and run; later runs
    take it from the store; a name the registry lacks is one line, and nothing is left behind."""
    from helpers.layout import busybox_entries, make_layer, skopeo_push, write_layout

    write_layout(tmp_path / "layout", [make_layer(busybox_entries())], "t", config={"Cmd": ["echo", "from cmd"]})
    ref = f"{registry.address}/machines-pull/busybox:1"
    skopeo_push(tmp_path / "layout", "t", ref)
    r = tw("run", "--rm", ref)
    assert r.returncode == 0 and out(r) == "from cmd\n", r.stderr
    assert ref.split("/", 1)[1] in out(tw("images"))
    r = tw("run", "--rm", ref, "echo", "again")
    assert r.returncode == 0 and out(r) == "again\n", r.stderr
    r = tw("run", "--rm", f"{registry.address}/machines-pull/missing:1", "true")
    assert r.returncode != 0 and r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr
    assert host_state(taxiway_home)["machines"] == []


def test_dev_holds_what_the_readme_lists(busybox, taxiway_home):
    """/dev without -t: Docker's nodes and no console (Docker gives /dev/console only with a tty;
    with -t it is the machine's pty, see test_interactive_stdin_and_tty)."""
    r = tw("run", "--rm", busybox, "ls", "-A", "/dev")
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.decode().split()) == {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin",
                                              "stdout", "stderr", "ptmx", "core", "pts", "shm", "mqueue", "init"}


def _loops_over(path: Path) -> list[str]:
    import subprocess

    r = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True)
    return r.stdout.splitlines()


def test_storage_size_caps_the_writable_layer(busybox, taxiway_home):
    """--storage-size: the writable layer is an ext4 file of that size; a full one is ENOSPC inside,
    the host's disk use stays at the cap, files survive a restart, no loop device outlives a run."""
    fill = "dd if=/dev/zero of=/big bs=1M count=64 2>&1; echo dd=$?; echo kept > /kept; sleep 1000"
    r = tw("run", "-d", "--name", "cap", "--storage-size", "16m", busybox, "sh", "-c", fill)
    assert r.returncode == 0, r.stderr
    mid = out(r).strip()
    deadline = time.time() + 30
    while b"dd=" not in tw("machines", "logs", "cap").stdout and time.time() < deadline:
        time.sleep(0.1)
    logs = tw("machines", "logs", "cap").stdout
    assert b"No space left on device" in logs and b"dd=1" in logs, logs
    disk = taxiway_home / "machines" / mid / "disk.ext4"
    assert disk.stat().st_blocks * 512 <= 16 << 20
    assert len(_loops_over(disk)) == 1
    assert tw("machines", "stop", "-t", "1", "cap").returncode == 0
    assert _loops_over(disk) == []  # the mount went with the machine's namespace, the device with it
    assert tw("machines", "start", "cap").returncode == 0
    assert out(tw("machines", "exec", "cap", "cat", "/kept")) == "kept\n"
    assert tw("machines", "rm", "-f", "cap").returncode == 0
    assert _loops_over(disk) == [] and host_state(taxiway_home)["machines"] == []
    for args, what in ((["--storage-size", "1m"], "below the minimum of 8m"),
                       (["--storage-size", "16m", "--isolation", "vm"], "--storage-size is for namespace machines")):
        r = tw("run", "--rm", *args, busybox, "true")
        assert r.returncode != 0 and what in r.stderr.decode() and r.stderr.count(b"\n") == 1, r.stderr
