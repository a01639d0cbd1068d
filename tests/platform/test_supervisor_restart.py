"""The supervisor survives a component it cannot (re)start: it logs, backs off and retries.

Unit level, no NATS: a Supervisor with two real child processes, one of which cannot be started
because its log file cannot be opened (a directory stands where logs/<name>.log should be: the
same OSError path an EMFILE takes). The other one is still started, the broken one is retried
with a growing backoff and starts once its log can be opened again.
"""

from __future__ import annotations

import json
import sys
import time

from taxiway.platform import supervisor
from taxiway.platform.supervisor import Child, Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_component_that_cannot_start_never_kills_the_supervisor(platform_home, capsys):
    sup = Supervisor(free_ports=True)
    ok, broken = Child("ok", SLEEP), Child("broken", SLEEP)
    sup.children = [ok, broken]
    (sup.logdir / "broken.log").mkdir()  # open(..., "ab") raises IsADirectoryError (an OSError)
    try:
        sup.watch_once()  # before the fix: the OSError escaped and `taxiway up` died with every child
        assert ok.proc is not None and ok.proc.poll() is None
        assert broken.proc is None and broken.next_start > time.time() - 1 and broken.backoff == 2.0
        assert "could not start broken" in capsys.readouterr().err
        up = json.loads((sup.dir / "up.json").read_text())
        assert up["components"]["ok"]["pid"] == ok.proc.pid and up["components"]["broken"]["pid"] is None

        broken.next_start = 0  # its backoff is over (not waited for: no timing in tests)
        sup.watch_once()
        assert broken.proc is None and broken.backoff == 4.0  # still failing: backs off further
        assert broken.backoff <= supervisor.BACKOFF_MAX

        (sup.logdir / "broken.log").rmdir()  # the cause is gone: the next try starts it
        broken.next_start = 0
        sup.watch_once()
        assert broken.proc is not None and broken.proc.poll() is None
    finally:
        for c in sup.children:
            c.stop(timeout=5)
