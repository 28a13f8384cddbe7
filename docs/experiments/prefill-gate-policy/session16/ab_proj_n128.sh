#!/usr/bin/env bash
# Prepared in session 16 for a later device call (not run yet): the untimed candidate proj_n128.patch against the
# tree it applies to, in one call. The device's copy of the tree is patched in place and restored at the end.
#   1. the gate's parts on the tree as it is (with the graph-replayed gate and selection rows);
#   2. the patch applied: the gate's GPU tests (accuracy against the eager gate) and the parts again;
#   3. the patch reverted.
. benchmarks/session.sh ab_proj_n128
P=docs/experiments/prefill-gate-policy/session16/proj_n128.patch
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --json "$R/parts_before.json" \
  > "$R/parts_before.log" 2>&1
step parts-before $?; grep -E "proj|gate|select" "$R/parts_before.log"
git apply "$P" && step patch-applied 0 || step patch-applied 1
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py > "$R/gpu_tests.log" 2>&1
step gpu-tests-patched $?; tail -n 3 "$R/gpu_tests.log"
timeout 150 python3 -m benchmarks.gate_parts --seqlens 32768,131072 --json "$R/parts_after.json" \
  > "$R/parts_after.log" 2>&1
step parts-after $?; grep -E "proj|gate" "$R/parts_after.log"
git apply -R "$P" && step patch-reverted 0 || step patch-reverted 1
finish
