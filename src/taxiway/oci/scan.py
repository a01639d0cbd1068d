"""Find files a lower layer ships and a later layer hides, and flag the secrets among them.

"It's easy to accidentally build a secret into a public container, and then
inadvertently hide it with an update in a later image": deleting a file in a
later layer (a whiteout or an opaque directory), overwriting it, or writing it
twice in one layer leaves the bytes in the image for anyone who pulls it.

:func:`scan` reads each layer's tar headers once (streaming, no data kept),
replays the changesets to learn which files end up hidden, then re-reads only
the layers that hold hidden files, and only those files' first bytes
(size-capped), to match secret patterns. :func:`classify` is the pure rule
set: a path and (optionally) content in, reasons out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from taxiway.oci.changeset import OPAQUE, PATH, WHITEOUT, entry_change
from taxiway.oci.image import Descriptor, Image
from taxiway.oci.layerio import MAX_READ, LayerReader, members, open_layer
from taxiway.oci.progress import Progress

DEFAULT_READ_CAP = 256 * 1024  # bytes of a hidden file read for content patterns

# -- the rules ---------------------------------------------------------------

_SSH_KEY_NAMES = frozenset({"id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
                            "identity"})
_KEY_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".jks", ".keystore", ".ppk", ".gpg", ".asc", ".kdbx")
_NAME_RULES: list[tuple[Callable[[PurePosixPath], bool], str]] = [
    (lambda p: p.name in _SSH_KEY_NAMES, "SSH private key file"),
    (lambda p: p.name == ".env" or (p.name.startswith(".env.") and not p.name.endswith((".example", ".sample",
                                                                                         ".template", ".dist"))),
     "dotenv file"),
    (lambda p: p.parent.name == ".aws" and p.name == "credentials", "AWS credentials file"),
    (lambda p: p.name == "application_default_credentials.json" or (p.parent.name == "gcloud" and
                                                                    p.name == "credentials.db"),
     "Google Cloud credentials file"),
    (lambda p: p.name == ".git-credentials", "git credentials file"),
    (lambda p: p.name in (".netrc", "_netrc"), "netrc file"),
    (lambda p: p.name == ".pgpass", "PostgreSQL password file"),
    (lambda p: p.name == ".htpasswd", "htpasswd file"),
    (lambda p: p.name == "config.json" and p.parent.name == ".docker", "Docker registry credentials"),
    (lambda p: p.name.endswith(_KEY_SUFFIXES) and not p.name.endswith(".pub"), "key or keystore file"),
    (lambda p: p.name == "secring.gpg" or p.parent.name == "private-keys-v1.d", "GnuPG private key"),
]

# Content patterns (bytes), each with the reason it gives.
_CONTENT_RULES: list[tuple[re.Pattern[bytes], str]] = [
    (re.compile(rb"-----BEGIN (?:RSA |DSA |EC |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----"),
     "private key (PEM)"),
    (re.compile(rb"PuTTY-User-Key-File-\d"), "private key (PuTTY)"),
    (re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS access key ID"),
    (re.compile(rb"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}"), "AWS secret access key"),
    (re.compile(rb"\"type\"\s*:\s*\"service_account\"[\s\S]{0,4000}\"private_key\""),
     "Google Cloud service account key"),
    (re.compile(rb"\bAIza[0-9A-Za-z_\-]{35}\b"), "Google API key"),
    (re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"), "GitHub token"),
    (re.compile(rb"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"), "GitHub fine-grained token"),
    (re.compile(rb"\bglpat-[A-Za-z0-9_\-]{20,}\b"), "GitLab token"),
    (re.compile(rb"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), "Slack token"),
    (re.compile(rb"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+"),
     "Slack webhook URL"),
    (re.compile(rb"\bnpm_[A-Za-z0-9]{36}\b"), "npm token"),
    (re.compile(rb"(?m)^\s*(?://[^\s:]+:)?_(?:authToken|auth|password)\s*=\s*\S+"), "npm registry credentials"),
    (re.compile(rb"\bpypi-AgE[A-Za-z0-9_\-]{50,}"), "PyPI token"),
    (re.compile(rb"(?m)^\s*password\s*[=:]\s*\S+"), "password setting"),
    (re.compile(rb"\b(?:sk|rk)_live_[0-9A-Za-z]{20,}\b"), "Stripe live key"),
    (re.compile(rb"\b[a-z][a-z0-9+.\-]*://[^\s:/@'\"]+:[^\s:/@'\"]+@[^\s/]+"), "URL with embedded credentials"),
    (re.compile(rb"(?m)^\s*(?:export\s+)?[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY)[A-Z0-9_]*"
                rb"\s*=\s*['\"]?[^\s'\"]{6,}"), "secret-looking variable"),
    (re.compile(rb"(?m)^\s*machine\s+\S+\s+login\s+\S+\s+password\s+\S+"), "netrc credentials"),
    (re.compile(rb"\"auths\"\s*:\s*\{[\s\S]{0,2000}\"auth\"\s*:\s*\"[A-Za-z0-9+/=]{8,}\""),
     "Docker registry auth"),
]


def classify(path: str, content: bytes | None = None) -> list[str]:
    """Why ``path`` (and its first bytes, if given) looks like a secret; [] if it does not."""
    p = PurePosixPath("/" + path.lstrip("/"))
    reasons = [why for rule, why in _NAME_RULES if rule(p)]
    if content:
        reasons += [why for rx, why in _CONTENT_RULES if rx.search(content)]
    return list(dict.fromkeys(reasons))


# -- results -----------------------------------------------------------------


@dataclass
class Finding:
    """A file that layer ``layer`` adds and layer ``hidden_by`` deletes or overwrites."""

    path: str
    layer: int
    layer_digest: str
    hidden_by: int
    hidden_by_digest: str
    how: str  # "deleted", "deleted (opaque directory)", "deleted (parent replaced)", "overwritten", "replaced by a ..."
    size: int
    reasons: list[str] = field(default_factory=list)

    @property
    def secret(self) -> bool:
        return bool(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"path": "/" + self.path, "layer": self.layer, "layer_digest": self.layer_digest,
                "hidden_by": self.hidden_by, "hidden_by_digest": self.hidden_by_digest, "how": self.how,
                "size": self.size, "secret": self.secret, "reasons": list(self.reasons)}


@dataclass
class ScanResult:
    """Everything :func:`scan` found; ``has_secrets`` drives ``--fail-on-secrets``."""

    image: str
    layers: int
    hidden: list[Finding] = field(default_factory=list)

    @property
    def secrets(self) -> list[Finding]:
        return [f for f in self.hidden if f.secret]

    @property
    def has_secrets(self) -> bool:
        return any(f.secret for f in self.hidden)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "layers": self.layers, "hidden_files": len(self.hidden),
                "secrets": len(self.secrets), "has_secrets": self.has_secrets,
                "findings": [f.to_json() for f in self.hidden]}

    def rows(self) -> list[dict[str, Any]]:
        """Table rows (secrets first) for ``taxiway image scan`` without --json."""
        out = []
        for f in sorted(self.hidden, key=lambda f: (not f.secret, f.path)):
            out.append({"path": "/" + f.path, "added": f.layer, "hidden": f"{f.how} in {f.hidden_by}",
                        "size": f.size, "secret": ", ".join(f.reasons) if f.secret else "-"})
        return out


# -- the replay --------------------------------------------------------------


@dataclass
class _Live:
    layer: int
    entry: int  # ordinal of the entry in its layer, to find its bytes again
    kind: str  # "file", "dir" or "other"
    size: int


class _Tree:
    """The lexical file tree as layers are applied: path -> the entry that made it."""

    def __init__(self) -> None:
        self.live: dict[tuple[str, ...], _Live] = {}
        self.children: dict[tuple[str, ...], set[str]] = {}

    def put(self, parts: tuple[str, ...], rec: _Live) -> _Live | None:
        old = self.live.get(parts)
        self.live[parts] = rec
        for i in range(len(parts)):
            self.children.setdefault(parts[:i], set()).add(parts[i])
        return old

    def remove_subtree(self, parts: tuple[str, ...], keep_self: bool = False) -> list[tuple[tuple[str, ...], _Live]]:
        """Remove ``parts`` (or only its descendants); the removed records."""
        out: list[tuple[tuple[str, ...], _Live]] = []
        stack = [parts]
        while stack:
            p = stack.pop()
            for name in self.children.pop(p, ()):
                stack.append(p + (name,))
            if p == parts and keep_self:
                continue
            rec = self.live.pop(p, None)
            if rec is not None:
                out.append((p, rec))
        if not keep_self and parts:
            kids = self.children.get(parts[:-1])
            if kids is not None:
                kids.discard(parts[-1])
        return out


def _lower(tree: _Tree, removed: list[tuple[tuple[str, ...], _Live]], layer: int) -> list:
    """Whiteouts hide lower layers only: put this layer's own entries back, return the rest."""
    out = []
    for parts, rec in removed:
        if rec.layer == layer:
            tree.put(parts, rec)
        else:
            out.append((parts, rec))
    return out


def _open(image: Image, i: int, desc: Descriptor, progress: Progress | None) -> tuple[Any, LayerReader]:
    """The blob of layer ``i`` and a reader of its tar (close both)."""
    cb = (lambda n: progress(desc, n)) if progress else None
    f = image.open_blob(desc.digest)
    try:
        return f, open_layer(f, desc.media_type, f"layer {i} ({desc.digest[:19]})", cb)
    except BaseException:
        f.close()
        raise


def scan(image: Image, *, read_cap: int = DEFAULT_READ_CAP,
         progress: Progress | None = None) -> ScanResult:
    """List files hidden by later layers (deleted or overwritten) and flag likely secrets.

    Only hidden regular files are reported; their content is read (at most
    ``read_cap`` bytes each) in a second pass over just the layers that hold
    them. ``progress(descriptor, n)`` reports compressed bytes read.
    """
    layers = image.layers()
    tree = _Tree()
    hidden: list[tuple[tuple[str, ...], _Live, int, str]] = []

    def hide(recs: list[tuple[tuple[str, ...], _Live]], by: int, how: str) -> None:
        for parts, rec in recs:
            if rec.kind == "file":
                hidden.append((parts, rec, by, how))

    for i, desc in enumerate(layers):
        f, src = _open(image, i, desc, progress)
        with f, src:
            for n, (_tf, m) in enumerate(members(src)):
                change, parts = entry_change(m.name)
                if change == OPAQUE:
                    removed = tree.remove_subtree(parts, keep_self=True)
                    hide(_lower(tree, removed, i), i, "deleted (opaque directory)")
                    continue
                if change == WHITEOUT:
                    removed = tree.remove_subtree(parts)
                    hide(_lower(tree, removed, i), i, "deleted")
                    continue
                if change != PATH:
                    continue  # the root, aufs metadata, a whiteout of nothing
                kind = "file" if m.isreg() else "dir" if m.isdir() else "other"
                old = tree.live.get(parts)
                if old is not None and not (kind == "dir" and old.kind == "dir"):
                    how = {"file": "overwritten", "dir": "replaced by a directory"}.get(kind, "replaced by a link")
                    if old.kind == "dir":
                        hide(tree.remove_subtree(parts, keep_self=True), i, "deleted (parent replaced)")
                    hide([(parts, old)], i, how)
                tree.put(parts, _Live(i, n, kind, m.size if kind == "file" else 0))

    result = ScanResult(image=image.digest(), layers=len(layers))
    # Second pass: read the hidden files' first bytes, layer by layer.
    wanted: dict[int, dict[int, list[int]]] = {}
    for k, (_parts, rec, _by, _how) in enumerate(hidden):
        wanted.setdefault(rec.layer, {}).setdefault(rec.entry, []).append(k)
    contents: dict[int, bytes] = {}
    for i in sorted(wanted):
        entries = wanted[i]
        last = max(entries)
        f, src = _open(image, i, layers[i], None)
        with f, src:
            for n, (_tf, m) in enumerate(members(src)):
                if n in entries and m.size:
                    data = src.read(min(m.size, read_cap, MAX_READ))
                    for k in entries[n]:
                        contents[k] = data
                if n >= last:
                    break
    for k, (parts, rec, by, how) in enumerate(hidden):
        path = "/".join(parts)
        result.hidden.append(Finding(
            path=path, layer=rec.layer, layer_digest=layers[rec.layer].digest, hidden_by=by,
            hidden_by_digest=layers[by].digest, how=how, size=rec.size,
            reasons=classify(path, contents.get(k))))
    return result
