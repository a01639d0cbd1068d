"""A micro-VM on the private network: the agent plugs it as it plugs namespace machines.

QEMU runs in the machine's plugged network namespace, which routes between the fabric and the
guest's tap; the guest holds the machine's address. Probed from inside the machines with busybox
``nc``: same org both ways, the other org refused both ways, and ``-p`` forwarding (STATUS.ports)
still reaches the guest. QEMU under TCG where KVM does not work (slow: this file is in SLOW_FILES).
"""

from __future__ import annotations

import socket
import time

import pytest
from machines.conftest import BUSYBOX, make_image
from test_network_matrix import PORTS, SERVE, AgentProc, _ping, machines_cleanup, probe, until  # noqa: F401, F811

from taxiway.platform import network, schema

pytestmark = pytest.mark.anyio


async def _started(state, app, mid):
    got = await state.get(schema.STATUS, schema.machine_key(app, mid))
    st = got[0] if got else {}
    return st if st.get("state") == "started" and st.get("private_ip") else None


async def test_micro_vm_joins_the_private_network(state, nats_server, platform_home, tmp_path, monkeypatch,
                                                  machines_cleanup):  # noqa: F811
    # machines_cleanup comes after platform_home so that its teardown runs first, while TAXIWAY_HOME
    # still names this test's home (as a usefixtures mark it ran last and missed the VM: qemu leaked)
    monkeypatch.setenv("TAXIWAY_KVM_CACHE", str(tmp_path / "kvm.json"))
    image = make_image(tmp_path, BUSYBOX)
    now = time.time()
    for app, org in (("web", "personal"), ("evil", "other")):
        await state.put(schema.APPS, app, {"name": app, "org": org, "created_at": now, "network": org})
    layout = {"vm": ("web", "vm"), "w1": ("web", "namespace"), "e1": ("evil", "namespace")}
    ids = {name: schema.new_machine_id() for name in layout}
    with AgentProc(nats_server.url, tmp_path):
        await until(lambda: _ping(state), what="the agent")
        for name, (app, isolation) in layout.items():
            cfg = {"image": image, "cmd": SERVE, "isolation": isolation, "restart": {"policy": "no"},
                   "stop_timeout": 1, "services": [{"internal_port": 8080, "protocol": "tcp"}]}
            rec = {"id": ids[name], "name": name, "app": app, "region": "local", "host": "local",
                   "process_group": "app", "release": 1, "config": cfg, "desired": "started", "instance_id": "i1",
                   "created_at": now, "updated_at": now}
            await state.put(schema.MACHINES, schema.machine_key(app, ids[name]), rec)
        st = {n: await until(lambda n=n: _started(state, layout[n][0], ids[n]), timeout=180, what=f"{n} started")
              for n in layout}
        ip = {n: s["private_ip"] for n, s in st.items()}
        assert network.org_of(ip["vm"]) == 1 and network.org_of(ip["e1"]) not in (None, 1)

        got = await probe(state, "web", ids["w1"], [(ip["vm"], p) for p in PORTS])
        assert set(got.values()) == {"open"}, got                     # namespace -> VM, same org
        got = await probe(state, "web", ids["vm"], [(ip["w1"], p) for p in PORTS] + [(ip["e1"], 8080)])
        assert got[(ip["w1"], 8080)] == got[(ip["w1"], 31337)] == "open", got   # VM -> namespace
        assert got[(ip["e1"], 8080)] == "refused", got                # VM -> other org
        got = await probe(state, "evil", ids["e1"], [(ip["vm"], 8080)])
        assert got[(ip["vm"], 8080)] == "refused", got                # other org -> VM

        # the guest's own view: its address on eth0, the platform's resolv.conf
        rc, out = await _sh(state, "web", ids["vm"], "ip -6 addr show dev eth0; cat /etc/resolv.conf")
        assert f"{ip['vm']}/128" in out and "nameserver fdaa::3" in out, out

        # -p forwarding (what the edge and health checks use) still reaches the guest
        port = st["vm"]["ports"]["8080"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.settimeout(30)
            assert c.recv(16).startswith(b"hi8080")


async def _sh(state, app, mid, script):
    r = await state.request(schema.agent_subject("local", "exec"),
                            {"app": app, "id": mid, "cmd": ["sh", "-c", script], "timeout": 30}, timeout=60)
    assert r.get("ok"), r
    return r["exit_code"], r["stdout"] + r["stderr"]
