"""Fail when a test file on disk is not collected by pytest.

pytest passes over some folders silently (``norecursedirs``: ``build``,
``dist``, dot-folders...), and a file whose name pytest does not match is never
run: either way its tests are lost without a word. This lists every
``test_*.py`` / ``*_test.py`` under the configured test paths and asks
``pytest --collect-only`` which of them it collected.

    python scripts/check-collected.py   # exit 1 and a line per missing file
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def on_disk() -> set[str]:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    found: set[str] = set()
    for top in conf["testpaths"]:
        for p in (REPO / top).rglob("*.py"):
            if p.name.startswith("test_") or p.name.endswith("_test.py"):
                rel = p.relative_to(REPO)
                # test data (e.g. a sample app's own tests) lives under folders named fixtures or data
                if not {"fixtures", "data", "node_modules"} & set(rel.parts):
                    found.add(rel.as_posix())
    return found


def collected() -> set[str]:
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True)
    if p.returncode not in (0, 5):
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        sys.exit(f"error: pytest could not collect the tests (exit {p.returncode}); fix the errors above")
    return {line.split("::", 1)[0] for line in p.stdout.splitlines() if "::" in line}


def main() -> int:
    missing = sorted(on_disk() - collected())
    for f in missing:
        print(f"error: {f} is not collected by pytest; move it out of a skipped folder (build, dist, .*) "
              "or fix its name", file=sys.stderr)
    if not missing:
        print(f"check-collected: every test file under the test paths is collected ({len(on_disk())} files)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
