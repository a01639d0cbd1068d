"""Content digests (``sha256:<hex>``), validated before they ever name a file."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from taxiway.errors import InvalidInput

_ALGOS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated content digest. ``str(d)`` is ``algorithm:hex``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, s: str) -> Digest:
        """Parse and validate; raises InvalidInput for anything that is not a digest."""
        if not isinstance(s, str):
            raise InvalidInput(f"invalid digest {s!r}", "a digest looks like sha256:<64 hex digits>")
        m = _DIGEST_RE.match(s)
        if not m or m.group(1) not in _ALGOS:
            raise InvalidInput(f"invalid digest {s!r}", "a digest looks like sha256:<64 hex digits>")
        algo, hx = m.group(1), m.group(2)
        if len(hx) != _ALGOS[algo] or not re.fullmatch(r"[0-9a-f]+", hx):
            raise InvalidInput(f"invalid digest {s!r}", f"{algo} digests have {_ALGOS[algo]} lowercase hex digits")
        return cls(algo, hx)

    @classmethod
    def is_valid(cls, s: str) -> bool:
        try:
            cls.parse(s)
            return True
        except InvalidInput:
            return False

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self):
        """A fresh hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DigestingWriter:
    """Wraps a binary file: counts and hashes everything written through it."""

    def __init__(self, f, algorithm: str = "sha256"):
        self._f = f
        self._h = hashlib.new(algorithm)
        self.algorithm = algorithm
        self.size = 0

    def write(self, b: bytes) -> int:
        self._h.update(b)
        self.size += len(b)
        return self._f.write(b)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._h.hexdigest()}"
