"""The ``gamehall`` command."""

import click


@click.group()
def main() -> None:
    """gamehall: turn-based multiplayer games over live server-rendered pages."""
