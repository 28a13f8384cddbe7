#!/usr/bin/env bash
# Session 16, device call 5 (issue 16): the tree after the projection's own split was reverted (tl.dot's tf32x3
# again), the scores tile (64, 64, 4, 2): GPU tests of the gate and the sparse layer's no-host-sync path, the gate's
# accuracy against fp64, the time to first token; then (issue 17's follow-up) the bound's end-to-end decode cost.
. benchmarks/session.sh s16c5
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_gate_kernels.py \
  tests/test_gpu_kernels.py::test_sparse_layer_path_has_no_host_sync > "$R/gpu_tests.log" 2>&1
step gpu-tests $?; tail -n 3 "$R/gpu_tests.log"
timeout 100 python3 docs/experiments/prefill-gate-policy/gate_precision.py --json "$R/gate_precision.json" \
  > "$R/gate_precision.log" 2>&1
step gate-precision $?; cat "$R/gate_precision.log"
timeout 300 python3 -m benchmarks.prefill --seqlens 131072,32768 --densities 0.1,0.05 --warmup 1 --reps 2 \
  --json "$R/prefill.json" > "$R/prefill.log" 2>&1
step prefill $?; grep -E "^T=" "$R/prefill.log" | head -30
timeout 150 python3 -m benchmarks.generate --layers 8 --new 256 --warmup-prompt 8192 --rounds 4 \
  --configs decode-graph,decode-bound-graph --json "$R/generate.json" > "$R/generate.log" 2>&1
step generate $?; tail -n 12 "$R/generate.log"
finish
