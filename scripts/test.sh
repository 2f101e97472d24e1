#!/usr/bin/env bash
# The test command: sets up a fresh machine (scripts/setup_env.sh), lints, then runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/vision -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
