"""Who is asking: roles from client certificates, a shared password or a users file.

Order (first that applies wins): the CN of a verified client certificate; a
``Proxy-Authorization: Basic`` password equal to ``$PROXY_PASSWORD`` gives the
role ``authed`` (Fly.io's convention); a user in the users file whose bcrypt
hash matches. Secrets are compared in constant time.

Users file: one ``name:bcrypt-hash[:role]`` per line (``htpasswd -B`` output
works as is); ``#`` starts a comment; the role defaults to the name.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from taxiway.errors import InvalidInput

AUTHED_ROLE = "authed"


@dataclass(frozen=True)
class User:
    name: str
    hash: bytes
    role: str


def parse_users(text: str, source: str = "users file") -> dict[str, User]:
    """Parse ``name:hash[:role]`` lines."""
    users: dict[str, User] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("$2"):
            raise InvalidInput(f"{source} line {n}: expected name:bcrypt-hash[:role]",
                               "make hashes with `taxiway egress hash-password` or `htpasswd -nB NAME`")
        name, hashed = parts[0], parts[1]
        role = parts[2] if len(parts) == 3 and parts[2] else name
        users[name] = User(name, hashed.replace("$2y$", "$2b$", 1).encode(), role)
    return users


def load_users(path: str | Path) -> dict[str, User]:
    path = Path(path)
    try:
        return parse_users(path.read_text(encoding="utf-8"), str(path))
    except OSError as e:
        raise InvalidInput(f"cannot read users file {path}: {e.strerror}",
                           "pass an existing file to --users") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"users file {path} is not UTF-8 text",
                           "write it as UTF-8 lines of name:bcrypt-hash[:role]") from None


def parse_basic(value: bytes | None) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` -> (user, password), or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


@functools.cache
def _dummy_hash() -> bytes:
    import bcrypt

    return bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(12))


# bcrypt reads at most 72 bytes of a password (bcrypt 5 raises past that; older ones and
# htpasswd cut silently). A longer password can't be verified as given: never a match.
BCRYPT_MAX = 72


def hash_password(password: str, rounds: int = 12) -> str:
    import bcrypt

    if len(password.encode()) > BCRYPT_MAX:
        raise InvalidInput(f"the password is {len(password.encode())} bytes; bcrypt uses at most {BCRYPT_MAX}",
                           f"choose a password of at most {BCRYPT_MAX} bytes")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


@dataclass
class Authenticator:
    """Maps credentials to a role. ``required`` says whether anonymous use is refused."""

    password: str | None = None
    users: dict[str, User] = field(default_factory=dict)
    client_certs: bool = False
    # Keyed HMACs of verified (user, password) -> role, so later requests skip bcrypt. Failures
    # go to a smaller cache of their own: a flood of wrong passwords can't evict good entries.
    _cache: dict[bytes, str] = field(default_factory=dict, repr=False)
    _failed: dict[bytes, None] = field(default_factory=dict, repr=False)
    _key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    MAX_CACHED = 10_000
    MAX_FAILED = 1_000

    @classmethod
    def from_env(cls, users: dict[str, User] | None = None, client_certs: bool = False) -> Authenticator:
        return cls(os.environ.get("PROXY_PASSWORD") or None, users or {}, client_certs)

    @property
    def required(self) -> bool:
        return bool(self.password or self.users or self.client_certs)

    def role_from_password(self, user: str, password: str) -> str | None:
        """The role for Basic credentials, or None; may take a bcrypt check (~0.1 s)."""
        if self.password is not None and hmac.compare_digest(password.encode(), self.password.encode()):
            return AUTHED_ROLE
        if not self.users:
            return None
        key = self._digest(user, password)
        if key in self._cache:
            return self._cache[key]
        if key in self._failed:
            return None
        import bcrypt

        found = self.users.get(user)
        secret = password.encode()
        # Unknown users are checked against a throwaway hash, so a miss takes as long as a hit.
        ok = bcrypt.checkpw(secret[:BCRYPT_MAX], found.hash if found else _dummy_hash())
        ok = ok and len(secret) <= BCRYPT_MAX
        if found and ok:
            _remember(self._cache, key, found.role, self.MAX_CACHED)
            return found.role
        _remember(self._failed, key, None, self.MAX_FAILED)
        return None

    def _digest(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def cached(self, user: str, password: str) -> tuple[bool, str | None]:
        """(known, role) without running bcrypt: lets the server skip a thread hop."""
        if self.password is not None and hmac.compare_digest(password.encode(), self.password.encode()):
            return True, AUTHED_ROLE
        if not self.users:
            return True, None
        key = self._digest(user, password)
        if key in self._cache:
            return True, self._cache[key]
        return key in self._failed, None


def _remember(cache: dict, key: bytes, value: object, limit: int) -> None:
    """Insert, dropping the oldest entry past ``limit`` (dicts keep insertion order)."""
    if len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


def cert_common_name(peercert: dict | None) -> str | None:
    """The CN of a verified peer certificate as returned by ``SSLObject.getpeercert()``."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return value
    return None
