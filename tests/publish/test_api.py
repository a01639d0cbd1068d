"""The publish API both CLIs share: metadata validation, limits, and a plugin that stays out of taxiway.cli."""

from __future__ import annotations

import subprocess
import sys

import pytest

from taxiway.errors import InvalidInput
from taxiway.publish.app import load_metadata, parse_limits


def test_the_datasette_plugin_does_not_import_the_cli():
    code = ("import sys, taxiway.publish.datasette_plugin\n"
            "print(sorted(m for m in sys.modules if m.startswith('taxiway.cli')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_metadata_is_json_or_yaml_and_an_object():
    assert load_metadata('{"title": "T"}', "m.json") == {"title": "T"}
    assert load_metadata("title: T\n", "m.yaml") == {"title": "T"}
    assert load_metadata("", "empty.yaml") == {}
    with pytest.raises(InvalidInput, match="m.yaml: metadata must be an object"):
        load_metadata("- a\n- b\n", "m.yaml")
    with pytest.raises(InvalidInput, match="bad.yaml: neither JSON nor YAML"):
        load_metadata("a: [b\n", "bad.yaml")


def test_limits_are_checked_in_one_place():
    assert parse_limits("512m", 1.0, 64) == {"memory": 512 << 20, "cpus": 1.0, "pids": 64}
    with pytest.raises(InvalidInput, match="--pids 3"):
        parse_limits("512m", 1.0, 3)
    with pytest.raises(InvalidInput, match="--cpus 0"):
        parse_limits("512m", 0.0, 64)


def test_the_plugin_refuses_bad_metadata_in_one_line(tmp_path):
    db = tmp_path / "x.db"
    import sqlite3

    sqlite3.connect(db).execute("create table t (a)").connection.close()
    meta = tmp_path / "m.yaml"
    meta.write_text("- not\n- an object\n")
    datasette = [sys.executable, "-c", "from datasette.cli import cli; cli()"]
    r = subprocess.run([*datasette, "publish", "taxiway", str(db), "-m", str(meta)], capture_output=True, text=True,
                       env={"TAXIWAY_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"Error: {meta}: metadata must be an object; see Datasette's metadata documentation"
