"""Custom hostnames through the API (``taxiway certs``): owned by one app, refused to everyone else."""

from __future__ import annotations

from test_api import platform_api, run  # noqa: F401 - the fixture

from taxiway.platform import schema
from taxiway.platform.state import State


def test_hostnames_belong_to_one_app_of_one_org(platform_api):  # noqa: F811 - the fixture
    with platform_api.client() as c:
        r = c.post("/v1/apps/web/certificates", json={"hostname": "WWW.Example.com."})
        assert r.status_code == 201
        assert r.json() | {"created_at": 0} == {"hostname": "www.example.com", "app": "web", "org": "acme",
                                               "acme": None, "challenge": None, "created_at": 0}
        r = c.post("/v1/apps/web/certificates", json={"hostname": "shop.example.com", "challenge": "tls-alpn-01",
                                                      "acme": "https://127.0.0.1:14000/dir"})
        assert r.status_code == 201 and r.json()["challenge"] == "tls-alpn-01"
        # Adding it again to the same app updates it; another app of the org cannot have it.
        assert c.post("/v1/apps/web/certificates", json={"hostname": "www.example.com"}).status_code == 200
        r = c.post("/v1/apps/api/certificates", json={"hostname": "www.example.com"})
        assert r.status_code == 409 and r.json()["error"] == "hostname www.example.com is taken"
        for bad in ({"hostname": "foo.localhost"}, {"hostname": "a b"}, {"hostname": "-x.example.com"},
                    {"hostname": "x.example.com", "acme": "http://plain/dir"},
                    {"hostname": "x.example.com", "acme": "https://a/dir", "challenge": "dns-01"}, {}):
            r = c.post("/v1/apps/web/certificates", json=bad)
            assert r.status_code == 400 and r.json()["fix"], bad
        # No edge runs here: the list says what is configured, nothing served yet.
        got = c.get("/v1/apps/web/certificates").json()
        assert [(h["hostname"], h["served"]) for h in got] == [("shop.example.com", None), ("www.example.com", None)]
    # Another org: its own app cannot take the name, and learns nothing but "taken".
    with platform_api.client("other") as o:
        r = o.post("/v1/apps/theirs/certificates", json={"hostname": "www.example.com"})
        assert r.status_code == 409 and "acme" not in r.text and "web" not in r.text
        assert o.get("/v1/apps/web/certificates").status_code == 404
        assert o.delete("/v1/apps/web/certificates/www.example.com").status_code == 404
        assert o.delete("/v1/apps/theirs/certificates/www.example.com").status_code == 404
    # A deploy token of web manages web's names only.
    with platform_api.client("deploy") as d:
        assert d.post("/v1/apps/api/certificates", json={"hostname": "api.example.com"}).status_code == 403
        assert d.delete("/v1/apps/web/certificates/www.example.com").status_code == 200
    with platform_api.client() as c:
        assert [h["hostname"] for h in c.get("/v1/apps/web/certificates").json()] == ["shop.example.com"]
        assert c.post("/v1/apps/api/certificates", json={"hostname": "www.example.com"}).status_code == 201

    async def records() -> dict:
        st = await State.connect(platform_api.nats)
        try:
            return {k: v["app"] for k, v, _ in await st.snapshot(schema.CERTS, ">")}
        finally:
            await st.close()

    assert run(records()) == {"shop.example.com": "web", "www.example.com": "api"}


def test_certs_cli(platform_api, tmp_path, monkeypatch, capsys):  # noqa: F811 - the fixture
    """``taxiway certs`` as a user runs it (in this process: the CLI's own main, exit codes and all)."""
    import json
    from types import SimpleNamespace

    from taxiway.cli.main import main

    monkeypatch.setenv("TAXIWAY_API_URL", platform_api.url)
    monkeypatch.setenv("TAXIWAY_API_TOKEN", platform_api.tokens["acme"])
    monkeypatch.chdir(tmp_path)

    def tw(*args: str) -> SimpleNamespace:
        code = 0
        try:
            main(["certs", *args])
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    r = tw("add", "web", "cli.example.com")
    assert r.returncode == 0 and "cli.example.com now serves app web; certificate from taxiway's CA" in r.stdout
    r = tw("add", "-a", "web", "acme.example.com", "--acme", "https://127.0.0.1:14000/dir", "--challenge",
           "tls-alpn-01")
    assert r.returncode == 0 and "ACME (https://127.0.0.1:14000/dir, tls-alpn-01)" in r.stdout
    listed = json.loads(tw("ls", "web", "--json").stdout)
    assert [(h["hostname"], h["challenge"]) for h in listed] == [("acme.example.com", "tls-alpn-01"),
                                                                 ("cli.example.com", None)]
    table = tw("ls", "-a", "web").stdout
    assert "acme.example.com" in table and "taxiway CA" in table and "issued on first use" in table
    for args, message in ((("add", "api", "cli.example.com"), "error: hostname cli.example.com is taken; "),
                          (("add", "web", "x.localhost"), "error: invalid hostname 'x.localhost'; "),
                          (("rm", "api", "cli.example.com"), "error: no hostname cli.example.com on app api; "),
                          (("add",), "error: expected [APP] HOSTNAME; ")):
        r = tw(*args)
        assert r.returncode != 0 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
    assert tw("rm", "web", "cli.example.com").stdout == "removed cli.example.com from web\n"
    assert [h["hostname"] for h in json.loads(tw("ls", "web", "--json").stdout)] == ["acme.example.com"]
