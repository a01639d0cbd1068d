"""Address classification: a table in the spirit of Smokescreen's, plus hypothesis for IPv6 embeddings."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taxiway.egress.addresses import AddressPolicy, Range, classify, dial_address

ip = ipaddress.ip_address

CLASSES = [
    # IPv4
    ("8.8.8.8", "public"),
    ("1.1.1.1", "public"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this-network"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local"),
    ("169.254.0.1", "link-local"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("172.32.0.1", "public"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("100.128.0.1", "public"),
    ("192.0.0.170", "ietf-protocol"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.20.0.1", "public"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),
    ("fc00::1", "unique-local"),
    ("fdaa::2", "unique-local"),
    ("fd00:ec2::254", "unique-local"),
    ("ff02::1", "multicast"),
    ("64:ff9b::808:808", "nat64"),
    ("64:ff9b:1::1", "nat64"),
    ("2002:c000:0204::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    ("4000::1", "reserved"),
    ("2606:4700:4700::1111", "public"),
    ("2a00:1450:4001::1", "public"),
    ("::ffff:127.0.0.1", "ipv4-mapped"),
    ("::127.0.0.1", "ipv4-compatible"),
]


@pytest.mark.parametrize("addr,expected", CLASSES)
def test_classification_table(addr, expected):
    assert classify(ip(addr)).name == expected


@pytest.mark.parametrize("addr,allowed", [
    ("8.8.8.8", True), ("2606:4700::1", True),
    ("127.0.0.1", False), ("::1", False), ("169.254.169.254", False), ("10.1.2.3", False),
    ("::ffff:8.8.8.8", True), ("::ffff:10.0.0.1", False), ("::ffff:169.254.169.254", False),
    ("::8.8.8.8", True), ("::10.0.0.1", False),
    ("64:ff9b::808:808", False), ("2002:808:808::1", False), ("2001::1", False),
])
def test_default_policy(addr, allowed):
    assert AddressPolicy().judge(ip(addr), 443).allowed is allowed


def test_mapped_addresses_are_dialled_as_ipv4():
    v = AddressPolicy().judge(ip("::ffff:8.8.8.8"), 443)
    assert v.address == ip("8.8.8.8")
    assert "169.254.169.254 (link-local)" in AddressPolicy().judge(ip("::ffff:169.254.169.254"), 80).reason


def test_deny_wins_over_allow_unlike_smokescreen_issue_236():
    policy = AddressPolicy(allow=(Range.parse("10.0.0.0/8", "--allow-range"),),
                           deny=(Range.parse("10.1.0.0/16", "--deny-range"),))
    assert policy.judge(ip("10.2.3.4"), 80).allowed
    v = policy.judge(ip("10.1.2.3"), 80)
    assert not v.allowed and "--deny-range 10.1.0.0/16" in v.reason


def test_deny_address_with_port():
    policy = AddressPolicy(allow=(Range.parse("127.0.0.2/32", "--allow-range"),),
                           deny=(Range.parse("127.0.0.2:8080", "--deny-address"),))
    assert policy.judge(ip("127.0.0.2"), 80).allowed
    assert not policy.judge(ip("127.0.0.2"), 8080).allowed
    assert policy.judge(ip("8.8.8.8"), 8080).allowed


def test_allow_range_applies_to_the_unwrapped_ipv4():
    policy = AddressPolicy(allow=(Range.parse("127.0.0.2/32"),))
    assert policy.judge(ip("::ffff:127.0.0.2"), 80).allowed
    assert not policy.judge(ip("::ffff:127.0.0.3"), 80).allowed
    # An IPv4 allow range says nothing about an IPv6 address that embeds it.
    assert not policy.judge(ip("64:ff9b::7f00:2"), 80).allowed


def test_the_proxy_itself_is_never_dialled():
    policy = AddressPolicy(allow=(Range.parse("127.0.0.0/8"),)).with_own([(ip("127.0.0.1"), 4750)])
    assert not policy.judge(ip("127.0.0.1"), 4750).allowed
    assert not policy.judge(ip("::ffff:127.0.0.1"), 4750).allowed
    assert policy.judge(ip("127.0.0.1"), 4751).allowed
    any_policy = AddressPolicy(allow=(Range.parse("127.0.0.0/8"),)).with_own([], any_port=4750)
    assert not any_policy.judge(ip("127.0.0.9"), 4750).allowed


ipv4s = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@given(ipv4s)
def test_ipv4_mapped_is_judged_as_its_ipv4(v4):
    mapped = ipaddress.IPv6Address(0xFFFF << 32 | int(v4))
    c = classify(mapped)
    assert c.name == "ipv4-mapped" and c.embedded == v4 and c.inner == classify(v4)
    assert dial_address(mapped) == v4
    policy = AddressPolicy()
    assert policy.judge(mapped, 80).allowed == policy.judge(v4, 80).allowed


@given(ipv4s.filter(lambda a: int(a) > 1))
def test_ipv4_compatible_is_judged_as_its_ipv4(v4):
    compat = ipaddress.IPv6Address(int(v4))
    c = classify(compat)
    assert c.name == "ipv4-compatible" and c.inner == classify(v4)
    assert AddressPolicy().judge(compat, 80).allowed == AddressPolicy().judge(v4, 80).allowed


@given(ipv4s, st.integers(min_value=0, max_value=2**32 - 1))
def test_nat64_is_denied_and_names_the_embedded_ipv4(v4, suffix):
    nat64 = ipaddress.IPv6Address(0x64FF9B << 96 | int(v4))
    c = classify(nat64)
    assert c.name == "nat64" and c.embedded == v4
    assert not AddressPolicy().judge(nat64, 443).allowed
    local = ipaddress.IPv6Address(0x0064FF9B0001 << 80 | suffix)
    assert classify(local).name == "nat64"


@given(ipv4s, st.integers(min_value=0, max_value=2**80 - 1))
def test_6to4_is_denied_and_names_the_embedded_ipv4(v4, rest):
    addr = ipaddress.IPv6Address(0x2002 << 112 | int(v4) << 80 | rest)
    c = classify(addr)
    assert c.name == "6to4" and c.embedded == v4
    assert not AddressPolicy().judge(addr, 443).allowed


@given(ipv4s, ipv4s, st.integers(min_value=0, max_value=2**32 - 1))
def test_teredo_is_denied_and_names_the_client_ipv4(server, client, flags_port):
    addr = ipaddress.IPv6Address(0x20010000 << 96 | int(server) << 64 | flags_port << 32
                                 | (~int(client) & 0xFFFFFFFF))
    c = classify(addr)
    assert c.name == "teredo" and c.embedded == client
    assert not AddressPolicy().judge(addr, 443).allowed


@given(st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address))
def test_every_ipv6_address_gets_a_class_and_only_global_unicast_is_public(addr):
    c = classify(addr)
    if c.public:
        assert addr in ipaddress.ip_network("2000::/3")
    if AddressPolicy().judge(addr, 443).allowed:
        assert dial_address(addr).is_global
