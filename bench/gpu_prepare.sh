#!/usr/bin/env bash
# Prepares what bench/gpu_all.sh needs on a bare GPU machine, into .device/ (git-ignored; carry it with the run):
# the generated gRPC stubs (that machine may have no grpc_tools) and the small pure-Python wheels the services
# import beyond torch/transformers/grpcio/pillow (from this machine's package mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
.venv/bin/python proto/generate.py >/dev/null
tar -czf .device/stubs.tgz proto/ivl_proto/*/v1/*_pb2*.py*
.venv/bin/python -m pip download -q --no-deps -d .device/wheels -c constraints.txt pydantic-settings \
  grpcio-health-checking grpcio-reflection python-dotenv
du -sh .device
