"""The taxiway command line: thin command groups, each calling one part's API."""

from __future__ import annotations

import os
import sys


def exit_now(code: int = 0, command: str = "") -> None:
    """End this process with ``code`` at once, skipping the interpreter's teardown.

    Freeing click's, httpx's or cryptography's modules costs 10-20 ms per process, and
    the benchmarks compare commands with Go and C tools (mkcert, skopeo, umoci, runc).
    Only when this process was started to run ``taxiway COMMAND`` (the installed script
    or ``python -m taxiway``, real stdout/stderr, no TAXIWAY_DEBUG): never inside a
    caller's process such as a test runner's. Otherwise a non-zero code exits normally
    and zero returns. Everything must be written, flushed and closed before the call.
    """
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    own = argv0 in ("taxiway", "__main__.py") and (not command or command in sys.argv[1:])
    if own and not os.environ.get("TAXIWAY_DEBUG"):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout.fileno()
            sys.stderr.fileno()
        except Exception:  # noqa: BLE001 - replaced streams (click's CliRunner): not our own process
            own = False
        if own:
            os._exit(code)
    if code:
        sys.exit(code)
