"""Findings of the second outside attack on `taxiway ca`, each run as a user (or an attacker) would.

Every test here failed before its fix. The CLI runs as a subprocess and
certificates are checked with the real `openssl verify`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from taxiway.pki import CA, profile
from taxiway.pki.names import parse_names

from .conftest import openssl, verify
from .test_ca_robustness import HeldLock, _cli, _start, err, key_matches, ok, run


@pytest.fixture
def cli_ca(ca_dir):
    ok(run("ca", "init"))
    return ca_dir


def serial_of(cert: Path) -> str:
    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:032x}"


def hand_signed(the_ca: CA, path: Path, names: list[str], cn: str | None = None) -> Path:
    """A leaf signed directly with intermediate-key.pem, as a thief of that key would sign it."""
    key = profile.generate_key()
    nb, na = profile.leaf_validity()
    cert = profile.make_leaf(key.public_key(), the_ca.intermediate, the_ca.intermediate_key, parse_names(names),
                             client=cn is not None, cn=cn, not_before=nb, not_after=na)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + the_ca.intermediate_pem)
    return path


# -- 1: a constraint on one kind of name closes the other kind ------------------------------------


@pytest.mark.parametrize(("constraint", "inside", "outside", "check"), [
    ("internal", "web.internal", "8.8.8.8", ("-verify_ip", "8.8.8.8")),
    ("internal", "web.internal", "::1", ("-verify_ip", "::1")),
    ("127.0.0.0/8", "127.0.0.1", "www.google.com", ("-verify_hostname", "www.google.com")),
])
def test_one_kind_of_constraint_excludes_the_other(ca_dir, tmp_path, constraint, inside, outside, check):
    ok(run("ca", "init", "--name-constraint", constraint))
    ok(run("ca", "issue", inside, cwd=tmp_path))
    assert "outside this CA's name constraints" in err(run("ca", "issue", outside, cwd=tmp_path))
    the_ca = CA.load(ca_dir)
    bad = hand_signed(the_ca, tmp_path / "bad.pem", [outside])
    r = verify(ca_dir / "root.pem", bad, *check, purpose=None)
    assert r.returncode != 0 and b"violation" in r.stdout + r.stderr, (r.stdout, r.stderr)
    if constraint.endswith("/8"):  # a host-like CN is a DNS name to OpenSSL, so it is excluded too
        assert "outside" in err(run("ca", "issue", "--client", "--cn", "role.example", cwd=tmp_path))
        r = verify(ca_dir / "root.pem", hand_signed(the_ca, tmp_path / "cn.pem", [], cn="role.example"), purpose=None)
        assert r.returncode != 0


def test_cn_outside_the_constraints_is_refused_even_with_sans(ca_dir, tmp_path):
    ok(run("ca", "init", "--name-constraint", "internal"))
    assert "www.evil.com is outside" in err(run("ca", "issue", "--cn", "www.evil.com", "a.internal", cwd=tmp_path))
    ok(run("ca", "issue", "--cn", "a.internal", "a.internal", cwd=tmp_path, ))
    ok(run("ca", "issue", "--client", "--cn", "app-worker", "--force", "a.internal", cwd=tmp_path))


# -- 3: outputs inside the CA directory --------------------------------------------------------------


def test_outputs_inside_the_ca_directory_are_refused(cli_ca, tmp_path):
    before = {p.name: p.read_bytes() for p in cli_ca.iterdir() if p.is_file()}
    for args, cwd in ((["issue", "--force", "intermediate"], cli_ca),
                      (["issue", "--force", "x.test", "--cert-file", str(cli_ca / "intermediate.pem"),
                        "--key-file", str(cli_ca / "intermediate-key.pem")], tmp_path),
                      (["issue", "x.test", "--cert-file", str(cli_ca / "root.pem"),
                        "--key-file", str(tmp_path / "x-key.pem")], tmp_path),
                      (["issue", "crl"], cli_ca),
                      (["issue", "x.test", "--cert-file", str(tmp_path / "link" / "ca.json"),
                        "--key-file", str(tmp_path / "k.pem")], tmp_path),
                      (["crl", "--out", str(cli_ca / "root.pem")], tmp_path)):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(cli_ca)
        line = err(run("ca", *args, cwd=cwd))
        assert "inside the CA directory" in line and "outside $TAXIWAY_CAROOT" in line, (args, line)
    after = {p.name: p.read_bytes() for p in cli_ca.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k not in ("crl.pem", "crlnumber", ".lock")} == \
        {k: v for k, v in before.items() if k not in ("crl.pem", "crlnumber", ".lock")}
    assert not (tmp_path / "x-key.pem").exists() and not (tmp_path / "k.pem").exists()
    ok(run("ca", "issue", "good.test", cwd=tmp_path))
    assert verify(cli_ca / "root.pem", tmp_path / "good.test.pem").returncode == 0


# -- 4: intermediate.pem must be this root's CA certificate -------------------------------------------


@pytest.mark.parametrize("swap", ["other CA's intermediate", "a leaf", "the root"])
def test_intermediate_must_be_a_ca_issued_by_the_root(cli_ca, tmp_path, swap):
    if swap == "other CA's intermediate":
        other, _ = CA.init(tmp_path / "other")
        cert, key = other.intermediate_pem, (other.dir / "intermediate-key.pem").read_bytes()
        expect = "was not issued by this CA's root"
    elif swap == "a leaf":
        ok(run("ca", "issue", "leaf.test", cwd=tmp_path))
        cert, key = (tmp_path / "leaf.test.pem").read_bytes(), (tmp_path / "leaf.test-key.pem").read_bytes()
        expect = "is not a CA certificate"
    else:
        cert, key = (cli_ca / "root.pem").read_bytes(), (cli_ca / "root-key.pem").read_bytes()
        expect = "is the root certificate"
    (cli_ca / "intermediate.pem").write_bytes(cert)
    (cli_ca / "intermediate-key.pem").write_bytes(key)
    line = err(run("ca", "issue", "x.test", cwd=tmp_path))
    assert str(cli_ca / "intermediate.pem") in line and expect in line, line
    assert not (tmp_path / "x.test.pem").exists()
    assert expect in err(run("ca", "crl"))


# -- 5: one file for two outputs ---------------------------------------------------------------------


def test_cert_and_key_in_one_file_are_refused(cli_ca, tmp_path):
    f = tmp_path / "f.pem"
    assert "are the same file" in err(run("ca", "issue", "a.test", "--cert-file", str(f), "--key-file", str(f)))
    assert "are the same file" in err(run("ca", "issue", "a.test", "--cert-file", str(f),
                                          "--key-file", str(tmp_path / "." / "f.pem")))
    (tmp_path / "g.pem").symlink_to(f)
    assert "are the same file" in err(run("ca", "issue", "a.test", "--cert-file", str(f),
                                          "--key-file", str(tmp_path / "g.pem"), "--p12-file", str(tmp_path / "p.p12")))
    assert not f.exists() and json.loads(ok(run("ca", "ls", "--json")).stdout) == []


# -- 2: re-issuing into a file supersedes its older records --------------------------------------------


def test_forced_reissue_supersedes_and_renew_keeps_the_live_certificate(cli_ca, tmp_path):
    files = ["--cert-file", str(tmp_path / "f.pem"), "--key-file", str(tmp_path / "fk.pem")]
    ok(run("ca", "issue", "s.example", "--hours", "2", *files))
    ok(run("ca", "issue", "long.example", "--days", "365", "--force", *files))
    live = serial_of(tmp_path / "f.pem")
    r = ok(run("ca", "renew"))
    assert b"Nothing expires" in r.stderr, r.stderr
    assert serial_of(tmp_path / "f.pem") == live
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert [(r["names"], r["status"]) for r in inv] == [(["s.example"], "renewed"), (["long.example"], "valid")]


def test_parallel_forced_issues_leave_one_current_record(cli_ca, tmp_path):
    lock = HeldLock(cli_ca)
    procs = _start(8, "ca", "issue", "race.example", "--force", cwd=tmp_path)
    try:
        lock.wait_for(8, procs)
    finally:
        lock.release()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    ok(run("ca", "issue", "race.example", "--force", cwd=tmp_path))
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert sorted(r["status"] for r in inv) == ["renewed"] * 8 + ["valid"]
    assert [r["serial"] for r in inv if r["status"] == "valid"] == [serial_of(tmp_path / "race.example.pem")]


# -- 6: a crash between the renames ------------------------------------------------------------------


def test_crash_between_renames_is_revocable_and_repaired(cli_ca, tmp_path):
    ok(run("ca", "issue", "z.example", cwd=tmp_path))
    # the chain is renamed first, then the key: kill the process on the second rename
    p = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "inject=rename:signal=SIGKILL:when=2",
                        *_cli(), "ca", "issue", "--force", "z.example"], cwd=tmp_path, capture_output=True, timeout=120)
    assert p.returncode != 0
    cert, key = tmp_path / "z.example.pem", tmp_path / "z.example-key.pem"
    assert not key_matches(cert, key)
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")], "the crash left no temp key"
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    current = [r["serial"] for r in inv if r["status"] == "valid"]
    assert current == [serial_of(cert)]  # recorded before the renames: the serial in the file is known
    r = ok(run("ca", "ls"))
    assert b"does not match" in r.stderr and b"ca renew" in r.stderr
    r = ok(run("ca", "renew"))  # not due, but broken
    assert b"renewed " + current[0].encode() in r.stderr
    assert key_matches(cert, key) and verify(cli_ca / "root.pem", cert).returncode == 0
    assert not [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
    assert b"Nothing expires" in ok(run("ca", "renew")).stderr
    ok(run("ca", "revoke", current[0]))


# -- 7: parallel renews of certificates shorter than the window --------------------------------------


def test_parallel_renews_of_short_certificates_renew_each_once(cli_ca, tmp_path):
    for i in range(5):
        ok(run("ca", "issue", f"s{i}.test", "--hours", "3", cwd=tmp_path))
    lock = HeldLock(cli_ca)
    procs = _start(8, "ca", "renew", "--exec", f"echo ran >> {tmp_path / 'exec.log'}", cwd=tmp_path)
    try:
        lock.wait_for(8, procs)
    finally:
        lock.release()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert sorted(r["status"] for r in inv) == ["renewed"] * 5 + ["valid"] * 5
    assert (tmp_path / "exec.log").read_text() == "ran\n"
    for i in range(5):
        assert key_matches(tmp_path / f"s{i}.test.pem", tmp_path / f"s{i}.test-key.pem")


# -- 8: weak keys, email certificates ----------------------------------------------------------------


@pytest.mark.parametrize(("genkey", "expect"), [
    (["-newkey", "rsa:1024"], "RSA 1024, which is too weak"),
    (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp224r1"], "secp224r1"),
])
def test_weak_csr_keys_are_refused(cli_ca, tmp_path, genkey, expect):
    csr = tmp_path / "weak.csr"
    r = openssl("req", "-new", *genkey, "-nodes", "-keyout", str(tmp_path / "k.pem"), "-subj", "/CN=weak.test",
                "-out", str(csr))
    assert r.returncode == 0, r.stderr
    assert expect in err(run("ca", "issue", "--csr", str(csr), "weak.test", cwd=tmp_path))
    assert not (tmp_path / "weak.pem").exists()


def test_email_only_certificate_is_not_called_a_server_one(cli_ca, tmp_path):
    r = ok(run("ca", "issue", "ops@example.test", cwd=tmp_path))
    assert b"Issued an email certificate for ops@example.test" in r.stderr, r.stderr
    assert b"server" not in ok(run("ca", "ls")).stdout


# -- 9: init with other settings -------------------------------------------------------------------


def test_init_with_other_settings_is_an_error(cli_ca):
    line = err(run("ca", "init", "--name-constraint", "internal", "--rsa", "4096"))
    assert "already exists" in line and "rsa-4096" in line and "internal" in line and "move" in line
    assert "nothing changed" in ok(run("ca", "init")).stderr.decode()
    assert "nothing changed" in ok(run("ca", "init", "--ecdsa")).stderr.decode()
    assert "ecdsa-p256" in err(run("ca", "init", "--rsa", "2048"))


# -- 10, 11: symlinks and permissions in the CA directory --------------------------------------------


@pytest.mark.parametrize("name", ["inventory.jsonl", ".lock"])
def test_symlinks_in_the_ca_directory_are_not_followed(cli_ca, tmp_path, name):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (cli_ca / name).unlink(missing_ok=True)
    (cli_ca / name).symlink_to(target)
    line = err(run("ca", "issue", "a.test", cwd=tmp_path))
    assert str(cli_ca / name) in line and "symbolic link" in line
    assert target.read_text() == "precious\n"


def test_init_into_an_open_directory_makes_it_private(ca_dir):
    ca_dir.mkdir()
    os.chmod(ca_dir, 0o777)
    r = ok(run("ca", "init"))
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700 and b"warning" not in r.stderr


def test_inventory_writable_by_others_is_refused_for_renew(cli_ca, tmp_path):
    ok(run("ca", "issue", "a.test", "--hours", "1", cwd=tmp_path))
    inv = cli_ca / "inventory.jsonl"
    os.chmod(inv, 0o666)
    r = ok(run("ca", "ls"))
    assert f"warning: {inv} is writable by others (mode 0666)".encode() in r.stderr
    line = err(run("ca", "renew"))
    assert str(inv) in line and "chmod 600" in line
    os.chmod(cli_ca / "ca.json", 0o666)
    assert "ca.json is writable by others" in err(run("ca", "issue", "b.test", cwd=tmp_path))


# -- 12: tracebacks, unbounded reads, CRL numbers ----------------------------------------------------


@pytest.mark.parametrize("args", [
    ["issue", "a.test", "--days", "99999999999"],
    ["issue", "a.test", "--hours", "99999999999999"],
    ["renew", "--before", "99999999999d"],
    ["issue", "--csr", "/dev/zero", "a.test"],
    ["init", "--name-constraint", "127.0.0.1"],
])
def test_bad_input_is_one_line(cli_ca, tmp_path, args):
    line = err(run("ca", *args, cwd=tmp_path))
    assert "Traceback" not in line
    assert not list(tmp_path.glob("a.test*"))


def test_huge_csr_and_ca_file_devices(cli_ca, tmp_path):
    big = tmp_path / "big.csr"
    big.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * (2 << 20))
    assert "larger than 1 MiB" in err(run("ca", "issue", "--csr", str(big), "a.test", cwd=tmp_path))
    (cli_ca / "intermediate.pem").unlink()
    (cli_ca / "intermediate.pem").symlink_to("/dev/zero")
    line = err(run("ca", "issue", "a.test", cwd=tmp_path))
    assert "intermediate.pem is not a regular file" in line


def test_crl_days_and_numbers(cli_ca, tmp_path):
    assert b"Traceback" not in ok(run("ca", "crl", "--days", "99999999999")).stderr
    ok(run("ca", "crl", "--days", "100000", "--out", str(tmp_path / "c.pem")))
    crl = x509.load_pem_x509_crl((tmp_path / "c.pem").read_bytes())
    assert crl.next_update_utc <= CA.load(cli_ca).intermediate.not_valid_after_utc
    numbers = []
    for _ in range(2):
        ok(run("ca", "crl"))
        crl = x509.load_pem_x509_crl((cli_ca / "crl.pem").read_bytes())
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    # a clock that went back an hour: the counter still goes up
    (cli_ca / "crlnumber").write_text(str(numbers[-1] + 3_600_000))
    ok(run("ca", "crl"))
    crl = x509.load_pem_x509_crl((cli_ca / "crl.pem").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == numbers[-1] + 3_600_001
    assert numbers[1] > numbers[0]
    (cli_ca / "crl.pem").unlink()
    (cli_ca / "crl.pem").mkdir()
    line = err(run("ca", "crl"))
    assert "crl.pem" in line and "rm -r" in line
