"""The platform's egress policy, pure (issue 17): [egress] in taxiway.toml, the per-app ACL,
the address -> machine directory the proxy mirrors from STATUS and RELEASES."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from taxiway.egress.acl import Result
from taxiway.errors import InvalidInput
from taxiway.platform import appconfig
from taxiway.platform.egresspolicy import Directory, app_acl, denial_line


def egress_of(toml: str) -> dict | None:
    return appconfig.parse('app = "web"\n' + toml)[0]["egress"]


# -- taxiway.toml [egress] --------------------------------------------------------------------

def test_egress_table_is_normalised_and_round_trips():
    e = egress_of('[egress]\nallowed_domains = ["api.example.com", "*.github.com"]\nblocked_domains = ["x.example.com"]\n')
    assert e == {"allowed_domains": ["api.example.com", "*.github.com"], "blocked_domains": ["x.example.com"],
                 "mode": "enforce"}
    cfg = appconfig.parse('app = "web"\n[egress]\nallowed_domains = ["a.example.com"]\nmode = "report"\n')[0]
    assert appconfig.validate(appconfig.validate(cfg)) == appconfig.validate(cfg)
    assert appconfig.parse(appconfig.to_toml(cfg))[0] == cfg


def test_egress_defaults():
    assert egress_of("") is None  # the platform default: public names allowed
    assert egress_of("[egress]\n")["mode"] == "open"
    assert egress_of('[egress]\nblocked_domains = ["evil.example"]\n')["mode"] == "open"
    assert egress_of("[egress]\nallowed_domains = []\n")["mode"] == "enforce"  # no way out at all


@pytest.mark.parametrize("toml, line, key, says", [
    ('[egress]\nallowed_domains = ["*"]', 3, "egress.allowed_domains[0]", "must not match everything"),
    ('[egress]\nallowed_domains = ["ok.example", "*foo.example"]', 3, "egress.allowed_domains[1]", "full prefix"),
    ('[egress]\nblocked_domains = ["Upper.example"]', 3, "egress.blocked_domains[0]", 'use "upper.example"'),
    ('[egress]\nallowed_domains = ["a.*.example"]', 3, "egress.allowed_domains[0]", "only supported as prefix"),
    ('[egress]\nallowed_domains = "a.example"', 3, "egress.allowed_domains", "must be an array"),
    ('[egress]\nmode = "block"', 3, "egress.mode", "must be one of enforce, report, open"),
    ('\n[egress]\nallowd_domains = []', 4, "egress.allowd_domains", "unknown key"),
    ("egress = 1", 2, "egress", "must be a table"),
])
def test_bad_egress_names_file_line_and_key(toml, line, key, says):
    with pytest.raises(appconfig.ConfigError) as e:
        appconfig.parse('app = "web"\n' + toml, "taxiway.toml")
    assert (e.value.filename, e.value.line, e.value.key) == ("taxiway.toml", line, key)
    assert says in e.value.message and e.value.hint
    assert isinstance(e.value, InvalidInput)


def test_json_config_is_checked_the_same_way():
    with pytest.raises(appconfig.ConfigError, match="egress.allowed_domains.0.|egress.allowed_domains\\[0\\]"):
        appconfig.validate({"app": "web", "egress": {"allowed_domains": [""]}}, "config")


# -- the per-app ACL ---------------------------------------------------------------------------

def test_default_acl_allows_every_name():
    acl = app_acl("web", None)
    d = acl.decide("web", "anything.example")
    assert d.result is Result.ALLOW and d.project == "web"


def test_enforce_report_and_blocked():
    enforce = app_acl("web", {"allowed_domains": ["*.example.com", "api.other.org"],
                              "blocked_domains": ["evil.example.com"], "mode": "enforce"})
    assert enforce.decide("web", "a.example.com").result is Result.ALLOW
    assert enforce.decide("web", "api.other.org").result is Result.ALLOW
    assert enforce.decide("web", "example.com").result is Result.DENY  # *.x is below x only
    d = enforce.decide("web", "evil.example.com")  # blocked wins over an allowed glob
    assert d.result is Result.DENY and "blocked_domains" in d.reason
    report = app_acl("web", {"allowed_domains": ["a.example.com"], "blocked_domains": ["b.example.com"],
                             "mode": "report"})
    assert report.decide("web", "a.example.com").result is Result.ALLOW
    assert report.decide("web", "c.example.com").result is Result.ALLOW_AND_REPORT
    assert report.decide("web", "b.example.com").result is Result.DENY
    # another role never gets this app's rule
    assert enforce.decide("other", "a.example.com").result is Result.DENY


labels = hs.text("abcdefgh", min_size=1, max_size=4)
names = hs.lists(labels, min_size=1, max_size=3).map(".".join).map(lambda n: n + ".test")


@settings(max_examples=200, deadline=None)
@given(allowed=hs.lists(names, max_size=4), blocked=hs.lists(names, max_size=4), host=names,
       mode=hs.sampled_from(["enforce", "report", "open"]))
def test_blocked_always_denies_and_allowed_never_does(allowed, blocked, host, mode):
    acl = app_acl("web", {"allowed_domains": allowed, "blocked_domains": blocked, "mode": mode})
    d = acl.decide("web", host)
    if host in blocked:
        assert d.result is Result.DENY
    elif host in allowed:
        assert d.result is Result.ALLOW
    else:
        assert d.result is {"enforce": Result.DENY, "report": Result.ALLOW_AND_REPORT, "open": Result.ALLOW}[mode]


# -- the directory (mirrored STATUS and RELEASES) --------------------------------------------

def status(app: str, mid: str, ip: str | None, state: str = "started") -> dict:
    return {"id": mid, "app": app, "region": "local", "state": state, **({"private_ip": ip} if ip else {})}


def test_addresses_map_to_machines_and_follow_changes():
    d = Directory()
    d.status("web.m1", status("web", "m1", "fdaa:0:1:1:0:0:0:2"))
    d.status("api.m2", status("api", "m2", "fdaa:0:1:1::3"))
    d.status("api.m3", status("api", "m3", None))  # not on the private network: maps nothing
    assert d.role_of("fdaa:0:1:1::2") == "web"  # compared in the compressed form sockets give
    assert d.machine_of("fdaa:0:1:1::3").id == "m2"
    assert d.role_of("fdaa:0:1:1::4") is None and d.role_of("127.0.0.1") is None
    d.status("web.m1", status("web", "m1", "fdaa:0:1:1::2", state="destroyed"))
    assert d.role_of("fdaa:0:1:1::2") is None
    d.status("api.m2", None)
    assert d.role_of("fdaa:0:1:1::3") is None and d.machines() == []


def test_the_address_moving_to_another_machine_is_not_lost_by_the_old_ones_removal():
    d = Directory()
    d.status("web.m1", status("web", "m1", "fdaa:0:1:1::2"))
    d.status("web.m9", status("web", "m9", "fdaa:0:1:1::2"))
    d.status("web.m1", None)
    assert d.machine_of("fdaa:0:1:1::2").id == "m9"


def release(version: int, status_: str, egress: dict | None) -> tuple[str, dict]:
    return f"web.{version:08d}", {"app": "web", "version": version, "status": status_,
                                  "config": {"app": "web", "egress": egress}}


def test_the_acl_is_the_current_releases():
    d = Directory()
    only_a = {"allowed_domains": ["a.test"], "blocked_domains": [], "mode": "enforce"}
    only_b = {"allowed_domains": ["b.test"], "blocked_domains": [], "mode": "enforce"}
    assert d.acl_for("web").decide("web", "b.test").allowed  # no release: the default
    d.release(*release(1, "complete", only_a))
    assert not d.acl_for("web").decide("web", "b.test").allowed
    d.release(*release(2, "pending", only_b))  # recorded, not deploying yet
    assert not d.acl_for("web").decide("web", "b.test").allowed
    d.release(*release(2, "running", only_b))  # its machines come up now: they get its ACL
    assert d.acl_for("web").decide("web", "b.test").allowed
    d.release(*release(2, "rolled_back", only_b))  # back to v1's
    assert not d.acl_for("web").decide("web", "b.test").allowed
    d.release(*release(3, "complete", None))  # [egress] removed: the default again
    assert d.acl_for("web").decide("web", "b.test").allowed
    assert d.acl_for(None) is None


def test_denial_line():
    line = denial_line({"decision": "deny", "proxy_type": "http", "requested_host": "10.0.0.1:80",
                        "reason": "10.0.0.1 is a private address"})
    assert line == "egress denied: HTTP 10.0.0.1:80: 10.0.0.1 is a private address"
    assert "enforce would deny" in denial_line({"decision": "report", "proxy_type": "connect",
                                                "requested_host": "x:443", "reason": "r"})


def test_denial_lines_are_rate_limited_per_machine():
    """A machine looping on a denied URL gets LOG_BURST lines, then LOG_RATE a second; the lines
    held back are counted in its next one; other machines are not held back by it."""
    from taxiway.platform.egressd import LOG_BURST, LOG_RATE, LogShipper

    now = [0.0]
    d = Directory()
    d.status("web.m1", status("web", "m1", "fdaa:0:1:1::2"))
    d.status("web.m2", status("web", "m2", "fdaa:0:1:1::3"))
    ship = LogShipper(None, d, lambda **kw: None, clock=lambda: now[0])
    deny = {"decision": "deny", "proxy_type": "http", "requested_host": "x.test:80", "reason": "r"}
    for _ in range(LOG_BURST + 50):
        ship.offer({**deny, "client": "fdaa:0:1:1::2:40000"})
    ship.offer({**deny, "decision": "allow", "client": "fdaa:0:1:1::2:40001"})  # allowed: not logged
    ship.offer({**deny, "client": "127.0.0.9:40002"})  # no machine: nobody's log
    assert ship.queue.qsize() == LOG_BURST
    ship.offer({**deny, "client": "[fdaa:0:1:1::3]:40003"})  # another machine: its own budget
    assert ship.queue.qsize() == LOG_BURST + 1
    now[0] += 1 / LOG_RATE
    ship.offer({**deny, "client": "fdaa:0:1:1::2:40004"})
    items = [ship.queue.get_nowait() for _ in range(ship.queue.qsize())]
    subject, last = items[-1]
    assert subject == "logs.web.local.m1" and "50 more egress lines" in last["line"]
    assert items[-2][0] == "logs.web.local.m2" and items[0][1]["line"] == "egress denied: HTTP x.test:80: r"
