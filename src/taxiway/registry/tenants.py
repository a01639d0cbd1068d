"""Organisations and their tokens, in SQLite under the registry root.

A token is shown once as ``txw_<id>_<secret>``; only the SHA-256 of the secret
is stored. The secret is 256 random bits, so a fast hash is as safe as a slow
one here, and keeps the token endpoint cheap.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from taxiway.errors import InvalidInput, NotFound, TaxiwayError

_ORG_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_TOKEN_RE = re.compile(r"^txw_([0-9a-f]{16})_([A-Za-z0-9_-]{20,})$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
  name TEXT PRIMARY KEY,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY,
  org TEXT NOT NULL REFERENCES orgs(name),
  hash TEXT NOT NULL,
  scope TEXT NOT NULL CHECK (scope IN ('pull', 'push')),
  created REAL NOT NULL,
  expires REAL,
  revoked REAL,
  repository TEXT
);
"""


@dataclass(frozen=True)
class Token:
    id: str
    org: str
    scope: str
    created: float
    expires: float | None
    revoked: float | None
    repository: str | None = None  # set: the token is good for this one repository of its org only

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked is None and (self.expires is None or now < self.expires)

    def to_json(self) -> dict:
        return {"id": self.id, "org": self.org, "scope": self.scope, "created": self.created,
                "expires": self.expires, "revoked": self.revoked, "active": self.active(),
                "repository": self.repository}


def valid_org(name: str) -> bool:
    return len(name) <= 64 and bool(_ORG_RE.match(name))


def parse_duration(s: str) -> float:
    """'30d', '12h', '15m', '45s' -> seconds."""
    m = re.fullmatch(r"(\d+)([smhdw])", s.strip())
    if not m:
        raise InvalidInput(f"invalid duration {s!r}", "use a number and a unit, like 30d, 12h, 15m or 45s")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


#: The longest lifetime a token may have (``--expires``); leave it out for a token that never expires.
MAX_TOKEN_LIFETIME = 3650 * 86400


def check_lifetime(seconds: float) -> float:
    """A token lifetime, refused when it is not positive or longer than ten years."""
    if seconds <= 0:
        raise InvalidInput("a token's lifetime must be positive",
                           "pass a duration such as 30d or 12h, or leave out --expires for a token that never expires")
    if seconds > MAX_TOKEN_LIFETIME:
        raise InvalidInput(f"a token's lifetime can be at most {MAX_TOKEN_LIFETIME // 86400}d (ten years)",
                           "pass a shorter duration, or leave out --expires for a token that never expires")
    return seconds


_TOKEN_COLUMNS = "id, org, scope, created, expires, revoked, repository"  # Token's fields, in order


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tenants:
    """The orgs and tokens database (one per registry root)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            # databases made before repository-scoped tokens: add the column (NULL: org-wide, as they were)
            if "repository" not in {r[1] for r in self._db.execute("PRAGMA table_info(tokens)")}:
                self._db.execute("ALTER TABLE tokens ADD COLUMN repository TEXT")
        self.path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def create_org(self, name: str) -> None:
        if not valid_org(name):
            raise InvalidInput(f"invalid org name {name!r}", "org names are lowercase [a-z0-9] words joined by . _ or -")
        with self._lock:
            try:
                self._db.execute("INSERT INTO orgs VALUES (?, ?)", (name, time.time()))
            except sqlite3.IntegrityError:
                raise TaxiwayError(f"org {name!r} already exists", "pick another name, or use it as it is") from None

    def orgs(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT o.name, o.created, COUNT(t.id) FROM orgs o LEFT JOIN tokens t"
                " ON t.org = o.name AND t.revoked IS NULL GROUP BY o.name ORDER BY o.name").fetchall()
        return [{"name": n, "created": c, "tokens": k} for n, c, k in rows]

    def has_org(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM orgs WHERE name = ?", (name,)).fetchone() is not None

    def create_token(self, org: str, scope: str = "push", expires_in: float | None = None,
                     repository: str | None = None) -> tuple[Token, str]:
        """A new token for ``org``; returns it and the secret string (shown once).

        With ``repository`` (a name as clients write it, inside the org) the token reaches that
        repository only: a deploy token of one app can't push or pull another app's images."""
        if scope not in ("pull", "push"):
            raise InvalidInput(f"invalid scope {scope!r}", "use --scope pull or --scope push")
        if repository is not None:
            from taxiway.oci.reference import valid_repository

            if not valid_repository(repository):
                raise InvalidInput(f"invalid repository name {repository!r}",
                                   "lowercase [a-z0-9] components joined by . _ - and /")
        if not self.has_org(org):
            raise NotFound(f"org {org!r} does not exist", f"create it with `taxiway registry org create {org}`")
        tid, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        if expires_in is not None:
            check_lifetime(expires_in)
        now = time.time()
        expires = now + expires_in if expires_in is not None else None
        with self._lock:
            self._db.execute("INSERT INTO tokens (id, org, hash, scope, created, expires, revoked, repository)"
                             " VALUES (?, ?, ?, ?, ?, ?, NULL, ?)", (tid, org, _hash(secret), scope, now, expires,
                                                                   repository))
        return Token(tid, org, scope, now, expires, None, repository), f"txw_{tid}_{secret}"

    def _row(self, row) -> Token:
        return Token(*row)

    def tokens(self, org: str | None = None) -> list[Token]:
        q = f"SELECT {_TOKEN_COLUMNS} FROM tokens"
        args: tuple = ()
        if org:
            q += " WHERE org = ?"
            args = (org,)
        with self._lock:
            return [self._row(r) for r in self._db.execute(q + " ORDER BY created", args)]

    def revoke(self, token_id: str) -> tuple[Token, bool]:
        """Revoke a token; returns it, and False when it had been revoked already."""
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                   (time.time(), token_id))
        if cur.rowcount == 0 and self.get(token_id) is None:
            raise NotFound(f"token {token_id!r} does not exist", "list tokens with `taxiway registry token ls`")
        return self.get(token_id), cur.rowcount == 1  # type: ignore[return-value]

    def get(self, token_id: str) -> Token | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return self._row(row) if row else None

    def authenticate(self, secret: str) -> Token | None:
        """The active token whose secret this is, or None."""
        m = _TOKEN_RE.match(secret or "")
        if not m:
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {_TOKEN_COLUMNS}, hash FROM tokens WHERE id = ?",
                                   (m.group(1),)).fetchone()
        if not row or not hmac.compare_digest(row[-1], _hash(m.group(2))):
            return None
        tok = self._row(row[:-1])
        return tok if tok.active() else None
