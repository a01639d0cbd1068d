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
