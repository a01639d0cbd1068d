"""Name parsing and classification (pure; examples and properties)."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.pki.names import (
    Name,
    check_dns,
    classify,
    file_stem,
    parse_constraint,
    parse_names,
    within_constraints,
)


@pytest.mark.parametrize("arg,kind,value", [
    ("example.test", "dns", "example.test"),
    ("Example.TEST.", "dns", "example.test"),
    ("*.app.internal", "dns", "*.app.internal"),
    ("localhost", "dns", "localhost"),
    ("_acme.example.test", "dns", "_acme.example.test"),
    ("xn--mnchen-3ya.de", "dns", "xn--mnchen-3ya.de"),
    ("127.0.0.1", "ip", "127.0.0.1"),
    ("::1", "ip", "::1"),
    ("[fdaa::0001]", "ip", "fdaa::1"),
    ("ops@example.test", "email", "ops@example.test"),
    ("spiffe://taxiway/app/web", "uri", "spiffe://taxiway/app/web"),
    ("https://example.test/x", "uri", "https://example.test/x"),
])
def test_classify_examples(arg, kind, value):
    assert classify(arg) == Name(kind, value)


@pytest.mark.parametrize("arg,message", [
    ("*", "matches every host"),
    ("*.com", "top-level domain"),
    ("*.internal", "top-level domain"),
    ("foo.*.example.test", "invalid wildcard"),
    ("f*o.example.test", "invalid wildcard"),
    ("**.example.test", "invalid wildcard"),
    ("1.2.3.999", "malformed IP"),
    ("10.0.0", "malformed IP"),
    ("fdaa::1::2", "malformed IP"),
    ("fe80::1%eth0", "has a zone ID (%eth0); a certificate cannot carry one; give the address alone: fe80::1"),
    ("[fe80::1%25eth0]", "zone ID"),
    ("FE80::0:1%2", "give the address alone: fe80::1"),
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("", "empty name"),
    ("-bad.example.test", "invalid name"),
    ("a..b", "invalid name"),
    ("exa mple.test", "invalid name"),
    ("x" * 64 + ".test", "invalid name"),
    ("@example.test", "invalid email"),
    ("ops@*.example.test", "may not be a wildcard"),
    ("://nohost", "invalid URI"),
    ("spiffe://has space", "spaces"),
    # second attack, finding 8: invalid A-labels and numeric forms browsers read as addresses
    ("xn--zz.example", "not a valid IDNA A-label"),
    ("xn--ls8h.example", "not a valid IDNA A-label"),
    ("0x7f.0.0.1", "malformed IP"),
    ("0177.0.0.1", "malformed IP"),
    ("host.0x10", "malformed IP"),
])
def test_bad_names(arg, message):
    with pytest.raises(InvalidInput) as e:
        classify(arg)
    assert message in str(e.value)


def test_order_by_kind_and_dedupe():
    names = parse_names(["spiffe://t/a", "b@x.test", "10.0.0.1", "b.test", "a.test", "B.TEST", "10.0.0.1"])
    assert names.values() == ["b.test", "a.test", "10.0.0.1", "b@x.test", "spiffe://t/a"]
    assert names.server_names


def test_file_stem_like_mkcert():
    assert file_stem(parse_names(["example.test", "localhost", "::1"])) == "example.test+2"
    assert file_stem(parse_names(["*.example.test"])) == "_wildcard.example.test"
    assert file_stem(parse_names(["::1"]), client=True) == "__1-client"


def test_constraints():
    cons = [parse_constraint("internal"), parse_constraint(".example.test"), parse_constraint("10.0.0.0/8")]
    assert cons == [Name("dns", "internal"), Name("dns", "example.test"), Name("ip", "10.0.0.0/8")]
    assert within_constraints(classify("web.internal"), cons)
    assert within_constraints(classify("*.app.internal"), cons)
    assert within_constraints(classify("example.test"), cons)
    assert not within_constraints(classify("evil.com"), cons)
    assert not within_constraints(classify("notexample.test"), cons)
    assert within_constraints(classify("10.1.2.3"), cons)
    assert not within_constraints(classify("127.0.0.1"), cons)
    # IP subtrees are one kind for OpenSSL: an IPv6 address outside every subtree is refused too.
    assert not within_constraints(classify("::1"), cons)
    assert within_constraints(classify("ops@evil.com"), cons)  # emails: no rfc822 subtree, unconstrained
    with pytest.raises(InvalidInput):
        parse_constraint("10.0.0.1/8")
    with pytest.raises(InvalidInput):
        parse_constraint("*.internal")
    with pytest.raises(InvalidInput, match="zone ID"):
        parse_constraint("fe80::%eth0/64")
    with pytest.raises(InvalidInput, match=r"has no /prefix.*127.0.0.1/32"):
        parse_constraint("127.0.0.1")
    # one kind constrained closes the other (second attack, finding 1)
    assert not within_constraints(classify("8.8.8.8"), [Name("dns", "internal")])
    assert not within_constraints(classify("www.google.com"), [Name("ip", "127.0.0.0/8")])
    assert within_constraints(classify("ops@evil.com"), [Name("ip", "127.0.0.0/8")])


label = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=20)
# a numeric (or 0x) last label makes browsers parse the host as an IPv4 address
hostnames = st.lists(label, min_size=2, max_size=5).map(".".join).filter(
    lambda h: not h.rsplit(".", 1)[-1].isdigit() and not h.rsplit(".", 1)[-1].startswith("0x"))


@given(hostnames)
def test_hostnames_are_dns(host):
    assert classify(host) == Name("dns", host)
    assert classify(host.upper() + ".") == Name("dns", host)


@given(hostnames)
def test_wildcards_over_two_labels_ok(host):
    assert classify("*." + host).value == "*." + host


@given(label)
def test_wildcard_over_one_label_refused(tld):
    with pytest.raises(InvalidInput):
        classify("*." + tld)


@given(st.ip_addresses())
def test_ip_addresses_round_trip(ip):
    n = classify(str(ip))
    assert n.kind == "ip" and ipaddress.ip_address(n.value) == ip


@given(st.text(max_size=40))
@settings(max_examples=300)
def test_anything_classifies_or_fails_cleanly(text):
    try:
        n = classify(text)
    except InvalidInput as e:
        assert e.message and e.hint
        return
    assert n.kind in ("dns", "ip", "email", "uri")
    assert n.value.isascii()
    if n.kind == "dns":
        assert check_dns(n.value) == n.value  # normalization is idempotent


@given(st.lists(st.one_of(hostnames, st.ip_addresses().map(str)), max_size=8))
def test_parse_names_groups_dns_before_ip(args):
    values = parse_names(args).values()
    kinds = [classify(v).kind for v in values]
    assert kinds == sorted(kinds, key=["dns", "ip"].index)
    assert len(values) == len(set(values))
