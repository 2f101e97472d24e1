#!/usr/bin/env bash
# The benchmark-only virtualenv of bench/bench_vs_transformers_serve.py: `transformers serve` (the one-process peer)
# needs torchvision, which does not import beside the CPU torch 2.13 of .venv. This venv gets torch 2.14.1 +
# torchvision 0.29.1 from this machine's wheel mirror (a CUDA build; it runs on the CPU here) and the project's
# transformers + serving dependencies pinned by constraints.txt. Never part of .venv or the test suite.
# Usage: bash scripts/setup_bench_venv.sh [VENV_DIR]   (default .cache/bench-venv; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.cache/bench-venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.ivl-bench-installed"
want="torch==2.14.1 torchvision==0.29.1 accelerate $(sha256sum constraints.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  grep -v -E '^(torch|triton)==' constraints.txt > "$VENV/constraints-bench.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/constraints-bench.txt" \
    torch==2.14.1 torchvision==0.29.1 transformers fastapi uvicorn pydantic openai pillow numpy safetensors \
    tokenizers typer httpx accelerate
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers
from transformers.utils.import_utils import is_serve_available
assert is_serve_available(), "transformers serve dependencies are missing"
print(f"bench venv ready: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
PY
