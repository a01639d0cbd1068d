import pytest
from hypothesis import given
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.oci.digest import Digest
from taxiway.oci.reference import Reference


@pytest.mark.parametrize(
    "s,registry,repo,tag,digest",
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("127.0.0.1:5000/a/b:v2", "127.0.0.1:5000", "a/b", "v2", None),
        ("reg.example:443/x@sha256:" + "a" * 64, "reg.example:443", "x", None, "sha256:" + "a" * 64),
        ("reg.example/x:t@sha256:" + "b" * 64, "reg.example", "x", "t", "sha256:" + "b" * 64),
    ],
)
def test_parse(s, registry, repo, tag, digest):
    r = Reference.parse(s)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)


@pytest.mark.parametrize("s", ["", "UPPER/case", "a//b", "x:", "x@sha256:zz", "x@md5:" + "a" * 32, " x", "a/../b"])
def test_invalid(s):
    with pytest.raises(InvalidInput):
        Reference.parse(s)


def test_loopback():
    assert Reference.parse("127.0.0.1:5000/a").is_loopback
    assert Reference.parse("localhost:5000/a").is_loopback
    assert not Reference.parse("registry.example/a").is_loopback


@given(st.text(max_size=80))
def test_digest_parse_never_crashes(s):
    try:
        d = Digest.parse(s)
    except InvalidInput:
        return
    assert "/" not in str(d) and ".." not in str(d)
