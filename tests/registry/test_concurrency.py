"""Races forced deterministically: two requests on one upload session, a damaged
blob in the shared store, and a push landing in the middle of a GC sweep."""

from __future__ import annotations

import http.client
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from helpers.servers import free_port, serve

from .conftest import running
from .oci import CONFIG, MANIFEST, digest, with_params
from .test_gc import push_image


class RawRequest:
    """An HTTP/1.1 request written by hand on its own connection, so a test can hold it open mid-body."""

    def __init__(self, address: str, method: str, target: str, headers: dict[str, str]):
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        head = f"{method} {target} HTTP/1.1\r\nHost: {address}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> bool:
        """Send part of the body; False when the server already answered and closed."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def answered(self) -> bool:
        """Whether the server has begun its answer (without reading it)."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def response(self) -> tuple[int, bytes]:
        r = http.client.HTTPResponse(self.sock)
        r.begin()
        return r.status, r.read()

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    """Block until ``predicate()`` holds (a synchronisation point, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def settle(predicate, timeout: float) -> None:
    """Wait for ``predicate()`` a little, and go on either way (it only orders events, it checks nothing)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def _flocked(path: Path) -> bool:
    """Whether some process holds a flock(2) on ``path`` (from /proc/locks)."""
    try:
        ino = path.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and any(f.endswith(f":{ino}") for f in fields):
            return True
    return False


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def blob_file(root: Path, d: str) -> Path:
    hx = d.split(":", 1)[1]
    return root / "blobs" / "sha256" / hx[:2] / hx


def test_concurrent_patches_never_poison_a_blob(tmp_path):
    """Issue 22 item 1: A and B PATCH one session at once; B's bytes must never end up under X's digest."""
    root = tmp_path / "root"
    with running(root, orgs=("acme", "other")) as reg:
        auth = {"Authorization": "Bearer " + reg.bearer("acme", "repository:app:pull,push")}
        x, evil = secrets.token_bytes(200_000), b"EVIL" * 25_000
        with reg.client("acme", "app") as c:
            loc = c.post("/v2/app/blobs/uploads/").headers["location"]
        session = root / "uploads" / "acme" / loc.split("?")[0].rsplit("/", 1)[1]
        ctype = {"Content-Type": "application/octet-stream"}
        # The order: A's headers, B's headers, 150,000 bytes of A, all of B, the rest of A.
        a = RawRequest(reg.address, "PATCH", loc, {**auth, **ctype, "Content-Length": "200000"})
        # Let A's handler start first (it locks the session where there is a lock to see; the
        # old code has none, and the wait simply ends).
        settle(lambda: _flocked(session), 5)
        b = RawRequest(reg.address, "PATCH", loc, {**auth, **ctype, "Content-Length": "100000"})
        # And B's handler too: the fixed server answers B at once; the old one starts writing at offset 0.
        settle(b.answered, 2)
        a.send(x[:150_000])
        wait_until(lambda: size_of(session) >= 150_000 - 8192, "A's 150,000 bytes on disk")
        b.send(evil)
        b_status, b_body = b.response()
        a.send(x[150_000:])
        a_status, _ = a.response()
        a.close()
        b.close()

        with reg.client("acme", "app") as c:
            path, params = with_params(loc, digest=digest(x))
            put = c.put(path, params=params)
            served = c.get(f"/v2/app/blobs/{digest(x)}")
            if served.status_code == 200:
                assert digest(served.content) == digest(x), "the store serves other bytes under X's digest"
        # Another org pushing X later gets X back.
        with reg.client("other", "base") as o:
            assert o.post("/v2/base/blobs/uploads/", params={"digest": digest(x)}, content=x).status_code == 201
            assert o.get(f"/v2/base/blobs/{digest(x)}").content == x
        # The second writer was refused while the first held the session, and nothing of it was kept.
        assert b_status == 416 and b"RANGE_INVALID" in b_body, (b_status, b_body)
        assert a_status == 202
        assert put.status_code == 201, put.text
        assert served.content == x


def test_a_damaged_blob_never_shadows_a_good_upload(tmp_path):
    """Issue 22 item 1: a blob file that does not hash to its name is replaced by the next good upload."""
    root = tmp_path / "root"
    with running(root, orgs=("acme", "other")) as reg:
        x = secrets.token_bytes(100_000)
        manifest = (b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"%s","digest":"%s","size":%d},'
                    b'"layers":[]}' % (MANIFEST.encode(), CONFIG.encode(), digest(x).encode(), len(x)))
        with reg.client("acme", "app") as c:
            assert c.post("/v2/app/blobs/uploads/", params={"digest": digest(x)}, content=x).status_code == 201
            assert c.put("/v2/app/manifests/v1", content=manifest, headers={"Content-Type": MANIFEST}).status_code == 201

        def damage(d: str) -> None:
            p = blob_file(root, d)
            p.write_bytes(b"EVIL" + p.read_bytes()[4:])

        damage(digest(x))
        with reg.client("other", "base") as o:  # monolithic
            assert o.post("/v2/base/blobs/uploads/", params={"digest": digest(x)}, content=x).status_code == 201
            assert o.get(f"/v2/base/blobs/{digest(x)}").content == x
        damage(digest(x))
        with reg.client("other", "base") as o:  # chunked
            path, params = with_params(o.post("/v2/base/blobs/uploads/").headers["location"])
            r = o.patch(path, params=params, content=x[:60_000], headers={"Content-Range": "0-59999"})
            assert r.status_code == 202
            path, params = with_params(r.headers["location"], digest=digest(x))
            assert o.put(path, params=params, content=x[60_000:]).status_code == 201
            assert o.get(f"/v2/base/blobs/{digest(x)}").content == x
        damage(digest(manifest))
        with reg.client("acme", "app") as c:
            assert c.put("/v2/app/manifests/v1", content=manifest, headers={"Content-Type": MANIFEST}).status_code == 201
            assert c.get("/v2/app/manifests/v1").content == manifest


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("t", "T")
    except FileNotFoundError:
        return False


def _child(pid: int) -> int | None:
    """strace's child running the GC (strace forks short-lived probes of its own first)."""
    try:
        for kid in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if Path(f"/proc/{kid}/cmdline").read_bytes().startswith(sys.executable.encode() + b"\0-m\0taxiway"):
                return int(kid)
    except FileNotFoundError:
        pass
    return None


def test_a_push_during_gc_stays_pullable(tmp_path):
    """Issue 22 item 2: GC is stopped (strace injects SIGSTOP) the moment the layer file disappears;
    app:x is pushed again then; after GC ends, every blob of app:x must still be pullable."""
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        layer = secrets.token_bytes(50_000)
        _, mdigest, blobs = push_image(c, "app", "x", [layer])
        assert c.delete(f"/v2/app/manifests/{mdigest}").status_code == 202
        old = time.time() - 7200
        for d in [*blobs, mdigest]:
            os.utime(blob_file(root, d), (old, old))
        target = blob_file(root, digest(layer))
        renames = "rename,renameat,renameat2"
        gc = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-P", str(target), "-e", f"trace={renames}",
             "-e", f"inject={renames}:signal=SIGSTOP:when=1",
             sys.executable, "-m", "taxiway", "registry", "gc", "--root", str(root), "--grace", "1h", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _child(gc.pid) is not None, "the GC process under strace")
            pid = _child(gc.pid)
            wait_until(lambda: not target.exists(), "GC to take the layer away")
            wait_until(lambda: _stopped(pid), "GC to stop right after")
            done = threading.Event()
            result: dict = {}

            def repush() -> None:
                try:
                    result["blobs"] = push_image(c, "app", "x", [layer])[2]
                finally:
                    done.set()

            t = threading.Thread(target=repush)
            t.start()
            # The push either completes now (nothing holds it back) or waits for GC's lock on the
            # layer; either way GC resumes next, and what was pushed must survive it.
            done.wait(15)
            os.kill(pid, signal.SIGCONT)
            out, err = gc.communicate(timeout=120)
            t.join(120)
        finally:
            if gc.poll() is None:
                gc.kill()
                gc.wait()
        assert gc.returncode == 0, err
        assert "blobs" in result, "the re-push failed"
        assert c.get("/v2/app/manifests/x").status_code == 200
        assert digest(layer) in result["blobs"]
        for d in result["blobs"]:
            r = c.get(f"/v2/app/blobs/{d}")
            assert r.status_code == 200, f"{d} of app:x: {r.status_code} after GC ended"
            assert digest(r.content) == d


def _all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (a group stop; a traced syscall stops just one)."""
    try:
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rpartition(")")[2].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return False
    return all(s in ("t", "T") for s in states)


def _traced(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return line.split()[1] != "0"
    return False


def test_two_deletes_of_one_manifest_give_one_202_and_one_404(tmp_path):
    """Outside tester item 1: server A is stopped (strace injects SIGSTOP) right after it saw the
    revision exist; server B, on the same root, deletes the manifest then; A must answer 404
    MANIFEST_UNKNOWN, never 500 STORAGE_FULL for the file B removed."""
    root = tmp_path / "root"
    with running(root) as a, a.client("acme", "deltest") as c:
        _, mdigest, _ = push_image(c, "deltest", "x")
        for tag in ("y", "z"):
            body = c.get("/v2/deltest/manifests/x").content
            assert c.put(f"/v2/deltest/manifests/{tag}", content=body, headers={"Content-Type": MANIFEST}).status_code == 201
        rev = root / "repos" / "acme" / "deltest" / "_manifests" / "revisions" / "sha256" / mdigest.split(":")[1]
        stats = "stat,lstat,newfstatat,statx"
        pid = a.server.proc.pid
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-p", str(pid), "-P", str(rev),
                                   "-e", f"trace={stats}", "-e", f"inject={stats}:signal=SIGSTOP:when=1"])
        port = free_port()
        b = serve([sys.executable, "-m", "taxiway", "registry", "serve", "--listen", f"127.0.0.1:{port}",
                   "--root", str(root)], port, log=tmp_path / "b.log")
        try:
            wait_until(lambda: _traced(pid), "strace to attach to server A")
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault("a", c.delete(f"/v2/deltest/manifests/{mdigest}")))
            t.start()
            wait_until(lambda: _all_stopped(pid), "server A to stop right after its check")
            with b as sb:
                hb = httpx.Client(base_url=sb.url, headers={"Authorization": c.headers["authorization"]}, timeout=60)
                rb = hb.delete(f"/v2/deltest/manifests/{mdigest}")
                assert rb.status_code == 202, rb.text
                os.kill(pid, signal.SIGCONT)
                t.join(60)
        finally:
            os.kill(pid, signal.SIGCONT)
            tracer.terminate()
            tracer.wait(30)
        ra = result["a"]
        assert ra.status_code == 404, ra.text
        assert ra.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        for ref in ("x", "y", "z", mdigest):
            assert c.get(f"/v2/deltest/manifests/{ref}").status_code == 404


def _gc_blocked_or_done(gc: subprocess.Popen) -> bool:
    """Whether GC exited, or waits for a flock (a ``->`` line of its pid in /proc/locks)."""
    if gc.poll() is not None:
        return True
    return any("->" in f and str(gc.pid) in f for f in map(str.split, Path("/proc/locks").read_text().splitlines()))


def test_gc_with_no_grace_never_leaves_a_tag_on_a_missing_blob(tmp_path):
    """Outside tester item 4: the server is stopped (strace SIGSTOP) in the middle of a manifest
    push, after it checked its layer and before it wrote the manifest; `gc --grace 0s` runs then.
    Once both finish, the tag the push answered 201 for must pull, with every blob."""
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        cfg, layer = b'{"os":"linux"}', secrets.token_bytes(40_000)
        for b in (cfg, layer):
            assert c.post("/v2/app/blobs/uploads/", params={"digest": digest(b)}, content=b).status_code == 201
        body = (b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"%s","digest":"%s","size":%d},'
                b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}'
                % (MANIFEST.encode(), CONFIG.encode(), digest(cfg).encode(), len(cfg), digest(layer).encode(),
                   len(layer)))
        target = blob_file(root, digest(layer))
        stats = "stat,lstat,newfstatat,statx"
        pid = reg.server.proc.pid
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-p", str(pid),
                                   "-P", str(target), "-e", f"trace={stats}",
                                   "-e", f"inject={stats}:signal=SIGSTOP:when=2"])
        gc = None
        try:
            wait_until(lambda: _traced(pid), "strace to attach to the server")
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault("put", c.put(
                "/v2/app/manifests/v1", content=body, headers={"Content-Type": MANIFEST})))
            t.start()
            wait_until(lambda: _all_stopped(pid), "the server to stop after checking the layer")
            gc = subprocess.Popen([sys.executable, "-m", "taxiway", "registry", "gc", "--root", str(root),
                                   "--grace", "0s", "--untagged", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: _gc_blocked_or_done(gc), "GC to finish or wait for the push's lock")
            os.kill(pid, signal.SIGCONT)
            t.join(60)
            _, err = gc.communicate(timeout=120)
        finally:
            os.kill(pid, signal.SIGCONT)
            tracer.terminate()
            tracer.wait(30)
            if gc is not None and gc.poll() is None:
                gc.kill()
                gc.wait()
        assert gc.returncode == 0, err
        assert result["put"].status_code == 201, result["put"].text
        assert c.get("/v2/app/manifests/v1").content == body
        for d in (digest(cfg), digest(layer)):
            r = c.get(f"/v2/app/blobs/{d}")
            assert r.status_code == 200, f"{d}: {r.status_code} after GC"


def test_parallel_deletes_of_one_manifest(tmp_path):
    """The outside tester's reproduction (item 1), on two workers: every round, exactly one of ten
    parallel DELETEs is 202 and the other nine are 404 MANIFEST_UNKNOWN."""
    from concurrent.futures import ThreadPoolExecutor

    with running(tmp_path / "root", extra=("--workers", "2")) as reg, reg.client("acme", "deltest") as c, \
            ThreadPoolExecutor(10) as pool:
        for _ in range(15):
            body, mdigest, _ = push_image(c, "deltest", "x")
            for tag in ("y", "z"):
                assert c.put(f"/v2/deltest/manifests/{tag}", content=body,
                             headers={"Content-Type": MANIFEST}).status_code == 201
            results = list(pool.map(c.delete, [f"/v2/deltest/manifests/{mdigest}"] * 10))
            codes = sorted(r.status_code for r in results)
            assert codes == [202] + [404] * 9, [(r.status_code, r.text) for r in results]
            assert all(r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN" for r in results if r.status_code == 404)


def test_gc_untagged_spares_a_manifest_being_tagged(tmp_path):
    """Outside tester item 4, the other order: an untagged manifest is pushed again by tag; the
    server is stopped (strace SIGSTOP) after it wrote the revision, as it makes the tags directory, while
    `gc --grace 0s --untagged` runs. The tag must pull afterwards, with every blob."""
    root = tmp_path / "root"
    with running(root) as reg, reg.client("acme", "app") as c:
        body, mdigest, blobs = push_image(c, "app", None)
        tags = root / "repos" / "acme" / "app" / "_manifests" / "tags"
        mkdirs = "mkdir,mkdirat"
        pid = reg.server.proc.pid
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-p", str(pid),
                                   "-P", str(tags), "-e", f"trace={mkdirs}",
                                   "-e", f"inject={mkdirs}:signal=SIGSTOP:when=1"])
        gc = None
        try:
            wait_until(lambda: _traced(pid), "strace to attach to the server")
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault("put", c.put(
                "/v2/app/manifests/v1", content=body, headers={"Content-Type": MANIFEST})))
            t.start()
            wait_until(lambda: _all_stopped(pid), "the server to stop after writing the revision")
            gc = subprocess.Popen([sys.executable, "-m", "taxiway", "registry", "gc", "--root", str(root),
                                   "--grace", "0s", "--untagged", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: _gc_blocked_or_done(gc), "GC to finish or wait for the push's lock")
            os.kill(pid, signal.SIGCONT)
            t.join(60)
            _, err = gc.communicate(timeout=120)
        finally:
            os.kill(pid, signal.SIGCONT)
            tracer.terminate()
            tracer.wait(30)
            if gc is not None and gc.poll() is None:
                gc.kill()
                gc.wait()
        assert gc.returncode == 0, err
        assert result["put"].status_code == 201, result["put"].text
        r = c.get("/v2/app/manifests/v1")
        assert r.status_code == 200 and r.content == body, r.text
        for d in blobs:
            assert c.get(f"/v2/app/blobs/{d}").status_code == 200, f"{d} gone after GC"
