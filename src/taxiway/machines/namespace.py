"""The namespace runtime: one process tree in its own pid, mount, uts, ipc, net and cgroup namespaces.

The supervisor (the ``taxiway run`` process itself, or a detached copy of it)
forks the machine's PID 1 directly into a new pid namespace, so it waits for
it and gets its real exit status. Between fork and exec PID 1 only makes
system calls (Python can no longer import anything after pivot_root): assemble the root (overlay of the snapshot's layers, volumes, /proc,
read-only /sys, a minimal /dev, injected /etc files, tini read-only at
/dev/init), pivot_root, set the hostname and loopback, drop capabilities to
Docker's default set, switch user, set no_new_privs and exec tini. Any
failure before exec is written to a close-on-exec pipe and becomes a one-line
error in the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from taxiway.machines import linux as L
from taxiway.machines.config import reserved_target
from taxiway.machines.stdio import FORWARDED, forward_to, handling
from taxiway.oci.safepath import RootFS, clean

if TYPE_CHECKING:
    from typing import Any

TINI = os.environ.get("TAXIWAY_INIT", "/usr/bin/tini-static")
INIT_PATH = "/dev/init"

MASKED = ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))


class SetupError(Exception):
    """Raised inside the child before exec; its text reaches the user as one line."""


def _dir_fd(root: str, rel: str) -> int:
    """An O_PATH fd of directory ``rel`` inside ``root``, made if missing.

    Symlinks are followed *inside* the root, as a chroot would (openat2 RESOLVE_IN_ROOT, or the
    same walk by hand): an image's ``/data -> /host/dir`` leads to ``root/host/dir``, and nothing
    is ever created outside ``root``.
    """
    try:
        with RootFS(root) as rfs:
            return rfs.resolve(clean(rel), create=True)
    except NotADirectoryError:
        raise SetupError(f"{rel} in the image is not a directory") from None
    except OSError as e:
        raise SetupError(f"cannot make {rel} inside the machine: {e.strerror}") from None


def _real(fd: int, root: str, rel: str) -> str:
    """The path of ``fd`` (resolved inside ``root``), closing it. Nothing else changes the
    machine's root while it is assembled, so the path names what the fd does."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if real != root and not real.startswith(root + "/"):
        raise SetupError(f"{rel} in the image leads outside the machine")
    return real


def _mkdirs_inside(root: str, rel: str) -> str:
    """``root/rel`` as a directory that provably stays inside ``root`` (symlinks followed inside it)."""
    return _real(_dir_fd(root, rel), root, rel)


def _file_inside(root: str, rel: str) -> str:
    """A file ``root/rel`` inside ``root`` (made if missing; a symlink there is replaced by a file)."""
    base = rel.rstrip("/")
    parent = _dir_fd(root, os.path.dirname(base) or "/")
    name = os.path.basename(base)
    try:
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileExistsError):
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=parent))
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    return _real(fd, root, rel)


def _bind(src: str, dst: str, ro: bool = False, flags: int = 0) -> None:
    L.mount(src, dst, None, L.MS_BIND | L.MS_REC)
    if ro or flags:
        L.mount(None, dst, None, L.MS_BIND | L.MS_REMOUNT | (L.MS_RDONLY if ro else 0) | flags)


def open_disk(disk: str) -> int:
    """``--storage-size``: the machine's ext4 file mounted, in no namespace yet (an fd for
    ``spec["upper_disk"]``). Done by the supervisor: inside the machine's cgroup, its device
    policy forbids the loop device. It holds ``upper/`` and ``work/``."""
    lo, dev = L.attach_loop(disk)
    try:
        mfd = L.mount_detached("ext4", dev)
    finally:
        os.close(lo)  # the mount keeps the device; it clears itself when the mount is gone
    try:
        for d in ("upper", "work"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o755, dir_fd=mfd)
    except BaseException:
        os.close(mfd)
        raise
    return mfd


def open_volume(image: str) -> int:
    """An ``ext4-image`` mount: the file mounted over an auto-clearing loop device, in no namespace
    yet (an fd PID 1 moves into the machine's root: the host's mount table never sees it, and it
    goes, with its loop device, when the machine's mount namespace does). The file is locked
    while attached (BlockingIOError: another machine has it). Done by the supervisor, as
    :func:`open_disk`; ext4 replays its journal here after a machine killed mid-write."""
    lo, dev = L.attach_loop(image, exclusive=True)
    try:
        return L.mount_detached("ext4", dev)
    finally:
        os.close(lo)


def build_root(spec: dict[str, Any]) -> None:
    """Assemble and enter the machine's root. Runs in PID 1 before exec; raises on failure."""
    root = os.path.realpath(spec["rootfs"])
    # without a device policy (no v1 devices group, no v2 device program), device nodes work nowhere but /dev
    nodev = 0 if spec.get("device_cgroup", True) else L.MS_NODEV
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    if spec.get("upper_disk"):  # fd, mount point: the supervisor mounted the machine's ext4 file
        L.move_mount(*spec["upper_disk"])
    if spec.get("overlay"):
        L.mount("overlay", root, "overlay", nodev, spec["overlay"])
    else:
        L.mount(spec["copy_root"], root, None, L.MS_BIND | L.MS_REC)
        if nodev:
            L.mount(None, root, None, L.MS_BIND | L.MS_REMOUNT | nodev)
    for m in spec.get("mounts", []):
        if m.get("type") == "ext4-image":  # the supervisor mounted the file: m["fd"]
            dst = _mkdirs_inside(root, m["target"])
            if reserved_target(dst[len(root):] or "/"):
                raise SetupError(f"volume target {m['target']} is reserved: in the image it leads to "
                                 f"{dst[len(root):] or '/'}, which the runtime mounts itself")
            L.move_mount(m["fd"], dst)
            if m["readonly"] or nodev:
                L.mount(None, dst, None, L.MS_BIND | L.MS_REMOUNT | (L.MS_RDONLY if m["readonly"] else 0) | nodev)
            continue
        if os.path.isdir(m["source"]):
            dst = _mkdirs_inside(root, m["target"])
        else:
            dst = _file_inside(root, m["target"])
        inside = dst[len(root):] or "/"
        if reserved_target(inside):  # the image's symlinks led there (/procl -> /proc)
            raise SetupError(f"volume target {m['target']} is reserved: in the image it leads to {inside}, "
                             "which the runtime mounts itself")
        _bind(m["source"], dst, ro=m["readonly"], flags=nodev)
    proc = _mkdirs_inside(root, "/proc")
    L.mount("proc", proc, "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    sys_ = _mkdirs_inside(root, "/sys")
    try:
        L.mount("sysfs", sys_, "sysfs", L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    except OSError:  # host network namespace: borrow the host's, read-only
        _bind("/sys", sys_, ro=True)
    dev = _mkdirs_inside(root, "/dev")
    L.mount("tmpfs", dev, "tmpfs", L.MS_NOSUID | L.MS_STRICTATIME, "mode=755,size=65536k")
    for name, major, minor in DEVICES:
        os.mknod(f"{dev}/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts")
    L.mount("devpts", f"{dev}/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.mkdir(f"{dev}/shm", 0o1777)
    L.mount("shm", f"{dev}/shm", "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=1777,size=65536k")
    os.mkdir(f"{dev}/mqueue")
    with contextlib.suppress(OSError):
        L.mount("mqueue", f"{dev}/mqueue", "mqueue", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    if spec.get("tty_name"):
        os.close(os.open(f"{dev}/console", os.O_CREAT | os.O_WRONLY, 0o600))
        _bind(spec["tty_name"], f"{dev}/console")
    # PID 1's binary: the host's static tini, bind-mounted read-only (CVE-2019-5736 class: unwritable)
    os.close(os.open(f"{dev}{INIT_PATH[4:]}", os.O_CREAT | os.O_WRONLY, 0o755))
    _bind(TINI, f"{dev}{INIT_PATH[4:]}", ro=True, flags=L.MS_NOSUID | L.MS_NODEV)
    # /etc/hosts, hostname, resolv.conf: written to a tmpfs private to this mount namespace, bound in
    etc_dir = spec["etc_dir"]
    L.mount("tmpfs", etc_dir, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=755,size=64k")
    for name, text in spec["etc"].items():
        src = f"{etc_dir}/{name}"
        with open(src, "w") as f:
            f.write(text)
        _bind(src, _file_inside(root, f"/etc/{name}"))
    for p in MASKED:
        full = root + p
        if os.path.isdir(full):
            with contextlib.suppress(OSError):
                L.mount("tmpfs", full, "tmpfs", L.MS_RDONLY)
        elif os.path.exists(full):
            with contextlib.suppress(OSError):  # the machine's own null device, never the host's path
                L.mount(f"{dev}/null", full, None, L.MS_BIND)
    for p in READONLY:
        full = root + p
        if os.path.exists(full):
            _bind(full, full, ro=True, flags=L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")


def _harden(proc: dict[str, Any], prog: Any) -> None:
    """The last steps before exec, in every entry path (PID 1, ``machines exec``): a fresh session
    keyring, no inherited fd above 2, capabilities, user, no_new_privs, then the seccomp filter."""
    L.join_session_keyring()
    L.cloexec_from(3)
    caps = proc.get("caps")
    L.become(proc["uid"], proc["gid"], proc["groups"], L.MACHINE_CAPS if caps is None else tuple(caps))
    L.set_no_new_privs()
    if prog is not None:  # last: the filter may forbid what came before (keyctl, setgroups for some profiles)
        # seccomp was imported by the supervisor before it forked: no file is read here
        from taxiway.machines import seccomp

        seccomp.load(prog)


def _which(argv0: str, env: list[str]) -> str | None:
    if "/" in argv0:
        return argv0 if os.access(argv0, os.X_OK) and not os.path.isdir(argv0) else None
    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
    for d in path.split(":"):
        p = os.path.join(d or ".", argv0)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def child(spec: dict[str, Any], errw: int, stdio: tuple[int, int, int], joined: int = -1) -> None:
    """PID 1 of the machine between fork and exec. Never returns.

    ``joined``: a pipe the supervisor writes one byte to once it has moved us into
    the machine's cgroups (it does so while we build the root); only then do we
    enter a cgroup namespace rooted there. EOF instead of the byte: it failed.
    """
    try:
        for s in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # a session of its own (as runc): `kill 0` inside must not reach the CLI's process group
        os.setsid()
        if spec.get("tty_fd") is not None:  # the pty becomes the new session's controlling terminal
            import fcntl
            import termios

            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
        build_root(spec)
        L.sethostname(spec["hostname"])
        if spec["net"] != "host":
            L.loopback_up()
        if joined >= 0:
            ok = os.read(joined, 1)
            os.close(joined)
            if not ok:
                raise SetupError("could not join the machine's cgroups")
            L.unshare(L.CLONE_NEWCGROUP)
        env = spec["env"]
        if _which(spec["argv"][0], env) is None:
            raise SetupError(f"command {spec['argv'][0]!r} not found in the image (PATH and file checked)")
        wd = spec.get("workdir") or "/"
        try:
            os.makedirs(wd, exist_ok=True)
            os.chdir(wd)
        except (FileExistsError, NotADirectoryError):
            raise SetupError(f"working directory {wd} is not a directory in the image") from None
        for i, fd in enumerate(stdio):
            if fd != i:
                os.dup2(fd, i)
        _harden(spec, spec.get("seccomp_prog"))
        os.execve(INIT_PATH, [INIT_PATH, "--", *spec["argv"]], dict(e.split("=", 1) for e in env))
    except BaseException as e:  # noqa: BLE001 - everything must reach the supervisor
        msg = str(e) if isinstance(e, SetupError) else f"{e.__class__.__name__}: {e}"
        with contextlib.suppress(Exception):
            os.write(errw, msg.encode()[:4000])
    os._exit(127)


def spawn(spec: dict[str, Any], cgroup_procs: list[str], stdio: tuple[int, int, int]) -> tuple[int, str]:
    """Start the machine's PID 1 as our direct child. Returns (host pid, setup error or "").

    ``spec`` may name ``caps`` (default: :data:`linux.MACHINE_CAPS`) and ``seccomp_bpf`` (a compiled
    filter, None for none; default: Docker's profile for those caps).

    unshare(CLONE_NEWPID) makes our next child PID 1 of a new namespace; setns back to our
    own namespace right after, so later forks (and the next restart) happen as before.
    We move the child into its cgroups (on cgroup v1 each move can wait ~10 ms for an RCU
    grace period) while it builds its root, in parallel; it waits for that before it
    unshares its cgroup namespace (rooted at its own group) and long before it execs.
    """
    flags = L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC
    _buf = None  # the filter's bytes: alive until the child has forked
    if "seccomp_bpf" not in spec:  # a caller that names no filter (the builder's steps) gets Docker's default
        from taxiway.machines import seccomp
        from taxiway.machines.dirs import machines_dir

        caps = spec.get("caps")
        spec["seccomp_bpf"] = seccomp.filter_for(None, L.MACHINE_CAPS if caps is None else caps,
                                                 str(machines_dir() / ".seccomp"))
    if spec["seccomp_bpf"]:
        from taxiway.machines import seccomp

        spec["seccomp_prog"], _buf = seccomp.program(spec["seccomp_bpf"])
    netns = -1
    if spec["net"].startswith("/"):
        # the platform's private network: join the namespace it plugged (veth, address, routes)
        # in PID 1 before anything of the image runs, so the app never starts without its network
        try:
            netns = os.open(spec["net"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return 0, f"cannot open the machine's network namespace {spec['net']}: {e.strerror}"
    elif spec["net"] != "host":
        flags |= L.CLONE_NEWNET
    errr, errw = os.pipe2(os.O_CLOEXEC)
    joinr, joinw = os.pipe2(os.O_CLOEXEC)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.unshare(L.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(errr)
                os.close(joinw)
                L.unshare(flags)
                if netns >= 0:
                    L.setns(netns, L.CLONE_NEWNET)
                    os.close(netns)
            except BaseException as e:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    os.write(errw, f"{e.__class__.__name__}: {e}".encode())
                os._exit(127)
            child(spec, errw, stdio, joinr)
    finally:
        L.setns(own_pidns, L.CLONE_NEWPID)
        os.close(own_pidns)
        if netns >= 0:
            os.close(netns)
    os.close(errw)
    os.close(joinr)
    join_err = ""
    try:
        me = str(pid).encode()
        for p in cgroup_procs:
            fd = os.open(p, os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        os.write(joinw, b"1")
    except OSError as e:
        join_err = f"could not join the machine's cgroups: {e}"
    finally:
        os.close(joinw)
    err = b""
    while chunk := os.read(errr, 4096):
        err += chunk
    os.close(errr)
    return pid, (err.decode(errors="replace") or join_err)


def enter(pid: int, proc: dict[str, Any], argv: list[str], cgroup_procs: list[str], tty: bool = False,
          seccomp_bpf: bytes | None = None) -> int:
    """Run ``argv`` inside a running machine (``machines exec``); returns its exit status.

    ``proc`` carries the machine's user, env, workdir and ``caps``; ``seccomp_bpf`` its filter
    (None: no filter; the runtime passes the machine's own, see ``namespace_runtime.seccomp_filter``).
    """
    prog = None
    if seccomp_bpf:
        from taxiway.machines import seccomp

        prog, _buf = seccomp.program(seccomp_bpf)
    nss = []
    for ns, flag in (("cgroup", L.CLONE_NEWCGROUP), ("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS),
                     ("net", L.CLONE_NEWNET), ("pid", L.CLONE_NEWPID), ("mnt", L.CLONE_NEWNS)):
        nss.append((os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC), flag))
    errr, errw = os.pipe2(os.O_CLOEXEC)
    c = os.fork()
    if c == 0:
        try:
            # a group of its own: a Ctrl-C reaches the command once, forwarded by the CLI and by us
            os.setpgid(0, 0)
            os.close(errr)
            me = str(os.getpid()).encode()
            for p in cgroup_procs:
                with contextlib.suppress(OSError):
                    fd = os.open(p, os.O_WRONLY)
                    os.write(fd, me)
                    os.close(fd)
            for fd, flag in nss:
                L.setns(fd, flag)
            d = os.fork()
            if d == 0:
                for s in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.SIG_DFL)
                os.setsid()  # its own session (as runc's exec): `kill 0` stays inside the machine
                env = proc["env"]
                if _which(argv[0], env) is None:
                    raise SetupError(f"command {argv[0]!r} not found in the machine")
                try:
                    os.chdir(proc.get("workdir") or "/")
                except OSError:
                    os.chdir("/")
                _harden(proc, prog)
                os.execvpe(argv[0], argv, dict(e.split("=", 1) for e in env))
            for s in FORWARDED:
                signal.signal(s, forward_to(d))
            _, st = os.waitpid(d, 0)
            os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
        except BaseException as e:  # noqa: BLE001
            msg = str(e) if isinstance(e, SetupError) else f"{e.__class__.__name__}: {e}"
            with contextlib.suppress(Exception):
                os.write(errw, msg.encode())
            os._exit(127)
    os.close(errw)
    for fd, _ in nss:
        os.close(fd)
    # c is in a group of its own: a Ctrl-C, kill or hang-up of this CLI reaches the command through us
    with handling(forward_to(c)):
        _, st = os.waitpid(c, 0)
    err = b""
    while chunk := os.read(errr, 4096):
        err += chunk
    os.close(errr)
    if err:
        from taxiway.errors import TaxiwayError

        raise TaxiwayError(err.decode(errors="replace"), "check the command and the machine's image")
    return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


def etc_files(hostname: str, net: str, dns: dict[str, Any] | None = None) -> dict[str, str]:
    """The /etc/hosts, /etc/hostname and /etc/resolv.conf a machine sees (``dns``: MachineConfig.dns)."""
    hosts = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             f"127.0.1.1\t{hostname}\n")
    if dns and net != "host":
        hosts += "".join("\t".join(str(x) for x in entry) + "\n" for entry in dns.get("hosts") or [])
        resolv = "".join(f"nameserver {n}\n" for n in dns.get("nameservers") or [])
        if dns.get("searches"):
            resolv += "search " + " ".join(dns["searches"]) + "\n"
        if dns.get("options"):
            resolv += "options " + " ".join(dns["options"]) + "\n"
        return {"hosts": hosts, "hostname": hostname + "\n", "resolv.conf": resolv}
    if net == "host":
        with contextlib.suppress(OSError):
            hosts = Path("/etc/hosts").read_text() + f"127.0.1.1\t{hostname}\n"
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
    else:
        resolv = "# this machine's network is private: no DNS yet (the platform adds .internal)\n"
    return {"hosts": hosts, "hostname": hostname + "\n", "resolv.conf": resolv}
