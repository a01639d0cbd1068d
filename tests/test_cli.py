"""The CLI entry point: help, version, lazy imports, one-line errors."""

import subprocess
import sys


def test_help_lists_commands(taxiway):
    r = taxiway("--help")
    assert r.returncode == 0
    assert b"Usage: taxiway" in r.stdout


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; from taxiway.cli.main import cli, main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('httpx','cryptography','starlette','uvicorn','rich','yaml','datasette') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "HEAVY="


def test_unknown_command_fails(taxiway):
    r = taxiway("no-such-command")
    assert r.returncode != 0


def test_listen_addresses_parse_one_way():
    import pytest

    from taxiway.errors import InvalidInput
    from taxiway.listen import Listen, parse_listen

    assert parse_listen("127.0.0.1:5000") == Listen("127.0.0.1", 5000)
    assert parse_listen(":5000") == Listen("127.0.0.1", 5000)  # loopback, never every interface
    assert parse_listen("localhost:0") == Listen("127.0.0.1", 0)
    assert parse_listen("[::1]:4750") == Listen("::1", 4750)
    assert str(parse_listen("[::1]:4750")) == "[::1]:4750"
    assert parse_listen("0.0.0.0:80") == Listen("0.0.0.0", 80)
    for bad in ("5000", "::1:5000", "[127.0.0.1]:5", "host.example:5000", "127.0.0.1:65536", "127.0.0.1:x",
                "127.0.0.1:", "1.2.3.4.5:80"):
        with pytest.raises(InvalidInput) as e:
            parse_listen(bad)
        assert "--listen" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_listen_address_is_one_line(taxiway, tmp_path):
    for args in (["registry", "serve", "--root", str(tmp_path)], ["egress", "serve"]):
        r = taxiway(*args, "--listen", "::1:5000")
        assert r.returncode == 2
        lines = r.stderr.decode().strip().splitlines()
        assert lines == ["error: --listen '::1:5000': an IPv6 address goes in brackets; write it as [::1]:5000"], lines


def test_rich_and_the_cli_stay_at_the_cli_boundary():
    """Progress bars are the CLI's: the parts take the one progress callback (taxiway.oci.progress),
    and no part imports taxiway.cli."""
    import re
    from pathlib import Path

    import taxiway

    src = Path(taxiway.__file__).parent
    offenders = []
    for p in src.rglob("*.py"):
        if p.relative_to(src).parts[0] in ("cli", "__main__.py"):  # __main__ is the CLI's entry
            continue
        if re.search(r"^\s*(from|import) (rich|taxiway\.cli)\b", p.read_text(), re.M):
            offenders.append(str(p.relative_to(src)))
    assert offenders == []
