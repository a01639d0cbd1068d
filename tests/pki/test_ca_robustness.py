"""The CA under concurrency and damage (issue 22, items 10-11), run as a user runs it.

Races are provoked, not hoped for: the test holds the CA's lock (flock on
``$TAXIWAY_CAROOT/.lock``), starts the commands, waits until /proc/locks shows
every one of them blocked on that lock, and only then lets them go.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from taxiway.pki import CA, profile

from .conftest import openssl, verify


def _cli() -> list[str]:
    return [sys.executable, "-m", "taxiway"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *args], cwd=cwd, capture_output=True, timeout=120)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert b"Traceback" not in r.stderr, r.stderr
    return r


def err(r: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (warnings before it are allowed)."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.decode().strip().splitlines()
    assert b"Traceback" not in r.stderr and lines and lines[-1].startswith("error: "), lines
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines
    return lines[-1]


def key_matches(cert: Path, key: Path) -> bool:
    pub = openssl("pkey", "-in", str(key), "-pubout").stdout
    return bool(pub) and pub == openssl("x509", "-in", str(cert), "-noout", "-pubkey").stdout


class HeldLock:
    """The CA's lock, held by the test until :meth:`release`."""

    def __init__(self, ca_dir: Path):
        self.path = ca_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def waiters(self) -> int:
        """How many processes are blocked on this lock (the ``->`` lines of /proc/locks)."""
        st = os.stat(self.path)
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        return sum(1 for line in Path("/proc/locks").read_text().splitlines()
                   if "->" in line and line.split()[6 if "->" in line else 5] == ident)

    def wait_for(self, n: int, procs: list[subprocess.Popen], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.waiters() < n:
            done = [p for p in procs if p.poll() is not None]
            assert not done, f"{len(done)} command(s) finished without waiting for the CA lock: " + \
                repr([p.communicate()[1] for p in done][:2])
            assert time.monotonic() < deadline, f"only {self.waiters()} of {n} commands wait for the CA lock"
            time.sleep(0.05)

    def release(self) -> None:
        os.close(self.fd)


@pytest.fixture
def cli_ca(ca_dir):
    ok(run("ca", "init"))
    return ca_dir


def _start(n: int, *args: str, cwd: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([*_cli(), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(n)]


# -- item 10: a lock around issuing and renewing ------------------------------------------


def test_parallel_issues_of_one_name_exactly_one_wins(cli_ca, tmp_path):
    """Eight `ca issue race.example` released together: one succeeds, seven say "already issued; use --force"."""
    lock = HeldLock(cli_ca)
    procs = _start(8, "ca", "issue", "race.example", cwd=tmp_path)
    try:
        lock.wait_for(8, procs)
    finally:
        lock.release()
    outs = [p.communicate(timeout=120) for p in procs]
    wins = [p for p in procs if p.returncode == 0]
    assert len(wins) == 1, [o[1] for o in outs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        if p.returncode:
            line = stderr.decode().strip().splitlines()[-1]
            assert "already issued; use --force" in line and "Traceback" not in stderr.decode(), stderr
    cert, key = tmp_path / "race.example.pem", tmp_path / "race.example-key.pem"
    assert ok(verify(cli_ca / "root.pem", cert)).returncode == 0
    assert key_matches(cert, key) and stat.S_IMODE(key.stat().st_mode) == 0o600
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert len(inv) == 1 and inv[0]["serial"] == f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:032x}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_parallel_forced_issues_leave_a_matching_pair(cli_ca, tmp_path):
    """Eight `ca issue --force` of one name: all succeed, one after another; the key matches the certificate."""
    lock = HeldLock(cli_ca)
    procs = _start(8, "ca", "issue", "race.example", "--force", cwd=tmp_path)
    try:
        lock.wait_for(8, procs)
    finally:
        lock.release()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    cert, key = tmp_path / "race.example.pem", tmp_path / "race.example-key.pem"
    assert key_matches(cert, key) and ok(verify(cli_ca / "root.pem", cert)).returncode == 0
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert len({r["serial"] for r in inv}) == 8


def _due_records(ca_dir: Path, tmp_path: Path, n: int) -> list[Path]:
    """``n`` day-long certificates issued 23 hours ago, written to files and recorded (an hour left)."""
    the_ca = CA.load(ca_dir)
    files = []
    for i in range(n):
        leaf = the_ca.issue([f"r{i}.test"], validity=timedelta(days=1), record=False,
                            not_before=profile.now() - timedelta(hours=23))
        cert, key = tmp_path / f"r{i}.pem", tmp_path / f"r{i}-key.pem"
        leaf.write(cert, key)
        the_ca.record(leaf, validity=timedelta(days=1), cert_file=cert, key_file=key)
        files.append(cert)
    return files


def test_parallel_renews_renew_each_certificate_once(cli_ca, tmp_path):
    """Four `ca renew` at once, as four timers firing together: three due certificates, three renewals."""
    files = _due_records(cli_ca, tmp_path, 3)
    lock = HeldLock(cli_ca)
    procs = _start(4, "ca", "renew", "--before", "2h", cwd=tmp_path)
    try:
        lock.wait_for(4, procs)
    finally:
        lock.release()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    inv = json.loads(ok(run("ca", "ls", "--json")).stdout)
    assert len(inv) == 6, [(r["names"], r["status"]) for r in inv]
    assert sorted(r["status"] for r in inv) == ["renewed"] * 3 + ["valid"] * 3
    current = {r["serial"] for r in inv if r["status"] == "valid"}
    assert {r["renewed_by"] for r in inv if r["renewed_by"]} == current
    for i, cert in enumerate(files):
        assert key_matches(cert, tmp_path / f"r{i}-key.pem")
        assert ok(verify(cli_ca / "root.pem", cert)).returncode == 0
        assert f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:032x}" in current
    # and once more, now that nothing is due: nothing changes
    assert b"Nothing expires" in ok(run("ca", "renew", "--before", "2h")).stderr
    assert len(json.loads(ok(run("ca", "ls", "--json")).stdout)) == 6


# -- item 11: damage and bad input --------------------------------------------------------


def _issue(tmp_path: Path, name: str, *extra: str) -> str:
    r = ok(run("ca", "issue", name, "--json", "--cert-file", str(tmp_path / f"{name}.pem"),
               "--key-file", str(tmp_path / f"{name}-key.pem"), *extra))
    return json.loads(r.stdout)["serial"]


def test_a_failed_write_replaces_no_file(cli_ca, tmp_path):
    """The chain cannot be written (its folder is a file): the key is not written either, nothing is recorded."""
    (tmp_path / "afile").write_text("")
    line = err(run("ca", "issue", "a.test", "--cert-file", str(tmp_path / "afile" / "a.pem"),
                   "--key-file", str(tmp_path / "a-key.pem")))
    assert "cannot write" in line and "afile" in line
    assert not (tmp_path / "a-key.pem").exists()
    assert not any(p.name.startswith(".a-key.pem") for p in tmp_path.iterdir())  # no temp file left
    assert json.loads(ok(run("ca", "ls", "--json")).stdout) == []


@pytest.mark.parametrize("damaged", ["intermediate-key.pem", "intermediate.pem"])
def test_corrupt_intermediate(cli_ca, tmp_path, damaged):
    serial = _issue(tmp_path, "a.test")
    key = cli_ca / damaged
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    for args in (["issue", "b.test", "--cert-file", str(tmp_path / "b.pem"), "--key-file", str(tmp_path / "b-key.pem")],
                 ["revoke", serial], ["crl"], ["renew", "--before", "3000d"]):
        line = err(run("ca", *args))
        assert str(key) in line and "corrupt" in line and "restore" in line, (args, line)
    assert not (tmp_path / "b-key.pem").exists() and not (tmp_path / "b.pem").exists()
    ls = ok(run("ca", "ls", "--json"))
    assert [r["status"] for r in json.loads(ls.stdout)] == ["valid"]  # the failed revoke changed nothing


def test_intermediate_key_that_does_not_match_its_certificate_is_refused(cli_ca, tmp_path):
    other = tmp_path / "other-ca"
    CA.init(other)
    (cli_ca / "intermediate-key.pem").write_bytes((other / "intermediate-key.pem").read_bytes())
    line = err(run("ca", "issue", "b.test", "--cert-file", str(tmp_path / "b.pem"),
                   "--key-file", str(tmp_path / "b-key.pem")))
    assert "does not match" in line and "intermediate.pem" in line
    assert not (tmp_path / "b.pem").exists()
    assert "does not match" in err(run("ca", "crl"))


def test_corrupt_root_pem(cli_ca, tmp_path):
    serial = _issue(tmp_path, "a.test")
    (cli_ca / "root.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    ok(run("ca", "ls"))
    # signing checks the intermediate against the root (second attack, finding 4), so all signing stops
    for args in (["root", "--pem"], ["install", "--no-system", "--no-nss"], ["crl"], ["revoke", serial],
                 ["renew", "--before", "1d"], ["issue", "b.test", "--cert-file", str(tmp_path / "b.pem"),
                                               "--key-file", str(tmp_path / "b-key.pem")]):
        line = err(run("ca", *args))
        assert str(cli_ca / "root.pem") in line and "corrupt" in line, (args, line)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"constraints": [{"kind": "dns"}]}'])
def test_corrupt_ca_json(cli_ca, tmp_path, content):
    serial = _issue(tmp_path, "a.test", "--hours", "1")
    (cli_ca / "ca.json").write_bytes(content)
    assert len(json.loads(ok(run("ca", "ls", "--json")).stdout)) == 1
    ok(run("ca", "crl"))
    line = err(run("ca", "issue", "b.test", "--cert-file", str(tmp_path / "b.pem"),
                   "--key-file", str(tmp_path / "b-key.pem")))
    assert str(cli_ca / "ca.json") in line and "corrupt" in line
    assert str(cli_ca / "ca.json") in err(run("ca", "renew", "--before", "1d"))
    ok(run("ca", "revoke", serial))


def test_one_bad_inventory_line(cli_ca, tmp_path):
    a = _issue(tmp_path, "a.test", "--hours", "1")
    inv = cli_ca / "inventory.jsonl"
    with open(inv, "ab") as f:
        f.write(b'{"event": "issued", "serial": "not hex", "names": 5}\n')
        f.write(b'{"event": "issued", "serial": "00ff", "names": ["x.test"], "not_before": "yesterday",'
                b' "not_after": "soon", "issued_at": "now", "key_type": "ecdsa-p256"}\n')
        f.write(b'["just", "a", "list"]\n')
    b = _issue(tmp_path, "b.test")
    r = ok(run("ca", "ls"))
    out, warn = r.stdout.decode(), r.stderr.decode()
    assert "a.test" in out and "b.test" in out and "x.test" not in out
    for n in (2, 3, 4):
        assert f"{inv}:{n}" in warn, warn
    assert all(line.startswith("warning: ") for line in warn.strip().splitlines())
    assert [rec["serial"] for rec in json.loads(ok(run("ca", "ls", "--json")).stdout)] == [a, b]
    ok(run("ca", "revoke", b))
    crl = x509.load_pem_x509_crl((cli_ca / "crl.pem").read_bytes())
    assert [f"{rc.serial_number:032x}" for rc in crl] == [b]
    ok(run("ca", "crl"))
    r = ok(run("ca", "renew", "--before", "2h"))
    assert b"renewed " + a.encode() in r.stderr
    assert verify(cli_ca / "root.pem", tmp_path / "a.test.pem").returncode == 0


def test_intermediate_key_readable_by_others_is_refused(cli_ca, tmp_path):
    key = cli_ca / "intermediate-key.pem"
    os.chmod(key, 0o644)
    line = err(run("ca", "issue", "b.test", "--cert-file", str(tmp_path / "b.pem"),
                   "--key-file", str(tmp_path / "b-key.pem")))
    assert str(key) in line and "0644" in line and f"chmod 600 {key}" in line
    ok(run("ca", "ls"))
    os.chmod(key, 0o600)
    _issue(tmp_path, "b.test")


def test_open_ca_folder_and_root_key_get_a_warning(cli_ca, tmp_path):
    os.chmod(cli_ca, 0o777)
    os.chmod(cli_ca / "root-key.pem", 0o644)
    r = ok(run("ca", "issue", "b.test", "--cert-file", str(tmp_path / "b.pem"), "--key-file", str(tmp_path / "b-key.pem")))
    warn = r.stderr.decode()
    assert f"warning: the CA directory {cli_ca} is writable by others (mode 0777)" in warn
    assert f"chmod 700 {cli_ca}" in warn
    assert f"{cli_ca / 'root-key.pem'}" in warn and "chmod 400" in warn
    assert b"warning: the CA directory" in ok(run("ca", "ls")).stderr
    os.chmod(cli_ca, 0o700)
    os.chmod(cli_ca / "root-key.pem", 0o400)
    assert b"warning" not in ok(run("ca", "ls")).stderr


@pytest.mark.parametrize("name", ["fe80::1%eth0", "[fe80::1%25eth0]", "fe80::1%1"])
def test_ip_zone_ids_are_refused(cli_ca, tmp_path, name):
    line = err(run("ca", "issue", name, "--cert-file", str(tmp_path / "z.pem"), "--key-file", str(tmp_path / "z-key.pem")))
    assert "zone" in line and "fe80::1" in line
    assert not (tmp_path / "z.pem").exists()
    assert json.loads(ok(run("ca", "ls", "--json")).stdout) == []
