"""Short-lived certificates that renew themselves.

Internal services get certificates valid for hours rather than years: a leaked
key is worth little, and nothing needs revoking. :class:`CertHolder` keeps one
current leaf and re-issues it once a fraction of its lifetime has passed. A
server context made by :meth:`CertHolder.server_context` checks on every
handshake (from the SNI callback, so no background thread is needed) and swaps
the new certificate in for later handshakes.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from taxiway.pki import profile
from taxiway.pki.ca import CA, Leaf
from taxiway.pki.tls import context, load_leaf


class CertHolder:
    """Holds a short-lived leaf for ``names`` and renews it before it expires.

    ``renew_after`` is the fraction of the lifetime after which the next call to
    :meth:`current` (or the next handshake) issues a fresh certificate.
    Certificates are not recorded in the inventory (they expire too soon to
    need revoking).
    """

    def __init__(self, ca: CA, names: Iterable[str], *, client: bool = False, cn: str | None = None,
                 validity: timedelta = timedelta(hours=6), renew_after: float = 2 / 3,
                 clock: Callable[[], datetime] = profile.now):
        if not 0 < renew_after < 1:
            raise ValueError("renew_after is a fraction of the lifetime, between 0 and 1")
        self.ca, self.names, self.client, self.cn = ca, list(names), client, cn
        self.validity, self.renew_after, self.clock = validity, renew_after, clock
        self._lock = threading.Lock()
        self._leaf = self._issue()
        self.renewals = 0

    def _issue(self) -> Leaf:
        self._issued_at = self.clock()
        return self.ca.issue(self.names, client=self.client, cn=self.cn, validity=self.validity, record=False)

    @property
    def renew_at(self) -> datetime:
        """When the current certificate is due for renewal."""
        return self._issued_at + self.validity * self.renew_after

    def current(self) -> Leaf:
        """The current leaf, renewed first if it is due."""
        if self.clock() >= self.renew_at:
            with self._lock:
                if self.clock() >= self.renew_at:
                    self._leaf = self._issue()
                    self.renewals += 1
        return self._leaf

    def server_context(self, client_auth: str = "none", check_crl: bool = False) -> ssl.SSLContext:
        """A server context that renews its certificate on the first handshake after it is due."""
        def make(leaf: Leaf) -> ssl.SSLContext:
            return context(self.ca, leaf, server=True, client_auth=client_auth, check_crl=check_crl)

        leaf = self.current()
        ctx = make(leaf)
        loaded = {"serial": leaf.serial}

        def on_hello(sock: ssl.SSLObject, server_name: str | None, c: ssl.SSLContext) -> None:
            leaf = self.current()
            if leaf.serial != loaded["serial"]:
                with self._lock:
                    if leaf.serial != loaded["serial"]:
                        load_leaf(ctx, leaf)  # connections accepted from now on start with it
                        loaded["serial"] = leaf.serial
                # This connection copied the old certificate when it was accepted: switch it over.
                sock.context = make(leaf)

        ctx.sni_callback = on_hello
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context presenting the current leaf (make a new one after renewal)."""
        return context(self.ca, self.current(), server=False)
