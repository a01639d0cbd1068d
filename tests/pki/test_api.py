"""The Python API other parts use: load/init, inventory, CSR renewal, durations."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given
from hypothesis import strategies as st

from taxiway.errors import InvalidInput, NotFound, TaxiwayError
from taxiway.pki import CA, profile
from taxiway.pki.duration import format_duration, parse_duration


def test_load_missing_and_incomplete(tmp_path):
    with pytest.raises(NotFound, match="taxiway ca init"):
        CA.load(tmp_path / "nothing")
    the_ca, _ = CA.init(tmp_path / "ca")
    the_ca.issue(["a.test"])
    (the_ca.dir / "ca.json").unlink()
    loaded = CA.load(tmp_path / "ca")  # each file is read when needed: the inventory still lists
    assert [r.names for r in loaded.records()] == [["a.test"]]
    with pytest.raises(TaxiwayError, match=r"ca.json is missing; restore it from a backup"):
        loaded.issue(["b.test"])


def test_init_is_idempotent(tmp_path):
    a, created = CA.init(tmp_path / "ca")
    b, created_again = CA.init(tmp_path / "ca")
    assert created and not created_again
    assert a.root_pem == b.root_pem and b.constraints == []
    assert not CA.init(tmp_path / "ca", key_type="ecdsa-p256")[1]  # the settings it has: fine
    # settings it does not have cannot be applied to an existing CA (second attack, finding 9)
    with pytest.raises(InvalidInput, match="already exists .* with ecdsa-p256; name constraints none, not rsa-4096"):
        CA.init(tmp_path / "ca", key_type="rsa-4096", constraints=["internal"])
    with pytest.raises(InvalidInput, match="unknown key type"):
        CA.init(tmp_path / "other", key_type="dsa-1024")


def test_record_find_revoke(ca):
    kept = ca.issue(["a.test"])
    gone = ca.issue(["b.test"])
    quiet = ca.issue(["c.test"], record=False)
    serials = [r.serial for r in ca.records()]
    assert serials == [kept.serial_hex, gone.serial_hex] and quiet.serial_hex not in serials
    assert ca.find(gone.serial_hex.upper()).names == ["b.test"]
    colons = ":".join(gone.serial_hex[i:i + 2] for i in range(0, 32, 2))
    assert ca.find(colons).serial == gone.serial_hex
    rec, new = ca.revoke(gone.serial_hex)
    assert new and rec.revoked_at
    assert ca.revoke(gone.serial_hex)[1] is False
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.get_revoked_certificate_by_serial_number(gone.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None
    assert crl.is_signature_valid(ca.intermediate.public_key())
    with pytest.raises(NotFound):
        ca.find("00ff00ff00ff")


def test_torn_inventory_line_is_skipped(ca):
    ca.issue(["a.test"])
    with open(ca.dir / "inventory.jsonl", "ab") as f:
        f.write(b'{"event": "issued", "serial": "ab')  # a crash mid-write
    ca.issue(["b.test"])
    assert [r.names for r in ca.records()] == [["a.test"], ["b.test"]]


def test_csr_renewal_keeps_the_public_key(ca, tmp_path):
    key = profile.generate_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.test")]), critical=False)
           .sign(key, hashes.SHA256()))
    leaf = ca.issue_csr(csr.public_bytes(serialization.Encoding.PEM), validity=timedelta(hours=1), record=False)
    assert leaf.key_pem is None and leaf.names == ["svc.test"]
    ca.record(leaf, validity=timedelta(hours=1), csr=True, cert_file=tmp_path / "svc.pem")
    leaf.write(tmp_path / "svc.pem")
    [due] = ca.due(timedelta(hours=2))
    renewed = ca.renew(due)
    pub = lambda c: c.public_key().public_bytes(serialization.Encoding.DER,  # noqa: E731
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub(renewed.certificate) == pub(leaf.certificate) and renewed.serial != leaf.serial
    assert x509.load_pem_x509_certificates((tmp_path / "svc.pem").read_bytes())[0].serial_number == renewed.serial
    assert ca.due(timedelta(minutes=30)) == []


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"))
def test_durations_parse(n, unit):
    td = parse_duration(f"{n}{unit}")
    assert td.total_seconds() == n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_duration(format_duration(td)) <= td  # format rounds down to a whole unit


@pytest.mark.parametrize("bad", ["", "30", "d", "-1d", "1y", "1 day"])
def test_bad_durations(bad):
    with pytest.raises(InvalidInput):
        parse_duration(bad)


def test_root_key_can_go_offline(ca, tmp_path):
    (ca.dir / "root-key.pem").unlink()
    offline = CA.load(ca.dir)
    leaf = offline.issue(["after.offline.test"])
    offline.revoke(leaf.serial_hex)
    assert offline.crl_pem().count(b"BEGIN X509 CRL") == 2  # the intermediate's and the stored root one


def test_leaf_files_for_path_only_servers(ca):
    leaf = ca.issue(["files.test"])
    with leaf.files() as (cert, key):
        assert cert.read_bytes() == leaf.chain_pem and key.read_bytes() == leaf.key_pem
        assert (key.stat().st_mode & 0o777) == 0o600 and (cert.parent.stat().st_mode & 0o777) == 0o700
    assert not cert.exists() and not cert.parent.exists()
