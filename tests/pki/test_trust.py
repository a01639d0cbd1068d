"""`taxiway ca install|uninstall` against a throwaway system root and NSS database.

TAXIWAY_TRUST_SYSROOT makes the real update-ca-certificates work under a temp
directory (its --sysroot), and TAXIWAY_NSS_DBS names a temp NSS database, so
the machine's own trust store is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .test_tls import curl, https_server


@pytest.fixture
def sysroot(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "sysroot"
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "usr/share/ca-certificates/example").mkdir(parents=True)
    # one distribution CA, as on a real system (update-ca-certificates only rewrites a non-empty bundle)
    from taxiway.pki import CA

    other, _ = CA.init(tmp_path / "distro-ca")
    (root / "usr/share/ca-certificates/example/distro.crt").write_bytes(other.root_pem)
    (root / "etc/ca-certificates.conf").write_text("example/distro.crt\n")
    monkeypatch.setenv("TAXIWAY_TRUST_SYSROOT", str(root))
    return root


@pytest.fixture
def nssdb(tmp_path, monkeypatch) -> Path:
    db = tmp_path / "nssdb"
    db.mkdir()
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True, capture_output=True)
    monkeypatch.setenv("TAXIWAY_NSS_DBS", str(db))
    return db


def nss_list(db: Path) -> str:
    return subprocess.run(["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True).stdout


def test_install_and_uninstall(ca, sysroot, nssdb, taxiway, tmp_path):
    from taxiway.pki.trust import fingerprint

    fp = fingerprint(ca.root_pem)
    bundle = sysroot / "etc/ssl/certs/ca-certificates.crt"

    r = taxiway("ca", "install")
    assert r.returncode == 0, r.stderr
    assert b"system:" in r.stderr and b"nss:" in r.stderr and b"added" in r.stderr
    crt = sysroot / f"usr/local/share/ca-certificates/taxiway-{fp}.crt"
    assert crt.read_bytes() == ca.root_pem
    assert ca.root_pem.decode().strip() in bundle.read_text()
    links = [p for p in (sysroot / "etc/ssl/certs").iterdir() if p.is_symlink()]
    assert {os.path.basename(os.readlink(p)) for p in links} >= {crt.name, f"taxiway-{fp}.pem"}
    line = [ln for ln in nss_list(nssdb).splitlines() if f"taxiway root {fp}" in ln]
    assert line and line[0].split()[-1] == "C,,"

    # the installed bundle is what clients use: curl trusts a taxiway server through it
    with https_server(tmp_path, ca.issue(["trusted.example.test"]), "trusted") as port:
        assert curl("trusted.example.test", port, bundle).returncode == 0

    r = taxiway("ca", "install")  # idempotent
    assert r.returncode == 0 and r.stderr.count(b"already there") == 2, r.stderr

    r = taxiway("ca", "uninstall")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(b"removed") == 2
    assert not crt.exists()
    assert ca.root_pem.decode().strip() not in bundle.read_text()
    links = [p for p in (sysroot / "etc/ssl/certs").iterdir() if p.is_symlink()]
    assert links and all(p.exists() for p in links)  # no dangling links left behind
    assert not [p for p in links if "taxiway" in os.readlink(p)]
    assert "taxiway root" not in nss_list(nssdb)
    r = taxiway("ca", "uninstall")
    assert r.returncode == 0 and r.stderr.count(b"was not there") == 2


def test_install_without_permission_is_one_line(ca, tmp_path, monkeypatch, taxiway):
    if os.geteuid() == 0:
        # root can write anywhere; use a read-only bind of the idea instead: a file where the dir should be
        root = tmp_path / "ro"
        (root / "usr/local/share").mkdir(parents=True)
        (root / "usr/local/share/ca-certificates").write_text("not a directory")
    else:
        root = Path("/")
    monkeypatch.setenv("TAXIWAY_TRUST_SYSROOT", str(root))
    r = taxiway("ca", "install", "--no-nss")
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


def _java_aliases() -> set[str] | None:
    """The Java keystore's aliases (ca-certificates-java keeps it in step through a hook)."""
    ks = Path("/etc/ssl/certs/java/cacerts")
    if not ks.exists() or not shutil.which("keytool"):
        return None
    r = subprocess.run(["keytool", "-list", "-keystore", str(ks), "-storepass", "changeit"],
                       capture_output=True, text=True, timeout=120)
    return {line.split(",")[0] for line in r.stdout.splitlines() if "trustedCertEntry" in line}


def _etc_state() -> tuple[set[tuple[str, str]], bytes]:
    """The working links in /etc/ssl/certs and the bundle.

    Dangling links are left out: update-ca-certificates prunes any it finds
    whenever its set changes, whoever left them.
    """
    etc = Path("/etc/ssl/certs")
    links = {(p.name, os.readlink(p)) for p in etc.iterdir() if p.is_symlink() and p.exists()}
    return links, (etc / "ca-certificates.crt").read_bytes()


def test_real_system_store_round_trip(ca, taxiway, monkeypatch):
    """The real /usr/local/share/ca-certificates path, restored exactly afterwards (as root).

    Without root it must fail with one clear line instead.
    """
    monkeypatch.delenv("TAXIWAY_TRUST_SYSROOT", raising=False)
    if os.geteuid() != 0:
        r = taxiway("ca", "install", "--no-nss")
        assert r.returncode != 0 and b"sudo taxiway ca install" in r.stderr
        return
    from taxiway.pki.trust import fingerprint

    fp = fingerprint(ca.root_pem)
    before, java_before = _etc_state(), _java_aliases()
    crt = Path(f"/usr/local/share/ca-certificates/taxiway-{fp}.crt")
    try:
        r = taxiway("ca", "install", "--no-nss")
        assert r.returncode == 0, r.stderr
        assert crt.exists()
        assert ca.root_pem.decode().strip() in Path("/etc/ssl/certs/ca-certificates.crt").read_text()
        if java_before is not None:
            assert f"debian:taxiway-{fp}.pem" in _java_aliases()  # the hook added it to Java's store
    finally:
        r = taxiway("ca", "uninstall", "--no-nss")
    assert r.returncode == 0, r.stderr
    assert not crt.exists()
    assert _etc_state() == before
    assert _java_aliases() == java_before  # and the hook was told to drop it again
