"""Findings of the second outside attack on `taxiway ca`, each run as a user (or an attacker) would.

Every test here failed before its fix. The CLI runs as a subprocess and
certificates are checked with the real `openssl verify`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from taxiway.pki import CA, profile
from taxiway.pki.names import parse_names

from .conftest import verify
from .test_ca_robustness import err, ok, run


def serial_of(cert: Path) -> str:
    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:032x}"


def hand_signed(the_ca: CA, path: Path, names: list[str], cn: str | None = None) -> Path:
    """A leaf signed directly with intermediate-key.pem, as a thief of that key would sign it."""
    key = profile.generate_key()
    nb, na = profile.leaf_validity()
    cert = profile.make_leaf(key.public_key(), the_ca.intermediate, the_ca.intermediate_key, parse_names(names),
                             client=cn is not None, cn=cn, not_before=nb, not_after=na)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + the_ca.intermediate_pem)
    return path


# -- 1: a constraint on one kind of name closes the other kind ------------------------------------


@pytest.mark.parametrize(("constraint", "inside", "outside", "check"), [
    ("internal", "web.internal", "8.8.8.8", ("-verify_ip", "8.8.8.8")),
    ("internal", "web.internal", "::1", ("-verify_ip", "::1")),
    ("127.0.0.0/8", "127.0.0.1", "www.google.com", ("-verify_hostname", "www.google.com")),
])
def test_one_kind_of_constraint_excludes_the_other(ca_dir, tmp_path, constraint, inside, outside, check):
    ok(run("ca", "init", "--name-constraint", constraint))
    ok(run("ca", "issue", inside, cwd=tmp_path))
    assert "outside this CA's name constraints" in err(run("ca", "issue", outside, cwd=tmp_path))
    the_ca = CA.load(ca_dir)
    bad = hand_signed(the_ca, tmp_path / "bad.pem", [outside])
    r = verify(ca_dir / "root.pem", bad, *check, purpose=None)
    assert r.returncode != 0 and b"violation" in r.stdout + r.stderr, (r.stdout, r.stderr)
    if constraint.endswith("/8"):  # a host-like CN is a DNS name to OpenSSL, so it is excluded too
        assert "outside" in err(run("ca", "issue", "--client", "--cn", "role.example", cwd=tmp_path))
        r = verify(ca_dir / "root.pem", hand_signed(the_ca, tmp_path / "cn.pem", [], cn="role.example"), purpose=None)
        assert r.returncode != 0


def test_cn_outside_the_constraints_is_refused_even_with_sans(ca_dir, tmp_path):
    ok(run("ca", "init", "--name-constraint", "internal"))
    assert "www.evil.com is outside" in err(run("ca", "issue", "--cn", "www.evil.com", "a.internal", cwd=tmp_path))
    ok(run("ca", "issue", "--cn", "a.internal", "a.internal", cwd=tmp_path, ))
    ok(run("ca", "issue", "--client", "--cn", "app-worker", "--force", "a.internal", cwd=tmp_path))
