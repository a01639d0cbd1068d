"""The deployer: replaces an app's machines with a release's, by strategy, inside the API process.

    rec = await deploy.start(state, app, release)   # POST /v1/apps/{app}/releases (the API records it)
    await deploy.resume(state)                      # at API start: finish or roll back cut deploys

A deploy is a loop of rounds. Each round reads what the machines are now
(MACHINES + STATUS), asks the pure planner (:mod:`taxiway.platform.strategy`)
for the next steps of each process group, and does them: create machines
through the host agent, wait for their checks, retire old ones (cordon so the
edge stops sending, drain in-flight requests, stop, destroy). The DEPLOYS
bucket holds the deploy (release, previous release, counts, phase), written
before each phase begins, so after a kill -9 of the control plane the next API
start runs the same loop again from whatever the machines are: a deploy is
finished or rolled back, never left half.

``release_command`` runs first in a one-off machine of the new image; a
non-zero exit fails the release and nothing else changes. New machines that
crash or do not pass their checks within ``deploy.wait_timeout`` roll the group
back to the previous release (status ``rolled_back``); a release with nothing
before it is removed (``failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets as _secrets
import time
from typing import Any

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.platform import appconfig, schema, strategy
from taxiway.platform.state import Conflict, State, Unavailable

log = logging.getLogger("taxiway.deploy")

RELEASE_COMMAND_GROUP = "release_command"  # the one-off machine's process group (never a planner's group)
POLL = 0.25          # seconds between looks at the machines while waiting
RECHECK = 1.0        # a wait on the app's machines looks again after this even with no change seen
                     # (the watch that wakes it may have gone silent in a NATS restart; timeouts)
MAX_ERRORS = 20      # consecutive failed rounds (agent gone...) before a deploy gives up
STEPS_KEPT = 60      # lines of progress kept in the release record

_tasks: dict[str, asyncio.Task] = {}


class Busy(TaxiwayError):
    """Another deploy of the app is running."""


# -- public entry points ------------------------------------------------------------------------

async def start(state: State, app: str, release: dict[str, Any], org: str | None = None) -> dict[str, Any]:
    """Record the next release of ``app`` and start deploying it; returns the release record.

    ``release`` is what POST /v1/apps/{app}/releases received, ``{"image", "config",
    "strategy"?, "description"?, "by"?}``, or ``{"reason": "secrets"}`` to roll the
    newest release's image and config again (a secrets change). A bad config raises
    InvalidInput and a deploy already running raises :class:`Busy`, both before anything
    is recorded. A release recorded already (it has a "version") is deployed as it is.
    """
    if "version" not in release:
        release = await _new_release(state, app, release)
    version = int(release["version"])
    try:
        config = appconfig.validate(release.get("config") or {}, "config")
    except InvalidInput as e:
        await _set_release(state, app, version, status="failed", error=str(e))
        raise
    running = _tasks.get(app)
    got = await state.get(schema.DEPLOYS, app)
    if got and running is not None and not running.done():
        await _set_release(state, app, version, status="failed",
                           error=f"release v{got[0].get('release')} was still deploying")
        raise Busy(f"a deploy of {app} (release v{got[0].get('release')}) is in progress",
                   "wait for it to finish ('taxiway releases'), then deploy again")
    if got:  # a deploy nobody runs (its API died and resume has not taken it yet): this one supersedes it
        old = got[0]
        await _set_release(state, app, int(old["release"]), status="failed", error=f"superseded by v{version}")
    if org is None:
        app_rec = await state.get(schema.APPS, app)
        org = (app_rec[0] if app_rec else {}).get("org", schema.DEFAULT_ORG)
    previous = await _previous_release(state, app, version)
    counts = await _current_counts(state, app, config)
    rec = {"app": app, "org": org, "id": _secrets.token_hex(6), "release": version, "previous": previous,
           "image": release["image"], "config": config, "strategy": release.get("strategy")
           or config["deploy"]["strategy"], "counts": counts,
           "phase": "release_command" if config["deploy"]["release_command"] else "deploy",
           "release_machine": None, "failed_machines": [], "started_at": time.time(), "updated_at": time.time()}
    if got:
        await state.put(schema.DEPLOYS, app, rec, revision=got[1])
    else:
        try:
            await state.put(schema.DEPLOYS, app, rec, revision=0)
        except Conflict:
            await _set_release(state, app, version, status="failed", error="another deploy started at the same moment")
            raise Busy(f"a deploy of {app} is in progress", "wait for it to finish, then deploy again") from None
    out = await _set_release(state, app, version, status="running", previous=previous, strategy=rec["strategy"],
                             step=f"deploying v{version} ({rec['strategy']}) to "
                                  + ", ".join(f"{g}: {n}" for g, n in counts.items()))
    _spawn(state, app)
    return out or {**release, "status": "running"}


async def _new_release(state: State, app: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check ``body`` and record it as the app's next release (CAS create: two never share a version)."""
    fields = {k: body[k] for k in ("image", "config", "strategy", "description", "by") if body.get(k) is not None}
    if body.get("reason") == "secrets" and "image" not in fields:
        rows = [r for _, r, _ in await state.items(schema.RELEASES, app + ".")]
        # Only a release that worked: restarting with a failed one's image failed again and, as a
        # first release, removed the app's machines (red team M8c).
        done = [r for r in rows if r.get("status") == "complete"]
        if not done:
            raise InvalidInput(f"{app} has no complete release to restart",
                               "deploy it: the next deploy's machines get the secrets")
        last = max(done, key=lambda r: r.get("version", 0))
        fields = {"image": last["image"], "config": last.get("config") or {}, "strategy": "rolling",
                  "description": "secrets changed"}
    if not isinstance(fields.get("image"), str) or not fields["image"].strip():
        raise InvalidInput("a release needs an image", 'send {"image": "registry/app:tag", "config": {...}}')
    config = appconfig.validate(fields.get("config") or {}, "config")  # a bad config records nothing
    fields["strategy"] = fields.get("strategy") or config["deploy"]["strategy"]
    if fields["strategy"] not in strategy.STRATEGIES:
        raise InvalidInput(f"unknown deploy strategy {fields['strategy']!r}", f"use one of {', '.join(strategy.STRATEGIES)}")
    running = _tasks.get(app)
    if running is not None and not running.done():
        got = await state.get(schema.DEPLOYS, app)
        raise Busy(f"a deploy of {app} (release v{(got or ({}, 0))[0].get('release')}) is in progress",
                   "wait for it to finish ('taxiway releases'), then deploy again")
    return await record_release(state, app, {"reason": body.get("reason"), "description": "", **fields})


async def record_release(state: State, app: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Store ``fields`` as the app's next release (version = last + 1, created with compare-and-set, so
    two concurrent deploys never share a version); status "pending"."""
    for _ in range(50):
        keys = await state.keys(schema.RELEASES, app + ".")
        version = max((int(k.rsplit(".", 1)[1]) for k in keys), default=0) + 1
        rec = {"app": app, "version": version, "status": "pending", "created_at": time.time(), **fields}
        try:
            await state.put(schema.RELEASES, schema.release_key(app, version), rec, revision=0)
            return rec
        except Conflict:
            await asyncio.sleep(0.01)
    raise Busy(f"could not record a release of {app}: too many at once", "retry")


async def resume(state: State) -> list[str]:
    """Take up every deploy a stopped control plane left (DEPLOYS records); returns their apps."""
    apps = await state.keys(schema.DEPLOYS)
    for app in apps:
        if app not in _tasks or _tasks[app].done():
            log.info("resuming the deploy of %s", app)
            _spawn(state, app)
    return apps


async def shutdown() -> None:
    """Cancel running deploys (their DEPLOYS records stay, so the next start resumes them)."""
    tasks = [t for t in _tasks.values() if not t.done()]
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    _tasks.clear()


async def cancel(app: str) -> None:
    """Stop the app's running deploy, if any (the app is being destroyed: it must not make
    machines or records again behind the destroy)."""
    t = _tasks.pop(app, None)
    if t is not None and not t.done():
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


async def wait(app: str, timeout: float | None = None) -> None:
    """Wait for the app's running deploy task, if any (tests, CLI helpers in-process)."""
    t = _tasks.get(app)
    if t is not None:
        await asyncio.wait_for(asyncio.shield(t), timeout)


def _spawn(state: State, app: str) -> None:
    task = asyncio.get_running_loop().create_task(Deployer(state, app).run(), name=f"deploy-{app}")
    _tasks[app] = task


# -- records -------------------------------------------------------------------------------------------

async def _set_release(state: State, app: str, version: int, step: str | None = None, **fields: Any
                       ) -> dict[str, Any] | None:
    def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
        if old is None:
            return None
        new = {**old, **fields, "updated_at": time.time()}
        if step:
            new["steps"] = [*(old.get("steps") or []), f"{time.strftime('%H:%M:%S')} {step}"][-STEPS_KEPT:]
        return new

    return await state.update(schema.RELEASES, schema.release_key(app, version), change)


async def _previous_release(state: State, app: str, version: int) -> int | None:
    """The newest release before ``version`` that completed: what a rollback returns to."""
    best = None
    for _, r, _ in await state.items(schema.RELEASES, app + "."):
        v = r.get("version", 0)
        if v < version and r.get("status") == "complete" and (best is None or v > best):
            best = v
    return best


async def _live_machines(state: State, app: str) -> list[dict[str, Any]]:
    return [rec for _, rec, _ in await state.items(schema.MACHINES, app + ".")
            if rec.get("desired") != "destroyed"]


async def _current_counts(state: State, app: str, config: dict[str, Any]) -> dict[str, int]:
    """Machines per process group to deploy: as many as run now (a scale is kept), else 1."""
    have: dict[str, int] = {}
    for rec in await _live_machines(state, app):
        g = rec.get("process_group") or schema.DEFAULT_PROCESS
        if not rec.get("cordoned") and g != RELEASE_COMMAND_GROUP:
            have[g] = have.get(g, 0) + 1
    counts = {g: have.get(g) or 1 for g in appconfig.process_groups(config)}
    for g in have:  # groups the new config no longer has: their machines go
        counts.setdefault(g, 0)
    return counts


# -- the deploy loop -----------------------------------------------------------------------------------

class Deployer:
    """One app's deploy, driven from its DEPLOYS record."""

    def __init__(self, state: State, app: str) -> None:
        self.st = state
        self.app = app
        self.rec: dict[str, Any] = {}
        self.rev = 0
        self.configs: dict[int, dict[str, dict[str, Any]]] = {}  # release -> group -> machine config
        self.foreign: dict[str, int] = {}  # rolling back: live machines per group this deploy leaves alone
        self.changed = asyncio.Event()     # set when a MACHINES or STATUS record of the app changes

    async def _watch_changes(self) -> None:
        """Wake the waits (checks passing, a machine stopped) the moment the app's records change,
        instead of polling them: each poll interval was added to every deploy."""
        async def one(bucket: str) -> None:
            while True:
                try:
                    async for _ in self.st.watch(bucket, f"{self.app}.*", initial=False):
                        self.changed.set()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # NATS away: the waits fall back to looking every RECHECK
                    log.debug("watching %s of %s: %s", bucket, self.app, e)
                await asyncio.sleep(RECHECK)

        await asyncio.gather(one(schema.STATUS), one(schema.MACHINES))

    async def _next_change(self, timeout: float = RECHECK) -> None:
        """Until the app's machines change (or ``timeout``); clear ``changed`` BEFORE reading the state
        this waits on, so a change made in between is not missed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    async def _load(self) -> bool:
        got = await self.st.get(schema.DEPLOYS, self.app)
        if not got:
            return False
        self.rec, self.rev = got
        return True

    async def _save(self, **fields: Any) -> None:
        def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
            return {**(old or self.rec), **fields, "updated_at": time.time()}

        self.rec = await self.st.update(schema.DEPLOYS, self.app, change)

    async def _say(self, text: str, **fields: Any) -> None:
        log.info("%s v%s: %s", self.app, self.rec.get("release"), text)
        await _set_release(self.st, self.app, self.rec["release"], step=text, **fields)

    async def run(self) -> None:
        if not await self._load():
            return
        errors = 0
        watcher = asyncio.create_task(self._watch_changes())
        try:
            while True:
                try:
                    if self.rec["phase"] == "release_command":
                        await self._release_command()
                        continue
                    if self.rec["phase"] in ("deploy", "rollback"):
                        if await self._round():
                            continue
                    return
                except (TaxiwayError, OSError) as e:
                    errors += 1
                    await self._say(f"error: {e}")
                    if errors >= MAX_ERRORS:
                        await self._finish("failed", f"gave up after {errors} errors; last: {e}")
                        return
                    await asyncio.sleep(min(5.0, 0.5 * errors))
                    await self._load()
        except asyncio.CancelledError:
            raise  # the API is stopping: the DEPLOYS record stays for the next start
        except Exception as e:  # a bug must not leave the release "running" forever
            log.exception("deploy of %s failed", self.app)
            with contextlib.suppress(Exception):
                await self._finish("failed", f"{type(e).__name__}: {e}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            if _tasks.get(self.app) is asyncio.current_task():
                _tasks.pop(self.app, None)

    async def _finish(self, status: str, text: str) -> None:
        self.rec["phase"] = "over"
        await self._say(text, status=status, **({"error": text} if status != "complete" else {}))
        with contextlib.suppress(Exception):
            await self.st.delete(schema.DEPLOYS, self.app)

    # -- machine configs --

    async def _configs(self, release: int | None) -> dict[str, dict[str, Any]]:
        if release is None:
            return {}
        if release not in self.configs:
            if release == self.rec["release"]:
                image, cfg = self.rec["image"], self.rec["config"]
            else:
                got = await self.st.get(schema.RELEASES, schema.release_key(self.app, release))
                if not got:
                    raise TaxiwayError(f"release v{release} of {self.app} is gone", "deploy again")
                image, cfg = got[0]["image"], appconfig.validate(got[0].get("config") or {}, "config")
            self.configs[release] = appconfig.machine_configs(cfg, image, release, deploy_id=self.rec["id"])
        return self.configs[release]

    # -- observing --

    async def _view(self) -> dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]]:
        """Live machines by process group, each with its STATUS."""
        out: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
        for rec in await _live_machines(self.st, self.app):
            g = rec.get("process_group") or schema.DEFAULT_PROCESS
            if g == RELEASE_COMMAND_GROUP:
                continue
            got = await self.st.get(schema.STATUS, schema.machine_key(self.app, rec["id"]))
            out.setdefault(g, []).append((rec, got[0] if got else None))
        return out

    def _health(self, rec: dict[str, Any], status: dict[str, Any] | None, target: int) -> str:
        cfg = rec.get("config") or {}
        state = (status or {}).get("state")
        if status and state == "started" and status.get("instance_id") in (None, rec.get("instance_id")):
            checks = status.get("checks") or {}
            want = appconfig.check_count(cfg)
            if len(checks) >= want and all(c.get("status") == "passing" for c in checks.values()):
                return "passing"
        if rec["id"] in self.rec.get("failed_machines", []):
            return "failing"
        if state in ("failed", "stopped", "destroyed"):
            return "failing"
        if rec.get("release") == target:
            wait_timeout = float(self.rec["config"]["deploy"].get("wait_timeout", appconfig.DEFAULT_WAIT_TIMEOUT))
            # From when this deploy began at the earliest: a machine of the target release made long
            # ago (an old one a rollback goes back to) gets its full wait too.
            since = max(float(rec.get("created_at") or 0), float(self.rec.get("started_at") or 0))
            if time.time() - since > wait_timeout:
                return "failing"
        return "pending"

    def _target(self, group: str) -> strategy.Target:
        rolling_back = self.rec["phase"] == "rollback"
        release = self.rec["previous"] if rolling_back else self.rec["release"]
        count = self.rec["counts"].get(group, 0)
        if rolling_back and release is None:
            release, count = -1, 0  # nothing to go back to: remove what this deploy made
        elif rolling_back:
            count = max(0, count - self.foreign.get(group, 0))  # those it keeps serve too
        cfg = (self.configs.get(release) or {}).get(group) or {}
        mu = self.rec["config"]["deploy"]["max_unavailable"]
        strat = "rolling" if rolling_back else self.rec["strategy"]
        if rolling_back:
            mu = max(1, count)  # the old release comes back all at once (still created before anything goes)
        return strategy.Target(release, count, strat, mu, stop_first=bool(cfg.get("volumes")), rolling_back=rolling_back)

    # -- one round --

    async def _round(self) -> bool:
        """Plan and do one round for every group; False when the deploy is over."""
        rolling_back = self.rec["phase"] == "rollback"
        target_release = self.rec["previous"] if rolling_back else self.rec["release"]
        configs = await self._configs(target_release)
        view = await self._view()
        self.foreign = {}
        if rolling_back and await self._uncordon_kept(view):
            view = await self._view()
        if rolling_back:
            # A failed deploy never removes machines it did not make (red team M8a: a first release
            # with a bad image destroyed the machines made through the Machines API before it):
            # a rollback handles only this deploy's machines and those of the release it returns to.
            for g, ms in list(view.items()):
                mine = [(rec, status) for rec, status in ms if rec.get("deploy") == self.rec["id"]
                        or (target_release is not None and rec.get("release") == target_release)]
                self.foreign[g] = sum(1 for rec, _ in ms if not rec.get("cordoned")) - \
                    sum(1 for rec, _ in mine if not rec.get("cordoned"))
                view[g] = mine
        groups = sorted(set(self.rec["counts"]) | set(view) | set(configs))
        plans: dict[str, list[strategy.Step]] = {}
        for g in groups:
            machines = [strategy.Machine(rec["id"], rec.get("release"), self._health(rec, status, target_release),
                                         bool(rec.get("cordoned"))) for rec, status in view.get(g, [])]
            self.rec["counts"].setdefault(g, 0)
            plans[g] = strategy.plan(machines, self._target(g))
        for g, steps in plans.items():
            for s in steps:
                if s.kind == "rollback":
                    return await self._rollback(g, s)
                if s.kind == "fail":
                    await self._finish("failed", f"rollback failed: machines {', '.join(s.ids)} of "
                                       f"v{target_release} did not pass their checks either")
                    return False
        if all(s.kind == "done" for steps in plans.values() for s in steps):
            if rolling_back:
                prev = self.rec["previous"]
                cause = self.rec.get("cause") or "its machines failed"
                await self._finish("rolled_back" if prev is not None else "failed",
                                   f"rolled back to v{prev}: {cause}" if prev is not None
                                   else f"{cause}; they were removed (no earlier release to go back to)")
            else:
                await self._finish("complete", f"v{self.rec['release']} is deployed")
            return False
        # Groups move together: all creates, then all waits, then all retires, in plan order per group.
        work = []
        for g, steps in plans.items():
            work.append(self._do(g, [s for s in steps if s.kind != "done"]))
        await asyncio.gather(*work)
        return True

    async def _do(self, group: str, steps: list[strategy.Step]) -> None:
        for s in steps:
            if s.kind == "create":
                await self._say(f"{group}: creating {s.n} machine{'s' if s.n != 1 else ''} of v{s.release}"
                                + (f" ({s.reason})" if s.reason else ""))
                await asyncio.gather(*(self._create(group, s.release) for _ in range(s.n)))
            elif s.kind == "wait":
                await self._wait_health(list(s.ids))
            elif s.kind == "retire":
                await self._edge_routes_others(set(s.ids))
                await self._say(f"{group}: retiring {', '.join(s.ids)}" + (f" ({s.reason})" if s.reason else ""))
                await asyncio.gather(*(self._retire(mid) for mid in s.ids))

    async def _edge_routes_others(self, retiring: set[str], timeout: float = 10.0) -> None:
        """Before cordoning machines that serve, let the edge route the app's other (new) machines.

        The edge learns of a new machine's passing checks through its KV watch, a moment after
        the deployer does; cordoning the last old machine in that moment would leave it nothing.
        No edge, or an app it routes nothing of (no http service): nothing to wait for.
        """
        from taxiway.platform import edge

        deadline = time.monotonic() + timeout
        delay = 0.01  # the edge's watch usually has it already, or within milliseconds
        while time.monotonic() < deadline:
            try:
                r = await self.st.request(edge.INFLIGHT_SUBJECT, {}, timeout=2)
            except Unavailable:
                return
            routed = set((r.get("routes") or {}).get(self.app) or [])
            if not routed or routed - retiring:
                return
            await asyncio.sleep(delay)
            delay = min(POLL / 2, delay * 2)

    async def _uncordon_kept(self, view: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]]) -> bool:
        """Rolling back: machines this deploy cordoned to retire them but did not stop (a retire cut by
        a control-plane restart, or one under way when the new release failed) serve again, instead
        of being retired and made anew. Returns whether any was restored."""
        mine = set(self.rec.get("cordoned") or [])
        back = [rec["id"] for ms in view.values() for rec, status in ms
                if rec["id"] in mine and rec.get("cordoned") and rec.get("desired") == "started"
                and rec.get("release") == self.rec["previous"] and self.rec["previous"] is not None
                and (status or {}).get("state") == "started"]
        for mid in back:
            await self.st.update(schema.MACHINES, schema.machine_key(self.app, mid),
                                 lambda o: {**o, "cordoned": False, "updated_at": time.time()}
                                 if o and o.get("desired") == "started" else None)
        if back:
            await self._save(cordoned=sorted(mine - set(back)))
            await self._say(f"uncordoned {', '.join(back)}: they serve again while rolling back")
        return bool(back)

    async def _rollback(self, group: str, step: strategy.Step) -> bool:
        wait = float(self.rec["config"]["deploy"].get("wait_timeout", appconfig.DEFAULT_WAIT_TIMEOUT))
        cause = self.rec.get("cause") or (f"{group} machine{'s' if len(step.ids) > 1 else ''} {', '.join(step.ids)} "
                                          f"did not pass {'their' if len(step.ids) > 1 else 'its'} health checks "
                                          f"within {wait:g}s")
        await self._say(f"{cause}; rolling back" + (f" to v{self.rec['previous']}" if self.rec["previous"] is not None
                                                    else ""))
        await self._save(phase="rollback", cause=cause)
        return True

    # -- machines --

    async def _agent(self, host: str, verb: str, payload: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        reply = await self.st.request(schema.agent_subject(host, verb), payload, timeout=timeout)
        if not reply.get("ok"):
            raise TaxiwayError(f"the agent refused to {verb} machine {payload.get('id')}: {reply.get('error')}",
                               reply.get("fix") or "see the agent's log")
        return reply

    async def _create(self, group: str, release: int) -> str:
        configs = await self._configs(release)
        config = dict(configs[group])
        mid = schema.new_machine_id()
        config["mounts"] = [{"volume": await self._claim_volume(v["name"], mid), "path": v["path"]}
                            for v in config.get("volumes") or []]
        now = time.time()
        rec = {"id": mid, "name": f"{self.app}-{mid[:6]}", "app": self.app, "org": self.rec.get("org"),
               "region": schema.DEFAULT_REGION, "host": schema.DEFAULT_HOST, "process_group": group,
               "release": release, "config": config, "desired": "started", "instance_id": _secrets.token_hex(13),
               "created_at": now, "updated_at": now, "cordoned": False, "deploy": self.rec["id"]}
        await self.st.put(schema.MACHINES, schema.machine_key(self.app, mid), rec, revision=0)
        try:
            await self._agent(rec["host"], "create", {"app": self.app, "id": mid, "machine": rec, "start": True})
        except (TaxiwayError, Unavailable) as e:
            if isinstance(e, Unavailable):
                raise
            # The machine exists in MACHINES but could not be made: the planner sees it failing.
            await self._say(f"{group}: machine {mid} failed to start: {e}")
            await self._save(failed_machines=[*self.rec.get("failed_machines", []), mid],
                             cause=self.rec.get("cause") or f"machine {mid} failed to start: {e.message}")
        return mid

    async def _claim_volume(self, name: str, mid: str) -> str:
        """A volume named ``name`` that no live machine holds (made if there is none), now held by ``mid``."""
        live = {rec["id"] for rec in await _live_machines(self.st, self.app)}
        for key, vol, rev in await self.st.items(schema.VOLUMES, self.app + "."):
            if vol.get("name") == name and vol.get("machine") not in live:
                try:
                    await self.st.put(schema.VOLUMES, key, {**vol, "machine": mid, "state": "attached"}, revision=rev)
                    return vol["id"]
                except Conflict:
                    continue
        vid = "vol_" + _secrets.token_hex(8)
        await self.st.put(schema.VOLUMES, schema.volume_key(self.app, vid),
                          {"id": vid, "app": self.app, "name": name, "size": 1 << 30, "region": schema.DEFAULT_REGION,
                           "host": schema.DEFAULT_HOST, "machine": mid, "state": "attached",
                           "created_at": time.time()}, revision=0)
        return vid

    async def _wait_health(self, ids: list[str]) -> None:
        """Until each machine passes or fails (the round after this one decides what that means)."""
        target = self.rec["previous"] if self.rec["phase"] == "rollback" else self.rec["release"]
        said = False
        while True:
            self.changed.clear()
            left = []
            for mid in ids:
                got = await self.st.get(schema.MACHINES, schema.machine_key(self.app, mid))
                if not got or got[0].get("desired") == "destroyed":
                    continue
                st = await self.st.get(schema.STATUS, schema.machine_key(self.app, mid))
                if self._health(got[0], st[0] if st else None, target) == "pending":
                    left.append(mid)
            if not left:
                return
            if not said:
                await self._say(f"waiting for {', '.join(left)} to start and pass their checks")
                said = True
            await self._next_change()
            await self._load()  # failed_machines may have grown

    async def _retire(self, mid: str) -> None:
        """Cordon (persisted first, so a cut retire is finished next round), drain, stop, destroy."""
        key = schema.machine_key(self.app, mid)

        def cordon(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("cordoned"):
                return None
            return {**old, "cordoned": True, "updated_at": time.time()}

        def note(old: dict[str, Any] | None) -> dict[str, Any]:  # in the change: retires run concurrently
            base = old or self.rec
            return {**base, "cordoned": sorted({*(base.get("cordoned") or []), mid}), "updated_at": time.time()}

        if mid not in (self.rec.get("cordoned") or []):  # noted first: a rollback restores what we cordon
            self.rec = await self.st.update(schema.DEPLOYS, self.app, note)

        rec = await self.st.update(schema.MACHINES, key, cordon)
        if rec is None or rec.get("desired") == "destroyed":
            return
        timeout = float((rec.get("config") or {}).get("stop_timeout") or 5.0) + 25.0
        from taxiway.platform import edge

        await edge.drain(self.st, [mid], timeout=timeout)
        host = rec.get("host") or schema.DEFAULT_HOST
        status = await self.st.get(schema.STATUS, key)
        if status and status[0].get("state") in ("started", "starting"):
            await self.st.update(schema.MACHINES, key, lambda o: {**o, "desired": "stopped", "updated_at": time.time()}
                                 if o else None)
            with contextlib.suppress(TaxiwayError):
                await self._agent(host, "stop", {"app": self.app, "id": mid}, timeout=timeout + 30)
        await self.st.update(schema.MACHINES, key, lambda o: {**o, "desired": "destroyed", "updated_at": time.time()}
                             if o else None)
        with contextlib.suppress(TaxiwayError):
            await self._agent(host, "destroy", {"app": self.app, "id": mid, "force": True}, timeout=120)
        for vkey, vol, vrev in await self.st.items(schema.VOLUMES, self.app + "."):
            if vol.get("machine") == mid:
                with contextlib.suppress(Conflict):
                    await self.st.put(schema.VOLUMES, vkey, {**vol, "machine": None, "state": "created"}, revision=vrev)

    # -- release_command --

    async def _release_command(self) -> None:
        cfg = self.rec["config"]
        cmd = cfg["deploy"]["release_command"]
        configs = await self._configs(self.rec["release"])
        base = dict(configs.get(schema.DEFAULT_PROCESS) or next(iter(configs.values())))
        mid = self.rec.get("release_machine")
        if mid and not await self.st.get(schema.MACHINES, schema.machine_key(self.app, mid)):
            mid = None  # cut between choosing its id and writing its record: make it now
        if not mid:
            mid = self.rec.get("release_machine") or schema.new_machine_id()
            base.update(entrypoint=["/bin/sh", "-c", cmd], cmd=None, services=[], checks={},
                        restart={"policy": "no", "max_retries": 0},
                        metadata={**base.get("metadata", {}), "process_group": RELEASE_COMMAND_GROUP})
            base["mounts"] = []  # volumes stay with the app's machines
            base.pop("volumes", None)
            now = time.time()
            rec = {"id": mid, "name": f"{self.app}-release-{mid[:6]}", "app": self.app, "org": self.rec.get("org"),
                   "region": schema.DEFAULT_REGION, "host": schema.DEFAULT_HOST, "process_group": RELEASE_COMMAND_GROUP,
                   "release": self.rec["release"], "config": base, "desired": "started",
                   "instance_id": _secrets.token_hex(13), "created_at": now, "updated_at": now, "cordoned": True}
            await self._save(release_machine=mid)  # first: a cut create is found and cleaned after a restart
            await self.st.put(schema.MACHINES, schema.machine_key(self.app, mid), rec, revision=0)
            await self._say(f"running release_command in machine {mid}: {cmd}")
            try:
                await self._agent(rec["host"], "create", {"app": self.app, "id": mid, "machine": rec, "start": True})
            except TaxiwayError as e:
                if isinstance(e, Unavailable):
                    raise
                await self._destroy_one_off(mid)
                await self._finish("failed", f"release_command could not start: {e}")
                return
        deadline = float(self.rec["started_at"]) + float(cfg["deploy"].get("release_command_timeout", 300.0))
        code = None
        while True:
            self.changed.clear()
            got = await self.st.get(schema.STATUS, schema.machine_key(self.app, mid))
            status = got[0] if got else {}
            if status.get("state") in ("stopped", "failed", "destroyed") and (
                    status.get("exit_code") is not None or status.get("state") != "stopped"):
                code = status.get("exit_code")
                break
            if time.time() > deadline:
                break
            await self._next_change()
        tail = await self._log_tail(mid)
        await self._destroy_one_off(mid)
        if code == 0:
            await self._say("release_command finished (exit 0)")
            await self._save(phase="deploy")
            return
        why = "timed out" if code is None and time.time() > deadline else f"exited with {code}"
        await self._finish("failed", f"release_command {why}" + (f": {' | '.join(tail)}" if tail else ""))

    async def _log_tail(self, mid: str, n: int = 5) -> list[str]:
        with contextlib.suppress(Exception):
            lines = await self.st.fetch_stream(schema.logs_subject(self.app, "*", mid), limit=n)
            return [str(x.get("line", "")).rstrip()[:200] for x in lines if x]
        return []

    async def _destroy_one_off(self, mid: str) -> None:
        key = schema.machine_key(self.app, mid)
        await self.st.update(schema.MACHINES, key, lambda o: {**o, "desired": "destroyed", "updated_at": time.time()}
                             if o else None)
        with contextlib.suppress(TaxiwayError):
            await self._agent(schema.DEFAULT_HOST, "destroy", {"app": self.app, "id": mid, "force": True}, timeout=120)
