"""The ``gamehall`` command: ``gamehall serve`` runs a node, ``gamehall bot`` plays."""

from __future__ import annotations

import logging
import os
import socket
import time

import click


@click.group()
def main() -> None:
    """gamehall: turn-based multiplayer games over live server-rendered pages."""


_pem_dir: list[str] = []


def _pem_file(value: str | None, option: str) -> str | None:
    """A TLS file option as a path: PEM text (a secret in the environment, as on Fly) is
    written to a private file (0600 in a 0700 directory, removed at exit)."""
    if not value:
        return None
    if value.lstrip().startswith("-----BEGIN"):
        import atexit
        import shutil
        import tempfile

        if not _pem_dir:
            _pem_dir.append(tempfile.mkdtemp(prefix="gamehall-tls-"))
            atexit.register(shutil.rmtree, _pem_dir[0], True)
        path = os.path.join(_pem_dir[0], option.strip("-") + ".pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value.strip() + "\n")
        return path
    if not os.path.isfile(value):
        raise click.UsageError(
            f"{option}: {value!r} is neither a file nor PEM text; give the path of a PEM file"
        )
    return value


def _app_name(dns_name: str) -> str:
    return dns_name.split(".", 1)[0] or "gamehall"


def _own_address(host: str, answer: list[str]) -> str | None:
    """Which address of the DNS answer is this node's: the one it listens on, else one of
    this host's own addresses (libcluster names nodes app@ip the same way)."""
    from .discovery import local_addresses

    if host in answer:
        return host
    mine = local_addresses() & set(answer)
    return min(mine) if mine else None


@main.command()
@click.option(
    "--host",
    envvar="GAMEHALL_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (:: for every address, as on a taxiway machine).",
)
@click.option(
    "--port", envvar="PORT", default=8080, show_default=True, type=int, help="Port to listen on."
)
@click.option(
    "--redis",
    "redis_url",
    envvar="GAMEHALL_REDIS_URL",
    default=None,
    help="Redis URL shared by every node of a cluster (e.g. redis://127.0.0.1:6379/0, or "
    "rediss://redis.internal:6380/0 for TLS). Without it the node runs alone with everything "
    "in memory.",
)
@click.option(
    "--redis-ca",
    envvar="GAMEHALL_REDIS_CA",
    help="CA certificate(s) that signed Redis's certificate, a file or the PEM text itself "
    "(as a secret is); rediss:// only; default: the system's trust store.",
)
@click.option(
    "--redis-cert",
    envvar="GAMEHALL_REDIS_CERT",
    help="Client certificate (chain) to present to Redis (tls-auth-clients yes): file or PEM.",
)
@click.option(
    "--redis-key",
    envvar="GAMEHALL_REDIS_KEY",
    help="The client certificate's private key: file or PEM.",
)
@click.option(
    "--node-id",
    envvar="GAMEHALL_NODE_ID",
    default=None,
    help="This node's name in the cluster (unique per node). Default: APP@ADDRESS with DNS "
    "discovery, else host name and port.",
)
@click.option(
    "--dns-name",
    envvar="GAMEHALL_DNS_NAME",
    default=None,
    help="Find the other nodes through this name's DNS records (e.g. gamehall.internal), "
    "as libcluster's DNS strategy does.",
)
@click.option(
    "--dns-server",
    envvar="GAMEHALL_DNS_SERVER",
    default=None,
    help="DNS server to ask, ADDRESS or ADDRESS:PORT ([::1]:5353). Default: the first "
    "nameserver in /etc/resolv.conf.",
)
@click.option(
    "--dns-interval",
    envvar="GAMEHALL_DNS_INTERVAL",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.2, 3600),
    help="Seconds between DNS polls.",
)
@click.option(
    "--dns-record",
    envvar="GAMEHALL_DNS_RECORD",
    default="AAAA",
    show_default=True,
    type=click.Choice(["AAAA", "A"]),
    help="Record type that lists the nodes.",
)
@click.option(
    "--owner-ttl",
    default=10,
    show_default=True,
    type=int,
    help="Seconds before another node may take over the games of a node that stopped.",
)
@click.option(
    "--idle-seconds",
    default=900,
    show_default=True,
    type=int,
    help="Close a game after this long with no command.",
)
@click.option(
    "--bot-delay",
    default=0.4,
    show_default=True,
    type=float,
    help="Seconds a bot seat waits before moving.",
)
@click.option("--log-level", envvar="GAMEHALL_LOG_LEVEL", default="warning", show_default=True)
@click.option(
    "--ws",
    "ws_impl",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "websockets", "websockets-sansio", "wsproto"]),
    help="uvicorn's websocket implementation.",
)
def serve(
    host,
    port,
    redis_url,
    redis_ca,
    redis_cert,
    redis_key,
    node_id,
    dns_name,
    dns_server,
    dns_interval,
    dns_record,
    owner_ttl,
    idle_seconds,
    bot_delay,
    log_level,
    ws_impl,
) -> None:
    """Run a gamehall node (open http://HOST:PORT/ to play)."""
    import asyncio
    from urllib.parse import urlparse

    import uvicorn

    from . import discovery
    from .app import create_app, tune_gc
    from .backends import MemoryBackend, RedisBackend
    from .hall import Hall
    from .resp import TLSFiles
    from .room import Options

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    tls = None
    if redis_ca or redis_cert or redis_key:
        if not redis_url or urlparse(redis_url).scheme != "rediss":
            raise click.UsageError(
                "--redis-ca/--redis-cert/--redis-key are for TLS: give a rediss:// URL "
                "(e.g. rediss://redis.internal:6380/0)"
            )
        if bool(redis_cert) != bool(redis_key):
            raise click.UsageError("a client certificate needs its key: give both --redis-cert "
                                   "and --redis-key")
        tls = TLSFiles(
            _pem_file(redis_ca, "--redis-ca"),
            _pem_file(redis_cert, "--redis-cert"),
            _pem_file(redis_key, "--redis-key"),
        )
        try:
            tls.context()
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise click.UsageError(f"cannot use the Redis TLS files: {e}; check "
                                   "GAMEHALL_REDIS_CA/CERT/KEY") from None

    server = None
    if dns_name:
        raw = dns_server
        if raw is None:
            try:
                with open("/etc/resolv.conf") as f:
                    raw = discovery.nameserver(f.read())
            except OSError:
                raw = None
            if raw is None:
                raise click.UsageError("no DNS server to ask: give --dns-server ADDRESS[:PORT]")
        try:
            server = discovery.parse_server(raw)
        except ValueError as e:
            raise click.UsageError(
                f"--dns-server {raw!r} is not ADDRESS or ADDRESS:PORT ({e})"
            ) from None
        if node_id is None:
            # Name this node app@address, so the others know it is gone once DNS drops it.
            # Its record may lag its start by a moment: ask a few times.
            addr = None
            for attempt in range(10):
                try:
                    answer = asyncio.run(discovery.resolve(dns_name, server, dns_record))
                except discovery.DiscoveryError as e:
                    answer = []
                    if attempt == 9:
                        click.echo(f"warning: discovery: {e}", err=True)
                addr = _own_address(host, answer)
                if addr:
                    break
                time.sleep(0.5)
            if addr:
                node_id = f"{_app_name(dns_name)}@{addr}"
            else:
                click.echo(
                    f"warning: none of {dns_name}'s addresses is this node's; "
                    "naming it by host name and port",
                    err=True,
                )
    node = node_id or f"{socket.gethostname()}-{port}"

    def make_hall() -> Hall:
        backend = (
            RedisBackend(redis_url, node, owner_ttl=owner_ttl, tls=tls)
            if redis_url
            else MemoryBackend(node)
        )
        peers = (
            discovery.Poller(dns_name, server, dns_interval, dns_record)
            if dns_name and server
            else None
        )
        return Hall(
            backend,
            bot_delay=bot_delay,
            defaults=Options(idle_seconds=idle_seconds),
            peers=peers,
        )

    where = "single node, in memory"
    if redis_url:
        u = urlparse(redis_url)
        where = f"cluster via {u.scheme}://{u.hostname}:{u.port or 6379}"  # no password shown
        if tls and tls.cert:
            where += " with a client certificate"
    if dns_name:
        where += f", nodes from DNS {dns_name} {dns_record}"
    click.echo(f"gamehall node {node} on http://{host}:{port}/ ({where})", err=True)
    app = create_app(make_hall)
    tune_gc()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=64 * 1024,
        ws=ws_impl,
        lifespan="on",
        timeout_graceful_shutdown=3,
    )


@main.command()
@click.argument("url")
@click.option("--game", default="tictactoe", show_default=True)
@click.option(
    "--games", default=1, show_default=True, type=int, help="How many games to play at once."
)
def bot(url, game, games) -> None:
    """Play GAMES games against itself on the node at URL (http://127.0.0.1:8080) with random moves."""
    import asyncio

    from .bot import play_pair

    async def run() -> None:
        results = await asyncio.gather(*(play_pair(url, game) for _ in range(games)))
        for r in results:
            click.echo(f"{r['code']}: {r['moves']} moves, {r['message']}")

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
