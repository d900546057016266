#!/usr/bin/env bash
# The prepared GPU check: one call on a lent H100/H200, about 4 minutes including compilation, with the
# machine's own python3, CUDA torch and triton and no network. From the repository root:  bash bench/gpu_check.sh
#   1. starts the C++/CUDA extension build in the background (skipped, and said so, without nvcc or setuptools);
#   2. runs the Triton cases of bench/gpu_check.py (probes, correctness vs float64, timings next to the cost
#      model's predictions, path comparisons, GPT-2 MLP); every row is printed and appended to
#      $OUT/gpu_check.jsonl as it is measured, so a time limit still leaves data;
#   3. when the build succeeded, runs the cases that need the extension (providers registered with
#      needs_extension=True, e.g. the cuda backend's), appending to the same JSONL.
# Extra arguments go to step 2 (e.g. --autotune). GPU_CHECK_MODELS=1 also runs bench.models afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the device is sm_90; CI builds 8.0 and 9.0
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/out/gpu}"
mkdir -p "$OUT_DIR"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true

build_pid=""
if command -v nvcc > /dev/null && "$PY" -c "import setuptools" 2> /dev/null; then
  ( MAX_JOBS=8 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1 \
      && echo ok > "$OUT_DIR/build.status" || echo failed > "$OUT_DIR/build.status" ) &
  build_pid=$!
else
  echo "extension build skipped: nvcc or setuptools not found" | tee "$OUT_DIR/build.status"
fi

timeout 200 "$PY" -m bench.gpu_check --out "$OUT_DIR" --before-build "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}

if [ -n "$build_pid" ]; then
  wait "$build_pid"
  echo "extension build: $(cat "$OUT_DIR/build.status") ($(( $(date +%s) - start )) s since start)"
  if grep -q ok "$OUT_DIR/build.status"; then
    timeout 130 "$PY" -m bench.gpu_check --out "$OUT_DIR" --after-build 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
    status=$(( status | PIPESTATUS[0] ))
  else
    tail -20 "$OUT_DIR/build.log"
  fi
fi
if [ "${GPU_CHECK_MODELS:-0}" = "1" ]; then
  timeout 150 "$PY" -m bench.models --compile --out "$OUT_DIR" > "$OUT_DIR/models.log" 2>&1 \
    || echo "bench.models did not finish (see models.log)"
fi
echo "===== gpu_check.sh: $(( $(date +%s) - start )) s, status $status, rows in $OUT_DIR/gpu_check.jsonl ====="
exit "$status"
