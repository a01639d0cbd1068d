"""`taxiway ca ...` as a user runs it: init, root, issue, ls, renew, revoke, crl, p12, CSR, bad input."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import openssl, verify


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def err(r: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def cli_ca(ca_dir, taxiway):
    ok(taxiway("ca", "init"))
    return ca_dir


def test_init_is_idempotent_and_root_prints(ca_dir, taxiway):
    r = ok(taxiway("ca", "init"))
    assert b"Created a CA" in r.stderr
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    r = ok(taxiway("ca", "init"))
    assert b"already exists" in r.stderr and str(ca_dir).encode() in r.stderr
    r2 = taxiway("ca", "init", "--rsa", "3072")  # other settings: an error (second attack, finding 9)
    assert r2.returncode != 0 and b"already exists" in r2.stderr and b"rsa-3072" in r2.stderr
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
    assert ok(taxiway("ca", "root")).stdout.decode().strip() == str(ca_dir)
    pem = ok(taxiway("ca", "root", "--pem")).stdout
    assert pem == (ca_dir / "root.pem").read_bytes()
    assert b"PRIVATE KEY" not in r.stdout + r.stderr + pem


def test_default_location_is_under_taxiway_home(taxiway_home, taxiway, monkeypatch):
    monkeypatch.delenv("TAXIWAY_CAROOT", raising=False)
    ok(taxiway("ca", "init"))
    assert (taxiway_home / "ca" / "root.pem").exists()
    assert ok(taxiway("ca", "root")).stdout.decode().strip() == str(taxiway_home / "ca")


def test_missing_ca_says_run_init(ca_dir, taxiway, tmp_path):
    line = err(taxiway("ca", "issue", "x.test"))
    assert "no CA in" in line and "taxiway ca init" in line
    assert "taxiway ca init" in err(taxiway("ca", "ls"))
    assert "taxiway ca init" in err(taxiway("ca", "root", "--pem"))


def test_issue_writes_chain_and_private_key(cli_ca, taxiway, tmp_path):
    r = ok(subprocess.run([*_cli(), "ca", "issue", "example.test", "localhost", "127.0.0.1", "::1"],
                          cwd=tmp_path, capture_output=True))
    cert, key = tmp_path / "example.test+3.pem", tmp_path / "example.test+3-key.pem"
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in r.stdout + r.stderr
    certs = x509.load_pem_x509_certificates(cert.read_bytes())
    assert len(certs) == 2 and certs[1].subject == certs[0].issuer
    assert ok(verify(cli_ca / "root.pem", cert)).returncode == 0
    # the key matches the certificate
    pub = openssl("pkey", "-in", str(key), "-pubout").stdout
    assert pub == openssl("x509", "-in", str(cert), "-noout", "-pubkey").stdout


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "taxiway"]


def test_issue_refuses_to_overwrite_a_key(cli_ca, taxiway, tmp_path):
    c, k = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    ok(taxiway("ca", "issue", "a.test", "--cert-file", c, "--key-file", k))
    key_before = Path(k).read_bytes()
    line = err(taxiway("ca", "issue", "b.test", "--cert-file", c, "--key-file", k))
    assert "already exists" in line and "--force" in line
    assert Path(k).read_bytes() == key_before
    ok(taxiway("ca", "issue", "b.test", "--cert-file", c, "--key-file", k, "--force"))
    assert Path(k).read_bytes() != key_before


@pytest.mark.parametrize("name,message", [
    ("*", "matches every host"),
    ("*.com", "top-level domain"),
    ("10.0.0.300", "malformed IP address"),
    ("münchen.example", "xn--mnchen-3ya.example"),
])
def test_bad_names_are_one_line_errors(cli_ca, taxiway, tmp_path, name, message):
    line = err(taxiway("ca", "issue", name, "--cert-file", str(tmp_path / "c"), "--key-file", str(tmp_path / "k")))
    assert message in line
    assert not (tmp_path / "k").exists()


def test_other_bad_input(cli_ca, taxiway, tmp_path):
    assert "no names" in err(taxiway("ca", "issue"))
    assert "--days and --hours" in err(taxiway("ca", "issue", "a.test", "--days", "1", "--hours", "1"))
    r = taxiway("ca", "issue", "a.test", "--days", "0")
    assert r.returncode != 0 and b"Traceback" not in r.stderr
    assert "invalid duration" in err(taxiway("ca", "renew", "--before", "soon"))
    assert "no certificate with serial" in err(taxiway("ca", "revoke", "abcdef12"))
    assert "invalid serial" in err(taxiway("ca", "revoke", "not-hex"))


def test_csr(cli_ca, taxiway, tmp_path):
    key, csr = tmp_path / "svc.key", tmp_path / "svc.csr"
    ok(openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
               "-keyout", str(key), "-out", str(csr), "-subj", "/CN=svc.example.test",
               "-addext", "subjectAltName=DNS:svc.example.test,IP:127.0.0.1"))
    out = tmp_path / "svc.pem"
    r = ok(taxiway("ca", "issue", "--csr", str(csr), "--cert-file", str(out), "--json"))
    info = json.loads(r.stdout)
    assert info["names"] == ["svc.example.test", "127.0.0.1"] and info["key_file"] is None
    assert ok(verify(cli_ca / "root.pem", out)).returncode == 0
    assert openssl("pkey", "-in", str(key), "-pubout").stdout == \
        openssl("x509", "-in", str(out), "-noout", "-pubkey").stdout
    # DER works too, and names on the command line replace the CSR's
    der = tmp_path / "svc.der"
    ok(openssl("req", "-in", str(csr), "-outform", "DER", "-out", str(der)))
    info = json.loads(ok(taxiway("ca", "issue", "--csr", str(der), "other.test", "--cert-file",
                                 str(tmp_path / "o.pem"), "--json")).stdout)
    assert info["names"] == ["other.test"]
    # unreadable, empty, malformed, tampered
    assert "cannot read the CSR" in err(taxiway("ca", "issue", "--csr", str(tmp_path / "nope.csr")))
    (tmp_path / "empty.csr").write_bytes(b"")
    assert "is empty" in err(taxiway("ca", "issue", "--csr", str(tmp_path / "empty.csr")))
    (tmp_path / "junk.csr").write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n")
    assert "malformed CSR" in err(taxiway("ca", "issue", "--csr", str(tmp_path / "junk.csr")))
    data = bytearray(der.read_bytes())
    data[-5] ^= 0xFF  # break the signature
    (tmp_path / "tampered.der").write_bytes(bytes(data))
    line = err(taxiway("ca", "issue", "--csr", str(tmp_path / "tampered.der")))
    assert "signature does not verify" in line or "malformed CSR" in line


def test_p12(cli_ca, taxiway, tmp_path):
    p12 = tmp_path / "b.p12"
    ok(taxiway("ca", "issue", "p12.test", "--cert-file", str(tmp_path / "c.pem"), "--key-file",
               str(tmp_path / "k.pem"), "--p12-file", str(p12)))
    assert stat.S_IMODE(p12.stat().st_mode) == 0o600
    r = ok(openssl("pkcs12", "-in", str(p12), "-passin", "pass:changeit", "-nokeys"))
    assert r.stdout.count(b"BEGIN CERTIFICATE") == 2
    assert openssl("pkcs12", "-in", str(p12), "-passin", "pass:wrong", "-nokeys").returncode != 0
    assert "already exists" in err(taxiway("ca", "issue", "p12.test", "--cert-file", str(tmp_path / "c2.pem"),
                                            "--key-file", str(tmp_path / "k2.pem"), "--p12-file", str(p12)))


def test_ls_revoke_crl_renew(cli_ca, taxiway, tmp_path):
    files = {}
    for name, extra in (("a.test", ["--hours", "2"]), ("b.test", []), ("c.test", ["--client", "--cn", "role-c"])):
        files[name] = tmp_path / f"{name}.pem"
        ok(taxiway("ca", "issue", name, *extra, "--cert-file", str(files[name]), "--key-file",
                   str(tmp_path / f"{name}-key.pem")))
    inv = json.loads(ok(taxiway("ca", "ls", "--json")).stdout)
    assert [r["names"] for r in inv] == [["a.test"], ["b.test"], ["c.test"]]
    assert {r["status"] for r in inv} == {"valid"}
    assert inv[2]["client"] and inv[2]["cn"] == "role-c"
    table = ok(taxiway("ca", "ls")).stdout.decode()
    assert "SERIAL" in table and "b.test" in table and "client" in table

    # revoke b by a unique prefix; the CRL lists it, signed by the intermediate
    b_serial = inv[1]["serial"]
    ok(taxiway("ca", "revoke", b_serial[:12]))
    assert b"already revoked" in ok(taxiway("ca", "revoke", b_serial)).stderr
    crl_path = tmp_path / "crl.pem"
    ok(taxiway("ca", "crl", "--out", str(crl_path)))
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())  # the first one: the intermediate's
    assert [rc.serial_number for rc in crl] == [int(b_serial, 16)]
    text = ok(openssl("crl", "-in", str(crl_path), "-CAfile", str(cli_ca / "intermediate.pem"), "-noout")).stderr
    assert b"verify OK" in text
    end = b"-----END X509 CRL-----\n"
    root_crl = crl_path.read_bytes().split(end)[1] + end
    assert x509.load_pem_x509_crl(root_crl).issuer == x509.load_pem_x509_certificate(
        (cli_ca / "root.pem").read_bytes()).subject
    chain = cli_ca / "root.pem"
    both = tmp_path / "trust+crl.pem"
    both.write_bytes(chain.read_bytes() + crl_path.read_bytes())
    r = verify(both, files["b.test"], "-crl_check")
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr
    assert ok(verify(both, files["a.test"], "-crl_check")).returncode == 0
    assert ok(verify(both, files["a.test"], "-crl_check_all")).returncode == 0  # the root's CRL is there too
    r = verify(both, files["b.test"], "-crl_check_all")
    assert r.returncode != 0 and b"certificate revoked" in r.stdout + r.stderr
    assert ok(taxiway("ca", "crl")).stdout.startswith(b"-----BEGIN X509 CRL-----")

    # renew what expires within a day: only a (2 hours), into the same files, then run --exec
    old_a = files["a.test"].read_bytes()
    marker = tmp_path / "reloaded"
    r = ok(taxiway("ca", "renew", "--before", "1d", "--exec", f"touch {marker}"))
    assert b"renewed" in r.stderr and marker.exists()
    assert files["a.test"].read_bytes() != old_a
    assert ok(verify(cli_ca / "root.pem", files["a.test"])).returncode == 0
    new = x509.load_pem_x509_certificates(files["a.test"].read_bytes())[0]
    assert (new.not_valid_after_utc - new.not_valid_before_utc).total_seconds() == 2 * 3600 + 60
    inv = {r["names"][0] + ("+" if r["renewed_by"] else ""): r for r in json.loads(ok(taxiway("ca", "ls", "--json")).stdout)}
    assert inv["a.test+"]["status"] == "renewed" and inv["a.test"]["status"] == "valid"
    assert inv["b.test"]["status"] == "revoked"
    before = x509.load_pem_x509_crl((cli_ca / "crl.pem").read_bytes()).last_update_utc
    time.sleep(1.1)
    r = ok(taxiway("ca", "renew", "--before", "1h", "--exec", "false"))
    assert b"Nothing expires" in r.stderr  # the new a.test has 2 hours left: nothing due, --exec not run
    assert x509.load_pem_x509_crl((cli_ca / "crl.pem").read_bytes()).last_update_utc > before  # CRL refreshed
    r = taxiway("ca", "renew", "--before", "3000d", "--exec", "false")
    assert r.returncode == 1
    *progress, last = r.stderr.decode().strip().splitlines()
    assert len(progress) == 2 and all(p.startswith("renewed ") for p in progress)  # a.test and c.test
    assert last.startswith("error: --exec command exited with 1")


def test_parallel_issues_keep_the_inventory_whole(cli_ca, tmp_path):
    """Eight `taxiway ca issue` processes at once: eight whole inventory lines, all verifiable."""
    procs = [subprocess.Popen([*_cli(), "ca", "issue", f"p{i}.example.test", "--cert-file", f"p{i}.pem",
                               "--key-file", f"p{i}-key.pem"], cwd=tmp_path, stderr=subprocess.PIPE)
             for i in range(8)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    inv = json.loads(ok(subprocess.run([*_cli(), "ca", "ls", "--json"], capture_output=True)).stdout)
    assert sorted(r["names"][0] for r in inv) == sorted(f"p{i}.example.test" for i in range(8))
    assert len({r["serial"] for r in inv}) == 8
    for i in range(8):
        assert verify(cli_ca / "root.pem", tmp_path / f"p{i}.pem").returncode == 0


def test_help_and_bad_names_do_not_import_cryptography(ca_dir):
    """`taxiway ca --help` and name errors stay fast: cryptography is imported only to sign."""
    code = ("import sys\nfrom taxiway.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('CRYPTO=' + str('cryptography' in sys.modules))\n")
    import sys

    for argv in (["ca", "--help"], ["ca", "issue", "--help"], ["ca", "issue", "*.com"], ["ca", "root"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert r.stdout.strip().splitlines()[-1] == "CRYPTO=False", (argv, r.stdout, r.stderr)


def test_csr_refuses_key_outputs(cli_ca, taxiway, tmp_path):
    csr = tmp_path / "x.csr"
    ok(openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
               str(tmp_path / "x.key"), "-out", str(csr), "-subj", "/CN=x.example.test"))
    assert "stays with whoever made the CSR" in err(taxiway("ca", "issue", "--csr", str(csr), "--p12-file",
                                                              str(tmp_path / "x.p12")))
    info = json.loads(ok(taxiway("ca", "issue", "--csr", str(csr), "--cert-file", str(tmp_path / "x.pem"),
                                 "--json")).stdout)
    assert info["names"] == ["x.example.test"]  # no SANs in the CSR: its CN becomes the name


def test_parallel_inits_and_revokes(ca_dir, tmp_path):
    """Four `ca init` at once make one CA; six `ca revoke` at once all land in crl.pem."""
    procs = [subprocess.Popen([*_cli(), "ca", "init"], stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(b"Created a CA" in o for o in outs) == 1
    c = tmp_path / "c.pem"
    ok(subprocess.run([*_cli(), "ca", "issue", "x.test", "--cert-file", str(c), "--key-file",
                       str(tmp_path / "k.pem")], capture_output=True))
    assert ok(verify(ca_dir / "root.pem", c)).returncode == 0  # root, intermediate and keys belong together

    serials = []
    for i in range(6):
        r = ok(subprocess.run([*_cli(), "ca", "issue", f"r{i}.test", "--json", "--cert-file", str(tmp_path / f"r{i}.pem"),
                               "--key-file", str(tmp_path / f"r{i}-key.pem")], capture_output=True))
        serials.append(json.loads(r.stdout)["serial"])
    procs = [subprocess.Popen([*_cli(), "ca", "revoke", s], stderr=subprocess.PIPE) for s in serials]
    assert all(p.wait(60) == 0 for p in procs)
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert sorted(f"{r.serial_number:032x}" for r in crl) == sorted(serials)
