"""The private network's address layout (platform.network): pure, property-tested."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taxiway.platform import network as N

orgs = st.integers(1, N.MAX_ORG)
hosts = st.integers(1, N.MAX_HOST)
fields = st.integers(1, N.MAX_FIELD)


def test_layout_examples():
    assert str(N.org_prefix(1)) == "fdaa:0:1::/48"
    assert str(N.host_prefix(1, 1)) == "fdaa:0:1:1::/64"
    assert str(N.machine_address(1, 1, 2)) == "fdaa:0:1:1::2"
    assert str(N.machine_address(0x12345678, 0xABCD, 0x1122334455667788)) == "fdaa:1234:5678:abcd:1122:3344:5566:7788"
    assert N.parse("fdaa:0:1:1::2") == N.Address(1, 1, 2)
    assert N.org_of("fdaa:0:2:1::9") == 2
    assert N.parse("fdaa:0:1:1::2%eth0") == N.Address(1, 1, 2)  # a scoped text form


@pytest.mark.parametrize("addr", ["fdaa::3", "::1", "127.0.0.1", "fe80::1", "fdab:0:1:1::2", "fdaa:0:1:0::2",
                                  "fdaa:0:1:1::", "fdaa::1:0:0:5", "not an address", ""])
def test_not_machine_addresses(addr):
    assert N.parse(addr) is None and N.org_of(addr) is None


@pytest.mark.parametrize("bad", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (N.MAX_ORG + 1, 1, 1), (1, N.MAX_HOST + 1, 1),
                                 (1, 1, N.MAX_FIELD + 1), (True, 1, 1), (-1, 1, 1)])
def test_out_of_range_fields_are_refused(bad):
    with pytest.raises(ValueError):
        N.machine_address(*bad)


@given(orgs, hosts, fields)
def test_parse_format_round_trip(org, host, field):
    addr = N.machine_address(org, host, field)
    assert N.parse(str(addr)) == (org, host, field)
    assert N.parse(N.format_address(N.Address(org, host, field))) == (org, host, field)
    assert addr in N.host_prefix(org, host) and addr in N.org_prefix(org) and addr in N.PLATFORM_PREFIX


@given(orgs, orgs)
def test_no_two_orgs_overlap(a, b):
    if a != b:
        assert not N.org_prefix(a).overlaps(N.org_prefix(b))
    else:
        assert N.org_prefix(a) == N.org_prefix(b)


@given(orgs, hosts, fields, orgs)
def test_a_machine_is_in_its_org_only(org, host, field, other):
    addr = N.machine_address(org, host, field)
    assert (addr in N.org_prefix(other)) == (org == other)


@given(orgs, hosts)
def test_the_service_address_is_in_no_org(org, host):
    assert N.SERVICE_ADDRESS not in N.org_prefix(org)
    assert N.SERVICE_ADDRESS not in N.host_prefix(org, host)
    assert N.parse(N.SERVICE_ADDRESS) is None
    assert N.SERVICE_ADDRESS in N.PLATFORM_PREFIX


@given(fields, fields)
def test_veth_names_fit_and_differ(a, b):
    na, nb = N.veth_name(a), N.veth_name(b)
    assert len(na) <= 15 and na.startswith(("tw", "th")) and na.isascii()
    if a != b:
        assert na != nb


def test_machine_environment_and_dns():
    env = N.machine_env(1, "fdaa:0:1:1::2")
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://[fdaa::3]:3128"
    assert env["NO_PROXY"] == ".internal,localhost,127.0.0.1,::1,fdaa:0:1::/48"
    assert env["FLY_PRIVATE_IP"] == "fdaa:0:1:1::2"
    assert N.resolv_conf("web") == "nameserver fdaa::3\nsearch web.internal internal\n"
    dns = N.dns_config("web", "fdaa:0:1:1::2", ["m1"])
    assert dns == {"nameservers": ["fdaa::3"], "searches": ["web.internal", "internal"],
                   "hosts": [["fdaa:0:1:1::2", "m1"]]}
    from taxiway.machines.namespace import etc_files

    files = etc_files("h", "/x/netns", dns)
    assert files["resolv.conf"] == N.resolv_conf("web")
    assert "fdaa:0:1:1::2\tm1\n" in files["hosts"]


@given(orgs)
def test_no_proxy_names_exactly_the_org(org):
    entries = N.no_proxy(org).split(",")
    nets = [ipaddress.ip_network(e) for e in entries if ":" in e and "/" in e]
    assert nets == [N.org_prefix(org)]


@pytest.mark.parametrize("field,value", [("net", "/proc/1/ns/net"), ("net", "host"), ("net", "/tmp/x/fabric"),
                                         ("dns", {"nameservers": ["8.8.8.8"]}), ("private_ip", "fdaa:0:1:1::1")])
def test_tenants_never_choose_the_network(field, value):
    """net, dns and private_ip are the agent's, set after this check; a tenant's value is refused."""
    from taxiway.errors import InvalidInput
    from taxiway.platform import policy

    with pytest.raises(InvalidInput, match=field):
        policy.check_config({"image": "localhost/x:1", field: value})
    assert field not in policy.check_config({"image": "localhost/x:1", field: None})
