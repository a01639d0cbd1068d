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


def problem(text: str) -> str:
    """Why ``text`` is not a code, in words a person can act on (``normalize`` gave None)."""
    code = (text or "").strip().upper()
    # Quoted back as typed, but on one line: controls and line breaks shown escaped.
    shown = "".join(
        ch if ch.isprintable() else repr(ch)[1:-1] for ch in (text or "").strip()[:40]
    )
    letters = " ".join(ALPHABET)
    if not code:
        return f"Enter a game code: {LENGTH} letters, like {ALPHABET[6:10]}."
    bad = list(dict.fromkeys(ch for ch in code if ch not in ALPHABET))
    if bad:
        kinds = ["letter" if ch.isalpha() else "character" for ch in bad]
        kind = kinds[0] if len(set(kinds)) == 1 else "character"
        names = ", ".join(repr(ch)[1:-1] if ch.isprintable() and ch != " " else repr(ch) for ch in bad[:5])
        verb = "is" if len(bad) == 1 else "are"
        return (
            f"“{shown}” is not a game code: the {kind}{'s' if len(bad) > 1 else ''} {names} "
            f"{verb} not used in codes. Codes use only these letters: {letters}."
        )
    return (
        f"“{shown}” is not a game code: codes are {LENGTH} letters long "
        f"(this has {len(code)})."
    )
