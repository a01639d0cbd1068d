"""App secrets sealed at rest with an AEAD key; only names and digests ever leave the platform.

    key = load_key()                               # $TAXIWAY_HOME/platform/secrets.key, 0600, made once
    rec = record("myapp", "DATABASE_URL", "postgres://...", key)   # what the SECRETS bucket stores
    unseal("myapp", "DATABASE_URL", rec["sealed"], key)            # the agent, at machine start

ChaCha20-Poly1305 with a random 96-bit nonce per seal; the app and the name are the
associated data, so a sealed value copied to another app or name does not open.
The digest is an HMAC of the value under a key derived from the sealing key, so it
tells a changed value from an unchanged one without letting anyone test guesses
against it offline (a plain SHA-256 of a short password would).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Any

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.platform import schema

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = b"\x01"  # sealed = version || nonce || ciphertext+tag; a later key scheme gets another byte
MAX_VALUE = 64 * 1024  # an environment variable; Fly's limit is about this


class SealError(TaxiwayError):
    """A sealed value does not open: another key, app or name, or it was changed."""


def key_path(home: Path | None = None) -> Path:
    from taxiway import paths

    return (home or paths.home()) / "platform" / "secrets.key"


def load_key(path: Path | None = None, create: bool = True) -> bytes:
    """The sealing key; made (0600, atomically: written aside, then linked in) if missing and ``create``.

    Two processes starting at once both end up with the same key: the link fails for the
    second, which then reads the first one's file.
    """
    path = path or key_path()
    for _ in range(2):
        try:
            return _read_key(path)
        except FileNotFoundError:
            if not create:
                raise TaxiwayError(f"the secrets key {path} does not exist", "start the platform with 'taxiway up'") from None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        from taxiway.fsutil import atomic_write

        # exclusive: linked in, never replacing a key someone else made first (we then read theirs).
        # fsync_dir: a key whose name a power cut lost would leave every sealed secret unreadable.
        with contextlib.suppress(FileExistsError), atomic_write(path, 0o600, exclusive=True, fsync_dir=True) as f:
            f.write(os.urandom(KEY_BYTES))
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise TaxiwayError(f"the secrets key {path} is readable by others (mode {st.st_mode & 0o777:o})",
                               f"chmod 600 {path}")
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise TaxiwayError(f"the secrets key {path} is damaged ({len(data)} bytes, not {KEY_BYTES})",
                           "restore it from a backup; sealed secrets cannot be opened without it")
    return data


def check_name(name: str) -> str:
    """A secret's name becomes an environment variable: refuse anything else."""
    if not isinstance(name, str) or not schema.valid_secret_name(name):
        raise InvalidInput(f"invalid secret name {name!r}",
                           "use letters, digits and '_', not starting with a digit (at most 128)")
    return name


def _aad(app: str, name: str) -> bytes:
    return f"taxiway-secret\0{app}\0{name}".encode()


def seal(app: str, name: str, value: str, key: bytes) -> str:
    """The value encrypted for (app, name), base64."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    check_name(name)
    if "\x00" in value:
        # an environment variable cannot hold NUL: every machine would fail at start ("embedded null byte")
        raise InvalidInput(f"secret {name}'s value contains a NUL byte", "environment values cannot hold NUL; "
                           "encode binary data, e.g. base64")
    data = value.encode()
    if len(data) > MAX_VALUE:
        raise InvalidInput(f"secret {name} is {len(data)} bytes, more than {MAX_VALUE}", "store large data in a volume")
    nonce = os.urandom(NONCE_BYTES)
    ct = ChaCha20Poly1305(key).encrypt(nonce, data, _aad(app, name))
    return base64.b64encode(VERSION + nonce + ct).decode()


def unseal(app: str, name: str, sealed: str, key: bytes) -> str:
    """The value back; :class:`SealError` if the key, app or name differ or the bytes were changed."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    try:
        raw = base64.b64decode(sealed, validate=True)
    except (ValueError, TypeError):
        raise SealError(f"secret {name} of {app} is not a sealed value", "set it again with 'taxiway secrets set'") from None
    if len(raw) < 1 + NONCE_BYTES + 16 or raw[:1] != VERSION:
        raise SealError(f"secret {name} of {app} is not a sealed value", "set it again with 'taxiway secrets set'")
    try:
        data = ChaCha20Poly1305(key).decrypt(raw[1:1 + NONCE_BYTES], raw[1 + NONCE_BYTES:], _aad(app, name))
    except InvalidTag:
        raise SealError(f"secret {name} of {app} does not open with this platform's key",
                        "set it again with 'taxiway secrets set' (was the key file replaced?)") from None
    return data.decode()


def digest(app: str, name: str, value: str, key: bytes) -> str:
    """A short keyed digest (hex) that changes when the value does; safe to show."""
    dkey = hashlib.sha256(b"taxiway-secret-digest\0" + key).digest()
    return hmac.new(dkey, _aad(app, name) + b"\0" + value.encode(), hashlib.sha256).hexdigest()[:16]


def record(app: str, name: str, value: str, key: bytes) -> dict[str, Any]:
    """What the SECRETS bucket holds for one secret."""
    return {"name": check_name(name), "sealed": seal(app, name, value, key), "digest": digest(app, name, value, key),
            "updated_at": time.time()}


def public(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as the API may show it: never the sealed bytes."""
    return {"name": rec["name"], "digest": rec["digest"], "updated_at": rec.get("updated_at")}


def unseal_all(app: str, records: list[dict[str, Any]], key: bytes) -> dict[str, str]:
    """name -> value for a machine's environment."""
    return {r["name"]: unseal(app, r["name"], r["sealed"], key) for r in records}
