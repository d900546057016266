#!/usr/bin/env bash
# Where the GPU time goes (bench/gpu_profile.py), one short call on a lent H100/H200 beside bench/gpu_check.sh:
# device times of every forward/backward variant, tile sweeps of the token-major stages and the transposing copy,
# then (after the extension build) the CUDA decode kernel from CUDA graphs and host time per call.
# From the repository root: bash bench/gpu_profile.sh   (GPU_PROFILE_NCU=1 adds Nsight Compute sections)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/out/gpu}"
mkdir -p "$OUT_DIR"
start=$(date +%s)
build_pid=""
if grep -qs ok "$OUT_DIR/build.status"; then
  echo "extension already built (build.status ok, e.g. by gpu_check.sh in bench/gpu_session.sh)"
elif command -v nvcc > /dev/null && "$PY" -c "import setuptools" 2> /dev/null; then
  ( MAX_JOBS=8 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1 \
      && echo ok > "$OUT_DIR/build.status" || echo failed > "$OUT_DIR/build.status" ) &
  build_pid=$!
fi
run() { timeout "$1" "$PY" -m bench.gpu_profile --out "$OUT_DIR" --only "$2" 2>&1 | grep -v -e USDT -e _warn_once \
          -e "Profiler clears" | tee -a "$OUT_DIR/gpu_profile.log"; }
run 130 paths
run 70 tiles
[ -n "$build_pid" ] && wait "$build_pid"
run 60 decode,host
if [ "${GPU_PROFILE_NCU:-0}" = "1" ] && command -v ncu > /dev/null; then
  timeout 110 ncu --clock-control none --kernel-name "regex:_bd_fwd_kernel|_fused_fwd_kernel|_token_major_copy" \
    --launch-skip 4 --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    "$PY" -m bench.gpu_profile --ncu-target > "$OUT_DIR/ncu.txt" 2>&1 || echo "ncu did not finish"
fi
echo "===== gpu_profile.sh: $(( $(date +%s) - start )) s ====="
