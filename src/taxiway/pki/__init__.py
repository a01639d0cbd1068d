"""taxiway's certificate authority: a root, an online intermediate, leaves, CRLs.

The API the rest of taxiway uses::

    from taxiway.pki import CA
    ca = CA.load()                                   # or CA.init(dir) -> (ca, created)
    leaf = ca.issue(["registry.internal", "127.0.0.1"])
    leaf.write("cert.pem", "key.pem")                # chain + key (0600)
    server = ca.ssl_context(leaf, server=True, client_auth="required")
    client = ca.ssl_context(ca.issue(["agent"], client=True, cn="agent"))
    holder = CertHolder(ca, ["edge.internal"], validity=timedelta(hours=6))

Importing this package imports cryptography; the CLI does so only inside commands.
"""

from taxiway.pki.ca import CA, Leaf, default_dir
from taxiway.pki.holder import CertHolder
from taxiway.pki.names import Names, classify, parse_names

__all__ = ["CA", "CertHolder", "Leaf", "Names", "classify", "default_dir", "parse_names"]
