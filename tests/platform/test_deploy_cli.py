"""The app commands end to end, as a user runs them: the taxiway CLI (a process) -> the API (a
process) -> nats-server -> the host agent (a process) -> busybox machines. Also the API killed
with -9 in the middle of a deploy, and launch adopting a real fly.toml.

Deadlines only keep a broken run from hanging; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from test_api import _bootstrap, run, start_api

FIXTURES = Path(__file__).parent / "fixtures"

TOML = """\
app = "web"
kill_timeout = "2s"

[processes]
app = "mkdir -p /www; echo {body} > /www/index.html; echo serving {body}; exec busybox httpd -f -p 8080 -h /www"

[http_service]
internal_port = 8080

[[http_service.checks]]
path = "{check}"
interval = "200ms"
timeout = "2s"
grace_period = "0s"

[deploy]
wait_timeout = "{wait}"
"""


@pytest.fixture
def stack(platform_home, nats_server, tmp_path, monkeypatch):
    """nats-server, agent and API processes; the CLI's env points at the API with acme's admin token."""
    image = make_image(tmp_path, BUSYBOX)
    toks = run(_bootstrap(nats_server.url))
    log = open(tmp_path / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "taxiway.platform.agent", "--nats", nats_server.url,
                              "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    apis = []

    def api():
        cm = start_api(nats_server.url, tmp_path)
        s = cm.__enter__()
        apis.append(cm)
        monkeypatch.setenv("TAXIWAY_API_URL", s.url)
        return s

    monkeypatch.setenv("TAXIWAY_API_TOKEN", toks["acme"])
    try:
        server = api()
        c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {toks['acme']}"}, timeout=300)
        deadline = time.monotonic() + 60
        while c.post("/v1/apps/web/machines", json={"config": {"image": image}, "skip_launch": True}).status_code == 503:
            assert time.monotonic() < deadline, "the agent never answered"
            time.sleep(0.2)
        for m in c.get("/v1/apps/web/machines").json():  # the probe machine: not part of the app
            c.delete(f"/v1/apps/web/machines/{m['id']}", params={"force": "true"})
        yield {"image": image, "client": c, "api": api, "server": server, "nats": nats_server.url}
    finally:
        for cm in apis:
            cm.__exit__(None, None, None)
        agent.terminate()
        agent.wait(20)
        log.close()
        from taxiway import machines

        for m in machines.all_machines():
            machines.destroy(m, force=True)


def tw(*args: str, cwd: Path | None = None, input: str | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, text=True, cwd=cwd,
                          input=input, timeout=timeout, env=dict(os.environ))


def app_dir(tmp_path: Path, body: str, check: str = "/index.html", wait: str = "60s") -> Path:
    d = tmp_path / f"app-{body}"
    d.mkdir(exist_ok=True)
    (d / "taxiway.toml").write_text(TOML.format(body=body, check=check, wait=wait))
    return d


def live(c: httpx.Client) -> list[dict]:
    return [m for m in c.get("/v1/apps/web/machines").json() if m["state"] != "destroyed"]


def test_deploy_releases_secrets_scale_logs_through_the_cli(stack, tmp_path):
    c, image = stack["client"], stack["image"]
    p = tw("deploy", str(app_dir(tmp_path, "v1")), "--image", image)
    assert p.returncode == 0, p.stderr
    assert "v1 of web is deployed" in p.stdout
    assert "creating 1 machine of v1" in p.stderr  # the release's steps are followed
    [m1] = live(c)
    assert m1["release"] == 1 and m1["state"] == "started"

    p = tw("releases", "-a", "web", "--json")
    assert p.returncode == 0, p.stderr
    assert [(r["version"], r["status"]) for r in json.loads(p.stdout)] == [(1, "complete")]

    # A secret: sealed, listed by name and digest only, and in the new machines' environment.
    p = tw("secrets", "set", "-a", "web", "GREETING=hello-secret")
    assert p.returncode == 0, p.stderr
    [m2] = live(c)
    assert m2["id"] != m1["id"] and m2["release"] == 2
    out = c.post(f"/v1/apps/web/machines/{m2['id']}/exec", json={"command": ["sh", "-c", "echo $GREETING"]}).json()
    assert out["stdout"].strip() == "hello-secret"
    p = tw("secrets", "ls", "-a", "web", "--json")
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["GREETING"] and "hello-secret" not in p.stdout and rows[0]["digest"]
    p = tw("secrets", "set", "-a", "web", "--stage", "OTHER=1")
    assert p.returncode == 0 and "(staged)" in p.stdout
    assert [m["id"] for m in live(c)] == [m2["id"]]  # staged: nothing restarted
    p = tw("secrets", "set", "-a", "web", "1BAD=x")
    assert p.returncode == 2 and p.stderr.startswith("error: invalid secret name '1BAD'")

    # Scale out and back in.
    p = tw("scale", "count", "2", "-a", "web")
    assert p.returncode == 0, p.stderr
    assert len(live(c)) == 2
    p = tw("scale", "count", "1", "-a", "web")
    assert p.returncode == 0, p.stderr
    assert len(live(c)) == 1
    p = tw("scale", "memory", "128", "-a", "web")
    assert p.returncode == 0, p.stderr
    [m] = live(c)
    assert m["config"]["guest"]["memory"] == 128 << 20 and m["state"] == "started"

    # A release whose check never passes: rolled back, non-zero exit, the v2 machine untouched.
    before = [m["id"] for m in live(c)]
    p = tw("deploy", str(app_dir(tmp_path, "v3", check="/missing", wait="3s")), "--image", image)
    assert p.returncode == 1, p.stdout
    assert "was rolled back" in p.stderr
    assert [m["id"] for m in live(c)] == before

    p = tw("logs", "-a", "web")
    assert p.returncode == 0, p.stderr
    assert "serving v1" in p.stdout
    # -f: the lines there are, then new ones as they come, until interrupted.
    follow = subprocess.Popen([sys.executable, "-m", "taxiway", "logs", "-f", "-a", "web"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        first = follow.stdout.readline()
        assert "[stdout]" in first or "[stderr]" in first, first
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(30)

    # Bad input: one line, non-zero, nothing changed.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "taxiway.toml").write_text('app = "web"\n[http_service]\ninternal_port = "x"\n')
    p = tw("deploy", str(bad), "--image", image)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: {bad / 'taxiway.toml'} line 3: http_service.internal_port: must be a whole number from 1 to 65535,"
        " not 'x'; set internal_port = 1"]
    p = tw("deploy", str(app_dir(tmp_path, "v9")), "--image", image, "-a", "nosuchapp")
    assert p.returncode != 0 and p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


def test_kill9_of_the_api_mid_deploy_is_finished_after_restart(stack, tmp_path):
    c, image = stack["client"], stack["image"]
    assert tw("deploy", str(app_dir(tmp_path, "v1")), "--image", image).returncode == 0
    from taxiway.platform import appconfig

    cfg, _ = appconfig.load(app_dir(tmp_path, "v2") / "taxiway.toml")
    rel = c.post("/v1/apps/web/releases", json={"image": image, "config": cfg}).json()
    assert rel["version"] == 2
    deadline = time.monotonic() + 120
    while not [m for m in live(c) if m["release"] == 2]:
        assert time.monotonic() < deadline, "no v2 machine"
        time.sleep(0.05)
    os.killpg(stack["server"].proc.pid, signal.SIGKILL)  # the control plane dies mid-deploy
    stack["server"].proc.wait()
    server = stack["api"]()  # and comes back: deploy.resume finishes the deploy
    c = httpx.Client(base_url=server.url, headers=c.headers, timeout=300)
    deadline = time.monotonic() + 180
    while (r := c.get("/v1/apps/web/releases/2").json())["status"] not in ("complete", "failed", "rolled_back"):
        assert time.monotonic() < deadline, r
        time.sleep(0.2)
    assert r["status"] == "complete", r
    assert [m["release"] for m in live(c)] == [2]


def test_launch_adopts_a_real_fly_toml(stack, tmp_path):
    d = tmp_path / "flyapp"
    d.mkdir()
    (d / "fly.toml").write_text((FIXTURES / "fly.toml").read_text())
    p = tw("launch", str(d), "--no-deploy")
    assert p.returncode == 0, p.stderr
    assert "ignoring keys taxiway does not use: console_command, swap_size_mb, experimental" in p.stderr
    assert "created app hello-python" in p.stdout
    assert stack["client"].get("/v1/apps/hello-python").status_code == 200
    from taxiway.platform import appconfig

    written, ignored = appconfig.load(d / "taxiway.toml")
    adopted, _ = appconfig.load(d / "fly.toml")
    assert written == adopted and ignored == []
    # Launching again refuses, and changes nothing.
    p = tw("launch", str(d), "--no-deploy")
    assert p.returncode == 2 and "already exists" in p.stderr


def test_launch_detects_and_refuses_bad_folders(stack, tmp_path):
    d = tmp_path / "my_python_app"
    d.mkdir()
    (d / "app.py").write_text("print('hi')\n")
    p = tw("launch", str(d), "--no-deploy")
    assert p.returncode == 0, p.stderr
    assert "[detect] taxiway/python" in p.stderr and "created app my-python-app" in p.stdout
    from taxiway.platform import appconfig

    cfg, _ = appconfig.load(d / "taxiway.toml")
    assert cfg["http_service"]["internal_port"] == 8080 and cfg["checks"]["alive"]["type"] == "tcp"

    empty = tmp_path / "empty"
    empty.mkdir()
    p = tw("launch", str(empty), "--no-deploy")
    assert p.returncode == 2 and "no buildpack detected an app" in p.stderr
    assert list(empty.iterdir()) == []
    assert stack["client"].get("/v1/apps/empty").status_code == 404
