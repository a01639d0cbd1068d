"""Issue 16's bad input, through the CLI as a user types it: an invalid taxiway.toml, an unknown app,
a missing image, a port clash, an invalid secret name and a token of another org each give one line
"error: what; fix" on stderr, a non-zero exit, and change nothing (no release, no secret, no app, no
platform). A real nats-server and API process (no agent: nothing may get as far as a machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import platform_api  # noqa: F401 (fixture: API + nats, orgs acme/other, apps web/api of acme)

TOML = 'app = "web"\n\n[http_service]\ninternal_port = 8080\n'


def tw(*args: str, token: str, url: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAXIWAY_API_URL": url, "TAXIWAY_API_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def one_line(p: subprocess.CompletedProcess, *words: str) -> None:
    """Exit non-zero with one stderr line 'error: ...; fix' that names ``words``."""
    assert p.returncode != 0, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_input_is_one_clear_line_and_changes_nothing(platform_api, platform_home, tmp_path):  # noqa: F811
    api = platform_api
    url, acme, other = api.url, api.tokens["acme"], api.tokens["other"]
    src = tmp_path / "web"
    src.mkdir()

    def state():  # what a bad command must leave as it was
        with api.client() as c:
            return (c.get("/v1/apps").json(), c.get("/v1/apps/web/releases").json(),
                    c.get("/v1/apps/web/secrets").json())

    before = state()

    # an invalid taxiway.toml: file, line and key
    (src / "taxiway.toml").write_text(TOML + "[deploy]\nstrategy = \"yolo\"\n")
    one_line(tw("deploy", str(src), "--image", "localhost/x:1", token=acme, url=url, home=platform_home),
             str(src / "taxiway.toml"), "line 6", "deploy.strategy")
    (src / "taxiway.toml").write_text(TOML + "[http_service.concurrency]\nsoft_limt = 3\n")
    one_line(tw("deploy", str(src), "--image", "localhost/x:1", token=acme, url=url, home=platform_home),
             "line 6", "soft_limt")

    # an unknown app
    (src / "taxiway.toml").write_text(TOML)
    one_line(tw("deploy", str(src), "-a", "ghost", "--image", "localhost/x:1", token=acme, url=url,
                home=platform_home), "no app 'ghost'")
    one_line(tw("releases", "-a", "ghost", token=acme, url=url, home=platform_home), "no app 'ghost'")

    # a missing image: refused before a release is recorded
    one_line(tw("deploy", str(src), "--image", "localhost/no-such/image:1", token=acme, url=url,
                home=platform_home), "no image localhost/no-such/image:1")

    # an invalid secret name
    one_line(tw("secrets", "set", "-a", "web", "1BAD=x", token=acme, url=url, home=platform_home),
             "invalid secret name '1BAD'")

    # a token of another org: its apps do not exist for it (404, not 403: names don't leak)
    one_line(tw("releases", "-a", "web", token=other, url=url, home=platform_home), "no app 'web'")
    one_line(tw("deploy", str(src), "--image", "localhost/x:1", token=other, url=url, home=platform_home),
             "no app 'web'")
    one_line(tw("secrets", "set", "-a", "web", "OK=1", token=other, url=url, home=platform_home), "no app 'web'")
    one_line(tw("apps", "destroy", "web", "-y", token=other, url=url, home=platform_home), "no app 'web'")

    assert state() == before

    # a port clash: `taxiway up` on a port something else holds starts nothing
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line(tw("up", "-d", "--edge-port", str(port), token=acme, url=url, home=platform_home),
                 f"port {port} (--edge-port) is in use")
    assert not (platform_home / "platform" / "up.json").exists()


@pytest.mark.parametrize("flag", ["--edge-port", "--https"])
def test_up_refuses_a_taken_port_before_starting_anything(flag, platform_home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "taxiway", "up", "-d", flag, str(port)], capture_output=True,
                           text=True, timeout=120)
    one_line(p, f"port {port} ({flag}) is in use", "nothing was started")
    assert not (platform_home / "platform" / "up.json").exists()
