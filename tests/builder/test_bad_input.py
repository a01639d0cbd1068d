"""Bad input gives one clear error line and exports nothing."""

from __future__ import annotations

import textwrap

import pytest

from taxiway.errors import NotFound

from .test_build import write_buildpack


def error_line(p) -> str:
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode != 0
    assert lines and lines[-1].startswith("error: "), p.stderr.decode()
    return lines[-1]


def assert_not_exported(builder, tag):
    with pytest.raises(NotFound):
        builder.store().resolve(tag)


def test_nothing_detects_says_what_each_buildpack_looked_for(builder, tmp_path):
    (tmp_path / "README.md").write_text("just a readme\n")
    line = error_line(builder("build", str(tmp_path), "-t", "bad/none:1", check=False))
    assert "no buildpack detected an app in" in line
    for looked_for in ("requirements.txt", "package.json", "server.ts", "index.html", "Procfile"):
        assert looked_for in line
    assert_not_exported(builder, "bad/none:1")


def test_failing_dependency_install_shows_log_tail(builder, tmp_path):
    (tmp_path / "requirements.txt").write_text("taxiway-no-such-package-zz9==1.0\n")
    (tmp_path / "app.py").write_text("print('hi')\n")
    p = builder("build", str(tmp_path), "-t", "bad/deps:1", check=False)
    line = error_line(p)
    assert "taxiway/python failed to build" in line and "nothing was exported" in line
    tail = [x for x in p.stderr.decode().splitlines() if x.startswith("  | ")]
    assert any("taxiway-no-such-package-zz9" in x for x in tail)
    assert_not_exported(builder, "bad/deps:1")


def test_malformed_buildpack_toml(builder, tmp_path):
    bp = write_buildpack(tmp_path)
    (bp / "buildpack.toml").write_text('api = "0.10"\n[buildpack\nid = "x"\n')
    (tmp_path / "app").mkdir()
    line = error_line(builder("build", str(tmp_path / "app"), "-t", "bad/bptoml:1", "-b", str(bp), check=False))
    assert "malformed buildpack.toml" in line and str(bp) in line
    (bp / "buildpack.toml").write_text('api = "0.10"\n[buildpack]\nversion = "1"\n')
    line = error_line(builder("build", str(tmp_path / "app"), "-t", "bad/bptoml:1", "-b", str(bp), check=False))
    assert "id" in line and "missing or invalid" in line
    (bp / "buildpack.toml").write_text('api = "0.10"\n[buildpack]\nid = "a/b"\nversion = "1"\n')
    (bp / "bin" / "build").chmod(0o644)
    line = error_line(builder("build", str(tmp_path / "app"), "-t", "bad/bptoml:1", "-b", str(bp), check=False))
    assert "bin/build is not executable" in line


def test_malformed_launch_toml(builder, tmp_path):
    bp = write_buildpack(tmp_path, launch_toml='[[processes]]\ntype = "web"\nargs = ["x"]\n')
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.txt").write_text("hi\n")
    line = error_line(builder("build", str(app), "-t", "bad/launch:1", "-b", str(bp), "-e", "GREETING=x", check=False))
    assert "malformed launch.toml" in line and "command" in line
    assert_not_exported(builder, "bad/launch:1")


def test_detect_error_exit_code(builder, tmp_path):
    bp = write_buildpack(tmp_path)
    (bp / "bin" / "detect").write_text("#!/bin/sh\necho 'detect blew up' >&2\nexit 7\n")
    (tmp_path / "app").mkdir()
    p = builder("build", str(tmp_path / "app"), "-t", "bad/detect:1", "-b", str(bp), check=False)
    line = error_line(p)
    assert "example/hello failed to detect (exit 7)" in line
    assert "detect blew up" in p.stderr.decode()


def test_bad_deno_permissions(builder, tmp_path):
    (tmp_path / "server.ts").write_text('Deno.serve(() => new Response("x"));\n')
    (tmp_path / ".permissions").write_text("--allow-net --allow-everything\n")
    line = error_line(builder("build", str(tmp_path), "-t", "bad/deno:1", check=False))
    assert "'--allow-everything' is not a Deno permission flag" in line
    assert_not_exported(builder, "bad/deno:1")


def test_bad_cli_arguments(builder, tmp_path):
    assert "missing -t/--tag" in error_line(builder("build", str(tmp_path), check=False))
    assert "not K=V" in error_line(builder("build", str(tmp_path), "-t", "x", "-e", "NOEQUALS", check=False))
    assert "does not exist" in error_line(builder("build", str(tmp_path / "nope"), "-t", "x", check=False))
    assert "no buildpack 'nope'" in error_line(builder("build", str(tmp_path), "-t", "x", "-b", "nope", check=False))
    assert "--rebase needs --run-image" in error_line(builder("build", "--rebase", "x", check=False))
    assert "no stack image" in error_line(builder("stack", "create", "run-cobol", check=False))
    assert "linux/amd64" in error_line(builder("build", str(tmp_path), "-t", "x", "--platform", "linux/arm64", check=False))


def test_procfile_without_processes(builder, tmp_path):
    (tmp_path / "Procfile").write_text(textwrap.dedent("""\
        # only a comment
        this line has no colon
        """))
    line = error_line(builder("build", str(tmp_path), "-t", "bad/procfile:1", check=False))
    assert "Procfile line 2" in line
