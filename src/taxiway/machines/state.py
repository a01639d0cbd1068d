"""Machine records and their events, as files under ``$TAXIWAY_HOME/machines``.

One directory per machine::

    machines/<id>/machine.json   the record (config, state, pids, exit) — replaced atomically
    machines/<id>/events.jsonl   state changes, one JSON object a line (what the platform watches)
    machines/<id>/log            stdout/stderr, one line each: "<RFC3339 time> <stream> <text>"
    machines/<id>/upper, work    the machine's writable layer (overlay mode)
    machines/<id>/disk.ext4      ... or, with --storage-size, an ext4 file holding them (mounted at disk/)
    machines/.mnt, .etc          shared mount points: each machine mounts there in its own namespace
    machines/.trash/             removed machines, deleted in the background (deletes are slow on disk)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from taxiway.errors import InvalidInput, NotFound
from taxiway.machines.config import MachineConfig, Record

if False:  # typing only: not imported on the start path
    from typing import Any

STATES = ("created", "starting", "running", "stopping", "exited", "failed")


def private_dir(d: Path) -> Path:
    """``d`` made 0700, or tightened to 0700 if others can enter it.

    Machines' writable layers and unpacked snapshots keep the image's setuid files and
    device nodes: no other user of the host may reach them (podman's storage is 0700
    too). Their children are reachable only through these directories, so only the top
    ones need it.
    """
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        if os.stat(d).st_mode & 0o077:
            os.chmod(d, 0o700)
    return d


def machines_dir() -> Path:
    from taxiway.paths import home

    return private_dir(home() / "machines")


class Machine(Record):
    """A machine's record. ``reason`` is exited | oom-killed | signalled | error | stopped."""

    FIELDS = (
        ("id", Record.REQUIRED), ("name", Record.REQUIRED), ("config", Record.REQUIRED), ("image_digest", ""),
        ("chain", list), ("command", list),
        ("process", dict),  # argv, env, uid, gid, groups, workdir, hostname
        ("state", "created"),
        ("pid", None),  # the machine's init, seen from the host
        ("supervisor", None), ("exit_code", None), ("reason", None), ("signal", None), ("error", None),
        ("created", None), ("started", None), ("finished", None), ("restarts", 0), ("runtime", "namespace"),
        ("accel", None),
    )
    id: str
    name: str
    config: MachineConfig
    image_digest: str
    chain: list[str]
    command: list[str]
    process: dict[str, Any]
    state: str
    pid: int | None
    supervisor: int | None
    exit_code: int | None
    reason: str | None
    signal: int | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    restarts: int
    runtime: str
    accel: str | None

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if self.created is None:
            self.created = time.time()

    @property
    def dir(self) -> Path:
        return machines_dir() / self.id

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Machine:
        d = dict(d)
        d["config"] = MachineConfig.from_json(d["config"])
        known = {n for n, _ in cls.FIELDS}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self) -> None:
        data = json.dumps(self.to_json()).encode()
        p = self.dir / "machine.json"
        tmp = self.dir / f".machine.json.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)

    def event(self, kind: str, **detail: Any) -> None:
        """Record a state change (``kind``: created, start, exit, restart, stop, destroy...)."""
        ev = {"time": time.time(), "machine": self.id, "type": kind, "state": self.state, **detail}
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(ev) + "\n")

    def set_state(self, state: str, **detail: Any) -> None:
        self.state = state
        self.save()
        self.event(state, **detail)

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.dir / "events.jsonl") as f:
                return [json.loads(ln) for ln in f if ln.strip()]
        except FileNotFoundError:
            return []

    def alive(self) -> bool:
        """True if its init (or its VM) is still running."""
        return self.pid is not None and _alive(self.pid)

    def status(self) -> str:
        """The state, corrected if the process vanished without its supervisor noticing (kill -9)."""
        if self.state in ("running", "starting", "stopping") and not self.alive() and not (
                self.supervisor and _alive(self.supervisor)):
            return "exited"
        return self.state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def new_id() -> str:
    return os.urandom(7).hex()


_ADJ = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lively", "merry", "nimble",
        "proud", "quiet", "rapid", "swift", "witty", "bold", "bright", "cool", "daring")
_NOUN = ("falcon", "otter", "comet", "harbor", "meadow", "rocket", "glider", "beacon", "runway", "pilot",
         "tower", "hangar", "jet", "airship", "kite", "sparrow", "condor", "zephyr", "cirrus", "vector")


def new_name() -> str:
    r = os.urandom(4)
    return f"{_ADJ[r[0] % len(_ADJ)]}-{_NOUN[r[1] % len(_NOUN)]}-{r[2:].hex()}"


def valid_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", name):
        raise InvalidInput(f"invalid machine name {name!r}", "use letters, digits, '.', '_' or '-' (up to 63)")
    return name


def load(mid: str) -> Machine | None:
    try:
        with open(machines_dir() / mid / "machine.json", "rb") as f:
            return Machine.from_json(json.loads(f.read()))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def all_machines() -> list[Machine]:
    out = []
    for d in machines_dir().iterdir():
        if d.name.startswith("."):
            continue
        if d.is_dir() and not d.name.startswith("."):
            m = load(d.name)
            if m is not None:
                out.append(m)
    return sorted(out, key=lambda m: m.created)


def find(ref: str) -> Machine:
    """A machine by name, id or unique id prefix."""
    m = load(ref) if all(c in "0123456789abcdef" for c in ref) else None
    if m:
        return m
    ms = all_machines()
    for m in ms:
        if m.name == ref:
            return m
    hits = [m for m in ms if len(ref) >= 3 and m.id.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    raise NotFound(f"no machine {ref!r}", "see `taxiway machines ls -a`")


def name_taken(name: str) -> bool:
    return any(m.name == name for m in all_machines())


def remove_dir(path: Path) -> None:
    import shutil

    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def trash(path: Path) -> None:
    """Remove a machine directory: one rename now, the (slow, on this disk) unlinks in the background."""
    t = machines_dir() / ".trash"
    t.mkdir(exist_ok=True)
    try:
        os.rename(path, t / f"{path.name}-{os.urandom(3).hex()}")
    except FileNotFoundError:
        return
    empty_trash(background=True)


def empty_trash(background: bool = False) -> None:
    """Delete what :func:`trash` moved aside (in a detached child when ``background``)."""
    t = machines_dir() / ".trash"
    if background:
        # one fork, not waited for: the caller exits soon (its child is then adopted by init);
        # waiting would cost a scheduling round trip on every `run --rm`
        if os.fork():
            return
        try:
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1 << 16)
            import shutil

            for d in list(t.iterdir()):
                shutil.rmtree(d, ignore_errors=True)
        finally:
            os._exit(0)
    import shutil

    with contextlib.suppress(FileNotFoundError):
        for d in list(t.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
