"""Join codes: four letters people can read aloud and type on a phone.

No vowels (so no words), and none of the letters easily mistaken for another
(I, L, O, U, V, Q): 17 letters, 83,521 codes.
"""

from __future__ import annotations

import secrets

ALPHABET = "BCDFGHJKMNPRSTWXZ"
LENGTH = 4


def new_code() -> str:
    """A random code; the caller reserves it so it is unique across the cluster."""
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def normalize(text: str) -> str | None:
    """The code someone typed (any case, spaces around it), or None if it can't be a code."""
    code = (text or "").strip().upper()
    if len(code) == LENGTH and all(ch in ALPHABET for ch in code):
        return code
    return None
