"""Pure auth helpers: challenge parsing, docker config lookups, the credential file."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.oci.auth import (
    Credentials,
    decode_auth,
    find_credentials,
    lookup,
    parse_challenge,
    remove_credentials,
    save_credentials,
    scope,
)


def test_parse_bearer_challenge():
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')
    assert ch.scheme == "bearer" and ch.realm == "https://auth.example/token"
    assert ch.params == {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge("") is None


_value = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), _value, max_size=4))
def test_parse_challenge_roundtrips_quoted_params(params):
    header = "Bearer " + ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in params.items())
    assert parse_challenge(header).params == params


@given(st.text(max_size=60))
def test_parse_challenge_never_crashes(header):
    parse_challenge(header)


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":"), min_size=1, max_size=20),
       st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_decode_auth_roundtrip(user, password):
    b64 = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert decode_auth(b64) == (user, password)


def test_lookup_forms():
    b64 = base64.b64encode(b"u:p").decode()
    assert lookup({"https://index.docker.io/v1/": {"auth": b64}}, "docker.io") == Credentials("u", "p")
    assert lookup({"http://127.0.0.1:5000": {"auth": b64}}, "127.0.0.1:5000") == Credentials("u", "p")
    assert lookup({"127.0.0.1:5000": {"username": "a", "password": "b"}}, "127.0.0.1:5000") == Credentials("a", "b")
    assert lookup({"127.0.0.1:5000": {"auth": b64}}, "127.0.0.1:5001") is None
    with pytest.raises(InvalidInput):
        lookup({"r": {"auth": base64.b64encode(b"nocolon").decode()}}, "r")
    assert scope("team/app", ("pull", "push")) == "repository:team/app:pull,push"


def test_login_file_is_private_and_taxiway_wins(taxiway_home, tmp_path, monkeypatch):
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {"r.example": {"auth": base64.b64encode(b"d:d").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    assert find_credentials("r.example") == Credentials("d", "d")
    path = save_credentials("r.example", "t", "t")
    assert path.stat().st_mode & 0o777 == 0o600
    assert find_credentials("r.example") == Credentials("t", "t")
    assert remove_credentials("r.example") and not remove_credentials("r.example")
    assert find_credentials("r.example") == Credentials("d", "d")
    (docker / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput):
        find_credentials("other")
