"""scan(): files hidden by later layers, and the secrets among them."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
from helpers.images import (
    HIDDEN_PLAIN,
    HIDDEN_SECRETS,
    PRIVATE_KEY,
    LayoutImage,
    write_fixture_image,
    write_multiplatform,
)
from helpers.layout import Entry, make_layer, write_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxiway.oci.scan import classify, scan
from taxiway.oci.unpack import LayerError, apply_layer


class CountingImage(LayoutImage):
    """Counts blob opens, to check which layers scan reads again."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.opened: list[str] = []

    def open_blob(self, digest):
        self.opened.append(digest)
        return super().open_blob(digest)


@pytest.fixture(scope="module")
def fixture_scan(tmp_path_factory):
    layout = tmp_path_factory.mktemp("scan") / "layout"
    write_fixture_image(layout)
    img = CountingImage(layout, "fixture")
    return img, scan(img)


def test_fixture_secrets_are_found_with_their_layers(fixture_scan):
    img, result = fixture_scan
    assert result.has_secrets and result.layers == 3
    secrets = {f.path: (f.layer, f.hidden_by, f.how.split(" ")[0]) for f in result.secrets}
    assert secrets == HIDDEN_SECRETS
    reasons = {f.path: f.reasons for f in result.secrets}
    assert "private key (PEM)" in reasons["root/.ssh/id_rsa"]
    assert "dotenv file" in reasons["srv/app/.env"]
    assert "AWS access key ID" in reasons["root/.aws/credentials"]
    assert "GitHub token" in reasons["srv/app/cache/token.txt"]  # hidden by an opaque directory
    assert "npm token" in reasons["root/.npmrc"]  # hidden by overwriting it
    by_path = {f.path: f for f in result.hidden}
    assert by_path["srv/app/cache/token.txt"].how == "deleted (opaque directory)"
    assert by_path["root/.ssh/id_rsa"].layer_digest == img.layers()[0].digest
    assert by_path["root/.ssh/id_rsa"].hidden_by_digest == img.layers()[1].digest


def test_fixture_plain_hidden_files_are_listed_but_not_flagged(fixture_scan):
    _, result = fixture_scan
    plain = {f.path: (f.layer, f.hidden_by, f.how.split(" ")[0]) for f in result.hidden if not f.secret}
    for path, (layer, by, how) in HIDDEN_PLAIN.items():
        assert path in plain, path
        assert plain[path][:2] == (layer, by)
        assert plain[path][2] in (how, "replaced", "overwritten", "deleted")
    # etc/motd appears twice in layer 0: the first copy is hidden inside the same layer
    motd = sorted((f.layer, f.hidden_by) for f in result.hidden if f.path == "etc/motd")
    assert motd == [(0, 0), (0, 2)]
    # visible files are not findings
    paths = {f.path for f in result.hidden}
    assert "bin/busybox" not in paths and "srv/app/cache/fresh.dat" not in paths


def test_scan_result_is_json_and_rows(fixture_scan):
    _, result = fixture_scan
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["has_secrets"] is True and doc["secrets"] == len(HIDDEN_SECRETS)
    assert doc["findings"][0]["path"].startswith("/")
    rows = result.rows()
    assert rows[0]["secret"] != "-" and {"path", "added", "hidden", "size", "secret"} <= set(rows[0])


def test_only_layers_with_hidden_files_are_read_twice(fixture_scan):
    img, _ = fixture_scan
    digests = [d.digest for d in img.layers()]
    # pass 1 reads all three; pass 2 only layers 0 and 1 (layer 2 hides, but holds nothing hidden)
    assert Counter(img.opened) == Counter({digests[0]: 2, digests[1]: 2, digests[2]: 1})


def test_a_clean_image_has_no_findings(tmp_path):
    write_multiplatform(tmp_path / "layout")
    result = scan(LayoutImage(tmp_path / "layout", "multi", "arm64"))
    assert result.hidden == [] and not result.has_secrets


def test_content_is_read_up_to_the_cap(tmp_path):
    big = b"x" * 300_000 + PRIVATE_KEY
    write_layout(tmp_path / "l", [make_layer([Entry("a", data=PRIVATE_KEY + b"x" * 300_000), Entry("b", data=big)]),
                                  make_layer([Entry(".wh.a"), Entry(".wh.b")])], "t")
    img = LayoutImage(tmp_path / "l", "t")
    found = {f.path: f.reasons for f in scan(img, read_cap=64 * 1024).hidden}
    assert found == {"a": ["private key (PEM)"], "b": []}
    assert scan(img, read_cap=1 << 20).secrets[-1].path == "b"


def test_a_corrupt_layer_is_an_error(tmp_path):
    write_layout(tmp_path / "l", [make_layer([Entry("a", data=b"a")])], "t")
    img = LayoutImage(tmp_path / "l", "t")
    blob = tmp_path / "l/blobs/sha256" / img.layers()[0].digest.split(":")[1]
    blob.write_bytes(blob.read_bytes()[:30])
    with pytest.raises(LayerError):
        scan(img)


@pytest.mark.parametrize("path,content,expected", [
    ("home/u/.ssh/id_ed25519", None, "SSH private key file"),
    ("app/.env.production", None, "dotenv file"),
    ("root/.aws/credentials", None, "AWS credentials file"),
    ("root/.config/gcloud/application_default_credentials.json", None, "Google Cloud credentials file"),
    ("root/.git-credentials", b"https://u:ghp_abc@github.com\n", "git credentials file"),
    ("srv/tls.key", None, "key or keystore file"),
    ("x", b"-----BEGIN RSA PRIVATE KEY-----\nMIIE", "private key (PEM)"),
    ("x", b"-----BEGIN EC PRIVATE KEY-----", "private key (PEM)"),
    ("x", b"-----BEGIN PGP PRIVATE KEY BLOCK-----", "private key (PEM)"),
    ("x", b'{"type": "service_account", "project_id": "p", "private_key": "-----BEGIN', "Google Cloud service account key"),
    ("x", b"key=AKIAIOSFODNN7EXAMPLE", "AWS access key ID"),
    ("x", b"t = 'ghs_" + b"a" * 36 + b"'", "GitHub token"),
    ("x", b"xoxb-1234567890-abcdefghij", "Slack token"),
    ("x", b"https://hooks.slack.com/services/T000/B000/XXXX", "Slack webhook URL"),
    ("root/.npmrc", b"//registry.npmjs.org/:_authToken=abc\n", "npm registry credentials"),
    ("root/.pypirc", b"[pypi]\nusername = __token__\npassword = pypi-AgEIcHlwaS5vcmc" + b"A" * 60, "PyPI token"),
    ("x", b"DB=postgres://app:hunter2@db/app", "URL with embedded credentials"),
])
def test_classify_flags(path, content, expected):
    assert expected in classify(path, content)


@pytest.mark.parametrize("path,content", [
    ("home/u/.ssh/id_ed25519.pub", b"ssh-ed25519 AAAA user@host"),
    ("app/.env.example", b"SECRET_KEY=\n"),
    ("etc/ssl/certs/ca.crt", b"-----BEGIN CERTIFICATE-----\nMIIB"),
    ("usr/share/doc/README", b"Set password in the config. See https://example.org/docs"),
    ("etc/motd", b"welcome"),
    ("etc/config.txt", None),
])
def test_classify_leaves_ordinary_files_alone(path, content):
    assert classify(path, content) == []


# -- scan agrees with unpack -----------------------------------------------------------------

_dirs = st.sampled_from(["d1", "d2", "d1/d3"])
_files = st.sampled_from(["f1", "f2"])
_ops = st.one_of(
    st.tuples(st.just("file"), st.one_of(_files, st.tuples(_dirs, _files).map("/".join))),
    st.tuples(st.just("dir"), _dirs),
    st.tuples(st.just("whiteout"), st.one_of(_files, _dirs, st.tuples(_dirs, _files).map("/".join))),
    st.tuples(st.just("opaque"), _dirs),
)


def _layer(i: int, ops: list[tuple[str, str]]) -> list[Entry]:
    out = []
    for n, (op, path) in enumerate(ops):
        if op == "file":
            out.append(Entry(path, data=f"{i}:{n}:{path}".encode()))
        elif op == "dir":
            out.append(Entry(path, "dir"))
        elif op == "whiteout":
            head, _, name = path.rpartition("/")
            out.append(Entry(f"{head}/.wh.{name}" if head else f".wh.{name}"))
        else:
            out.append(Entry(f"{path}/.wh..wh..opq"))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(st.lists(st.lists(_ops, min_size=1, max_size=6), min_size=1, max_size=4))
def test_every_file_added_is_either_exported_or_reported_hidden(tmp_path_factory, layers_ops):
    tmp = tmp_path_factory.mktemp("agree")
    layers = [_layer(i, ops) for i, ops in enumerate(layers_ops)]
    raws = [make_layer(entries) for entries in layers]
    write_layout(tmp / "layout", raws, "t", compress=False)
    root = tmp / "root"
    root.mkdir()
    for raw in raws:
        apply_layer(root, io.BytesIO(raw), "application/vnd.oci.image.layer.v1.tar")
    added = Counter((e.name, i) for i, entries in enumerate(layers) for e in entries if e.type == "file" and e.data)
    visible: Counter = Counter()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                layer, _n, path = f.read().decode().split(":", 2)
            visible[(path, int(layer))] += 1
    hidden = Counter((f.path, f.layer) for f in scan(LayoutImage(tmp / "layout", "t")).hidden)
    assert visible + hidden == added
