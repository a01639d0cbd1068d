"""The scenario users run: redis-server with TLS, then mutual TLS, from `taxiway ca issue`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.servers import free_port, serve

REDIS = "/usr/bin/redis-server"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "taxiway", *args]


def redis_cli(port: int, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *tls, "PING"],
                          capture_output=True, text=True, timeout=20)


def redis_server(tmp: Path, port: int, cert: Path, key: Path, ca: Path, auth_clients: str):
    argv = [REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", auth_clients, "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    return serve(argv, port, log=tmp / f"redis-{auth_clients}.log")


def test_redis_tls_then_mutual_tls(ca_dir, tmp_path):
    run = lambda *a: subprocess.run(cli(*a), cwd=tmp_path, capture_output=True, text=True, check=True)  # noqa: E731
    run("ca", "init")
    run("ca", "issue", "localhost", "127.0.0.1", "--cert-file", "redis.pem", "--key-file", "redis-key.pem")
    run("ca", "issue", "--client", "--cn", "app-worker", "--cert-file", "client.pem", "--key-file", "client-key.pem")
    root = run("ca", "root").stdout.strip() + "/root.pem"
    cert, key = tmp_path / "redis.pem", tmp_path / "redis-key.pem"
    client = ["--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client-key.pem")]

    port = free_port()
    with redis_server(tmp_path, port, cert, key, Path(root), "no"):
        r = redis_cli(port, "--tls", "--cacert", root)
        assert r.stdout.strip() == "PONG", (r.stdout, r.stderr)
        r = redis_cli(port)  # plain text to a TLS port
        assert "PONG" not in r.stdout
        r = redis_cli(port, "--tls", "--cacert", "/etc/ssl/certs/ca-certificates.crt")  # a CA that is not ours
        assert "PONG" not in r.stdout and "certificate verify failed" in r.stdout + r.stderr

    port = free_port()
    with redis_server(tmp_path, port, cert, key, Path(root), "yes"):
        r = redis_cli(port, "--tls", "--cacert", root)
        assert "PONG" not in r.stdout, "a client without a certificate got in"
        r = redis_cli(port, "--tls", "--cacert", root, *client)
        assert r.stdout.strip() == "PONG", (r.stdout, r.stderr)
        # a server certificate is not a client certificate (no clientAuth EKU)
        r = redis_cli(port, "--tls", "--cacert", root, "--cert", str(cert), "--key", str(key))
        assert "PONG" not in r.stdout
