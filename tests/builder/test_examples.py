"""Each sample app under examples/ is built by `taxiway build` and run by podman, answering HTTP."""

from __future__ import annotations

import json

import pytest
import requests

from .conftest import EXAMPLES, oci_ref

CASES = {
    "python": ("taxiway/python", "hello from python on taxiway"),
    "node": ("taxiway/node", "hello from node on taxiway"),
    "deno": ("taxiway/deno", "hello from deno on taxiway"),
    "static": ("taxiway/static", "hello from a static site on taxiway"),
    "procfile": ("taxiway/procfile", "hello from a Procfile app on taxiway"),
}


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_builds_and_runs_in_podman(builder, podman, example):
    bp, greeting = CASES[example]
    tag = f"localhost/examples/{example}:test"
    p = builder("build", str(EXAMPLES / example), "-t", tag, "--json")
    out = json.loads(p.stdout)
    assert bp in out["buildpacks"]
    assert "web" in out["processes"]
    cfg = builder.image(tag).config()
    c = cfg["config"]
    assert c["WorkingDir"] == "/workspace"
    assert c["User"] == "1000:1000"
    labels = c["Labels"]
    md = json.loads(labels["io.buildpacks.lifecycle.metadata"])
    assert md["app"][0]["sha"] == cfg["rootfs"]["diff_ids"][-1]
    assert bp in [b["key"] for b in md["buildpacks"]]
    assert json.loads(labels["io.buildpacks.build.metadata"])["processes"]
    with podman.serve(oci_ref(builder, tag)) as url:
        r = requests.get(url + "/", timeout=10)
        assert r.status_code == 200
        assert greeting in r.text
    # The app sits on the run image the stack names for it.
    run = builder.image(md["runImage"]["image"])
    assert md["runImage"]["topLayer"] == run.config()["rootfs"]["diff_ids"][-1]


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_runs_as_a_machine(builder, example):
    """The same images run as taxiway machines (the namespace runtime) and answer HTTP."""
    from helpers.servers import free_port

    from .conftest import wait_http

    tag = f"localhost/examples/{example}:test"
    builder("build", str(EXAMPLES / example), "-t", tag)  # a cache hit after the podman test: nothing rewritten
    port = free_port()
    name = f"build-{example}-{port}"
    builder("run", "-d", "--name", name, "--net", "host", "-e", f"PORT={port}", tag, timeout=300)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, lambda: builder("machines", "logs", name, check=False).stdout.decode()[-2000:])
        assert CASES[example][1] in requests.get(url, timeout=10).text
    finally:
        builder("machines", "rm", "-f", name, check=False)


def test_every_process_type_can_be_run(builder, podman):
    """Non-default processes (the Procfile's clock) run through /cnb/process/<type>."""
    tag = "localhost/examples/procfile:test"
    builder("build", str(EXAMPLES / "procfile"), "-t", tag)
    name = "taxiway-build-test-clock"
    podman("run", "-d", "--name", name, "--entrypoint", "/cnb/process/clock", oci_ref(builder, tag))
    try:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = podman("logs", name).stdout.decode() + podman("logs", name).stderr.decode()
            if str(time.gmtime().tm_year) in out:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the clock process printed nothing: {out!r}")
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
