"""Garbage collection: mark and sweep, --untagged, --dry-run, and safety while the
server keeps taking pushes and pulls."""

from __future__ import annotations

import json
import secrets
import threading
import time

import orjson

from .conftest import running, tx
from .oci import CONFIG, EMPTY, INDEX, LAYER, MANIFEST, digest


def push_image(c, name: str, tag: str | None, layers: list[bytes] | None = None) -> tuple[bytes, str, list[str]]:
    cfg = orjson.dumps({"os": "linux", "architecture": "amd64", "n": secrets.token_hex(6)})
    layers = layers if layers is not None else [secrets.token_bytes(3000)]
    for b in [cfg, *layers]:
        r = c.post(f"/v2/{name}/blobs/uploads/", params={"digest": digest(b)}, content=b)
        assert r.status_code == 201, r.text
    body = orjson.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                         "config": {"mediaType": CONFIG, "digest": digest(cfg), "size": len(cfg)},
                         "layers": [{"mediaType": LAYER, "digest": digest(b), "size": len(b)} for b in layers]})
    ref = tag or digest(body)
    r = c.put(f"/v2/{name}/manifests/{ref}", content=body, headers={"Content-Type": MANIFEST})
    assert r.status_code == 201, r.text
    return body, digest(body), [digest(cfg)] + [digest(b) for b in layers]


def gc(root, *args: str) -> dict:
    return json.loads(tx("registry", "gc", "--root", str(root), "--json", *args).stdout)


def test_mark_and_sweep(tmp_path):
    root = tmp_path / "root"
    with running(root) as reg:
        with reg.client("acme", "app") as c:
            shared = secrets.token_bytes(4000)
            _, keep_digest, keep_blobs = push_image(c, "app", "keep", [shared])
            _, gone_digest, gone_blobs = push_image(c, "app", "gone", [shared, secrets.token_bytes(5000)])
            _, untagged_digest, untagged_blobs = push_image(c, "app", None)
            # an index (tagged) over an untagged child, and a referrer of the kept image
            child_body, child_digest, child_blobs = push_image(c, "app", None)
            idx = orjson.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
                {"mediaType": MANIFEST, "digest": child_digest, "size": len(child_body)}]})
            assert c.put("/v2/app/manifests/multi", content=idx, headers={"Content-Type": INDEX}).status_code == 201
            c.post("/v2/app/blobs/uploads/", params={"digest": digest(b"{}")}, content=b"{}")
            sig = orjson.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/x-sig",
                                "config": {"mediaType": EMPTY, "digest": digest(b"{}"), "size": 2}, "layers": [],
                                "subject": {"mediaType": MANIFEST, "digest": keep_digest, "size": 1}})
            assert c.put(f"/v2/app/manifests/{digest(sig)}", content=sig,
                         headers={"Content-Type": MANIFEST}).status_code == 201
            # a blob uploaded but never used by any manifest
            orphan = secrets.token_bytes(2000)
            c.post("/v2/app/blobs/uploads/", params={"digest": digest(orphan)}, content=orphan)
            assert c.delete(f"/v2/app/manifests/{gone_digest}").status_code == 202

            # The default grace spares everything this fresh.
            assert gc(root)["blobs"] == []
            dry = gc(root, "--grace", "0", "--dry-run")
            assert set(dry["blobs"]) == {gone_blobs[0], gone_blobs[2], digest(orphan), gone_digest}
            assert c.head(f"/v2/app/blobs/{digest(orphan)}").status_code == 200  # dry run removed nothing
            report = gc(root, "--grace", "0")
            assert set(report["blobs"]) == set(dry["blobs"]) and report["manifests"] == []
            for d in keep_blobs + untagged_blobs + child_blobs:
                assert c.get(f"/v2/app/blobs/{d}").status_code == 200
            assert c.head(f"/v2/app/blobs/{digest(orphan)}").status_code == 404
            assert c.get("/v2/app/manifests/keep").status_code == 200

            # --untagged: the untagged image goes; the index child and the referrer stay
            report = gc(root, "--grace", "0", "--untagged")
            assert report["manifests"] == [f"acme/app@{untagged_digest}"]
            assert set(report["blobs"]) == {untagged_digest, *untagged_blobs}
            assert c.get(f"/v2/app/manifests/{untagged_digest}").status_code == 404
            assert c.get(f"/v2/app/manifests/{child_digest}").status_code == 200
            assert [d["digest"] for d in c.get(f"/v2/app/referrers/{keep_digest}").json()["manifests"]] == [digest(sig)]
            assert gc(root, "--grace", "0", "--untagged")["blobs"] == []
            # deleting every manifest drops the repository from the catalog
            for ref in ("keep", "multi"):
                d = c.get(f"/v2/app/manifests/{ref}").headers["docker-content-digest"]
                assert c.delete(f"/v2/app/manifests/{d}").status_code == 202
            for d in (child_digest, digest(sig)):
                assert c.delete(f"/v2/app/manifests/{d}").status_code == 202
            assert "app" not in c.get("/v2/_catalog").json()["repositories"]
            assert c.get("/v2/app/tags/list").status_code == 404
            assert len(gc(root, "--grace", "0")["blobs"]) > 0
            assert not [p for p in (root / "blobs").rglob("*") if p.is_file()]


def test_gc_is_safe_while_serving(tmp_path):
    """Pushers and pullers keep going while GC runs in a loop; every tag stays whole."""
    root = tmp_path / "root"
    with running(root) as reg:
        pushed: list[tuple[str, str, list[str]]] = []
        errors: list[str] = []
        stop = threading.Event()
        shared = secrets.token_bytes(20000)

        def pusher(k: int) -> None:
            with reg.client("acme", f"busy{k}") as c:
                i = 0
                while not stop.is_set() and i < 200:
                    tag = f"t{i}"
                    try:
                        _, d, blobs = push_image(c, f"busy{k}", tag, [shared, secrets.token_bytes(1000)])
                        pushed.append((f"busy{k}", tag, blobs))
                        if i % 3 == 0:  # churn: garbage for the collector
                            _, junk, _ = push_image(c, f"busy{k}", None)
                            c.delete(f"/v2/busy{k}/manifests/{junk}")
                    except AssertionError as e:
                        errors.append(str(e))
                    i += 1

        def puller() -> None:
            with reg.client("acme", "busy0", "busy1") as c:
                while not stop.is_set():
                    for name, tag, blobs in list(pushed)[-5:]:
                        r = c.get(f"/v2/{name}/manifests/{tag}")
                        if r.status_code != 200:
                            errors.append(f"pull {name}:{tag} -> {r.status_code}")
                        for d in blobs:
                            if c.get(f"/v2/{name}/blobs/{d}").status_code != 200:
                                errors.append(f"blob {d} of {name}:{tag} missing")
                    time.sleep(0.01)

        threads = [threading.Thread(target=pusher, args=(k,)) for k in range(2)] + [threading.Thread(target=puller)]
        for t in threads:
            t.start()
        removed = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            removed += len(gc(root, "--grace", "2s", "--untagged")["blobs"])
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert removed > 0, "the churn should have produced garbage"
        with reg.client("acme", "busy0", "busy1") as c:
            for name, tag, blobs in pushed:
                assert c.get(f"/v2/{name}/manifests/{tag}").status_code == 200
                for d in blobs:
                    r = c.get(f"/v2/{name}/blobs/{d}")
                    assert r.status_code == 200 and digest(r.content) == d
