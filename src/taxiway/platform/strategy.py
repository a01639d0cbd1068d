"""Deploy planners: rolling, bluegreen, canary, immediate (pure: machines in, next steps out).

The deployer calls :func:`plan` again after every round with what it sees now,
so a plan is never stored as a long script that a crash could leave half-run:
whatever state the machines are in (a control-plane kill -9 mid-deploy
included), the next round picks up from there. One process group at a time.

A machine is ``passing`` (healthy and serving unless cordoned), ``pending``
(starting or in its checks' grace period) or ``failing`` (the deployer gave up
on it: crashed, or not passing within the wait timeout). Steps:

- ``create``   start ``n`` machines of the target release (``replaces``: the old
               machines whose volumes they take over)
- ``wait``     wait until these machines pass or fail
- ``retire``   cordon (the edge stops sending), drain in-flight requests, stop, destroy
- ``rollback`` the target release failed: plan again toward the previous release
- ``done`` / ``fail``

Capacity rules (the property tests pin them): rolling, canary and bluegreen
start new machines before retiring old ones, so the serving count never drops
below ``count``; when machines hold volumes (one machine per volume) a rolling
deploy must retire first, and then at most ``max_unavailable`` are down at once.
Immediate replaces everything without waiting, as Fly's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("rolling", "bluegreen", "canary", "immediate")
HEALTH = ("passing", "pending", "failing")


@dataclass(frozen=True)
class Machine:
    """One machine of a process group, as the deployer sees it now."""

    id: str
    release: int | None
    health: str = "pending"
    cordoned: bool = False

    @property
    def serving(self) -> bool:
        return self.health == "passing" and not self.cordoned


@dataclass(frozen=True)
class Target:
    """Where a process group should end: ``count`` machines of ``release``."""

    release: int
    count: int
    strategy: str = "rolling"
    max_unavailable: float = 0.33
    stop_first: bool = False  # machines hold volumes: an old one must go before its replacement starts
    rolling_back: bool = False  # a failure now is final (no rollback of a rollback)


@dataclass(frozen=True)
class Step:
    kind: str  # create | wait | retire | rollback | done | fail
    ids: tuple[str, ...] = ()
    n: int = 0
    release: int | None = None
    replaces: tuple[str, ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ids": list(self.ids), "n": self.n, "release": self.release,
                "replaces": list(self.replaces), "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Step:
        return cls(d["kind"], tuple(d.get("ids", ())), d.get("n", 0), d.get("release"),
                   tuple(d.get("replaces", ())), d.get("reason", ""))


def batch_size(max_unavailable: float, count: int) -> int:
    """How many machines change at once: a fraction of ``count`` (at least 1) or a number."""
    if max_unavailable >= 1:
        return int(max_unavailable)
    return max(1, math.floor(max_unavailable * count))


@dataclass
class _View:
    new: list[Machine] = field(default_factory=list)
    old: list[Machine] = field(default_factory=list)

    @property
    def new_passing(self) -> list[Machine]:
        return [m for m in self.new if m.health == "passing"]

    @property
    def new_pending(self) -> list[Machine]:
        return [m for m in self.new if m.health == "pending"]

    @property
    def new_failing(self) -> list[Machine]:
        return [m for m in self.new if m.health == "failing"]

    @property
    def old_serving(self) -> list[Machine]:
        return [m for m in self.old if m.serving]


def plan(machines: Sequence[Machine], target: Target) -> list[Step]:
    """The next steps for one process group; empty lists never come back (``done`` ends)."""
    if target.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {target.strategy!r}")
    strategy = target.strategy
    if target.stop_first and strategy in ("bluegreen", "canary"):
        strategy = "rolling"  # a volume holds one machine: there is no room for a second colour or a canary
    cordoned = [m for m in machines if m.cordoned]  # a retire was under way (a crash may have cut it)
    live = [m for m in machines if not m.cordoned]
    v = _View([m for m in live if m.release == target.release], [m for m in live if m.release != target.release])
    if v.new_failing and strategy != "immediate":
        ids = tuple(m.id for m in v.new_failing)
        if target.rolling_back:
            return [Step("fail", ids=ids, reason="machines of the previous release failed their checks too")]
        return [Step("rollback", ids=ids, reason="new machines failed their health checks")]
    if len(v.new) > target.count and strategy != "immediate":
        # More new machines than the count (a scale-down, or a create repeated after a crash):
        # pending ones go before passing ones, so serving capacity never drops below the count.
        order = sorted(v.new, key=lambda m: HEALTH.index(m.health), reverse=True)
        return [Step("retire", ids=tuple(m.id for m in order[: len(v.new) - target.count]),
                     reason="more machines than the count")]
    # Old machines that serve nothing (crashed, or cordoned by a retire a crash interrupted) go now:
    # no capacity is lost. Only crashed ones ("failing"): a "pending" old machine may just not have
    # passed its first check yet (one made through the Machines API right before the deploy), and
    # retiring it now would lose it if this deploy then fails (red team M8a); it goes once the new
    # release serves in full (see _rolling).
    idle_old = cordoned + [m for m in v.old if m.health == "failing"]
    if idle_old and strategy != "immediate":
        return [Step("retire", ids=tuple(m.id for m in idle_old), reason="old machines not serving")]
    if strategy == "immediate":
        return _immediate(v, target, cordoned)
    if v.new_pending:
        return [Step("wait", ids=tuple(m.id for m in v.new_pending))]
    if strategy == "bluegreen":
        return _bluegreen(v, target)
    if strategy == "canary" and not v.new and v.old and target.count > 0:
        return [Step("create", n=1, release=target.release, reason="canary")]
    return _rolling(v, target)


def _immediate(v: _View, t: Target, cordoned: list[Machine]) -> list[Step]:
    steps = []
    if v.old or cordoned:
        steps.append(Step("retire", ids=tuple(m.id for m in cordoned + v.old), reason="immediate"))
    if len(v.new) < t.count:
        steps.append(Step("create", n=t.count - len(v.new), release=t.release,
                          replaces=tuple(m.id for m in v.old) if t.stop_first else ()))
    elif len(v.new) > t.count:
        steps.append(Step("retire", ids=tuple(m.id for m in v.new[t.count:]), reason="more machines than the count"))
    return steps or [Step("done")]


def _bluegreen(v: _View, t: Target) -> list[Step]:
    if len(v.new) < t.count:  # all of green at once; blue keeps serving until every green one passes
        return [Step("create", n=t.count - len(v.new), release=t.release, reason="green")]
    if v.old:
        return [Step("retire", ids=tuple(m.id for m in v.old), reason="blue")]
    return [Step("done")]


def _rolling(v: _View, t: Target) -> list[Step]:
    b = batch_size(t.max_unavailable, t.count)
    passing = len(v.new_passing)
    need = t.count - passing
    if t.stop_first:
        # Missing machines (a scale-up, or an old one retired before a crash cut its replacement) come
        # first: creating takes nothing away. Then old ones go b at a time, never more than leaves
        # count - b serving, each batch's replacements created at once on the volumes they free.
        free = t.count - len(v.new) - len(v.old)
        if free > 0:
            return [Step("create", n=min(b, free), release=t.release)]
        if v.old:
            serving = passing + len(v.old_serving)
            k = max(1, min(b, serving - (t.count - b), len(v.old)))
            gone = tuple(m.id for m in v.old[:k])
            return [Step("retire", ids=gone, reason="make room (volumes)"),
                    Step("create", n=min(k, max(0, need)), release=t.release, replaces=gone)]
        return [Step("done")]
    surplus = passing + len(v.old_serving) - t.count
    old = sorted(v.old, key=lambda m: m.serving)  # those not serving (yet) go first: no capacity is lost
    if surplus > 0 and old:  # the new batch passes: as many old ones go
        k = min(surplus, len(old))
        return [Step("retire", ids=tuple(m.id for m in old[:k]), reason="replaced")]
    if need > 0:
        return [Step("create", n=min(b, need), release=t.release)]
    if old:  # the new release serves in full: old ones still not passing are not needed either
        return [Step("retire", ids=tuple(m.id for m in old), reason="replaced")]
    return [Step("done")]
