"""ACME for custom hostnames against a real pebble (Let's Encrypt's test ACME server).

pebble listens on loopback with a certificate of a taxiway CA made in tmp; it
resolves names through pebble-challtestsrv's DNS server on loopback, which answers
every A query with 127.0.0.1 (never the system resolver), and validates HTTP-01 on
the edge's plain port and TLS-ALPN-01 on its HTTPS port. The client at the end
checks the served chain against pebble's own root.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from test_edge import machines, put_machine, routed, until  # noqa: F401, F811

from taxiway.platform import acme, schema
from taxiway.platform.edge import Edge, EdgeConfig
from taxiway.platform.nats import free_port
from taxiway.platform.state import State

pytestmark = pytest.mark.anyio


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class Pebble:
    def __init__(self, tmp: Path, http_port: int, tls_port: int) -> None:
        from taxiway.pki.ca import CA

        ca, _ = CA.init(tmp / "pebble-ca")
        self.ca_root = str(tmp / "pebble-ca" / "root.pem")
        leaf = ca.issue(["127.0.0.1", "localhost"], record=False)
        leaf.write(tmp / "pebble-cert.pem", tmp / "pebble-key.pem")
        self.port, self.mgmt, self.dns, self.dns_mgmt = free_port(), free_port(), free_port(), free_port()
        cfg = {"pebble": {"listenAddress": f"127.0.0.1:{self.port}",
                          "managementListenAddress": f"127.0.0.1:{self.mgmt}",
                          "certificate": str(tmp / "pebble-cert.pem"), "privateKey": str(tmp / "pebble-key.pem"),
                          "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
                          "externalAccountBindingRequired": False}}
        (tmp / "pebble.json").write_text(json.dumps(cfg))
        log = open(tmp / "pebble.log", "ab")
        # A DNS server on loopback answering every A query with 127.0.0.1 (and no AAAA).
        self.dns_proc = subprocess.Popen(
            ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{self.dns_mgmt}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL)
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.proc = subprocess.Popen(["pebble", "-config", str(tmp / "pebble.json"), "-dnsserver",
                                      f"127.0.0.1:{self.dns}"], stdout=log, stderr=log, env=env,
                                     stdin=subprocess.DEVNULL)
        _wait_port(self.dns_mgmt, self.dns_proc, "pebble-challtestsrv")
        _wait_port(self.port, self.proc, "pebble")
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    def roots(self) -> str:
        """pebble's (random, per run) root: what a client trusts for its certificates."""
        import ssl

        return httpx.get(f"https://127.0.0.1:{self.mgmt}/roots/0", verify=ssl.create_default_context(cafile=self.ca_root)).text

    def stop(self) -> None:
        for p in (self.proc, self.dns_proc):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


async def curl_https(root: str, host: str, port: int) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--cacert", root, "--resolve", f"{host}:{port}:127.0.0.1",
        f"https://{host}:{port}/acme", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def acme_edge(state: State, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Edge, Pebble]]:
    from taxiway.pki.ca import CA

    http_port, tls_port = free_port(), free_port()
    pebble = Pebble(tmp_path, http_port, tls_port)
    monkeypatch.setenv(acme.CA_BUNDLE_ENV, pebble.ca_root)  # trust pebble's own HTTPS (our test CA)
    CA.init(tmp_path / "ca")
    e = Edge(EdgeConfig(listen=("127.0.0.1", http_port), https=("127.0.0.1", tls_port), ca=str(tmp_path / "ca"),
                        tls_dir=str(tmp_path / "tls")), state=state, log=open(tmp_path / "edge.log", "ab"))
    try:
        await e.start()
        yield e, pebble
    finally:
        await e.close()
        pebble.stop()


async def test_http01_and_tls_alpn01_certificates_from_pebble(state, acme_edge, machines, tmp_path):  # noqa: F811
    edge, pebble = acme_edge
    web = machines("web", "0000000000000a")
    await put_machine(state, web)
    await until(lambda: routed(edge, "web"), "routes")
    hosts = {"shop.example.com": "http-01", "alpn.example.com": "tls-alpn-01"}
    for host, challenge in hosts.items():
        await state.put(schema.CERTS, host, {"hostname": host, "app": "web", "org": "personal",
                                             "acme": pebble.directory, "challenge": challenge})
    files = [tmp_path / "tls" / "acme" / f"{h}.pem" for h in hosts]
    try:
        await until(lambda: all(f.exists() for f in files), "ACME certificates", timeout=90)
    finally:
        print((tmp_path / "edge.log").read_text()[-3000:])
    root = tmp_path / "pebble-root.pem"
    root.write_text(await asyncio.to_thread(pebble.roots))
    for host in hosts:
        assert edge.tls.acme.status[host]["state"] == "issued"
        assert oct(files[0].stat().st_mode & 0o777) == "0o600"
        rc, out, err = await curl_https(str(root), host, edge.tls.address[1])
        assert rc == 0, err
        got = json.loads(out)
        assert got["machine"] == web.id and got["headers"]["host"] == f"{host}:{edge.tls.address[1]}"
    # No challenge is left answerable once the orders are done.
    assert not edge.tls.http_tokens and not edge.tls.alpn_challenges
    # Renewal: once a certificate is in the last third of its life, a new one is ordered and served.
    from datetime import UTC, datetime

    from taxiway.platform.edgetls import read_pem_info

    before = files[0].read_bytes()
    not_after, lifetime = read_pem_info(files[0])
    edge.tls.certs.clock = lambda: not_after - lifetime / 4
    edge.tls.acme.wake()
    # (the clock goes back as soon as the order starts: under it, the new certificate would be due too)
    await until(lambda: edge.tls.acme.status["shop.example.com"]["state"] == "ordering", "renewal order")
    edge.tls.certs.clock = None
    await until(lambda: files[0].read_bytes() != before, "renewal", timeout=60)
    assert read_pem_info(files[0])[0] > datetime.now(UTC)
    await until(lambda: edge.tls.acme.status["shop.example.com"]["state"] == "issued", "renewed")
    rc, out, err = await curl_https(str(root), "shop.example.com", edge.tls.address[1])
    assert rc == 0 and json.loads(out)["machine"] == web.id, err
