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
