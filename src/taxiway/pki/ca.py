"""The CA on disk: init, load, issue, record, revoke, CRL, renew.

Layout of the CA directory (``$TAXIWAY_CAROOT``, default ``$TAXIWAY_HOME/ca``)::

    root.pem               the root certificate (written last: its presence means "initialized")
    root-key.pem           the root key, mode 0400 (may be moved offline after init)
    intermediate.pem       the online intermediate that signs leaves and CRLs
    intermediate-key.pem   its key, mode 0600
    ca.json                key type and name constraints chosen at init
    inventory.jsonl        issued/revoked/renewed events (see inventory.py)
    root-crl.pem           the root's (empty) CRL, valid as long as the root, made at init
    crl.pem                the latest CRLs: the intermediate's (fresh, 7 days) then the root's;
                           rewritten by revoke, ``taxiway ca crl`` and ``taxiway ca renew``
    crlnumber              the last CRL number, so numbers grow even if the clock goes back
    .lock                  flock(2) taken by every write: init, issuing to files, renew, revoke, CRLs

Clients that check the whole chain (curl --crlfile, openssl -crl_check_all)
need a CRL from every CA in it; the root's is made once at init so that the
root key can go offline.

Concurrency and damage: every change to the CA (and every leaf written to
files through :meth:`CA.save`) happens under the lock, after re-reading what
it depends on, so parallel commands behave as if run one after another. A
leaf's key, chain and PKCS#12 file are written to temp names, recorded in the
inventory, and renamed only once the key is checked against the certificate
(``renew`` repairs files a crash left between the renames). Each file of the CA is read
only by the commands that need it, and a damaged one is named in a one-line
error: ``ls`` keeps working whatever happens to the keys and certificates.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.fsutil import (
    FileProblem,
    atomic_write,
    open_nofollow,
    read_regular,
    same_file,
    sweep_temp_files,
    write_bytes_atomic,
)
from taxiway.pki import inventory, profile
from taxiway.pki.inventory import Record
from taxiway.pki.layout import (  # noqa: F401 (re-exported)
    CRL,
    CRL_NUMBER,
    INTER,
    INTER_KEY,
    INVENTORY,
    META,
    ROOT,
    ROOT_CRL,
    ROOT_KEY,
    default_dir,
)
from taxiway.pki.names import (
    Name,
    Names,
    cn_as_dns,
    parse_constraint,
    parse_names,
    within_constraints,
)

if TYPE_CHECKING:
    import ssl

_log = logging.getLogger("taxiway.pki")
_held = threading.local()  # CA directories whose lock this thread holds (the lock is re-entrant)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the CA directory; every write to the CA takes it.

    flock(2) on ``.lock``: released by the kernel if the process dies, so a crash
    never leaves the CA locked. Re-entrant within a thread.
    """
    held: set[str] = _held.__dict__.setdefault("dirs", set())
    key = str(Path(directory).resolve())
    if key in held:
        yield
        return
    try:
        fd = open_nofollow(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except FileProblem as e:
        raise TaxiwayError(f"the CA lock file {directory / '.lock'} {e}", f"remove it: rm {directory / '.lock'}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)


def _spki(key: profile.PrivateKey | profile.PublicKey) -> bytes:
    pub = key.public_key() if hasattr(key, "private_bytes") else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[union-attr]


def already_issued(path: str | os.PathLike, names: list[str]) -> TaxiwayError:
    """The error for a key or PKCS#12 file that exists: another issue got there first."""
    what = ", ".join(names) or "a certificate"
    return TaxiwayError(f"{path} already exists: a key for {what} was already issued",
                        "use --force to replace it")


def serial_hex(serial: int) -> str:
    """The inventory's spelling of a serial: 32 lower-case hex digits."""
    return f"{serial:032x}"


def _sweep_temp_files(paths: Iterable[str | os.PathLike]) -> None:
    """Remove temp files a crashed write left beside ``paths`` (keys among them). Call under the CA's lock."""
    for p in {str(Path(p)) for p in paths}:
        sweep_temp_files(p)


def distinct_outputs(paths: Iterable[str | os.PathLike | None]) -> None:
    """Refuse two outputs that are one file (same path, other spellings, links): one would overwrite the other."""
    if pair := same_file(paths):
        raise InvalidInput(f"{pair[0]} and {pair[1]} are the same file: the key, chain and PKCS#12 file would "
                           "overwrite each other", "give each output its own path")


def check_public_key(key: Any) -> None:
    """Refuse keys clients reject or that are weak: RSA under 2048 bits, curves other than P-256/384/521."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidInput(f"the key is RSA {key.key_size}, which is too weak to sign",
                               "make the CSR with an RSA key of 2048 bits or more, or ECDSA P-256")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise InvalidInput(f"the key is on curve {key.curve.name}, which TLS clients do not accept",
                               "make the CSR with ECDSA P-256 (or P-384), or RSA 2048+")
        return
    raise InvalidInput(f"the key is {type(key).__name__.removeprefix('_')}, which taxiway does not sign",
                       "make the CSR with ECDSA P-256 (or P-384), or RSA 2048+")


@dataclass(frozen=True)
class Leaf:
    """An issued certificate: the leaf PEM, its key PEM (None for CSRs) and the chain to serve."""

    cert_pem: bytes
    key_pem: bytes | None
    chain_pem: bytes  # leaf + intermediate: what a server presents
    serial: int
    names: list[str]
    not_before: datetime
    not_after: datetime
    cn: str | None = None
    client: bool = False
    key_type: str = profile.DEFAULT_LEAF_KEY
    _cert: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed leaf certificate."""
        return self._cert or x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, cert_file: str | os.PathLike, key_file: str | os.PathLike | None = None, *,
              force: bool = False, p12_file: str | os.PathLike | None = None,
              p12_password: str = "changeit", before_rename: Callable[[], None] | None = None) -> None:
        """Write the chain to ``cert_file`` (0644), the key to ``key_file`` (0600), and a PKCS#12 bundle.

        The files are one unit: each is written to a temp name beside it, the
        key is checked against the certificate, and only then are they renamed
        into place (if any write fails, none is renamed). Refuses to replace an
        existing key or PKCS#12 file unless ``force``: a key you lose is a
        server you cannot restart. (Use :meth:`CA.save` to do this under the
        CA's lock, so that two processes cannot both pass that check.)
        ``before_rename`` runs once every temp file is written; if it raises, nothing is replaced.
        """
        distinct_outputs([cert_file, key_file if self.key_pem is not None else None, p12_file])
        files: list[tuple[str | os.PathLike, bytes, int]] = []
        if key_file is not None and self.key_pem is not None:
            key = serialization.load_pem_private_key(self.key_pem, None)
            if _spki(key) != _spki(self.certificate.public_key()):  # type: ignore[arg-type]
                raise TaxiwayError(f"the key for {key_file} does not match its certificate",
                                   "this is a bug in taxiway; nothing was written")
            files.append((key_file, self.key_pem, 0o600))
        if p12_file is not None:
            files.append((p12_file, self.pkcs12(p12_password), 0o600))
        if not force:
            for path, _, _ in files:
                if os.path.lexists(path):
                    raise already_issued(path, self.names)
        files.append((cert_file, self.chain_pem, 0o644))
        try:
            with contextlib.ExitStack() as stack:
                # atomic_write renames on exit, in reverse order; an exception in any
                # step unwinds the rest, which then delete their temp files instead
                for path, data, mode in files:
                    stack.enter_context(atomic_write(path, mode=mode)).write(data)
                if before_rename is not None:
                    before_rename()
        except OSError as e:
            raise TaxiwayError(f"cannot write {e.filename or path}: {e.strerror or e}",
                               "check the path and its permissions; no file was replaced") from None

    @contextlib.contextmanager
    def files(self) -> Iterator[tuple[Path, Path]]:
        """(chain file, key file) in a private temp directory, removed on exit.

        For servers that only take paths, such as uvicorn's ssl_certfile/ssl_keyfile.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="taxiway-leaf-") as d:
            cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
            self.write(cert, key if self.key_pem is not None else None)
            yield cert, key

    def pkcs12(self, password: str = "changeit") -> bytes:
        """A PKCS#12 bundle of the key, the leaf and the intermediate (mkcert's default password)."""
        from cryptography.hazmat.primitives.serialization import pkcs12

        if self.key_pem is None:
            raise InvalidInput("no private key for a PKCS#12 file", "a certificate issued from a CSR has its key elsewhere")
        key = serialization.load_pem_private_key(self.key_pem, None)
        chain = x509.load_pem_x509_certificates(self.chain_pem)[1:]
        enc = (serialization.BestAvailableEncryption(password.encode()) if password
               else serialization.NoEncryption())
        return pkcs12.serialize_key_and_certificates(b"taxiway", key, self.certificate, chain, enc)  # type: ignore[arg-type]


class CA:
    """A taxiway certificate authority stored in a directory.

    ``CA.init(dir)`` creates one (idempotently), ``CA.load(dir)`` opens it, and
    ``ca.issue(["web.internal"])`` returns a :class:`Leaf`. Safe to use from
    several processes at once: every write takes the CA's lock. Each file is
    read when first needed, so a damaged one only stops what needs it; problems
    that do not stop anything (a CA directory others may write, a bad inventory
    line) go to ``warn`` (default: the ``taxiway.pki`` logger).
    """

    def __init__(self, directory: Path, warn: Callable[[str], None] | None = None):
        self.dir = Path(directory)
        self._warn_to = warn or _log.warning
        self._warned: set[str] = set()
        try:
            self.root_pem = read_regular(self.dir / ROOT)
        except FileNotFoundError:
            raise NotFound(f"no CA in {self.dir}", "run `taxiway ca init` first") from None
        except FileProblem as e:
            raise self._damaged(ROOT, "the root certificate", str(e)) from None
        except OSError as e:
            raise TaxiwayError(f"cannot read the CA in {self.dir}: {e.strerror}", "check its permissions") from None
        self._check_modes()

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._warn_to(msg)

    def _check_modes(self) -> None:
        """Warn, as ssh does, about a CA directory others may write and a root key others may read."""
        mode = stat.S_IMODE(self.dir.stat().st_mode)
        if mode & 0o022:
            self._warn(f"the CA directory {self.dir} is writable by others (mode {mode:04o}), who could replace "
                       f"its keys and certificates; chmod 700 {self.dir}")
        root_key = self.dir / ROOT_KEY
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(root_key.stat().st_mode)
            if mode & 0o077:
                self._warn(f"the root key {root_key} is accessible by others (mode {mode:04o}); chmod 400 {root_key}")
        for name in (INVENTORY, META):
            if problem := self._writable_by_others(name):
                self._warn(problem)

    def _writable_by_others(self, name: str) -> str | None:
        """A warning if group or others may write ``name`` (it says which files renew writes, and the constraints)."""
        path = self.dir / name
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:
            return None
        if not mode & 0o022:
            return None
        return (f"{path} is writable by others (mode {mode:04o}), who could choose which files `ca renew` "
                f"overwrites or lift the name constraints; chmod 600 {path}")
    def _damaged(self, name: str, what: str, problem: str) -> TaxiwayError:
        return TaxiwayError(f"{what} {self.dir / name} {problem}",
                            f"restore it from a backup (or move {self.dir} away and run `taxiway ca init` for a new CA)")

    def _read(self, name: str, what: str) -> bytes:
        try:
            return read_regular(self.dir / name)
        except FileNotFoundError:
            raise self._damaged(name, what, "is missing") from None
        except FileProblem as e:
            raise self._damaged(name, what, str(e)) from None
        except OSError as e:
            raise TaxiwayError(f"cannot read {what} {self.dir / name}: {e.strerror}", "run as the CA's owner") from None

    def _cert(self, name: str, what: str, data: bytes) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise self._damaged(name, what, f"is corrupt ({str(e).splitlines()[0][:80]})") from None

    @cached_property
    def root(self) -> x509.Certificate:
        """The root certificate (only ``install``, ``root --pem`` and TLS contexts need it parsed)."""
        return self._cert(ROOT, "the root certificate", self.root_pem)

    @cached_property
    def intermediate_pem(self) -> bytes:
        return self._read(INTER, "the intermediate certificate")

    @cached_property
    def intermediate(self) -> x509.Certificate:
        return self._cert(INTER, "the intermediate certificate", self.intermediate_pem)

    @cached_property
    def _meta(self) -> dict[str, Any]:
        """ca.json, checked: the key type and name constraints chosen at init."""
        data = self._read(META, "the CA settings file")
        if problem := self._writable_by_others(META):
            raise TaxiwayError(problem.rsplit("; ", 1)[0], problem.rsplit("; ", 1)[1])
        try:
            meta = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise self._damaged(META, "the CA settings file", f"is corrupt (not JSON: {e})") from None
        problem = None
        if not isinstance(meta, dict):
            problem = "not a JSON object"
        elif not isinstance(meta.get("key_type", profile.DEFAULT_CA_KEY), str):
            problem = "key_type is not a string"
        elif not isinstance(meta.get("constraints", []), list):
            problem = "constraints is not a list"
        else:
            for c in meta.get("constraints", []):
                try:
                    if not isinstance(c, dict) or c.get("kind") not in ("dns", "ip") or not isinstance(c.get("value"), str):
                        raise InvalidInput("bad")
                    parse_constraint(c["value"])
                except InvalidInput:
                    problem = f"invalid name constraint {c!r}"
                    break
        if problem:
            raise self._damaged(META, "the CA settings file", f"is corrupt ({problem})")
        return meta

    @property
    def key_type(self) -> str:
        return self._meta.get("key_type", profile.DEFAULT_CA_KEY)

    @property
    def constraints(self) -> list[Name]:
        return [Name(c["kind"], c["value"]) for c in self._meta.get("constraints", [])]

    # -- creating and opening -------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None, *, warn: Callable[[str], None] | None = None) -> CA:
        """Open the CA in ``directory`` (default: :func:`default_dir`); NotFound if there is none."""
        return cls(Path(directory) if directory is not None else default_dir(), warn)

    @classmethod
    def exists(cls, directory: str | os.PathLike | None = None) -> bool:
        d = Path(directory) if directory is not None else default_dir()
        return (d / ROOT).exists()

    @classmethod
    def init(cls, directory: str | os.PathLike | None = None, *, key_type: str | None = None,
             constraints: Iterable[str | Name] = ()) -> tuple[CA, bool]:
        """Create a root and an intermediate in ``directory``; return (ca, created).

        Idempotent: if a CA is already there, nothing changes and created is False;
        but asking for a key type or name constraints it does not have is an error
        (they cannot be changed without a new CA).
        """
        d = Path(directory) if directory is not None else default_dir()
        if key_type is not None and key_type not in profile.KEY_TYPES:
            raise InvalidInput(f"unknown key type {key_type!r}", f"use one of {', '.join(profile.KEY_TYPES)}")
        cons = [c if isinstance(c, Name) else parse_constraint(c) for c in constraints]
        if (d / ROOT).exists():
            return cls._existing(d, key_type, cons), False
        if not d.exists():
            d.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)  # whatever the umask
        else:
            cls._own_directory(d)
        with _locked(d):  # two inits at once must not mix their keys
            if (d / ROOT).exists():
                return cls._existing(d, key_type, cons), False
            cls._create(d, key_type or profile.DEFAULT_CA_KEY, cons)
        return cls(d), True

    @classmethod
    def _existing(cls, d: Path, key_type: str | None, cons: list[Name]) -> CA:
        """The CA already in ``d``, refused if the caller asked for other settings than it has."""
        the_ca = cls(d)
        if key_type is None and not cons:
            return the_ca
        asked, has = [], []
        if key_type is not None and key_type != the_ca.key_type:
            asked.append(key_type)
            has.append(the_ca.key_type)
        if cons and set(cons) != set(the_ca.constraints):
            asked.append("name constraints " + ", ".join(c.value for c in cons))
            has.append("name constraints " + (", ".join(c.value for c in the_ca.constraints) or "none"))
        if asked:
            raise InvalidInput(f"a CA already exists in {d} with {'; '.join(has)}, not {'; '.join(asked)}",
                               f"a CA's keys and constraints cannot change: move {d} away and run `taxiway ca init` "
                               "again for a new CA (and re-issue its certificates)")
        return the_ca

    @staticmethod
    def _own_directory(d: Path) -> None:
        """An existing directory for a new CA: made 0700 if it is ours, refused if others may write it."""
        st = d.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{d} is not a directory", "point TAXIWAY_CAROOT at a directory (or a path that does not exist)")
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid == os.geteuid():
            if mode & 0o077:
                os.chmod(d, 0o700)  # the keys go in here: as if we had created it
        elif mode & 0o022:
            raise TaxiwayError(f"{d} belongs to another user and others may write it (mode {mode:04o}): they could "
                               "replace the CA's keys", "point TAXIWAY_CAROOT at a directory of your own")

    @staticmethod
    def _create(d: Path, key_type: str, cons: list[Name]) -> None:
        root_key = profile.generate_key(key_type)
        root = profile.make_root(root_key, constraints=cons)
        inter_key = profile.generate_key(key_type)
        inter = profile.make_intermediate(inter_key, root, root_key, constraints=cons)
        pem = serialization.Encoding.PEM
        write_bytes_atomic(d / ROOT_KEY, profile.key_to_pem(root_key), mode=0o400)
        write_bytes_atomic(d / INTER_KEY, profile.key_to_pem(inter_key), mode=0o600)
        write_bytes_atomic(d / INTER, inter.public_bytes(pem))
        root_crl = profile.make_crl(root, root_key, [], next_update=root.not_valid_after_utc - profile.now())
        write_bytes_atomic(d / ROOT_CRL, root_crl.public_bytes(pem))
        meta = {"version": 1, "key_type": key_type, "created": profile.now().isoformat(),
                "constraints": [{"kind": c.kind, "value": c.value} for c in cons]}
        write_bytes_atomic(d / META, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")
        write_bytes_atomic(d / ROOT, root.public_bytes(pem))  # last: marks the CA complete

    # -- issuing --------------------------------------------------------------

    @cached_property
    def intermediate_key(self) -> profile.PrivateKey:
        """The intermediate's key, refused (as ssh refuses keys) if others may read it or it is not the cert's."""
        path = self.dir / INTER_KEY
        data = self._read(INTER_KEY, "the intermediate key")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise TaxiwayError(f"the intermediate key {path} is accessible by others (mode {mode:04o}); "
                               "it signs every certificate, so it is not used", f"chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise self._damaged(INTER_KEY, "the intermediate key", f"is corrupt ({str(e).splitlines()[0][:80]})") from None
        if not isinstance(key, profile.PrivateKey):  # type: ignore[arg-type]
            raise self._damaged(INTER_KEY, "the intermediate key", f"is corrupt (a {type(key).__name__}, not ECDSA or RSA)")
        if _spki(key) != _spki(self.intermediate.public_key()):  # type: ignore[arg-type]
            raise TaxiwayError(f"the intermediate key {path} does not match the intermediate certificate "
                               f"{self.dir / INTER}: what it signs would not verify",
                               "restore the pair from a backup (or move the CA away and run `taxiway ca init`)")
        self._check_intermediate()
        return key  # type: ignore[return-value]

    def _check_intermediate(self) -> None:
        """Refuse an intermediate.pem that is not a CA certificate issued by root.pem: nothing it signs would verify."""
        inter = self.intermediate
        try:
            bc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except (x509.ExtensionNotFound, ValueError):
            is_ca = False
        problem = None
        if not is_ca:
            problem = "is not a CA certificate (no CA:TRUE), so what it signs would not verify"
        elif _spki(inter.public_key()) == _spki(self.root.public_key()):  # type: ignore[arg-type]
            problem = "is the root certificate, not the intermediate"
        else:
            try:
                inter.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature):
                problem = f"was not issued by this CA's root {self.dir / ROOT} (another CA's?)"
        if problem:
            raise self._damaged(INTER, "the intermediate certificate", problem)

    def check_names(self, names: Names, cn: str | None = None) -> None:
        """Refuse names (and a host-like CN) outside the CA's name constraints: clients would reject them."""
        if not self.constraints:
            return
        as_dns = cn_as_dns(cn, names)
        for n in names.ordered() + ([as_dns] if as_dns else []):
            if not within_constraints(n, self.constraints):
                allowed = ", ".join(c.value for c in self.constraints)
                raise InvalidInput(f"{n.value} is outside this CA's name constraints",
                                   f"this CA may only issue for {allowed}")

    def issue(self, names: Iterable[str] | Names, *, client: bool = False, cn: str | None = None,
              validity: timedelta | None = None, not_before: datetime | None = None,
              key_type: str | None = None, public_key: profile.PublicKey | None = None,
              record: bool = True) -> Leaf:
        """Issue a leaf for ``names`` (host names, wildcards, IPs, emails, URIs).

        ``validity`` defaults to mkcert's 2 years 3 months; pass hours for
        short-lived service certificates. ``public_key`` signs a key you hold
        (from a CSR) instead of generating one. ``record`` adds the certificate
        to the inventory (``taxiway ca ls``, revoke, renew).
        """
        parsed = names if isinstance(names, Names) else parse_names(list(names))
        self.check_names(parsed, cn)
        self.intermediate_key  # noqa: B018 - refuse a damaged or foreign intermediate before anything else
        at = not_before + profile.BACKDATE if not_before is not None else None
        nb, na = profile.leaf_validity(validity=validity, at=at)
        limit = self.intermediate.not_valid_after_utc
        if na > limit:
            raise InvalidInput(f"the certificate would outlive the intermediate (expires {limit:%Y-%m-%d})",
                               "ask for a shorter validity")
        key = None
        if public_key is not None:
            check_public_key(public_key)
        if public_key is None:
            key = profile.generate_key(key_type or profile.DEFAULT_LEAF_KEY)
            public_key = key.public_key()
        cert = profile.make_leaf(public_key, self.intermediate, self.intermediate_key, parsed, client=client,
                                 cn=cn, not_before=nb, not_after=na)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        leaf = Leaf(cert_pem=cert_pem, key_pem=profile.key_to_pem(key) if key is not None else None,
                    chain_pem=cert_pem + self.intermediate_pem, serial=cert.serial_number,
                    names=parsed.values(), not_before=nb, not_after=na, cn=cn, client=client,
                    key_type=profile.key_type_of(public_key), _cert=cert)
        if record:
            self.record(leaf, validity=validity, csr=key is None)
        return leaf

    def issue_csr(self, csr_pem: bytes, names: Iterable[str] = (), **kw) -> Leaf:
        """Sign the public key of a PEM or DER CSR; its SANs are used unless ``names`` are given."""
        csr = load_csr(csr_pem)
        if not names:
            names = csr_names(csr)
        return self.issue(names, public_key=csr.public_key(), **kw)  # type: ignore[arg-type]

    def save(self, leaf: Leaf, cert_file: str | os.PathLike, key_file: str | os.PathLike | None = None, *,
             p12_file: str | os.PathLike | None = None, p12_password: str = "changeit", force: bool = False,
             validity: timedelta | None = None, csr: bool = False) -> Record:
        """Write a leaf's files as one unit (see :meth:`Leaf.write`) and record it, under the CA's lock.

        Of several processes saving to the same key file at once, exactly one
        succeeds; the others fail with "already issued" (unless ``force``).
        """
        with _locked(self.dir):
            outputs = [cert_file, key_file, p12_file]
            self.check_outputs(outputs)
            _sweep_temp_files(p for p in outputs if p is not None)
            rec, ev = self._issued_event(leaf, validity, csr, cert_file, key_file, p12_file)
            # recorded before the files are renamed into place, so a crash between the renames
            # leaves a serial that can be revoked, and `ca renew` repairs the pair
            leaf.write(cert_file, key_file, force=force, p12_file=p12_file, p12_password=p12_password,
                       before_rename=lambda: inventory.append(self.dir / INVENTORY, ev, *self._supersede(rec)))
            return rec

    def check_outputs(self, paths: Iterable[str | os.PathLike | None]) -> None:
        """Refuse output paths inside the CA directory (they could replace its keys, certificates or CRL)."""
        ca_real = os.path.realpath(self.dir)
        for p in paths:
            if p is None:
                continue
            real = os.path.realpath(p)
            if real == ca_real or real.startswith(ca_real.rstrip(os.sep) + os.sep):
                raise InvalidInput(f"{p} is inside the CA directory {self.dir}: writing it could replace the CA's "
                                   "own files", "write certificates, keys and CRLs outside $TAXIWAY_CAROOT")
        distinct_outputs(paths)

    def _supersede(self, new: Record) -> list[dict[str, Any]]:
        """"renewed" events for the current records written to any of ``new``'s files: it replaces them."""
        files = {f for f in (new.cert_file, new.key_file, new.p12_file) if f}
        return [{"event": "renewed", "serial": r.serial, "by": new.serial}
                for r in self._inventory().values()
                if r.serial != new.serial and not r.revoked_at and not r.renewed_by
                and files & {f for f in (r.cert_file, r.key_file, r.p12_file) if f}]

    def _issued_event(self, leaf: Leaf, validity: timedelta | None, csr: bool, cert_file: str | os.PathLike | None,
                      key_file: str | os.PathLike | None, p12_file: str | os.PathLike | None
                      ) -> tuple[Record, dict[str, Any]]:
        def ab(p: str | os.PathLike | None) -> str | None:
            return str(Path(p).resolve()) if p is not None else None

        rec = Record(serial=leaf.serial_hex, names=leaf.names, not_before=leaf.not_before.isoformat(),
                     not_after=leaf.not_after.isoformat(), issued_at=profile.instant().isoformat(),
                     key_type=leaf.key_type, client=leaf.client, cn=leaf.cn,
                     validity_seconds=int(validity.total_seconds()) if validity is not None else None,
                     cert_file=ab(cert_file), key_file=ab(key_file), p12_file=ab(p12_file),
                     public_key=(leaf.certificate.public_key().public_bytes(
                         serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
                         if csr else None),
                     cert=leaf.cert_pem.decode())
        return rec, {"event": "issued", **{k: v for k, v in rec.__dict__.items() if k != "extra" and v is not None}}

    def record(self, leaf: Leaf, *, validity: timedelta | None = None, csr: bool = False,
               cert_file: str | os.PathLike | None = None, key_file: str | os.PathLike | None = None,
               p12_file: str | os.PathLike | None = None) -> Record:
        """Add an issued leaf to the inventory, with the files it was written to."""
        rec, ev = self._issued_event(leaf, validity, csr, cert_file, key_file, p12_file)
        with _locked(self.dir):
            inventory.append(self.dir / INVENTORY, ev)
        return rec

    # -- inventory, revocation, renewal -----------------------------------------

    def _inventory(self) -> dict[str, Record]:
        return inventory.read(self.dir / INVENTORY, warn=self._warn)

    def records(self) -> list[Record]:
        """Every certificate in the inventory, oldest first (bad lines are skipped with a warning)."""
        return list(self._inventory().values())

    def find(self, serial: str) -> Record:
        """The record whose serial is (or starts with) ``serial``: hex, colons and case ignored."""
        s = serial.lower().replace(":", "").removeprefix("0x")
        if not s or any(c not in "0123456789abcdef" for c in s):
            raise InvalidInput(f"invalid serial {serial!r}", "give the hex serial shown by `taxiway ca ls`")
        recs = self._inventory()
        if s.lstrip("0") and len(s) < 32:
            matches = [r for r in recs.values() if r.serial.lstrip("0").startswith(s.lstrip("0"))]
        else:
            matches = [r for r in recs.values() if r.serial == s.rjust(32, "0")]
        if not matches:
            raise NotFound(f"no certificate with serial {serial} in this CA", "see `taxiway ca ls`")
        if len(matches) > 1:
            raise InvalidInput(f"serial prefix {serial} matches {len(matches)} certificates", "give more digits")
        return matches[0]

    def revoke(self, serial: str) -> tuple[Record, bool]:
        """Revoke a certificate and rewrite crl.pem; return (record, newly_revoked).

        Nothing is recorded unless the CRL can be signed, so a revocation is never
        left out of crl.pem.
        """
        with _locked(self.dir):  # so a CRL written by a concurrent revoke cannot replace this one's
            rec = self.find(serial)
            if rec.revoked_at:
                return rec, False
            self.intermediate_key  # noqa: B018 - refuse a damaged key before recording anything
            rec.revoked_at = profile.now().isoformat()
            inventory.append(self.dir / INVENTORY, {"event": "revoked", "serial": rec.serial, "at": rec.revoked_at})
            self._write_crl(timedelta(days=7))
        return rec, True

    def crl_pem(self, next_update: timedelta = timedelta(days=7)) -> bytes:
        """Fresh CRLs in PEM: the intermediate's, listing every revoked leaf, then the root's.

        nextUpdate is clamped to the intermediate's expiry; the CRL number comes
        from a counter in the CA directory, so it never goes backwards with the clock.
        """
        with _locked(self.dir):
            revoked = [(int(r.serial, 16), datetime.fromisoformat(r.revoked_at))
                       for r in self.records() if r.revoked_at]
            at = profile.now()
            limit = self.intermediate.not_valid_after_utc
            next_update = min(next_update, max(limit - at, timedelta(0)))
            crl = profile.make_crl(self.intermediate, self.intermediate_key, revoked, at=at,
                                   next_update=next_update, number=self._next_crl_number(at))
        try:
            root_crl = read_regular(self.dir / ROOT_CRL)
        except FileNotFoundError:
            root_crl = b""
        except (OSError, FileProblem) as e:
            raise self._damaged(ROOT_CRL, "the root's CRL", str(e)) from None
        return crl.public_bytes(serialization.Encoding.PEM) + root_crl

    def _next_crl_number(self, at: datetime) -> int:
        """One more than the last CRL number (at least the time in ms, as numbers were before the counter)."""
        path = self.dir / CRL_NUMBER
        try:
            last = int(read_regular(path, 64, nofollow=True).strip() or b"0")
        except (OSError, FileProblem, ValueError):
            last = 0
        n = max(last + 1, int(at.timestamp() * 1000))
        with contextlib.suppress(OSError):  # a read-only CA (a server using ssl_context) still gets a CRL
            write_bytes_atomic(path, b"%d\n" % n, mode=0o600)
        return n

    def write_crl(self, next_update: timedelta = timedelta(days=7)) -> Path:
        """Write a fresh CRL to ``crl.pem`` in the CA directory and return its path."""
        with _locked(self.dir):
            return self._write_crl(next_update)

    def _write_crl(self, next_update: timedelta) -> Path:
        data = self.crl_pem(next_update)
        try:
            write_bytes_atomic(self.dir / CRL, data)
        except OSError as e:
            raise TaxiwayError(f"cannot write the CRL {self.dir / CRL}: {e.strerror or e}",
                               f"remove whatever is in its place (rm -r {self.dir / CRL}) and run `taxiway ca crl`"
                               ) from None
        return self.dir / CRL

    def due(self, before: timedelta, at: datetime | None = None, *, started: datetime | None = None) -> list[Record]:
        """Current certificates written to files that expire within ``before`` (or already have).

        Certificates issued at or after ``started`` (a renewal run's start) are not
        due: another run renewed them meanwhile, and renewing again would loop.
        """
        at = at or profile.now()
        return [r for r in self._current()
                if datetime.fromisoformat(r.not_after) - at <= before
                and (started is None or datetime.fromisoformat(r.issued_at) < started)]

    def file_problem(self, rec: Record) -> str | None:
        """Why ``rec``'s files do not hold it (another serial, a key that does not match), or None.

        Missing files are not a problem (they may have been moved on purpose);
        a pair left mismatched by a crash is, and ``renew`` repairs it.
        """
        if not rec.cert_file or rec.revoked_at or rec.renewed_by:
            return None
        try:
            certs = x509.load_pem_x509_certificates(read_regular(rec.cert_file))
        except FileNotFoundError:
            return None
        except (OSError, FileProblem, ValueError):
            return f"{rec.cert_file} is unreadable or not a certificate"
        if serial_hex(certs[0].serial_number) != rec.serial:
            return f"{rec.cert_file} holds serial {serial_hex(certs[0].serial_number)}, not {rec.serial}"
        if rec.key_file:
            try:
                key = serialization.load_pem_private_key(read_regular(rec.key_file), None)
            except FileNotFoundError:
                return f"its key {rec.key_file} is missing"
            except (OSError, FileProblem, ValueError, TypeError, UnsupportedAlgorithm):
                return f"its key {rec.key_file} is unreadable"
            if _spki(key) != _spki(certs[0].public_key()):  # type: ignore[arg-type]
                return f"its key {rec.key_file} does not match {rec.cert_file}"
        return None

    def broken(self) -> list[tuple[Record, str]]:
        """Current records whose files a crash left inconsistent, with the problem."""
        return [(r, p) for r in self._current() if (p := self.file_problem(r))]

    def _current(self) -> list[Record]:
        """Records written to files and still in them: not revoked or renewed, and not followed
        by a later record for the same file (inventories from before re-issuing superseded)."""
        live = [r for r in self.records() if not r.revoked_at and not r.renewed_by and r.cert_file]
        out, taken = [], set()
        for r in reversed(live):
            files = {f for f in (r.cert_file, r.key_file, r.p12_file) if f}
            if not files & taken:
                out.append(r)
            taken |= files
        return out[::-1]

    def _tracked_files(self) -> list[str]:
        return [f for r in self.records() if not r.revoked_at and not r.renewed_by
                for f in (r.cert_file, r.key_file, r.p12_file) if f]

    def renew_due(self, before: timedelta, on_renewed: Callable[[Record, Leaf], None] | None = None,
                  started: datetime | None = None) -> list[tuple[Record, Leaf]]:
        """Rewrite crl.pem, then renew every certificate that is :meth:`due` or :meth:`broken`; return (old, new) pairs.

        The whole run holds the CA's lock and decides what is due once it has it;
        certificates issued after ``started`` (default: now, before waiting for the
        lock) are left alone, so concurrent runs renew each certificate once.
        """
        started = started or profile.instant()
        with _locked(self.dir):
            if problem := self._writable_by_others(INVENTORY):
                raise TaxiwayError(problem.rsplit("; ", 1)[0] + "; not renewing from it", problem.rsplit("; ", 1)[1])
            _sweep_temp_files(self._tracked_files())
            self._write_crl(timedelta(days=7))
            todo = {r.serial: r for r in self.due(before, started=started)}
            todo.update((r.serial, r) for r, _ in self.broken())
            done = []
            for rec in todo.values():
                leaf = self.renew(rec)
                done.append((rec, leaf))
                if on_renewed is not None:
                    on_renewed(rec, leaf)
            return done

    def renew(self, rec: Record) -> Leaf:
        """Re-issue ``rec`` with the same names and options, replace its files, and record both.

        Under the CA's lock; refuses a certificate that was revoked or renewed
        meanwhile (by another process), so it is never renewed twice.
        """
        with _locked(self.dir):
            cur = self._inventory().get(rec.serial)
            if cur is None:
                raise NotFound(f"no certificate with serial {rec.serial} in this CA", "see `taxiway ca ls`")
            if cur.renewed_by or cur.revoked_at:
                state = f"renewed by {cur.renewed_by}" if cur.renewed_by else "revoked"
                raise TaxiwayError(f"certificate {rec.serial} was already {state}", "see `taxiway ca ls --all`")
            self.check_outputs([cur.cert_file, cur.key_file, cur.p12_file])
            validity = timedelta(seconds=cur.validity_seconds) if cur.validity_seconds else None
            public_key = (serialization.load_pem_public_key(cur.public_key.encode()) if cur.public_key else None)
            leaf = self.issue(cur.names, client=cur.client, cn=cur.cn, validity=validity,
                              key_type=None if public_key else cur.key_type,
                              public_key=public_key, record=False)  # type: ignore[arg-type]
            new, ev = self._issued_event(leaf, validity, public_key is not None, cur.cert_file, cur.key_file,
                                         cur.p12_file)
            # one write, before the renames: the new certificate and the "renewed" marks of the
            # records it replaces (this one, and any other written to the same files)
            events = [ev, *self._supersede(new)]
            if not any(e["serial"] == cur.serial for e in events[1:]):
                events.append({"event": "renewed", "serial": cur.serial, "by": leaf.serial_hex})
            if cur.cert_file:
                leaf.write(cur.cert_file, cur.key_file, force=True, p12_file=cur.p12_file,
                           before_rename=lambda: inventory.append(self.dir / INVENTORY, *events))
            else:
                inventory.append(self.dir / INVENTORY, *events)
            return leaf

    # -- TLS --------------------------------------------------------------------

    def ssl_context(self, leaf: Leaf | None = None, *, server: bool = False, client_auth: str = "none",
                    check_crl: bool = False) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` trusting this CA; see :func:`taxiway.pki.tls.context`."""
        from taxiway.pki.tls import context

        return context(self, leaf, server=server, client_auth=client_auth, check_crl=check_crl)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and check its self-signature; InvalidInput if it is not one."""
    try:
        csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data))
    except ValueError as e:
        raise InvalidInput(f"malformed CSR ({e})", "give a PEM or DER certificate signing request") from None
    if not csr.is_signature_valid:
        raise InvalidInput("the CSR's signature does not verify", "create the CSR again with its own key")
    return csr


def csr_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """The names a CSR asks for: its SANs, else its CN."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    out: list[str] = []
    if san is not None:
        out += [str(v) for v in san.get_values_for_type(x509.DNSName)]
        out += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        out += [str(v) for v in san.get_values_for_type(x509.RFC822Name)]
        out += [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    if not out:
        out = [str(a.value) for a in csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    if not out:
        raise InvalidInput("the CSR names no host", "put the names in its subjectAltName or pass them as arguments")
    return out
