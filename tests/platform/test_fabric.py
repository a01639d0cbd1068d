"""The fabric's plumbing (platform.fabric) without machines: namespaces made under tmp, sockets inside them.

Machines' side is tested end to end in test_network_matrix.py; here plain network namespaces
stand in for machines' (the agent hands exactly such a file to the runtime).
"""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from taxiway.errors import TaxiwayError
from taxiway.platform import fabric, network


@pytest.fixture
def fab(tmp_path):
    f = fabric.Fabric.for_home(tmp_path / "home")
    yield f
    f.teardown()
    assert fabric.netns_mounts(tmp_path) == []


def _echo_server(ns, port: int) -> socket.socket:
    srv = fabric.run_in(ns, lambda: socket.create_server(("::", port), family=socket.AF_INET6))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.sendall(b"hi")

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _connect(addr: str, port: int, src: str | None = None) -> str:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        if src:
            s.bind((src, 0))
        s.connect((addr, port))
        return s.recv(10).decode() or "closed"
    except TimeoutError:
        return "nothing"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        s.close()


def _ifindex(ns, name: str) -> int:
    return fabric.run_in(ns, socket.if_nametoindex, name)


def test_rules_render_for_ip6tables():
    rules = fabric.base_rules()
    assert ":INPUT DROP" in rules and ":FORWARD DROP" in rules
    assert "-A INPUT -d fdaa::3/128 -p udp -m udp --dport 53 -j ACCEPT" in rules
    for port in (53, 3128, 4280):
        assert f"-A INPUT -d fdaa::3/128 -p tcp -m tcp --dport {port} -j ACCEPT" in rules
    mine = fabric.machine_rules("m1", "tw1", "fdaa:0:1:1::1", 1)
    assert "-I TW-SRC -i tw1 -s fdaa:0:1:1::1/128" in mine and "-d fdaa:0:1::/48" in mine
    assert fabric.machine_rules("m1", "tw1", "fdaa:0:1:1::1", 1, "-D").count("-D ") == 3


def test_no_fabric_is_one_clear_error(tmp_path):
    f = fabric.Fabric.for_home(tmp_path)
    assert not f.exists() and not fabric.is_netns(f.path)
    with pytest.raises(TaxiwayError, match="no private network fabric"):
        fabric.listen_socket(socket.AF_INET6, socket.SOCK_STREAM, "fdaa::3", 4280, fab=f)


def test_fabric_lifecycle_plug_listen_and_isolation(fab, tmp_path):
    fab.ensure()
    fab.ensure()  # idempotent
    assert fab.exists() and fabric.netns_mounts(tmp_path) == [str(fab.path)]
    # the host's own network namespace is not the fabric: fdaa::3 is nowhere on the host
    with pytest.raises(OSError):
        socket.socket(socket.AF_INET6).bind(("fdaa::3", 0))
    a = fab.plug("ma", 1, 1)
    b = fab.plug("mb", 1, 2)
    x = fab.plug("mx", 7, 3)
    assert fab.plugged() == ["ma", "mb", "mx"]
    assert fab.info("mx") == {"org": 7, "host": 1, "field": 3, "address": "fdaa:0:7:1::3", "veth": "tw3"}
    idx = _ifindex(fab.path, "tw1")
    assert fab.plug("ma", 1, 1) == a and _ifindex(fab.path, "tw1") == idx  # an intact plug is left alone

    srv_b = _echo_server(b, 9000)
    srv_a = _echo_server(a, 9000)
    api = fabric.listen_socket(socket.AF_INET6, socket.SOCK_STREAM, "fdaa::3", 4280, fab=fab)
    threading.Thread(target=lambda: api.accept()[0].sendall(b"hi"), daemon=True).start()
    try:
        assert fabric.run_in(a, _connect, "fdaa:0:1:1::2", 9000) == "hi"          # same org
        assert fabric.run_in(x, _connect, "fdaa:0:1:1::2", 9000) == "Connection refused"  # other org
        assert fabric.run_in(b, _connect, "fdaa:0:7:1::3", 9000) == "Connection refused"  # and back
        assert fabric.run_in(x, _connect, "fdaa::3", 4280) == "hi"                 # the platform's API port
        assert fabric.run_in(x, _connect, "fdaa::3", 4281) == "Connection refused"
        # forging a same-org address from the other org's namespace: dropped, not even refused
        subprocess.run(["nsenter", f"--net={x}", "ip", "addr", "add", "fdaa:0:1:1::9/128", "dev", "eth0", "nodad"],
                       check=True)
        assert fabric.run_in(x, _connect, "fdaa:0:1:1::2", 9000, "fdaa:0:1:1::9") == "nothing"
    finally:
        for s in (srv_a, srv_b, api):
            s.close()

    # the fabric remade (a host reboot, a teardown while machines were stopped): plug again restores it
    fabric._drop_netns(fab.path)
    assert not fab.exists()
    fab.plug("ma", 1, 1)
    fab.plug("mb", 1, 2)
    srv_b = _echo_server(b, 9001)
    try:
        assert fabric.run_in(a, _connect, "fdaa:0:1:1::2", 9001) == "hi"
    finally:
        srv_b.close()

    fab.unplug("mb")
    assert fab.plugged() == ["ma", "mx"] and fab.info("mb") is None and not fabric.is_netns(b)
    rules = subprocess.run(["nsenter", f"--net={fab.path}", "ip6tables-save"], capture_output=True, text=True).stdout
    assert "tw:mb" not in rules and "tw:ma" in rules
    fab.unplug("never-plugged")  # nothing to do, no error


def test_addresses_match_the_layout(fab):
    path = fab.plug("m", 5, 0x1234)
    out = subprocess.run(["nsenter", f"--net={path}", "ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert f"inet6 {network.machine_address(5, 1, 0x1234)}/128" in out
    assert "inet 127.0.0.1/8" in out and out.count(" inet ") == 1  # IPv4: loopback only


def test_relay_brings_a_loopback_service_to_fdaa_3(fab):
    """The Machines API listens on host loopback; machines reach it at [fdaa::3]:4280 through a relay."""
    api = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = api.accept()
            except OSError:
                return
            with c:
                c.sendall(b"api:" + c.recv(16))

    threading.Thread(target=serve, daemon=True).start()
    m = fab.plug("m", 1, 1)
    r = fabric.relay(network.API_PORT, api.getsockname(), fab=fab)

    def ask() -> bytes:
        with socket.create_connection(("fdaa::3", network.API_PORT), timeout=5) as s:
            s.sendall(b"ping")
            return s.recv(16)

    try:
        assert fabric.run_in(m, ask) == b"api:ping"
        assert fabric.run_in(m, ask) == b"api:ping"
    finally:
        r.close()
        api.close()
    assert fabric.run_in(m, _connect, "fdaa::3", network.API_PORT) == "Connection refused"
