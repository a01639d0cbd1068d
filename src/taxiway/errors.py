"""The one error type users see: what went wrong, and what to do about it."""

from __future__ import annotations


class TaxiwayError(Exception):
    """An error with a one-line message and, where there is one, the fix.

    The CLI prints ``error: <message>; <hint>`` on one line and exits with
    ``exit_code``. Raise it (or a subclass) for anything a user can cause.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class NotFound(TaxiwayError):
    """Something named by the user does not exist."""


class InvalidInput(TaxiwayError):
    """The user's input is malformed."""
    exit_code = 2
