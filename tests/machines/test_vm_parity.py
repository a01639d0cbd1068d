"""Micro-VMs do what namespace machines do: exec (-i, -t), run -it, -p, -v, stop signals, clean removal.

All against real QEMU (TCG here: nested KVM does not work on these hosts), as root.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest

from machines.conftest import host_state, tw
from machines.test_cycles import _wait_trash_empty
from machines.test_vm import kvm_cache, vm_env  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the runtime needs root"), pytest.mark.usefixtures("vm_env")]

BOOT = 240  # seconds: TCG boots in ~2 s idle, much slower on a loaded host


def procs_of(home: Path) -> list[str]:
    """QEMU, virtiofsd or supervisors working on this test's files (command line or cwd)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
            cwd = os.readlink(f"/proc/{p}/cwd")
        except OSError:
            continue
        if (b"qemu" in cmd or b"virtiofsd" in cmd) and (str(home).encode() in cmd or str(home) in cwd):
            out.append(p)
    return out


def netns_count(home: Path) -> int:
    """Network namespaces held by any thread of a process working for ``home``.

    Only this home's processes count (its TAXIWAY_HOME in their environment, or the home
    in their command line): other suites and builds on the same host make namespaces too.
    """
    ns = set()
    mark, env = str(home).encode(), b"TAXIWAY_HOME=" + str(home).encode() + b"\0"
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{p}/environ", "rb") as f:
                environ = f.read() + b"\0"
            if mark not in cmd and env not in environ:
                continue
            for t in os.listdir(f"/proc/{p}/task"):
                ns.add(os.readlink(f"/proc/{p}/task/{t}/ns/net"))
        except OSError:
            pass
    ns.discard(os.readlink("/proc/self/ns/net"))
    return len(ns)


def wait_log(name: str, text: bytes, timeout: float = BOOT) -> None:
    deadline = time.time() + timeout
    while text not in (r := tw("machines", "logs", name)).stdout + r.stderr:
        assert time.time() < deadline, f"{text!r} never appeared in the log of {name}"
        time.sleep(0.3)


def in_pty(argv: list[str], inputs: list[bytes | tuple[int, int]], rows: int = 33, cols: int = 111,
           timeout: float = BOOT, ready: bytes = b"# ") -> tuple[bytes, int]:
    """Run ``argv`` on a new pseudo-terminal of the given size; type ``inputs`` once a prompt shows.

    An input ``(rows, cols)`` resizes the terminal instead (the kernel sends SIGWINCH).
    """
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, dict(os.environ))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    out = b""
    deadline = time.time() + timeout

    def read_until(pred) -> None:
        nonlocal out
        while not pred() and time.time() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                if not data:
                    return
                out += data

    try:
        read_until(lambda: ready in out)
        for line in inputs:
            if isinstance(line, tuple):
                fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *line, 0, 0))
                time.sleep(0.5)  # the resize travels to the guest's pty
                continue
            seen = out.count(ready)
            os.write(fd, line)
            last = b"exit" in line
            read_until(lambda s=seen, last=last: out.count(ready) > s or last)
        read_until(lambda: False)  # to EOF
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return out, os.waitstatus_to_exitcode(status)


def test_vm_exec_env_stdin_concurrent_tty_stop_and_rm(busybox, taxiway_home):
    ns_before = netns_count(taxiway_home)
    r = tw("run", "-d", "--name", "vx", "--isolation", "vm", "-w", "/srv", "-u", "app", "-e", "FOO=bar", busybox,
           "sh", "-c", 'trap "echo trapped TERM; exit 42" TERM; echo booted; echo warn >&2; '
           'while true; do sleep 1; done', timeout=BOOT)
    assert r.returncode == 0, r.stderr
    mid = r.stdout.decode().strip()
    # exec right away: the agent serves it as soon as the guest is up
    r = tw("machines", "exec", "vx", "sh", "-c", 'echo "$FOO $(id -u) $(pwd) $HOSTNAME"; echo oops >&2; exit 7',
           timeout=BOOT)
    assert r.returncode == 7, r.stderr
    assert r.stdout.decode() == f"bar 1000 /srv {mid[:12]}\n" and r.stderr == b"oops\n"
    wait_log("vx", b"warn")
    log = (taxiway_home / "machines" / mid / "log").read_bytes().decode()
    assert " stdout booted\n" in log and " stderr warn\n" in log  # the agent keeps the streams apart
    events = json.loads(tw("machines", "inspect", "vx").stdout)[0]["events"]
    assert any(e["type"] == "entrypoint" and e["boot_ms"] > 0 for e in events)  # recorded as it happens
    # -i: stdin reaches the process, EOF ends it
    data = b"".join(b"line %d\n" % i for i in range(40000))  # ~430 KB: more than one flow-control window
    r = tw("machines", "exec", "-i", "vx", "cat", input=data, timeout=BOOT)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    # without -i the process sees no input
    assert tw("machines", "exec", "vx", "cat", input=b"ignored").stdout == b""
    # several at once, each on its own channel
    results: dict[int, subprocess.CompletedProcess] = {}

    def one(i: int) -> None:
        # each waits until all five have started: only concurrent execs can all finish with "together"
        script = (f"touch /tmp/c{i}; n=0; while [ $(ls /tmp | grep -c '^c') -lt 5 ] && [ $n -lt 120 ]; "
                  f"do sleep 1; n=$((n+1)); done; [ $n -lt 120 ] && echo together-{i}; exit {i}")
        results[i] = tw("machines", "exec", "vx", "sh", "-c", script, timeout=BOOT)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(5):
        assert results[i].returncode == i and results[i].stdout == f"together-{i}\n".encode(), results[i].stderr
    # a command that does not exist: one clear line
    r = tw("machines", "exec", "vx", "nosuchcmd")
    assert r.returncode != 0 and r.stderr.decode().count("\n") == 1 and "nosuchcmd" in r.stderr.decode()
    # -t: a terminal in the guest, with our window size
    out, code = in_pty([sys.executable, "-m", "taxiway", "machines", "exec", "-it", "vx", "sh"],
                       [b"tty\r", b"stty size\r", b"echo term=$TERM\r", (44, 99), b"stty size\r", b"exit 5\r"],
                       ready=b"$ ")
    text = out.decode(errors="replace")
    assert code == 5, text
    assert "/dev/pts/" in text and "33 111" in text and "term=xterm" in text and "44 99" in text, text
    # stop: the machine's stop signal reaches the main process through the agent; its trap decides the code
    t0 = time.monotonic()
    assert tw("machines", "stop", "vx", timeout=60).returncode == 0
    assert time.monotonic() - t0 < 10  # not the 10 s stop timeout: the guest powered off by itself
    m = json.loads(tw("machines", "inspect", "vx").stdout)[0]
    assert m["state"] == "exited" and m["exit_code"] == 42 and m["reason"] == "stopped", m
    assert b"trapped TERM" in tw("machines", "logs", "vx").stdout
    r = tw("machines", "exec", "vx", "true")
    assert r.returncode != 0 and "is not running" in r.stderr.decode() and r.stderr.decode().count("\n") == 1
    assert procs_of(taxiway_home) == []
    assert tw("machines", "rm", "vx").returncode == 0
    assert procs_of(taxiway_home) == [] and netns_count(taxiway_home) <= ns_before
    assert host_state(taxiway_home)["machines"] == []


def test_vm_run_it_reads_commands_from_the_terminal(busybox, taxiway_home):
    out, code = in_pty([sys.executable, "-m", "taxiway", "run", "-it", "--rm", "--isolation", "vm", busybox, "sh"],
                       [b"tty\r", b"stty size\r", b"echo $((6*7))\r", b"exit 3\r"], rows=40, cols=100)
    text = out.decode(errors="replace")
    assert code == 3, text
    assert "/dev/pts/0" in text and "40 100" in text and "42" in text, text
    # -i without -t: our stdin is the main process's, stdout and stderr stay apart
    r = tw("run", "-i", "--rm", "--isolation", "vm", busybox, "sh", "-c", "wc -l; echo done >&2; exit 4",
           input=b"a\nb\nc\n", timeout=BOOT)
    assert r.returncode == 4 and r.stdout.split() == [b"3"] and r.stderr.endswith(b"done\n"), r.stderr
    # Ctrl-C of an attached run reaches the main process through the agent
    p = subprocess.Popen([sys.executable, "-m", "taxiway", "run", "--rm", "--isolation", "vm", busybox, "sh", "-c",
                          'trap "echo interrupted; exit 9" INT; echo up; while true; do sleep 1; done'],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGINT)
    assert p.wait(BOOT) == 9 and p.stdout.read() == b"interrupted\n"
    assert host_state(taxiway_home)["machines"] == [] and procs_of(taxiway_home) == []


def test_vm_ports_and_volumes(busybox, taxiway_home, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from a micro-VM\n")
    data = tmp_path / "data"
    data.mkdir()
    ns_before = netns_count(taxiway_home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        hp = s.getsockname()[1]
    r = tw("run", "-d", "--name", "web", "--isolation", "vm", "-p", f"{hp}:8080", "-v", f"{www}:/www:ro",
           "-v", f"{data}:/data", busybox, "busybox", "httpd", "-f", "-p", "8080", "-h", "/www", timeout=BOOT)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + BOOT
    while True:
        try:
            resp = httpx.get(f"http://127.0.0.1:{hp}/index.html", timeout=5)
            break
        except httpx.HTTPError:
            assert time.time() < deadline
            time.sleep(0.3)
    assert resp.status_code == 200 and resp.text == "hello from a micro-VM\n"
    # rw volume: a file written in the guest appears on the host
    r = tw("machines", "exec", "web", "sh", "-c", "echo written-in-vm > /data/out.txt", timeout=BOOT)
    assert r.returncode == 0, r.stderr
    assert (data / "out.txt").read_text() == "written-in-vm\n"
    # ro volume: refused, even after a remount read-write from inside
    r = tw("machines", "exec", "web", "sh", "-c", "echo x > /www/evil; mount -o remount,rw /www; echo x > /www/evil")
    assert r.returncode != 0 and b"Read-only file system" in r.stderr
    assert sorted(os.listdir(www)) == ["index.html"]
    # the same host port again: one clear line, and nothing of the second machine remains
    r = tw("run", "-d", "--isolation", "vm", "-p", f"{hp}:8080", busybox, "sleep", "100", timeout=BOOT)
    err = r.stderr.decode()
    assert r.returncode != 0 and f"127.0.0.1:{hp}" in err and err.strip().count("\n") <= 1, err
    assert host_state(taxiway_home)["machines"] == [json.loads(tw("machines", "inspect", "web").stdout)[0]["id"]]
    # a missing host directory: the namespace runtime's message
    r = tw("run", "--rm", "--isolation", "vm", "-v", f"{tmp_path}/missing:/x", busybox, "true")
    assert r.returncode != 0 and "does not exist" in r.stderr.decode() and r.stderr.decode().count("\n") == 1
    assert tw("machines", "rm", "-f", "web").returncode == 0
    assert procs_of(taxiway_home) == [] and netns_count(taxiway_home) <= ns_before
    assert host_state(taxiway_home)["machines"] == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{hp}/", timeout=2)


def test_vm_net_none_has_no_nic_and_refuses_ports(busybox, taxiway_home):
    r = tw("run", "--rm", "--isolation", "vm", "--net", "none", "-p", "18099:80", busybox, "true")
    assert r.returncode != 0 and "-p needs a network" in r.stderr.decode()
    r = tw("run", "--rm", "--isolation", "vm", "--net", "none", busybox, "ls", "/sys/class/net", timeout=BOOT)
    assert r.returncode == 0 and r.stdout.split() == [b"lo"], r.stderr
    r = tw("run", "--rm", "--isolation", "vm", busybox, "ls", "/sys/class/net", timeout=BOOT)
    assert r.returncode == 0 and r.stdout.split() == [b"eth0", b"lo"], r.stderr


def test_agent_needs_gcc_once(taxiway_home, monkeypatch):
    from taxiway.errors import TaxiwayError
    from taxiway.machines import vmagent

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TaxiwayError) as e:
        vmagent.binary()
    assert "gcc" in e.value.message and e.value.hint == "install gcc and libc6-dev"
    assert not list((taxiway_home / "vm").glob("tw-agent-*"))


def test_frames_round_trip():
    from taxiway.machines import vmagent as A

    stream = A.frame(A.STDOUT, 3, b"abc") + A.frame(A.EXIT, 3, struct.pack(">ii", 0, 15)) + A.frame(A.READY, 0)
    dec = A.Decoder()
    got = []
    for i in range(len(stream)):  # byte by byte: frames split anywhere
        got += dec.feed(stream[i:i + 1])
    assert got == [(A.STDOUT, 3, b"abc"), (A.EXIT, 3, struct.pack(">ii", 0, 15)), (A.READY, 0, b"")]
    assert A.exit_status(got[1][2]) == (0, 15)
    p = A.open_payload(["sh", "-c", "a b"], ["X=1"], 1000, 1000, [10, 20], "/srv", tty=True, rows=5, cols=6)
    assert p.split(b"\0")[:-1] == [b"arg=sh", b"arg=-c", b"arg=a b", b"env=X=1", b"cwd=/srv", b"uid=1000",
                                   b"gid=1000", b"groups=10,20", b"tty=1", b"rows=5", b"cols=6", b"stdin=0"]
    with pytest.raises(ValueError):
        A.Decoder().feed(struct.pack(">BII", 1, 0, A.MAXPAY + 1))


def test_vm_run_d_waits_for_the_entrypoint_and_reports_start_errors(busybox, taxiway_home, monkeypatch):
    # -d returns once the main process runs (as for a namespace machine), so a port answers at once
    import socket as _s

    with _s.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = tw("run", "-d", "--name", "early", "--isolation", "vm", "-p", f"{port}:8080", busybox, "sh", "-c",
           "echo ready > /tmp/r; exec httpd -f -p 8080 -h /tmp", timeout=300)
    assert r.returncode == 0, r.stderr
    events = json.loads(tw("machines", "inspect", "early").stdout)[0]["events"]
    assert any(e["type"] == "entrypoint" for e in events)  # recorded before run -d returned
    body = b""
    for _ in range(40):  # httpd itself needs a moment to listen after exec
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/r", timeout=2).content
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    assert body == b"ready\n"
    assert tw("machines", "rm", "-f", "early").returncode == 0
    # a command that is not in the image: run -d says so in one line and leaves nothing behind
    r = tw("run", "-d", "--name", "nocmd", "--isolation", "vm", busybox, "/no/such/binary", timeout=300)
    err = r.stderr.decode().splitlines()
    assert r.returncode != 0 and err[-1].startswith("error: machine nocmd could not start:"), err
    assert "not found" in err[-1]
    assert host_state(taxiway_home)["machines"] == []
    # a guest that does not reach its entrypoint in time is stopped with one line
    monkeypatch.setenv("TAXIWAY_VM_BOOT_TIMEOUT", "0.2")
    r = tw("run", "--rm", "--isolation", "vm", busybox, "true", timeout=300)
    err = r.stderr.decode().splitlines()
    assert r.returncode != 0 and "did not reach its entrypoint within 0.2s" in err[-1], err
    assert host_state(taxiway_home)["machines"] == []


def test_vm_run_rm_cycles_leave_nothing(busybox, taxiway_home, tmp_path):
    """Ten VM run/rm cycles with a port and a volume: no process, netns, record or disk growth left."""
    vol = tmp_path / "vol"
    vol.mkdir()
    assert tw("run", "--rm", "--isolation", "vm", busybox, "true", timeout=BOOT).returncode == 0  # disks made
    _wait_trash_empty(taxiway_home)
    before = host_state(taxiway_home)
    ns_before = netns_count(taxiway_home)
    for i in range(10):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = tw("run", "--rm", "--isolation", "vm", "-p", f"{port}:80", "-v", f"{vol}:/v", busybox,
               "sh", "-c", f"echo {i} > /v/last", timeout=BOOT)
        assert r.returncode == 0, r.stderr
    assert (vol / "last").read_text() == "9\n"
    _wait_trash_empty(taxiway_home)  # removed machines' files are deleted in the background
    after = host_state(taxiway_home)
    assert procs_of(taxiway_home) == [] and netns_count(taxiway_home) <= ns_before
    assert after["machines"] == [] and after["mounts"] == before["mounts"] and after["procs"] == []
    assert after["size"] - before["size"] < 1 << 20, (before["size"], after["size"])
