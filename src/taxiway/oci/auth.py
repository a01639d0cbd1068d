"""Registry credentials and the token dance, as pure functions where possible.

- ``taxiway login`` stores basic credentials (0600) in ``config_dir()/auth.json``,
  in the same shape as docker's ``config.json`` (``{"auths": {host: {"auth": b64}}}``).
- ``~/.docker/config.json`` (or ``$DOCKER_CONFIG/config.json``) is read as well,
  including base64 ``auth``, ``username``/``password`` and ``identitytoken``.
- ``WWW-Authenticate`` challenges are parsed here; the client asks the token
  realm for ``repository:NAME:pull[,push]`` scopes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from taxiway.errors import InvalidInput

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """A username/password (or an identity token used as an OAuth2 refresh token)."""

    username: str
    password: str
    identity_token: str | None = None

    def basic_header(self) -> str:
        """The ``Authorization: Basic`` value."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` challenge."""

    scheme: str  # lower-cased: "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (or ``Basic realm=...``)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def scope(repository: str, actions: tuple[str, ...] = ("pull",)) -> str:
    """``repository:NAME:pull,push``."""
    return f"repository:{repository}:{','.join(actions)}"


def decode_auth(value: str) -> tuple[str, str]:
    """Decode docker's base64 ``user:password`` ``auth`` field."""
    try:
        raw = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=False).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise InvalidInput("a stored registry credential is not valid base64", "run `taxiway login` again") from e
    user, sep, password = raw.partition(":")
    if not sep:
        raise InvalidInput("a stored registry credential has no user:password", "run `taxiway login` again")
    return user, password


def _host_key(key: str) -> str:
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0]


def lookup(auths: dict, registry: str) -> Credentials | None:
    """Find credentials for ``registry`` in a docker-style ``auths`` mapping."""
    if not isinstance(auths, dict):
        return None
    wanted = {registry}
    if registry in _DOCKER_HUB_KEYS:
        wanted |= set(_DOCKER_HUB_KEYS)
    for key, entry in auths.items():
        if _host_key(key) not in wanted and key not in wanted or not isinstance(entry, dict):
            continue
        token = entry.get("identitytoken") or None
        if entry.get("auth"):
            user, password = decode_auth(entry["auth"])
            return Credentials(user, password, token)
        if entry.get("username") is not None:
            return Credentials(entry["username"], entry.get("password", ""), token)
        if token:
            return Credentials("<token>", "", token)
    return None


def taxiway_auth_file() -> Path:
    """Where ``taxiway login`` keeps credentials."""
    from taxiway.paths import config_dir

    return config_dir() / "auth.json"


def docker_config_file() -> Path:
    """docker's config.json ($DOCKER_CONFIG or ~/.docker)."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def _load(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError, OSError):
        raise InvalidInput(f"{path} is not valid JSON", "fix or remove it, then run `taxiway login` again") from None
    return obj if isinstance(obj, dict) else {}


def find_credentials(registry: str) -> Credentials | None:
    """Credentials for ``registry``: ``taxiway login`` first, then docker's config.json."""
    for path in (taxiway_auth_file(), docker_config_file()):
        creds = lookup(_load(path).get("auths", {}), registry)
        if creds:
            return creds
    return None


def save_credentials(registry: str, username: str, password: str) -> Path:
    """Store credentials for ``registry`` (file mode 0600, written atomically)."""
    from taxiway.fsutil import write_bytes_atomic

    path = taxiway_auth_file()
    data = _load(path)
    auths = data.setdefault("auths", {})
    auths[registry] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    write_bytes_atomic(path, json.dumps(data, indent=2).encode(), mode=0o600)
    return path


def remove_credentials(registry: str) -> bool:
    """Forget credentials for ``registry``; False if there were none."""
    from taxiway.fsutil import write_bytes_atomic

    path = taxiway_auth_file()
    data = _load(path)
    auths = data.get("auths", {})
    keys = [k for k in auths if k == registry or _host_key(k) == registry]
    if not keys:
        return False
    for k in keys:
        del auths[k]
    write_bytes_atomic(path, json.dumps(data, indent=2).encode(), mode=0o600)
    return True
