#!/usr/bin/env bash
# The one command: sets this machine up if needed (system packages, .venv, every package, stubs),
# then starts Redis, the vision encoder, the LLM, the gateway and the UI, and prints the URL.
#   scripts/run_stack.sh                          # offline tiny demo model (replies are noise)
#   MODEL_PATH=models/InternVL2_5-1B scripts/run_stack.sh
#   scripts/run_stack.sh --model-path /models/InternVL-Chat-V1-5 --gpu --trust-remote-code
# Every flag: scripts/run_stack.sh --help. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
IVL_SKIP_BROWSER="${IVL_SKIP_BROWSER:-1}" bash scripts/setup_env.sh
exec .venv/bin/python -m ivl_stack "$@"
