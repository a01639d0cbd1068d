"""The SSRF battery, through the running proxy: every trick is denied, nothing internal is dialled.

Internal targets are trap servers on 127.0.0.1 and 127.0.0.3 listening on the
same port as the allowed upstream (127.0.0.2), so a proxy that dialled the
wrong address would be caught by a connection count, not just a status code.
"""

from __future__ import annotations

import pytest

from .conftest import raw_request, status_of

# {p} is the shared port of the upstream and the traps.
HOSTS = [
    "127.0.0.1:{p}",
    "2130706433:{p}",            # decimal
    "0177.0.0.1:{p}",            # octal
    "0x7f.0.0.1:{p}",            # hex
    "0x7f000001:{p}",
    "017700000001:{p}",
    "127.1:{p}",                 # short forms
    "127.0.1:{p}",
    "127.0.0.1.:{p}",            # trailing dot
    "127.0.0.3:{p}",
    "[::ffff:127.0.0.1]:{p}",    # IPv4-mapped
    "[::ffff:7f00:3]:{p}",
    "[::127.0.0.1]:{p}",         # IPv4-compatible
    "[::1]:{p}",
    "[::]:{p}",
    "0.0.0.0:{p}",
    "0:{p}",
    "[64:ff9b::7f00:1]:{p}",     # NAT64
    "[2002:7f00:1::1]:{p}",      # 6to4
    "[fe80::1%25lo]:{p}",        # zone id
    "localhost:{p}",
    "LOCALHOST.:{p}",
    "app.localhost:{p}",
    "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ:{p}",           # IDNA look-alikes that map to internal names/addresses
    "１２７.０.０.１:{p}",
    "127。0。0。1:{p}",
    "%31%32%37.0.0.1:{p}",       # percent-encoded
    "internal.test:{p}",         # names that resolve inside
    "internal.test.:{p}",
    "INTERNAL.TEST:{p}",
    "localhost.test:{p}",
    "cname.test:{p}",            # CNAME to an internal name
    "mapped.test:{p}",           # AAAA ::ffff:127.0.0.3
    "nat64.test:{p}",
    "ula.test:{p}",
    "unspecified.test:{p}",
    "metadata.test:80",
    "private.test:80",
    "169.254.169.254:80",
    "[fd00:ec2::254]:80",
    "100.64.0.1:80",
    "10.0.0.1:80",
    "192.168.0.1:80",
    "[fdaa::2]:80",
]


@pytest.fixture(scope="module")
def trap_count(traps):
    before = traps.connections
    yield
    assert traps.connections == before, "the proxy dialled an internal address"


@pytest.mark.parametrize("host", HOSTS)
def test_absolute_form_is_denied(shared_proxy, traps, trap_count, upstream, host):
    hostport = host.format(p=upstream.port)
    before = traps.connections
    resp = raw_request(shared_proxy, f"GET http://{hostport}/ HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
    assert status_of(resp) in (400, 403), resp[:300]
    if status_of(resp) == 403:
        assert b"X-Taxiway-Egress-Error: egress to " in resp
    assert traps.connections == before


@pytest.mark.parametrize("host", HOSTS)
def test_connect_is_denied(shared_proxy, traps, trap_count, upstream, host):
    hostport = host.format(p=upstream.port)
    before = traps.connections
    resp = raw_request(shared_proxy, f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
    assert status_of(resp) in (400, 403), resp[:300]
    assert traps.connections == before


@pytest.mark.parametrize("url", [
    "http://ok.test@127.0.0.1:{p}/",
    "http://ok.test:{p}@127.0.0.1:{p}/",
    "http://ok.test:{p}@127.0.0.3:{p}/x",
    "http://127.0.0.1:{p}#@ok.test:{p}/",
    "http://127.0.0.1:{p}?@ok.test:{p}/",
    "http://127.0.0.1:{p}\\@ok.test:{p}/",
    "http://ok.test:{p}\\@127.0.0.1:{p}/",
    "http://[::ffff:127.0.0.1]:{p}@ok.test:{p}/",
])
def test_userinfo_confusion_is_denied(shared_proxy, traps, trap_count, upstream, url):
    url = url.format(p=upstream.port)
    before = traps.connections
    resp = raw_request(shared_proxy, f"GET {url} HTTP/1.1\r\nHost: ok.test\r\n\r\n".encode())
    if status_of(resp) == 200:
        # Only the URL-standard reading (host after the last '@') may be dialled.
        assert b"X-Upstream: 127.0.0.2" in resp
    else:
        assert status_of(resp) in (400, 403), resp[:300]
    assert traps.connections == before


def test_connect_with_userinfo_is_refused(shared_proxy, upstream, trap_count):
    t = f"ok.test@127.0.0.1:{upstream.port}"
    assert status_of(raw_request(shared_proxy, f"CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n".encode())) == 400


def test_host_header_is_never_the_destination(shared_proxy, upstream, trap_count):
    resp = raw_request(shared_proxy, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode())
    assert status_of(resp) == 400
    resp = raw_request(shared_proxy, (f"GET http://ok.test:{upstream.port}/h HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{upstream.port}\r\nConnection: close\r\n\r\n").encode())
    assert status_of(resp) == 200 and b"X-Upstream: 127.0.0.2" in resp
    assert f"host=ok.test:{upstream.port}".encode() in resp


def test_dns_rebinding_never_reaches_the_internal_address(shared_proxy, traps, trap_count, upstream, dns):
    """rebind.test answers 127.0.0.2 and 127.0.0.3 in turn (TTL 0): each request is judged on
    the one answer it got and dials exactly that address."""
    before = traps.connections
    statuses = []
    for _ in range(8):
        resp = raw_request(shared_proxy, (f"GET http://rebind.test:{upstream.port}/ HTTP/1.1\r\n"
                                          "Host: rebind.test\r\nConnection: close\r\n\r\n").encode())
        statuses.append(status_of(resp))
        if status_of(resp) == 200:
            assert b"X-Upstream: 127.0.0.2" in resp
        else:
            assert b"127.0.0.3 is a loopback address" in resp
    assert set(statuses) == {200, 403}
    assert traps.connections == before


def test_name_with_internal_and_public_answers_dials_only_the_allowed_one(shared_proxy, traps, upstream):
    before = traps.connections
    for _ in range(3):
        resp = raw_request(shared_proxy, (f"GET http://mixed.test:{upstream.port}/ HTTP/1.1\r\n"
                                          "Host: mixed.test\r\nConnection: close\r\n\r\n").encode())
        assert status_of(resp) == 200 and b"X-Upstream: 127.0.0.2" in resp
    assert traps.connections == before


def test_the_allowed_path_works(shared_proxy, upstream):
    resp = raw_request(shared_proxy, (f"GET http://ok.test:{upstream.port}/fine HTTP/1.1\r\n"
                                      "Host: ok.test\r\nConnection: close\r\n\r\n").encode())
    assert status_of(resp) == 200 and b"GET /fine host=ok.test:" in resp
    resp = raw_request(shared_proxy, (f"GET http://cname-ok.test:{upstream.port}/c HTTP/1.1\r\n"
                                      "Connection: close\r\n\r\n").encode())
    assert status_of(resp) == 200 and b"X-Upstream: 127.0.0.2" in resp
    # An IDNA name is looked up by its A-label.
    resp = raw_request(shared_proxy, (f"GET http://тест.test:{upstream.port}/i HTTP/1.1\r\n"
                                      "Connection: close\r\n\r\n").encode())
    assert status_of(resp) == 200 and b"host=xn--e1aybc.test:" in resp


def test_the_proxy_never_dials_itself(start_proxy, traps):
    proxy = start_proxy("--allow-range", "127.0.0.0/8", allow=False)
    me = f"127.0.0.1:{proxy.port}"
    resp = raw_request(proxy, f"CONNECT {me} HTTP/1.1\r\nHost: {me}\r\n\r\n".encode())
    assert status_of(resp) == 403 and b"is the proxy itself" in resp
    resp = raw_request(proxy, f"GET http://[::ffff:127.0.0.1]:{proxy.port}/ HTTP/1.1\r\n\r\n".encode())
    assert status_of(resp) == 403 and b"is the proxy itself" in resp


def test_deny_range_wins_over_allow_range(start_proxy, upstream, traps):
    proxy = start_proxy("--allow-range", "127.0.0.0/8", "--deny-range", "127.0.0.1/32",
                        "--deny-address", f"127.0.0.3:{upstream.port}", allow=False)
    before = traps.connections
    for host in ("127.0.0.1", "127.0.0.3"):
        resp = raw_request(proxy, f"GET http://{host}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode())
        assert status_of(resp) == 403 and b"denied by --deny-" in resp
    resp = raw_request(proxy, f"GET http://ok.test:{upstream.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    assert status_of(resp) == 200
    assert traps.connections == before
