"""The workflow of issue #16 as a user types it: ``taxiway up``, ``launch`` (adopting a fly.toml),
a rolling ``deploy`` v1 -> v2 under a continuous request loop through the edge with 0 failed
requests, then a release whose health check fails: rolled back while v2 keeps answering.

The app is a busybox httpd image from the local store ([build] image), so no build (and no package
index) is needed; building examples/python is the builder's own tests' job.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from machines.conftest import BUSYBOX, make_image
from test_up import platform  # noqa: F401 - the fixture: taxiway in the temp home, everything stopped after

FLY_TOML = """\
# fly.toml app configuration file generated for hello
app = 'hello'
primary_region = 'ams'
swap_size_mb = 512
kill_timeout = '2s'

[build]
  image = '{image}'

[processes]
  app = 'mkdir -p /www; echo {body} > /www/index.html; exec busybox httpd -f -p 8080 -h /www'

[http_service]
  internal_port = 8080
  force_https = false
  auto_stop_machines = 'stop'
  min_machines_running = 0
  processes = ['app']

  [[http_service.checks]]
    grace_period = '0s'
    interval = '200ms'
    timeout = '2s'
    method = 'GET'
    path = '{check}'

[deploy]
  strategy = 'rolling'
  wait_timeout = '{wait}'

[[vm]]
  memory = '256mb'
  cpu_kind = 'shared'
  cpus = 1
"""


@pytest.fixture
def tw(request):
    """``tw(*args, check=True)``: the CLI in the temp home (test_up's ``platform`` fixture)."""
    return request.getfixturevalue("platform")


class Loop(threading.Thread):
    """GET / through the edge, one after another, until stopped; every answer recorded."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": f"hello.localhost:{port}"},
                                   timeout=30, trust_env=False)
        self.answers: list[str] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                r = self.client.get("/index.html")
                (self.answers if r.status_code == 200 else self.failures).append(
                    r.text.strip() if r.status_code == 200 else f"{r.status_code} {r.text[:80]}")
            except httpx.HTTPError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            time.sleep(0.01)
        self.client.close()


def _wait(pred, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _instances_find_each_other(platform_home: Path, app: str) -> None:
    """Each started machine of ``app`` resolves ``<app>.internal`` to every instance's private address
    (DNS at fdaa::3) and reaches the other one's port 8080 by that address."""
    from test_up import _api

    with _api(platform_home) as c:
        ms = [m for m in c.get(f"/v1/apps/{app}/machines").json() if m["state"] == "started"]
        assert len(ms) == 2, ms
        ips = {m["id"]: m["private_ip"] for m in ms}
        assert all(ips.values()), ips
        for m in ms:
            other = next(i for i in ips if i != m["id"])
            script = (f"nslookup -type=AAAA {app}.internal; "
                      f"echo probe | nc -w 5 {ips[other]} 8080 >/dev/null && echo reached")
            r = c.post(f"/v1/apps/{app}/machines/{m['id']}/exec",
                       json={"command": ["sh", "-c", script], "timeout": 30}).json()
            out = r.get("stdout", "") + r.get("stderr", "")
            assert all(ip in out for ip in ips.values()), (ips, out)
            assert "reached" in out, out


def test_up_launch_rolling_deploy_without_failed_requests_and_rollback(tw, platform_home, tmp_path):
    image = make_image(tmp_path, BUSYBOX)
    tw("up", "-d", "--free-ports")
    app = tmp_path / "hello"
    app.mkdir()
    (app / "fly.toml").write_text(FLY_TOML.format(image=image, body="v1", check="/index.html", wait="60s"))

    r = tw("launch", str(app))
    err = r.stderr.decode()
    assert "ignoring keys taxiway does not use: swap_size_mb, vm[0].cpu_kind" in err
    assert "v1 of hello is deployed" in r.stdout.decode()
    url = tw("open", "-a", "hello").stdout.decode().strip()
    # open gives the HTTPS URL; this test speaks plain HTTP (so its fly.toml says force_https = false:
    # with true, the edge answers plain HTTP with a 301 to the HTTPS listener)
    assert url.startswith("https://hello.localhost:")
    port = int(json.loads((platform_home / "platform" / "up.json").read_text())["edge"].rsplit(":", 1)[1])

    loop = Loop(port)
    loop.start()
    try:
        _wait(lambda: loop.answers, "the edge to answer")
        assert loop.answers[0] == "v1"

        # v2: taxiway.toml (written by launch) changed, deployed with a rolling strategy under load.
        toml = app / "taxiway.toml"
        toml.write_text(toml.read_text().replace("echo v1", "echo v2"))
        r = tw("deploy", str(app))
        assert "v2 of hello is deployed" in r.stdout.decode()
        done = len(loop.answers)
        _wait(lambda: len(loop.answers) > done + 10, "more answers")
        # While both ran, both answered; once the deploy is over only v2 does (one answer may have been
        # on its way when the old machine, drained, stopped).
        assert set(loop.answers[done + 1:]) == {"v2"}
        assert loop.failures == []

        # v3 fails its health check: rolled back, exit 1, v2 answers throughout.
        seen = len(loop.answers)
        toml.write_text(toml.read_text().replace("echo v2", "echo v3").replace('"/index.html"', '"/missing"')
                        .replace("wait_timeout = 60.0", "wait_timeout = 3.0"))
        r = tw("deploy", str(app), check=False)
        assert r.returncode == 1 and "was rolled back" in r.stderr.decode(), r.stderr.decode()
        _wait(lambda: len(loop.answers) > seen + 10, "more answers")
        assert set(loop.answers[seen:]) == {"v2"}
        assert loop.failures == []

        r = tw("releases", "--json", "-a", "hello")
        assert [(x["version"], x["status"]) for x in json.loads(r.stdout)] == [
            (3, "rolled_back"), (2, "complete"), (1, "complete")]

        # Two instances of the deployed app find each other through hello.internal (issue 17).
        tw("scale", "count", "2", "-a", "hello")
        _instances_find_each_other(platform_home, "hello")
    finally:
        loop.halt.set()
        loop.join(30)
    assert loop.failures == []


def test_launch_builds_the_static_example_pushes_and_deploys(tw, platform_home, tmp_path):
    """launch with the builder: detect, build (stacks from the machine-wide cache), push to the platform
    registry with the app's token, deploy; the edge serves the example. Then a one-line change redeploys."""
    import shutil

    src = Path(__file__).resolve().parents[2] / "examples" / "static"
    app = tmp_path / "site"
    shutil.copytree(src, app)  # launch writes taxiway.toml: never into the repository
    tw("up", "-d", "--free-ports")
    r = tw("launch", str(app), "--name", "site")
    err = r.stderr.decode()
    assert "[detect] taxiway/static" in err and "[push] " in err, err
    assert "v1 of site is deployed" in r.stdout.decode()
    url = tw("open", "-a", "site").stdout.decode().strip()
    assert url.startswith("https://site.localhost:")  # open gives the HTTPS URL; this test speaks plain HTTP
    port = int(json.loads((platform_home / "platform" / "up.json").read_text())["edge"].rsplit(":", 1)[1])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": f"site.localhost:{port}"},
                      trust_env=False, timeout=30) as c:
        assert "hello from a static site on taxiway" in c.get("/").text
        # The URL 'taxiway open' prints works over HTTPS, with a certificate of the platform's CA.
        up = json.loads((platform_home / "platform" / "up.json").read_text())
        https_port = url.rsplit(":", 1)[1].strip("/")
        got = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", str(Path(up["ca"]) / "root.pem"),
                              "--resolve", f"site.localhost:{https_port}:127.0.0.1", url], capture_output=True)
        assert "hello from a static site on taxiway" in got.stdout.decode(), got.stderr
        index = app / "public" / "index.html"
        index.write_text(index.read_text().replace("hello from a static site", "hello again from a static site"))
        r = tw("deploy", str(app))
        assert "v2 of site is deployed" in r.stdout.decode()
        assert "hello again from a static site on taxiway" in c.get("/").text
    rel = json.loads(tw("releases", "-a", "site", "--json").stdout)[0]
    assert rel["image"].startswith(json.loads((platform_home / "platform" / "up.json").read_text())["registry"])
