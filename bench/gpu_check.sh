#!/usr/bin/env bash
# The prepared GPU check (one call on a lent H100/H200, < 6 minutes): build the extension against the
# machine's torch, then check every backend against float64 and time them (bench/gpu_check.py).
# Usage on the device machine, from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-bench/out/gpu}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true
start=$(date +%s)
# editable build with the machine's CUDA torch (no network, no build isolation)
MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1 \
  && echo "extension build ok ($(( $(date +%s) - start )) s)" \
  || { echo "extension build FAILED ($(( $(date +%s) - start )) s); tail of build.log:"; tail -30 "$OUT_DIR/build.log"; }
python3 -m bench.gpu_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
# layer and model benchmarks (MLP, GPT block and model, eager + compiled, generation, saved activations)
timeout 150 python3 -m bench.models --compile --out "$OUT_DIR" > "$OUT_DIR/models.log" 2>&1 \
  || echo "bench.models did not finish (see models.log)"
echo; echo "===== summary ($(( $(date +%s) - start )) s) ====="
tail -n 60 "$OUT_DIR/gpu_check.log"
tail -n 40 "$OUT_DIR/models.log"
exit "$status"
