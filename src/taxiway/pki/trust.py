"""Install the root into (and remove it from) the system trust store and NSS databases.

* System (Debian/Ubuntu): the root is copied to
  ``<sysroot>/usr/local/share/ca-certificates/taxiway-<fingerprint>.crt`` and
  ``update-ca-certificates`` rebuilds the bundle (and runs its hooks, e.g. the
  Java keystore's); uninstall deletes the file and its links, rebuilds the
  bundle and tells the hooks (``-path`` on stdin, as update-ca-certificates
  does) so they drop it too. Both check the bundle afterwards: a store that
  did not change as asked is an error, never a silent success.
  ``$TAXIWAY_TRUST_SYSROOT`` (default ``/``) points it elsewhere, which tests
  use. Debian 12's update-ca-certificates has no ``--sysroot`` (later versions
  do), so each of its directories is passed under the sysroot instead.
* NSS (Chromium, Firefox): ``certutil -A`` into each database in
  ``$TAXIWAY_NSS_DBS`` (colon-separated directories), else the ones found in
  ``~/.pki/nssdb`` and Firefox profiles; skipped when certutil is missing.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from taxiway.errors import TaxiwayError
from taxiway.fsutil import write_bytes_atomic

LOCAL_CERTS = "usr/local/share/ca-certificates"
ETC_CERTS = "etc/ssl/certs"


@dataclass
class Target:
    """One trust store changed (or found unchanged) by install/uninstall."""

    kind: str  # "system" or "nss"
    location: str
    changed: bool


def fingerprint(root_pem: bytes) -> str:
    """SHA-256 over the PEM text's DER, first 16 hex digits: names the root in stores."""
    import base64

    body = b"".join(line for line in root_pem.splitlines() if line and not line.startswith(b"-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()[:16]


def sysroot() -> Path:
    return Path(os.environ.get("TAXIWAY_TRUST_SYSROOT") or "/")


def nss_databases() -> list[Path]:
    """NSS databases to update: ``$TAXIWAY_NSS_DBS`` or the user's usual ones."""
    env = os.environ.get("TAXIWAY_NSS_DBS")
    if env is not None:
        return [Path(p) for p in env.split(":") if p]
    h = Path.home()
    found = [h / ".pki/nssdb", h / "snap/chromium/current/.pki/nssdb"]
    found += [Path(p) for p in glob.glob(str(h / ".mozilla/firefox/*")) if os.path.isdir(p)]
    return [p for p in found if (p / "cert9.db").exists() or (p / "cert8.db").exists()]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise TaxiwayError(f"{argv[0]} is not installed", "install the ca-certificates package") from None


def _update_system(root: Path) -> None:
    tool = shutil.which("update-ca-certificates") or "/usr/sbin/update-ca-certificates"
    argv = [tool]
    if str(root) != "/":
        # These options exist in every ca-certificates release Debian and Ubuntu
        # ship (--sysroot only from 2024 on); an option it does not know makes
        # it print its usage and exit 0 having done nothing.
        argv += ["--certsconf", str(root / "etc/ca-certificates.conf"),
                 "--certsdir", str(root / "usr/share/ca-certificates"),
                 "--localcertsdir", str(root / LOCAL_CERTS),
                 "--etccertsdir", str(root / ETC_CERTS),
                 "--hooksdir", str(root / "etc/ca-certificates/update.d")]
    p = _run(argv)
    if p.returncode != 0:
        raise TaxiwayError(f"update-ca-certificates failed: {(p.stderr or p.stdout).strip()[:300]}",
                           "run it by hand to see why")


def _in_bundle(root: Path, root_pem: bytes) -> bool:
    """Whether the system bundle holds this certificate (compared as DER)."""
    from cryptography import x509

    bundle = root / ETC_CERTS / "ca-certificates.crt"
    try:
        data = bundle.read_bytes()
        certs = x509.load_pem_x509_certificates(data) if data.strip() else []
    except (OSError, ValueError):
        return False
    want = x509.load_pem_x509_certificate(root_pem)
    return any(c == want for c in certs)


def _check_bundle(root: Path, root_pem: bytes, *, present: bool) -> None:
    if _in_bundle(root, root_pem) != present:
        bundle = root / ETC_CERTS / "ca-certificates.crt"
        what = "does not contain the root after install" if present else "still contains the root after uninstall"
        raise TaxiwayError(f"the system bundle {bundle} {what}; update-ca-certificates did not update it",
                           "run `update-ca-certificates --verbose` to see why (is the ca-certificates package installed?)")


def _run_hooks(root: Path, changes: str) -> None:
    """Run update-ca-certificates' hooks with a ``+path``/``-path`` list on stdin, as it does.

    Hooks keep other stores in step (ca-certificates-java's updates the Java
    keystore); update-ca-certificates(8) documents this interface.
    """
    hooks = root / "etc/ca-certificates/update.d"
    if not hooks.is_dir():
        return
    for hook in sorted(hooks.iterdir()):
        if hook.is_file() and os.access(hook, os.X_OK) and not hook.name.startswith("."):
            p = subprocess.run([str(hook)], input=changes, capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                raise TaxiwayError(f"the trust-store hook {hook} failed: {(p.stderr or p.stdout).strip()[:200]}",
                                   "run update-ca-certificates by hand to see why")


def _nick(fp: str) -> str:
    return f"taxiway root {fp}"


def install(root_pem: bytes, *, system: bool = True, nss: bool = True) -> list[Target]:
    """Trust ``root_pem`` system-wide and in NSS databases; idempotent."""
    fp = fingerprint(root_pem)
    out: list[Target] = []
    if system:
        root = sysroot()
        dest = root / LOCAL_CERTS / f"taxiway-{fp}.crt"
        changed = not dest.exists() or dest.read_bytes() != root_pem
        try:  # update-ca-certificates cds into etc/ssl/certs, which a fresh sysroot lacks
            (root / ETC_CERTS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TaxiwayError(f"cannot create {root / ETC_CERTS} ({e.strerror})",
                               "run `sudo taxiway ca install` with the same TAXIWAY_CAROOT") from None
        if changed:
            try:
                write_bytes_atomic(dest, root_pem, mode=0o644)
            except OSError as e:
                raise TaxiwayError(f"cannot write {dest} ({e.strerror})",
                                   "run `sudo taxiway ca install` with the same TAXIWAY_CAROOT") from None
        _update_system(root)
        _check_bundle(root, root_pem, present=True)
        out.append(Target("system", str(dest), changed))
    if nss:
        certutil = shutil.which("certutil")
        for db in nss_databases() if certutil else []:
            d = f"sql:{db}"
            present = _run([certutil, "-L", "-d", d, "-n", _nick(fp)]).returncode == 0
            if not present:
                import tempfile

                with tempfile.NamedTemporaryFile(suffix=".pem") as f:
                    f.write(root_pem)
                    f.flush()
                    p = _run([certutil, "-A", "-d", d, "-t", "C,,", "-n", _nick(fp), "-i", f.name])
                if p.returncode != 0:
                    raise TaxiwayError(f"certutil could not add the root to {db}: {p.stderr.strip()[:200]}",
                                       "check that the database is writable")
            out.append(Target("nss", str(db), not present))
    return out


def uninstall(root_pem: bytes, *, system: bool = True, nss: bool = True) -> list[Target]:
    """Remove ``root_pem`` from the system store and NSS databases; idempotent."""
    fp = fingerprint(root_pem)
    out: list[Target] = []
    if system:
        root = sysroot()
        crt = root / LOCAL_CERTS / f"taxiway-{fp}.crt"
        etc = root / ETC_CERTS
        pem = etc / f"taxiway-{fp}.pem"
        ours = (pem.name, crt.name)
        links = [p for p in etc.iterdir() if p.is_symlink() and os.path.basename(os.readlink(p)) in ours] \
            if etc.is_dir() else []
        changed = crt.exists() or bool(links)
        try:
            if crt.exists():
                crt.unlink()
            # update-ca-certificates never removes the links of a deleted local CA
            # (and --fresh would rebuild every hook's store, the Java keystore
            # included): remove ours, rebuild the bundle, then tell the hooks.
            for link in links:
                link.unlink()
        except OSError as e:
            raise TaxiwayError(f"cannot remove {crt} ({e.strerror})", "run `sudo taxiway ca uninstall`") from None
        if changed:
            _update_system(root)
        _check_bundle(root, root_pem, present=False)
        if pem in links:
            _run_hooks(root, f"-{pem}\n")
        out.append(Target("system", str(crt), changed))
    if nss:
        certutil = shutil.which("certutil")
        for db in nss_databases() if certutil else []:
            d = f"sql:{db}"
            removed = False
            while _run([certutil, "-L", "-d", d, "-n", _nick(fp)]).returncode == 0:
                if _run([certutil, "-D", "-d", d, "-n", _nick(fp)]).returncode != 0:
                    raise TaxiwayError(f"certutil could not remove the root from {db}", "check that it is writable")
                removed = True
            out.append(Target("nss", str(db), removed))
    return out
