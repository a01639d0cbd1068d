"""``taxiway run``, ``taxiway machines ...`` and ``taxiway snapshots ...``.

Kept light: ``taxiway run`` imports only the machines runtime (no httpx or
rich unless the image has to be pulled first).
"""

from __future__ import annotations

import sys

import click


def _run_command() -> click.Command:
    """``taxiway run`` as a click command, built from the option table in ``taxiway.cli.run``."""
    from taxiway.cli.run import OPTIONS, run_command

    params: list[click.Parameter] = []
    for o in OPTIONS:
        decls = [*o.flags, o.dest]
        if o.kind == "flag":
            params.append(click.Option(decls, is_flag=True, help=o.help))
        elif o.kind == "multiple":
            params.append(click.Option(decls, multiple=True, help=o.help))
        else:
            typ = click.Choice(list(o.choices)) if o.choices else o.type
            params.append(click.Option(decls, type=typ, default=o.default, show_default=o.default is not None,
                                       help=o.help))
    params += [click.Argument(["image"]), click.Argument(["command"], nargs=-1, type=click.UNPROCESSED)]
    return click.Command("run", callback=run_command, params=params, help=run_command.__doc__,
                         context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]})


run = _run_command()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def machines():
    """List and manage machines."""


def _row(m) -> dict:
    import time

    st = m.status()
    if st == "exited":
        status = f"exited ({m.exit_code}{', ' + m.reason if m.reason and m.reason != 'exited' else ''})"
    else:
        status = st
    return {"id": m.id, "name": m.name, "image": m.config.image, "command": " ".join(m.command)[:40],
            "status": status, "runtime": m.runtime if m.runtime == "namespace" else f"vm/{m.accel or '?'}",
            "ports": ", ".join(f"{p.host}:{p.host_port}->{p.port}" for p in m.config.ports),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))}


@machines.command("ls")
@click.option("-a", "--all", "all_", is_flag=True, help="Include machines that are not running.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
def ls(all_, as_json, quiet):
    """List machines (running ones, or all with -a)."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    runtime.gc()
    ms = [m for m in S.all_machines() if all_ or m.status() in ("running", "starting", "stopping")]
    if quiet:
        for m in ms:
            click.echo(m.id)
        return
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json([dict(m.to_json(), state=m.status()) for m in ms])
        return
    from taxiway.cli.output import table

    table([_row(m) for m in ms], ["id", "name", "image", "command", "status", "runtime", "ports", "created"])


@machines.command()
@click.argument("machine")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the machine exits.")
@click.option("-t", "--timestamps", is_flag=True, help="Show each line's time.")
@click.option("-n", "--tail", type=click.IntRange(min=0), help="Only the last N lines (then new ones with -f).")
def logs(machine, follow, timestamps, tail):
    """Print a machine's output (the log keeps the last 16-32 MiB: it rotates once)."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    runtime.read_logs(S.find(machine), timestamps=timestamps, follow=follow, tail=tail)


@machines.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-s", "--signal", "sig", help="Signal to send first (default: the machine's stop signal).")
@click.option("-t", "--timeout", type=float, help="Seconds to wait before SIGKILL.")
def stop(names, sig, timeout):
    """Stop machines: signal, wait, then SIGKILL. Restart policies do not bring them back."""
    from taxiway.machines import config as C
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    signum = C.parse_signal(sig) if sig else None
    for n in names:
        m = runtime.stop(S.find(n), signum, timeout)
        click.echo(m.name)


@machines.command()
@click.argument("names", nargs=-1, required=True)
def start(names):
    """Start stopped machines again (in the background)."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    for n in names:
        m = S.find(n)
        runtime.start(m)
        click.echo(m.name)


@machines.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill running machines first.")
def rm(names, force):
    """Remove machines and their writable layers."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    for n in names:
        m = S.find(n)
        runtime.destroy(m, force=force)
        click.echo(m.name)


@machines.command()
def prune():
    """Remove every machine that is not running (exited, failed or never started)."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    runtime.gc()
    for m in S.all_machines():
        if m.status() in ("exited", "failed", "created"):
            runtime.destroy(m)
            click.echo(m.name)


@machines.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True,
              help="Keep stdin connected (namespace machines: it always is; micro-VMs: only with -i).")
@click.option("-t", "--tty", is_flag=True,
              help="Micro-VMs: a terminal in the guest (your terminal goes raw). Namespace machines share yours.")
@click.argument("machine")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive, tty, machine, command):
    """Run COMMAND inside a running machine (its env, user and workdir); exits with its code."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    sys.exit(runtime.exec_in(S.find(machine), list(command), tty, interactive))


@machines.command()
@click.argument("names", nargs=-1, required=True)
def inspect(names):
    """Print machines' records as JSON (config, state, pids, exit code and reason)."""
    from taxiway.cli.output import emit_json
    from taxiway.machines import state as S

    out = []
    for n in names:
        m = S.find(n)
        out.append(dict(m.to_json(), state=m.status(), events=m.events()[-20:]))
    emit_json(out)


@machines.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--timeout", type=float, help="Give up after this many seconds.")
def wait(names, timeout):
    """Wait for machines to exit; print each exit code (exit with the last)."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    code = 0
    for n in names:
        m = runtime.wait(S.find(n), timeout)
        code = m.exit_code if m.exit_code is not None else 0
        click.echo(code)
    sys.exit(code if code < 256 else 1)


@machines.command()
@click.argument("machine")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def events(machine, as_json):
    """A machine's state changes (created, running, exited, restart...)."""
    import json
    import time

    from taxiway.machines import state as S

    for ev in S.find(machine).events():
        if as_json:
            click.echo(json.dumps(ev))
        else:
            extra = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("time", "machine", "type", "state"))
            click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ev['time']))}Z {ev['type']} {extra}".rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def snapshots():
    """The unpacked-layer cache (one directory per layer chain ID)."""


@snapshots.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def snapshots_ls(as_json):
    """List unpacked layers with their size, leases and whether a stored image needs them."""
    from taxiway.machines import runtime
    from taxiway.machines.snapshots import Snapshotter

    runtime.gc()
    rows = Snapshotter().list()
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json([vars(r) for r in rows])
        return
    from taxiway.cli.output import table

    table([{"chain_id": r.chain_id[:19], "size": _human(r.size), "leases": len(r.leases),
            "image": "yes" if r.in_image else "no"} for r in rows], ["chain_id", "size", "leases", "image"])


@snapshots.command("prune")
@click.option("-a", "--all", "all_", is_flag=True, help="Also remove layers of stored images that no machine uses.")
def snapshots_prune(all_):
    """Remove unpacked layers that no machine holds a lease on (and no stored image needs)."""
    from taxiway.machines import runtime
    from taxiway.machines.snapshots import Snapshotter

    runtime.gc()
    gone = Snapshotter().prune(all_unused=all_)
    total = sum(s.size for s in gone)
    click.echo(f"removed {len(gone)} snapshot(s), {_human(total)}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
