"""`taxiway egress check` prints Smokescreen's decision without sending anything."""

from __future__ import annotations

import json

from helpers.paths import FIXTURES

ACLS = FIXTURES / "smokescreen-acls"


def test_check_allow_and_deny(taxiway):
    r = taxiway("egress", "check", "--acl", str(ACLS / "sample_config.yaml"), "--role", "enforce-dummy-srv",
                "https://example1.com/")
    assert r.returncode == 0, r.stderr
    assert b"allow: example1.com:443" in r.stdout and b"host matched allowed domain in rule" in r.stdout
    r = taxiway("egress", "check", "--acl", str(ACLS / "sample_config.yaml"), "--role", "enforce-dummy-srv",
                "http://www.example1.com/")
    assert r.returncode == 1
    assert b"deny: www.example1.com:80" in r.stdout and b"rule has enforce policy" in r.stdout


def test_check_report_mode_and_json(taxiway):
    r = taxiway("egress", "check", "--acl", str(ACLS / "sample_config.yaml"), "--role", "report-dummy-srv",
                "--json", "example1.com:443")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["decision"] == "report" and out["project"] == "security"


def test_check_judges_literal_addresses(taxiway):
    r = taxiway("egress", "check", "--json", "http://0x7f.1/")
    assert r.returncode == 1
    assert json.loads(r.stdout)["reason"] == "127.0.0.1 is a loopback address"
    r = taxiway("egress", "check", "--allow-range", "127.0.0.2/32", "http://127.0.0.2/")
    assert r.returncode == 0 and b"allowed by --allow-range 127.0.0.2/32" in r.stdout
    r = taxiway("egress", "check", "--allow-range", "10.0.0.0/8", "--deny-range", "10.1.0.0/16",
                "http://10.1.2.3/")
    assert r.returncode == 1 and b"denied by --deny-range" in r.stdout
    # A public address is allowed by the policy alone; nothing is dialled by `check`.
    r = taxiway("egress", "check", "https://[2606:4700::1111]/")
    assert r.returncode == 0 and b"public address" in r.stdout


def test_broken_acl_is_one_error_line(taxiway):
    r = taxiway("egress", "check", "--acl", str(ACLS / "unknown_action.yaml"), "--role", "x", "a.com:443")
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ACL ")
    assert "unknown action purposely_unknown_action" in lines[0]


def test_serve_refuses_bad_configuration_in_one_line(taxiway, tmp_path):
    import socket

    r = taxiway("egress", "serve", "--listen", "127.0.0.1:0", "--acl", str(ACLS / "sample_config.yaml"),
                "--disable-acl-policy-action", "open", timeout=30)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        f"error: ACL {ACLS / 'sample_config.yaml'}: rule for svc:open-dummy-srv utilizes a disabled "
        "policy:open; fix the file (Smokescreen v1 YAML) and try again"]
    r = taxiway("egress", "serve", "--acl", str(tmp_path / "missing.yaml"), timeout=30)
    assert r.returncode == 2 and b"cannot read ACL" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = taxiway("egress", "serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", timeout=30)
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0] and "--listen" in lines[0]
    r = taxiway("egress", "serve", "--allow-range", "not-a-cidr", timeout=30)
    assert r.returncode == 2 and b"--allow-range 'not-a-cidr'" in r.stderr
