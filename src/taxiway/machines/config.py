"""What a machine is asked to be: :class:`MachineConfig`, and the image-config rules.

The config mirrors Fly's Machines API (image, env, guest size, services and
ports, mounts, restart policy, checks) so the platform can hand one straight
to the runtime. The functions below are pure: they turn an image config plus
user options into the process to run, and are unit-tested without root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput

if TYPE_CHECKING:
    from typing import Any

MIN_MEMORY = 6 * 1024 * 1024  # the kernel needs some room; Docker's floor too


class Record:
    """A plain record: fields (name, default) in ``FIELDS``; a list/dict default is copied per instance.

    What the machines part needs of a dataclass (keyword and positional construction, equality,
    repr, conversion to JSON), without importing ``dataclasses`` on the start path.
    """

    FIELDS: tuple[tuple[str, Any], ...] = ()
    REQUIRED = object()

    def __init__(self, *args: Any, **kw: Any) -> None:
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.FIELDS)} positional arguments")
        for (name, _), v in zip(self.FIELDS, args, strict=False):
            if name in kw:
                raise TypeError(f"{type(self).__name__} got {name!r} twice")
            kw[name] = v
        for name, default in self.FIELDS:
            if name in kw:
                setattr(self, name, kw.pop(name))
            elif default is Record.REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
            elif isinstance(default, type):  # a factory: list, dict or a Record class
                setattr(self, name, default())
            else:
                setattr(self, name, default)
        if kw:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kw))!r}")

    def to_json(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name, _ in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n, _ in self.FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self.FIELDS) + ")"


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


_R = Record.REQUIRED


class Guest(Record):
    """Guest size: memory in bytes, CPUs (fractional), maximum number of tasks."""

    FIELDS = (("memory", None), ("cpus", None), ("pids", None))
    memory: int | None
    cpus: float | None
    pids: int | None


MOUNT_TYPES = ("bind", "ext4-image")


class Mount(Record):
    """``bind``: a host directory or file; ``ext4-image``: an ext4 file (a platform volume, made by
    the agent) loop-mounted in the machine's own mount namespace, so its size is a hard limit."""

    FIELDS = (("source", _R), ("target", _R), ("readonly", False), ("type", "bind"))
    source: str
    target: str
    readonly: bool
    type: str


class Port(Record):
    FIELDS = (("host_port", _R), ("port", _R), ("host", "127.0.0.1"))
    host_port: int
    port: int
    host: str


class Restart(Record):
    FIELDS = (("policy", "no"),  # no | on-failure | always
              ("max_retries", 0))  # 0 = unlimited (on-failure)
    policy: str
    max_retries: int


class MachineConfig(Record):
    """Everything needed to (re)create a machine; stored with it as JSON."""

    FIELDS = (
        ("image", _R), ("cmd", None), ("entrypoint", None), ("env", dict), ("workdir", None), ("user", None),
        ("hostname", None), ("guest", Guest), ("ports", list), ("mounts", list), ("restart", Restart),
        ("checks", dict),
        ("net", "private"),  # none | host | private | /path: join that network namespace file (the platform's)
        ("isolation", "namespace"),  # namespace | vm
        ("auto_remove", False), ("tty", False), ("interactive", False), ("stop_signal", None),
        ("stop_timeout", 10.0),
        ("vm_accel", "auto"),  # auto | kvm | tcg
        ("cap_add", list), ("cap_drop", list),
        ("seccomp", None),  # None: Docker's default profile; "unconfined"; or a profile (Docker's JSON format)
        ("storage_size", None),  # bytes: the writable layer is an ext4 file of this size; None: no cap
        # /etc/resolv.conf and extra /etc/hosts lines: {"nameservers": [...], "searches": [...], "options": [...],
        # "hosts": [[address, name...], ...]} (Fly's config.dns plus hosts); None: the runtime's default
        ("dns", None),
        # the machine's address on that network namespace (net = a path): a micro-VM's guest takes it over
        ("private_ip", None),
    )
    image: str
    cmd: list[str] | None
    entrypoint: list[str] | None
    env: dict[str, str]
    workdir: str | None
    user: str | None
    hostname: str | None
    guest: Guest
    ports: list[Port]
    mounts: list[Mount]
    restart: Restart
    checks: dict[str, Any]
    net: str
    isolation: str
    auto_remove: bool
    tty: bool
    interactive: bool
    stop_signal: str | None
    stop_timeout: float
    vm_accel: str
    cap_add: list[str]
    cap_drop: list[str]
    seccomp: str | dict[str, Any] | None
    storage_size: int | None
    dns: dict[str, Any] | None
    private_ip: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MachineConfig:
        d = dict(d)
        d["guest"] = Guest(**d.get("guest", {}))
        d["ports"] = [Port(**p) for p in d.get("ports", [])]
        d["mounts"] = [Mount(**m) for m in d.get("mounts", [])]
        d["restart"] = Restart(**d.get("restart", {}))
        known = {n for n, _ in cls.FIELDS}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- parsing user options -------------------------------------------------------

def parse_size(s: str) -> int:
    """``512m``, ``1g``, ``1048576`` -> bytes."""
    import re

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", s, re.I)
    if not m:
        raise InvalidInput(f"invalid size {s!r}", "use a number with an optional unit, e.g. 64m or 1g")
    n = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(n)


def parse_storage_size(s: str) -> int:
    """``--storage-size``: at least 8m (a smaller ext4 has no room for its own metadata)."""
    n = parse_size(s)
    if n < 8 << 20:
        raise InvalidInput(f"storage size {s} is below the minimum of 8m", "use --storage-size 8m or more")
    return n


def parse_memory(s: str) -> int:
    import os

    n = parse_size(s)
    if n < MIN_MEMORY:
        raise InvalidInput(f"memory limit {s} is below the minimum of 6m the kernel needs to run a machine",
                           "use --memory 6m or more")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if n > total:
        raise InvalidInput(f"memory limit {s} is more than this host has ({total >> 20}m)",
                           f"use --memory {total >> 20}m or less")
    return n


# Where a volume would be hidden by (or would hide) what the runtime mounts itself.
_RESERVED_TARGETS = ("/", "/proc", "/sys", "/dev", "/dev/init", "/dev/pts", "/dev/shm", "/dev/mqueue",
                     "/dev/console")


def reserved_target(dst: str) -> bool:
    """Whether ``dst`` (a clean absolute path in the machine) is where the runtime mounts its own."""
    return dst in _RESERVED_TARGETS or dst.startswith(("/proc/", "/sys/", "/dev/"))


def check_volume_target(dst: str) -> None:
    """Refuse -v targets the runtime mounts over (/proc, /sys, /dev...): the volume would be hidden.

    The runtime checks again where the target leads inside the image (``/procl -> /proc``)."""
    if reserved_target(dst):
        raise InvalidInput(f"volume target {dst} is reserved: the machine's own {dst.split('/')[1] or '/'} is mounted there",
                           "mount the volume somewhere else, e.g. -v HOSTDIR:/data")


def check_hostname(name: str) -> None:
    """A hostname the kernel takes: 1-64 characters, letters, digits, '-' and '.' (RFC 1123)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?", name):
        raise InvalidInput(f"invalid hostname {name[:80]!r}",
                           "use at most 64 letters, digits, '-' and '.', starting and ending with a letter or digit")


def parse_security_opt(items: list[str]) -> str | dict[str, Any] | None:
    """``--security-opt`` values as Docker takes them: ``seccomp=unconfined``, ``seccomp=PROFILE.json``,
    ``no-new-privileges`` (always on here). Returns the seccomp setting for :class:`MachineConfig`."""
    out: str | dict[str, Any] | None = None
    for item in items:
        k, sep, v = item.partition("=" if "=" in item else ":")
        if k == "no-new-privileges" and (not sep or v == "true"):
            continue
        if k == "seccomp" and v:
            if v == "unconfined":
                out = "unconfined"
            else:
                from taxiway.machines.seccomp import load_profile

                out = load_profile(v)
            continue
        raise InvalidInput(f"unsupported --security-opt {item!r}",
                           "use seccomp=unconfined, seccomp=/path/profile.json or no-new-privileges")
    return out


def parse_restart(s: str) -> Restart:
    """``no``, ``always``, ``on-failure``, ``on-failure:N``."""
    policy, _, n = s.partition(":")
    if policy not in ("no", "always", "on-failure") or (n and (policy != "on-failure" or not n.isdigit())):
        raise InvalidInput(f"invalid restart policy {s!r}", "use no, always, on-failure or on-failure:N")
    return Restart(policy, int(n) if n else 0)


def parse_env(items: list[str], env_files: list[str] = ()) -> dict[str, str]:
    """``-e K=V`` (``-e K`` takes K from our environment) and ``--env-file`` lines."""
    import os

    out: dict[str, str] = {}
    lines: list[str] = []
    for path in env_files:
        try:
            with open(path) as f:
                lines += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as e:
            raise InvalidInput(f"cannot read env file {path}: {e.strerror}", "pass an existing file to --env-file") from None
    for item in [*lines, *items]:
        k, eq, v = item.partition("=")
        if not k or any(c.isspace() for c in k):
            raise InvalidInput(f"invalid environment variable {item!r}", "use -e NAME=VALUE")
        if not eq:
            if k not in os.environ:
                continue
            v = os.environ[k]
        out[k] = v
    return out


def parse_volume(s: str) -> Mount:
    """``HOSTDIR:DIR[:ro|rw]``; HOSTDIR must exist."""
    import os

    parts = s.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidInput(f"invalid volume {s!r}", "use -v HOSTDIR:DIR[:ro]")
    src, dst = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise InvalidInput(f"invalid volume mode {mode!r} in {s!r}", "use :ro or :rw")
    if not dst.startswith("/"):
        raise InvalidInput(f"volume target {dst!r} is not an absolute path", "use -v HOSTDIR:/path/in/machine")
    dst = os.path.normpath("/" + dst.lstrip("/"))
    check_volume_target(dst)
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise InvalidInput(f"host path {src} for -v does not exist", f"create it first (mkdir -p {src})")
    return Mount(src, dst, mode == "ro")


def parse_port(s: str) -> Port:
    """``HOSTPORT:PORT`` (forwarded from 127.0.0.1 only)."""
    hp, _, p = s.rpartition(":")
    if hp.startswith("127.0.0.1:"):
        hp = hp.removeprefix("127.0.0.1:")
    if not hp.isdigit() or not p.isdigit() or not (0 < int(hp) < 65536 and 0 < int(p) < 65536):
        raise InvalidInput(f"invalid port mapping {s!r}", "use -p HOSTPORT:PORT, e.g. -p 8080:80")
    return Port(int(hp), int(p))


# -- image config semantics ---------------------------------------------------------


def command(image_config: dict[str, Any], cmd: list[str] | None, entrypoint: list[str] | None) -> list[str]:
    """Entrypoint + Cmd as Docker does: CMD replaces Cmd; --entrypoint replaces Entrypoint (and drops Cmd)."""
    ic = image_config.get("config") or {}
    if entrypoint is not None:
        ep = [e for e in entrypoint if e != ""]
        args = cmd or []
    else:
        ep = list(ic.get("Entrypoint") or [])
        args = cmd if cmd else list(ic.get("Cmd") or [])
    argv = ep + args
    if not argv:
        raise InvalidInput("the image has no command to run (no Entrypoint or Cmd)",
                           "give one after the image name, e.g. `taxiway run IMAGE /bin/sh`")
    return argv


def environment(image_config: dict[str, Any], env: dict[str, str], hostname: str, home: str | None) -> list[str]:
    """Image Env, then the user's; PATH, HOSTNAME and HOME filled in as Docker does."""
    out: dict[str, str] = {}
    for item in (image_config.get("config") or {}).get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    out.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    out["HOSTNAME"] = hostname
    out.update(env)
    if home and "HOME" not in out:
        out["HOME"] = home
    return [f"{k}={v}" for k, v in out.items()]


def parse_passwd(text: str) -> list[tuple[str, int, int, str]]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 6 and f[2].isdigit() and f[3].isdigit():
            out.append((f[0], int(f[2]), int(f[3]), f[5]))
    return out


def parse_group(text: str) -> list[tuple[str, int, list[str]]]:
    out = []
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 3 and f[2].isdigit():
            out.append((f[0], int(f[2]), [m for m in (f[3] if len(f) > 3 else "").split(",") if m]))
    return out


def resolve_user(spec: str | None, passwd: str | None, group: str | None, image: str = "the image") -> tuple[int, int, list[int], str]:
    """``user[:group]`` (names or ids) -> (uid, gid, supplementary gids, home), from the image's files."""
    spec = spec or "0"
    u, _, g = spec.partition(":")
    users = parse_passwd(passwd or "")
    groups = parse_group(group or "")
    home = "/"
    if u.isdigit():
        uid = int(u)
        match = [x for x in users if x[1] == uid]
        gid = match[0][2] if match else 0
        name = match[0][0] if match else None
        if match:
            home = match[0][3]
    else:
        match = [x for x in users if x[0] == u]
        if not match:
            raise InvalidInput(f"user {u!r} does not exist in {image} (/etc/passwd)",
                               "pass a user from the image or a numeric id, e.g. -u 1000")
        name, uid, gid, home = match[0]
    if g:
        if g.isdigit():
            gid = int(g)
        else:
            gm = [x for x in groups if x[0] == g]
            if not gm:
                raise InvalidInput(f"group {g!r} does not exist in {image} (/etc/group)",
                                   "pass a group from the image or a numeric id, e.g. -u 1000:1000")
            gid = gm[0][1]
    extra = sorted({x[1] for x in groups if name and name in x[2] and x[1] != gid})
    if uid == 0 and home == "/" and not [x for x in users if x[1] == 0]:
        home = "/root"
    return uid, gid, extra, home or "/"


STOP_SIGNALS = {"SIGTERM": 15, "SIGINT": 2, "SIGQUIT": 3, "SIGKILL": 9, "SIGHUP": 1, "SIGUSR1": 10, "SIGUSR2": 12,
                "SIGWINCH": 28}


def parse_signal(s: str | None, default: int = 15) -> int:
    if not s:
        return default
    t = s.upper()
    if t.isdigit():
        return int(t)
    if not t.startswith("SIG"):
        t = "SIG" + t
    if t not in STOP_SIGNALS:
        import signal as _s

        try:
            return int(getattr(_s, t))
        except AttributeError:
            raise InvalidInput(f"unknown signal {s!r}", "use a name like SIGTERM or a number") from None
    return STOP_SIGNALS[t]
