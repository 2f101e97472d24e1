#!/usr/bin/env bash
# Sets up everything the stack and the tests need on a fresh Debian machine:
# system packages (redis-server, chromium, the fonts the demo model's training images are printed in,
# Debian's docker-compose for the compose file's validation test),
# a virtualenv at .venv with every package of this repo installed editable against constraints.txt,
# the generated gRPC stubs, and LMDeploy's Python layer for its contract test (.cache/lmdeploy-*, never
# in .venv). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# redis-cli (Debian's redis-tools, a dependency of redis-server) makes the Redis Cluster of tests/support.
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
# openssl makes the certificates of the Redis TLS test (tests/gateway/test_cache_tls_acl.py).
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# tests/e2e/test_compose_file.py validates docker-compose.yml with Debian's docker-compose (no engine needed).
[ -x /usr/bin/docker-compose ] || need_apt+=(docker-compose)
# Fonts of the demo model's synthetic images (ivl_train): DejaVu, Liberation, WenQuanYi Micro Hei (CJK).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf ] || need_apt+=(fonts-dejavu-core)
[ -f /usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf ] || need_apt+=(fonts-liberation)
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need_apt+=(fonts-wqy-microhei)
# gcc builds the vision service's bit-exact resize kernel (ivl_vision/_exact_resize.c) at install time.
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
PY="${PYTHON:-python3}"
"$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
if [ "${IVL_SKIP_BROWSER:-0}" != "1" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.ivl-installed
inputs=$(cat constraints.txt proto/pyproject.toml services/*/pyproject.toml gateway/pyproject.toml \
  frontend/pyproject.toml tools/*/pyproject.toml requirements-dev.txt services/*/*/*.c | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  echo "installing Python packages into .venv (first run takes a few minutes)"
  $VPY -m pip install -q --disable-pip-version-check -c constraints.txt grpcio-tools
  $VPY proto/generate.py
  $VPY -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e proto -e tools/tiny_checkpoint -e tools/stack -e tools/train -e services/vision_encoder -e services/llm -e gateway \
    -e frontend \
    -r requirements-dev.txt
  echo "$inputs" > "$stamp"
else
  $VPY proto/generate.py
fi
# LMDeploy's real Python layer (its wheel without the compiled engine) for tests/llm/test_lmdeploy_contract.py.
$VPY scripts/fetch_lmdeploy.py
