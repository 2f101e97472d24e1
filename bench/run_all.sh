#!/usr/bin/env bash
# Every benchmark of bench/, one after the other; each appends its own section to bench/RESULTS.md.
#
#   bench/run_all.sh            # the full runs (tens of minutes on a 2-core CPU machine)
#   bench/run_all.sh --quick    # smoke run: small sizes, nothing appended to RESULTS.md
#   BENCH_ONLY="concurrency soak" bench/run_all.sh   # a subset, by name
#
# The GPU scripts (gpu_vision, gpu_lmdeploy) run only where torch sees a CUDA device. A bench that
# fails does not stop the others; the exit status is 1 if any failed, and the summary names them.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

declare -A FULL QUICKARGS
ORDER=(preprocess gateway vision_batching vision_ceiling embedding_hops vs_transformers_serve concurrency soak scale_out encoder_cpu llm stack_startup ui_preview_bomb gpu_vision gpu_lmdeploy)
FULL[preprocess]="bench/bench_preprocess.py"
FULL[gateway]="bench/bench_gateway.py"
FULL[vision_batching]="bench/bench_vision_batching.py"
FULL[vision_ceiling]="bench/bench_vision_ceiling.py"
FULL[embedding_hops]="bench/bench_embedding_hops.py"
FULL[vs_transformers_serve]="bench/bench_vs_transformers_serve.py"  # needs scripts/setup_bench_venv.sh first
FULL[concurrency]="bench/bench_concurrency.py"
FULL[soak]="bench/bench_soak.py"
FULL[scale_out]="bench/bench_scale_out.py"
FULL[encoder_cpu]="bench/bench_encoder_cpu.py"
FULL[llm]="bench/bench_llm.py"
FULL[stack_startup]="bench/bench_stack_startup.py"
FULL[ui_preview_bomb]="bench/bench_ui_preview_bomb.py"
FULL[gpu_vision]="bench/gpu_vision.py"
FULL[gpu_lmdeploy]="bench/gpu_lmdeploy.py"
QUICKARGS[preprocess]="--quick --no-append"
QUICKARGS[gateway]="--quick --no-append"
QUICKARGS[vision_batching]="--quick --no-append"
QUICKARGS[vision_ceiling]="--quick --no-append"
QUICKARGS[embedding_hops]="--repeats 3 --no-append"
QUICKARGS[vs_transformers_serve]="--quick --no-append"
QUICKARGS[concurrency]="--levels 1,4 --requests-per-client 2 --no-append"
QUICKARGS[soak]="--clients 4 --duration-s 15 --sample-s 5 --no-append"
QUICKARGS[scale_out]="--rounds 1 --no-append"
QUICKARGS[encoder_cpu]="--tiles-300m 1 --no-append"
QUICKARGS[llm]="--models tiny --no-append"
QUICKARGS[stack_startup]="SKIP"  # it always appends to RESULTS.md
QUICKARGS[ui_preview_bomb]="--repeats 200 --timeout-s 1 --no-append"
QUICKARGS[gpu_vision]="--quick"
QUICKARGS[gpu_lmdeploy]=""

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
failed=()
passed=()
skipped=()
for name in "${ORDER[@]}"; do
  if [ -n "${BENCH_ONLY:-}" ] && [[ " ${BENCH_ONLY} " != *" ${name} "* ]]; then
    continue
  fi
  script="${FULL[$name]}"
  if [ ! -f "$script" ]; then
    skipped+=("$name (no $script)")
    continue
  fi
  if [[ "$name" == gpu_* ]] && [ "$has_cuda" != "1" ]; then
    skipped+=("$name (no CUDA device)")
    continue
  fi
  args=""
  [ "$QUICK" = "1" ] && args="${QUICKARGS[$name]}"
  if [ "$args" = "SKIP" ]; then
    skipped+=("$name (no quick mode that leaves RESULTS.md alone)")
    continue
  fi
  echo "=== $name: $PY $script $args"
  start=$(date +%s)
  # shellcheck disable=SC2086
  if PYTHONPATH="services/vision_encoder:services/llm:proto:tools/tiny_checkpoint:gateway${PYTHONPATH:+:$PYTHONPATH}" \
      "$PY" "$script" $args; then
    passed+=("$name ($(( $(date +%s) - start )) s)")
  else
    failed+=("$name (exit $?)")
  fi
done

echo
echo "=== summary"
for item in "${passed[@]}"; do echo "ok       $item"; done
for item in "${skipped[@]}"; do echo "skipped  $item"; done
for item in "${failed[@]}"; do echo "FAILED   $item"; done
[ "${#failed[@]}" -eq 0 ]
