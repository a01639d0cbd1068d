"""The taxiway command line: thin command groups, each calling one part's API.

Start-up and teardown tricks live in :mod:`taxiway.cli.main` only; ``exit_now``
is re-exported here for the commands that import it from the package.
"""

from __future__ import annotations

from taxiway.cli.main import exit_now

__all__ = ["exit_now"]
