"""taxiway publish end to end: real builds, real machines, real Datasette, real chromium.

One $TAXIWAY_HOME for the module, so the first publish pays for installing
Datasette into the image's layer and the later ones reuse it, as a user's would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bokeh_sampledata
import pytest
import vega_datasets

AIRPORTS = Path(vega_datasets.__file__).parent / "_data" / "airports.csv"
MOVIES = Path(bokeh_sampledata.__file__).parent / "_data" / "movies.db"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TAXIWAY_ARTIFACTS", REPO / "artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="machines need root (namespaces, cgroups, mounts)")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("publish-home")
    e = {**os.environ, "TAXIWAY_HOME": str(home), "TAXIWAY_CONFIG": str(home / "config")}
    yield e
    for name in ("airports", "movies", "hooked", "bad"):
        subprocess.run([sys.executable, "-m", "taxiway", "publish", "rm", name], env=e, capture_output=True)


def taxiway(env, *args, check=True, timeout=900):
    r = subprocess.run([sys.executable, "-m", "taxiway", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"taxiway {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def getjson(url: str):
    return json.loads(get(url))


@pytest.fixture(scope="module")
def airports(env, tmp_path_factory):
    src = tmp_path_factory.mktemp("data") / "airports.csv"
    shutil.copy(AIRPORTS, src)
    r = taxiway(env, "publish", str(src), "--install", "datasette-cluster-map", "--fts", "name", "--fts", "city",
                "--title", "US airports", "--source", "vega_datasets", "--license", "BSD-3-Clause", "--json")
    result = json.loads(r.stdout)
    return {"src": src, **result}


def test_airports_json_api_rows_facets_csv_and_search(airports):
    url = airports["url"]
    assert airports["name"] == "airports"
    data = getjson(f"{url}/airports/airports.json?_size=1")
    assert data["filtered_table_rows_count"] == 3376
    facets = getjson(f"{url}/airports/airports.json?_facet=state&_size=0")
    ca = {f["value"]: f["count"] for f in facets["facet_results"]["state"]["results"]}
    assert ca["CA"] > 200
    rows = list(csv.reader(io.StringIO(get(f"{url}/airports/airports.csv?_size=max&_stream=on").decode())))
    assert len(rows) == 3376 + 1
    hit = getjson(f"{url}/airports/airports.json?_search=Thigpen&_shape=array")
    assert [r["iata"] for r in hit] == ["00M"]
    meta = getjson(f"{url}/-/metadata.json")
    assert meta["title"] == "US airports" and meta["license"] == "BSD-3-Clause"
    plugins = {p["name"] for p in getjson(f"{url}/-/plugins.json")}
    assert "datasette-cluster-map" in plugins


def test_airports_map_loads_in_chromium(airports):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{airports['url']}/airports/airports", wait_until="domcontentloaded")
            page.wait_for_selector(".leaflet-container", timeout=30_000)
            page.wait_for_selector(".leaflet-marker-icon, .marker-cluster", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "publish-airports-map.png"), full_page=False)
        finally:
            browser.close()


def test_movies_db_published_as_is(env):
    before = MOVIES.read_bytes()
    r = taxiway(env, "publish", str(MOVIES), "--name", "movies", "--json")
    url = json.loads(r.stdout)["url"]
    assert getjson(f"{url}/movies/omdb.json?_size=1")["filtered_table_rows_count"] == 17472
    assert getjson(f"{url}/movies/tomatoes.json?_size=1")["filtered_table_rows_count"] == 17472
    assert MOVIES.read_bytes() == before


def test_ls_lists_apps(env, airports):
    r = taxiway(env, "publish", "ls", "--json")
    apps = {a["name"]: a for a in json.loads(r.stdout)}
    assert apps["airports"]["state"] == "running" and apps["airports"]["url"] == airports["url"]


def test_republish_replaces_while_old_keeps_serving(env, airports):
    url = airports["url"]
    src = airports["src"]
    with open(src, "a") as f:
        f.write("ZZZ,Taxiway Field,Nowhere,XX,USA,40.0,-100.0\n")
    failures: list[str] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                get(f"{url}/-/versions.json", timeout=10)
            except (urllib.error.URLError, OSError) as e:
                failures.append(repr(e))
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    try:
        r = taxiway(env, "publish", str(src), "--install", "datasette-cluster-map", "--fts", "name", "--fts", "city",
                    "--json")
    finally:
        done.set()
        t.join()
    assert json.loads(r.stdout)["url"] == url
    assert failures == []
    assert getjson(f"{url}/airports/airports.json?_size=1")["filtered_table_rows_count"] == 3377


def test_bad_inputs_publish_nothing_and_keep_serving(env, airports, tmp_path):
    url = airports["url"]
    ragged = tmp_path / "airports.csv"
    ragged.write_text("iata,name\n00M,Thigpen\nX\n")
    r = taxiway(env, "publish", str(ragged), check=False)
    assert r.returncode != 0
    assert "airports.csv: row 3 has 1 fields" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = taxiway(env, "publish", str(airports["src"]), "--install", "datasette-no-such-plugin-taxiway", check=False)
    assert r.returncode != 0
    assert "datasette-no-such-plugin-taxiway" in r.stderr.strip().splitlines()[-1]
    notdb = tmp_path / "bad.db"
    notdb.write_text("not sqlite")
    r = taxiway(env, "publish", str(notdb), check=False)
    assert r.returncode != 0 and "not a SQLite database" in r.stderr
    assert getjson(f"{url}/airports/airports.json?_size=1")["filtered_table_rows_count"] >= 3376
    names = {a["name"] for a in json.loads(taxiway(env, "publish", "ls", "--json").stdout)}
    assert "bad" not in names


def test_datasette_publish_taxiway_hook(env, tmp_path):
    datasette = Path(sys.executable).parent / "datasette"
    help_ = subprocess.run([str(datasette), "publish", "--help"], capture_output=True, text=True, env=env)
    assert "taxiway" in help_.stdout
    db = tmp_path / "hooked.db"
    shutil.copy(MOVIES, db)
    r = subprocess.run([str(datasette), "publish", "taxiway", str(db), "--name", "hooked", "--title", "Hooked",
                        "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    url = json.loads(r.stdout)["url"]
    assert getjson(f"{url}/hooked/omdb.json?_size=1")["filtered_table_rows_count"] == 17472
    assert getjson(f"{url}/-/metadata.json")["title"] == "Hooked"


def test_rm_stops_the_app(env, tmp_path):
    r = taxiway(env, "publish", str(MOVIES), "--name", "movies", "--json")
    url = json.loads(r.stdout)["url"]
    taxiway(env, "publish", "rm", "movies")
    with pytest.raises((urllib.error.URLError, OSError)):
        get(f"{url}/-/versions.json", timeout=3)
    r = taxiway(env, "publish", "rm", "movies", check=False)
    assert r.returncode != 0 and "no published app named 'movies'" in r.stderr
