"""Two gamehall nodes behind one address (a real nginx on loopback, standing where the
edge stands), sharing games through a real redis-server. Two chromium players play; the
node serving both pages dies mid-game; the pages reconnect by themselves, with no reload,
to whatever serves the address now, and the game goes on with no move lost."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import pytest
from gamehall_testing import free_port, gamehall_node, redis_server, server_process
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  upstream gamehall {{
    server 127.0.0.1:{a} max_fails=1 fail_timeout=60s;
    server 127.0.0.1:{b} backup;
  }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gamehall;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $http_host;
      proxy_connect_timeout 2s;
      proxy_read_timeout 1h;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx_in_front(tmp, a: int, b: int):
    """nginx on a free loopback port: everything to node A while it lives, then to B."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, a=a, b=b, port=port))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    with server_process(argv, port, tmp / "nginx.out"):
        yield f"http://127.0.0.1:{port}"


def test_players_of_a_dead_node_reconnect_by_themselves_and_no_move_is_lost(tmp_path, artifacts):
    with redis_server(tmp_path) as url:
        common = ["--redis", url, "--owner-ttl", "3"]
        with (
            gamehall_node(tmp_path, *common, "--node-id", "a") as a,
            gamehall_node(tmp_path, *common, "--node-id", "b") as b,
            nginx_in_front(tmp_path, a.port, b.port) as edge,
            sync_playwright() as p,
        ):
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                ann = browser.new_context(viewport={"width": 1024, "height": 800}).new_page()
                bob = browser.new_context(
                    viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
                ).new_page()
                for page in (ann, bob):
                    page.set_default_timeout(15_000)
                ann.goto(edge + "/")
                ann.get_by_label("Your name").fill("Ann")
                ann.get_by_label("Game", exact=True).select_option("connect4")
                ann.get_by_role("button", name="Create game").click()
                ann.wait_for_url(re.compile(r"/g/[A-Z]{4}$"))
                code = ann.locator("#code").inner_text()
                expect(ann.locator("#share-link")).to_have_value(f"{edge}/g/{code}")
                bob.goto(f"{edge}/g/{code}")
                bob.get_by_label("Your name").fill("Bob")
                bob.get_by_role("button", name="Join game").click()
                ann.get_by_role("button", name="Start").click()
                played = []
                for page, other, col in ((ann, bob, 4), (bob, ann, 4), (ann, bob, 5)):
                    page.locator(f"#col-{col}").click()
                    played.append(col)
                    expect(other.locator(".c4 .hole.red, .c4 .hole.yellow")).to_have_count(
                        len(played)
                    )
                assert json.loads(a.get("/healthz")[1])["games"] == 1  # A runs the game
                for page in (ann, bob):
                    page.evaluate("window.loadedOnce = true")  # gone if the page reloads

                a.kill()  # the node serving both pages, and running the game, dies
                # Both pages reconnect by themselves through the same address (to B now),
                # are shown the game as it stands, and play on; nobody reloads.
                for page in (ann, bob):
                    expect(page.locator("#game")).to_have_attribute("data-reconnects", "1")
                    expect(page.locator("#game")).to_have_attribute("data-conn", "open")
                expect(bob.locator("#turn")).to_have_text("Your turn: you play yellow")
                bob.locator("#col-5").click()
                played.append(5)
                expect(ann.locator("#turn")).to_have_text("Your turn: you play red")
                expect(ann.locator(".c4 .hole.yellow")).to_have_count(2)
                ann.keyboard.press("3")
                ann.keyboard.press("Enter")
                played.append(3)
                expect(bob.locator(".c4 .hole.red")).to_have_count(3)
                for page in (ann, bob):
                    assert page.evaluate("window.loadedOnce === true")
                    expect(page.locator("#conn")).not_to_contain_text("Reconnecting")
                game = b.get(f"/api/games/{code}")[1]
                assert [m[1] for m in json.loads(game)["move_list"]] == played
                assert json.loads(b.get("/healthz")[1])["games"] == 1  # B runs it now
                ann.screenshot(path=str(artifacts / "cluster-after-failover.png"), full_page=True)
                bob.screenshot(
                    path=str(artifacts / "cluster-after-failover-phone.png"), full_page=True
                )
            finally:
                browser.close()
