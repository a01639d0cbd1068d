"""apps/gamehall/taxiway.toml is a valid app config for `taxiway launch apps/gamehall`."""

from __future__ import annotations

from gamehall_testing import REPO

from taxiway.platform import appconfig

APP = REPO / "apps" / "gamehall"


def test_taxiway_toml_parses_and_runs_gamehall_clustered_over_tls():
    cfg, ignored = appconfig.load(APP / "taxiway.toml")
    assert ignored == [] and cfg["app"] == "gamehall"
    http = cfg["http_service"]
    assert http["internal_port"] == 8080 and http["force_https"]
    assert http["min_machines_running"] >= 2  # a cluster, so a node can die mid-game
    [check] = http["checks"]
    assert (check["type"], check["path"]) == ("http", "/healthz")
    env = cfg["env"]
    assert env["GAMEHALL_REDIS_URL"].startswith("rediss://redis.internal:")
    assert env["GAMEHALL_DNS_NAME"] == "gamehall.internal" and env["GAMEHALL_HOST"] == "::"
    [(group, machine)] = appconfig.machine_configs(cfg, "registry.internal/gamehall:v1").items()
    assert machine["env"]["PORT"] == "8080"  # gamehall serve listens on $PORT
    assert appconfig.http_port(machine) == 8080
    # The python buildpack installs the package; the Procfile's web process serves it.
    assert (APP / "Procfile").read_text().strip() == "web: gamehall serve"
    assert (APP / "pyproject.toml").is_file()
