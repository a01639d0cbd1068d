"""platform.tokens: the token format, hashed storage and the scope policy (real nats-server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from taxiway.errors import InvalidInput, NotFound
from taxiway.platform import schema, tokens


def test_parse_rejects_malformed_tokens():
    rec, tok = tokens.new_record("acme", "admin")
    assert tokens.parse(tok) == (rec["id"], tok.split("_", 2)[2])
    for bad in ("", "tw_", "tw_zz_secret", "xx_0123456789abcdef_" + "a" * 43, "tw_0123456789abcdef",
                "tw_0123456789abcdeg_" + "a" * 43, "tw_0123456789abcdef_short"):
        assert tokens.parse(bad) is None


def test_scope_policy():
    admin, _ = tokens.new_record("acme", "admin")
    read, _ = tokens.new_record("acme", "read")
    deploy, _ = tokens.new_record("acme", "deploy", "web")
    assert tokens.allows(admin, "DELETE", None) and tokens.allows(admin, "POST", "web")
    assert tokens.allows(read, "GET", "web") and not tokens.allows(read, "POST", "web")
    assert tokens.allows(deploy, "POST", "web") and not tokens.allows(deploy, "GET", "api")
    assert not tokens.allows(deploy, "GET", None)
    with pytest.raises(InvalidInput):
        tokens.new_record("acme", "deploy")
    with pytest.raises(InvalidInput):
        tokens.new_record("acme", "read", "web")
    with pytest.raises(InvalidInput):
        tokens.new_record("acme", "root")


@pytest.mark.anyio
async def test_tokens_are_stored_hashed_and_revocable(state):
    pub, tok = await tokens.create(state, "acme", "deploy", "web", name="ci")
    stored, _ = await state.get(schema.TOKENS, pub["id"])
    secret = tok.split("_", 2)[2]
    assert "hash" not in pub and secret not in str(stored) and stored["hash"] != secret
    assert (await tokens.authenticate(state, tok))["app"] == "web"
    assert await tokens.authenticate(state, tok[:-1] + ("A" if tok[-1] != "A" else "B")) is None
    assert await tokens.authenticate(state, "tw_0123456789abcdef_" + "a" * 43) is None
    assert [t["id"] for t in await tokens.list_tokens(state, "acme")] == [pub["id"]]
    assert await tokens.list_tokens(state, "other") == []
    with pytest.raises(NotFound):
        await tokens.revoke(state, "other", pub["id"])
    assert (await tokens.revoke(state, "acme", pub["id"]))["revoked"]
    assert await tokens.authenticate(state, tok) is None


# -- properties of the pure core (hypothesis) --------------------------------------------------------

_methods = hs.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
_apps = hs.one_of(hs.none(), hs.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True))


@given(hs.text(max_size=200))
def test_parse_never_raises_and_only_accepts_the_format(s):
    got = tokens.parse(s)
    if got is not None:
        tid, secret = got
        assert s == f"tw_{tid}_{secret}" and len(tid) == 16


@given(hs.sampled_from(["admin", "read", "deploy"]), _methods, _apps, hs.booleans())
def test_scope_rules(scope, method, app, destroys):
    rec, tok = tokens.new_record("acme", scope, "web" if scope == "deploy" else None)
    assert tokens.parse(tok) is not None and tokens.check(rec, tok.split("_", 2)[2])
    ok = tokens.allows(rec, method, app, destroys_app=destroys)
    if scope == "admin":
        assert ok
    elif scope == "read":
        assert ok == (method in ("GET", "HEAD"))
    else:
        assert ok == (app == "web" and not destroys)


@given(hs.text(min_size=1, max_size=60))
def test_a_wrong_secret_never_checks(secret):
    rec, tok = tokens.new_record("acme", "admin")
    if secret != tok.split("_", 2)[2]:
        assert not tokens.check(rec, secret)
    assert not tokens.check({**rec, "revoked": True}, tok.split("_", 2)[2])
    assert not tokens.check({**rec, "expires_at": 1.0}, tok.split("_", 2)[2])
