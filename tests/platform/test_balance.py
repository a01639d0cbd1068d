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
    can_autostart,
    http_service,
    machines_to_stop,
    tcp_services,
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


# -- Fly's concurrency semantics, as properties ----------------------------------------------------

_limit = st.one_of(st.none(), st.integers(1, 4))


@given(st.lists(st.tuples(_limit, _limit, st.sampled_from(["requests", "connections"]), st.integers(0, 6),
                          st.integers(0, 6), st.integers(0, 2)), min_size=1, max_size=6))
@settings(max_examples=300)
def test_choice_respects_soft_and_hard_limits(specs):
    """Never a backend at its hard limit (unless an idle pooled connection is reused, for
    connections); above soft only when every eligible backend is; least load in its tier;
    None only when every backend is full."""
    bal, bs = Balancer(), []
    for i, (soft, hard, kind, inflight, conns, idle) in enumerate(specs):
        if soft and hard and soft > hard:
            soft, hard = hard, soft
        b = Backend(f"m{i}", "web", 40000 + i, soft_limit=soft, hard_limit=hard, concurrency=kind)
        bs.append(b)
        bal.inflight[b.machine], bal.conns[b.machine] = inflight, conns + min(idle, conns)
        bal.idle[b.machine] = min(idle, conns)

    def full(b: Backend) -> bool:
        n = bal.load(b)
        return b.hard_limit is not None and n >= b.hard_limit and not (
            b.concurrency == "connections" and bal.idle[b.machine] > 0)

    def under_soft(b: Backend) -> bool:
        return b.soft_limit is None or bal.load(b) < b.soft_limit

    got = bal.choose(bs)
    eligible = [b for b in bs if not full(b)]
    if not eligible:
        assert got is None and bal.full(bs)
        return
    assert got is not None and not full(got) and not bal.full(bs)
    if any(under_soft(b) for b in eligible):
        assert under_soft(got)
        tier = [b for b in eligible if under_soft(b)]
    else:
        tier = eligible
    assert bal.load(got) == min(bal.load(b) for b in tier)
    assert bal.above_soft(bs) == all(b.soft_limit is not None and bal.load(b) >= b.soft_limit for b in bs)


def test_connections_type_counts_open_connections():
    conc = {"type": "connections", "soft_limit": 1, "hard_limit": 2}
    b = backend_for(machine("m1", concurrency=conc), status("m1"), "web.m1")
    assert (b.concurrency, b.soft_limit, b.hard_limit) == ("connections", 1, 2)
    bal = Balancer()
    bal.acquire(b)
    bal.acquire(b)
    assert bal.load(b) == 0 and bal.choose([b]) is b  # requests do not count, connections do
    bal.opened("m1")
    bal.opened("m1")
    assert bal.choose([b]) is None
    bal.pooled("m1")  # one of them is idle: reusing it opens nothing
    assert bal.choose([b]) is b
    bal.pooled("m1", -1)
    bal.closed("m1")
    assert bal.choose([b]) is b and bal.conns == {"m1": 1} and bal.idle == {}


# -- scale to zero ---------------------------------------------------------------------------------

def _auto(m: dict, autostop: str = "stop", autostart: bool = True, keep: int = 0) -> dict:
    m["config"]["services"][0].update(autostop=autostop, autostart=autostart, min_machines_running=keep)
    return m


def test_which_stopped_machines_the_edge_may_start():
    assert can_autostart(_auto(machine("m1")), status("m1", state="stopped"))
    assert not can_autostart(_auto(machine("m1"), autostart=False), status("m1", state="stopped"))
    assert not can_autostart(_auto(machine("m1", desired="stopped")), status("m1", state="stopped"))  # a user's stop
    assert not can_autostart(_auto(machine("m1", cordoned=True)), status("m1", state="stopped"))
    assert not can_autostart(_auto(machine("m1")), status("m1", state="started"))
    assert not can_autostart(_auto(machine("m1")), None)
    r = Routes()
    r.set_machine("web.m1", _auto(machine("m1")))
    r.set_status("web.m1", status("m1", state="stopped"))
    r.set_machine("web.m2", _auto(machine("m2")))
    r.set_status("web.m2", status("m2"))
    assert r.sleeping("web") == ["m1"] and r.autostop("web") == [("m2", True, 0)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 2), st.floats(0, 20)),
                min_size=0, max_size=8), st.floats(1, 10))
def test_idle_machines_stop_down_to_min_machines_running(specs, idle_after):
    now = 100.0
    cands = [(f"m{i}", on, keep) for i, (on, keep, _, _) in enumerate(specs)]
    inflight = {f"m{i}": n for i, (_, _, n, _) in enumerate(specs) if n}
    last = {f"m{i}": now - ago for i, (_, _, _, ago) in enumerate(specs)}
    stop = machines_to_stop(cands, inflight, last, now, idle_after)
    keep = max((s[1] for s in specs), default=0)
    assert len(cands) - len(stop) >= min(keep, len(cands))
    assert len(set(stop)) == len(stop)
    for mid in stop:
        i = int(mid[1:])
        on, _, n, ago = specs[i]
        assert on and n == 0 and ago >= idle_after
    # The longest idle go first: every idle candidate left running was idle no longer than one stopped.
    left = [c for c, on, _ in cands if c not in stop and on and not inflight.get(c) and now - last[c] >= idle_after]
    if stop and left:
        assert max(now - last[c] for c in left) <= min(now - last[c] for c in stop)


def test_plain_tcp_services_and_their_backends():
    m = machine("m1")
    m["config"]["services"].append({"internal_port": 5432, "protocol": "tcp",
                                    "ports": [{"port": 15432, "handlers": []},
                                              {"port": 15433, "handlers": ["proxy_proto"]},
                                              {"port": 15434, "handlers": ["tls"]}]})
    assert tcp_services(m["config"]) == [(15432, 5432, False), (15433, 5432, True)]
    r = Routes()
    r.set_machine("web.m1", m)
    r.set_status("web.m1", status("m1", ports={"8080": 40000, "5432": 40001}))
    other = machine("m9", app="zed")
    other["config"]["services"] = [{"internal_port": 1, "ports": [{"port": 15432}]}]
    r.set_machine("zed.m9", other)
    assert r.tcp_listeners() == {15432: ("web", 5432, False), 15433: ("web", 5432, True)}  # first app keeps it
    assert [(b.machine, b.port) for b in r.tcp_backends("web", 5432)] == [("m1", 40001)]
    r.set_status("web.m1", status("m1", state="stopped", ports={"8080": 40000, "5432": 40001}))
    assert r.tcp_backends("web", 5432) == []
