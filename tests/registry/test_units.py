"""Pure cores of the registry, tested with hypothesis: manifest validation, request
classification, scopes and signed tokens, pagination."""

from __future__ import annotations

import json
import time

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxiway.registry import manifest as manifests
from taxiway.registry import tokens
from taxiway.registry.app import paginate
from taxiway.registry.errors import DistributionError
from taxiway.registry.paths import classify

from .oci import CONFIG, INDEX, LAYER, MANIFEST, digest

D = digest(b"x")
VALID = {"schemaVersion": 2, "mediaType": MANIFEST, "config": {"mediaType": CONFIG, "digest": D, "size": 1},
         "layers": [{"mediaType": LAYER, "digest": D, "size": 1}]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "subject", "artifactType",
                        "annotations", "digest", "size", "urls"])


def mutated(base: dict):
    """Valid manifests with one field, somewhere, replaced by an arbitrary value."""
    @st.composite
    def build(draw):
        doc = orjson.loads(orjson.dumps(base))
        target = doc
        path = draw(st.lists(st.sampled_from(["config", "layers", 0, "subject", "manifests"]), max_size=2))
        for p in path:
            if isinstance(target, dict) and isinstance(p, str) and isinstance(target.get(p), dict | list):
                target = target[p]
            elif isinstance(target, list) and target and isinstance(p, int):
                target = target[0]
        if isinstance(target, dict):
            target[draw(keys)] = draw(json_values)
        return doc
    return build()


def _assert_4xx(body: bytes, content_type: str | None) -> None:
    try:
        m = manifests.parse(body, content_type)
    except DistributionError as e:
        assert 400 <= e.status < 500 and e.code in ("MANIFEST_INVALID",)
    else:
        assert m.digest == digest(body) and m.size == len(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, "", MANIFEST, INDEX, "text/plain"]))
def test_manifest_parse_never_crashes_on_bytes(body, ctype):
    _assert_4xx(body, ctype)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, mutated(VALID),
                 mutated({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
                     {"mediaType": MANIFEST, "digest": D, "size": 3}]})),
       st.sampled_from([None, MANIFEST, INDEX]))
def test_manifest_parse_never_crashes_on_json(doc, ctype):
    _assert_4xx(json.dumps(doc).encode(), ctype)


def test_manifest_parse_examples():
    m = manifests.parse(orjson.dumps(VALID), MANIFEST)
    assert [r.digest for r in m.refs] == [D, D] and m.artifact_type == CONFIG and m.subject is None
    for bad in ({**VALID, "schemaVersion": 1}, {**VALID, "layers": {}}, {**VALID, "config": {"digest": "sha256:x"}},
                {**VALID, "layers": [{"mediaType": LAYER, "digest": D, "size": -1}]},
                {**VALID, "layers": [{"mediaType": LAYER, "digest": D, "size": True}]},
                {**VALID, "mediaType": "application/vnd.docker.distribution.manifest.v1+json"}):
        try:
            manifests.parse(orjson.dumps(bad), None)
            raise AssertionError(f"accepted {bad}")
        except DistributionError as e:
            assert e.code == "MANIFEST_INVALID"
    # Content-Type and mediaType must agree
    try:
        manifests.parse(orjson.dumps(VALID), INDEX)
        raise AssertionError("accepted a mismatched Content-Type")
    except DistributionError as e:
        assert e.status == 400
    big = b" " * (manifests.MAX_MANIFEST_BYTES + 1)
    try:
        manifests.parse(big, MANIFEST)
    except DistributionError as e:
        assert e.status == 413


@given(st.text(max_size=120), st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"]))
def test_classify_never_raises(path, method):
    t = classify(method, "/v2/" + path)
    assert t is None or t.kind in ("base", "token", "catalog", "tags", "manifest", "upload", "blob", "referrers")


component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,5})?", fullmatch=True)


@given(st.lists(component, min_size=1, max_size=4), st.sampled_from(["acme", "o-1"]))
def test_classify_and_rewrite(parts, org):
    name = "/".join(parts)
    for method, tail, kind, action in [("GET", "tags/list", "tags", "pull"),
                                       ("PUT", "manifests/v1", "manifest", "push"),
                                       ("DELETE", f"manifests/{D}", "manifest", "delete"),
                                       ("POST", "blobs/uploads/", "upload", "push"),
                                       ("HEAD", f"blobs/{D}", "blob", "pull"),
                                       ("GET", f"referrers/{D}", "referrers", "pull")]:
        t = classify(method, f"/v2/{name}/{tail}")
        assert (t.kind, t.name, t.action, t.name_valid) == (kind, name, action, True)
        assert t.rewritten_path(org) == f"/v2/{org}/{name}/{tail}"


def test_classify_invalid_names():
    assert classify("GET", "/v2/UPPER/tags/list").name_valid is False
    assert classify("GET", "/v2/a/../b/tags/list").name_valid is False
    assert classify("GET", "/v2/_catalog").kind == "catalog"
    assert classify("GET", "/v1/x") is None


scope_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:/,*._-() ", max_size=40)


@given(st.lists(scope_text, max_size=5), st.sampled_from(["pull", "push", "bogus"]))
def test_grant_never_exceeds_the_token(requested, token_scope):
    allowed = tokens.SCOPE_ACTIONS.get(token_scope, frozenset())
    for a in tokens.grant(requested, token_scope):
        if a["type"] == "repository":
            assert set(a["actions"]) <= allowed
        else:
            assert a == {"type": "registry", "name": "catalog", "actions": ["*"]}


def test_grant_examples():
    assert tokens.grant(["repository:web:pull,push"], "pull") == [
        {"type": "repository", "name": "web", "actions": ["pull"]}]
    assert tokens.grant(["repository:a/b:push,pull repository:c:delete"], "push") == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "repository", "name": "c", "actions": ["delete"]}]
    assert tokens.grant(["repository:BAD:pull", "garbage"], "push") == []


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63 - 1) | st.text(max_size=8), max_size=4),
       st.binary(min_size=16, max_size=32), st.integers(0, 200))
def test_tokens_sign_verify_and_tamper(extra, key, flip):
    now = time.time()
    claims = {**extra, "exp": now + 60, "aud": "taxiway"}
    tok = tokens.sign(claims, key)
    assert tokens.verify(tok, key, now, "taxiway")["exp"] == claims["exp"]
    for bad_key in (key + b"x",):
        try:
            tokens.verify(tok, bad_key, now)
            raise AssertionError("verified with the wrong key")
        except tokens.BadToken:
            pass
    # flipping any one character breaks it (or leaves it byte-identical)
    i = flip % len(tok)
    changed = tok[:i] + ("A" if tok[i] != "A" else "B") + tok[i + 1:]
    try:
        tokens.verify(changed, key, now, "taxiway")
        # base64 padding bits can absorb a change in the last character only
        assert i == len(tok) - 1
    except tokens.BadToken:
        pass
    try:
        tokens.verify(tok, key, now + 61)
        raise AssertionError("expired token accepted")
    except tokens.BadToken:
        pass


@given(st.text(max_size=200))
def test_verify_and_state_on_garbage(s):
    try:
        tokens.verify(s, b"k" * 32, time.time())
        raise AssertionError("garbage verified")
    except tokens.BadToken:
        pass
    assert tokens.check_state(s, b"k" * 32) is None


@given(st.lists(st.text(max_size=5), unique=True), st.integers(1, 6))
def test_paginate_visits_everything_once(items, n):
    items = sorted(items)
    seen, last = [], None
    for _ in range(len(items) + 2):
        page, more = paginate(items, n, last)
        seen += page
        if not more:
            break
        last = page[-1]
    assert seen == items


def test_only_a_full_disk_is_storage_full():
    import errno

    from taxiway.registry.errors import storage_error

    assert storage_error(OSError(errno.ENOSPC, "No space left")).code == "STORAGE_FULL"
    assert storage_error(OSError(errno.EDQUOT, "Quota exceeded")).status == 507
    for e in (OSError(errno.EIO, "I/O error"), PermissionError(errno.EACCES, "denied"),
              FileNotFoundError(errno.ENOENT, "gone")):
        err = storage_error(e)
        assert (err.code, err.status) == ("UNKNOWN", 500)
    gone = storage_error(FileNotFoundError(errno.ENOENT, "gone"), "manifest")
    assert (gone.code, gone.status) == ("MANIFEST_UNKNOWN", 404)
