"""The certificate profile, field by field, checked with cryptography and OpenSSL."""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.pki import CA, profile
from taxiway.pki.names import parse_names, within_constraints

from .conftest import verify


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def test_root_and_intermediate(ca, ca_dir):
    root, inter = ca.root, ca.intermediate
    bc = ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(root, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert root.issuer == root.subject
    years = (root.not_valid_after_utc - root.not_valid_before_utc).days / 365.25
    assert 9.99 < years < 10.01
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)

    bc = ext(inter, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert inter.issuer == root.subject
    assert ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(root, x509.SubjectKeyIdentifier).value.digest
    assert inter.not_valid_after_utc == root.not_valid_after_utc

    assert stat.S_IMODE(os.stat(ca_dir / "root-key.pem").st_mode) == 0o400
    assert stat.S_IMODE(os.stat(ca_dir / "intermediate-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700


def test_server_leaf_profile(ca, tmp_path):
    leaf = ca.issue(["web.example.test", "*.web.example.test", "127.0.0.1", "::1", "ops@example.test",
                     "spiffe://taxiway/web"])
    cert = leaf.certificate
    # mkcert's leaf: 2 years 3 months, 128-bit serial, no CN unless asked
    assert cert.not_valid_after_utc == profile.add_months(cert.not_valid_before_utc + profile.BACKDATE, 27)
    assert 0 < cert.serial_number < 2**128 and cert.serial_number.bit_length() > 100
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == profile.ORGANIZATION
    assert cert.issuer == ca.intermediate.subject
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [EKU.SERVER_AUTH, EKU.EMAIL_PROTECTION]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert [type(g).__name__ for g in san] == ["DNSName", "DNSName", "IPAddress", "IPAddress", "RFC822Name",
                                               "UniformResourceIdentifier"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca.intermediate, x509.SubjectKeyIdentifier).value.digest
    assert leaf.chain_pem == leaf.cert_pem + ca.intermediate_pem
    leaf.write(tmp_path / "c.pem", tmp_path / "k.pem")
    root = ca.dir / "root.pem"
    assert verify(root, tmp_path / "c.pem").returncode == 0
    assert verify(root, tmp_path / "c.pem", purpose="smimesign").returncode == 0
    r = verify(root, tmp_path / "c.pem", purpose="sslclient")
    assert r.returncode != 0  # no clientAuth without --client


def test_client_leaf_with_cn_and_rsa(ca, tmp_path):
    leaf = ca.issue([], client=True, cn="egress-role-builder", key_type="rsa-2048",
                    validity=timedelta(hours=3))
    cert = leaf.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "egress-role-builder"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [EKU.CLIENT_AUTH]
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    assert ext(cert, x509.KeyUsage).value.key_encipherment  # RSA key exchange, as mkcert sets it
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=3) + profile.BACKDATE
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.SubjectAlternativeName)
    leaf.write(tmp_path / "c.pem", tmp_path / "k.pem")
    assert verify(ca.dir / "root.pem", tmp_path / "c.pem", purpose="sslclient").returncode == 0
    assert verify(ca.dir / "root.pem", tmp_path / "c.pem", purpose="sslserver").returncode != 0


def test_server_and_client(ca, tmp_path):
    cert = ca.issue(["node1.internal"], client=True).certificate
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [EKU.SERVER_AUTH, EKU.CLIENT_AUTH]


def test_rsa_ca(tmp_path):
    the_ca, _ = CA.init(tmp_path / "rsa", key_type="rsa-3072")
    assert the_ca.root.public_key().key_size == 3072
    leaf = the_ca.issue(["x.test"])
    leaf.write(tmp_path / "c.pem", tmp_path / "k.pem")
    assert verify(the_ca.dir / "root.pem", tmp_path / "c.pem").returncode == 0


def test_validity_cannot_outlive_intermediate(ca):
    with pytest.raises(InvalidInput, match="outlive the intermediate"):
        ca.issue(["x.test"], validity=timedelta(days=365 * 11))


def test_name_constraints_enforced_by_openssl(tmp_path):
    the_ca, _ = CA.init(tmp_path / "nc", constraints=["internal", "127.0.0.0/8"])
    nc = ext(the_ca.root, x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.DNSName("internal"),
                                           x509.IPAddress(ipaddress.ip_network("127.0.0.0/8"))]
    assert ext(the_ca.intermediate, x509.NameConstraints).value == nc.value
    root = the_ca.dir / "root.pem"

    good = the_ca.issue(["web.internal", "*.app.internal", "127.0.0.1"])
    good.write(tmp_path / "good.pem", tmp_path / "good-key.pem")
    assert verify(root, tmp_path / "good.pem").returncode == 0

    with pytest.raises(InvalidInput, match="outside this CA's name constraints"):
        the_ca.issue(["evil.example"])
    with pytest.raises(InvalidInput, match="outside"):
        the_ca.issue(["web.internal", "10.0.0.1"])
    # OpenSSL checks a host-like CN as a DNS name when there are no DNS SANs
    with pytest.raises(InvalidInput, match="role.example is outside"):
        the_ca.issue([], client=True, cn="role.example")
    for cn in ("builder", "role.internal"):
        the_ca.issue([], client=True, cn=cn).write(tmp_path / "cl.pem", tmp_path / "cl-key.pem", force=True)
        assert verify(root, tmp_path / "cl.pem", purpose="sslclient").returncode == 0

    # Sign out-of-bounds names directly with the intermediate's key, as a thief
    # of that key would: OpenSSL refuses the chain because of the root's constraints.
    for bad, cn in ((["evil.example"], None), (["web.internal", "10.9.9.9"], None), (["notinternal"], None),
                    ([], "role.example")):
        key = profile.generate_key()
        nb, na = profile.leaf_validity()
        cert = profile.make_leaf(key.public_key(), the_ca.intermediate, the_ca.intermediate_key,
                                 parse_names(bad), client=True, cn=cn, not_before=nb, not_after=na)
        path = tmp_path / "bad.pem"
        path.write_bytes(cert.public_bytes(profile.serialization.Encoding.PEM) + the_ca.intermediate_pem)
        r = verify(root, path, purpose=None)
        assert r.returncode != 0, bad
        assert b"subtree violation" in r.stdout + r.stderr, (r.stdout, r.stderr)


_labels = st.sampled_from(["internal", "app", "x", "example", "notinternal", "ternal", "internal-x"])
_dns = st.lists(_labels, min_size=1, max_size=3).map(".".join)
_ips = st.sampled_from(["127.0.0.1", "127.9.9.9", "10.0.0.1", "128.0.0.1", "::1"])


@pytest.fixture(scope="module")
def constrained_ca(tmp_path_factory):
    return CA.init(tmp_path_factory.mktemp("nc-prop") / "ca", constraints=["internal", "127.0.0.0/8"])[0]


@given(st.lists(st.one_of(_dns, _ips), min_size=1, max_size=3, unique=True))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_constraint_check_agrees_with_openssl(constrained_ca, tmp_path, names):
    """taxiway refuses exactly the names OpenSSL would reject under the root's constraints."""
    parsed = parse_names(names)
    ours = all(within_constraints(n, constrained_ca.constraints) for n in parsed.ordered())
    key = profile.generate_key()
    nb, na = profile.leaf_validity()
    cert = profile.make_leaf(key.public_key(), constrained_ca.intermediate, constrained_ca.intermediate_key,
                             parsed, not_before=nb, not_after=na)
    path = tmp_path / f"leaf-{cert.serial_number}.pem"
    path.write_bytes(cert.public_bytes(profile.serialization.Encoding.PEM) + constrained_ca.intermediate_pem)
    theirs = verify(constrained_ca.dir / "root.pem", path, purpose=None).returncode == 0
    assert ours == theirs, names
