"""TLS registries on loopback: the real docker-registry with a self-signed certificate.

taxiway finds out that the registry speaks HTTPS, refuses an untrusted
certificate with a one-line hint, and works once the CA is trusted
(SSL_CERT_FILE) or with --insecure.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.images import write_fixture_image
from helpers.servers import free_port, serve


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-registry")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taxiway test registry")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: t\n"
        f"  tls:\n    certificate: {root / 'cert.pem'}\n    key: {root / 'key.pem'}\n")
    with serve(["docker-registry", "serve", str(root / "config.yml")], port, log=root / "registry.log") as reg:
        layout = root / "layout"
        write_fixture_image(layout)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-cert-dir", str(root / "certs-none"), "--dest-tls-verify=false",
                        f"oci:{layout}:fixture", f"docker://{reg.address}/app:v1"], check=True, capture_output=True)
        yield reg, root / "cert.pem"


def test_untrusted_then_trusted_then_insecure(tls_registry, taxiway_home, taxiway, monkeypatch):
    reg, cert = tls_registry
    ref = f"{reg.address}/app:v1"
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    r = taxiway("pull", ref)
    assert r.returncode != 0 and b"not trusted" in r.stderr and b"--insecure" in r.stderr and r.stderr.count(b"\n") == 1
    r = taxiway("pull", ref, env={"SSL_CERT_FILE": str(cert)})
    assert r.returncode == 0, r.stderr
    taxiway("image", "rm", ref, check=True)
    r = taxiway("pull", ref, "--insecure")
    assert r.returncode == 0, r.stderr
    taxiway("tag", ref, f"{reg.address}/copy:v1", check=True)
    r = taxiway("push", f"{reg.address}/copy:v1", env={"SSL_CERT_FILE": str(cert)})
    assert r.returncode == 0, r.stderr
