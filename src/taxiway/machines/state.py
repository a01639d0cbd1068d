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
from typing import TYPE_CHECKING

from taxiway.errors import InvalidInput, NotFound
from taxiway.fsutil import atomic_write
from taxiway.machines.config import MachineConfig, Record
from taxiway.machines.dirs import machines_dir, private_dir
from taxiway.machines.procs import pid_alive

if TYPE_CHECKING:
    from typing import Any

__all__ = ["STATES", "Machine", "load", "find", "all_machines", "machines_dir", "private_dir", "new_id", "new_name",
           "valid_name", "name_taken", "remove_dir", "trash", "empty_trash"]

STATES = ("created", "starting", "running", "stopping", "exited", "failed")


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
        # No fsync, as before: a record is rewritten at every state change of every `taxiway run`
        # (start-up time), the rename keeps it whole when a process dies, and load() treats one a
        # power cut left unreadable as no machine. 0644 inside the 0700 machines directory, as before.
        with atomic_write(self.dir / "machine.json", 0o644, fsync=False) as f:
            f.write(data)

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
        return self.pid is not None and pid_alive(self.pid)

    def status(self) -> str:
        """The state, corrected if the process vanished without its supervisor noticing (kill -9)."""
        if self.state in ("running", "starting", "stopping") and not self.alive() and not (
                self.supervisor and pid_alive(self.supervisor)):
            return "exited"
        return self.state

    # A stop asked for (``machines stop``, ``rm -f``) is a file in the machine's directory: the supervisor,
    # another process, sees it, and then applies no restart policy.

    def request_stop(self) -> None:
        """Mark the machine as stopped on purpose: its supervisor will not restart it."""
        (self.dir / "stop-requested").touch()

    def stop_requested(self) -> bool:
        """Was a stop asked for since the last start?"""
        return (self.dir / "stop-requested").exists()

    def clear_stop(self) -> None:
        """Forget an earlier stop (``machines start``)."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "stop-requested").unlink()


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
            from taxiway.machines.stdio import detach_stdio

            detach_stdio()
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
