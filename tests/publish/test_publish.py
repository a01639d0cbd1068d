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
    for name in ("airports", "movies", "hooked", "bad", "wal", "item7", "crash", "bigtmp", "rel"):
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



# -- issue 22 ------------------------------------------------------------------------------------


def machines(env, prefix: str) -> dict[str, str]:
    """Machines whose name starts with ``prefix``: name -> state (as `taxiway machines ls -a --json` says)."""
    ms = json.loads(taxiway(env, "machines", "ls", "-a", "--json").stdout)
    return {m["name"]: m["state"] for m in ms if m["name"].startswith(prefix)}


def app_images(env, name: str) -> set[str]:
    out = json.loads(taxiway(env, "images", "--json").stdout)
    refs = {i.get("name") or i.get("ref") or i.get("reference") for i in out}
    return {r for r in refs if r and r.startswith(f"localhost/taxiway-publish/{name}:")}


def ls(env) -> dict[str, dict]:
    return {a["name"]: a for a in json.loads(taxiway(env, "publish", "ls", "--json").stdout)}


def test_wal_database_publishes_what_its_wal_holds(env, tmp_path):
    from .test_convert import make_wal_db

    src = tmp_path / "wal.db"
    before = make_wal_db(src)
    r = taxiway(env, "publish", str(src), "--json")
    url = json.loads(r.stdout)["url"]
    assert getjson(f"{url}/wal/a.json?_size=1")["filtered_table_rows_count"] == 1003
    assert {t["name"] for t in getjson(f"{url}/wal.json")["tables"]} == {"a", "b"}
    assert src.read_bytes() == before["wal.db"] and (tmp_path / "wal.db-wal").read_bytes() == before["wal.db-wal"]


def test_bad_files_are_one_line_errors_not_tracebacks(env, tmp_path):
    from .test_convert import damage

    damaged = tmp_path / "damaged.db"
    damage(damaged)
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(2001)) + "\n" + ",".join("1" * 2001) + "\n")
    wide2000 = tmp_path / "wide2000.csv"
    wide2000.write_text(",".join(f"c{i}" for i in range(2000)) + "\n" + ",".join("1" * 2000) + "\n")
    for f, message in ((damaged, "damaged.db: damaged SQLite database"),
                       (wide, "has 2,001 columns, more than the 1,999 Datasette can show"),
                       (wide2000, "has 2,000 columns, more than the 1,999 Datasette can show")):
        r = taxiway(env, "publish", str(f), check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
        assert f.stem not in ls(env)


def test_widest_table_and_semicolon_csv_are_served(env, tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(1999)) + "\n" + ",".join(str(i) for i in range(1999)) + "\n")
    people = tmp_path / "people.csv"
    people.write_text("id;name;city\n1;Bob, Jr;Paris\n2;Ann;Lyon\n")
    r = taxiway(env, "publish", str(wide), str(people), "--name", "item7")
    assert "people: 2 rows, semicolon-separated" in r.stderr and "wide: 1 rows, comma-separated" in r.stderr
    url = r.stdout.strip().splitlines()[-1]
    # The table query selects rowid + every column: 400 when that exceeds 2,000 (the HTML page of 1,999
    # columns takes over 30 s to render on a loaded 2-core machine, so the JSON of the same query is asserted).
    assert getjson(f"{url}/item7/wide.json?_shape=array")[0]["c1998"] == 1998
    rows = getjson(f"{url}/item7/people.json?_shape=array")
    assert [(p["name"], p["city"]) for p in rows] == [("Bob, Jr", "Paris"), ("Ann", "Lyon")]
    piped = tmp_path / "people.csv"
    piped.write_text("id|name\n1|Bob\n")
    r = taxiway(env, "publish", str(piped), "--name", "item7", "--delimiter", "pipe", "--json")
    assert json.loads(r.stdout)["tables"][0]["delimiter"] == "|"


def test_kill_9_while_the_new_machine_starts_leaves_nothing_unaccounted(env, tmp_path):
    # A plugin that never lets Datasette answer holds the publish in "starting the machine".
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hang.py").write_text("import time\ntime.sleep(3600)\n")
    db = tmp_path / "crash.db"
    shutil.copy(MOVIES, db)
    datasette = Path(sys.executable).parent / "datasette"
    p = subprocess.Popen([str(datasette), "publish", "taxiway", str(db), "--name", "crash", "--plugins-dir",
                          str(plugins)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not any(s == "running" for s in machines(env, "publish-crash-").values()):
            assert p.poll() is None and time.monotonic() < deadline, "the publish ended before its machine ran"
            time.sleep(0.2)
    finally:
        p.kill()  # SIGKILL
        p.wait()
    [leftover] = machines(env, "publish-crash-")
    app = ls(env)["crash"]
    assert app["state"] == "interrupted" and app["leftovers"]["machines"] == [leftover]
    # The next publish of the name removes what the killed one left.
    r = taxiway(env, "publish", str(db), "--name", "crash", "--json")
    now = json.loads(r.stdout)
    assert set(machines(env, "publish-crash-")) == {now["machine"]}
    assert ls(env)["crash"]["state"] == "running" and ls(env)["crash"]["leftovers"]["machines"] == []
    # Killed again, then removed: rm finds the leftover machine too.
    p = subprocess.Popen([str(datasette), "publish", "taxiway", str(db), "--name", "crash", "--plugins-dir",
                          str(plugins)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(machines(env, "publish-crash-")) < 2:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        p.kill()
        p.wait()
    taxiway(env, "publish", "rm", "crash")
    assert machines(env, "publish-crash-") == {} and app_images(env, "crash") == set()
    assert "crash" not in ls(env)


def test_kill_9_mid_conversion_leaves_a_temp_db_that_ls_shows_and_rm_removes(env, tmp_path):
    big = tmp_path / "big.csv"
    with open(big, "w") as f:
        f.write("id,name,value\n")
        for start in range(0, 1_500_000, 50_000):
            f.write("".join(f"{i},name {i},{i * 0.5}\n" for i in range(start, start + 50_000)))
    data = Path(env["TAXIWAY_HOME"]) / "publish" / "bigtmp" / "build" / "app" / "data"
    p = subprocess.Popen([sys.executable, "-m", "taxiway", "publish", str(big), "--name", "bigtmp"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (data.is_dir() and any(x.name.endswith(".tmp") for x in data.iterdir())):
            assert p.poll() is None, "the conversion ended before its temp database was seen"
            time.sleep(0.005)
    finally:
        p.kill()
        p.wait()
    app = ls(env)["bigtmp"]
    assert app["state"] == "interrupted"
    assert any(f.endswith(".tmp") for f in app["leftovers"]["files"])
    taxiway(env, "publish", "rm", "bigtmp")
    assert not data.parent.parent.parent.exists() and "bigtmp" not in ls(env)


def test_only_the_current_and_previous_release_images_are_kept(env, tmp_path):
    src = tmp_path / "rel.csv"
    tags = []
    for n in range(3):
        src.write_text(f"n\n{n}\n")
        tags.append(json.loads(taxiway(env, "publish", str(src), "--json").stdout)["image"])
    assert app_images(env, "rel") == {tags[2], tags[1], "localhost/taxiway-publish/rel:latest"}
    assert ls(env)["rel"]["previous_image"] == tags[1]
    taxiway(env, "publish", "rm", "rel")
    assert app_images(env, "rel") == set()
