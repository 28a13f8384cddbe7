#!/usr/bin/env bash
# Session 27, call 3 (on the device, repo root = main): Nsight Compute on the gate's and the selection's kernels at
# 32k (ncu_target.py), if ncu is there and may read the counters.
. benchmarks/session.sh call3
which ncu nsys 2>&1 | tee "$R/which.txt"; ls /usr/local/cuda*/bin 2>&1 | grep -i -E "ncu|nsys|nsight" | tee -a "$R/which.txt"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1 || true)
if [ -n "$NCU" ]; then
  timeout -k 10 400 "$NCU" --kernel-name regex:"_pool_kernel|_project_kernel|_gate_scores_kernel|_density_kernel" \
    --launch-skip 4 --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section LaunchStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 docs/experiments/prefill-gate-policy/session27/ncu_target.py 2>&1 | tee "$R/ncu.log" | tail -400
  step ncu $?
fi
finish
