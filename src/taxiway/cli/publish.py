"""``taxiway publish``: CSV, JSON or SQLite files to a live Datasette app."""

from __future__ import annotations

from pathlib import Path

import click


class _DefaultGroup(click.Group):
    """``publish FILE...`` runs the default command; ``publish ls`` / ``rm`` are subcommands."""

    default_cmd = "files"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default_cmd, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "FILE... [OPTIONS] | ls [--json] | rm NAME")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The options of `publish FILE...` are the default command's: show them, not only --help.
        files = self.commands[self.default_cmd]
        rows = [r for p in files.get_params(ctx) if isinstance(p, click.Option) and (r := p.get_help_record(ctx))]
        with formatter.section("Options"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)


def report(result, as_json: bool) -> None:
    """Print a publish result: the URL for people, everything with --json."""
    from taxiway.cli.output import emit_json

    if as_json:
        emit_json(result.to_json())
        return
    for line in result.table_lines():
        click.echo(line, err=True)
    click.echo(result.url)


_DELIMITER_NAMES = {"comma": ",", "semicolon": ";", "tab": "\t", "\\t": "\t", "pipe": "|", "space": " "}


def parse_delimiter(value: str | None) -> str | None:
    """``--delimiter``: one character, or comma, semicolon, tab (or \\t), pipe, space."""
    if value is None:
        return None
    d = _DELIMITER_NAMES.get(value.lower(), value)
    if len(d) != 1 or d in "\"\r\n":
        from taxiway.errors import InvalidInput

        raise InvalidInput(f"--delimiter {value!r} is not one character",
                           "give one character such as ';' or '|', or a name: comma, semicolon, tab, pipe")
    return d


def limit_options(f):
    """``--memory``, ``--cpus``, ``--pids``: the published app machine's limits (see publish.app.LIMIT_OPTIONS)."""
    from taxiway.publish.app import LIMIT_OPTIONS

    for flag, default, help_ in reversed(LIMIT_OPTIONS):
        f = click.option(flag, default=default, show_default=True, help=help_)(f)
    return f


@click.group(cls=_DefaultGroup, invoke_without_command=False)
def publish() -> None:
    """Publish CSV, TSV, JSON or SQLite files as a live Datasette app.

    \b
    taxiway publish airports.csv --install datasette-cluster-map
    taxiway publish ls
    taxiway publish rm airports
    """


@publish.command("files", hidden=True)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-n", "--name", help="App name (default: the first file's name).")
@click.option("--table", help="Table name for a single converted file (default: the file's name).")
@click.option("--install", multiple=True, help="Datasette plugin to install from PyPI (repeatable).")
@click.option("-m", "--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Datasette metadata file (JSON or YAML).")
@click.option("--title", help="Title shown on the app.")
@click.option("--source", help="Source of the data.")
@click.option("--source-url", help="URL of the source.")
@click.option("--license", "license_", help="License of the data.")
@click.option("--license-url", help="URL of the license.")
@click.option("--about", help="About text.")
@click.option("--about-url", help="About URL.")
@click.option("--fts", multiple=True, help="Column to index for full-text search (repeatable).")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of CSV/JSON files.")
@click.option("--delimiter", help="CSV field delimiter: one character or comma/semicolon/tab/pipe "
                                  "(default: detected from the first lines).")
@click.option("--secret", help="Secret that signs Datasette's cookies (default: one kept per app).")
@click.option("--max-field-size", default="16m", show_default=True,
              help="Largest CSV field read (a line may be 4 times it); larger ones are refused.")
@click.option("--port", type=int,
              help="Loopback port to serve on (default: kept from the last publish, or free).")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish_files(files, name, table, install, metadata, title, source, source_url, license_, license_url,
                  about, about_url, fts, encoding, delimiter, secret, max_field_size, port, memory, cpus, pids, as_json):
    """Publish FILES."""
    from taxiway.machines.config import parse_size
    from taxiway.publish.app import PublishSpec, load_metadata, parse_limits
    from taxiway.publish.deploy import publish as do_publish

    meta = load_metadata(metadata.read_text(), str(metadata)) if metadata else {}
    spec = PublishSpec(files=list(files), name=name, table=table, install=list(install), metadata=meta, title=title,
                       source=source, source_url=source_url, license=license_, license_url=license_url,
                       about=about, about_url=about_url, fts=list(fts), encoding=encoding,
                       delimiter=parse_delimiter(delimiter), port=port, max_field=parse_size(max_field_size), secret=secret,
                       **parse_limits(memory, cpus, pids))
    report(do_publish(spec), as_json)


@publish.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def publish_ls(as_json: bool) -> None:
    """List published apps."""
    from taxiway.cli.output import emit_json, table
    from taxiway.publish.deploy import list_apps

    apps = list_apps()
    if as_json:
        emit_json(apps)
    else:
        table(apps, ["name", "url", "state", "image", "published"])


@publish.command("rm")
@click.argument("name")
def publish_rm(name: str) -> None:
    """Stop and remove a published app."""
    from taxiway.publish.deploy import remove

    remove(name)
    click.echo(f"removed {name}")
