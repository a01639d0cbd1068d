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
