"""Where the CA lives and what its files are called (no heavy imports: `taxiway ca root` uses it)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT, ROOT_KEY = "root.pem", "root-key.pem"
INTER, INTER_KEY = "intermediate.pem", "intermediate-key.pem"
META, INVENTORY, CRL, ROOT_CRL = "ca.json", "inventory.jsonl", "crl.pem", "root-crl.pem"
CRL_NUMBER = "crlnumber"  # the last CRL number used, so numbers never go backwards with the clock


def default_dir() -> Path:
    """Where the CA lives: ``$TAXIWAY_CAROOT``, else ``$TAXIWAY_HOME/ca``."""
    env = os.environ.get("TAXIWAY_CAROOT")
    if env:
        return Path(env)
    from taxiway.paths import home

    return home() / "ca"
