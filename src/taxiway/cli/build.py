"""`taxiway build`, `taxiway buildpacks`, `taxiway stack`: source to OCI image with buildpacks."""

from __future__ import annotations

import click


@click.command()
@click.argument("source", required=False, type=click.Path(file_okay=False))
@click.option("-t", "--tag", "tag", help="Name of the image in the local store (e.g. localhost:5000/app:1).")
@click.option("--push", is_flag=True, help="Push the image to its registry after building.")
@click.option("-b", "--buildpack", "buildpacks", multiple=True, metavar="PATH_OR_ID",
              help="Use these buildpacks, in order, instead of detecting (a folder or a bundled id).")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Build-time environment (the CNB platform env).")
@click.option("--no-cache", is_flag=True, help="Ignore the cache of earlier builds of this image.")
@click.option("--platform", default="linux/amd64", show_default=True, help="Target platform (only linux/amd64 stacks exist).")
@click.option("--run-image", help="Run image to build on, or to rebase onto (default: the stack's, by buildpack).")
@click.option("--rebase", "rebase_ref", metavar="REF", help="Swap REF's run image layers for --run-image's, without rebuilding.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True, metavar="SECONDS",
              help="Stop the whole build (every process it started) after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(source, tag, push, buildpacks, env, no_cache, platform, run_image, rebase_ref, timeout, as_json):
    """Build SOURCE (a folder) into an OCI image in the local store, with CNB buildpacks.

    \b
      taxiway build examples/python -t myapp
      taxiway build . -t localhost:5000/app:1 --push
      taxiway build --rebase myapp --run-image localhost/taxiway/run-python:bookworm
    """
    from taxiway.builder import lifecycle
    from taxiway.builder.env import check_name
    from taxiway.errors import InvalidInput
    from taxiway.oci.store import Store

    store = Store()
    if rebase_ref:
        if source:
            raise InvalidInput("--rebase takes no SOURCE folder", "run `taxiway build --rebase REF --run-image RUN_REF`")
        if not run_image:
            raise InvalidInput("--rebase needs --run-image", "name the run image to move the app onto")
        desc = lifecycle.rebase(store, rebase_ref, run_image, tag)
        name = tag or rebase_ref
        _done(name, desc.digest, as_json, push, store)
        return
    if not source:
        raise InvalidInput("missing SOURCE folder", "run `taxiway build DIR -t NAME`")
    if not tag:
        raise InvalidInput("missing -t/--tag", "name the image, e.g. -t myapp or -t localhost:5000/myapp:1")
    if platform != "linux/amd64":
        raise InvalidInput(f"no stack for platform {platform}", "only linux/amd64 stacks exist")
    envs = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidInput(f"--env {item!r} is not K=V", "pass --env NAME=value")
        envs[check_name(k, "--env")] = v
    opts = lifecycle.BuildOptions(source=source, tag=tag, buildpacks=list(buildpacks), env=envs,
                                  no_cache=no_cache, run_image=run_image, platform=platform, timeout=timeout)
    try:
        result = lifecycle.build(opts, store)
    except lifecycle.BuildFailed as e:
        for line in e.log_tail:
            click.echo(f"  | {line}", err=True)
        raise
    click.echo(f"[export] wrote {', '.join(result.written) or 'no new layer'}; reused {', '.join(result.reused) or 'none'}", err=True)
    _done(tag, result.descriptor.digest, as_json, push, store, extra={
        "buildpacks": [bp.id for bp in result.group], "processes": [p.type for p in result.processes],
        "written": result.written, "reused": result.reused})


def _done(name: str, digest: str, as_json: bool, push: bool, store, extra: dict | None = None) -> None:
    pushed = None
    if push:
        from taxiway.builder.publish import push_image

        pushed = push_image(store, name)
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json({"image": name, "digest": digest, **({"pushed": pushed} if pushed else {}), **(extra or {})})
    else:
        click.echo(f"{name}@{digest}")


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def buildpacks(ctx, as_json):
    """The bundled buildpacks (`taxiway buildpacks ls`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(buildpacks_ls, as_json=as_json)


@buildpacks.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def buildpacks_ls(as_json):
    """List the bundled buildpacks and what each detects, in detection order."""
    from taxiway.builder.buildpack import DEFAULT_ORDER, bundled

    bps = bundled()
    order = list(dict.fromkeys(i for group in DEFAULT_ORDER for i, _ in group))
    rows = [{"id": bp.id, "version": bp.version, "api": bp.api, "detects": bp.description}
            for bp in sorted(bps.values(), key=lambda b: order.index(b.id) if b.id in order else len(order))]
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json({"buildpacks": rows, "order": [[{"id": i, "optional": o} for i, o in g] for g in DEFAULT_ORDER]})
        return
    from taxiway.cli.output import table

    table(rows, ["id", "version", "api", "detects"])


@click.group()
def stack():
    """The build and run base images (Debian bookworm, made with mmdebstrap)."""


@stack.command("create")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def stack_create(names, as_json):
    """Build (or take from the cache) the stack images and put them in the local store.

    NAMES: build, run-base, run-python, run-node (default: all).
    """
    from taxiway.builder import stack as st
    from taxiway.errors import InvalidInput
    from taxiway.oci.store import Store

    for n in names:
        if n not in st.RECIPES:
            raise InvalidInput(f"no stack image {n!r}", f"pick from: {', '.join(st.RECIPES)}")
    made = st.ensure_stacks(Store(), tuple(names) or None)
    rows = [{"name": n, "image": st.RECIPES[n].ref, "digest": d.digest, "packages": " ".join(st.RECIPES[n].packages)}
            for n, d in made.items()]
    if as_json:
        from taxiway.cli.output import emit_json

        emit_json(rows)
        return
    from taxiway.cli.output import table

    table(rows, ["image", "digest", "packages"])


@stack.command("ls")
def stack_ls():
    """The stack recipes and where their cache is."""
    from taxiway.builder import stack as st
    from taxiway.cli.output import table

    table([{"name": r.name, "image": r.ref, "packages": " ".join(r.packages), "key": r.key()} for r in st.RECIPES.values()],
          ["name", "image", "packages", "key"])
    click.echo(f"cache: {st.cache_root()}", err=True)
