"""Pure parts of the machines part: option parsing (fast path vs click), records, user options."""

from __future__ import annotations

import json

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.cli import run as R
from taxiway.cli.machines import run as click_run
from taxiway.errors import InvalidInput
from taxiway.machines import config as C
from taxiway.machines import state as S


def click_parse(argv: list[str]) -> dict:
    ctx = click_run.make_context("run", list(argv))
    p = dict(ctx.params)
    for o in R.OPTIONS:
        if o.kind == "multiple":
            p[o.dest] = list(p[o.dest])
    p["command"] = list(p["command"])
    return p


# -- the fast parser agrees with click on every ordinary command line ---------------------------

_word = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="-="), min_size=1, max_size=8)


def _value_for(o: R.Opt):
    if o.choices:
        return st.sampled_from(o.choices)
    if o.type is float:
        return st.floats(min_value=0.1, max_value=64, allow_nan=False).map(lambda f: repr(round(f, 3)))
    if o.type is int:
        return st.integers(min_value=1, max_value=100000).map(str)
    return _word


@st.composite
def command_lines(draw) -> list[str]:
    argv: list[str] = []
    for o in draw(st.lists(st.sampled_from(R.OPTIONS), max_size=8)):
        flag = draw(st.sampled_from(o.flags))
        if o.kind == "flag":
            argv.append(flag)
            continue
        v = draw(_value_for(o))
        style = draw(st.sampled_from(["sep", "joined"]))
        if style == "sep":
            argv += [flag, v]
        elif flag.startswith("--"):
            argv.append(f"{flag}={v}")
        else:
            argv.append(flag + v)
    if draw(st.booleans()):
        argv.append("--")
    argv.append(draw(_word))  # IMAGE
    argv += draw(st.lists(st.one_of(_word, st.sampled_from(["-c", "--x", "-it", "--rm", "--", "-"])), max_size=4))
    return argv


@settings(max_examples=300, deadline=None)
@given(command_lines())
def test_fast_parser_matches_click(argv):
    fast = R.parse(argv)
    assert fast is not None, argv  # ordinary lines never fall back to click
    assert fast == click_parse(argv)


@pytest.mark.parametrize("argv,expect", [
    (["-it", "img", "sh"], {"interactive": True, "tty": True, "image": "img", "command": ["sh"]}),
    (["-dit", "--name=x", "img"], {"detach": True, "interactive": True, "tty": True, "name": "x"}),
    (["-eA=1", "-e", "B=2", "--env=C=3", "img"], {"env": ["A=1", "B=2", "C=3"]}),
    (["-p8080:80", "-v", "/a:/b:ro", "img", "-e", "X"], {"ports": ["8080:80"], "volumes": ["/a:/b:ro"],
                                                        "command": ["-e", "X"]}),
    (["--cpus", "0.5", "--pids-limit", "10", "--stop-timeout=3", "img"],
     {"cpus": 0.5, "pids_limit": 10, "stop_timeout": 3.0}),
    (["--", "-img"], {"image": "-img"}),
])
def test_fast_parser_examples(argv, expect):
    got = R.parse(argv)
    assert got is not None
    for k, v in expect.items():
        assert got[k] == v, k
    assert got == click_parse(argv)


@pytest.mark.parametrize("argv", [
    [], ["-h", "img"], ["--help"], ["--bogus", "img"], ["-x", "img"], ["--net", "bogus", "img"],
    ["--cpus", "lots", "img"], ["--pids-limit", "1.5", "img"], ["--name"], ["-d"], ["--rm=yes", "img"],
    ["-e"],
])
def test_fast_parser_hands_unusual_lines_to_click(argv):
    assert R.parse(argv) is None


def test_click_command_has_every_option():
    names = {o for p in click_run.params for o in getattr(p, "opts", [])}
    for o in R.OPTIONS:
        assert set(o.flags) <= names
    with pytest.raises(click.UsageError):
        click_run.make_context("run", ["--net", "bogus", "img"])


# -- records ------------------------------------------------------------------------------------


def test_machine_config_round_trips_through_json():
    cfg = C.MachineConfig(image="img", cmd=["sh"], env={"A": "1"}, guest=C.Guest(64 << 20, 0.5, 10),
                          ports=[C.Port(8080, 80)], mounts=[C.Mount("/a", "/b", True)],
                          restart=C.Restart("on-failure", 3), net="none", stop_signal="SIGINT")
    back = C.MachineConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert back == cfg
    assert back.ports[0].host == "127.0.0.1"
    assert C.MachineConfig(image="x").env is not C.MachineConfig(image="x").env  # defaults are per instance
    m = S.Machine(id="a" * 12, name="n", config=cfg, chain=["sha256:1"])
    m2 = S.Machine.from_json(json.loads(json.dumps(m.to_json())))
    assert m2 == m and m2.created == m.created and m2.config.guest.cpus == 0.5
    # records written by an older or newer taxiway: unknown keys are ignored, missing ones defaulted
    d = m.to_json()
    d["future_field"] = 1
    del d["accel"]
    assert S.Machine.from_json(d).accel is None


def test_record_rejects_wrong_fields():
    with pytest.raises(TypeError):
        C.MachineConfig()
    with pytest.raises(TypeError):
        C.MachineConfig(image="x", colour="red")
    with pytest.raises(TypeError):
        C.Port(1, 2, "h", "extra")
    assert "image='x'" in repr(C.MachineConfig(image="x"))


# -- user options -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expect", [
    ("8080:80", (8080, 80)), ("1:65535", (1, 65535)),
])
def test_parse_port(text, expect):
    p = C.parse_port(text)
    assert (p.host_port, p.port) == expect


@pytest.mark.parametrize("text", ["80", "0:80", "8080:0", "a:b", "70000:80", "8080:80:90", ""])
def test_parse_port_rejects(text):
    with pytest.raises(InvalidInput):
        C.parse_port(text)


@pytest.mark.parametrize("text,expect", [
    ("no", ("no", 0)), ("always", ("always", 0)), ("on-failure", ("on-failure", 0)), ("on-failure:3", ("on-failure", 3)),
])
def test_parse_restart(text, expect):
    r = C.parse_restart(text)
    assert (r.policy, r.max_retries) == expect


@pytest.mark.parametrize("text", ["sometimes", "always:3", "on-failure:x", "no:1"])
def test_parse_restart_rejects(text):
    with pytest.raises(InvalidInput):
        C.parse_restart(text)


def test_parse_memory():
    assert C.parse_memory("64m") == 64 << 20
    assert C.parse_memory("1g") == 1 << 30
    for bad in ("1k", "lots", "5m"):
        with pytest.raises(InvalidInput):
            C.parse_memory(bad)


def test_command_semantics():
    ic = {"config": {"Entrypoint": ["/ep"], "Cmd": ["a", "b"]}}
    assert C.command(ic, None, None) == ["/ep", "a", "b"]
    assert C.command(ic, ["c"], None) == ["/ep", "c"]
    assert C.command(ic, None, ["/other"]) == ["/other"]  # --entrypoint drops the image's Cmd, as Docker does
    assert C.command(ic, ["x"], []) == ["x"]
    with pytest.raises(InvalidInput):
        C.command({"config": {}}, None, None)


PASSWD = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/sh\n"
GROUP = "root:x:0:\nwww:x:33:\nextra:x:50:www\n"


def test_resolve_user():
    assert C.resolve_user(None, PASSWD, GROUP)[:2] == (0, 0)
    assert C.resolve_user(None, PASSWD, GROUP)[3] == "/root"
    uid, gid, groups, home = C.resolve_user("www", PASSWD, GROUP)
    assert (uid, gid, home) == (33, 33, "/var/www") and 50 in groups
    assert C.resolve_user("1234", PASSWD, GROUP)[:2] == (1234, 0)  # ids need not exist, as in Docker
    assert C.resolve_user("www:extra", PASSWD, GROUP)[1] == 50
    with pytest.raises(InvalidInput, match="does not exist"):
        C.resolve_user("nobody-here", PASSWD, GROUP)
    with pytest.raises(InvalidInput):
        C.resolve_user("www:nogroup", PASSWD, GROUP)
