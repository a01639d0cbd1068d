"""taxiway.toml / fly.toml parsing: keys, defaults, machine configs, errors naming file, line and key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.machines.config import MachineConfig
from taxiway.platform import appconfig as A

FIXTURES = Path(__file__).parent / "fixtures"


def test_real_fly_toml_is_adopted_listing_ignored_keys():
    cfg, ignored = A.parse((FIXTURES / "fly.toml").read_text(), "fly.toml")
    assert cfg["app"] == "hello-python" and cfg["primary_region"] == "ams"
    assert cfg["kill_timeout"] == 5.0 and cfg["kill_signal"] == "SIGINT"
    assert set(ignored) == {"console_command", "swap_size_mb", "experimental", "vm[0].cpu_kind", "vm[1].size",
                            "statics", "metrics"}
    assert cfg["deploy"] == {"strategy": "rolling", "release_command": "python manage.py migrate --noinput",
                             "max_unavailable": 1, "wait_timeout": 300.0, "release_command_timeout": 300.0}
    hs = cfg["http_service"]
    assert hs["internal_port"] == 8080 and hs["force_https"] and hs["auto_stop_machines"] == "stop"
    assert hs["concurrency"] == {"type": "requests", "soft_limit": 200, "hard_limit": 250}
    assert hs["checks"][0]["grace_period"] == 10.0 and hs["checks"][0]["path"] == "/healthz"
    assert cfg["vm"][0]["memory"] == 1024 and cfg["vm"][1]["memory"] == 512
    assert json.loads(json.dumps(cfg)) == cfg  # JSON-able, as the API receives it


def test_machine_configs_per_process_group():
    cfg, _ = A.parse((FIXTURES / "fly.toml").read_text(), "fly.toml")
    mcs = A.machine_configs(cfg, "127.0.0.1:5000/personal/hello-python:3", release=3, deploy_id="d1")
    assert set(mcs) == {"app", "worker"}
    app, worker = mcs["app"], mcs["worker"]
    # The MachineConfig part round-trips through the machines part's own type.
    assert MachineConfig.from_json(app).image.endswith(":3")
    assert app["entrypoint"] == ["/bin/sh", "-c", "gunicorn --bind :8080 --workers 2 hello.wsgi"]
    assert app["guest"]["memory"] == 1 << 30 and worker["guest"]["memory"] == 512 << 20
    assert app["metadata"] == {"release": 3, "process_group": "app", "deploy": "d1"}
    assert A.http_port(app) == 8080 and A.http_port(worker) is None
    assert [p["port"] for p in app["services"][0]["ports"]] == [80, 443]
    assert app["services"][0]["checks"][0]["port"] == 8080
    assert app["volumes"] == [{"name": "hello_data", "path": "/data"}] and worker["volumes"] == []
    assert worker["checks"] == {"worker_alive": {"type": "tcp", "interval": 15.0, "timeout": 2.0,
                                                 "grace_period": 30.0, "port": 5500}}
    assert A.check_count(app) == 1 and A.check_count(worker) == 1
    assert app["env"]["LOG_LEVEL"] == "info" and app["stop_timeout"] == 5.0


def test_minimal_config_defaults():
    cfg, ignored = A.parse('app = "web"\n[http_service]\ninternal_port = 8080\n')
    assert ignored == []
    assert cfg["deploy"]["strategy"] == "rolling" and cfg["deploy"]["max_unavailable"] == 0.33
    mcs = A.machine_configs(cfg, "img", 1)
    assert list(mcs) == ["app"] and mcs["app"]["entrypoint"] is None
    assert mcs["app"]["env"] == {"PORT": "8080"}
    assert mcs["app"]["guest"]["memory"] == 256 << 20


@pytest.mark.parametrize("text, line, key, words", [
    ('app = "x"\n\n[http_service]\n  internal_port = "8080"\n', 4, "http_service.internal_port", "whole number"),
    ('app = "x"\n[http_service]\ninternal_port = 80\n[[http_service.checks]]\ninterval = "10 parsecs"\n', 5,
     "http_service.checks[0].interval", "duration"),
    ('app = "Bad_Name"\n', 1, "app", "not a valid app name"),
    ('app = "x"\n[deploy]\nstrategy = "yolo"\n', 3, "deploy.strategy", "one of rolling"),
    ('app = "x"\n[[services]]\ninternal_port = 1\n[[services]]\ninternal_port = 2\nprotcol = "tcp"\n', 6,
     "services[1].protcol", "unknown key"),
    ('app = "x"\n[[vm]]\nmemory = "lots"\n', 3, "vm[0].memory", "size"),
    ('app = "x"\n[[mounts]]\nsource = "d"\ndestination = "/proc/x"\n', 4, "mounts[0].destination", "runtime"),
    ('app = "x"\n[http_service]\ninternal_port = 8080\nprocesses = ["web"]\n', 4, "http_service.processes",
     "process group 'web'"),
    ('app = "x"\n[env]\n"BAD-NAME" = "1"\n', 3, "env.BAD-NAME", "environment variable"),
    ('app = "x"\n[checks.db]\ntype = "tcp"\n', 2, "checks.db", "needs a port"),
    ('app = "x"\n[deploy]\nmax_unavailable = 1.5\n', 3, "deploy.max_unavailable", "fraction"),
])
def test_errors_name_file_line_and_key(text, line, key, words):
    with pytest.raises(A.ConfigError) as e:
        A.parse(text, "apps/x/taxiway.toml")
    assert (e.value.filename, e.value.line, e.value.key) == ("apps/x/taxiway.toml", line, key)
    assert f"apps/x/taxiway.toml line {line}: {key}:" in str(e.value) and words in str(e.value)
    assert e.value.hint  # every error says what to do
    assert isinstance(e.value, InvalidInput)


def test_toml_syntax_error_names_the_line():
    with pytest.raises(A.ConfigError) as e:
        A.parse('app = "x"\n[http_service\n', "taxiway.toml")
    assert e.value.line == 2 and "not valid TOML" in str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        A.load(tmp_path / "taxiway.toml")


def test_locate_handles_multiline_values_and_quoted_keys():
    text = ('a = """\nfake = 1\n"""\nb = [\n  "x = 1",\n]\n"quoted.key" = 1\n[t."u.v"]\nw = 2\n'
            "[[arr]]\nx = 1\n[[arr]]\nx = 2\n[[arr.sub]]\ny = 3\n")
    where = A.locate(text)
    assert ("fake",) not in where and where[("b",)] == 4 and where[("quoted.key",)] == 7
    assert where[("t", "u.v", "w")] == 9
    assert where[("arr", 0, "x")] == 11 and where[("arr", 1, "x")] == 13 and where[("arr", 1, "sub", 0, "y")] == 15


# -- properties ---------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
durations = st.one_of(st.integers(1, 600), st.sampled_from(["1s", "10s", "1m30s", "500ms", "2m"]))
checks = st.fixed_dictionaries({"type": st.just("http"), "path": st.sampled_from(["/", "/healthz"]),
                                "interval": durations, "timeout": durations, "grace_period": durations})
configs = st.fixed_dictionaries(
    {"app": st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)},
    optional={
        "primary_region": st.sampled_from(["local", "ams", "ord"]),
        "kill_timeout": durations.filter(lambda d: d != "1m30s" and d != "2m" and (not isinstance(d, int) or d <= 300)),
        "env": st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), st.text(max_size=8), max_size=3),
        "http_service": st.fixed_dictionaries(
            {"internal_port": st.integers(1, 65535)},
            optional={"force_https": st.booleans(), "checks": st.lists(checks, max_size=2),
                      "auto_stop_machines": st.sampled_from(["off", "stop", True, False]),
                      "concurrency": st.fixed_dictionaries({"type": st.sampled_from(["requests", "connections"]),
                                                            "hard_limit": st.integers(100, 200)})}),
        "deploy": st.fixed_dictionaries({}, optional={
            "strategy": st.sampled_from(A.STRATEGIES), "release_command": st.sampled_from(["migrate", "true"]),
            "max_unavailable": st.one_of(st.integers(1, 5), st.sampled_from([0.25, 0.5]))}),
        "vm": st.lists(st.fixed_dictionaries({"memory": st.sampled_from([256, "512mb", "1gb"]),
                                              "cpus": st.integers(1, 4)}), max_size=1),
        "checks": st.dictionaries(names, checks.map(lambda c: {**c, "port": 8080}), max_size=2),
    })


@given(configs)
@settings(max_examples=200, deadline=None)
def test_normalising_is_idempotent_and_round_trips_through_toml(doc):
    text = tomli_w.dumps(doc)
    cfg, ignored = A.parse(text)
    assert ignored == []
    assert A.validate(cfg) == cfg
    assert A.validate(json.loads(json.dumps(cfg))) == cfg
    assert A.parse(A.to_toml(cfg))[0] == cfg
    for g, mc in A.machine_configs(cfg, "img", 1).items():
        assert mc["metadata"]["process_group"] == g
        assert MachineConfig.from_json(mc).image == "img"


@given(configs, st.integers(min_value=0, max_value=10**6))
@settings(max_examples=200, deadline=None)
# An escaped quote before "[": the key scanner once took the [ for an open array and lost every later line.
@example(doc={'env': {'A': '"['}, 'app': 'a'}, pick=0).via("discovered failure")
def test_a_bad_value_anywhere_is_reported_at_its_own_line(doc, pick):
    """Replace one leaf with a value of the wrong kind: the error names exactly that key and its line."""
    leaves = []

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, (*path, k))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, x in enumerate(v):
                walk(x, (*path, i))
        elif path and v != [] and path[0] not in ("env",) and path[-1] not in ("force_https", "auto_stop_machines"):
            leaves.append(path)

    walk(doc, ())
    path = leaves[pick % len(leaves)]  # an index, not st.data(), so @example can name the leaf
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = {"nested": {"table": 1}} if not isinstance(target[path[-1]], dict) else 3
    text = tomli_w.dumps(doc)
    with pytest.raises(A.ConfigError) as e:
        A.parse(text, "t.toml")
    where = A.locate(text)
    # The key's own line; inside an inline table (tomli_w writes [[vm]] as vm = [{...}]) the array's line.
    line = next(where[path[:i]] for i in range(len(path), 0, -1) if path[:i] in where)
    assert e.value.line == line
    if all(not isinstance(p, int) for p in path):
        assert line == where[path]
    assert e.value.key == A._dotted(path)


def test_brackets_and_equals_inside_strings_are_not_headers_or_keys():
    text = '''a = """x
[not]
y = 1 """
b = [\'\'\' "[ \'\'\', "\\"[",
  'c\\' ]
[[vm]]
z = 1
["q]".r]
s = '\\'
t = """ab\\"""c"""
u = 2
'''
    assert tomllib.loads(text)["q]"]["r"]["u"] == 2
    where = A.locate(text)
    assert ("y",) not in where and ("not",) not in where
    assert where[("b",)] == 4 and where[("vm", 0, "z")] == 7
    assert where[("q]", "r", "s")] == 9 and where[("q]", "r", "t")] == 10 and where[("q]", "r", "u")] == 11
