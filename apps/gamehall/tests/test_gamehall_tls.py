"""Redis with mutual TLS: a real redis-server speaking only TLS (tls-auth-clients yes) with
certificates from taxiway's own CA; two gamehall nodes share a game through it with client
certificates, and a client without one is refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from urllib.parse import urlencode

import pytest
from gamehall_testing import (
    GAMEHALL,
    Player,
    free_port,
    gamehall_node,
    issue_redis_certs,
    redis_tls_server,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis-tls")
    certs = issue_redis_certs(tmp)
    with redis_tls_server(tmp, certs) as url:
        yield url, certs, tmp


def test_two_nodes_share_a_game_through_redis_with_client_certificates(tls_redis, tmp_path):
    url, certs, _ = tls_redis
    # Node A takes its certificate and key from the environment as PEM text (as secrets
    # arrive on the platform) and the CA as a path; node B from redis-py's URL parameters.
    env_a = {
        "GAMEHALL_REDIS_URL": url,
        "GAMEHALL_REDIS_CA": str(certs.root),
        "GAMEHALL_REDIS_CERT": certs.client_cert.read_text(),
        "GAMEHALL_REDIS_KEY": certs.client_key.read_text(),
    }
    url_b = url + "?" + urlencode(
        {
            "ssl_ca_certs": certs.root,
            "ssl_certfile": certs.client_cert,
            "ssl_keyfile": certs.client_key,
        }
    )
    with (
        gamehall_node(tmp_path, "--node-id", "a", env=env_a) as a,
        gamehall_node(tmp_path, "--redis", url_b, "--node-id", "b") as b,
    ):
        assert "with a client certificate" in a.log.read_text()

        async def main():
            code = a.create("tictactoe")
            ann = await Player(a, code).connect()
            bob = await Player(b, code).connect()  # B reads the game A stored, over TLS
            assert (await bob.do("join", name="Bob"))["seat"] == 0
            assert (await ann.do("join", name="Ann"))["seat"] == 1
            assert await bob.do("start") == {"ok": True}
            for player, other, cell in [(bob, ann, 1), (ann, bob, 5), (bob, ann, 2)]:
                assert await player.do("move", move=cell) == {"ok": True}
                await other.view_where(lambda v, c=cell: v["board"]["cells"][c - 1]["mark"])
            assert a.game(code)["move_list"] == b.game(code)["move_list"] == [
                [0, 1],
                [1, 5],
                [0, 2],
            ]
            lobby = b.get("/api/lobby")[1]
            assert code in lobby  # the lobby index lives in Redis too
            for p in (ann, bob):
                await p.ws.close()

        asyncio.run(main())


def test_a_client_without_a_certificate_is_refused(tls_redis, tmp_path):
    url, certs, _ = tls_redis
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # A TLS client that trusts the CA but presents no certificate: Redis ends the handshake.
    ctx = ssl.create_default_context(cafile=str(certs.root))
    refused = None
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"*1\r\n$4\r\nPING\r\n")
            refused = tls.recv(100)
    except (ssl.SSLError, ConnectionError) as e:
        refused = e
    assert refused == b"" or isinstance(refused, ssl.SSLError | ConnectionError), refused

    # A gamehall node given the CA but no client certificate cannot start, and says why.
    node_port = free_port()
    log = tmp_path / "nocert.log"
    proc = subprocess.run(
        [*GAMEHALL, "serve", "--port", str(node_port), "--redis", url,
         "--redis-ca", str(certs.root)],
        capture_output=True,
        timeout=60,
    )
    log.write_bytes(proc.stdout + proc.stderr)
    assert proc.returncode != 0
    assert b"cannot use Redis at 127.0.0.1 port" in proc.stderr

    # TLS files with a plain redis:// URL are a usage error, one line.
    proc = subprocess.run(
        [*GAMEHALL, "serve", "--port", str(node_port), "--redis", "redis://127.0.0.1:1/0",
         "--redis-ca", str(certs.root)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2 and b"give a rediss:// URL" in proc.stderr


def test_the_fast_link_speaks_tls_and_verifies_the_server(tls_redis):
    """gamehall.resp (the hot path) over TLS: a client certificate gets in; a CA that did
    not sign Redis's certificate is refused at the handshake."""
    from gamehall import resp

    url, certs, tmp = tls_redis

    async def main():
        good = resp.TLSFiles(str(certs.root), str(certs.client_cert), str(certs.client_key))
        link = resp.Link(url, good.context())
        assert await link.call("PING") == b"PONG"
        await link.close()
        from taxiway.pki import CA

        other, _ = CA.init(tmp / f"other-ca-{time.monotonic_ns()}")
        wrong = resp.TLSFiles(str(other.dir / "root.pem"), str(certs.client_cert),
                              str(certs.client_key))
        link = resp.Link(url, wrong.context())
        with pytest.raises(ssl.SSLCertVerificationError):
            await link.call("PING")
        await link.close()

    asyncio.run(main())
