"""CSV/JSON/SQLite to one SQLite database: types, coordinates, FTS and bad input."""

import gzip
import json
import sqlite3
from pathlib import Path

import pytest
import vega_datasets

from taxiway.errors import InvalidInput
from taxiway.publish.convert import (
    build_database,
    check_sqlite,
    cluster_map_metadata,
    describe_sqlite,
)

AIRPORTS = Path(vega_datasets.__file__).parent / "_data" / "airports.csv"


def rows(db, sql):
    return sqlite3.connect(db).execute(sql).fetchall()


def test_airports_types_coordinates_and_fts(tmp_path):
    db = tmp_path / "airports.db"
    [info] = build_database([AIRPORTS], db, fts=["name", "city"])
    assert info.rows == 3376
    assert info.columns["latitude"] == "REAL" and info.columns["iata"] == "TEXT"
    assert (info.latitude, info.longitude) == ("latitude", "longitude")
    assert rows(db, "select count(*) from airports") == [(3376,)]
    hit = rows(db, "select iata from airports where rowid in (select rowid from airports_fts where airports_fts match 'Thigpen')")
    assert hit == [("00M",)]


def test_types_nulls_and_text_kept(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("a,b,c,d\n1,1.5,x,007\n2,,y,010\n-3,2e3,,12\n")
    [info] = build_database([src], tmp_path / "t.db")
    assert info.columns == {"a": "INTEGER", "b": "REAL", "c": "TEXT", "d": "TEXT"}
    assert rows(tmp_path / "t.db", "select a, b, c, d from t order by a") == [
        (-3, 2000.0, "", "12"), (1, 1.5, "x", "007"), (2, None, "y", "010")]


def test_common_coordinate_names_need_fitting_values(tmp_path):
    ok = tmp_path / "ok.csv"
    ok.write_text("name,Lat,lng\na,48.8,2.3\nb,-33.9,151.2\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,y,x\na,480,2\nb,1,2\n")
    [i1] = build_database([ok], tmp_path / "ok.db")
    [i2] = build_database([bad], tmp_path / "bad.db")
    assert (i1.latitude, i1.longitude) == ("Lat", "lng")
    assert (i2.latitude, i2.longitude) == (None, None)
    meta = cluster_map_metadata("ok", [i1])
    assert meta["databases"]["ok"]["tables"]["ok"]["plugins"]["datasette-cluster-map"] == {
        "latitude_column": "Lat", "longitude_column": "lng"}


def test_tsv_gzip_json_ndjson(tmp_path):
    (tmp_path / "a.tsv").write_text("k\tv\n1\tone\n2\ttwo\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("k,v\n1,x\n")
    (tmp_path / "c.json").write_text(json.dumps([{"k": 1, "tags": ["a", "b"]}, {"k": 2, "tags": []}]))
    (tmp_path / "d.ndjson").write_text('{"k": 1}\n\n{"k": 2, "extra": "e"}\n')
    infos = build_database([tmp_path / n for n in ("a.tsv", "b.csv.gz", "c.json", "d.ndjson")], tmp_path / "all.db")
    assert [(i.table, i.rows) for i in infos] == [("a", 2), ("b", 1), ("c", 2), ("d", 2)]
    assert rows(tmp_path / "all.db", "select extra from d where k = 2") == [("e",)]


def test_sqlite_described_without_change(tmp_path):
    import bokeh_sampledata

    movies = Path(bokeh_sampledata.__file__).parent / "_data" / "movies.db"
    before = movies.read_bytes()
    infos = describe_sqlite(movies)
    assert {i.table for i in infos} >= {"omdb", "tomatoes"}
    assert movies.read_bytes() == before


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("ragged.csv", b"a,b\n1,2\n3\n", "row 3 has 1 fields, the header has 2"),
        ("header.csv", b"a,b\n", "header but no data rows"),
        ("dup.csv", b"a,b,A\n1,2,3\n", "duplicated column name"),
        ("empty.csv", b"", "the file is empty"),
        ("latin.csv", b"a,b\n1,caf\xe9\n", "not valid utf-8 text near line 2"),
        ("bad.json", b"{nope", "not valid JSON"),
        ("scalar.ndjson", b"1\n", "line 1 is not a JSON object"),
        ("weird.xlsx", b"PK", "unknown file type"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_nothing(tmp_path, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    dest = tmp_path / "out" / "data.db"
    with pytest.raises(InvalidInput) as e:
        build_database([src], dest)
    assert message in str(e.value) and name in str(e.value)
    assert not dest.exists()
    assert not any(p.name.endswith(".tmp") for p in dest.parent.iterdir()) if dest.parent.exists() else True


def test_failed_rebuild_keeps_previous_database(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text("a\n1\n")
    dest = tmp_path / "d.db"
    build_database([good], dest)
    good.write_text("a,b\n1\n")
    with pytest.raises(InvalidInput):
        build_database([good], dest)
    assert rows(dest, "select a from d") == [(1,)]


def test_latin1_with_encoding_option(tmp_path):
    src = tmp_path / "l.csv"
    src.write_bytes(b"a,b\n1,caf\xe9\n")
    build_database([src], tmp_path / "l.db", encoding="latin-1")
    assert rows(tmp_path / "l.db", "select b from l") == [("café",)]


def test_not_sqlite(tmp_path):
    fake = tmp_path / "fake.db"
    fake.write_text("hello")
    with pytest.raises(InvalidInput, match="not a SQLite database"):
        check_sqlite(fake)


def test_fts_unknown_column(tmp_path):
    with pytest.raises(InvalidInput, match="no such column"):
        build_database([AIRPORTS], tmp_path / "x.db", fts=["nope"])


# -- issue 22 item 5: a WAL database publishes what its -wal holds -------------------------------

_WAL_WRITER = r"""
import os, signal, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("pragma journal_mode=wal")
c.execute("create table a(x)")
c.executemany("insert into a values (?)", [(i,) for i in range(3)])
c.execute("pragma wal_checkpoint(truncate)")
c.execute("pragma wal_autocheckpoint=0")
c.execute("create table b(y)")
c.execute("begin")
c.executemany("insert into a values (?)", [(i,) for i in range(1000)])
c.execute("commit")
os.kill(os.getpid(), signal.SIGKILL)  # the last transactions stay in wal.db-wal, as after a crash
"""


def make_wal_db(path: Path) -> dict[str, bytes]:
    """A real WAL database (1,003 rows, 2 tables) whose last transactions are only in its -wal; returns its files."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _WAL_WRITER, str(path)], check=False)
    files = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name)}
    assert files[path.name + "-wal"], "the writer left its transactions in the WAL"
    stale = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    assert stale.execute("select count(*) from a").fetchone() == (3,)  # what the .db alone holds
    return files


def test_wal_database_is_copied_with_its_wal_and_never_changed(tmp_path):
    from taxiway.publish.app import PublishSpec, prepare

    src = tmp_path / "src" / "wal.db"
    src.parent.mkdir()
    before = make_wal_db(src)
    app, infos, _ = prepare(PublishSpec(files=[src]), tmp_path / "work")
    assert {i.table: i.rows for i in infos} == {"a": 1003, "b": 0}
    copy = app / "data" / "wal.db"
    assert not (app / "data" / "wal.db-wal").exists()
    con = sqlite3.connect(f"file:{copy}?mode=ro&immutable=1", uri=True)  # as Datasette serves it
    assert con.execute("select count(*) from a").fetchone() == (1003,)
    assert con.execute("pragma journal_mode").fetchone() == ("delete",)
    for name, data in before.items():
        if not name.endswith("-shm"):  # the read-only reader may rebuild the index file; the data files stay
            assert (src.parent / name).read_bytes() == data, name


def test_database_written_during_the_copy_is_copied_consistently(tmp_path):
    import subprocess
    import sys

    from taxiway.publish.convert import copy_sqlite

    src = tmp_path / "live.db"
    c = sqlite3.connect(src, isolation_level=None)
    c.execute("pragma journal_mode=wal")
    c.execute("create table t(batch, n)")
    c.close()
    # A live writer commits batches of 100 rows (each batch one transaction) while we copy.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "for b in range(100000):\n"
        "    c.execute('begin'); c.executemany('insert into t values (?, ?)', [(b, i) for i in range(100)]); c.execute('commit')\n"
        "    print(b, flush=True) if b == 5 else None\n"), str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "5"
        for i in range(3):
            copy_sqlite(src, tmp_path / f"copy{i}.db")
            con = sqlite3.connect(tmp_path / f"copy{i}.db")
            assert con.execute("select count(*) % 100, count(*) > 0 from t").fetchone() == (0, 1)
    finally:
        writer.kill()
        writer.wait()


# -- issue 22 item 7: wide tables, damaged databases, delimiters ---------------------------------


def test_too_wide_csv_is_refused_before_it_publishes_a_broken_page(tmp_path):
    for n in (2000, 2001):
        src = tmp_path / f"wide{n}.csv"
        src.write_text(",".join(f"c{i}" for i in range(n)) + "\n" + ",".join("1" * n) + "\n")
        with pytest.raises(InvalidInput, match=f"has {n:,} columns, more than the 1,999 Datasette can show"):
            build_database([src], tmp_path / "out" / "w.db")
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps([{f"c{i}": i for i in range(2001)}]))
    with pytest.raises(InvalidInput, match="wide.json: records with more keys than sqlite-utils inserts"):
        build_database([wide], tmp_path / "out" / "w.db")
    ok = tmp_path / "ok.csv"
    ok.write_text(",".join(f"c{i}" for i in range(1999)) + "\n" + ",".join("1" * 1999) + "\n")
    [info] = build_database([ok], tmp_path / "out" / "ok.db")
    assert len(info.columns) == 1999


def damage(path: Path) -> None:
    """A real database with pages overwritten in the middle (as a bad disk or a torn copy leaves it)."""
    con = sqlite3.connect(path)
    con.execute("create table t(id integer primary key, body text)")
    con.executemany("insert into t(body) values (?)", [("x" * 200,) for _ in range(2000)])
    con.commit()
    con.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 20)
        f.write(b"\xff\x13" * 4096)


def test_damaged_database_is_one_clear_error(tmp_path):
    from taxiway.publish.app import PublishSpec, prepare

    db = tmp_path / "damaged.db"
    damage(db)
    with pytest.raises(InvalidInput, match=r"damaged\.db: damaged SQLite database") as e:
        prepare(PublishSpec(files=[db]), tmp_path / "work")
    assert "integrity_check" in str(e.value)
    assert not list((tmp_path / "work" / "app" / "data").iterdir())


def test_semicolon_csv_is_detected_and_said(tmp_path):
    src = tmp_path / "people.csv"
    src.write_text("id;name;city\n1;Bob, Jr;Paris\n2;Ann;Lyon, FR\n")
    [info] = build_database([src], tmp_path / "p.db")
    assert info.delimiter == ";" and list(info.columns) == ["id", "name", "city"]
    assert rows(tmp_path / "p.db", "select name, city from people order by id") == [("Bob, Jr", "Paris"), ("Ann", "Lyon, FR")]
    commas = tmp_path / "c.csv"
    commas.write_text("a,b\n1;2,3\n")
    [info] = build_database([commas], tmp_path / "c.db")
    assert info.delimiter == "," and rows(tmp_path / "c.db", "select a, b from c") == [("1;2", 3)]
    piped = tmp_path / "piped.csv"
    piped.write_text("a|b\n1|x\n")
    [info] = build_database([piped], tmp_path / "piped.db", delimiter="|")
    assert info.delimiter == "|" and info.columns == {"a": "INTEGER", "b": "TEXT"}


def test_ragged_error_names_the_delimiter_used(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text("a;b\n1;2\n3\n")
    with pytest.raises(InvalidInput, match=r"row 3 has 1 fields, the header has 2 \(delimiter ';', detected; pass --delimiter"):
        build_database([src], tmp_path / "r.db")
