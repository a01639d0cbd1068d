"""Deploy planners, run against a simulated group of machines: capacity never drops, rollbacks restore."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.platform.strategy import Machine, Step, Target, batch_size, plan


class Sim:
    """A process group: steps from the planner are applied one machine at a time, the invariant checked after each."""

    def __init__(self, old: int, old_release: int, fate, crash=lambda: False):
        self.ids = itertools.count()
        self.machines: dict[str, Machine] = {}
        for _ in range(old):
            self.add(old_release, "passing")
        self.fate = fate  # (release, index of creation) -> "passing" | "failing"
        self.crash = crash  # True: cut the current round short (a control-plane kill -9)
        self.created: dict[int, int] = {}
        self.low = len(self.serving())
        self.history: list[str] = []

    def add(self, release, health="pending") -> Machine:
        m = Machine(f"m{next(self.ids)}", release, health)
        self.machines[m.id] = m
        return m

    def serving(self):
        return [m for m in self.machines.values() if m.serving]

    def note(self):
        self.low = min(self.low, len(self.serving()))

    def apply(self, step: Step) -> bool:
        """Apply one step; False when the round was cut short."""
        self.history.append(step.kind)
        if step.kind == "create":
            for _ in range(step.n):
                i = self.created.get(step.release, 0)
                self.created[step.release] = i + 1
                self.add(step.release)
                if self.crash():
                    return False
        elif step.kind == "wait":
            for mid in step.ids:
                m = self.machines[mid]
                i = int(mid[1:])
                self.machines[mid] = Machine(m.id, m.release, self.fate(m.release, i), m.cordoned)
        elif step.kind == "retire":
            for mid in step.ids:
                m = self.machines[mid]
                self.machines[mid] = Machine(m.id, m.release, m.health, cordoned=True)
                self.note()
                if self.crash():
                    return False  # cordoned, never destroyed: the next round must finish it
                del self.machines[mid]
                self.note()
        return True

    def run(self, target: Target, previous: int | None, rounds: int = 300) -> str:
        for _ in range(rounds):
            steps = plan(list(self.machines.values()), target)
            assert steps, "the planner always says something"
            for step in steps:
                if step.kind in ("done", "fail"):
                    return step.kind
                if step.kind == "rollback":
                    self.history.append("rollback")
                    assert not target.rolling_back
                    target = Target(previous if previous is not None else -1, target.count if previous is not None else 0,
                                    "rolling", target.max_unavailable, target.stop_first, rolling_back=True)
                    break
                if not self.apply(step):
                    break
                self.note()
        raise AssertionError(f"no end after {rounds} rounds: {self.history[-20:]}")


strategies = st.sampled_from(["rolling", "bluegreen", "canary", "immediate"])
max_unavail = st.sampled_from([0.33, 0.5, 1, 2, 3])


@given(strategy=strategies, count=st.integers(1, 6), old=st.integers(0, 6), mu=max_unavail, stop_first=st.booleans(),
       crashes=st.lists(st.booleans(), max_size=40))
@settings(max_examples=400, deadline=None)
def test_a_healthy_release_replaces_every_machine_without_losing_capacity(strategy, count, old, mu, stop_first, crashes):
    cuts = iter(crashes)
    sim = Sim(old, 1, fate=lambda r, i: "passing", crash=lambda: next(cuts, False))
    t = Target(2, count, strategy, mu, stop_first)
    assert sim.run(t, previous=1 if old else None) == "done"
    assert sorted(m.release for m in sim.machines.values()) == [2] * count
    assert all(not m.cordoned for m in sim.machines.values())
    if strategy != "immediate":
        floor = min(old, count) - (batch_size(mu, count) if stop_first else 0)
        assert sim.low >= floor, (sim.low, floor, sim.history)


@given(strategy=st.sampled_from(["rolling", "bluegreen", "canary"]), count=st.integers(1, 6), mu=max_unavail,
       stop_first=st.booleans(), bad=st.sets(st.integers(0, 5), min_size=1), crashes=st.lists(st.booleans(), max_size=40))
@settings(max_examples=400, deadline=None)
def test_a_failing_release_is_rolled_back_and_the_old_one_keeps_serving(strategy, count, mu, stop_first, bad, crashes):
    cuts = iter(crashes)
    first_bad = min(bad) % count  # one of the count new machines fails, so the failure always shows
    sim = Sim(count, 1, fate=lambda r, i: "failing" if r == 2 and i >= first_bad + count else "passing",
              crash=lambda: next(cuts, False))
    # Machines m0..m{count-1} are the old ones; new machines are numbered from count: the (first_bad)th new one
    # and every later one fail, so some new machines may pass before the failure shows.
    end = sim.run(Target(2, count, strategy, mu, stop_first), previous=1)
    assert end == "done"
    assert "rollback" in sim.history
    assert sorted(m.release for m in sim.machines.values()) == [1] * count  # the old release, whole again
    assert all(m.serving for m in sim.machines.values())
    floor = count - (batch_size(mu, count) if stop_first else 0)
    assert sim.low >= floor, (sim.low, floor, sim.history)


@given(count=st.integers(1, 5), mu=max_unavail)
@settings(max_examples=100, deadline=None)
def test_first_deploy_that_fails_removes_its_machines(count, mu):
    sim = Sim(0, 1, fate=lambda r, i: "failing")
    assert sim.run(Target(2, count, "rolling", mu), previous=None) == "done"
    assert sim.machines == {}


def test_rollback_of_a_rollback_fails():
    sim = Sim(2, 1, fate=lambda r, i: "failing" if i >= 2 else "passing")
    assert sim.run(Target(2, 2, "rolling", 1, stop_first=True), previous=1) == "fail"


def test_rolling_batches_follow_max_unavailable():
    old = [Machine(f"o{i}", 1, "passing") for i in range(6)]
    assert plan(old, Target(2, 6, "rolling", 0.5)) == [Step("create", n=3, release=2)]
    assert plan(old, Target(2, 6, "rolling", 1)) == [Step("create", n=1, release=2)]
    assert plan(old, Target(2, 6, "canary", 3)) == [Step("create", n=1, release=2, reason="canary")]
    assert plan(old, Target(2, 6, "bluegreen", 1)) == [Step("create", n=6, release=2, reason="green")]
    steps = plan(old, Target(2, 6, "rolling", 2, stop_first=True))
    assert [s.kind for s in steps] == ["retire", "create"] and steps[1].replaces == ("o0", "o1")
    assert plan(old + [Machine("n1", 2, "pending")], Target(2, 6)) == [Step("wait", ids=("n1",))]
    imm = plan(old, Target(2, 6, "immediate"))
    assert [s.kind for s in imm] == ["retire", "create"]


def test_step_json_round_trip():
    s = Step("create", n=2, release=3, replaces=("a",), reason="x")
    assert Step.from_json(s.to_json()) == s


def test_unknown_strategy():
    with pytest.raises(ValueError):
        plan([], Target(1, 1, "yolo"))


def test_an_old_machine_not_checked_yet_stays_until_the_new_release_serves():
    # Red team M8a: a machine made through the Machines API just before a first deploy has not passed
    # its first check yet; retiring it at once lost it when the deploy then failed.
    fresh = Machine("m0", None, "pending")
    for strategy in ("rolling", "bluegreen", "canary"):
        assert [s.kind for s in plan([fresh], Target(1, 1, strategy, 1))] == ["create"]
    assert plan([fresh, Machine("n1", 1, "failing")], Target(1, 1)) == [Step("rollback", ids=("n1",),
                                                                             reason="new machines failed their health checks")]
    assert plan([fresh, Machine("n1", 1, "passing")], Target(1, 1)) == [Step("retire", ids=("m0",), reason="replaced")]
    assert plan([Machine("m0", None, "failing")], Target(1, 1))[0].kind == "retire"  # a crashed one goes at once
