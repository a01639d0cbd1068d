"""``taxiway up -d`` / ``down`` / ``platform status`` as a user runs them, in a temp home.

Every test stops what it started (``taxiway down``, then any pid of up.json still
alive, then the machines of its home). Ports are free loopback ports (--free-ports).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from test_api_agent import web_config


def _pids(home: Path) -> list[int]:
    try:
        up = json.loads((home / "platform" / "up.json").read_text())
    except (OSError, ValueError):
        return []
    return [up["pid"]] + [c["pid"] for c in up["components"].values() if c.get("pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _until(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def platform(platform_home, taxiway):
    """Runs ``taxiway`` in the temp home; stops the platform, its leftovers and its machines after."""
    seen: set[int] = set()

    def tw(*args: str, check: bool = True):
        r = taxiway(*args, timeout=180)
        seen.update(_pids(platform_home))
        if check:
            assert r.returncode == 0, (args, r.stdout.decode(), r.stderr.decode())
        return r

    yield tw
    taxiway("down", timeout=120)
    for pid in seen:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    from taxiway import machines

    for m in machines.all_machines():
        machines.destroy(m, force=True)


def _api(platform_home) -> httpx.Client:
    cfg = json.loads((Path(os.environ["TAXIWAY_CONFIG"]) / "platform.json").read_text())
    return httpx.Client(base_url=cfg["api_url"], headers={"Authorization": f"Bearer {cfg['token']}"},
                        timeout=300, trust_env=False)


def test_up_detached_is_idempotent_restarts_children_and_down_stops_all(platform, platform_home):
    r = platform("up", "-d", "--free-ports")
    assert "the platform is up" in r.stdout.decode()
    cfg_path = Path(os.environ["TAXIWAY_CONFIG"]) / "platform.json"
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    up = json.loads((platform_home / "platform" / "up.json").read_text())
    assert {"pid", "nats", "api", "edge", "registry", "started_at"} <= set(up)
    assert up["ca"] and Path(up["ca"]).is_dir()
    with _api(platform_home) as c:
        assert c.post("/v1/apps", json={"app_name": "hello"}).status_code == 201
        creds = c.post("/v1/apps/hello/registry_token").json()
    assert creds["registry"] == up["registry"] and creds["repository"] == "hello"
    # the credentials work with the platform's registry (the Docker token flow)
    r = httpx.get(f"http://{creds['registry']}/v2/token", params={"service": "taxiway",
                  "scope": "repository:hello:pull,push"}, auth=(creds["username"], creds["password"]), trust_env=False)
    assert r.status_code == 200, r.text
    r = httpx.get(f"http://{creds['registry']}/v2/", headers={"Authorization": f"Bearer {r.json()['token']}"},
                  trust_env=False)
    assert r.status_code == 200
    # ...for the app's own repository only: not another app's of the same org, not the catalog
    r = httpx.get(f"http://{creds['registry']}/v2/token", params={"service": "taxiway",
                  "scope": ["repository:other:pull,push", "registry:catalog:*"]},
                  auth=(creds["username"], creds["password"]), trust_env=False)
    assert r.status_code == 200
    payload = r.json()["access_token"].split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["access"] == []
    for path in ("/v2/other/tags/list", "/v2/_catalog"):
        got = httpx.get(f"http://{creds['registry']}{path}", auth=(creds["username"], creds["password"]),
                        trust_env=False)
        assert got.status_code in (401, 403), (path, got.status_code)
    # an org per platform org in the registry
    with _api(platform_home) as c:
        assert c.post("/v1/orgs", json={"name": "team"}).status_code == 201
    orgs = json.loads(platform("registry", "org", "ls", "--root", str(platform_home / "registry"), "--json").stdout)
    assert {"personal", "team"} <= {o["name"] for o in orgs}
    # where the agent mints per-org pull tokens (0600): the registry and its tenants database, no
    # single org's token (one for all let any org pull another's images: red team C4)
    auth = platform_home / "platform" / "agent" / "registry-auth.json"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    pull = json.loads(auth.read_text())
    assert pull["registry"] == up["registry"] and "auths" not in pull
    assert pull["tenants"] == str(platform_home / "registry" / "tenants.db")

    r = platform("up", "-d", "--free-ports")
    assert "already running" in r.stdout.decode()
    assert json.loads((platform_home / "platform" / "up.json").read_text())["pid"] == up["pid"]

    st = json.loads(platform("platform", "status", "--json").stdout)
    assert st["running"] and st["api_ok"]
    assert {"nats", "registry", "egress", "api", "agent", "edge"} <= set(st["components"])
    assert all(c["alive"] for c in st["components"].values())

    # a child that dies is restarted, with the state intact
    old_api = up["components"]["api"]["pid"]
    os.kill(old_api, signal.SIGKILL)

    def restarted():
        now = json.loads((platform_home / "platform" / "up.json").read_text())
        return now["components"]["api"]["pid"] != old_api and now["components"]["api"]["restarts"] == 1

    _until(restarted, "the API to be restarted")
    with _api(platform_home) as c:
        _until(lambda: _ok(c, "/v1/apps/hello"), "the restarted API")

    # nats-server killed: restarted on its port, JetStream's store intact, the API reconnects
    old_nats = json.loads((platform_home / "platform" / "up.json").read_text())["components"]["nats"]["pid"]
    os.kill(old_nats, signal.SIGKILL)
    _until(lambda: json.loads((platform_home / "platform" / "up.json").read_text())["components"]["nats"]["pid"]
           != old_nats, "nats-server to be restarted")
    with _api(platform_home) as c:
        _until(lambda: _ok(c, "/v1/apps/hello"), "the API over the restarted nats-server")

    r = platform("apps", "ls", "--json")
    assert [a["name"] for a in json.loads(r.stdout)] == ["hello"]

    pids = _pids(platform_home)
    r = platform("down")
    assert "stopped" in r.stdout.decode()
    assert not (platform_home / "platform" / "up.json").exists()
    assert [p for p in pids if _alive(p)] == []
    assert "not running" in platform("down").stdout.decode()
    assert "not running" in platform("platform", "status").stdout.decode()


def _ok(c: httpx.Client, path: str) -> bool:
    try:
        return c.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _push_to_platform(c, local: str, app: str) -> str:
    """Push a local image to the platform registry as the app's org (machines take only its images)."""
    from taxiway.oci.auth import Credentials
    from taxiway.oci.client import RegistryClient
    from taxiway.oci.push import push

    creds = c.post(f"/v1/apps/{app}/registry_token").json()
    ref = f"{creds['registry']}/{creds['repository']}:1"
    with RegistryClient(creds["registry"], credentials=Credentials(creds["username"], creds["password"])) as rc:
        push(ref, source=local, client=rc)
    return ref


def test_kill_9_of_the_supervisor_then_up_again_keeps_state_and_machines(platform, platform_home, tmp_path):
    make_image(tmp_path, BUSYBOX)
    platform("up", "-d", "--free-ports")
    with _api(platform_home) as c:
        assert c.post("/v1/apps", json={"app_name": "web"}).status_code == 201
        image = _push_to_platform(c, BUSYBOX, "web")
        r = c.post("/v1/apps/web/machines", json={"config": web_config(image)})
        assert r.status_code == 200, r.text
        mid, port = r.json()["id"], r.json()["ports"]["8080"]
    assert httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False).text == "hello\n"

    # the machine verbs of the CLI, through the API and the agent
    assert [m["id"] for m in json.loads(platform("machine", "ls", "-a", "web", "--json").stdout)] == [mid]
    r = platform("machine", "exec", mid, "-a", "web", "--", "cat", "/www/index.html")
    assert r.stdout == b"hello\n"
    r = platform("machine", "exec", mid, "-a", "web", "--", "sh", "-c", "echo oops >&2; exit 3", check=False)
    assert r.returncode == 3 and r.stderr == b"oops\n"
    assert f"{mid} stopped" in platform("machine", "stop", mid, "-a", "web").stdout.decode()
    r = platform("machine", "destroy", mid, "-a", "web", check=False)  # stopped: no --force needed, but keep it
    assert r.returncode == 0
    r = platform("machine", "start", mid, "-a", "web", check=False)
    assert r.returncode == 1 and "destroyed" in r.stderr.decode()
    with _api(platform_home) as c:
        r = c.post("/v1/apps/web/machines", json={"config": web_config(image)})
        assert r.status_code == 200, r.text
        mid, port = r.json()["id"], r.json()["ports"]["8080"]
    assert f"{mid} started" in platform("machine", "restart", mid, "-a", "web").stdout.decode()
    port = json.loads(platform("machine", "ls", "-a", "web", "--json").stdout)[0]["ports"]["8080"]
    assert httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False).text == "hello\n"
    r = platform("status", "-a", "web")
    assert mid in r.stdout.decode() and "started" in r.stdout.decode()

    up = json.loads((platform_home / "platform" / "up.json").read_text())
    # no NATS password in any component's argv (ps shows it to every user); it comes by environment
    secrets_ = json.loads((platform_home / "platform" / "nats" / "auth.json").read_text()).values()
    for comp in up["components"].values():
        assert not any(pw in " ".join(comp["argv"]) for pw in secrets_)
    assert "@" not in up["nats"]
    os.kill(up["pid"], signal.SIGKILL)
    _until(lambda: not _alive(up["pid"]), "the supervisor to die")
    # nats-server goes with it (parent-death signal, SIGTERM: JetStream flushes), as the other children
    _until(lambda: not _alive(up["components"]["nats"]["pid"]), "nats-server to follow its supervisor")
    # the machine does not depend on the control plane
    assert httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False).text == "hello\n"

    r = platform("up", "-d", "--free-ports")
    assert "the platform is up" in r.stdout.decode()
    up2 = json.loads((platform_home / "platform" / "up.json").read_text())
    assert up2["pid"] != up["pid"]
    assert not _alive(up["components"]["nats"]["pid"])
    with _api(platform_home) as c:
        m = c.get(f"/v1/apps/web/machines/{mid}").json()
        assert m["state"] == "started" and m["ports"]["8080"] == port  # adopted by the new agent

    # down never stops machines
    platform("down")
    assert httpx.get(f"http://127.0.0.1:{port}/index.html", trust_env=False).text == "hello\n"


def test_cli_errors_are_one_line(platform, platform_home, tmp_path, monkeypatch):
    r = platform("apps", "ls", check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("error: no platform API configured; ")
    platform("up", "-d", "--free-ports")
    r = platform("status", check=False)
    assert r.returncode == 2 and r.stderr.decode().startswith("error: no app given; ")
    r = platform("apps", "create", "Bad_Name", check=False)
    assert r.returncode == 2 and "invalid app name" in r.stderr.decode()
    r = platform("machine", "ls", "-a", "ghost", check=False)
    assert r.returncode == 1 and r.stderr.decode().startswith("error: no app 'ghost'")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "taxiway.toml").write_text('app = "fromtoml"\n')
    platform("apps", "create", "fromtoml")
    monkeypatch.chdir(tmp_path / "proj")
    r = platform("status")
    assert "app fromtoml" in r.stdout.decode() and "no machines" in r.stdout.decode()
    r = platform("volumes", "create", "data", "--size", "10mb", "--json")
    vid = json.loads(r.stdout)["id"]
    assert vid in platform("volumes", "ls").stdout.decode()
    platform("volumes", "destroy", vid, "-y")
    assert platform("open").stdout.decode().startswith("https://fromtoml.localhost:")  # the HTTPS listener (E1)


def test_up_in_the_foreground_stops_everything_on_ctrl_c(platform, platform_home):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "taxiway", "up", "--free-ports"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = proc.stdout.readline().decode()  # printed once the platform is ready
        assert first.startswith("the platform is up"), first + proc.stderr.read().decode()
        assert "already running" in platform("up", "-d", "--free-ports").stdout.decode()
        pids = _pids(platform_home)
        assert len(pids) >= 6 and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        assert [p for p in pids if _alive(p)] == []
        assert not (platform_home / "platform" / "up.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
