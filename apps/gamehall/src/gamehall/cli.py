"""The ``gamehall`` command: ``gamehall serve`` runs a node, ``gamehall bot`` plays."""

from __future__ import annotations

import logging
import os
import socket

import click


@click.group()
def main() -> None:
    """gamehall: turn-based multiplayer games over live server-rendered pages."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--redis",
    "redis_url",
    envvar="GAMEHALL_REDIS_URL",
    default=None,
    help="Redis URL shared by every node of a cluster (e.g. redis://127.0.0.1:6379/0). "
    "Without it the node runs alone with everything in memory.",
)
@click.option(
    "--node-id",
    envvar="GAMEHALL_NODE_ID",
    default=None,
    help="This node's name in the cluster (unique per node). Default: host name and port.",
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
@click.option("--log-level", default="warning", show_default=True)
@click.option(
    "--ws",
    "ws_impl",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "websockets", "websockets-sansio", "wsproto"]),
    help="uvicorn's websocket implementation.",
)
def serve(
    host, port, redis_url, node_id, owner_ttl, idle_seconds, bot_delay, log_level, ws_impl
) -> None:
    """Run a gamehall node (open http://HOST:PORT/ to play)."""
    import uvicorn

    from .app import create_app, tune_gc
    from .backends import MemoryBackend, RedisBackend
    from .hall import Hall
    from .room import Options

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    node = node_id or f"{socket.gethostname()}-{port}"

    def make_hall() -> Hall:
        backend = (
            RedisBackend(redis_url, node, owner_ttl=owner_ttl) if redis_url else MemoryBackend(node)
        )
        return Hall(backend, bot_delay=bot_delay, defaults=Options(idle_seconds=idle_seconds))

    click.echo(
        f"gamehall node {node} on http://{host}:{port}/ "
        f"({'cluster via ' + redis_url if redis_url else 'single node, in memory'})",
        err=True,
    )
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
