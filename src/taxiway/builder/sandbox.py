"""Run a buildpack's executable inside the build image.

A private mount namespace with the build image's root bound read-only, the
build's own folders bound in (``/workspace``, ``/layers``, ``/platform``,
``/cnb/buildpacks``, ``/cnb/work``), fresh ``/proc``, ``/tmp``, ``/dev/shm`` and
a home, and the host's CA bundle (so a site's TLS-intercepting proxy works as it
does for the host's own pip and npm). Each step then runs ``chroot``-ed as the
unprivileged ``cnb`` user with a clean environment. The network is the
host's: dependency installs reach PyPI and the npm registry.

Speed matters (a rebuild runs three or four steps), so this uses the syscalls
directly: a forked child unshares the mount namespace and mounts once, then
waits; each step is one fork that ``setns``-es into it, chroots, drops to the
``cnb`` user and execs the buildpack, with no helper programs in between. The
namespace goes away when the waiting child exits, so no mount outlives a build.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.errors import TaxiwayError

UID = 1000
GID = 1000
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: Build-time only: make Node and Deno use that bundle too.
TRUST_ENV = {"NODE_EXTRA_CA_CERTS": HOST_CA_BUNDLE, "DENO_TLS_CA_STORE": "system,mozilla", "SSL_CERT_FILE": HOST_CA_BUNDLE}

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(src: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    enc = _enc
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind(src: str, target: str, readonly: bool = False, recursive: bool = False) -> None:
    _mount(src, target, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


@dataclass
class Sandbox:
    """The build image root plus host folders to bind at fixed paths inside it."""

    rootfs: Path
    binds: dict[str, Path] = field(default_factory=dict)  # inside path -> host path
    ro_binds: dict[str, Path] = field(default_factory=dict)

    def _setup(self, mnt: str) -> None:
        """Runs in the child, in its new mount namespace."""
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _bind(str(self.rootfs), mnt, readonly=True)
        _mount("proc", mnt + "/proc", "proc", MS_NOSUID | MS_NODEV)
        # A minimal /dev: the usual character devices bound from the host, no disks.
        dev = mnt + "/dev"
        _mount("dev", dev, "tmpfs", MS_NOSUID, "mode=0755")
        for node in ("null", "zero", "full", "random", "urandom", "tty"):
            os.close(os.open(f"{dev}/{node}", os.O_CREAT | os.O_WRONLY, 0o666))
            _bind(f"/dev/{node}", f"{dev}/{node}")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{dev}/{name}")
        os.mkdir(f"{dev}/shm")
        _mount("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        _mount("tmpfs", mnt + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        _mount("tmpfs", mnt + "/home/cnb", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,uid={UID},gid={GID}")
        if os.path.isfile("/etc/resolv.conf") and os.path.lexists(mnt + "/etc/resolv.conf"):
            _bind("/etc/resolv.conf", mnt + "/etc/resolv.conf", readonly=True)
        if os.path.isfile(HOST_CA_BUNDLE) and os.path.isfile(mnt + HOST_CA_BUNDLE):
            _bind(HOST_CA_BUNDLE, mnt + HOST_CA_BUNDLE, readonly=True)
        for inside, host in self.binds.items():
            _bind(str(host), mnt + inside)
        for inside, host in self.ro_binds.items():
            _bind(str(host), mnt + inside, readonly=True)

    def __enter__(self) -> Sandbox:
        self._mnt = tempfile.mkdtemp(prefix="taxiway-mnt-")
        hold_r, self._hold_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the namespace holder
            try:
                os.close(self._hold_w)
                os.close(ready_r)
                _check(_libc.unshare(CLONE_NEWNS), "unshare")
                self._setup(self._mnt)
                os.write(ready_w, b"ok")
            except BaseException as e:  # noqa: BLE001 - report anything to the parent, then leave
                os.write(ready_w, f"{e}".encode()[:500] or b"failed")
                os._exit(1)
            os.close(ready_w)
            os.read(hold_r, 1)  # returns when the parent closes its end (or dies)
            os._exit(0)
        os.close(hold_r)
        os.close(ready_w)
        self._pid = pid
        msg = os.read(ready_r, 1000)
        os.close(ready_r)
        if msg != b"ok":
            self.__exit__()
            raise TaxiwayError(f"could not set up the build sandbox: {msg.decode(errors='replace') or 'no answer'}",
                               "taxiway build needs root (mount namespaces and chroot)")
        self._ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        for attr in ("_ns", "_hold_w"):
            fd = getattr(self, attr, None)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)
        pid = getattr(self, "_pid", None)
        if pid:
            os.waitpid(pid, 0)
            self._pid = None
        if getattr(self, "_mnt", None):
            os.rmdir(self._mnt)
            self._mnt = None

    def run(self, argv: list[str], env: dict[str, str], cwd: str = "/workspace", log: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` (an absolute path inside the image) in the sandbox; output goes to ``log`` or is captured."""
        ns, mnt = self._ns, self._mnt

        def enter() -> None:  # in the forked child, before exec
            _check(_libc.setns(ns, CLONE_NEWNS), "setns")
            os.chroot(mnt)
            os.chdir(cwd)
            os.setgroups([GID])
            os.setgid(GID)
            os.setuid(UID)

        return _run(argv, env, enter, log, timeout)


def _run(argv: list[str], env: dict[str, str], enter, log: Path | None, timeout: float | None) -> subprocess.CompletedProcess:
    # A timer kills on timeout: Popen.wait(timeout=...) polls with sleeps, which costs tens of ms per step.
    out = open(log, "ab") if log is not None else subprocess.PIPE  # noqa: SIM115
    try:
        try:
            proc = subprocess.Popen(argv, env=env, preexec_fn=enter, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)
        except (OSError, subprocess.SubprocessError) as e:
            msg = f"cannot run {argv[0]}: {e}\n".encode()
            if log is not None:
                out.write(msg)  # type: ignore[union-attr]
            return subprocess.CompletedProcess(argv, 127, b"", msg)
        fired: list[bool] = []

        def kill() -> None:
            fired.append(True)
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            stdout, stderr = proc.communicate()
        finally:
            if timer:
                timer.cancel()
        if fired:
            raise TaxiwayError(f"{argv[0]} ran longer than {timeout:.0f}s and was stopped", "look at the build log")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def check_root() -> None:
    """Builds need mount namespaces and chroot: root (or CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        raise TaxiwayError("taxiway build needs root to run buildpacks in the build image (mount namespace + chroot)",
                           "run it with sudo")
