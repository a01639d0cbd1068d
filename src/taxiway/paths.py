"""Where taxiway keeps its state: $TAXIWAY_HOME (default ~/.local/share/taxiway)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The state directory; created on first use with mode 0700."""
    env = os.environ.get("TAXIWAY_HOME")
    if env:
        p = Path(env)
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        p = Path(base) / "taxiway"
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def store_dir() -> Path:
    """The local image store: a standard OCI image layout."""
    return home() / "store"


def config_dir() -> Path:
    """User configuration (credentials): $TAXIWAY_CONFIG or ~/.config/taxiway."""
    env = os.environ.get("TAXIWAY_CONFIG")
    p = Path(env) if env else Path(os.path.expanduser("~")) / ".config" / "taxiway"
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p
