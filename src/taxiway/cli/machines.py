"""``taxiway run``, ``taxiway machines ...`` and ``taxiway snapshots ...``.

Kept light: ``taxiway run`` imports only the machines runtime (no httpx or
rich unless the image has to be pulled first).
"""

from __future__ import annotations

import os
import sys

import click


def _progress():
    from taxiway.cli.output import is_tty

    if not is_tty():
        return None
    return None  # pull() draws its own bar on a terminal when given none


@click.command(context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the machine ID.")
@click.option("--name", help="Name the machine (default: a generated name).")
@click.option("-e", "--env", "env", multiple=True, help="Set an environment variable (K=V, or K to copy ours).")
@click.option("--env-file", multiple=True, help="Read K=V lines from a file.")
@click.option("-w", "--workdir", help="Working directory inside the machine.")
@click.option("-u", "--user", help="user[:group], names from the image's /etc/passwd and /etc/group, or ids.")
@click.option("--hostname", help="The machine's hostname (default: its ID).")
@click.option("--entrypoint", help="Replace the image's Entrypoint (an empty string clears it).")
@click.option("-m", "--memory", help="Memory limit, e.g. 64m or 1g (at least 6m).")
@click.option("--cpus", type=float, help="CPU limit, e.g. 0.5 or 2.")
@click.option("--pids-limit", type=int, help="Maximum number of tasks (stops fork bombs).")
@click.option("--restart", default="no", show_default=True, help="no, on-failure[:N] or always.")
@click.option("-v", "--volume", "volumes", multiple=True, help="Bind-mount HOSTDIR:DIR[:ro].")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the machine when it exits.")
@click.option("--net", default="private", show_default=True, type=click.Choice(["none", "host", "private"]),
              help="private: its own network namespace with loopback; host: the host's; none: loopback only, no ports.")
@click.option("-p", "--publish", "ports", multiple=True, help="Forward 127.0.0.1:HOSTPORT to the machine's PORT (HOSTPORT:PORT).")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin connected.")
@click.option("-t", "--tty", is_flag=True, help="Give the machine a terminal.")
@click.option("--isolation", default="namespace", show_default=True, type=click.Choice(["namespace", "vm"]),
              help="namespace: Linux namespaces and cgroups; vm: a QEMU micro-VM (KVM when it works, else TCG).")
@click.option("--vm-accel", default="auto", show_default=True, type=click.Choice(["auto", "kvm", "tcg"]),
              help="For --isolation vm: kvm fails when KVM is unusable; auto falls back to TCG and says so.")
@click.option("--stop-signal", help="Signal for `machines stop` (default: the image's StopSignal or SIGTERM).")
@click.option("--stop-timeout", type=float, default=10.0, show_default=True, help="Seconds before SIGKILL on stop.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(detach, name, env, env_file, workdir, user, hostname, entrypoint, memory, cpus, pids_limit, restart,
        volumes, auto_remove, net, ports, interactive, tty, isolation, vm_accel, stop_signal, stop_timeout,
        image, command):
    """Run IMAGE as an isolated machine: its Entrypoint + Cmd, or COMMAND instead of Cmd."""
    if isolation == "namespace" and not detach and os.geteuid() == 0:
        from taxiway.machines.cgroups import prime_attach

        prime_attach()  # the kernel's first cgroup move of a start waits ~15 ms: let that pass during imports
    from taxiway.errors import InvalidInput
    from taxiway.machines import config as C
    from taxiway.machines import runtime

    if pids_limit is not None and pids_limit < 1:
        raise InvalidInput(f"invalid --pids-limit {pids_limit}", "use a positive number of tasks")
    if cpus is not None and cpus <= 0:
        raise InvalidInput(f"invalid --cpus {cpus}", "use a positive number, e.g. 0.5")
    cfg = C.MachineConfig(
        image=image, cmd=list(command) or None,
        entrypoint=None if entrypoint is None else ([entrypoint] if entrypoint else []),
        env=C.parse_env(list(env), list(env_file)), workdir=workdir, user=user, hostname=hostname,
        guest=C.Guest(C.parse_memory(memory) if memory else None, cpus, pids_limit),
        ports=[C.parse_port(p) for p in ports], mounts=[C.parse_volume(v) for v in volumes],
        restart=C.parse_restart(restart), net=net, isolation=isolation, auto_remove=auto_remove,
        tty=tty, interactive=interactive, stop_signal=stop_signal, stop_timeout=stop_timeout, vm_accel=vm_accel)
    if auto_remove and cfg.restart.policy != "no":
        raise InvalidInput("--rm and --restart cannot be combined", "drop one of them")
    if stop_signal:
        C.parse_signal(stop_signal)
    m = runtime.create(cfg, name, _progress())
    if m.runtime == "vm" and m.accel == "tcg" and vm_accel == "auto":
        click.echo("note: KVM is not usable on this host (nested virtualization?); "
                   "this micro-VM runs under QEMU TCG emulation, so it boots in seconds, not milliseconds", err=True)
    if detach:
        runtime.start_detached(m)
        click.echo(m.id)
        return
    code = runtime.run_attached(m)
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # a real process (not click's CliRunner): skip interpreter teardown (~10 ms of freeing modules)
        sys.stdout.fileno()
        sys.stderr.fileno()
    except Exception:  # noqa: BLE001
        sys.exit(code)
    os._exit(code)


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

    table([_row(m) for m in ms], ["id", "name", "image", "command", "status", "runtime", "created"])


@machines.command()
@click.argument("machine")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the machine exits.")
@click.option("-t", "--timestamps", is_flag=True, help="Show each line's time.")
def logs(machine, follow, timestamps):
    """Print a machine's output."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    runtime.read_logs(S.find(machine), timestamps=timestamps, follow=follow)


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


@machines.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin connected (it always is).")
@click.option("-t", "--tty", is_flag=True, help="Accepted for familiarity; exec shares your terminal.")
@click.argument("machine")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive, tty, machine, command):
    """Run COMMAND inside a running machine."""
    from taxiway.machines import runtime
    from taxiway.machines import state as S

    sys.exit(runtime.exec_in(S.find(machine), list(command), tty))


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
