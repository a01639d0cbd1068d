"""platform.policy: the machine-config policy (pure; unit and hypothesis tests, no I/O)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxiway.errors import InvalidInput
from taxiway.platform import appconfig, policy

REG = "127.0.0.1:4281"
VOLS = {"vol_0123456789abcdef": {"id": "vol_0123456789abcdef", "app": "web", "name": "data", "size": 1 << 30}}


def ok(**extra):
    return {"image": f"{REG}/web:1", **extra}


def refused(cfg, field, **kw):
    with pytest.raises(InvalidInput) as e:
        policy.check_config(cfg, volumes=VOLS, registry=REG, **kw)
    assert f"config.{field}" in e.value.message, e.value.message
    return e.value


@pytest.mark.parametrize("field,value", [
    ("cap_add", ["SYS_ADMIN"]), ("seccomp", "unconfined"), ("seccomp", {"defaultAction": "SCMP_ACT_ALLOW"}),
    ("net", "host"), ("net", "none"), ("isolation", "host"), ("auto_remove", True), ("tty", True),
    ("interactive", True), ("devices", ["/dev/sda"]), ("security_opt", ["apparmor=unconfined"]),
    ("privileged", True), ("ports", [{"host_port": 22, "port": 22, "host": "0.0.0.0"}]),
])
def test_privileged_options_are_refused_naming_the_field(field, value):
    refused(ok(**{field: value}), field)


def test_host_bind_mounts_and_foreign_volumes_are_refused():
    refused(ok(mounts=[{"source": "/", "target": "/h"}]), "mounts")
    refused(ok(mounts=[{"volume": "vol_ffffffffffffffff", "path": "/data"}]), "mounts")
    refused(ok(mounts=[{"volume": "../../etc", "path": "/data"}]), "mounts")
    refused(ok(mounts=[{"volume": "vol_0123456789abcdef", "path": "/proc/x"}]), "mounts")
    refused(ok(mounts=[{"volume": "vol_0123456789abcdef", "path": "data"}]), "mounts")
    got = policy.check_config(ok(mounts=[{"name": "data", "path": "/data"}]), volumes=VOLS, registry=REG)
    assert got["mounts"] == [{"volume": "vol_0123456789abcdef", "path": "/data"}]


def test_quotas():
    refused(ok(guest={"memory_mb": 1 << 30}), "guest.memory")
    refused(ok(guest={"cpus": 10_000}), "guest.cpus")
    refused(ok(env={"A=B": "x"}), "env")
    refused(ok(env={"A": "x\x00y"}), "env.A")
    refused(ok(env={"BIG": "x" * (70 << 10)}), "env")
    refused(ok(storage_size=1 << 60), "storage_size")
    with pytest.raises(InvalidInput):
        policy.check_machine_name("Not_A_Label")
    with pytest.raises(InvalidInput):
        policy.check_machine_count(policy.MAX_MACHINES_PER_APP)
    assert policy.check_machine_name("web-1") == "web-1"


def test_images_only_from_the_platform_registry_and_no_name_is_resolved(monkeypatch):
    def no_dns(*a, **k):
        raise AssertionError("the policy resolved a name")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "create_connection", no_dns)
    e = refused({"image": "evil.example:5000/x:1"}, "image")
    assert "never contacted" in e.message
    refused({"image": "docker.io/library/busybox:1"}, "image")
    refused({"image": "localhost/x:1"}, "image")  # the local store only on a platform without a registry
    assert policy.image_source(f"{REG}/web:1", REG) == "registry"
    assert policy.image_source("localhost:4281/web:1", REG) == "registry"
    assert policy.image_source("localhost/x:1", None) == "local"
    with pytest.raises(InvalidInput):
        policy.image_source("evil.example:5000/x:1", None)


def test_the_deployers_configs_pass():
    """What platform.appconfig writes for a release (every MachineConfig field at its default) is accepted."""
    cfg = appconfig.validate({"app": "web", "http_service": {"internal_port": 8080},
                              "mounts": [{"source": "data", "destination": "/data"}]})
    for mc in appconfig.machine_configs(cfg, f"{REG}/web:deployment-1", release=1).values():
        mc["mounts"] = [{"volume": "vol_0123456789abcdef", "path": "/data"}]
        got = policy.check_config(mc, volumes=VOLS, registry=REG)
        assert got["image"] == mc["image"] and "cap_add" not in got and "net" not in got


_keys = st.text(st.characters(codec="utf-8"), min_size=0, max_size=12)
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                       max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(policy.ALLOWED_KEYS | {"devices", "privileged", "x"})) | _keys,
                       _values, max_size=6))
def test_any_input_is_normalised_or_one_error_and_never_privileged(extra):
    cfg = {"image": f"{REG}/web:1", **extra}
    try:
        out = policy.check_config(cfg, volumes=VOLS, registry=REG)
    except InvalidInput as e:
        assert e.message.startswith(("config.", "'config'")) and "\n" not in e.message
        return
    assert set(out) <= policy.ALLOWED_KEYS
    assert not out.get("cap_add") and out.get("seccomp") is None and out.get("net", "private") == "private"
    assert not out.get("tty") and not out.get("interactive") and not out.get("auto_remove")
    assert all(set(m) <= {"volume", "path", "readonly"} and m["volume"] in VOLS for m in out["mounts"])
    assert policy.check_config(out, volumes=VOLS, registry=REG) == out  # idempotent


_HTTP = {"type": "http", "port": 8080, "path": "/healthz", "method": "GET", "interval": 10, "timeout": 2}


@pytest.mark.parametrize("check,field", [
    ({**_HTTP, "host": "10.0.0.1"}, "checks.c.host"),
    ({**_HTTP, "address": "169.254.169.254"}, "checks.c.address"),
    ({**_HTTP, "url": "http://example.com/"}, "checks.c.url"),
    ({**_HTTP, "path": "healthz"}, "checks.c.path"),
    ({**_HTTP, "path": "//evil.example/x"}, "checks.c.path"),
    ({**_HTTP, "path": "/a\r\nHost: x"}, "checks.c.path"),
    ({**_HTTP, "path": "/a b"}, "checks.c.path"),
    ({**_HTTP, "path": "/\x00"}, "checks.c.path"),
    ({**_HTTP, "method": "GET /x HTTP/1.1\r\n"}, "checks.c.method"),
    ({**_HTTP, "headers": {"X-A": "v\r\nX-B: w"}}, "checks.c.headers.X-A"),
    ({**_HTTP, "headers": {"X A\r\n": "v"}}, "checks.c.headers"),
    ({**_HTTP, "port": 0}, "checks.c.port"),
    ({**_HTTP, "port": "8080"}, "checks.c.port"),
    ({**_HTTP, "type": "exec"}, "checks.c.type"),
    ({**_HTTP, "protocol": "gopher"}, "checks.c.protocol"),
    ({**_HTTP, "interval": "soon"}, "checks.c.interval"),
])
def test_checks_take_only_their_documented_keys_and_values(check, field):
    e = refused(ok(checks={"c": check}), field)
    assert "\n" not in e.message and "\r" not in e.message
    # the same check inside a service is refused too, naming its place
    refused(ok(services=[{"internal_port": 8080, "protocol": "tcp", "checks": [check]}]),
            field.replace("checks.c", "services[0].checks[0]"))


def test_checks_that_only_shape_the_request_pass():
    """A Host header only sets the header (the agent dials 127.0.0.1:<the machine's host port>)."""
    good = {**_HTTP, "headers": {"Host": "web.example", "X-Multi": ["a", "b"]}, "protocol": "https",
            "tls_skip_verify": True, "grace_period": "5s", "path": "/health?full=1&x=%20"}
    out = policy.check_config(ok(checks={"c": good, "t": {"type": "tcp", "port": 9000}},
                                 services=[{"internal_port": 8080, "checks": [good]}]), volumes=VOLS, registry=REG)
    assert out["checks"]["c"] == good and out["services"][0]["checks"] == [good]


def test_the_deployers_checks_pass():
    cfg = appconfig.validate({"app": "web", "http_service": {"internal_port": 8080, "checks": [
        {"path": "/up", "method": "head", "headers": {"Host": "web.example"}, "interval": "5s"}]},
        "checks": {"db": {"type": "tcp", "port": 5432}, "web": {"type": "http", "port": 8080, "path": "/"}}})
    for mc in appconfig.machine_configs(cfg, f"{REG}/web:deployment-1", release=1).values():
        assert mc["checks"] and mc["services"][0]["checks"]
        got = policy.check_config(mc, volumes=VOLS, registry=REG)
        assert got["checks"] == mc["checks"] and got["services"] == mc["services"]
