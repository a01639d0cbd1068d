"""Secrets: AEAD sealing bound to app and name, the key file, digests, names."""

from __future__ import annotations

import base64
import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput, TaxiwayError
from taxiway.platform import secrets as S

KEY = bytes(range(32))
apps = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@given(apps, names, st.text(st.characters(blacklist_characters="\x00"), max_size=200))
@settings(max_examples=200, deadline=None)
def test_seal_unseal_round_trip_and_binding(app, name, value):
    sealed = S.seal(app, name, value, KEY)
    assert len(value.encode()) < 8 or value.encode() not in base64.b64decode(sealed)
    assert S.unseal(app, name, sealed, KEY) == value
    with pytest.raises(S.SealError):
        S.unseal(app + "x", name, sealed, KEY)
    with pytest.raises(S.SealError):
        S.unseal(app, name + "X", sealed, KEY)
    with pytest.raises(S.SealError):
        S.unseal(app, name, sealed, bytes(32))


@given(st.binary(min_size=1, max_size=60), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_any_changed_byte_is_refused(flip, pos):
    raw = bytearray(base64.b64decode(S.seal("app", "K", "value", KEY)))
    i = pos % len(raw)
    raw[i] ^= flip[0] or 1
    with pytest.raises(S.SealError):
        S.unseal("app", "K", base64.b64encode(bytes(raw)).decode(), KEY)


def test_sealing_twice_differs_but_digest_is_stable():
    a, b = S.seal("app", "K", "v", KEY), S.seal("app", "K", "v", KEY)
    assert a != b  # random nonce
    assert S.digest("app", "K", "v", KEY) == S.digest("app", "K", "v", KEY)
    assert S.digest("app", "K", "v", KEY) != S.digest("app", "K", "w", KEY)
    assert S.digest("app", "K", "v", KEY) != S.digest("app", "K", "v", bytes(32))  # keyed: no offline guessing


def test_record_and_public_never_show_the_value():
    rec = S.record("app", "DATABASE_URL", "postgres://u:p@h/db", KEY)
    assert set(rec) == {"name", "sealed", "digest", "updated_at"}
    pub = S.public(rec)
    assert "sealed" not in pub and "postgres" not in repr(pub)
    assert S.unseal_all("app", [rec], KEY) == {"DATABASE_URL": "postgres://u:p@h/db"}


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "É", "X" * 129, "A=B"])
def test_invalid_names(name):
    with pytest.raises(InvalidInput, match="invalid secret name"):
        S.seal("app", name, "v", KEY)


def test_garbage_is_not_a_sealed_value():
    for junk in ("", "!!!", base64.b64encode(b"\x02" + bytes(40)).decode()):
        with pytest.raises(S.SealError):
            S.unseal("app", "K", junk, KEY)


def test_too_large_value():
    with pytest.raises(InvalidInput):
        S.seal("app", "K", "x" * (S.MAX_VALUE + 1), KEY)


def test_key_file_is_made_once_0600(platform_home):
    k1 = S.load_key()
    path = platform_home / "platform" / "secrets.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(k1) == 32
    assert S.load_key() == k1
    assert [p.name for p in path.parent.iterdir()] == ["secrets.key"]  # no temp files left


def test_concurrent_creators_agree_on_one_key(platform_home):
    keys, barrier = [], threading.Barrier(8)

    def go():
        barrier.wait()
        keys.append(S.load_key())

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1


def test_key_file_problems(platform_home):
    path = platform_home / "platform" / "secrets.key"
    with pytest.raises(TaxiwayError, match="does not exist"):
        S.load_key(create=False)
    S.load_key()
    os.chmod(path, 0o644)
    with pytest.raises(TaxiwayError, match="readable by others"):
        S.load_key()
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(TaxiwayError, match="damaged"):
        S.load_key()
    path.unlink()
    os.symlink("/dev/null", path)
    with pytest.raises(OSError):
        S.load_key()


def test_a_nul_byte_is_refused():
    """An env value cannot hold NUL: accepting one made every machine fail ("embedded null byte")."""
    with pytest.raises(S.InvalidInput, match="NUL"):
        S.seal("app", "K", "a\x00b", KEY)
