"""Entry point of the ``taxiway`` command, and the one place for start-up speed tricks.

Subcommands are loaded lazily from the table below so that ``taxiway --help``
and ``taxiway run`` do not import every part (and its heavy dependencies).
Each part owns one module in ``taxiway.cli``; add a row here to expose it.

The parts themselves stay plain Python (imported by the platform, tests and
users' code); what makes a *command* start and end fast lives here, each trick
with the measurement that justifies it:

- lazy subcommands (above): ``taxiway --help`` imports click and nothing else heavy;
- ``taxiway run`` skips click on an ordinary command line (:func:`main`);
- httpx's own command-line tool is never imported (:func:`_skip_httpx_cli`);
- commands that end with nothing left to clean up skip interpreter teardown (:func:`exit_now`).

And one that is *not* played: the parts take ``TYPE_CHECKING`` from ``typing`` like any Python
code (one convention, checked by tests/machines/test_structure.py), though ``typing`` is the one
module a warm ``taxiway run`` would not need otherwise. Measured 2026-12-03 20:04 UTC on an idle
host (bench/run_ab.py, 30 interleaved rounds, with vs without it, the cgroup primer's
``threading`` import included): wall median 89 vs 77 ms, CPU 76 vs 69 ms; still 0.21x podman and
2.19x runc (bench/RESULTS.md). ``taxiway --help`` imports click, which imports ``typing`` anyway.
If those ~10 ms ever matter more than one convention, the constant form (``TYPE_CHECKING = False``,
read by type checkers alike) is the way back, applied everywhere.
"""

from __future__ import annotations

import os
import sys


def _skip_httpx_cli() -> None:
    """Make ``import httpx`` skip httpx's optional command-line tool.

    httpx's ``__init__`` imports ``httpx._main`` (click, rich, pygments) and falls back
    to a stub when that import fails; taxiway never runs httpx's CLI. Measured
    2026-12-03 on this host (CPU time of ``python -c 'import httpx'``, median of 10
    alternated runs, load ~10): 268 ms with httpx's CLI, 172 ms without (``pass``: 19 ms);
    bench/RESULTS.md has ~33 ms on a quiet host. Every pull, push and login paid it.
    Only for this process's command line: the Python API imports httpx as anyone would.
    """
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def exit_now(code: int = 0, command: str = "") -> None:
    """End this process with ``code`` at once, skipping the interpreter's teardown.

    Freeing click's, httpx's or cryptography's modules costs 10-20 ms per process, and
    the benchmarks compare commands with Go and C tools (mkcert, skopeo, umoci, runc).
    Only when this process was started to run ``taxiway COMMAND`` (the installed script
    or ``python -m taxiway``, real stdout/stderr, no TAXIWAY_DEBUG): never inside a
    caller's process such as a test runner's. Otherwise a non-zero code exits normally
    and zero returns. Everything must be written, flushed and closed before the call.
    """
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    own = argv0 in ("taxiway", "__main__.py") and (not command or command in sys.argv[1:])
    if own and not os.environ.get("TAXIWAY_DEBUG"):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout.fileno()
            sys.stderr.fileno()
        except Exception:  # noqa: BLE001 - replaced streams (click's CliRunner): not our own process
            own = False
        if own:
            os._exit(code)
    if code:
        sys.exit(code)

# name -> (module:attribute, one-line help shown by --help without importing)
COMMANDS: dict[str, tuple[str, str]] = {
    "pull": ("taxiway.cli.images:pull", "Pull an image from a registry into the local store."),
    "push": ("taxiway.cli.images:push", "Push an image from the local store to a registry."),
    "tag": ("taxiway.cli.images:tag", "Give an image in the store another name."),
    "login": ("taxiway.cli.images:login", "Check and save credentials for a registry."),
    "logout": ("taxiway.cli.images:logout", "Forget credentials for a registry."),
    "images": ("taxiway.cli.images:images", "List images in the local store."),
    "image": ("taxiway.cli.images:image", "Inspect, export, scan, remove, load and save images."),
    "run": ("taxiway.cli.machines:run", "Run an image as an isolated machine."),
    "machines": ("taxiway.cli.machines:machines", "List and manage machines."),
    "snapshots": ("taxiway.cli.machines:snapshots", "List and prune the unpacked-layer cache."),
    "registry": ("taxiway.cli.registry:registry", "Serve a multi-tenant OCI registry; manage orgs and tokens."),
    "build": ("taxiway.cli.build:build", "Build an OCI image from source with buildpacks."),
    "buildpacks": ("taxiway.cli.build:buildpacks", "List the bundled buildpacks."),
    "stack": ("taxiway.cli.build:stack", "Create the build and run base images."),
    "ca": ("taxiway.cli.pki:ca", "The certificate authority: init, issue, renew, revoke."),
    "egress": ("taxiway.cli.egress:egress", "The SSRF-safe egress proxy."),
    "publish": ("taxiway.cli.publish:publish", "Publish CSV or SQLite files as a live Datasette app."),
    # the platform (issue #16): taxiway.cli.platform (P1) and taxiway.cli.deploy (P3)
    "up": ("taxiway.cli.platform:up", "Start the platform on this machine (-d: in the background)."),
    "down": ("taxiway.cli.platform:down", "Stop the platform (machines keep running)."),
    "platform": ("taxiway.cli.platform:platform", "The local platform's components and their state."),
    "status": ("taxiway.cli.platform:status", "Show an app's machines, release and checks."),
    "apps": ("taxiway.cli.platform:apps", "List, create and destroy apps."),
    "machine": ("taxiway.cli.platform:machine", "An app's machines on the platform: ls, start, stop, exec..."),
    "volumes": ("taxiway.cli.platform:volumes", "An app's volumes: create, ls, destroy."),
    "open": ("taxiway.cli.platform:open_", "Print the app's URL."),
    "certs": ("taxiway.cli.certs:certs", "An app's custom hostnames and their TLS certificates (CA or ACME)."),
    "launch": ("taxiway.cli.deploy:launch", "Detect the app, write taxiway.toml, create it, deploy."),
    "deploy": ("taxiway.cli.deploy:deploy", "Build, push and roll out a new release."),
    "releases": ("taxiway.cli.deploy:releases", "List an app's releases."),
    "scale": ("taxiway.cli.deploy:scale", "Scale an app's machines (count, memory)."),
    "secrets": ("taxiway.cli.deploy:secrets", "Set, list and unset an app's secrets."),
    "logs": ("taxiway.cli.deploy:logs", "Show (or follow) an app's logs."),
}


def _available(name: str) -> bool:
    import importlib.util

    module = COMMANDS[name][0].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


_CLI = None


def _cli():  # noqa: ANN202 - a click.Group; click is imported only when the CLI needs it
    """The click group (built on first use: ``taxiway run`` usually never needs click at all)."""
    global _CLI
    if _CLI is not None:
        return _CLI
    import importlib

    import click

    class LazyGroup(click.Group):
        """A click group whose subcommands are imported only when invoked."""

        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(n for n in COMMANDS if _available(n))

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            if name not in COMMANDS or not _available(name):
                return None
            target, _ = COMMANDS[name]
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)

        def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
            if rows:
                with formatter.section("Commands"):
                    formatter.write_dl(rows)

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="taxiway", prog_name="taxiway")
    @click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
    @click.pass_context
    def cli(ctx: click.Context, debug: bool) -> None:
        """taxiway: build, store and run apps on your own machines, without Docker."""
        if debug:
            os.environ["TAXIWAY_DEBUG"] = "1"

    _CLI = cli
    return cli


def __getattr__(name: str):  # noqa: ANN202
    if name == "cli":  # ``from taxiway.cli.main import cli`` (tests, CliRunner)
        return _cli()
    raise AttributeError(name)


def _guarded(call) -> None:  # noqa: ANN001
    """Run ``call()``, turning TaxiwayError into one line on stderr and its exit code (both CLI paths)."""
    from taxiway.errors import TaxiwayError

    try:
        call()
    except TaxiwayError as e:
        if os.environ.get("TAXIWAY_DEBUG"):
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)


def _click_main(argv: list[str] | None) -> None:
    import click

    try:
        _cli().main(args=argv, prog_name="taxiway", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. ``taxiway run`` with an ordinary command line skips click (see taxiway.cli.run)."""
    args = sys.argv[1:] if argv is None else argv
    _skip_httpx_cli()
    # The click-free parser of `taxiway run` (its options are one table, taxiway.cli.run.OPTIONS,
    # that the click command is made from too; a hypothesis test checks both parse alike). Measured
    # when it was added (hyperfine, 40 runs, bench/RESULTS.md): a warm `taxiway run --rm IMG true`
    # took 51 ms against 73-80 ms through click; importing click alone costs 15-30 ms here.
    if args and args[0] == "run":
        from taxiway.cli import run as R

        kw = R.parse(args[1:])
        if kw is not None:
            _guarded(lambda: R.run_command(**kw))
            return
    _guarded(lambda: _click_main(argv))


if __name__ == "__main__":
    main()
