#!/usr/bin/env bash
# make demo: the main job on embedded defaults, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"
taxiway --help
