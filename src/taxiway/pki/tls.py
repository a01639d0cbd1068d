"""``ssl.SSLContext`` helpers for servers and clients that use a taxiway CA."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taxiway.pki.ca import CA, Leaf

CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def load_leaf(ctx: ssl.SSLContext, leaf: Leaf) -> None:
    """Load a leaf's chain and key into ``ctx`` (the ssl module only reads files).

    The key goes through a 0600 temp file that is removed at once. Calling this
    again on a live server context swaps the certificate for new handshakes.
    """
    if leaf.key_pem is None:
        raise ValueError("this leaf has no private key (it was issued from a CSR)")
    with tempfile.TemporaryDirectory(prefix="taxiway-tls-") as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cert, "wb") as f:
            f.write(leaf.chain_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(leaf.key_pem)
        ctx.load_cert_chain(cert, key)


def load_crl(ctx: ssl.SSLContext, crl_pem: bytes) -> None:
    """Add a CRL to ``ctx`` and check leaves against it (VERIFY_CRL_CHECK_LEAF)."""
    with tempfile.NamedTemporaryFile(prefix="taxiway-crl-", suffix=".pem") as f:
        f.write(crl_pem)
        f.flush()
        ctx.load_verify_locations(cafile=f.name)  # only cafile accepts CRLs
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def context(ca: CA, leaf: Leaf | None = None, *, server: bool = False, client_auth: str = "none",
            check_crl: bool = False) -> ssl.SSLContext:
    """A TLS context that trusts ``ca``'s root.

    * ``server=True``: presents ``leaf`` and, with ``client_auth`` "optional" or
      "required", asks clients for a certificate from this CA (mutual TLS).
    * ``server=False``: a client that checks the server's name and chain, and
      presents ``leaf`` when given (for mTLS).
    * ``check_crl``: also reject peers revoked in the CA's current CRL.
    """
    if client_auth not in CLIENT_AUTH:
        raise ValueError(f"client_auth must be one of {', '.join(CLIENT_AUTH)}")
    if server:
        if leaf is None:
            raise ValueError("a server context needs a leaf certificate")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = CLIENT_AUTH[client_auth]
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.root  # noqa: B018 - a damaged root.pem is one clear error, not ssl's
    ctx.load_verify_locations(cadata=ca.root_pem.decode())
    if leaf is not None:
        load_leaf(ctx, leaf)
    if check_crl:
        load_crl(ctx, ca.crl_pem())
    return ctx


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a verified TLS connection (for role mapping)."""

    cn: str | None
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    serial: str  # 32 hex digits, as `taxiway ca ls` shows it


def peer_identity(sock: ssl.SSLSocket | ssl.SSLObject) -> PeerIdentity | None:
    """The verified peer certificate's CN, DNS names, URIs and serial; None without one.

    For asyncio streams pass ``transport.get_extra_info("ssl_object")``.
    """
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns = uris = ()
    return PeerIdentity(cn=str(cns[0].value) if cns else None, dns=dns, uris=uris,
                        serial=f"{cert.serial_number:032x}")
