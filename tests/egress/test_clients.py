"""Real clients through the proxy: curl, httpx, requests, Node's https-proxy-agent, Go's net/http.

Targets are names the test DNS server maps to 127.0.0.2 (plain and TLS
upstreams with certificates from taxiway's CA); clients never resolve them
themselves, they hand them to the proxy, as they do in production.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from .conftest import ALLOWED, Upstream, proxy_server

HERE = Path(__file__).parent
PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory):
    from taxiway.pki import CA

    d = tmp_path_factory.mktemp("egress-ca")
    ca, _ = CA.init(d / "ca")
    ca.issue(["ok.test", "www.ok.test"]).write(d / "upstream.pem", d / "upstream.key")
    ca.issue(["127.0.0.1"]).write(d / "proxy.pem", d / "proxy.key")
    ca.issue(["worker"], client=True, cn="worker").write(d / "worker.pem", d / "worker.key")
    (d / "root.pem").write_bytes(ca.root_pem)
    return d


@pytest.fixture(scope="module")
def tls_upstream(ca_files):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca_files / "upstream.pem", ca_files / "upstream.key")
    u = Upstream(ALLOWED, ssl=ctx)
    yield u
    u.close()


@pytest.fixture(scope="module")
def authed_proxy(tmp_path_factory, dns):
    """A proxy that wants $PROXY_PASSWORD (role authed) and lets that role reach ok.test only."""
    d = tmp_path_factory.mktemp("egress-authed")
    acl = d / "acl.yaml"
    acl.write_text("version: v1\nservices:\n  - name: authed\n    project: clients\n    action: enforce\n"
                   "    allowed_domains: [ok.test]\n")
    with proxy_server(d, "--resolver", dns.address, "--allow-range", f"{ALLOWED}/32", "--acl", str(acl),
                      env={"PROXY_PASSWORD": PASSWORD}) as s:
        yield s


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**env, **kw.pop("env", {})}, **kw)


def test_curl_http_and_https_with_user(authed_proxy, upstream, tls_upstream, ca_files):
    proxy = f"http://127.0.0.1:{authed_proxy.port}"
    r = run(["curl", "-sS", "-x", proxy, "-U", f"me:{PASSWORD}", f"http://ok.test:{upstream.port}/curl"])
    assert r.returncode == 0 and r.stdout.startswith("GET /curl host=ok.test:"), r.stderr
    r = run(["curl", "-sS", "-x", proxy, "-U", f"me:{PASSWORD}", "--cacert", str(ca_files / "root.pem"),
             f"https://ok.test:{tls_upstream.port}/tls"])
    assert r.returncode == 0 and r.stdout.startswith("GET /tls"), r.stderr
    # Denied: curl reports the proxy's CONNECT answer.
    r = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, "-U", f"me:{PASSWORD}",
             f"http://www.ok.test:{upstream.port}/"])
    assert r.stdout == "403"
    r = run(["curl", "-sS", "-x", proxy, "--cacert", str(ca_files / "root.pem"),
             f"https://ok.test:{tls_upstream.port}/"])
    assert r.returncode != 0 and "407" in r.stderr


def test_curl_to_a_tls_proxy_with_a_client_certificate(tmp_path, dns, upstream, ca_files):
    acl = tmp_path / "acl.yaml"
    acl.write_text("version: v1\nservices:\n  - name: worker\n    project: jobs\n    action: enforce\n"
                   "    allowed_domains: [ok.test]\n")
    f = ca_files
    with proxy_server(tmp_path, "--resolver", dns.address, "--allow-range", f"{ALLOWED}/32", "--acl", str(acl),
                      "--tls-cert", str(f / "proxy.pem"), "--tls-key", str(f / "proxy.key"),
                      "--client-ca", str(f / "root.pem")) as p:
        r = run(["curl", "-sS", "--proxy", f"https://127.0.0.1:{p.port}", "--proxy-cacert", str(f / "root.pem"),
                 "--proxy-cert", str(f / "worker.pem"), "--proxy-key", str(f / "worker.key"),
                 f"http://ok.test:{upstream.port}/mtls"])
        assert r.returncode == 0 and r.stdout.startswith("GET /mtls"), r.stderr
        assert '"role":"worker"' in p.log.read_text()


def test_httpx_with_proxy(authed_proxy, upstream, tls_upstream, ca_files):
    import httpx

    proxy = f"http://me:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{authed_proxy.port}"
    verify = ssl.create_default_context(cafile=str(ca_files / "root.pem"))
    with httpx.Client(proxy=proxy, verify=verify, trust_env=False) as c:
        for _ in range(3):  # keep-alive through the proxy
            r = c.get(f"http://ok.test:{upstream.port}/httpx")
            assert r.status_code == 200 and r.text.startswith("GET /httpx")
        r = c.get(f"https://ok.test:{tls_upstream.port}/httpx-tls")
        assert r.status_code == 200 and r.text.startswith("GET /httpx-tls")
        r = c.get(f"http://127.0.0.1:{upstream.port}/")
        assert r.status_code == 403 and "rule has enforce policy" in r.headers["x-taxiway-egress-error"]
        with pytest.raises(httpx.ProxyError):
            c.get(f"https://www.ok.test:{tls_upstream.port}/")


def test_requests_with_proxies(authed_proxy, upstream, tls_upstream, ca_files):
    import requests

    proxy = f"http://me:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{authed_proxy.port}"
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": proxy, "https": proxy}
    r = s.get(f"http://ok.test:{upstream.port}/requests", timeout=10)
    assert r.status_code == 200 and r.text.startswith("GET /requests")
    r = s.get(f"https://ok.test:{tls_upstream.port}/requests-tls", verify=str(ca_files / "root.pem"), timeout=10)
    assert r.status_code == 200 and r.text.startswith("GET /requests-tls")
    r = s.post(f"http://ok.test:{upstream.port}/echo", data=b"z" * 100_000, timeout=10)
    assert r.status_code == 200 and r.content.endswith(b"z" * 100_000)


@pytest.fixture(scope="module")
def node_client(tmp_path_factory):
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("node and npm are needed (see .ci/apt-packages.txt / the runner image)")
    d = tmp_path_factory.mktemp("node-client")
    r = subprocess.run(["npm", "install", "--prefix", str(d), "--no-audit", "--no-fund", "--silent",
                        "https-proxy-agent@9"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    shutil.copy(HERE / "clients" / "node_client.mjs", d / "node_client.mjs")
    return d / "node_client.mjs"


def test_node_https_proxy_agent(authed_proxy, tls_upstream, ca_files, node_client):
    proxy = f"http://me:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{authed_proxy.port}"
    r = run(["node", str(node_client), proxy, f"https://ok.test:{tls_upstream.port}/node", str(ca_files / "root.pem")])
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == ["200", f"GET /node host=ok.test:{tls_upstream.port}"], \
        r.stdout + r.stderr
    r = run(["node", str(node_client), proxy, f"https://www.ok.test:{tls_upstream.port}/", str(ca_files / "root.pem")])
    assert r.returncode != 0 or not r.stdout.startswith("200")


@pytest.fixture(scope="module")
def go_client(tmp_path_factory):
    d = tmp_path_factory.mktemp("go-client")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"),
           "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    r = subprocess.run(["go", "build", "-o", str(d / "egressclient"), "."], cwd=HERE / "clients",
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "egressclient"


def test_go_client_with_proxy_connect_header(authed_proxy, tls_upstream, ca_files, go_client):
    proxy = f"http://127.0.0.1:{authed_proxy.port}"
    root = str(ca_files / "root.pem")
    r = run([str(go_client), proxy, f"https://ok.test:{tls_upstream.port}/go", root],
            env={"PROXY_PASSWORD": PASSWORD})
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == ["200", f"GET /go host=ok.test:{tls_upstream.port}"], \
        r.stdout + r.stderr
    r = run([str(go_client), proxy, f"https://ok.test:{tls_upstream.port}/go", root],
            env={"PROXY_PASSWORD": "wrong"})
    assert r.returncode == 1 and "Proxy Authentication Required" in r.stdout
    r = run([str(go_client), proxy, f"https://www.ok.test:{tls_upstream.port}/go", root],
            env={"PROXY_PASSWORD": PASSWORD})
    assert r.returncode == 1 and "Forbidden" in r.stdout
