"""``datasette publish taxiway``: Datasette's own publish command, deploying with taxiway.

Registered through the ``datasette`` entry point group in pyproject.toml, so
``datasette publish --help`` lists ``taxiway`` beside cloudrun and heroku.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from datasette import hookimpl
from datasette.publish.common import add_common_publish_arguments_and_options

from taxiway.publish.app import LIMIT_OPTIONS

# Not taxiway.cli: a plugin loaded inside Datasette's process speaks the publish API only.


def _limit_options(f):
    for flag, default, help_ in reversed(LIMIT_OPTIONS):
        f = click.option(flag, default=default, show_default=True, help=help_)(f)
    return f


@hookimpl
def publish_subcommand(publish):
    @publish.command(name="taxiway")
    @add_common_publish_arguments_and_options
    @click.option("-n", "--name", help="App name (default: the first file's name)")
    @click.option("--port", type=int, help="Loopback port to serve on (default: a stable free port)")
    @_limit_options
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
    def taxiway(files, metadata, extra_options, branch, template_dir, plugins_dir, static, install, plugin_secret,
                version_note, secret, title, license, license_url, source, source_url, about, about_url, name,
                port, memory, cpus, pids, as_json):
        """Publish databases to a Datasette app run by taxiway on this machine."""
        from taxiway.errors import TaxiwayError
        from taxiway.publish.app import PublishSpec, load_metadata, parse_limits
        from taxiway.publish.deploy import publish as do_publish

        if branch:
            raise click.ClickException("--branch is not supported: taxiway installs Datasette from PyPI")
        try:
            meta = load_metadata(metadata.read(), metadata.name) if metadata else {}
            spec = PublishSpec(
                files=[Path(f) for f in files], name=name, install=list(install), metadata=meta, title=title,
                license=license, license_url=license_url, source=source, source_url=source_url, about=about,
                about_url=about_url, plugin_secrets=list(plugin_secret), static=list(static),
                version_note=version_note, extra_options=extra_options,
                template_dir=Path(template_dir) if template_dir else None,
                plugins_dir=Path(plugins_dir) if plugins_dir else None, port=port, secret=secret,
                **parse_limits(memory, cpus, pids),
            )
            result = do_publish(spec)
        except TaxiwayError as e:
            raise click.ClickException(str(e)) from None
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2))
            return
        for line in result.table_lines():
            click.echo(line, err=True)
        click.echo(result.url)
