"""taxiway's certificate authority: a root, an online intermediate, leaves, CRLs.

The API the rest of taxiway uses::

    from taxiway.pki import CA, CertHolder
    ca = CA.load()                                   # or CA.init(dir) -> (ca, created)
    leaf = ca.issue(["registry.internal", "127.0.0.1"])
    leaf.write("cert.pem", "key.pem")                # chain + key (0600)
    server = ca.ssl_context(leaf, server=True, client_auth="required", check_crl=True)
    client = ca.ssl_context(ca.issue([], client=True, cn="agent"))
    holder = CertHolder(ca, ["edge.internal"], validity=timedelta(hours=6))
    ctx = holder.server_context()                    # renews itself on a handshake when due

The names are imported lazily: ``taxiway.pki.names`` (pure) does not pull in
cryptography, so the CLI can check input before paying for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CA": "taxiway.pki.ca", "Leaf": "taxiway.pki.ca", "default_dir": "taxiway.pki.ca",
    "CertHolder": "taxiway.pki.holder",
    "Names": "taxiway.pki.names", "classify": "taxiway.pki.names", "parse_names": "taxiway.pki.names",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'taxiway.pki' has no attribute {name!r}")
