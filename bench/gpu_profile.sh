#!/usr/bin/env bash
# Where the GPU time goes (bench/gpu_profile.py), one short call on a lent H100/H200 after bench/gpu_check.sh:
# per-kernel device times, a tile sweep of the block-diagonal kernel, host time per call (after the extension
# build, so the cuda backend is included) and, where Nsight Compute is installed, its memory and occupancy
# sections for the stage-1/stage-2 and fused forward kernels. From the repository root: bash bench/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/out/gpu}"
mkdir -p "$OUT_DIR"
start=$(date +%s)
build_pid=""
if command -v nvcc > /dev/null && "$PY" -c "import setuptools" 2> /dev/null; then
  ( MAX_JOBS=8 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/build.log" 2>&1 \
      && echo ok > "$OUT_DIR/build.status" || echo failed > "$OUT_DIR/build.status" ) &
  build_pid=$!
fi
timeout 150 "$PY" -m bench.gpu_profile --out "$OUT_DIR" --only kernels,sweep 2>&1 | grep -v USDT | tee "$OUT_DIR/gpu_profile.log"
[ -n "$build_pid" ] && wait "$build_pid"
timeout 60 "$PY" -m bench.gpu_profile --out "$OUT_DIR" --only host 2>&1 | grep -v USDT | tee -a "$OUT_DIR/gpu_profile.log"
if command -v ncu > /dev/null; then
  timeout 110 ncu --clock-control none --kernel-name "regex:_bd_fwd_kernel|_fused_fwd_kernel" --launch-skip 2 \
    --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    "$PY" -m bench.gpu_profile --ncu-target > "$OUT_DIR/ncu.txt" 2>&1 || echo "ncu did not finish"
  grep -E "^  [A-Za-z_]|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Sectors|L2 Hit|Mem Busy|Max Bandwidth|Warp Cycles|Stall|Shared Memory Config|Dynamic Shared|Waves" "$OUT_DIR/ncu.txt" | head -150
fi
echo "===== gpu_profile.sh: $(( $(date +%s) - start )) s ====="
