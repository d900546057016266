#!/usr/bin/env bash
# One device call for everything prepared: bash bench/gpu_check.sh (correctness vs float64 and timings, ~2-4
# min including the extension build) then bash bench/gpu_profile.sh (device times, tile sweeps, decode kernels
# from CUDA graphs, host time; ~4 min, the build reused), into the same $OUT. The whole stays under the
# device tool's 10-minute limit per call; each part's rows are written as they are measured.
# From the repository root: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash bench/gpu_check.sh "$@"
check=$?
bash bench/gpu_profile.sh
echo "===== gpu_session.sh: $(( $(date +%s) - start )) s, gpu_check status $check ====="
exit "$check"
