"""The host agent: runs this host's machines as the MACHINES bucket asks, and reports what really runs.

    python -m taxiway.platform.agent --nats URL [--host local] [--region local]

As Fly's flyd, the agent is the source of truth for its host:

- **its own SQLite record** (``$TAXIWAY_HOME/platform/agent/agent.sqlite``): platform machine id <->
  local taxiway machine id, app, instance_id, host ports, the MACHINES revision last acted on, and
  how far each machine's log and event files have been shipped;
- **commands** by request/reply on ``agent.<host>.<verb>`` (create, start, stop, restart, destroy,
  signal, exec, list, ping), each reading the machine's MACHINES record (desired state);
- **reconcile** at start and on every MACHINES change (a KV watch): :func:`decide` (pure) says
  what to do with one machine given its desired record, our row and the local machine;
- **observe**: one loop reads each machine's record (taxiway.machines), writes STATUS (the agent is
  its only writer), ships the machine's ``events.jsonl`` to ``events.<app>.<id>`` and its log to
  ``logs.<app>.<region>.<id>`` from where it left off (offsets in SQLite: an agent restart repeats
  at most one batch), and runs health checks (:mod:`taxiway.platform.checks`) into STATUS.checks.

Machines run detached (each under its own supervisor process), so ``kill -9`` of the agent leaves
them running; the next agent ADOPTS them (never restarts them). Restart policy (no, always,
on-failure with a retry limit) is applied by each machine's own supervisor (it is in the
machine's config), so it holds while no agent runs; the agent reports each restart as an event.

Starting a machine forks its supervisor; the agent does it in a short helper process
(``python -m taxiway.platform.agent helper start ID``), never in its own process, so no
supervisor inherits the agent's NATS socket, its SQLite file or its threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput, NotFound, TaxiwayError

log = logging.getLogger("taxiway.agent")

# local machine state (taxiway.machines) -> Fly's machine state
FLY_STATE = {"created": "created", "starting": "starting", "running": "started", "stopping": "stopping",
             "exited": "stopped", "failed": "failed"}
# local event type -> the event type published on events.<app>.<id>
EVENT_TYPE = {"created": "create", "starting": "starting", "running": "start", "exited": "exit",
              "restart": "restart", "stopping": "stop", "failed": "failed"}
LOG_BATCH = 1000   # lines shipped per machine per tick: one chatty machine can't starve the others
EXEC_OUTPUT_MAX = 1 << 20


# -- the pure core ---------------------------------------------------------------------------------


def decide(desired: dict[str, Any] | None, rev: int, row: dict[str, Any] | None,
           local: dict[str, Any] | None) -> list[str]:
    """What to do with one machine: a list of "create", "recreate", "start", "stop", "destroy".

    ``desired``: its MACHINES record (None: deleted) at revision ``rev``; ``row``: our SQLite row
    (None: unknown here); ``local``: {"state": local status, "orphan": bool} of the local machine
    (None: no local machine). A machine desired "started" that is not running is started when
    it never ran, when the desired record changed since we last acted on it, or when its
    supervisor vanished (a host restart, kill -9): a machine that stopped on its own after its
    restart policy gave up stays stopped until someone asks again.
    """
    target = (desired or {}).get("desired", "started") if desired else "destroyed"
    if target == "destroyed":
        return ["destroy"] if (row is not None or local is not None) else []
    acted = (row or {}).get("acted_rev", 0)
    if row is None or local is None:
        return ["create", "start"] if target == "started" else ["create"]
    if desired.get("instance_id") and row.get("instance_id") != desired.get("instance_id"):
        return ["recreate", "start"] if target == "started" else ["recreate"]
    running = local["state"] in ("running", "starting") and not local.get("orphan")
    if target == "started" and not running:
        if local["state"] == "created" or rev > acted or local.get("orphan"):
            return ["start"]
    if target == "stopped" and local["state"] in ("running", "starting"):
        return ["stop"]
    return []


def machine_config(record: dict[str, Any], host_ports: dict[int, int], env: dict[str, str],
                   volumes_dir: Path) -> dict[str, Any]:
    """The taxiway.machines config (JSON) for a MACHINES record: ports published on 127.0.0.1,
    secrets merged into the environment, volumes as ext4 files ``<volumes_dir>/<id>.img`` mounted
    in the machine (their size is a hard limit). A directory ``<volumes_dir>/<id>`` (a volume made
    before sizes were enforced) stays a bind mount, and so does every volume of a micro-VM
    (virtiofsd shares directories)."""
    cfg = dict(record.get("config") or {})
    if not cfg.get("image"):
        raise InvalidInput(f"machine {record.get('id')} has no image in its config", "set config.image")
    out = {k: v for k, v in cfg.items() if k not in ("services", "checks", "metadata", "ports", "mounts")}
    out["env"] = {**(cfg.get("env") or {}), **env}
    guest = dict(cfg.get("guest") or {})
    if "memory_mb" in guest:  # Fly's guest shape
        guest["memory"] = int(guest.pop("memory_mb")) << 20
    out["guest"] = {k: guest.get(k) for k in ("memory", "cpus", "pids") if guest.get(k) is not None}
    out["ports"] = [{"host_port": hp, "port": p, "host": "127.0.0.1"} for p, hp in sorted(host_ports.items())]
    mounts = []
    for m in cfg.get("mounts") or []:
        # Only platform volumes {"volume", "path"} (platform.policy checked they are the app's): never a
        # host path, which would give a tenant the host.
        vol = str(m.get("volume") or "")
        if not vol or "/" in vol or vol in (".", "..") or "source" in m:
            raise InvalidInput(f"invalid volume {vol!r} in machine {record.get('id')}", "mount a volume by its id")
        ro = bool(m.get("readonly", False))
        if cfg.get("isolation") == "vm" or (volumes_dir / vol).is_dir():
            mounts.append({"source": str(volumes_dir / vol), "target": m.get("path"), "readonly": ro})
        else:
            mounts.append({"type": "ext4-image", "source": str(volumes_dir / f"{vol}.img"),
                           "target": m.get("path"), "readonly": ro})
    out["mounts"] = mounts
    out.setdefault("net", "private")
    out.pop("auto_remove", None)  # the platform destroys machines itself
    return out


def published_ports(config: dict[str, Any]) -> list[int]:
    """Internal ports to publish on the host: every service's internal_port and every check's port."""
    from taxiway.platform import checks

    ports = {int(s["internal_port"]) for s in config.get("services") or [] if s.get("internal_port")}
    return sorted(ports | set(checks.ports(config)))


# -- the SQLite record -----------------------------------------------------------------------------


_COLUMNS = ("id", "app", "region", "local_id", "instance_id", "ports", "restarts", "acted_rev",
            "log_inode", "log_offset", "events_offset", "created_at", "updated_at", "net_org", "net_field")


class Record:
    """The agent's own record of its machines (one row each); used from the event loop's thread only.

    SQLite is the durable copy; reads come from a dict kept in step with every write, since
    the agent looks at every row on every observation.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS machines (
            id TEXT PRIMARY KEY, app TEXT NOT NULL, region TEXT NOT NULL, local_id TEXT, instance_id TEXT,
            ports TEXT NOT NULL DEFAULT '{}', restarts INTEGER NOT NULL DEFAULT 0,
            acted_rev INTEGER NOT NULL DEFAULT 0, log_inode INTEGER, log_offset INTEGER NOT NULL DEFAULT 0,
            events_offset INTEGER NOT NULL DEFAULT 0, created_at REAL, updated_at REAL)""")
        # the private network (platform.network): org network number and machine field, kept per platform
        # machine id so a restart or recreate keeps the address; fields are never handed out twice
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(machines)")}
        for c in ("net_org", "net_field"):
            if c not in cols:
                self.db.execute(f"ALTER TABLE machines ADD COLUMN {c} INTEGER")
        self.db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self.rows = {r["id"]: r for r in (self._row(t) for t in
                                          self.db.execute(f"SELECT {','.join(_COLUMNS)} FROM machines"))}

    def _row(self, r: tuple) -> dict[str, Any]:
        d = dict(zip(_COLUMNS, r, strict=True))
        d["ports"] = {int(k): v for k, v in json.loads(d["ports"] or "{}").items()}
        return d

    def all(self) -> list[dict[str, Any]]:
        return [dict(self.rows[k]) for k in sorted(self.rows)]

    def get(self, mid: str) -> dict[str, Any] | None:
        r = self.rows.get(mid)
        return dict(r) if r is not None else None

    def put(self, row: dict[str, Any]) -> None:
        row = dict(row, updated_at=time.time())
        row.setdefault("created_at", row["updated_at"])
        vals = [json.dumps({str(k): v for k, v in row.get("ports", {}).items()}) if c == "ports" else row.get(c)
                for c in _COLUMNS]
        for c, default in (("restarts", 0), ("acted_rev", 0), ("log_offset", 0), ("events_offset", 0)):
            i = _COLUMNS.index(c)
            vals[i] = default if vals[i] is None else vals[i]
        self.db.execute(f"INSERT OR REPLACE INTO machines ({','.join(_COLUMNS)}) VALUES "
                        f"({','.join('?' * len(_COLUMNS))})", vals)
        self.rows[row["id"]] = self._row(tuple(vals))

    def set(self, mid: str, **fields: Any) -> None:
        now = time.time()
        db = dict(fields)
        if "ports" in db:
            db["ports"] = json.dumps({str(k): v for k, v in db["ports"].items()})
        sets = ",".join(f"{k}=?" for k in db)
        self.db.execute(f"UPDATE machines SET {sets}, updated_at=? WHERE id=?", (*db.values(), now, mid))
        if mid in self.rows:
            self.rows[mid] = {**self.rows[mid], **fields, "updated_at": now}

    def next_field(self) -> int:
        """A machine field of the private network never handed out on this host before."""
        used = max([r.get("net_field") or 0 for r in self.rows.values()] + [0])
        got = self.db.execute("SELECT value FROM counters WHERE name='net_field'").fetchone()
        n = max(used, got[0] if got else 0) + 1
        self.db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('net_field', ?)", (n,))
        return n

    def delete(self, mid: str) -> None:
        self.db.execute("DELETE FROM machines WHERE id=?", (mid,))
        self.rows.pop(mid, None)

    def close(self) -> None:
        self.db.close()


# -- machine operations (blocking: run in threads, or in a helper process when they fork) ------------


_LOADED: dict[str, tuple[Path, tuple[int, int, int], Any]] = {}


def _local(local_id: str | None) -> Any:
    """The local machine's record; re-read only when its file changed (each save replaces it)."""
    from taxiway import machines

    if not local_id:
        return None
    hit = _LOADED.get(local_id)
    if hit is not None:
        try:
            st = os.stat(hit[0])
            if (st.st_ino, st.st_mtime_ns, st.st_size) == hit[1]:
                return hit[2]
        except OSError:
            pass
    _LOADED.pop(local_id, None)
    m = machines.load(local_id)
    if m is not None:
        path = m.dir / "machine.json"
        with contextlib.suppress(OSError):
            st = os.stat(path)
            # a save between load and stat would be missed until the next one: re-check the content
            if machines.load(local_id) == m:
                _LOADED[local_id] = (path, (st.st_ino, st.st_mtime_ns, st.st_size), m)
    return m


def _local_view(m: Any) -> dict[str, Any] | None:
    if m is None:
        return None
    st = m.status()
    return {"state": st, "orphan": st != m.state}


def _ensure_image(ref: str, org: str, auth: dict[str, Any]) -> str:
    """The local name of ``ref`` for a machine of ``org``, pulled first if this host lacks it.

    Images of the platform registry are pulled with a pull token of the machine's own org (the
    registry resolves names inside that org, so another org's image can't even be named) and kept
    under ``<registry>/<org>/<name>``: an image one org pulled is never found for another.
    ``auth`` is :func:`_registry_auth`'s; without a registry only the local store is used."""
    from taxiway.oci.reference import Reference
    from taxiway.oci.store import Store
    from taxiway.platform import policy

    registry = auth.get("registry")
    store = Store()
    if policy.image_source(ref, registry) == "local":
        store.image(ref)  # NotFound: nothing is pulled from anywhere
        return ref
    parsed = Reference.parse(ref)
    local = str(Reference.parse(f"{registry}/{org}/{parsed.repository}{_suffix(parsed)}"))
    try:
        store.image(local)
        return local
    except NotFound:
        pass
    from taxiway.oci.pull import pull

    client = _OrgClient(registry, org, credentials=_org_credentials(auth, org))
    with client:
        pull(local, store=store, client=client)
    return local


def _suffix(ref: Any) -> str:
    return (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else "")


def _org_client_class() -> Any:
    from taxiway.oci.client import RegistryClient

    class OrgClient(RegistryClient):
        """A registry client for names kept locally as ``<org>/<name>``: it asks the registry for
        ``<name>``, which the registry itself resolves inside the token's org."""

        def __init__(self, registry: str, org: str, **kw: Any) -> None:
            super().__init__(registry, **kw)
            self._prefix = org + "/"

        def request(self, method: str, path: str, *, repository: str, **kw: Any) -> Any:
            if repository.startswith(self._prefix):
                bare = repository[len(self._prefix):]
                path = path.replace(f"/v2/{repository}/", f"/v2/{bare}/", 1)
                repository = bare
            return super().request(method, path, repository=repository, **kw)

    return OrgClient


def _OrgClient(registry: str, org: str, **kw: Any) -> Any:  # noqa: N802 (a lazily made class)
    return _org_client_class()(registry, org, **kw)


_TOKENS: dict[str, tuple[str, float]] = {}  # org -> (pull token, expires at): minted once an hour
TOKEN_LIFETIME = 3600.0


def _registry_auth() -> dict[str, Any]:
    """$TAXIWAY_HOME/platform/agent/registry-auth.json (written by ``taxiway up``, 0600):
    {"registry": "127.0.0.1:PORT", "tenants": "<registry root>/tenants.db"}; {} without one."""
    from taxiway.paths import home

    p = home() / "platform" / "agent" / "registry-auth.json"
    try:
        got = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(got, dict):
        return {}
    if not got.get("registry") and isinstance(got.get("auths"), dict) and got["auths"]:
        got["registry"] = next(iter(got["auths"]))  # the older shape: one org's token
    return got


def _org_credentials(auth: dict[str, Any], org: str) -> Any:
    """Basic credentials (org, a pull token of that org) minted in the registry's tenants database."""
    from taxiway.oci.auth import Credentials

    cached = _TOKENS.get(org)
    if cached and cached[1] > time.time() + 300:
        return Credentials(org, cached[0])
    tenants = auth.get("tenants")
    if not tenants:
        # The older registry-auth.json: a single org's token, good for that org only.
        entry = (auth.get("auths") or {}).get(auth.get("registry")) or {}
        if entry.get("username") == org and entry.get("password"):
            return Credentials(org, entry["password"])
        raise TaxiwayError(f"no registry credentials for org {org} on this host",
                           "restart the platform (taxiway down; taxiway up) so the agent can mint them")
    from taxiway.registry.tenants import Tenants

    t = Tenants(tenants)
    try:
        if not t.has_org(org):
            raise NotFound(f"org {org} has no images on the platform registry", "push the image first")
        _, secret = t.create_token(org, "pull", expires_in=TOKEN_LIFETIME)
    finally:
        t.close()
    _TOKENS[org] = (secret, time.time() + TOKEN_LIFETIME)
    return Credentials(org, secret)


def make_volume_image(path: Path, size: int) -> None:
    """A volume's ext4 file (sparse: the host's disk holds only what is written), made once;
    written beside and renamed, so a killed agent never leaves a half-made one in its place."""
    import subprocess

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.truncate(size)
        # -m 0: the size asked for is what the machine gets. mkfs's discard of the fresh file lets it
        # mark the inode tables zeroed (else the kernel zeroes them after mount: GBs of a 1 TB volume
        # on the host's disk) and the journal needs no zeroes either: a 10 GB volume costs ~4 MB.
        # With a journal, a machine killed mid-write is replayed at the next mount.
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", path.stem[-16:],
                            "-E", "lazy_journal_init=1", str(tmp)],
                           capture_output=True)
        if r.returncode != 0:
            raise TaxiwayError(f"could not make volume {path.stem}: {r.stderr.decode(errors='replace').strip()[:300]}",
                               "check that e2fsprogs is installed and the host's disk has room")
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _mounts_volume(local_id: str | None, vid: Any) -> bool:
    """Whether a local machine (running or not) mounts volume ``vid``."""
    m = _local(local_id)
    return m is not None and any(Path(x.source).name in (str(vid), f"{vid}.img") for x in m.config.mounts)


def _remove_volume(app_dir: Path, vid: Any) -> dict[str, Any]:
    """Remove one volume's data on this host: its ext4 file (refused while a machine has it
    mounted: the file's lock is held by the loop device) or its older directory."""
    import fcntl
    import re
    import shutil

    if not isinstance(vid, str) or not re.fullmatch(r"vol_[0-9a-f]{16}", vid):
        raise InvalidInput("the request names no valid volume", 'send {"app": "<name>", "volume": "vol_..."}')
    img = app_dir / f"{vid}.img"
    with contextlib.suppress(FileNotFoundError), open(img, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput(f"volume {vid} is mounted by a machine", "destroy that machine first") from None
        img.unlink()
    if (app_dir / vid).is_dir():
        shutil.rmtree(app_dir / vid)
    return {"ok": True, "removed": vid}


def _create_local(name: str, cfg: dict[str, Any], org: str, sizes: dict[str, int] | None = None) -> str:
    """``sizes``: the app's volume sizes by id (VOLUMES), for images made at first mount."""
    from taxiway import machines

    with contextlib.suppress(NotFound):  # a machine half-made by an agent killed before it noted it
        old = machines.find(name)
        if old.name == name:
            machines.destroy(old, force=True)
    for mnt in cfg.get("mounts") or []:
        src = Path(mnt["source"])
        if mnt.get("type") == "ext4-image":
            make_volume_image(src, (sizes or {}).get(src.stem) or 1 << 30)
            continue
        if src.with_name(src.name + ".img").exists():
            raise InvalidInput(f"volume {src.name} is an ext4 file, which a micro-VM cannot mount",
                               "mount it from a namespace machine, or give the VM a new volume")
        src.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg = {**cfg, "image": _ensure_image(cfg["image"], org, _registry_auth())}
    m = machines.create(machines.MachineConfig.from_json(cfg), name)
    return m.id


def _stop_local(local_id: str, sig: int | None, timeout: float | None) -> None:
    from taxiway import machines

    m = machines.load(local_id)
    if m is not None:
        machines.stop(m, sig, timeout)


def _destroy_local(local_id: str | None) -> None:
    from taxiway import machines

    m = machines.load(local_id) if local_id else None
    _LOADED.pop(local_id or "", None)
    if m is not None:
        machines.destroy(m, force=True)


def _read_new(path: Path, inode: int | None, offset: int, limit: int = 4 << 20) -> tuple[list[bytes], int, int]:
    """Whole lines appended to ``path`` since (inode, offset); returns (lines, inode, offset).

    A rotation (``log`` renamed to ``log.1``) is followed: the rest of the old file first.
    """
    lines: list[bytes] = []
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [], inode or 0, offset
    if (not inode or st.st_ino == inode) and st.st_size == offset:
        return [], st.st_ino, offset  # nothing new: the common case, without opening the file
    if inode and st.st_ino != inode:
        old = path.with_name(path.name + ".1")
        with contextlib.suppress(OSError), open(old, "rb") as f:
            if os.fstat(f.fileno()).st_ino == inode:
                f.seek(offset)
                data = f.read(limit)
                lines += data[: data.rfind(b"\n") + 1].splitlines()
        offset = 0
    if st.st_size < offset:  # truncated or replaced in place: start over
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
    end = data.rfind(b"\n") + 1
    lines += data[:end].splitlines()
    return lines, st.st_ino, offset + end


# -- the agent ----------------------------------------------------------------------------------------


class Agent:
    """One host's agent over a connected :class:`~taxiway.platform.state.State`."""

    def __init__(self, state: Any, host: str = "local", region: str = "local", home: Path | None = None,
                 poll: float = 0.5, private_network: bool = True) -> None:
        from taxiway.paths import home as taxiway_home

        self.st = state
        self.host = host
        self.region = region
        self.home = home or taxiway_home()
        self.dir = self.home / "platform" / "agent"
        self.rec = Record(self.dir / "agent.sqlite")
        self.poll = poll
        self.status: dict[str, dict[str, Any]] = {}     # platform id -> STATUS as last written
        self.locks: dict[str, asyncio.Lock] = {}
        self.check_tasks: dict[str, tuple[Any, asyncio.Task]] = {}
        self.check_defs: dict[str, list[Any]] = {}    # parsed from MACHINES config; dropped when it changes
        self.reconciled_at: float | None = None
        self.reconcile_seconds: float | None = None
        self.started_at = time.time()
        self.subs: list[Any] = []
        self.pending: set[asyncio.Task] = set()
        self.reconnects = 0  # counted by State.on_reconnect: the watch is made again after each
        state.on_reconnect(self._count_reconnect)
        self.tasks: list[asyncio.Task] = []
        self.ops = asyncio.Semaphore(4)  # concurrent starts: the host has few cores
        # one create at a time: snapshot preparation is safe across processes, not across threads of one
        self.creating = asyncio.Lock()
        self.spare = _SpareHelper()  # a helper process made ahead of the next machine start
        from taxiway.platform.fabric import host_fabric

        self.fabric = host_fabric(self.home, private_network)  # None: machines get no private network

    # -- life -------------------------------------------------------------------------------

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled. Machines keep running when the agent stops (or is killed)."""
        from taxiway.platform import schema

        try:
            for verb in schema.AGENT_VERBS:
                # concurrent: a slow create or stop must not hold back the requests behind it
                self.subs.append(await self.st.serve(schema.agent_subject(self.host, verb),
                                                     getattr(self, f"on_{verb}"), concurrent=True))
            async with asyncio.TaskGroup() as tg:
                # the watch first: a change made while the start-up reconcile reads the bucket is not missed
                self.tasks = [tg.create_task(self._watch())]
                t0 = time.monotonic()
                await self.reconcile_all()
                self.reconcile_seconds = time.monotonic() - t0
                self.reconciled_at = time.time()
                log.info("reconciled %d machines in %.3f s", len(self.rec.all()), self.reconcile_seconds)
                if ready is not None:
                    ready.set()
                self.tasks.append(tg.create_task(self._observe_loop()))
        finally:
            for sub in self.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for _, t in self.check_tasks.values():
                t.cancel()
            await self.spare.close()
            self.rec.close()

    def _count_reconnect(self) -> None:
        self.reconnects += 1

    def _lock(self, mid: str) -> asyncio.Lock:
        return self.locks.setdefault(mid, asyncio.Lock())

    async def _desired(self, app: str, mid: str) -> tuple[dict[str, Any] | None, int]:
        from taxiway.platform import schema

        got = await self.st.get(schema.MACHINES, schema.machine_key(app, mid))
        return got if got else (None, 0)

    def _mine(self, record: dict[str, Any] | None) -> bool:
        return record is not None and (record.get("host") or "local") == self.host

    # -- reconcile ------------------------------------------------------------------------------

    async def reconcile_all(self) -> None:
        """Desired (MACHINES) vs our record vs what runs, for every machine of this host."""
        from taxiway.platform import schema

        desired = {k: (v, rev) for k, v, rev in await self.st.items(schema.MACHINES) if self._mine(v)}
        keys = set(desired) | {schema.machine_key(r["app"], r["id"]) for r in self.rec.all()}

        async def one(key: str) -> None:
            app, _, mid = key.partition(".")
            v, rev = desired.get(key, (None, 0))
            try:
                await self.reconcile(app, mid, v, rev)
            except TaxiwayError as e:
                log.warning("machine %s: %s", mid, e.message)
            except Exception:  # one machine's trouble must not stop the agent
                log.exception("reconciling %s", mid)

        # adopting is cheap (a file read, a STATUS write); creating is not, and is limited by self.ops
        async with asyncio.TaskGroup() as tg:
            for key in sorted(keys):
                tg.create_task(one(key))

    async def reconcile(self, app: str, mid: str, desired: dict[str, Any] | None, rev: int,
                        force: str | None = None) -> dict[str, Any]:
        """Apply :func:`decide` (or the verb ``force``: start, stop, restart) to one machine; returns STATUS."""
        async with self._lock(mid):
            if desired is not None:  # its checks, while we have the record (saves a read per machine)
                self.check_defs[mid] = _parse_checks(mid, desired)
            row = self.rec.get(mid)
            if row is not None and desired is not None and rev < row["acted_rev"] and not force:
                return self.status.get(mid) or await self._kv_status(app, mid)  # a stale read: newer acted on
            local = _local(row["local_id"]) if row else None
            acts = decide(desired, rev, row, _local_view(local))
            if force == "start" and desired is not None and desired.get("desired") != "destroyed":
                acts = [a for a in acts if a != "stop"]
                if "start" not in acts:
                    acts.append("start")
            elif force == "restart" and desired is not None:
                acts = [a for a in acts if a not in ("start", "stop")] + ["stop", "start"]
            elif force == "stop" and "destroy" not in acts:
                acts = [a for a in acts if a not in ("start", "stop")] + ["stop"]
            if row is None and local is None and not acts and desired is None:
                return self.status.get(mid) or await self._kv_status(app, mid)  # e.g. destroyed already
            if row is not None and local is not None and not self.status.get(mid):
                await self._event(app, mid, "adopted", row=row)  # ran before this agent started
            for act in acts:
                row = await getattr(self, f"_do_{act}")(app, mid, desired, row)
            if row is not None and desired is not None:
                self.rec.set(mid, acted_rev=rev)
                row["acted_rev"] = rev
            if row is not None:
                await self.observe(row)
            return self.status.get(mid) or await self._kv_status(app, mid)

    async def _kv_status(self, app: str, mid: str) -> dict[str, Any]:
        from taxiway.platform import schema

        got = await self.st.get(schema.STATUS, schema.machine_key(app, mid))
        return got[0] if got else {}

    async def _do_create(self, app: str, mid: str, desired: dict[str, Any], row: dict[str, Any] | None
                         ) -> dict[str, Any]:
        cfg_in = desired.get("config") or {}
        old_ports = (row or {}).get("ports") or {}
        try:
            # Defence in depth: the API checked the config, but a record written straight into NATS
            # (or by an older API) must not get a privileged machine either.
            cfg_in, org = await self._checked(app, cfg_in)
            ports = {p: old_ports.get(p) or self._free_port() for p in published_ports(cfg_in)}
        except TaxiwayError as e:
            row = {"id": mid, "app": app, "region": desired.get("region") or self.region, "local_id": None,
                   "instance_id": desired.get("instance_id"), "ports": old_ports, "restarts": 0,
                   "acted_rev": 0, "log_inode": None, "log_offset": 0, "events_offset": 0}
            self.rec.put(row)
            await self._write_status(row, {"state": "failed", "error": e.message})
            await self._event(app, mid, "failed", row=row, error=e.message)
            raise
        env = await self._secrets_env(app)
        cfg = machine_config({**desired, "config": cfg_in}, ports, env, self.home / "platform" / "volumes" / app)
        row = {"id": mid, "app": app, "region": desired.get("region") or self.region, "local_id": None,
               "instance_id": desired.get("instance_id"), "ports": ports, "restarts": 0,
               "acted_rev": 0, "log_inode": None, "log_offset": 0, "events_offset": 0,
               "net_org": (row or {}).get("net_org"), "net_field": (row or {}).get("net_field")}
        self.rec.put(row)  # before the machine exists: a killed agent finds the name and cleans up
        try:
            # after the policy check: tenants never choose the netns. The address is allocated now
            # (STATUS.private_ip stays stable) but the veth pair and rules are made only for a machine
            # that is to start: _do_start plugs it, so a skip_launch machine holds no network resources
            cfg = await self._plug(row, org, cfg, connect=desired.get("desired", "started") == "started")
        except TaxiwayError as e:
            await self._write_status(row, {"state": "failed", "error": e.message})
            await self._event(app, mid, "failed", row=row, error=e.message)
            raise
        await self._write_status(row, {"state": "created", "checks": {}, "exit_code": None, "pid": None})
        async with self.creating:
            try:
                local_id = await asyncio.to_thread(_create_local, f"tw-{mid}", cfg, org,
                                                   await self._volume_sizes(app))
            except Exception as e:
                what = e.message if isinstance(e, TaxiwayError) else f"{type(e).__name__}: {e}"
                await self._write_status(row, {"state": "failed", "error": what})
                await self._event(app, mid, "failed", row=row, error=what)
                raise
        row["local_id"] = local_id
        self.rec.set(mid, local_id=local_id)
        await self._event(app, mid, "launch", row=row, image=cfg["image"])
        log.info("created %s/%s as %s", app, mid, local_id)
        return row

    async def _do_recreate(self, app: str, mid: str, desired: dict[str, Any], row: dict[str, Any]
                           ) -> dict[str, Any]:
        await self._event(app, mid, "update", row=row, instance_id=desired.get("instance_id"))
        self._stop_checks(mid)
        old = _local(row.get("local_id"))
        if old is not None:  # the old instance's last log lines and events first
            await self._ship_events(row, old)
            await self._ship_logs(row, old)
        await asyncio.to_thread(_destroy_local, row.get("local_id"))
        if self.fabric is not None:  # a fresh netns for the new instance (same address: the field is kept)
            await asyncio.to_thread(self.fabric.unplug, mid)
        return await self._do_create(app, mid, desired, row)

    async def _do_start(self, app: str, mid: str, desired: dict[str, Any] | None, row: dict[str, Any]
                        ) -> dict[str, Any]:
        local = _local(row["local_id"])
        if local is not None and local.status() in ("running", "starting"):
            return row
        if row.get("net_field") and self.fabric is not None and local is not None and \
                str(local.config.net).startswith("/"):  # plugged again if the fabric was remade (host reboot)
            await asyncio.to_thread(self.fabric.plug, mid, row["net_org"], row["net_field"])
        async with self.ops:
            rc, out, err = await self.spare.run("start", row["local_id"])
        if rc != 0:
            msg = _helper_error(out, err)
            await self.observe(row)
            raise TaxiwayError(f"machine {mid} did not start: {msg['error']}", msg.get("fix") or "see its log")
        return row

    async def _do_stop(self, app: str, mid: str, desired: dict[str, Any] | None, row: dict[str, Any],
                       sig: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        local = _local(row.get("local_id"))
        if local is not None and local.status() in ("running", "starting"):
            await self._write_status(row, {"state": "stopping"})
            await asyncio.to_thread(_stop_local, row["local_id"], sig, timeout)
        return row

    async def _do_destroy(self, app: str, mid: str, desired: dict[str, Any] | None, row: dict[str, Any] | None
                          ) -> None:
        self._stop_checks(mid)
        if row is not None:
            await self._write_status(row, {"state": "destroying"})
            await self.observe(row)  # ship the last log lines and events before the files go
            await asyncio.to_thread(_destroy_local, row.get("local_id"))
            if self.fabric is not None:
                await asyncio.to_thread(self.fabric.unplug, mid)
            self.rec.delete(mid)
            await self._write_status(row, {"state": "destroyed", "pid": None, "checks": {}})
            await self._event(app, mid, "destroy", row=row)
        self.status.pop(mid, None)
        return None

    # -- observe -----------------------------------------------------------------------------------

    async def _observe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            for mid in [r["id"] for r in self.rec.all()]:
                lock = self._lock(mid)
                if lock.locked():
                    continue  # a command is working on it; it observes when done
                try:
                    async with lock:
                        if (row := self.rec.get(mid)) is not None:  # not destroyed meanwhile
                            await self.observe(row)
                except Exception:  # one machine's trouble must not stop the others' reports
                    log.exception("observing %s", mid)

    async def observe(self, row: dict[str, Any]) -> None:
        """Report one machine: its events, its log lines, its STATUS; start or stop its checks."""
        # small local file reads, done inline: a thread hop would cost more than the read
        m = _local(row.get("local_id"))
        if m is None:
            return
        await self._ship_events(row, m)
        await self._ship_logs(row, m)
        st = m.status()
        fly = FLY_STATE.get(st, "failed")
        started = m.started if st == "running" else None
        changes = {"state": fly, "pid": m.pid if st == "running" else None, "exit_code": m.exit_code,
                   "restarts": m.restarts, "reason": m.reason, "started_at": started,
                   "error": m.error if st == "failed" else None}
        if m.restarts != row.get("restarts"):
            self.rec.set(row["id"], restarts=m.restarts)
        await self._checks_for(row, m, fly, started)
        await self._write_status(row, changes)

    async def _ship_events(self, row: dict[str, Any], m: Any) -> None:
        from taxiway.platform import schema

        path = m.dir / "events.jsonl"
        lines, _, offset = _read_new(path, None, row.get("events_offset") or 0)
        if not lines:
            return
        for ln in lines:
            try:
                ev = json.loads(ln)
            except ValueError:
                continue
            typ = EVENT_TYPE.get(ev.get("type"), ev.get("type"))
            detail = {k: v for k, v in ev.items() if k not in ("time", "machine", "type", "state")}
            await self.st.publish(schema.events_subject(row["app"], row["id"]),
                                  {"type": typ, "status": FLY_STATE.get(ev.get("state"), ev.get("state")),
                                   "at": ev.get("time"), "machine": row["id"], "app": row["app"],
                                   "instance_id": row.get("instance_id"), "source": "machine", **detail})
        row["events_offset"] = offset
        self.rec.set(row["id"], events_offset=offset)

    async def _ship_logs(self, row: dict[str, Any], m: Any) -> None:
        from taxiway.platform import schema

        lines, inode, offset = _read_new(m.dir / "log", row.get("log_inode"), row.get("log_offset") or 0)
        subject = schema.logs_subject(row["app"], row.get("region") or self.region, row["id"])
        shipped = 0
        for ln in lines[:LOG_BATCH]:
            ts, _, rest = ln.partition(b" ")
            stream, _, text = rest.partition(b" ")
            await self.st.publish(subject, {"at": ts.decode(errors="replace"), "stream": stream.decode(errors="replace"),
                                            "line": text.decode(errors="replace"), "machine": row["id"],
                                            "app": row["app"], "region": row.get("region") or self.region,
                                            "instance_id": row.get("instance_id")})
            shipped += len(ln) + 1
        if len(lines) > LOG_BATCH:  # the rest next tick; the offset says where we are
            offset = offset - sum(len(x) + 1 for x in lines[LOG_BATCH:])
            if offset < 0:  # the batch crossed a rotation: simplest safe choice is the new file's start
                offset = 0
        if (inode, offset) != (row.get("log_inode"), row.get("log_offset")):
            row["log_inode"], row["log_offset"] = inode, offset
            self.rec.set(row["id"], log_inode=inode, log_offset=offset)

    # -- checks ---------------------------------------------------------------------------------------

    async def _checks_for(self, row: dict[str, Any], m: Any, fly: str, started: float | None) -> None:
        from taxiway.platform import checks

        mid = row["id"]
        defs = self.check_defs.get(mid)
        if defs is None:
            desired, _ = await self._desired(row["app"], mid)
            defs = self.check_defs[mid] = _parse_checks(mid, desired)
        running = self.check_tasks.get(mid)
        if fly == "started" and defs:
            key = (row.get("local_id"), started)
            if running and running[0] == key:
                return
            self._stop_checks(mid)

            async def on_change(statuses: dict[str, Any]) -> None:
                await self._write_checks(row, statuses)

            task = asyncio.create_task(checks.run_checks(defs, row.get("ports") or {}, started or time.time(),
                                                         on_change, netns_pid=m.pid))
            self.check_tasks[mid] = (key, task)
        elif running:
            self._stop_checks(mid)
            cur = (self.status.get(mid) or {}).get("checks") or {}
            await self._write_status(row, {"checks": {n: {"status": "critical", "output": f"machine is {fly}",
                                                          "updated_at": time.time()} for n in cur}})

    def _stop_checks(self, mid: str) -> None:
        got = self.check_tasks.pop(mid, None)
        if got is not None:
            got[1].cancel()
        self.check_defs.pop(mid, None)

    async def _write_checks(self, row: dict[str, Any], statuses: dict[str, Any]) -> None:
        """A machine's check results into STATUS, unless it left this agent's record meanwhile: a
        result that comes after the destroy (the API may have purged STATUS already, the app gone)
        would bring the machine's STATUS back."""
        if self.rec.get(row["id"]) is None:
            return
        await self._write_status(row, {"checks": statuses})

    # -- STATUS and events ------------------------------------------------------------------------

    async def _write_status(self, row: dict[str, Any], changes: dict[str, Any]) -> None:
        """Merge ``changes`` into the machine's STATUS; write it only if something changed."""
        from taxiway.platform import schema

        mid = row["id"]
        cur = self.status.get(mid)
        if cur is None:
            got = await self.st.get(schema.STATUS, schema.machine_key(row["app"], mid))
            cur = got[0] if got else {}
        new = {**cur, **changes, "id": mid, "app": row["app"], "host": self.host,
               "region": row.get("region") or self.region, "instance_id": row.get("instance_id"),
               "local_id": row.get("local_id"), "ports": {str(k): v for k, v in (row.get("ports") or {}).items()}}
        if row.get("net_field") and self.fabric is not None:
            from taxiway.platform import network

            new["private_ip"] = str(network.machine_address(row["net_org"], self.fabric.host, row["net_field"]))
        new.setdefault("checks", {})
        if {k: v for k, v in new.items() if k != "updated_at"} == {k: v for k, v in cur.items() if k != "updated_at"}:
            self.status[mid] = cur
            return
        new["updated_at"] = time.time()
        await self.st.put(schema.STATUS, schema.machine_key(row["app"], mid), new)
        self.status[mid] = new  # only once written: a failed write (NATS restarting) is retried next tick

    async def _event(self, app: str, mid: str, typ: str, row: dict[str, Any] | None = None, **detail: Any) -> None:
        from taxiway.platform import schema

        st = (self.status.get(mid) or {}).get("state")
        await self.st.publish(schema.events_subject(app, mid),
                              {"type": typ, "status": st, "at": time.time(), "machine": mid, "app": app,
                               "instance_id": (row or {}).get("instance_id"), "source": "agent", **detail})

    # -- helpers -----------------------------------------------------------------------------------

    async def _plug(self, row: dict[str, Any], org: str, cfg: dict[str, Any], connect: bool = True
                    ) -> dict[str, Any]:
        """Plug a namespace machine into the private network: its org's network number, a machine
        field (kept in our record), its netns plugged into the fabric, and the config that joins it
        (net, resolv.conf and /etc/hosts, the proxy environment, which overrides the tenant's).
        ``connect=False``: the address and netns path only; :meth:`_do_start` plugs it later."""
        if self.fabric is None:
            return cfg
        from taxiway.platform import network, orgnet

        n = row.get("net_org") or await orgnet.org_network(self.st, org)
        field = row.get("net_field") or self.rec.next_field()
        if (row.get("net_org"), row.get("net_field")) != (n, field):
            row.update(net_org=n, net_field=field)
            self.rec.set(row["id"], net_org=n, net_field=field)
        path = (await asyncio.to_thread(self.fabric.plug, row["id"], n, field) if connect
                else self.fabric.machine_path(row["id"]))
        address = str(network.machine_address(n, self.fabric.host, field))
        mid, app = row["id"], row["app"]
        return {**cfg, "net": str(path), "env": {**cfg.get("env", {}), **network.machine_env(n, address)},
                "dns": network.dns_config(app, address, [mid, f"{mid}.vm.{app}.internal"]), "private_ip": address}

    def _free_port(self) -> int:
        from taxiway.platform.nats import free_port

        taken = {p for r in self.rec.all() for p in (r.get("ports") or {}).values()}
        while True:
            p = free_port()
            if p not in taken:
                return p

    async def _checked(self, app: str, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """``config`` through platform.policy (the app's volumes, this host's registry and size),
        and the org that owns ``app`` (its APPS record: images are pulled as that org)."""
        from taxiway.platform import policy, schema

        got = await self.st.get(schema.APPS, app)
        org = (got[0] if got else {}).get("org") or schema.DEFAULT_ORG
        volumes = {v["id"]: v for _, v, _ in await self.st.items(schema.VOLUMES, f"{app}.")
                   if isinstance(v, dict) and v.get("id") and v.get("app", app) == app}
        auth = await asyncio.to_thread(_registry_auth)
        return policy.check_config(config, volumes=volumes, registry=auth.get("registry"),
                                   limits=policy.host_limits()), org

    async def _volume_sizes(self, app: str) -> dict[str, int]:
        """The app's volume sizes by id (VOLUMES), for the ext4 files made at first mount."""
        from taxiway.platform import schema
        from taxiway.platform.policy import MAX_VOLUME_SIZE

        return {v["id"]: v["size"] for _, v, _ in await self.st.items(schema.VOLUMES, f"{app}.")
                if isinstance(v, dict) and isinstance(v.get("id"), str) and isinstance(v.get("size"), int)
                and 8 << 20 <= v["size"] <= MAX_VOLUME_SIZE}

    async def _secrets_env(self, app: str) -> dict[str, str]:
        """The app's secrets (SECRETS bucket), unsealed with platform.secrets' key, as environment."""
        from taxiway.platform import schema, secrets

        items = await self.st.items(schema.SECRETS, f"{app}.")
        if not items:
            return {}
        key = await asyncio.to_thread(secrets.load_key)
        return secrets.unseal_all(app, [v for _, v, _ in items if v], key)

    async def _row_for(self, payload: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        app, mid = payload.get("app"), payload.get("id")
        if not app or not mid:
            raise InvalidInput("the request names no app and machine id", 'send {"app": ..., "id": ...}')
        row = self.rec.get(mid)
        if row is None:
            raise NotFound(f"machine {mid} of app {app} is not on host {self.host}", "create it first")
        return app, mid, row

    # -- commands (request/reply) -------------------------------------------------------------------

    async def _apply(self, payload: dict[str, Any], force: str | None) -> dict[str, Any]:
        app, mid = payload.get("app"), payload.get("id")
        if not app or not mid:
            raise InvalidInput("the request names no app and machine id", 'send {"app": ..., "id": ...}')
        desired, rev = await self._desired(app, mid)
        if desired is None and force != "destroy":
            raise NotFound(f"no machine {mid} in app {app}", "create its MACHINES record first (the API does)")
        if desired is not None and not self._mine(desired):
            raise InvalidInput(f"machine {mid} belongs to host {desired.get('host')}, not {self.host}",
                               f"send the command to agent.{desired.get('host')}")
        if force == "destroy" and desired is not None and desired.get("desired") != "destroyed":
            desired = None  # destroy was asked explicitly
        status = await self.reconcile(app, mid, desired, rev, force=force)
        return {"ok": True, "status": status}

    async def on_create(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(p, None)

    async def on_start(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(p, "start")

    async def on_restart(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(p, "restart")

    async def on_destroy(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self._apply(p, "destroy")

    async def on_stop(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("signal") is None and p.get("timeout") is None:
            return await self._apply(p, "stop")
        app, mid, row = await self._row_for(p)
        from taxiway.machines.config import parse_signal

        sig = parse_signal(str(p["signal"])) if p.get("signal") is not None else None
        async with self._lock(mid):
            await self._do_stop(app, mid, None, row, sig, float(p["timeout"]) if p.get("timeout") is not None else None)
            await self.observe(row)
        return {"ok": True, "status": self.status.get(mid) or {}}

    async def on_signal(self, p: dict[str, Any]) -> dict[str, Any]:
        from taxiway.machines.config import parse_signal

        app, mid, row = await self._row_for(p)
        sig = parse_signal(str(p.get("signal") or ""), default=0)
        if not sig:
            raise InvalidInput("no signal named", 'send {"signal": "SIGHUP"} (a name or a number)')
        m = _local(row["local_id"])
        if m is None or m.status() != "running" or not m.pid:
            raise InvalidInput(f"machine {mid} is not running", "start it first")
        os.kill(m.pid, sig)
        await self._event(app, mid, "signal", row=row, signal=sig)
        return {"ok": True, "status": self.status.get(mid) or {}}

    async def on_exec(self, p: dict[str, Any]) -> dict[str, Any]:
        app, mid, row = await self._row_for(p)
        cmd = p.get("cmd") or p.get("command")
        if isinstance(cmd, str):
            import shlex

            cmd = shlex.split(cmd)
        if not cmd or not all(isinstance(a, str) for a in cmd):
            raise InvalidInput("exec needs a command", 'send {"cmd": ["ls", "/"]}')
        timeout = float(p.get("timeout") or 30)
        rc, out, err = await _helper("exec", row["local_id"], "--", *cmd, timeout=timeout)
        if rc == 125 and _HELPER_MARK in err:  # the helper's own failure (machine not running...)
            msg = _helper_error(out, err)
            raise TaxiwayError(msg["error"], msg.get("fix"))
        return {"ok": True, "exit_code": rc, "stdout": out[:EXEC_OUTPUT_MAX].decode(errors="replace"),
                "stderr": err[:EXEC_OUTPUT_MAX].decode(errors="replace")}

    async def on_list(self, p: dict[str, Any]) -> dict[str, Any]:
        rows = [r for r in self.rec.all() if not p.get("app") or r["app"] == p["app"]]
        return {"ok": True, "machines": [{**{k: r[k] for k in ("id", "app", "region", "local_id", "instance_id",
                                                                  "restarts")},
                                          "ports": {str(k): v for k, v in r["ports"].items()},
                                          "status": self.status.get(r["id"])} for r in rows]}

    async def on_ping(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "host": self.host, "region": self.region, "pid": os.getpid(),
                "machines": len(self.rec.all()), "started_at": self.started_at,
                "reconciled_at": self.reconciled_at, "reconcile_seconds": self.reconcile_seconds}

    async def on_purge(self, p: dict[str, Any]) -> dict[str, Any]:
        """An app was destroyed: remove its volumes' data on this host (platform/volumes/<app>/),
        so nothing of it is left for whoever creates an app of that name next (red team H5)."""
        import shutil

        from taxiway.platform import schema

        app = p.get("app")
        if not isinstance(app, str) or not schema.valid_app_name(app):
            raise InvalidInput("the request names no valid app", 'send {"app": "<name>"}')
        if p.get("volume") is not None:  # one volume destroyed (API DELETE .../volumes/{id})
            # a stopped machine holds no lock on the file but would miss it at its next start
            users = [r["id"] for r in self.rec.all() if r["app"] == app and _mounts_volume(r.get("local_id"), p["volume"])]
            if users:
                raise InvalidInput(f"volume {p['volume']} is mounted by machine {', '.join(users)} on host {self.host}",
                                   "destroy that machine first")
            return await asyncio.to_thread(_remove_volume, self.home / "platform" / "volumes" / app, p["volume"])
        live = [r["id"] for r in self.rec.all() if r["app"] == app]
        if live:
            raise InvalidInput(f"app {app} still has machines on host {self.host}: {', '.join(live)}",
                               "destroy them first")
        path = self.home / "platform" / "volumes" / app
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path)
        return {"ok": True, "removed": str(path)}

    # -- watching desired state -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Act on MACHINES changes. After a reconnect (nats-server restarted) the watch is made
        again at once, with a full reconcile, so no change made meanwhile is missed (a restarted
        server forgets the watch's consumer: see State.on_reconnect)."""
        first = True
        while True:
            seen = self._reconnects()
            watcher = asyncio.create_task(self._watch_once(catch_up=not first))
            first = False
            try:
                while not watcher.done() and self._reconnects() == seen:
                    await asyncio.wait({watcher}, timeout=0.5)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
            if self._reconnects() != seen:
                log.info("NATS reconnected: watching machines again, reconciling all")
            if not watcher.cancelled() and watcher.exception() is not None:
                e = watcher.exception()
                log.warning("watching machines: %s: %s; watching again", type(e).__name__, e)
            await asyncio.sleep(0.5)  # never a busy loop while NATS is away

    def _reconnects(self) -> int:
        return self.reconnects

    async def _watch_once(self, catch_up: bool) -> None:
        from taxiway.platform import schema

        if catch_up:
            await self.reconcile_all()
        async for key, value, rev in self.st.watch(schema.MACHINES, ">", initial=False):
            app, _, mid = key.partition(".")
            if value is not None and not self._mine(value):
                continue
            if value is None and self.rec.get(mid) is None:
                continue
            self._stop_checks_defs(mid)
            task = asyncio.create_task(self._reconcile_logged(app, mid, value, rev))
            self.pending.add(task)  # a reference, so the task is not collected mid-way
            task.add_done_callback(self.pending.discard)

    def _stop_checks_defs(self, mid: str) -> None:
        """A changed record may change its checks: read them again at the next observation."""
        self.check_defs.pop(mid, None)

    async def _reconcile_logged(self, app: str, mid: str, value: dict[str, Any] | None, rev: int) -> None:
        try:
            await self.reconcile(app, mid, value, rev)
        except TaxiwayError as e:
            log.warning("machine %s: %s", mid, e.message)
        except Exception:
            log.exception("reconciling %s", mid)


def _parse_checks(mid: str, desired: dict[str, Any] | None) -> list[Any]:
    """A machine's checks; a bad definition is logged and runs no check (the API validates them first)."""
    from taxiway.platform import checks

    try:
        return checks.parse((desired or {}).get("config") or {})
    except TaxiwayError as e:
        log.warning("machine %s: %s", mid, e.message)
        return []


async def _helper(*args: str, timeout: float = 120.0) -> tuple[int, bytes, bytes]:
    """Run ``python -m taxiway.platform.agent helper ARGS`` (a clean process to fork machines from)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "taxiway.platform.agent", "helper", *args,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    return await _communicate(proc, None, args[0], timeout)


_HELPER_MARK = b"taxiway-agent-helper: "  # prefixes the helper's own error (JSON) on stderr


class _SpareHelper:
    """Machine starts through a helper process made ahead of need.

    A fresh ``python -m taxiway.platform.agent helper start ID`` spent ~0.3 s starting Python and
    importing taxiway.machines before it forked the machine (measured 0.44 s against 0.08 s for the
    start itself), on the path of every deploy. A spare (``helper --stdin``) does that while nothing
    waits on it and then reads its one command from stdin; the next spare is made after each use.
    It is still a process of its own, so no supervisor inherits the agent's sockets or threads.
    A spare whose agent is gone reads EOF and exits.
    """

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def _make(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "taxiway.platform.agent", "helper", "--stdin", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def run(self, *args: str, timeout: float = 120.0) -> tuple[int, bytes, bytes]:
        """:func:`_helper` ``args``, in the spare when there is a live one (then a new spare)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            out = await _helper(*args, timeout=timeout)
        else:
            out = await _communicate(proc, json.dumps(list(args)).encode() + b"\n", args[0], timeout)
        if self.proc is None:  # after the start: it does not compete with it for the CPU
            with contextlib.suppress(OSError):
                spare = await self._make()
                if self.proc is None:
                    self.proc = spare
                else:  # concurrent starts made one each: keep one
                    await self._close(spare)
        return out

    async def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await self._close(proc)

    @staticmethod
    async def _close(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def _communicate(proc: asyncio.subprocess.Process, data: bytes | None, what: str, timeout: float
                       ) -> tuple[int, bytes, bytes]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(sys.exc_info()[1], asyncio.CancelledError):
            raise
        raise TaxiwayError(f"{what} did not finish within {timeout:g} s", "see the machine's log") from None
    return proc.returncode or 0, out, err


def _spare_main() -> int:
    """``helper --stdin``: import what a machine start needs, then run the one command read from stdin."""
    import importlib

    for mod in ("taxiway.machines", "taxiway.machines.runtime", "taxiway.machines.namespace_runtime",
                "taxiway.machines.namespace", "taxiway.machines.ports", "taxiway.machines.stdio",
                "taxiway.machines.cgroups", "taxiway.machines.seccomp", "taxiway.machines.snapshots"):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0  # the agent went away (EOF) or closed the spare
    args = json.loads(line)
    if not isinstance(args, list) or len(args) < 2 or not all(isinstance(a, str) for a in args):
        return 2
    return _helper_main(args)


def _helper_error(out: bytes, err: bytes) -> dict[str, Any]:
    for line in reversed(err.splitlines()):
        if line.startswith(_HELPER_MARK):
            with contextlib.suppress(ValueError):
                d = json.loads(line[len(_HELPER_MARK):])
                if isinstance(d, dict) and "error" in d:
                    return d
    return {"error": (err.decode(errors="replace").strip().splitlines() or ["unknown error"])[-1], "fix": None}


def _helper_main(argv: list[str]) -> int:
    """``helper start ID`` / ``helper exec ID -- CMD...``: one machine operation that forks, then exit."""
    from taxiway import machines

    verb, mid = argv[0], argv[1]
    try:
        m = machines.load(mid)
        if m is None:
            raise NotFound(f"no local machine {mid}", "the agent's record is stale; it will recreate it")
        if verb == "start":
            machines.start(m)
            return 0
        if verb == "exec":
            cmd = argv[3:] if argv[2:3] == ["--"] else argv[2:]
            sys.stdout.flush()
            return machines.exec_in(m, cmd)
        raise InvalidInput(f"unknown helper verb {verb}", "start or exec")
    except TaxiwayError as e:
        sys.stderr.buffer.write(_HELPER_MARK + json.dumps({"error": e.message, "fix": e.hint}).encode() + b"\n")
        return 125


# -- the process ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m taxiway.platform.agent --nats URL [--host H] [--region R]``."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["helper", "--stdin"]:
        return _spare_main()
    if argv[:1] == ["helper"]:
        return _helper_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m taxiway.platform.agent", description="The taxiway host agent.")
    ap.add_argument("--nats", required=True, help="the platform's NATS URL, e.g. nats://127.0.0.1:4222")
    ap.add_argument("--host", default="local", help="this host's name (commands arrive on agent.<host>.*)")
    ap.add_argument("--region", default="local", help="this host's region (logs.<app>.<region>.<machine>)")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between observations of the machines")
    a = ap.parse_args(argv)
    from taxiway.platform import schema

    if not schema.valid_app_name(a.host) or not schema.valid_app_name(a.region):
        print(f"error: invalid --host {a.host!r} or --region {a.region!r}; use lowercase letters, digits and '-'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s", stream=sys.stderr)
    # nats-py logs every failed (re)connect attempt with a traceback; the agent says what matters itself
    logging.getLogger("nats").setLevel(logging.CRITICAL)

    async def amain() -> None:
        from taxiway.platform.state import State

        st = await State.connect(a.nats, name=f"agent-{a.host}")
        agent = Agent(st, a.host, a.region, poll=a.poll)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await st.close()

    try:
        asyncio.run(amain())
    except TaxiwayError as e:
        print(f"error: {e.message}" + (f"; {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
