"""`taxiway ca install|uninstall` against a throwaway system root and NSS database.

TAXIWAY_TRUST_SYSROOT makes the real update-ca-certificates work under a temp
directory (its --sysroot), and TAXIWAY_NSS_DBS names a temp NSS database, so
the machine's own trust store is never touched.
"""

from __future__ import annotations

import os
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


def test_install_that_did_not_happen_fails(ca, sysroot, tmp_path, monkeypatch, taxiway):
    """An update-ca-certificates that ignores its arguments (Debian 12's, given --sysroot) must not pass."""
    fake = tmp_path / "bin"
    fake.mkdir()
    # the real tool, called as a version without our options would be: usage, exit 0, nothing done
    (fake / "update-ca-certificates").write_text("#!/bin/sh\nexec /usr/sbin/update-ca-certificates --sysroot /\n")
    (fake / "update-ca-certificates").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    r = taxiway("ca", "install", "--no-nss")
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "does not contain the root after install" in lines[0], lines


# The real paths, run as root inside a private mount namespace whose overlays
# over the trust store take every write: the host's store is never touched.
_OVERLAID = ("/etc/ssl", "/usr/local/share/ca-certificates", "/etc/ca-certificates")

_INNER = r"""
import json, os, shutil, subprocess, sys
from pathlib import Path

fp, root_pem = sys.argv[1], Path(sys.argv[2]).read_text().strip()
bundle = Path("/etc/ssl/certs/ca-certificates.crt")
crt = Path(f"/usr/local/share/ca-certificates/taxiway-{fp}.crt")


def java():
    ks = Path("/etc/ssl/certs/java/cacerts")
    if not ks.exists() or not shutil.which("keytool"):
        return None
    r = subprocess.run(["keytool", "-list", "-keystore", str(ks), "-storepass", "changeit"],
                       capture_output=True, text=True, timeout=120)
    return sorted(line.split(",")[0] for line in r.stdout.splitlines() if "trustedCertEntry" in line)


def ours():
    etc = Path("/etc/ssl/certs")
    return sorted(p.name for p in etc.iterdir() if p.is_symlink() and "taxiway" in os.readlink(p))


def tw(*args):
    return subprocess.run([sys.executable, "-m", "taxiway", *args], capture_output=True, text=True, timeout=300)


out = {"java_before": java()}
r = tw("ca", "install", "--no-nss")
out.update(install_rc=r.returncode, install_err=r.stderr, crt_after_install=crt.exists(),
           in_bundle_after_install=root_pem in bundle.read_text(), links_after_install=ours(),
           java_after_install=java())
r = tw("ca", "uninstall", "--no-nss")
out.update(uninstall_rc=r.returncode, uninstall_err=r.stderr, crt_after_uninstall=crt.exists(),
           in_bundle_after_uninstall=root_pem in bundle.read_text(), links_after_uninstall=ours(),
           dangling=[p.name for p in Path("/etc/ssl/certs").iterdir() if p.is_symlink() and not p.exists()],
           java_after_uninstall=java())
print(json.dumps(out))
"""


def _tree(path: str) -> dict[str, tuple]:
    """Every entry under ``path`` with its type, target or content digest: the host's state to compare."""
    import hashlib

    state: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                state[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    state[p] = ("file", st.st_mode, hashlib.sha256(f.read()).hexdigest())
            else:
                state[p] = ("dir", st.st_mode)
    return state


def test_real_system_store_round_trip(ca, taxiway, tmp_path, monkeypatch):
    """The real /usr/local/share/ca-certificates, /etc/ssl/certs and hooks, in a private mount namespace.

    Without root it must fail with one clear line instead.
    """
    import json
    import sys

    from taxiway.pki.trust import fingerprint

    monkeypatch.delenv("TAXIWAY_TRUST_SYSROOT", raising=False)
    if os.geteuid() != 0:
        r = taxiway("ca", "install", "--no-nss")
        assert r.returncode != 0 and b"sudo taxiway ca install" in r.stderr
        return
    host_before = {d: _tree(d) for d in _OVERLAID if os.path.isdir(d)}
    fp = fingerprint(ca.root_pem)
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    (tmp_path / "inner.py").write_text(_INNER)
    mounts = []
    for d in _OVERLAID:
        if not os.path.isdir(d):
            continue
        up, work = tmp_path / "upper" / d.strip("/"), tmp_path / "work" / d.strip("/")
        up.mkdir(parents=True)
        work.mkdir(parents=True)
        mounts.append(f"mount -t overlay overlay -o lowerdir={d},upperdir={up},workdir={work} {d}")
    script = "set -e\n" + "\n".join(mounts) + f'\nexec "{sys.executable}" {tmp_path / "inner.py"} {fp} {tmp_path / "root.pem"}\n'
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])

    assert out["install_rc"] == 0, out["install_err"]
    assert out["crt_after_install"] and out["in_bundle_after_install"]
    assert {f"taxiway-{fp}.pem"} <= set(out["links_after_install"])
    if out["java_before"] is not None:  # the hook added it to Java's store, and dropped it again
        assert f"debian:taxiway-{fp}.pem" in out["java_after_install"]
        # (a store not in canonical form may gain the host's other local CAs on the way)
        assert f"debian:taxiway-{fp}.pem" not in out["java_after_uninstall"]
        assert set(out["java_before"]) <= set(out["java_after_uninstall"])
    assert out["uninstall_rc"] == 0, out["uninstall_err"]
    assert not out["crt_after_uninstall"] and not out["in_bundle_after_uninstall"]
    assert out["links_after_uninstall"] == [] and out["dangling"] == []
    # the writes went to the overlays, and the host's own store is byte for byte what it was
    assert (tmp_path / "upper/etc/ssl/certs/ca-certificates.crt").exists()
    assert {d: _tree(d) for d in host_before} == host_before


def test_install_into_a_fresh_sysroot(ca, tmp_path, monkeypatch, taxiway):
    """A scratch sysroot with nothing in it: install creates etc/ssl/certs for update-ca-certificates."""
    root = tmp_path / "fresh"
    root.mkdir()
    monkeypatch.setenv("TAXIWAY_TRUST_SYSROOT", str(root))
    r = taxiway("ca", "install", "--no-nss")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert ca.root_pem.strip() in (root / "etc/ssl/certs/ca-certificates.crt").read_bytes()
