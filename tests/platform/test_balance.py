"""The edge's pure core: which machines are routable, and least-connections choice."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.platform.balance import (
    Backend,
    Balancer,
    Routes,
    backend_for,
    http_service,
    why_not_routable,
)


def machine(mid: str, app: str = "web", desired: str = "started", cordoned: bool = False,
            checks: bool = False, port: int = 8080, concurrency: dict | None = None) -> dict:
    service: dict = {"internal_port": port, "protocol": "tcp",
                     "ports": [{"port": 80, "handlers": ["http"]}]}
    if concurrency:
        service["concurrency"] = concurrency
    config: dict = {"services": [service]}
    if checks:
        config["checks"] = {"alive": {"type": "http", "port": port, "path": "/"}}
    return {"id": mid, "app": app, "desired": desired, "cordoned": cordoned, "config": config}


def status(mid: str, app: str = "web", state: str = "started", checks: dict | None = None,
           ports: dict | None = None) -> dict:
    return {"id": mid, "app": app, "state": state, "checks": checks or {},
            "ports": {"8080": 40000} if ports is None else ports}


def test_started_healthy_machine_is_a_backend_on_its_mapped_port():
    b = backend_for(machine("m1"), status("m1", ports={"8080": 41234}), "web.m1")
    assert b == Backend("m1", "web", 41234)


def test_each_reason_a_machine_gets_nothing():
    ok_m, ok_s = machine("m1"), status("m1")
    assert why_not_routable(ok_m, ok_s) is None
    assert why_not_routable(None, ok_s) == "no machine record"
    assert why_not_routable(machine("m1", desired="stopped"), ok_s) == "desired state is 'stopped'"
    assert why_not_routable(machine("m1", cordoned=True), ok_s) == "cordoned"
    assert why_not_routable(ok_m, None) == "no status from the agent yet"
    assert why_not_routable(ok_m, status("m1", state="stopping")) == "state is 'stopping'"
    assert why_not_routable(ok_m, status("m1", checks={"alive": {"status": "critical"}})) == \
        "check 'alive' is 'critical'"
    assert why_not_routable(ok_m, status("m1", checks={"alive": {"status": "warning"}})) == \
        "check 'alive' is 'warning'"
    # Declared checks that have not run yet: a new machine of a deploy waits for them.
    assert why_not_routable(machine("m1", checks=True), ok_s) == "checks have not passed yet"
    assert why_not_routable(machine("m1", checks=True),
                            status("m1", checks={"alive": {"status": "passing"}})) is None
    assert why_not_routable(ok_m, status("m1", ports={"9999": 40000})) == "no host port for the http service"
    assert why_not_routable(ok_m, status("m1", ports={"8080": 70000})) == "no host port for the http service"


def test_http_service_prefers_the_http_handler():
    tcp = {"internal_port": 5432, "ports": [{"port": 5432}]}
    web = {"internal_port": 8080, "ports": [{"port": 443, "handlers": ["tls", "http"]}]}
    assert http_service({"services": [tcp, web]}) is web
    assert http_service({"services": [tcp, {"internal_port": 3000, "http": True}]})["internal_port"] == 3000
    assert http_service({"services": [tcp]}) is tcp
    assert http_service({}) is None


def test_routes_follow_entries_and_know_apps_without_backends():
    r = Routes()
    r.set_app("web", {"name": "web"})
    assert r.known("web") and r.backends("web") == ()
    assert not r.known("other")
    r.set_machine("web.m1", machine("m1"))
    assert r.backends("web") == ()  # no status yet
    r.set_status("web.m1", status("m1"))
    assert [b.machine for b in r.backends("web")] == ["m1"]
    assert r.routable("m1")
    r.set_machine("web.m1", machine("m1", cordoned=True))
    assert r.backends("web") == () and not r.routable("m1")
    r.set_machine("web.m1", machine("m1"))
    r.set_status("web.m1", None)  # deleted
    assert r.backends("web") == ()
    r.replace("status", [("web.m1", status("m1")), ("api.m9", status("m9", app="api"))])
    assert [b.machine for b in r.backends("web")] == ["m1"]
    assert r.known("api") and r.backends("api") == ()  # a status without a machine record
    assert r.table() == {"web": ["m1"]}


records = st.fixed_dictionaries({
    "desired": st.sampled_from(["started", "stopped", "destroyed"]),
    "cordoned": st.booleans(),
    "has_status": st.booleans(),
    "state": st.sampled_from(["created", "starting", "started", "stopping", "stopped", "failed"]),
    "check": st.sampled_from([None, "passing", "warning", "critical"]),
    "declares": st.booleans(),
    "mapped": st.booleans(),
})


@given(st.lists(records, max_size=8), st.randoms(use_true_random=False))
@settings(max_examples=300)
def test_never_routes_to_a_cordoned_unhealthy_or_stopped_machine(specs, rnd):
    r = Routes()
    entries = []
    for i, s in enumerate(specs):
        mid = f"{i:014x}"
        m = machine(mid, desired=s["desired"], cordoned=s["cordoned"], checks=s["declares"])
        st_ = status(mid, state=s["state"], checks={"alive": {"status": s["check"]}} if s["check"] else {},
                     ports={"8080": 40000 + i} if s["mapped"] else {})
        entries.append(("m", f"web.{mid}", m))
        if s["has_status"]:
            entries.append(("s", f"web.{mid}", st_))
    rnd.shuffle(entries)  # whatever order the watches deliver them in
    for kind, key, value in entries:
        (r.set_machine if kind == "m" else r.set_status)(key, value)
    routed = {b.machine for b in r.backends("web")}
    for i, s in enumerate(specs):
        mid = f"{i:014x}"
        healthy = (s["desired"] == "started" and not s["cordoned"] and s["has_status"]
                   and s["state"] == "started" and s["mapped"]
                   and (s["check"] == "passing" or (s["check"] is None and not s["declares"])))
        assert (mid in routed) == healthy, s
        assert r.routable(mid) == healthy
    bal = Balancer()
    for _ in range(20):
        b = bal.choose(r.backends("web"))
        assert b is None if not routed else b.machine in routed


def backends(n: int, soft: int | None = None, hard: int | None = None) -> list[Backend]:
    return [Backend(f"m{i}", "web", 40000 + i, soft_limit=soft, hard_limit=hard) for i in range(n)]


@given(st.integers(1, 8), st.integers(1, 50))
def test_requests_spread_evenly_over_equal_machines(n, rounds):
    bal, bs = Balancer(), backends(n)
    for _ in range(n * rounds):
        bal.acquire(bal.choose(bs))
    assert Counter(bal.inflight.values()) == {rounds: n}


@given(st.integers(1, 6), st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=80))
def test_choice_is_always_a_least_loaded_machine(n, ops):
    bal, bs = Balancer(), backends(n)
    held: list[Backend] = []
    for acquire, idx in ops:
        if acquire or not held:
            b = bal.choose(bs)
            assert bal.inflight.get(b.machine, 0) == min(bal.inflight.get(x.machine, 0) for x in bs)
            bal.acquire(b)
            held.append(b)
        else:
            bal.release(held.pop(idx % len(held)))
    for b in held:
        bal.release(b)
    assert bal.inflight == {}


def test_sequential_requests_alternate_between_machines():
    bal, bs = Balancer(), backends(3)
    picks = []
    for _ in range(6):
        b = bal.choose(bs)
        bal.acquire(b)
        bal.release(b)
        picks.append(b.machine)
    assert Counter(picks) == {"m0": 2, "m1": 2, "m2": 2}


def test_soft_and_hard_limits():
    bal, bs = Balancer(), backends(2, soft=1, hard=2)
    first, second = bal.choose(bs), None
    bal.acquire(first)
    second = bal.choose(bs)
    assert second.machine != first.machine  # under soft limit first
    bal.acquire(second)
    third = bal.choose(bs)  # both at soft: above it, since all are
    bal.acquire(third)
    bal.acquire(bal.choose(bs))
    assert bal.choose(bs) is None and bal.full(bs)  # never above hard
    bal.release(third)
    assert bal.choose(bs).machine == third.machine and not bal.full(bs)


def test_excluded_and_recently_failed_machines():
    bal, bs = Balancer(penalty=2.0), backends(2)
    assert bal.choose(bs, exclude={"m0"}).machine == "m1"
    assert bal.choose(bs, exclude={"m0", "m1"}) is None
    bal.mark_failed(bs[0], now=10.0)
    assert {bal.choose(bs, now=11.0).machine for _ in range(4)} == {"m1"}
    assert {bal.choose(bs, now=12.5).machine for _ in range(4)} == {"m0", "m1"}
    # A failed machine that is the only one left is still tried.
    assert bal.choose(bs, exclude={"m1"}, now=11.0).machine == "m0"
