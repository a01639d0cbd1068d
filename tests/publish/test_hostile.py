"""taxiway publish against an outside tester's attacks: symlinks out of --static, memory-eating SQL,
huge CSV fields, --secret, names Datasette can't serve, bad options. Real publishes, real Datasette.

Refusals run before any build, so they are cheap; one app is built and published twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .test_publish import MOVIES, getjson, ls, taxiway

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="machines need root (namespaces, cgroups, mounts)")
DATASETTE = Path(sys.executable).parent / "datasette"
SECRET = "s3cret-for-the-test"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile-home")
    e = {**os.environ, "TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(home / "config")}
    yield e
    for name in ("dsp", "bad"):
        subprocess.run([sys.executable, "-m", "taxiway", "publish", "rm", name], env=e, capture_output=True)


def refused(env, args, message, tool="taxiway"):
    if tool == "taxiway":
        r = taxiway(env, "publish", *args, check=False)
    else:
        r = subprocess.run([str(DATASETTE), "publish", "taxiway", *args], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    return r


def test_static_link_out_of_the_folder_is_refused(env, tmp_path):
    # a "host secret" of the test's own, outside the folder: nothing of the host is ever read
    secret = tmp_path / "host" / "shadow"
    secret.parent.mkdir()
    secret.write_text("root:HOST-SECRET:19000::::::\n")
    st = tmp_path / "st"
    st.mkdir()
    (st / "shadow.txt").symlink_to(secret)
    db = tmp_path / "dsp.db"
    db.write_bytes(MOVIES.read_bytes())
    refused(env, [str(db), "-n", "bad", "--static", f"st:{st}"],
            f"{st}/shadow.txt is a symbolic link to {secret}, outside the folder", tool="datasette")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "p.py").symlink_to(secret)
    refused(env, [str(db), "-n", "bad", "--plugins-dir", str(plugins)], f"is a symbolic link to {secret}",
            tool="datasette")
    assert "bad" not in ls(env)


def test_bad_inputs_are_one_line_before_any_build(env, tmp_path):
    huge = tmp_path / "huge.csv"
    huge.write_text("a,b\n1," + "x" * (17 << 20) + "\n")
    refused(env, [str(huge)], "huge.csv: a field on line 2 is larger than 16 MiB")
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('a,b\n1,"' + "yyyy\n" * (4 << 20))
    refused(env, [str(unclosed)], "is larger than 16 MiB; check for an unclosed quote")
    brackets = tmp_path / "brackets.db"
    con = sqlite3.connect(brackets)
    con.execute('create table "a""b[c].d/e" (x)')
    con.commit()
    con.close()
    refused(env, [str(brackets)], """table 'a"b[c].d/e' has a ']' in its name""")
    csvfile = tmp_path / "ok.csv"
    csvfile.write_text("a\n1\n")
    for port in ("70000", "-1", "0"):
        refused(env, [str(csvfile), "--port", port], f"--port {port} is not a TCP port")
    refused(env, [str(csvfile), "--table", "sqlite_master"], "'sqlite_master' is a name SQLite reserves")
    refused(env, [str(csvfile), "--name", ""], "invalid app name ''")
    zero = tmp_path / "zero.db"
    zero.symlink_to("/dev/zero")
    refused(env, [str(zero)], "zero.db: not a regular file")
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    refused(env, [str(fifo)], "fifo.db: not a regular file")
    refused(env, [str(csvfile), "--memory", "1t"], "more than this host has")
    assert ls(env) == {} or set(ls(env)) <= {"dsp"}


def test_publish_help_lists_the_options(env):
    out = taxiway(env, "publish", "--help").stdout
    for option in ("--name", "--install", "--port", "--memory", "--max-field-size", "--secret"):
        assert option in out


def _sql(url: str, sql: str) -> tuple[int, dict]:
    q = urllib.parse.urlencode({"sql": sql, "_shape": "array"})
    try:
        with urllib.request.urlopen(f"{url}/dsp.json?{q}", timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _actor(url: str, secret: str) -> dict | None:
    from datasette.app import Datasette

    cookie = Datasette(secret=secret).sign({"a": {"id": "root"}}, "actor")
    req = urllib.request.Request(f"{url}/-/actor.json", headers={"Cookie": f"ds_actor={cookie}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["actor"]


@pytest.fixture(scope="module")
def dsp(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dsp")
    st = tmp / "st"
    (st / "sub").mkdir(parents=True)
    (st / "sub" / "real.txt").write_text("inside\n")
    (st / "alias.txt").symlink_to("sub/real.txt")  # a link inside the folder is kept
    db = tmp / "dsp.db"
    db.write_bytes(MOVIES.read_bytes())
    r = subprocess.run([str(DATASETTE), "publish", "taxiway", str(db), "-n", "dsp", "--static", f"st:{st}",
                        "--secret", SECRET, "--json"], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"db": db, **json.loads(r.stdout)}


def test_static_links_inside_the_folder_are_served(dsp):
    with urllib.request.urlopen(f"{dsp['url']}/st/alias.txt", timeout=30) as r:
        assert r.read() == b"inside\n"


def test_huge_values_fail_fast_and_the_app_has_limits(env, dsp):
    url = dsp["url"]
    status, body = _sql(url, "select length(group_concat(x)) from (select printf('%.*c',300000000,'x') as x "
                             "union all select printf('%.*c',300000000,'y'))")
    # SQLite's printf gives NULL past the length limit (without it: 600000001, after tens of seconds).
    assert (status, body) == (200, [{"length(group_concat(x))": None}]) or "too big" in json.dumps(body), body
    status, body = _sql(url, "select length(zeroblob(300000000)) as n")
    assert status == 400 and "string or blob too big" in json.dumps(body), body
    status, rows = _sql(url, "select count(*) as n from omdb")
    assert status == 200 and rows == [{"n": 17472}]
    assert getjson(f"{url}/-/settings.json")["sql_time_limit_ms"] == 1000  # Datasette's default
    m = json.loads(taxiway(env, "machines", "inspect", dsp["machine"]).stdout)
    [m] = m
    guest = (m.get("config") or m)["guest"]
    assert guest["memory"] == 1 << 30 and guest["pids"] == 512 and guest["cpus"] == 1.0


def test_secret_signs_cookies_and_is_kept_across_releases(env, dsp):
    url = dsp["url"]
    assert _actor(url, SECRET) == {"id": "root"}
    assert _actor(url, "another") is None
    kept = Path(env["TAXIWAY_HOME"]) / "publish" / "dsp" / "secret"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    # A release without --secret keeps the app's secret: a signed-in cookie stays valid.
    r = taxiway(env, "publish", str(dsp["db"]), "-n", "dsp", "--title", "again", "--json")
    assert json.loads(r.stdout)["release"] != dsp["release"]
    assert _actor(url, SECRET) == {"id": "root"}


def test_rm_removes_the_unpacked_data(env, dsp):
    layers = Path(env["TAXIWAY_HOME"]) / "snapshots" / "layers"
    assert list(layers.glob("*/fs/workspace/data/dsp.db"))
    taxiway(env, "publish", "rm", "dsp")
    assert list(layers.glob("*/fs/workspace/data/dsp.db")) == []
