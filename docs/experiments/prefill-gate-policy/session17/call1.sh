#!/usr/bin/env bash
# Session 17, device call 1 (issue 16, the 32k share): the projection's tiles (never timed on the GPU before) on the
# tree as it is and with session 16's untimed candidate proj_n128.patch (one N = 2 * HALF_P dot a step), the graph-
# replayed gate / selection rows, and one profiled 32k forward (which ops the gate and policy ranges hold in the model).
. benchmarks/session.sh s17c1
P=docs/experiments/prefill-gate-policy/session16/proj_n128.patch
TILES="64,32,4,3 64,64,4,2 128,64,8,2 64,32,4,4 128,16,8,4 256,32,8,2 32,64,4,3 64,128,4,2"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 170 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --proj-tiles $TILES --json "$R/parts_before.json" \
  > "$R/parts_before.log" 2>&1
step parts-before $?; grep -E "proj|gate|select" "$R/parts_before.log"
git apply "$P" && step patch-applied 0 || step patch-applied 1
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests-patched $?; tail -n 3 "$R/gpu_tests.log"
timeout 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --proj-tiles $TILES --json "$R/parts_after.json" \
  > "$R/parts_after.log" 2>&1
step parts-after $?; grep -E "proj|gate" "$R/parts_after.log"
git apply -R "$P" && step patch-reverted 0 || step patch-reverted 1
timeout 120 python3 -m benchmarks.prefill --seqlens 32768 --densities 0.1 --warmup 1 --reps 1 --profile 45 \
  --json "$R/prefill32k.json" > "$R/prefill32k.log" 2>&1
step prefill-profile $?
finish
