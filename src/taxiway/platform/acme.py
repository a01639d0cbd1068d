"""ACME (RFC 8555) certificates for custom hostnames, with certbot's ``acme`` library.

A CERTS record with ``"acme": "<directory URL>"`` (``taxiway certs add APP HOST
--acme URL``) makes the edge order a certificate for HOST from that ACME server;
until it has one (and if renewal fails until it lapses) the host is served with a
taxiway CA certificate. The edge answers the server's challenge itself:

- ``http-01`` (the default): ``GET /.well-known/acme-challenge/<token>`` on the
  plain listener (:meth:`EdgeTLS.intercept`);
- ``tls-alpn-01`` (RFC 8737; record ``"challenge": "tls-alpn-01"``): a handshake
  offering ALPN ``acme-tls/1`` with SNI HOST gets a self-signed certificate that
  carries the key authorization's digest in the critical acmeIdentifier extension.

The JWS, nonces, account and order handling are the library's; this module only
keeps an account key per directory (0600), runs orders in a thread (the library is
synchronous), and puts the key and chain in ``<tls dir>/acme/<host>.pem`` (0600).
Certificates are renewed in the last third of their lifetime; a failed order is
tried again after a minute, doubling up to an hour. The ACME server's own HTTPS
certificate is checked against the system's roots, or the bundle in
``$TAXIWAY_ACME_CA_BUNDLE`` (a private ACME server, pebble in the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taxiway.platform.edgetls import EdgeTLS

CA_BUNDLE_ENV = "TAXIWAY_ACME_CA_BUNDLE"
CHALLENGES = ("http-01", "tls-alpn-01")
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"  # id-pe-acmeIdentifier (RFC 8737)


def key_authorization(token: str, thumbprint_b64: str) -> str:
    """RFC 8555 8.1: ``token || '.' || base64url(JWK thumbprint)``."""
    return f"{token}.{thumbprint_b64}"


def tls_alpn_certificate(host: str, key_authz: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of the RFC 8737 validation certificate for ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authz.encode()).digest()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            # the extension's value is the DER OCTET STRING of the SHA-256 digest
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER_OID),
                                                      b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _typ(chall: Any) -> str:
    """A challenge's type; the library keeps types it does not know (tls-alpn-01) as raw JSON."""
    typ = getattr(chall, "typ", None)
    return typ if isinstance(typ, str) else str(getattr(chall, "jobj", {}).get("type"))


def _response_class() -> Any:
    """The tls-alpn-01 challenge response (``{}``), which the acme library no longer ships."""
    from acme import challenges

    cls = challenges.ChallengeResponse.TYPES.get("tls-alpn-01")
    if cls is None:
        @challenges.ChallengeResponse.register
        class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
            typ = "tls-alpn-01"

        cls = TLSALPN01Response
    return cls


class AcmeManager:
    """Orders and renews the ACME certificates of an :class:`EdgeTLS`'s hostnames."""

    def __init__(self, tls: EdgeTLS) -> None:
        self.tls = tls
        self.directory = tls.certs.directory / "acme"
        self._wake = asyncio.Event()
        self._busy: set[str] = set()
        self._retry_at: dict[str, tuple[float, float]] = {}  # host -> (when, backoff)
        self.status: dict[str, dict[str, Any]] = {}         # host -> {"state", "error"?, "at"}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            for host, rec in list(self.tls.hostnames.items()):
                if rec.get("acme") and host not in self._busy and self._wanted(host):
                    self._busy.add(host)
                    self.tls._spawn(self._order(host, dict(rec)))  # noqa: SLF001 - its owner's tasks
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 60)

    def _wanted(self, host: str) -> bool:
        from taxiway.platform.edgetls import due, read_pem_info

        when = self._retry_at.get(host)
        if when is not None and time.monotonic() < when[0]:
            return False
        info = read_pem_info(self.tls.certs.path("acme", host))
        return info is None or due(info[0], info[1], self.tls.certs.now())

    async def _order(self, host: str, rec: dict[str, Any]) -> None:
        edge = self.tls.edge
        loop = asyncio.get_running_loop()
        self.status[host] = {"state": "ordering", "at": time.time()}
        edge.log(msg="acme order", host=host, directory=rec["acme"], challenge=rec.get("challenge") or "http-01")
        try:
            await asyncio.to_thread(self._order_sync, host, rec, loop)
        except Exception as e:
            backoff = min((self._retry_at.get(host, (0, 30.0))[1]) * 2, 3600.0)
            self._retry_at[host] = (time.monotonic() + backoff, backoff)
            self.status[host] = {"state": "failed", "error": f"{type(e).__name__}: {e}", "at": time.time()}
            edge.log(msg="acme failed", host=host, error=f"{type(e).__name__}: {e}", retry_in=backoff)
        else:
            self._retry_at.pop(host, None)
            self.tls.certs.forget(host)  # the next handshake loads the new certificate
            self.status[host] = {"state": "issued", "at": time.time()}
            edge.log(msg="acme issued", host=host)
        finally:
            self._busy.discard(host)
            self._wake.set()

    # -- in a thread: the library is synchronous
    def _account(self, url: str) -> tuple[Any, dict[str, Any], Path]:
        import josepy as jose
        from cryptography.hazmat.primitives.asymmetric import rsa

        from taxiway.fsutil import atomic_write

        path = self.directory / f"account-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        try:
            data = json.loads(path.read_text())
            return jose.JWKRSA.json_loads(json.dumps(data["key"])), data, path
        except (OSError, ValueError, KeyError):
            pass
        jwk = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        data = {"directory": url, "key": jwk.to_json(), "uri": None}
        with atomic_write(path, mode=0o600, binary=False) as f:
            f.write(json.dumps(data))
        return jwk, data, path

    def _order_sync(self, host: str, rec: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        import josepy as jose
        from acme import client, crypto_util, errors, messages
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from taxiway.fsutil import atomic_write

        url = str(rec["acme"])
        kind = rec.get("challenge") or "http-01"
        jwk, account, account_path = self._account(url)
        verify: bool | str = os.environ.get(CA_BUNDLE_ENV) or True
        net = client.ClientNetwork(jwk, user_agent="taxiway-edge", verify_ssl=verify)  # type: ignore[arg-type]
        acme = client.ClientV2(client.ClientV2.get_directory(url, net), net)
        try:
            regr = acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
        except errors.ConflictError as e:  # the key has an account already: use it
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            net.account = regr
        if account.get("uri") != regr.uri:
            account["uri"] = regr.uri
            with atomic_write(account_path, mode=0o600, binary=False) as f:
                f.write(json.dumps(account))
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        order = acme.new_order(crypto_util.make_csr(key_pem, [host]))
        thumb = jose.b64encode(jwk.thumbprint()).decode()
        installed: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                challb = next((c for c in authz.body.challenges if _typ(c.chall) == kind), None)
                if challb is None:
                    offered = ", ".join(_typ(c.chall) for c in authz.body.challenges)
                    raise RuntimeError(f"the ACME server offers no {kind} challenge (offers: {offered})")
                token = challb.chall.encode("token") if hasattr(challb.chall, "token") \
                    else str(challb.chall.jobj["token"])
                authz_text = key_authorization(token, thumb)
                if kind == "http-01":
                    loop.call_soon_threadsafe(self.tls.http_tokens.__setitem__, token, authz_text)
                    installed.append(("http-01", token))
                    response = challb.chall.response(jwk)
                else:
                    cert_pem, ckey_pem = tls_alpn_certificate(host, authz_text)
                    ctx = self._challenge_context(cert_pem, ckey_pem)
                    loop.call_soon_threadsafe(self.tls.alpn_challenges.__setitem__, host, ctx)
                    installed.append(("tls-alpn-01", host))
                    response = _response_class()(key_authorization=authz_text)
                acme.answer_challenge(challb, response)
            deadline = datetime.now() + timedelta(seconds=90)
            done = acme.poll_and_finalize(order, deadline)
        finally:
            for what, k in installed:
                table = self.tls.http_tokens if what == "http-01" else self.tls.alpn_challenges
                loop.call_soon_threadsafe(table.pop, k, None)
        with atomic_write(self.tls.certs.path("acme", host), mode=0o600) as f:
            f.write(key_pem + done.fullchain_pem.encode())

    def _challenge_context(self, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
        import tempfile

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["acme-tls/1"])
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".pem") as f:  # 0600 by mkstemp
            f.write(key_pem + cert_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx
