"""Run each build step (detect, build) as a taxiway machine of the build image.

A build is hostile input, so every step gets what ``taxiway run`` gives a
machine, through the runtime's own :func:`taxiway.machines.namespace.spawn`:
its own PID, mount, UTS, IPC, network and cgroup namespaces, a root that is an
overlay of the (shared, never written) build image root, capabilities
dropped, no_new_privs, and whatever hardening that runtime applies (seccomp,
devices). What is different from a user's machine:

- the step runs as ``BUILD_UID`` (named ``cnb`` inside), a uid no machine and
  no image we build runs as, so a build can never signal, trace or read a
  running machine's processes or files even outside its namespaces;
- the volumes are the build's own folders (app, layers, platform, buildpacks);
- its cgroup has memory and pids limits and lives under its own parent, so
  ``machines gc`` never sees it; at the deadline the step's PID 1 gets
  SIGKILL, which takes every process of its PID namespace with it (a
  ``setsid`` loop too), then the cgroup is killed and removed;
- its output goes through a pipe into the build log, which keeps at most
  ``LOG_MAX`` bytes per build (the rest is read and dropped);
- the network namespace has only loopback plus one relay, listening on its
  127.0.0.1:3128 and leading to the egress proxy (package indexes allowed,
  private addresses denied), which listens in a network namespace of its own
  that only this relay connects into; nothing else on the host is reachable.

When a step's PID 1 exits, so does everything it started: nothing a build
runs outlives its step.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.errors import TaxiwayError
from taxiway.machines.ports import pipe

if TYPE_CHECKING:
    from taxiway.builder.egress import Upstream

#: The build's uid and gid: outside what Debian gives users (1000-59999) and systemd's dynamic users.
BUILD_UID = 65_000
BUILD_GID = 65_000
PROXY_PORT = 3128
MEMORY = int(os.environ.get("TAXIWAY_BUILD_MEMORY", 4 << 30))
PIDS = int(os.environ.get("TAXIWAY_BUILD_PIDS", 4096))
#: A build's log (all its steps) keeps at most this many bytes; a step's captured output (detect) 1 MiB.
LOG_MAX = int(os.environ.get("TAXIWAY_BUILD_LOG_MAX", 16 << 20))
CAPTURE_MAX = 1 << 20
#: Bound read-only into every step, so a site's TLS-intercepting proxy works as it does for the host's pip and npm.
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: Build-time only: make Node and Deno use that bundle too.
TRUST_ENV = {"NODE_EXTRA_CA_CERTS": HOST_CA_BUNDLE, "DENO_TLS_CA_STORE": "system,mozilla", "SSL_CERT_FILE": HOST_CA_BUNDLE}


def check_root() -> None:
    """Build machines need namespaces, mounts and cgroups: root."""
    if os.geteuid() != 0:
        raise TaxiwayError("taxiway build needs root to run buildpacks as machines of the build image "
                           "(namespaces, mounts, cgroups)", "run it with sudo")


def _passwd(rootfs: Path) -> dict[str, str]:
    """/etc/passwd and /etc/group of the build image with ``cnb`` moved to the build uid."""
    out = {}
    for name, uid_field in (("passwd", 2), ("group", 2)):
        lines = []
        for line in (rootfs / "etc" / name).read_text().splitlines():
            f = line.split(":")
            if f[0] == "cnb":
                f[uid_field] = str(BUILD_UID if name == "passwd" else BUILD_GID)
                if name == "passwd":
                    f[3] = str(BUILD_GID)
            lines.append(":".join(f))
        out[name] = "\n".join(lines) + "\n"
    return out


class _Relay:
    """Accepts in the build's network namespace, connects on the host's: the only way out."""

    def __init__(self, listener: socket.socket, upstream: Upstream):
        self.listener, self.upstream = listener, upstream
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="build-relay").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = self.upstream.connect(timeout=10)
                up.settimeout(None)
            except Exception:  # noqa: BLE001 - unreachable, or the proxy did not start (Upstream.error says why)
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class BuildMachine:
    """The build image root plus host folders as volumes; ``run`` starts one machine per step."""

    def __init__(self, rootfs: Path, work: Path, binds: dict[str, Path], ro_binds: dict[str, Path],
                 proxy: Upstream | None = None):
        self.rootfs, self.work, self.proxy = Path(rootfs), Path(work), proxy
        self.home = self.work / "home"
        self.home.mkdir(exist_ok=True)
        os.chown(self.home, BUILD_UID, BUILD_GID)
        self.mounts = [{"source": str(h), "target": t, "readonly": False} for t, h in binds.items()]
        self.mounts += [{"source": str(h), "target": t, "readonly": True} for t, h in ro_binds.items()]
        self.mounts.append({"source": str(self.home), "target": "/home/cnb", "readonly": False})
        if os.path.isfile(HOST_CA_BUNDLE):
            self.mounts.append({"source": HOST_CA_BUNDLE, "target": HOST_CA_BUNDLE, "readonly": True})
        self.etc = {"hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tbuild\n", "hostname": "build\n",
                    "resolv.conf": "# builds reach the network only through $HTTPS_PROXY\n", **_passwd(self.rootfs)}
        self.steps = 0

    def __enter__(self) -> BuildMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def env(self) -> dict[str, str]:
        """What every step gets on top of its own environment: the way out, when there is one."""
        if not self.proxy:
            return {}
        url = f"http://127.0.0.1:{PROXY_PORT}"
        return {k: url for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                                 "npm_config_proxy", "npm_config_https_proxy")} | {"NO_PROXY": "", "no_proxy": ""}

    def run(self, argv: list[str], env: dict[str, str], cwd: str = "/workspace", log: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` (a path inside the image) as one machine; output to ``log`` (appended) or captured."""
        from taxiway.builder import reaper
        from taxiway.machines import linux as L
        from taxiway.machines import namespace
        from taxiway.machines.cgroups import Cgroup

        self.steps += 1
        step = Path(tempfile.mkdtemp(dir=self.work, prefix=f"step{self.steps}-"))
        for d in ("mnt", "etc", "upper", "ovl"):
            (step / d).mkdir()
        spec = {"rootfs": str(step / "mnt"), "etc_dir": str(step / "etc"),
                "overlay": f"lowerdir={self.rootfs},upperdir={step / 'upper'},workdir={step / 'ovl'}",
                "mounts": self.mounts, "etc": self.etc, "hostname": "build",
                # "host": the step joins the network namespace made here (loopback and the relay), not the host's.
                "net": "host", "argv": argv, "env": [f"{k}={v}" for k, v in {**env, **self.env()}.items()],
                "uid": BUILD_UID, "gid": BUILD_GID, "groups": [BUILD_GID], "workdir": cwd}
        captured = step / "output"
        sink = log if log is not None else captured
        out_r, out_w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        cg = Cgroup(reaper.step_cgroup_name(self.work, self.steps), parent=reaper.builds_parent())
        relay = None
        pump = None
        own_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        pid = 0
        try:
            cg.create(MEMORY, None, PIDS)
            try:
                L.unshare(L.CLONE_NEWNET)  # this thread only, until the setns below
                L.loopback_up()
                if self.proxy:
                    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    lsock.bind(("127.0.0.1", PROXY_PORT))
                    lsock.listen(64)
                pid, err = namespace.spawn(spec, [str(p / "cgroup.procs") for p in cg.paths()], (null, out_w, out_w))
            finally:
                L.setns(own_net, L.CLONE_NEWNET)
            os.close(out_w)
            out_w = -1
            pump = _LogPump(out_r, sink, LOG_MAX if log is not None else CAPTURE_MAX)
            out_r = -1
            if self.proxy:
                relay = _Relay(lsock, self.proxy)
            if err or not pid:
                raise TaxiwayError(f"the build machine could not start {argv[0]}: {err.strip() or 'unknown error'}",
                                   "check the build image (`taxiway stack create build`)")
            code, timed_out = _wait(pid, timeout)
            pid = 0
        finally:
            os.close(own_net)
            for fd in (out_r, out_w, null):
                if fd >= 0:
                    os.close(fd)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            cg.kill()
            cg.remove()
            if relay is not None:
                relay.close()
            if pump is not None:
                pump.join()  # the step's processes are gone, so the pipe is at EOF
        if timed_out:
            raise TaxiwayError(f"{argv[0]} ran longer than {timeout:.0f}s and was stopped, with everything it started",
                               "make the buildpack finish sooner, or raise the limit with --timeout")
        output = b""
        if log is None:
            with open(captured, "rb") as f:
                output = f.read(1 << 20)
        return subprocess.CompletedProcess(argv, code, output, b"")


class _LogPump:
    """Copies a step's output from its pipe to ``path`` (appended) while the file is under ``limit`` bytes.

    Past the limit one line says so and the rest is read and dropped, so a build that prints
    without end neither fills the disk nor blocks on a full pipe.

    Not :class:`taxiway.machines.logs.LogPump`, on purpose: that one is a machine's log, a
    formatter fed by the runtime's own I/O loop, which stamps each line with time and stream
    and rotates to keep the newest output of a machine that runs for months. A step's output
    is a build transcript: copied byte for byte (``detect``'s captured output is read back
    as the buildpack wrote it, and the build log is shown as-is), all steps appended to one
    file with one cap for the whole build, and no I/O loop of its own to feed a formatter.
    """

    def __init__(self, fd: int, path: Path, limit: int):
        self.fd, self.path, self.limit = fd, path, limit
        self.thread = threading.Thread(target=self._run, daemon=True, name="build-log")
        self.thread.start()

    def _run(self) -> None:
        try:
            with open(self.path, "ab") as f:
                room = self.limit - f.tell()
                cut = room <= 0
                while data := os.read(self.fd, 65536):
                    if cut:
                        continue
                    if len(data) > room:
                        f.write(data[:max(room, 0)])
                        f.write(f"\n[taxiway: the build log reached {self.limit} bytes; the rest was dropped]\n".encode())
                        cut = True
                        continue
                    f.write(data)
                    room -= len(data)
        finally:
            os.close(self.fd)

    def join(self) -> None:
        self.thread.join(5)  # at EOF once the step's processes are gone; never hang a build on it


def _wait(pid: int, timeout: float | None) -> tuple[int, bool]:
    """Wait for the step's PID 1; at the deadline SIGKILL it (its whole PID namespace goes). (exit code, timed out)."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        timed_out = not ready
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return (os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)), timed_out
