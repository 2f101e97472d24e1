#!/usr/bin/env bash
# Every GPU check of the project in ONE call on a lent GPU machine (torch, transformers, grpcio, pillow; no
# internet; no .venv), within its ~15 minutes of device time. Prepare here first: `bash bench/gpu_prepare.sh`
# (puts the generated gRPC stubs and the few pure-Python wheels the services need into .device/, which travels
# with `carry: [".device"]`). Then on the device:   bash bench/gpu_all.sh      (reports land in $OUT)
#   1. gpu_vision.py   real-size InternViT-300M / -6B, bf16: tiles/s, share of the dense peak, eager and
#                      torch.compile (goal: 6B >= 60 % of the bf16 peak); bf16 GPU vs fp32 CPU correctness
#   2. gpu_service.py  the vision service vs its bare encoder at 16 clients, compile off / reduce-overhead (CUDA
#                      graphs), pinned async H2D overlapped with the previous forward (goal: >= 90 % of bare)
#   3. bench_preprocess.py --tile-threads on the GPU host's CPUs (scaling of one image's wall time with threads,
#                      images/s with decode workers on a bigger host)
#   4. bench_vision_ceiling.py --quick (no-op encoder: tiles per CPU second of that host's cores)
#   5. gpu_lmdeploy.py  the LLM backend on CUDA (LMDeploy where installed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ivl-gpu-out}"; mkdir -p "$OUT"; export OUT
export PYTHONPATH="proto:services/vision_encoder:services/llm:gateway:tools/tiny_checkpoint:tests:bench:${PYTHONPATH:-}"
if [ -f .device/stubs.tgz ]; then tar -xzf .device/stubs.tgz; fi
if [ -d .device/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target .device/site .device/wheels/*.whl \
    || echo "installing .device/wheels failed (the imports below will say what is missing)"
  export PYTHONPATH="$PYTHONPATH:.device/site"
fi
python3 -c "import ivl_proto.vision.v1.vision_pb2" 2>/dev/null || python3 proto/generate.py || {
  echo "no gRPC stubs and no grpc_tools: run bench/gpu_prepare.sh here and carry .device"; exit 2; }
status=0
# One device call may run at most 600 s: the steps share TOTAL_S (default 540 s, each step at most its own limit
# and what is left), and STEPS="gpu_service ceiling" runs only the named ones (a second call for what was cut).
TOTAL_S="${TOTAL_S:-540}"
STEPS="${STEPS:-gpu_vision gpu_service preprocess ceiling gpu_lmdeploy}"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) echo "=== $name: not in STEPS"; return 0 ;; esac
  local left=$((TOTAL_S - SECONDS))
  if [ "$left" -lt 20 ]; then echo "=== $name: SKIPPED, ${left}s of TOTAL_S left (rerun with STEPS=\"$name ...\")"; status=1; return 0; fi
  [ "$seconds" -le "$left" ] || seconds=$left
  echo "=== $name (at most ${seconds}s)"
  local started=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 60 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || status=1
}
step gpu_vision 260 python3 bench/gpu_vision.py --compile reduce-overhead
step gpu_service 300 python3 bench/gpu_service.py
step preprocess 120 python3 bench/bench_preprocess.py --quick --no-append --tile-threads 2,4,8 --pool --pool-workers 1,2,4,8
step ceiling 90 python3 bench/bench_vision_ceiling.py --quick --no-append
step gpu_lmdeploy 60 python3 bench/gpu_lmdeploy.py
exit $status
