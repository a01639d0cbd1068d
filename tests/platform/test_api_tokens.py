"""platform.tokens: the token format, hashed storage and the scope policy (real nats-server)."""

from __future__ import annotations

import pytest

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
