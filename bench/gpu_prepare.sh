#!/usr/bin/env bash
# Prepares what bench/gpu_all.sh needs on a bare GPU machine, into .device/ (git-ignored; carry it with the run):
# the generated gRPC stubs (that machine may have no grpc_tools) and the small pure-Python wheels the services
# import beyond torch/transformers/grpcio/pillow (from this machine's package mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device/wheels && mkdir -p .device/wheels
.venv/bin/python proto/generate.py >/dev/null
tar -czf .device/stubs.tgz proto/ivl_proto/*/v1/*_pb2*.py*
# bench/gpu_wheels.txt: the services' imports beyond what the GPU machine has, each without its dependencies
# (gpu_all.sh installs them with --no-deps next to the machine's own torch/grpcio/numpy). Pure-Python wheels, so
# they install on any Python >= 3.11 there (the pins are resolved for 3.11); protobuf as its abi3 wheel (CPython >= 3.10, x86_64).
grep -v -e '^#' -e '^protobuf$' bench/gpu_wheels.txt | xargs .venv/bin/python -m pip download -q --no-deps \
  -d .device/wheels -c constraints.txt --only-binary=:all: --implementation py --abi none --platform any --python-version 3.11
.venv/bin/python -m pip download -q --no-deps -d .device/wheels -c constraints.txt protobuf
du -sh .device
