"""The certificate profile: keys, the root, the intermediate, leaves and CRLs.

Pure functions over cryptography objects: nothing here reads or writes files,
so the profile can be tested field by field and reused by the CA store.

Profile (documented in README.md, pinned by tests/pki/test_profile.py):

* root: 10 years, CA:TRUE pathlen:1 (critical), keyCertSign+cRLSign (critical),
  SKID, optional critical name constraints;
* intermediate: CA:TRUE pathlen:0, keyCertSign+cRLSign+digitalSignature, SKID,
  AKID, the same name constraints, valid until the root expires; it signs leaves
  and CRLs, so the root key can be kept offline;
* leaf (mkcert's profile): 2 years 3 months by default, 128-bit random serial,
  CA:FALSE (critical), digitalSignature (+keyEncipherment for RSA keys),
  EKU serverAuth when it has DNS/IP/URI names, clientAuth when asked,
  emailProtection when it has emails, SANs ordered DNS/IP/email/URI, SKID and
  AKID, a CN only when asked; notBefore is backdated one minute for clock skew.
"""

from __future__ import annotations

import calendar
import getpass
import ipaddress
import secrets
import socket
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from taxiway.errors import InvalidInput
from taxiway.pki.names import Name, Names

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_LEAF_KEY = "ecdsa-p256"
DEFAULT_CA_KEY = "ecdsa-p256"
ROOT_YEARS = 10
LEAF_MONTHS = 27  # mkcert: 2 years 3 months, just under the 825 days Apple platforms accept
BACKDATE = timedelta(minutes=1)
ORGANIZATION = "taxiway development certificate"
CA_ORGANIZATION = "taxiway development CA"


def owner() -> str:
    """``user@host``, written into the OU as mkcert does, so people know whose CA it is."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> datetime:
    """The current time in UTC, to the second (certificates carry seconds)."""
    return datetime.now(UTC).replace(microsecond=0)


def instant() -> datetime:
    """The current time in UTC to the microsecond: for ordering events (a record's issue, a run's start)."""
    return datetime.now(UTC)


def add_months(t: datetime, months: int) -> datetime:
    """``t`` plus calendar months, clamping the day (Jan 31 + 1 month = Feb 28/29)."""
    m = t.month - 1 + months
    year, month = t.year + m // 12, m % 12 + 1
    day = min(t.day, calendar.monthrange(year, month)[1])
    return t.replace(year=year, month=month, day=day)


def generate_key(key_type: str = DEFAULT_LEAF_KEY) -> PrivateKey:
    """A new private key of ``key_type`` (one of KEY_TYPES)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise InvalidInput(f"unknown key type {key_type!r}", f"use one of {', '.join(KEY_TYPES)}")


def key_type_of(key: PrivateKey | PublicKey) -> str:
    """The KEY_TYPES name of a key (public or private)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name, f"ecdsa-{key.curve.name}")
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def key_to_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file mode protects it)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    """The signature hash matched to the signing key's strength."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def random_serial() -> int:
    """A positive 128-bit random serial number (never zero)."""
    return secrets.randbits(128) or 1


def _constraints_ext(constraints: list[Name]) -> x509.NameConstraints:
    """Permitted DNS/IP subtrees; the kind with none is excluded entirely.

    RFC 5280 leaves a kind without permitted subtrees unconstrained, so a CA
    limited to ``internal`` could otherwise sign any IP address. An excluded
    DNS "" matches every DNS name (OpenSSL, Go, NSS), 0.0.0.0/0 and ::/0 every address.
    """
    permitted: list[x509.GeneralName] = []
    for c in constraints:
        if c.kind == "dns":
            permitted.append(x509.DNSName(c.value))
        elif c.kind == "ip":
            permitted.append(x509.IPAddress(ipaddress.ip_network(c.value)))
    kinds = {c.kind for c in constraints}
    excluded: list[x509.GeneralName] = []
    if "dns" not in kinds:
        excluded.append(x509.DNSName(""))
    if "ip" not in kinds:
        excluded += [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded or None)


def make_root(key: PrivateKey, *, constraints: list[Name] | None = None, who: str | None = None,
              ident: str | None = None, at: datetime | None = None) -> x509.Certificate:
    """A self-signed root: 10 years, path length 1, optional name constraints."""
    at = at or now()
    who = who or owner()
    ident = ident or secrets.token_hex(3)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, who),
        x509.NameAttribute(NameOID.COMMON_NAME, f"taxiway root {ident} {who}"[:64]),
    ])
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(subject)
         .public_key(key.public_key())
         .serial_number(random_serial())
         .not_valid_before(at - timedelta(hours=1))
         .not_valid_after(add_months(at, 12 * ROOT_YEARS))
         .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
         .add_extension(_ca_key_usage(digital_signature=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if constraints:
        b = b.add_extension(_constraints_ext(constraints), critical=True)
    return b.sign(key, hash_for(key))


def _ca_key_usage(digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_intermediate(key: PrivateKey, root: x509.Certificate, root_key: PrivateKey, *,
                      constraints: list[Name] | None = None, at: datetime | None = None) -> x509.Certificate:
    """The online intermediate that signs leaves and CRLs: path length 0, valid as long as the root."""
    at = at or now()
    root_cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                           root.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value),
        x509.NameAttribute(NameOID.COMMON_NAME, str(root_cn).replace("taxiway root", "taxiway intermediate", 1)[:64]),
    ])
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(root.subject)
         .public_key(key.public_key())
         .serial_number(random_serial())
         .not_valid_before(at - timedelta(hours=1))
         .not_valid_after(root.not_valid_after_utc)
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(_ca_key_usage(digital_signature=True), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(_aki(root), critical=False))
    if constraints:
        b = b.add_extension(_constraints_ext(constraints), critical=True)
    return b.sign(root_key, hash_for(root_key))


def san_entries(names: Names) -> list[x509.GeneralName]:
    """GeneralNames in profile order: DNS, IP, email, URI."""
    out: list[x509.GeneralName] = [x509.DNSName(v) for v in names.dns]
    out += [x509.IPAddress(ipaddress.ip_address(v)) for v in names.ip]
    out += [x509.RFC822Name(v) for v in names.email]
    out += [x509.UniformResourceIdentifier(v) for v in names.uri]
    return out


def leaf_validity(*, days: int | None = None, hours: float | None = None, at: datetime | None = None,
                  validity: timedelta | None = None) -> tuple[datetime, datetime]:
    """(notBefore, notAfter): mkcert's 2 years 3 months unless days/hours/validity say otherwise."""
    at = at or now()
    if validity is None and days is not None:
        validity = timedelta(days=days)
    if validity is None and hours is not None:
        validity = timedelta(hours=hours)
    if validity is not None and validity <= timedelta(0):
        raise InvalidInput("validity must be positive", "give --days N or --hours N with N > 0")
    not_after = at + validity if validity is not None else add_months(at, LEAF_MONTHS)
    return at - BACKDATE, not_after


def make_leaf(public_key: PublicKey, issuer: x509.Certificate, issuer_key: PrivateKey, names: Names, *,
              client: bool = False, cn: str | None = None, not_before: datetime, not_after: datetime,
              serial: int | None = None, who: str | None = None) -> x509.Certificate:
    """A leaf certificate in mkcert's profile (see the module docstring)."""
    if not len(names) and not (client and cn):
        raise InvalidInput("a certificate needs at least one name", "give a host name, IP, email or URI (or --client --cn CN)")
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, (who or _OWNER)[:64])]
    if cn:
        if not 0 < len(cn) <= 64:
            raise InvalidInput(f"common name {cn!r} is {len(cn)} characters", "a CN has 1 to 64 characters")
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    eku = []
    if names.server_names:
        eku.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        eku.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if names.email:
        eku.append(ExtendedKeyUsageOID.EMAIL_PROTECTION)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name(attrs)).issuer_name(issuer.subject)
         .public_key(public_key)
         .serial_number(serial or random_serial())
         .not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
         .add_extension(_aki(issuer), critical=False))
    if len(names):
        b = b.add_extension(x509.SubjectAlternativeName(san_entries(names)), critical=False)
    return b.sign(issuer_key, hash_for(issuer_key))


_OWNER = owner()


def make_crl(issuer: x509.Certificate, issuer_key: PrivateKey, revoked: list[tuple[int, datetime]], *,
             at: datetime | None = None, next_update: timedelta = timedelta(days=7),
             number: int | None = None) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing (serial, revocation time) pairs."""
    at = at or now()
    b = (x509.CertificateRevocationListBuilder()
         .issuer_name(issuer.subject)
         .last_update(at - BACKDATE)
         .next_update(at + next_update)
         .add_extension(_aki(issuer), critical=False)
         .add_extension(x509.CRLNumber(number if number is not None else int(at.timestamp() * 1000)), critical=False))
    for serial, when in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return b.sign(issuer_key, hash_for(issuer_key))
